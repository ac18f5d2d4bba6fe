"""Local cluster launcher: embedding servers as subprocesses for tests and demos.

Each server is ``python -m evssd.host.serving.cli embeddings ...`` bound to port 0 (the kernel
picks a free port); it prints one ``EVSSD-READY {json}`` line when it listens, and the launcher
waits for every line (bounded by ``startup_timeout``) and writes the real ports into
:attr:`LocalCluster.config`. Shutdown is SIGTERM, then SIGKILL after a grace period; a server in
a network namespace runs under ``ip netns exec``.
"""
from __future__ import annotations

import copy
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import save_config
from .server import READY_PREFIX

__all__ = ["LocalCluster", "ClusterError"]


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    def __init__(self, cfg: dict, *, provider: str = "tcp", backend: str = "dram",
                 netns: dict[str, tuple[str, str]] | None = None, credits: int = 32,
                 startup_timeout: float = 30.0, python: str = sys.executable):
        """``netns``: server -> (namespace, address to bind) for servers outside this namespace."""
        self.config = copy.deepcopy(cfg)
        self.provider = provider
        self.backend = backend
        self.netns = netns or {}
        self.credits = credits
        self.startup_timeout = startup_timeout
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="evssd-cluster-")
        self.config_path = Path(self._dir.name) / "cluster.json"

    def start(self) -> "LocalCluster":
        self._src = save_config(self.config, Path(self._dir.name) / "input.json")
        try:
            for name in self.config["servers"]:
                self._spawn(name, 0)
            deadline = time.monotonic() + self.startup_timeout
            for name, proc in self.procs.items():
                info = self._await_ready(name, proc, deadline)
                self.config["servers"][name]["host"] = info["host"]
                self.config["servers"][name]["port"] = info["port"]
        except BaseException:
            self.stop()
            raise
        save_config(self.config, self.config_path)
        return self

    def _spawn(self, name, port):
        cmd = [self.python, "-m", "evssd.host.serving.cli", "embeddings", "--config", str(self._src),
               "--server", name, "--port", str(port), "--provider", self.provider,
               "--backend", self.backend, "--credits", str(self.credits)]
        if name in self.netns:
            ns, addr = self.netns[name]
            cmd = ["ip", "netns", "exec", ns] + cmd + ["--host", addr]
        with open(Path(self._dir.name) / f"{name}.stderr", "w") as err:
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                                text=True, bufsize=1)
        return self.procs[name]

    def restart(self, name) -> float:
        """Start server ``name`` again on its address (after :meth:`kill`, or killing it
        first); returns the seconds until it reported ready."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            self.kill(name)
        if old is not None and old.stdout:
            old.stdout.close()
        t0 = time.monotonic()
        proc = self._spawn(name, self.config["servers"][name]["port"])
        try:
            self._await_ready(name, proc, t0 + self.startup_timeout)
        except BaseException:
            proc.kill()
            proc.wait(5)
            raise
        return time.monotonic() - t0

    def _await_ready(self, name, proc, deadline):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(f"server {name} did not report ready within {self.startup_timeout} s")
            r, _, _ = select.select([proc.stdout], [], [], left)
            if not r:
                continue
            line = proc.stdout.readline()
            if not line:
                proc.wait(5)
                err = (Path(self._dir.name) / f"{name}.stderr").read_text()
                raise ClusterError(f"server {name} exited before ready (code {proc.poll()}): {err.strip()[-2000:]}")
            if line.startswith(READY_PREFIX):
                return json.loads(line[len(READY_PREFIX):])

    def address(self, name) -> tuple[str, int]:
        s = self.config["servers"][name]
        return s["host"], s["port"]

    def signal(self, name, sig):
        proc = self.procs[name]
        if proc.poll() is None:
            # under `ip netns exec` the server is the exec'd process itself (same pid)
            os.kill(proc.pid, sig)

    def kill(self, name):
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(10)

    def stall(self, name, wait: float = 5.0):
        """Freeze server ``name`` (SIGSTOP) and return once the kernel reports it stopped."""
        self.signal(name, signal.SIGSTOP)
        pid = self.procs[name].pid
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    state = fh.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return  # no procfs (or gone): nothing more to wait for
            if state in ("T", "t"):
                return
            time.sleep(0.005)
        raise RuntimeError(f"server {name} (pid {pid}) did not stop within {wait} s of SIGSTOP")

    def resume(self, name):
        self.signal(name, signal.SIGCONT)

    def stop(self, grace: float = 5.0):
        for name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout:
                proc.stdout.close()
        self.procs.clear()
        self._dir.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
