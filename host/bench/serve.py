"""`evssd bench serve`: the FlexEMR serving layer, measured side by side in one run.

1. engine: multi- vs single-threaded I/O across fan-out 1..8 servers, uniform and skewed shard
   sizes (throughput, p50/p99 batch latency; ``--clients`` rankers share the engine);
   then live migration: all connections start on one thread and the engine rebalances by
   measured bytes, against mapping-aware placement from the start;
2. pooling: hierarchical pooling on the servers (one MULTI message per server, or one message
   per table) vs row-by-row one-sided READs (bytes on the wire per batch, batch latency);
3. cache: adaptive vs static ranker cache under one memory budget (largest batch served,
   latency and hit rate per batch size);
4. overhead: engine request round trip vs a bare blocking-socket round trip of the same size
   (``--only rtt`` runs just this, against one server, and writes results/serve-rtt/).

All servers are real processes on 127.0.0.1 (tcp provider). One cluster of 8 servers holding
full copies of every table serves every experiment; each experiment's shard map is a view over
it, so fan-out and skew change without restarting servers.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from .common import percentiles, write_results
from evssd.host import cli_types as ct

__all__ = ["add_arguments", "run"]

# Zipf exponent 1 + CACHE_ALPHA for the cache experiment: a hot set, but not one row per bag
CACHE_ALPHA = 0.2


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="~15 s: fewer points and batches")
    parser.add_argument("--threads", type=ct.positive_int, default=4, help="I/O threads of the multi-threaded engine")
    parser.add_argument("--clients", type=ct.positive_int, default=2, help="concurrent ranker loops sharing the engine")
    parser.add_argument("--tables", type=ct.positive_int, default=4)
    parser.add_argument("--rows", type=ct.positive_int, default=50000)
    parser.add_argument("--dim", type=ct.positive_int, default=32)
    parser.add_argument("--batch-size", type=ct.positive_int, default=256)
    parser.add_argument("--pooling", type=ct.positive_int, default=20, help="rows per bag")
    parser.add_argument("--max-fanout", type=ct.positive_int, default=8)
    parser.add_argument("--reps", type=ct.positive_int, default=None,
                        help="repetitions per engine point, 1-thread and N-thread runs interleaved (median reported)")
    parser.add_argument("--budget-mb", type=ct.positive_float, default=16.0, help="ranker memory budget (cache experiment)")
    parser.add_argument("--out", default=None, help="results root (default: $EVSSD_RESULTS or ./results)")
    parser.add_argument("--soak", type=ct.positive_float, default=None, metavar="PHASE_S",
                        help="instead: the soak run (good rankers, bad clients, servers killed and "
                             "restarted), PHASE_S seconds per phase; results under results/serve-soak/")
    parser.add_argument("--only", choices=["rtt"], default=None,
                        help="rtt: only the round-trip comparison (engine echo / engine call / engine future / "
                             "server without engine / bare echo), results under results/serve-rtt/")
    parser.add_argument("--rtt-block", type=ct.positive_int, default=1,
                        help="round trips of one variant in a row before the next variant's turn (rtt comparison)")
    parser.add_argument("--rtt-reps", type=ct.positive_int, default=None,
                        help="round trips per size and variant (default 200, 50 with --quick, 2000 with --only rtt)")
    parser.add_argument("--backends", default="dram,evssd",
                        help="embedding-server backends compared in the backend column (comma-separated)")


# ------------------------------------------------------------------ helpers
def _view(cluster_cfg, n_tables, rows, dim, fanout, skew):
    from evssd.host.serving.config import make_config
    cfg = make_config(n_tables, rows, dim, fanout, skew=skew)
    for s in cfg["servers"]:
        cfg["servers"][s] = dict(cluster_cfg["servers"][s])
    # the same seeds as the cluster's tables: identical contents
    cfg["tables"] = {t: dict(cluster_cfg["tables"][t]) for t in cfg["tables"]}
    return cfg


def _wire_bytes(engine):
    return sum(c.bytes_moved for c in engine.connections.values())


def _engine_point(cfg, threads, clients, batches, batch, pooling, seed, rebalance_every=0, pin_thread=None):
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.ranker import Ranker, synthetic_batch
    from evssd.host.serving.providers import get_provider

    rng = np.random.default_rng(seed)
    work = [synthetic_batch(cfg, batch, pooling, rng)[1] for _ in range(min(batches, 8))]
    with Engine(get_provider("tcp"), threads, credits=16, request_timeout=30) as eng:
        ranker = Ranker(cfg, eng, timeout=30, rebalance_every=rebalance_every, pin_thread=pin_thread)
        start_place = eng.placement()
        for w in work[:4]:
            ranker.embeddings(w)                      # warm-up (first touches of receive buffers)
        lat = []
        lock = threading.Lock()

        def loop(k):
            mine = []
            for i in range(k, batches, clients):
                t0 = time.perf_counter()
                ranker.embeddings(work[i % len(work)])
                mine.append(time.perf_counter() - t0)
            with lock:
                lat.extend(mine)
        t0 = time.perf_counter()
        ths = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        wall = time.perf_counter() - t0
        out = {"threads": threads, "samples_per_s": batches * batch / wall,
               **{k + "_ms": v * 1e3 for k, v in percentiles(lat).items()},
               "migrations": eng.migrations, "placement": eng.placement(), "start_placement": start_place}
    return out


def _pooling_point(cfg, fetch, batches, batch, pooling, seed, multi=True):
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.ranker import Ranker, local_pooled, synthetic_batch
    from evssd.host.serving.providers import get_provider

    rng = np.random.default_rng(seed)
    with Engine(get_provider("tcp"), 2, credits=16, request_timeout=60, read_window=128) as eng:
        r = Ranker(cfg, eng, fetch=fetch, timeout=60, batch_messages=multi)
        r.embeddings(synthetic_batch(cfg, 8, pooling, rng)[1])
        lat, wire, err = [], [], 0.0
        for _ in range(batches):
            sparse = synthetic_batch(cfg, batch, pooling, rng)[1]
            b0 = _wire_bytes(eng)
            t0 = time.perf_counter()
            got = r.embeddings(sparse)
            lat.append(time.perf_counter() - t0)
            wire.append(_wire_bytes(eng) - b0)
            err = max(err, max(float(np.abs(g - w).max()) for g, w in zip(got, local_pooled(cfg, sparse))))
    name = fetch if fetch == "rows" else ("pooled" if multi else "pooled-1msg/table")
    return {"fetch": name, "bytes_per_batch": float(np.mean(wire)), "messages_batched": multi,
            **{k + "_ms": v * 1e3 for k, v in percentiles(lat).items()}, "max_abs_err_vs_numpy": err}


def _cache_points(cfg, budget, sizes, batches, pooling, seed):
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.ranker import BudgetExceeded, EmbeddingCache, Ranker, synthetic_batch
    from evssd.host.serving.providers import get_provider

    rows = {}
    static_rows = (budget // 2) // EmbeddingCache.bytes_per_row(cfg["dim"])
    for mode in ("adaptive", "static"):
        rng = np.random.default_rng(seed)
        with Engine(get_provider("tcp"), 2, credits=16, request_timeout=60) as eng:
            r = Ranker(cfg, eng, budget_bytes=budget, adaptive=mode == "adaptive",
                       static_cache_rows=static_rows, timeout=60)
            for _ in range(3):        # warm the cache on small batches
                r.embeddings(synthetic_batch(cfg, 64, pooling, rng, alpha=CACHE_ALPHA)[1])
            pts = []
            for b in sizes:
                lat, served, h0, m0 = [], True, r.cache.hits, r.cache.misses
                for _ in range(batches):
                    sparse = synthetic_batch(cfg, b, pooling, rng, alpha=CACHE_ALPHA)[1]
                    t0 = time.perf_counter()
                    try:
                        r.embeddings(sparse)
                    except BudgetExceeded:
                        served = False
                        break
                    lat.append(time.perf_counter() - t0)
                hits, misses = r.cache.hits - h0, r.cache.misses - m0
                pts.append({"batch": b, "served": served, "cache_rows": r.cache.capacity,
                            "hit_rate": hits / max(1, hits + misses),
                            "mean_ms": float(np.mean(lat)) * 1e3 if lat else None})
            rows[mode] = {"points": pts, "largest_batch_served": max([p["batch"] for p in pts if p["served"]], default=0),
                          "static_cache_rows": static_rows if mode == "static" else None}
    return rows


def _backend_points(args, backends, batches, seed=11):
    """The same shard map served by each backend (``dram``: rows in memory; ``evssd``: the
    EV-SSD device model behind :class:`~evssd.host.store.EmbeddingStore`, its latency is the
    model's wall-clock time on this host, not a hardware measurement)."""
    from evssd.host.serving.config import make_config, table_rows
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.launcher import LocalCluster
    from evssd.host.serving.providers import get_provider
    from evssd.host.serving.ranker import Ranker, local_pooled, synthetic_batch

    cfg = make_config(args.tables, min(args.rows, 20000), args.dim, 2)
    out = []
    for backend in backends:
        rng = np.random.default_rng(seed)
        work = [synthetic_batch(cfg, args.batch_size, args.pooling, rng)[1] for _ in range(batches)]
        t_start = time.perf_counter()
        with LocalCluster(cfg, backend=backend, startup_timeout=300) as cluster:
            startup = time.perf_counter() - t_start
            ccfg = cluster.config
            with Engine(get_provider("tcp"), 2, request_timeout=60) as eng:
                r = Ranker(ccfg, eng, timeout=60)
                r.embeddings(work[0])
                golden = {t: table_rows(ccfg, t) for t in ccfg["tables"]}
                lat, err = [], 0.0
                for w in work:
                    t1 = time.perf_counter()
                    got = r.embeddings(w)
                    lat.append(time.perf_counter() - t1)
                    err = max(err, max(float(np.abs(g - x).max())
                                       for g, x in zip(got, local_pooled(ccfg, w, golden))))
                wall = sum(lat)            # batches back to back, the golden check excluded
        out.append({"backend": backend, "samples_per_s": len(work) * args.batch_size / wall,
                    **{k + "_ms": v * 1e3 for k, v in percentiles(lat).items()},
                    "max_abs_err_vs_numpy": err, "startup_s": startup, "batches": len(work)})
    return out


def _cpu_points(cluster, thread_counts, clients, n_req, size=4096):
    """CPU time per request of this (ranker) process per engine thread count, with
    ``clients`` caller threads: on 2 shared cores the throughput gain of more I/O threads
    cannot show, the CPU cost per request can (and the run is ready for a bigger machine)."""
    import resource

    from evssd.host.serving import protocol as P
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.providers import get_provider

    names = [n for n in cluster.config["servers"]][:max(thread_counts)]
    payload = b"\xcd" * size
    req = P.encode_request(P.Request(P.MsgType.ECHO, payload=payload))
    out = []
    for th in thread_counts:
        with Engine(get_provider("tcp"), th, request_timeout=30) as eng:
            conns = [eng.connect(n, *cluster.address(n)) for n in names]

            def loop(k):
                c = conns[k % len(conns)]
                for _ in range(n_req // clients):
                    assert eng.request(c, req).result(30) == payload
            loop(0)
            ths = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
        n = (n_req // clients) * clients
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        out.append({"threads": th, "clients": clients, "requests": n, "bytes": size,
                    "cpu_us_per_request": cpu / n * 1e6, "wall_us_per_request": wall / n * 1e6,
                    "requests_per_s": n / wall})
    return out


_ECHO_SERVER = r"""
import socket, struct, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def exact(n):
    b = bytearray()
    while len(b) < n:
        k = c.recv(n - len(b))
        if not k: sys.exit(0)
        b += k
    return b
while True:
    n = struct.unpack("<I", exact(4))[0]
    c.sendall(struct.pack("<I", n) + exact(n))
"""


def _recv_frame(sock):
    from evssd.host.serving import protocol as P
    buf = bytearray()
    while len(buf) < P.HEADER.size:
        buf += sock.recv(P.HEADER.size - len(buf))
    hdr = P.unpack_header(bytes(buf))
    body = bytearray()
    while len(body) < hdr.length:
        k = sock.recv(hdr.length - len(body))
        if not k:
            raise ConnectionError("server closed")
        body += k
    return bytes(body)


def _proc_cpu(pid):
    """CPU seconds of process ``pid`` so far, from /proc; None elsewhere. The scheduler's
    nanosecond run time of its live threads where the kernel keeps it (schedstat), else
    user + system time in clock ticks (10 ms: too coarse for a few thousand requests)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total * 1e-9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _spawn_engine_echo():
    """``evssd serve echo`` as a process (the engine's server end with an echoing handler):
    returns the process and its address once it reported ready."""
    import json
    import select

    from evssd.host.serving.message_server import READY_PREFIX

    proc = subprocess.Popen([sys.executable, "-m", "evssd.host.serving.cli", "echo"],
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("the engine echo server did not report ready within 60 s")
            if not select.select([proc.stdout], [], [], left)[0]:
                continue
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the engine echo server exited before ready (code {proc.wait(5)})")
            if line.startswith(READY_PREFIX):
                info = json.loads(line[len(READY_PREFIX):])
                return proc, (info["host"], info["port"])
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise


def _stop(proc):
    proc.kill()
    proc.wait(5)


def _overhead_points(cluster, sizes, reps, block=1):
    """Round trips per size, five variants taking turns in blocks (see _RTT_NOTE);
    wall clock percentiles, plus this thread's CPU per round trip of each variant and the
    server processes' CPU per request they answered."""
    import struct

    from evssd.host.serving import protocol as P
    from evssd.host.serving.engine import Engine
    from evssd.host.serving.providers import get_provider

    out = []
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    eproc = None
    try:
        port = int(proc.stdout.readline())
        eproc, echo_addr = _spawn_engine_echo()
        bare = socket.create_connection(("127.0.0.1", port), timeout=10)
        bare.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # plain blocking sockets for the two baselines: with a timeout, Python polls before
        # every send and receive, two system calls more per round trip than the floor
        bare.settimeout(None)
        # the same embedding server without the engine: a blocking client speaking the frame
        # protocol (what the server's side of a round trip costs)
        raw = socket.create_connection(cluster.address("s0"), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = b'{"recv_depth": 4}'
        raw.sendall(P.pack_header(P.Op.HELLO, 0, len(hello)) + hello)
        _recv_frame(raw)
        raw.settimeout(None)
        with Engine(get_provider("tcp"), 1, request_timeout=30) as eng:
            # one connection per engine variant: the I/O thread reads the future variant's
            # replies, the caller reads the call variants'; sharing one connection would time
            # the hand-over of its socket between them in every iteration instead
            conn_fut = eng.connect("s0-future", *cluster.address("s0"))
            conn = eng.connect("s0", *cluster.address("s0"))
            conn_echo = eng.connect("echo", *echo_addr)
            for size in sizes:
                payload = b"\xab" * size
                req = P.encode_request(P.Request(P.MsgType.ECHO, payload=payload))
                frame = P.pack_header(P.Op.SEND, 1, len(req)) + req

                def future():
                    assert eng.request(conn_fut, req).result(30) == payload

                def call():
                    assert eng.call(conn, req, timeout=30) == payload

                def engine_echo():
                    assert eng.call(conn_echo, req, timeout=30) == payload

                def bare_echo():
                    bare.sendall(struct.pack("<I", size) + payload)
                    got = 0
                    while got < size + 4:
                        got += len(bare.recv(size + 4 - got))

                def server_no_engine():
                    raw.sendall(frame)
                    assert P.decode_reply(_recv_frame(raw)) == payload
                variants = (future, call, engine_echo, bare_echo, server_no_engine)
                times = [[] for _ in variants]
                cpu = np.zeros(len(variants))
                for v in variants:                       # warm-up
                    for _ in range(5):
                        v()
                pids = (cluster.procs["s0"].pid, eproc.pid, proc.pid)
                srv0 = [_proc_cpu(pid) for pid in pids]
                for blk in range(-(-reps // block)):
                    n = min(block, reps - blk * block)
                    for k, v in enumerate(variants):
                        ts = times[k]
                        c0 = time.thread_time()
                        for _ in range(n):
                            t0 = time.perf_counter()
                            v()
                            ts.append(time.perf_counter() - t0)
                        cpu[k] += time.thread_time() - c0
                srv1 = [_proc_cpu(pid) for pid in pids]
                # three requests per round reach the embedding server (future, call, raw)
                srv_us = [None if a is None or b is None else (b - a) / (k * reps) * 1e6
                          for a, b, k in zip(srv0, srv1, (3, 1, 1))]
                t_fut, t_eng, t_echo, t_bare, t_raw = times
                cpu_us = cpu / reps * 1e6
                e, f, ee, b, rw = (percentiles(t_eng), percentiles(t_fut), percentiles(t_echo),
                                   percentiles(t_bare), percentiles(t_raw))
                out.append({"bytes": size, "engine_p50_us": e["p50"] * 1e6, "engine_p99_us": e["p99"] * 1e6,
                            "engine_future_p50_us": f["p50"] * 1e6, "engine_future_p99_us": f["p99"] * 1e6,
                            "engine_echo_p50_us": ee["p50"] * 1e6, "engine_echo_p99_us": ee["p99"] * 1e6,
                            "bare_p50_us": b["p50"] * 1e6, "bare_p99_us": b["p99"] * 1e6,
                            "server_no_engine_p50_us": rw["p50"] * 1e6,
                            "server_no_engine_p99_us": rw["p99"] * 1e6,
                            "overhead_p50_us": (ee["p50"] - b["p50"]) * 1e6,
                            "ratio_echo_p50": ee["p50"] / b["p50"],
                            "ratio_p50": e["p50"] / b["p50"],
                            "ratio_server_no_engine_p50": e["p50"] / rw["p50"],
                            "client_cpu_us": {"engine_future": cpu_us[0], "engine": cpu_us[1],
                                              "engine_echo": cpu_us[2], "bare": cpu_us[3],
                                              "server_no_engine": cpu_us[4]},
                            "server_cpu_us_per_request": srv_us[0],
                            "engine_echo_server_cpu_us_per_request": srv_us[1],
                            "bare_server_cpu_us_per_request": srv_us[2]})
        bare.close()
        raw.close()
    finally:
        _stop(proc)
        if eproc is not None:
            _stop(eproc)
    return out


# ------------------------------------------------------------------ main
def _run_soak(args) -> int:
    from evssd.host.serving.soak import run_soak

    data = run_soak(phase_s=args.soak, rows=min(args.rows, 20000), dim=args.dim)
    for ph, p in data["phases"].items():
        print(f"soak {ph:12s}: {p['batches']:6d} batches, ok {p['ok']}, clear errors {p['errors']}, "
              f"wrong {p['wrong']}, defects {p['defects']}, p50 {p['p50_ms'] or 0:.2f} ms, "
              f"p99 {p['p99_ms'] or 0:.2f} ms, max {p['max_ms'] or 0:.1f} ms", flush=True)
    for k, c in data["bad_clients"].items():
        print(f"bad   {k:13s}: {c}")
    for r in data["restarts"]:
        print(f"restart {r['server']}: down {r['down_s']:.2f} s, all rankers back {r['recovery_s']} s after ready")
    print(f"server RSS KiB: {data['rss_kib']}")
    fig = _soak_figure(data)
    cmd = f"evssd bench serve --soak {args.soak:g}"
    path = write_results("serve-soak", data, fig, command=cmd, root=args.out)
    print(f"wrote {path}")
    return 0


def _soak_figure(data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ph = [k for k, v in data["phases"].items() if v["batches"]]
    x = np.arange(len(ph))
    a = ax[0]
    a.bar(x - 0.2, [data["phases"][k]["p50_ms"] or 0 for k in ph], 0.4, label="p50")
    a.bar(x + 0.2, [data["phases"][k]["p99_ms"] or 0 for k in ph], 0.4, label="p99")
    a.set_xticks(x, ph, fontsize=8)
    a.set_ylabel("good rankers' batch latency (ms)")
    a.set_title("good clients: with and without bad ones")
    a.legend(fontsize=8)
    a = ax[1]
    a.bar(x, [data["phases"][k]["ok"] for k in ph], label="correct")
    a.bar(x, [data["phases"][k]["errors"] for k in ph], bottom=[data["phases"][k]["ok"] for k in ph],
          label="clear error", color="tab:orange")
    a.set_xticks(x, ph, fontsize=8)
    a.set_ylabel("batches")
    a.set_title("every batch: correct or a clear error")
    a.legend(fontsize=8)
    a = ax[2]
    rs = data["restarts"]
    a.bar(range(len(rs)), [r["recovery_s"] or 0 for r in rs], tick_label=[r["server"] for r in rs])
    a.set_ylabel("s from restart ready to all rankers back")
    a.set_title("recovery after kill + restart")
    fig.tight_layout()
    return fig


def _print_rtt(ov):
    def us(x):
        return "n/a" if x is None else f"{x:.1f} us"
    for p in ov:
        print(f"rtt     {p['bytes']:6d} B: engine echo p50 {p['engine_echo_p50_us']:7.1f} us, bare echo "
              f"{p['bare_p50_us']:7.1f} us: engine echo/bare {p['ratio_echo_p50']:.2f}x", flush=True)
        print(f"        embedding server: engine call {p['engine_p50_us']:7.1f} us, engine future "
              f"{p['engine_future_p50_us']:7.1f} us, without the engine {p['server_no_engine_p50_us']:7.1f} us; "
              f"call/bare {p['ratio_p50']:.2f}x, call/server-no-engine {p['ratio_server_no_engine_p50']:.2f}x",
              flush=True)
        c = p["client_cpu_us"]
        print(f"        caller-thread CPU per round trip: engine echo {c['engine_echo']:.1f} us, bare client "
              f"{c['bare']:.1f} us, call {c['engine']:.1f} us, future {c['engine_future']:.1f} us, blocking frame "
              f"client {c['server_no_engine']:.1f} us; server CPU per request: engine echo "
              f"{us(p['engine_echo_server_cpu_us_per_request'])}, bare echo {us(p['bare_server_cpu_us_per_request'])}, "
              f"embedding server {us(p['server_cpu_us_per_request'])}", flush=True)


_RTT_NOTE = ("wall clock p50/p99 per round trip, one caller thread, the five variants take turns "
             "in blocks of --rtt-block round trips (1: every round trip follows one of the previous "
             "variant, as a caller mixing kinds of requests sees; 50: back-to-back round trips of "
             "one kind, both ends of the pair stay hot), so background load hits all alike; all "
             "on loopback with TCP_NODELAY: engine_echo = Engine.call to an engine server whose handler "
             "only echoes (`evssd serve echo`, its own process: the engine's client and server ends "
             "and nothing else, the apples-to-apples match of bare); engine_future = "
             "Engine.request(...).result() (the I/O thread reads the reply and hands it over in a "
             "Future); engine = Engine.call (the caller sends and reads its own reply; its own "
             "connection, so the I/O thread's socket watching of the future variant does not "
             "interleave with it); server_no_engine = a plain blocking-socket client speaking the "
             "frame protocol to the same embedding server (ECHO request in one sendall, header + "
             "body recv, decode_reply); bare = a plain blocking-socket client and a minimal Python "
             "process echoing 4-byte-length-prefixed messages (no frame protocol, no server code). "
             "cpu_per_request: CPU of this process per 4 KiB ECHO through Engine.request futures "
             "(the ranker's path) per I/O thread count, 2x --clients caller threads, one server per "
             "connection")


def _run_rtt(args) -> int:
    from evssd.host.serving.config import make_config
    from evssd.host.serving.launcher import LocalCluster

    reps = args.rtt_reps or 2000
    data = {"params": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
            "note": _RTT_NOTE, "loadavg_start": os.getloadavg()}
    threads = sorted({1, 2, args.threads})
    # one server per connection of the CPU-per-request points; the round trips use s0
    with LocalCluster(make_config(1, 1000, args.dim, max(threads))) as cluster:
        data["overhead"] = _overhead_points(cluster, [64, 4096, 65536], reps, args.rtt_block)
        _print_rtt(data["overhead"])
        data["cpu_per_request"] = _cpu_points(cluster, threads, max(2, args.clients * 2),
                                              400 if args.quick else 2000)
        _print_cpu(data["cpu_per_request"])
    data["loadavg_end"] = os.getloadavg()
    print(f"load average start {data['loadavg_start'][0]:.1f}, end {data['loadavg_end'][0]:.1f} on {os.cpu_count()} cpus")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    _rtt_axes(ax[0], data["overhead"])
    _cpu_axes(ax[1], data["cpu_per_request"])
    fig.tight_layout()
    cmd = ("evssd bench serve --only rtt" + (f" --rtt-reps {args.rtt_reps}" if args.rtt_reps else "")
           + (f" --rtt-block {args.rtt_block}" if args.rtt_block != 1 else "") + (" --quick" if args.quick else ""))
    path = write_results("serve-rtt", data, fig, command=cmd, root=args.out)
    print(f"wrote {path}")
    return 0


def _print_cpu(cpu):
    for p in cpu:
        print(f"cpu     {p['threads']} I/O threads, {p['clients']} callers: {p['cpu_us_per_request']:6.1f} us CPU "
              f"per request, {p['requests_per_s']:8.0f} requests/s", flush=True)


def _cpu_axes(a, cpu):
    a.bar([str(p["threads"]) for p in cpu], [p["cpu_us_per_request"] for p in cpu], color="tab:brown")
    a.set_xlabel("engine I/O threads")
    a.set_ylabel("ranker-process CPU us per request")
    a.set_title("CPU per request (4 KiB ECHO, futures)")


def _rtt_axes(a, ov):
    a.plot([p["bytes"] for p in ov], [p["engine_echo_p50_us"] for p in ov], marker="o", lw=2,
           label="engine echo (engine client + engine server, echo handler)")
    a.plot([p["bytes"] for p in ov], [p["engine_p50_us"] for p in ov], marker="o",
           label="engine call to the embedding server")
    a.plot([p["bytes"] for p in ov], [p["engine_future_p50_us"] for p in ov], marker="o", label="engine request().result()")
    a.plot([p["bytes"] for p in ov], [p["server_no_engine_p50_us"] for p in ov], marker="o",
           label="embedding server, blocking client (no engine)")
    a.plot([p["bytes"] for p in ov], [p["bare_p50_us"] for p in ov], marker="o", label="bare Python echo socket")
    a.set_xscale("log")
    a.set_xlabel("message bytes")
    a.set_ylabel("p50 round trip (us)")
    a.set_title("engine overhead")
    a.legend(fontsize=8)


def run(args) -> int:
    from evssd.host.serving.config import make_config
    from evssd.host.serving.launcher import LocalCluster

    if args.soak is not None:
        return _run_soak(args)
    if args.only == "rtt":
        return _run_rtt(args)
    quick = args.quick
    nfan = min(8, args.max_fanout)
    fanouts = [f for f in ([1, 2, 4, 8] if quick else range(1, 9)) if f <= nfan]
    batches = 8 if quick else 24
    reps = args.reps or (1 if quick else 3)
    t_start = time.perf_counter()
    full = make_config(args.tables, args.rows, args.dim, nfan, replicas=nfan - 1)
    # every server holds the whole of every table; experiments pick their shard maps as views
    full["shards"] = [{"table": t, "rows": [0, args.rows], "servers": list(full["servers"])}
                      for t in full["tables"]]
    data = {"params": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"},
            "cpus_note": "servers, I/O threads and rankers share the machine's cores", "rtt_note": _RTT_NOTE,
            "loadavg_start": os.getloadavg()}
    with LocalCluster(full) as cluster:
        ccfg = cluster.config
        # 1. engine threads x fan-out x skew
        eng_rows = []
        for skew_name in ("uniform", "skewed"):
            for f in fanouts:
                skew = None if skew_name == "uniform" or f == 1 else [4.0] + [1.0] * (f - 1)
                cfg = _view(ccfg, args.tables, args.rows, args.dim, f, skew)
                runs = {1: [], args.threads: []}
                for _ in range(reps):          # interleave so background load hits both alike
                    for th in runs:
                        runs[th].append(_engine_point(cfg, th, args.clients, batches, args.batch_size,
                                                      args.pooling, seed=f, rebalance_every=5 if th > 1 else 0))
                for th, rs in runs.items():
                    p = {"threads": th, "fanout": f, "skew": skew_name, "reps": len(rs),
                         "samples_per_s": float(np.median([r["samples_per_s"] for r in rs])),
                         "samples_per_s_all": [r["samples_per_s"] for r in rs],
                         "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
                         "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
                         "migrations": sum(r["migrations"] for r in rs), "placement": rs[-1]["placement"]}
                    eng_rows.append(p)
                    print(f"engine  fan-out {f} {skew_name:7s} threads {th}: {p['samples_per_s']:9.0f} samples/s "
                          f"p50 {p['p50_ms']:6.2f} ms p99 {p['p99_ms']:6.2f} ms migrations {p['migrations']}", flush=True)
        data["engine"] = eng_rows
        # live migration: every connection starts on thread 0 (placement-unaware), the engine
        # rebalances every 2 batches by measured bytes; compare with mapping-aware placement
        fmax = fanouts[-1]
        cfg = _view(ccfg, args.tables, args.rows, args.dim, fmax, None if fmax == 1 else [4.0] + [1.0] * (fmax - 1))
        mig = []
        for label, pin, reb in (("pinned to thread 0, no rebalance", 0, 0),
                                ("pinned to thread 0, rebalance every 2", 0, 2),
                                ("mapping-aware placement", None, 0)):
            rs = [_engine_point(cfg, args.threads, args.clients, batches, args.batch_size, args.pooling,
                                seed=99, rebalance_every=reb, pin_thread=pin) for _ in range(reps)]
            p = {"variant": label, "fanout": fmax, "threads": args.threads,
                 "samples_per_s": float(np.median([r["samples_per_s"] for r in rs])),
                 "p50_ms": float(np.median([r["p50_ms"] for r in rs])),
                 "p99_ms": float(np.median([r["p99_ms"] for r in rs])),
                 "migrations": sum(r["migrations"] for r in rs),
                 "final_placement": rs[-1]["placement"]}
            mig.append(p)
            print(f"migrate {label:38s}: {p['samples_per_s']:9.0f} samples/s p50 {p['p50_ms']:6.2f} ms "
                  f"p99 {p['p99_ms']:6.2f} ms, migrations {p['migrations']}, final {p['final_placement']}", flush=True)
        data["migration"] = mig
        # 2. hierarchical pooling vs row-by-row READs
        cfg4 = _view(ccfg, args.tables, args.rows, args.dim, min(4, nfan), None)
        pb = 64 if quick else 128
        pool = []
        for fetch, multi in (("pooled", True), ("pooled", False), ("rows", True)):
            p = _pooling_point(cfg4, fetch, 2 if quick else 4, pb, args.pooling, seed=3, multi=multi)
            p["batch"] = pb
            pool.append(p)
            print(f"pooling {p['fetch']:17s}: {p['bytes_per_batch'] / 1024:9.1f} KiB/batch on the wire, "
                  f"p50 {p['p50_ms']:8.2f} ms, max |err| vs numpy {p['max_abs_err_vs_numpy']:.1e}", flush=True)
        data["pooling"] = pool
        # 3. adaptive vs static cache under one budget
        budget = int(args.budget_mb * (1 << 20))
        sizes = [64, 256, 1024, 2048, 4096] if quick else [64, 256, 1024, 2048, 4096, 8192]
        cache = _cache_points(cfg4, budget, sizes, 2 if quick else 3, args.pooling, seed=5)
        data["cache"] = {"budget_bytes": budget, **cache}
        for mode, c in cache.items():
            pts = ", ".join(f"{p['batch']}:{'%.1fms' % p['mean_ms'] if p['served'] else 'refused'}"
                            f"/hit {p['hit_rate']:.2f}" for p in c["points"])
            print(f"cache   {mode:8s}: largest batch served {c['largest_batch_served']:5d}; {pts}", flush=True)
        # 4. engine overhead vs bare socket
        ov = _overhead_points(cluster, [64, 4096, 65536], args.rtt_reps or (50 if quick else 200), args.rtt_block)
        data["overhead"] = ov
        _print_rtt(ov)
        # 5. CPU per request per engine thread count
        cpu = _cpu_points(cluster, sorted({1, 2, args.threads}), max(2, args.clients * 2), 400 if quick else 2000)
        data["cpu_per_request"] = cpu
        _print_cpu(cpu)
    # 6. backends behind the embedding servers (the same shard map and batches)
    backends = [b for b in args.backends.split(",") if b]
    data["backends"] = _backend_points(args, backends, 3 if quick else 10)
    for p in data["backends"]:
        print(f"backend {p['backend']:8s}: {p['samples_per_s']:9.0f} samples/s p50 {p['p50_ms']:7.2f} ms "
              f"p99 {p['p99_ms']:7.2f} ms, max |err| vs numpy {p['max_abs_err_vs_numpy']:.1e} "
              f"(startup {p['startup_s']:.1f} s)", flush=True)
    data["wall_s"] = time.perf_counter() - t_start
    data["loadavg_end"] = os.getloadavg()
    print(f"load average start {data['loadavg_start'][0]:.1f}, end {data['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} cpus")
    fig = _figure(data, args.threads)
    cmd = "evssd bench serve" + (" --quick" if quick else "")
    path = write_results("serve", data, fig, command=cmd, root=args.out)
    print(f"wrote {path} ({data['wall_s']:.1f} s)")
    return 0


def _figure(data, threads):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(17, 8))
    a = ax[0, 0]
    for skew, ls in (("uniform", "-"), ("skewed", "--")):
        for th, c in ((1, "tab:gray"), (threads, "tab:blue")):
            pts = [p for p in data["engine"] if p["skew"] == skew and p["threads"] == th]
            a.plot([p["fanout"] for p in pts], [p["samples_per_s"] for p in pts], ls, color=c, marker="o",
                   label=f"{th} thread{'s' if th > 1 else ''}, {skew}")
    a.set_xlabel("fan-out (servers per batch)")
    a.set_ylabel("samples/s")
    a.set_title("engine: multi- vs single-threaded")
    a.legend(fontsize=8)
    a = ax[0, 1]
    pool = data["pooling"]
    x = np.arange(len(pool))
    a.bar(x - 0.2, [p["bytes_per_batch"] / 1024 for p in pool], 0.4, label="KiB/batch", color="tab:blue")
    a2 = a.twinx()
    a2.bar(x + 0.2, [p["p50_ms"] for p in pool], 0.4, label="p50 ms", color="tab:orange")
    a.set_xticks(x, [p["fetch"] for p in pool], fontsize=8)
    a.set_ylabel("KiB on the wire per batch")
    a2.set_ylabel("p50 latency per batch (ms)")
    a.set_title("hierarchical pooling vs row-by-row READ")
    a = ax[1, 0]
    for mode, c in (("adaptive", "tab:green"), ("static", "tab:red")):
        pts = data["cache"][mode]["points"]
        served = [p for p in pts if p["served"]]
        a.plot([p["batch"] for p in served], [p["mean_ms"] for p in served], marker="o", color=c,
               label=f"{mode} (largest {data['cache'][mode]['largest_batch_served']})")
        for p in pts:
            if not p["served"]:
                a.axvline(p["batch"], color=c, ls=":", alpha=0.5)
    a.set_xscale("log", base=2)
    a.set_xlabel("batch size")
    a.set_ylabel("mean batch latency (ms)")
    a.set_title(f"cache under a {data['cache']['budget_bytes'] >> 20} MiB budget (dotted: refused)")
    a.legend(fontsize=8)
    _rtt_axes(ax[1, 1], data["overhead"])
    a = ax[0, 2]
    bk = data.get("backends", [])
    a.bar([p["backend"] for p in bk], [p["samples_per_s"] for p in bk], color="tab:purple")
    a.set_ylabel("samples/s")
    a.set_title("embedding-server backend (evssd: device model, wall clock)")
    _cpu_axes(ax[1, 2], data.get("cpu_per_request", []))
    fig.tight_layout()
    return fig
