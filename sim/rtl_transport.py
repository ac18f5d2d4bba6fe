"""The ``rtl`` backend: the whole device's RTL in Verilator, in a child process, as an ordinary
:class:`~evssd.host.transport.Transport`.

The RTL is otherwise reachable only inside a cocotb test, whose scheduler owns the event loop.
Here the host keeps its own loop (``Device.open("rtl")``, the store, ``evssd.torch``): the
transport listens on a unix socket in a private temporary directory, starts
``python -m evssd.sim.rtl_child`` (build if needed, then the server bench
:mod:`evssd.sim.tb_rtl_server` on the build the L2 tests use) and speaks the small
request/response protocol of :mod:`evssd.sim.rtl_protocol` to it. Host memory lives in the
simulation (the bench's AxiRam); this side keeps only the allocator.

Every wait is bounded: the start (build included) by ``start_timeout``, each request by
``link_timeout``. When the simulator dies or stops answering, the call raises
:class:`~evssd.host.transport.TransportError` naming the cause and quoting the end of the
simulator's log, and later calls fail at once. :meth:`RtlTransport.close` ends the simulation,
reaps the child and removes the temporary directory; a transport that is never closed is cleaned
up when it is garbage collected or at interpreter exit. This module does not import cocotb.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping

from evssd.host.regfile import MMIOError
from evssd.host.transport import HostMemory, Transport, TransportError
from evssd.hw.regmap import Params
from evssd.sim.rtl_protocol import HELLO_KEYS, RESPONSE, Op, Status, encode_request, recv_exact

__all__ = ["RtlTransport", "DEFAULT_PARAMS"]

#: The 4-channel parameter set of the L2 device tests (tests/test_rtl_device.py), so that the
#: default ``rtl`` device reuses their Verilator build instead of compiling another one.
DEFAULT_PARAMS = Params(n_channels=4, host_data_bits=256, ch_data_bits=256, page_size=512,
                        pages_per_channel=64, max_tables=8, max_extents=4, ways=2, max_row_bytes=512,
                        max_inflight=4)

LOG_TAIL_LINES = 40


class _Child:
    """The child process and the temporary directory it uses; :meth:`stop` is idempotent and is
    also the transport's finalizer (so it must not refer to the transport)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="evssd-rtl-")
        self.log_path = os.path.join(self.tmp, "sim.log")
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no simulator log)"
        tail = text.splitlines()[-lines:]
        return "\n    ".join(tail) if tail else "(the simulator log is empty)"

    def exit_text(self) -> str:
        rc = self.proc.poll() if self.proc is not None else None
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    def kill(self):
        """Kill the child's process group (the child and the simulator it started), only while
        the child is not yet reaped, so the group id is surely still ours."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def stop(self, grace: float = 5.0):
        if self.sock is not None:
            self.sock.close()   # the server sees EOF and ends the simulation
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _positive(name: str, value, kind=(int, float)) -> float:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={value!r}: must be a positive finite number")
    return value


class RtlTransport(Transport):
    """The device's RTL in a Verilator child process.

    ``params``: the build (a :class:`~evssd.hw.regmap.Params` or a dict of its fields; default
    :data:`DEFAULT_PARAMS`). ``host_memory_bytes``: the host-memory window the device can DMA to.
    ``poll_cycles``: clock cycles per :meth:`wait` without an interrupt. ``stall``: probability
    of a random stall on every AXI channel of the host and flash memories (0: none), ``seed``
    for it. ``link_timeout``: seconds for one answer (apart from ``Device.open``'s command
    ``timeout``); ``start_timeout``: seconds for the build (a
    cold Verilator build of the whole device takes minutes) and the start of the simulator.
    """

    name = "rtl"

    def __init__(self, params: Params | Mapping | None = None, *, host_memory_bytes: int = 4 << 20,
                 poll_cycles: int = 32, stall: float = 0.0, seed: int = 0, link_timeout: float = 120.0,
                 start_timeout: float = 1800.0):
        if params is None:
            params = DEFAULT_PARAMS
        elif isinstance(params, Mapping):
            params = Params(**params)
        elif not isinstance(params, Params):
            raise TypeError(f"params must be a Params or a dict of its fields, got {type(params).__name__}")
        if isinstance(host_memory_bytes, bool) or not isinstance(host_memory_bytes, int) \
                or not 4096 <= host_memory_bytes <= 1 << 30 or host_memory_bytes % 64:
            raise ValueError(f"host_memory_bytes={host_memory_bytes!r}: must be a multiple of 64 in 4096..2**30")
        if isinstance(poll_cycles, bool) or not isinstance(poll_cycles, int) or not 1 <= poll_cycles <= 1 << 20:
            raise ValueError(f"poll_cycles={poll_cycles!r}: must be an integer 1..2**20")
        if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 <= stall < 1:
            raise ValueError(f"stall={stall!r}: must be a probability in [0, 1)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.link_timeout = _positive("link_timeout", link_timeout)
        start_timeout = _positive("start_timeout", start_timeout)
        self.params = params
        self._closed = False
        self._failure: str | None = None   # why the link broke, once it has
        self._child = child = _Child()
        self._finalizer = weakref.finalize(self, child.stop)
        try:
            self._start(params, dict(host_memory_bytes=host_memory_bytes, poll_cycles=poll_cycles,
                                     stall=float(stall), seed=seed), start_timeout)
        except BaseException:
            self._finalizer()   # kills the child if it runs, removes the directory
            raise

    # ------------------------------------------------------------------ start
    def _start(self, params: Params, options: dict, start_timeout: float):
        child = self._child
        path = os.path.join(child.tmp, "link.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            cfg = dict(options, socket=path, io_timeout=self.link_timeout, params=params.as_dict(),
                       run_dir=child.tmp)
            with open(child.log_path, "wb") as log:
                # Its own session: a Ctrl-C of the host does not reach it, and close() can end
                # the child and the simulator it starts as one process group.
                child.proc = subprocess.Popen([sys.executable, "-m", "evssd.sim.rtl_child", json.dumps(cfg)],
                                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              cwd=child.tmp, start_new_session=True)
            deadline = time.monotonic() + start_timeout
            while True:
                ready, _, _ = select.select([listener], [], [], 0.2)
                if ready:
                    conn, _ = listener.accept()
                    break
                if child.proc.poll() is not None:
                    raise self._error(f"the simulator {child.exit_text()} before it connected "
                                      f"(build or start failed)")
                if time.monotonic() > deadline:
                    raise self._error(f"the simulator did not start within start_timeout={start_timeout} s")
        finally:
            listener.close()
        conn.settimeout(self.link_timeout)
        child.sock = conn
        try:
            status, _, n = RESPONSE.unpack(recv_exact(conn, RESPONSE.size))
            hello = json.loads(recv_exact(conn, n))
        except (OSError, EOFError, ValueError) as exc:
            raise self._error(f"no hello from the simulator ({type(exc).__name__}: {exc})") from None
        if status != Status.OK or not isinstance(hello, dict) or set(HELLO_KEYS) - set(hello):
            raise self._error(f"bad hello from the simulator: {hello!r}")
        if Params(**hello["params"]) != params:
            raise self._error(f"the simulator runs {hello['params']}, expected {params}")
        self.sim_pid = int(hello["pid"])
        self.memory = HostMemory(int(hello["host_base"]), int(hello["host_bytes"]))

    def _error(self, what: str) -> TransportError:
        return TransportError(f"{self.name}: {what}; end of the simulator log:\n    {self._child.log_tail()}")

    # ------------------------------------------------------------------ requests
    def _call(self, op: Op, addr: int = 0, arg0: int = 0, arg1: int = 0, payload: bytes = b"") -> tuple[int, bytes]:
        if self._closed:
            raise TransportError(f"{self.name}: the transport is closed")
        if self._failure is not None:
            raise TransportError(f"{self.name}: the link failed earlier: {self._failure}")
        sock = self._child.sock
        try:
            sock.sendall(encode_request(op, addr, arg0, arg1, payload))
            status, value, n = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
            data = recv_exact(sock, n) if n else b""
        except TimeoutError:
            # the link is given up: a late answer could be taken for a later request's
            raise self._broken(f"no answer to {op.name} within link_timeout={self.link_timeout} s", 0.5) from None
        except (OSError, EOFError, ValueError) as exc:
            raise self._broken(f"the link failed during {op.name} ({exc})", 30.0) from None
        if status == Status.MMIO_ERROR:
            raise MMIOError("read" if op == Op.READ32 else "write", addr, value)
        if status != Status.OK:
            raise TransportError(f"{self.name}: the simulator refused {op.name}: {data.decode(errors='replace')}")
        return value, data

    def _broken(self, why: str, grace: float) -> TransportError:
        """The link is in an unknown state: give the child ``grace`` seconds to end by itself (a
        simulator that closed the socket is gone, and its child then exits), end it otherwise,
        and remember why."""
        child = self._child
        try:
            child.proc.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            self._failure = f"{why}; simulator process still running: stopped it"
        else:
            self._failure = f"{why}; simulator process {child.exit_text()}"
        return self._error(self._failure)

    def _check_window(self, addr: int, nbytes: int):
        if addr < self.memory.base or addr + nbytes > self.memory.base + self.memory.size:
            raise ValueError(f"host access 0x{addr:x}+{nbytes} outside the window "
                             f"0x{self.memory.base:x}+{self.memory.size}")

    async def read32(self, addr: int) -> int:
        return self._call(Op.READ32, addr)[0]

    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        self._call(Op.WRITE32, addr, value & 0xFFFF_FFFF, strb & 0xF)

    async def mem_write(self, addr: int, data: bytes) -> None:
        data = bytes(data)
        self._check_window(addr, len(data))
        self._call(Op.MEM_WRITE, addr, payload=data)

    async def mem_read(self, addr: int, nbytes: int) -> bytes:
        self._check_window(addr, nbytes)
        return self._call(Op.MEM_READ, addr, nbytes)[1]

    async def wait(self) -> None:
        self._call(Op.WAIT)

    # ------------------------------------------------------------------ closing
    @property
    def log_path(self) -> str:
        """The simulator's log (build output included); removed by :meth:`close`."""
        return self._child.log_path

    def shutdown(self) -> None:
        """End the simulation, reap the child, remove the temporary directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        sock = self._child.sock
        if sock is not None and self._failure is None:
            try:
                sock.settimeout(min(self.link_timeout, 10.0))
                sock.sendall(encode_request(Op.CLOSE))
                recv_exact(sock, RESPONSE.size)
            except (OSError, EOFError):
                pass
        self._finalizer.detach()
        self._child.stop(grace=30.0)

    async def close(self) -> None:
        self.shutdown()
