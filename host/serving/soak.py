"""Load and soak run: well-behaved rankers next to misbehaving clients while servers are
killed and restarted one at a time (loopback, bounded in time and count).

Phases, each ``phase_s`` seconds, the same good rankers throughout:

1. ``clean``: good rankers only (the baseline p99);
2. ``bad clients``: plus slow (HELLO one byte at a time), silent (connect, send nothing),
   oversized (a SEND header of twice the message limit, then its body) and disconnecting
   (half a request, then close) clients, each in a loop against every server;
3. ``chaos``: plus one server at a time killed (SIGKILL) and restarted on its address after
   ``down_s``.

Every good batch is checked against the numpy golden: it is either correct or fails with a
:class:`~.ranker.ServingError`; a wrong answer or another exception is counted as a defect.
Recovery per restart: from the restarted server reporting ready until every ranker is
connected to it again. Server memory (RSS from /proc) is sampled before phase 2, at its
peak, and after its bad clients have left (the same server processes, before any restart). Wall-clock latencies; nothing here is a model estimate.
"""
from __future__ import annotations

import json
import os
import random
import socket
import threading
import time

import numpy as np

from . import protocol as P

__all__ = ["run_soak"]


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _Good(threading.Thread):
    def __init__(self, cfg, tables, seed, timeout, stop, clock):
        super().__init__(daemon=True, name=f"soak-good-{seed}")
        from .engine import Engine
        from .providers import get_provider
        from .ranker import Ranker
        self.cfg, self.tables, self.seed, self.stop, self.clock = cfg, tables, seed, stop, clock
        self.engine = Engine(get_provider("tcp"), 1, request_timeout=timeout)
        self.ranker = Ranker(cfg, self.engine, timeout=timeout, reconnect_backoff=(0.02, 0.5),
                             connect_timeout=0.5)
        self.records: list[tuple] = []      # (phase, latency s, outcome, message)

    def run(self):
        from .ranker import ServingError, local_pooled, synthetic_batch
        rng = np.random.default_rng(self.seed)
        try:
            while not self.stop.is_set():
                sparse = synthetic_batch(self.cfg, 32, 8, rng)[1]
                phase = self.clock["phase"]
                t0 = time.perf_counter()
                try:
                    got = self.ranker.embeddings(sparse)
                except ServingError as exc:
                    self.records.append((phase, time.perf_counter() - t0, "error", str(exc)[:300]))
                    time.sleep(0.01)
                    continue
                except Exception as exc:          # not a clear error: a defect, recorded
                    self.records.append((phase, time.perf_counter() - t0, "defect",
                                         f"{type(exc).__name__}: {exc}"[:300]))
                    continue
                dt = time.perf_counter() - t0
                ok = all(np.allclose(g, w, rtol=1e-5, atol=1e-5)
                         for g, w in zip(got, local_pooled(self.cfg, sparse, self.tables)))
                self.records.append((phase, dt, "ok" if ok else "wrong", ""))
        finally:
            self.engine.close()


class _Bad(threading.Thread):
    """One misbehaving client kind in a loop over the servers; counts what the servers did."""

    def __init__(self, kind, addresses, stop, max_message):
        super().__init__(daemon=True, name=f"soak-bad-{kind}")
        self.kind, self.addresses, self.stop, self.max_message = kind, addresses, stop, max_message
        self.counts = {"attempts": 0, "refused_or_closed": 0, "connect_failed": 0, "error_frames": 0}

    def _hello(self, s):
        body = json.dumps({"recv_depth": 4}).encode()
        s.sendall(P.pack_header(P.Op.HELLO, 0, len(body)) + body)

    def _wait_closed(self, s, limit):
        end = time.monotonic() + limit
        s.settimeout(0.2)
        while time.monotonic() < end and not self.stop.is_set():
            try:
                data = s.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return True
            if not data:
                return True
            if P.HEADER.size <= len(data) and data[:4] == P.MAGIC.to_bytes(4, "little") and \
                    data[5] == P.Op.ERROR:
                self.counts["error_frames"] += 1
        return False

    def once(self, host, port):
        s = socket.create_connection((host, port), timeout=2)
        try:
            if self.kind == "silent":
                closed = self._wait_closed(s, 8)
            elif self.kind == "slow":
                frame = P.pack_header(P.Op.HELLO, 0, 2) + b"{}"
                closed = False
                for b in frame:
                    if self.stop.wait(0.3):
                        break
                    try:
                        s.send(bytes([b]))
                    except OSError:
                        closed = True
                        break
                closed = closed or self._wait_closed(s, 2)
            elif self.kind == "oversized":
                self._hello(s)
                s.recv(4096)
                n = 2 * self.max_message
                s.sendall(P.pack_header(P.Op.SEND, 5, n))
                chunk = b"\0" * (1 << 20)
                for _ in range(n >> 20):
                    s.sendall(chunk)
                closed = self._wait_closed(s, 0.5) or True   # refused by an ERROR frame, connection kept
            else:                                   # disconnecting: half a request, then gone
                self._hello(s)
                s.recv(4096)
                req = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"x" * 1000))
                s.sendall(P.pack_header(P.Op.SEND, 9, len(req)) + req[:len(req) // 2])
                closed = True
            if closed:
                self.counts["refused_or_closed"] += 1
        finally:
            s.close()

    def run(self):
        rng = random.Random(hash(self.kind) & 0xFFFF)
        while not self.stop.is_set():
            host, port = rng.choice(list(self.addresses()))
            self.counts["attempts"] += 1
            try:
                self.once(host, port)
            except OSError:
                self.counts["connect_failed"] += 1      # the server is down (chaos phase)
                self.stop.wait(0.05)
            self.stop.wait(0.005)


def run_soak(*, servers: int = 3, tables: int = 2, rows: int = 4000, dim: int = 16, good: int = 2,
             phase_s: float = 4.0, down_s: float = 0.5, timeout: float = 1.0, bad: bool = True,
             seed: int = 0) -> dict:
    from .config import make_config, table_rows
    from .launcher import LocalCluster

    cfg0 = make_config(tables, rows, dim, servers, replicas=1)
    max_message = 4 << 20
    out = {"params": dict(servers=servers, tables=tables, rows=rows, dim=dim, good=good, phase_s=phase_s,
                          down_s=down_s, timeout=timeout, batch=32, pooling=8, replicas=1)}
    with LocalCluster(cfg0) as cluster:
        cfg = cluster.config
        golden = {t: table_rows(cfg, t) for t in cfg["tables"]}
        pids = lambda: {s: p.pid for s, p in cluster.procs.items()}
        rss = {"start": {s: _rss_kib(p) for s, p in pids().items()}}
        stop_good, stop_bad = threading.Event(), threading.Event()
        clock = {"phase": "clean"}
        goods = [_Good(cfg, golden, seed + i, timeout, stop_good, clock) for i in range(good)]
        for g in goods:
            g.start()
        time.sleep(phase_s)
        bads, all_bads = [], []
        peak = dict(rss["start"])
        addrs = lambda: [cluster.address(s) for s in cfg["servers"]]

        def start_bad(stop):
            new = [_Bad(k, addrs, stop, max_message) for k in ("slow", "silent", "oversized", "disconnecting")]
            for b in new:
                b.start()
            all_bads.extend(new)
            return new
        if bad:
            clock["phase"] = "bad clients"
            first_stop = threading.Event()
            bads = start_bad(first_stop)
            end = time.monotonic() + phase_s
            while time.monotonic() < end:
                for s, pid in pids().items():
                    peak[s] = max(peak[s] or 0, _rss_kib(pid) or 0)
                time.sleep(0.1)
            first_stop.set()
            for b in bads:
                b.join(15)
            time.sleep(1.0)                 # the servers notice the closes
            rss["after_bad_clients_left"] = {s: _rss_kib(p) for s, p in pids().items()}
            bads = start_bad(stop_bad)      # and again, through the chaos phase
        clock["phase"] = "chaos"
        restarts = []
        names = list(cfg["servers"])
        end = time.monotonic() + max(phase_s, len(names) * (down_s + 1.5))
        i = 0
        while time.monotonic() < end or i < len(names):
            s = names[i % len(names)]
            i += 1
            cluster.kill(s)
            killed = time.monotonic()
            time.sleep(down_s)
            cluster.restart(s)
            ready = time.monotonic()
            back = None
            limit = ready + 10 * (timeout + 1)
            while time.monotonic() < limit:
                if all(not g.ranker.conns[s].dead for g in goods):
                    back = time.monotonic()
                    break
                time.sleep(0.005)
            restarts.append({"server": s, "down_s": ready - killed,
                             "recovery_s": None if back is None else back - ready})
            time.sleep(0.3)
            if i >= 2 * len(names):
                break
        stop_bad.set()
        for b in bads:
            b.join(15)
        clock["phase"] = "after"
        time.sleep(min(phase_s, 1.0))
        stop_good.set()
        for g in goods:
            g.join(30)
        time.sleep(0.5)
        rss["peak_with_bad_clients"] = peak
    recs = [r for g in goods for r in g.records]
    phases = {}
    for ph in ("clean", "bad clients", "chaos", "after"):
        rs = [r for r in recs if r[0] == ph]
        lat = np.array([r[1] for r in rs if r[2] == "ok"]) * 1e3
        phases[ph] = {"batches": len(rs), "ok": int(sum(r[2] == "ok" for r in rs)),
                      "errors": int(sum(r[2] == "error" for r in rs)),
                      "wrong": int(sum(r[2] == "wrong" for r in rs)),
                      "defects": int(sum(r[2] == "defect" for r in rs)),
                      "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                      "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                      "max_ms": float(max(r[1] for r in rs) * 1e3) if rs else None}
    out["phases"] = phases
    out["error_examples"] = sorted({r[3] for r in recs if r[2] in ("error", "defect")})[:5]
    out["bad_clients"] = {}
    for b in all_bads:
        agg = out["bad_clients"].setdefault(b.kind, dict.fromkeys(b.counts, 0))
        for k, v in b.counts.items():
            agg[k] += v
    out["restarts"] = restarts
    out["rss_kib"] = rss
    # a batch may retry on each of the shard's servers, each bounded by the timeout (+1 s slack)
    out["latency_bound_s"] = (timeout + 1.0) * 2 + 1.0
    out["max_batch_s"] = max((r[1] for r in recs), default=0.0)
    return out
