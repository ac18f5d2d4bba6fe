"""`evssd bench store`: embedding-store backends side by side on one trace and one memory budget.

Peers (each in its own subprocess, so that its memory is its own):

============== ====================================================================================
dram           every row in memory: the ideal
file-page      table file, one 4 KiB page read (pread) per distinct row looked up: block-SSD baseline
file-page-direct   the same with O_DIRECT (no OS page cache: every read reaches the disk),
               ``--io-threads`` reads in flight
file-row+ev    table file, row-granular pread, EV-Cache in front
file-row-direct+ev  row-granular with O_DIRECT (the 512-byte sectors around the row), EV-Cache
file-row-nocrc+ev  file-row+ev without checking each row's CRC-32 (the cost of the check)
file-row+lru   table file, row-granular pread, plain LRU (cachetools) of the same byte budget
evssd+ev       the EV-SSD functional/timing model through the driver, EV-Cache in front
evssd-pool     the same device without a cache, pooling on the device (GATHER_POOLED, RecSSD-style)
evssd-block    the same device in block_mode (every row read moves its whole page over the
               channel), no cache, host pooling: the block-SSD baseline on the same modelled hardware
rocksdb+ev     rows in RocksDB (FBGEMM SSD-TBE / HugeCTR HPS tier), EV-Cache in front
============== ====================================================================================

A peer name may end in ``@dN`` to run it at pipeline depth N instead of ``--depth``
(``file-row+ev@d1``, in the default set, is the same peer without overlap).

Every peer runs the same Meta-calibrated trace (:func:`evssd.host.workload.meta_calibrated`,
one independent stream per table) through :class:`evssd.host.pipeline.Pipeline` (depth 2) and
pools with ``sum``. The first ``--warmup`` batches fill the caches and are not measured.

Measured: lookups/s (looked-up indices, duplicates included, per wall second), p50/p99 batch
latency, cache hit rate (distinct rows per batch served by the cache), backend bytes read per
lookup, and memory: resident set size sampled after every batch in the peer's subprocess, minus
the RSS before its tables were built (``rss_delta``; for ``evssd`` the model's simulated flash
is the device's memory, so its page bytes are subtracted and reported apart). Every peer hashes
its pooled outputs; the hashes must agree (they do unless a backend is wrong).

Table files and the RocksDB database are written by the parent before the peers start; the
``evssd`` peers program the model device in their own process (its pages are device memory).

Caveats, printed with the results: the table files were just written, so ``file-*`` reads are
served by the OS page cache (``--page-cache warm``, the default, reads every file through before
its peer; ``cold`` drops the files' pages with posix_fadvise), which makes them optimistic for an SSD;
``bytes_read`` counts what a block device would have moved. ``evssd`` wall-clock times are those
of a Python model of the device, not of hardware; its modelled device time is reported when the
driver exposes it.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from evssd.host import cli_types as ct

PEERS = ["dram", "file-page", "file-page-direct", "file-row+ev", "file-row-nocrc+ev", "file-row-direct+ev",
         "file-row+ev@d1",
         "file-row+lru", "evssd+ev", "evssd-pool", "evssd-block", "rocksdb+ev"]

QUICK_PEERS = ["dram", "file-page", "file-row+ev", "evssd+ev"]

# backend, options, cache kind (None: no cache)
_SPEC = {
    "dram": ("dram", {}, None),
    "file-page": ("file", {"file_mode": "page"}, None),
    "file-page-direct": ("file", {"file_mode": "page", "direct": True}, None),
    "file-row-direct+ev": ("file", {"file_mode": "row", "direct": True}, "evcache"),
    "file-row+ev": ("file", {"file_mode": "row"}, "evcache"),
    "file-row-nocrc+ev": ("file", {"file_mode": "row", "verify": False}, "evcache"),
    "file-row+lru": ("file", {"file_mode": "row"}, "lru"),
    "evssd+ev": ("evssd", {}, "evcache"),
    "evssd-pool": ("evssd", {}, None),
    "evssd-block": ("evssd", {"block_mode": True, "device_pooling": False}, None),
    "rocksdb+ev": ("rocksdb", {}, "evcache"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", type=ct.positive_int, default=4, help="number of tables (default 4)")
    parser.add_argument("--rows", type=ct.positive_int, default=100_000, help="rows per table (default 100000)")
    parser.add_argument("--dim", type=ct.positive_int, default=64, help="elements per row (default 64)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8", "int32"])
    parser.add_argument("--batch-size", type=ct.positive_int, default=128, help="bags per table per batch (default 128)")
    parser.add_argument("--pooling-factor", type=ct.positive_int, default=20, help="lookups per bag (default 20)")
    parser.add_argument("--batches", type=ct.positive_int, default=300, help="measured batches (default 300)")
    parser.add_argument("--warmup", type=ct.nonneg_int, default=30, help="unmeasured warm-up batches (default 30)")
    parser.add_argument("--cache-fraction", type=ct.fraction, default=0.01,
                        help="per-table cache budget as a fraction of the table (default 0.01)")
    parser.add_argument("--depth", type=ct.positive_int, default=2, help="pipeline depth (default 2)")
    parser.add_argument("--max-seconds", type=ct.positive_float, default=6.0,
                        help="stop a peer's measured phase after this long (default 6 s)")
    parser.add_argument("--budget", type=ct.positive_float, default=80.0,
                        help="whole-run time budget in seconds: the per-peer cap shrinks to fit (default 80)")
    parser.add_argument("--page-cache", choices=["warm", "cold"], default="warm",
                        help="before each file/rocksdb peer, read its files into the OS page cache (warm) or "
                             "drop their pages with posix_fadvise(DONTNEED) (cold; no root needed) (default warm)")
    parser.add_argument("--rocksdb-block-cache-mib", type=ct.nonneg_float, default=8.0,
                        help="RocksDB's own block cache for the rocksdb peers, set explicitly because its "
                             "default differs between RocksDB versions (default 8 MiB; 0: RocksDB's default)")
    parser.add_argument("--io-threads", type=ct.positive_int, default=8,
                        help="reads in flight for the O_DIRECT peers (default 8)")
    parser.add_argument("--peers", default=None, type=ct.choice_list(PEERS + QUICK_PEERS),
                        help=f"comma list (default: {','.join(PEERS)}; with --quick: {','.join(QUICK_PEERS)})")
    parser.add_argument("--seed", type=ct.nonneg_int, default=0)
    parser.add_argument("--clock-mhz", type=ct.positive_float, default=250.0,
                        help="device clock for converting modelled cycles to seconds when the device "
                             "does not report one (default 250, an assumption)")
    parser.add_argument("--workdir", default=None, help="where table files and RocksDB go (default: a temp dir)")
    parser.add_argument("--results", default=None, help="results root (default $EVSSD_RESULTS or ./results)")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds: 2 tables x 20000 rows, 30 batches, 4 peers")
    parser.add_argument("--kernel-peers", choices=["default", "full", "cache", "none"], default="default",
                        help="the in-process comparison with FBGEMM's CPU TBE and nn.EmbeddingBag: 'default' "
                             "(fp32/fp16 x uniform/Meta x 1/2 threads at 128 bags, plus a batch-size sweep), "
                             "'full' (every cell at every batch size), 'cache' (only the EV-Cache hit path "
                             "and the evssd host stack), 'none'; the hit path runs in every mode but 'none'")
    parser.add_argument("--kernel-reps", type=ct.positive_int, default=7,
                        help="rounds per kernel-peer cell; the minimum time is reported (default 7)")
    parser.add_argument("--kernel-lookups", type=ct.positive_int, default=150_000,
                        help="lookups per round of a kernel-peer cell (default 150000)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------
# shared by parent and child


def _make_tables(cfg) -> dict[str, np.ndarray]:
    out = {}
    for k in range(cfg["tables"]):
        rng = np.random.default_rng(cfg["seed"] * 1000 + k)
        shape = (cfg["rows"], cfg["dim"])
        if cfg["dtype"] in ("fp32", "fp16"):
            arr = rng.standard_normal(shape, dtype=np.float32).astype(
                np.float16 if cfg["dtype"] == "fp16" else np.float32, copy=False)
        elif cfg["dtype"] == "int8":
            arr = rng.integers(-128, 128, shape, dtype=np.int8)
        else:
            arr = rng.integers(-(1 << 16), 1 << 16, shape, dtype=np.int32)
        out[f"t{k}"] = arr
    return out


def _make_trace(cfg) -> list[dict]:
    from evssd.host.workload import meta_calibrated
    n = cfg["warmup"] + cfg["batches"]
    streams = {f"t{k}": meta_calibrated(cfg["rows"], batch_size=cfg["batch_size"],
                                        pooling_factor=cfg["pooling_factor"],
                                        seed=cfg["seed"] * 1000 + 17 * k + 1, n_batches=n)
               for k in range(cfg["tables"])}
    batches = [dict() for _ in range(n)]
    for name, it in streams.items():
        for b, batch in enumerate(it):
            batches[b][name] = (batch.indices, batch.offsets)
    return batches


def _itemsize(cfg) -> int:
    return {"fp32": 4, "fp16": 2, "int8": 1, "int32": 4}[cfg["dtype"]]


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


# ----------------------------------------------------------------------------------------------
# the child: one peer


def _child(cfg_path: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    from evssd.host.pipeline import Pipeline
    from evssd.host.store import EmbeddingStore

    peer = cfg["peer"]
    backend, opts, cache = _SPEC[_base(peer)]
    depth = _depth(peer, cfg["depth"])
    trace = _make_trace(cfg)
    _warm_jit(cfg)
    dev = None
    transport_bytes = 0
    if backend == "evssd":
        # The model's simulated host-memory window and flash are allocated at open; they belong
        # to the device/transport, not to the store, so the baseline is taken after the open.
        from evssd.host.device import Device
        need = sum(-(-cfg["rows"] // max(1, 4096 // (-(-cfg["dim"] * _itemsize(cfg) // 4) * 4)))
                   for _ in range(cfg["tables"]))
        ppc = 1024
        while ppc * 4 < need:
            ppc *= 2
        gc.collect()
        before_open = _rss()
        dev = Device.open("model", pages_per_channel=ppc)
        transport_bytes = _rss() - before_open
    gc.collect()
    rss0 = _rss()
    t_build = time.perf_counter()
    model_flash_bytes = 0
    device_info = None
    cache_kw = dict(cache_fraction=cfg["cache_fraction"] if cache else None, cache=cache or "evcache")
    if backend == "file":
        fo = {"direct": True, "io_threads": cfg["io_threads"]} if opts.get("direct") else {}
        if "verify" in opts:
            fo["verify"] = opts["verify"]
        store = EmbeddingStore.from_files(cfg["files"], file_mode=opts["file_mode"], **cache_kw, **fo)
    elif backend == "rocksdb":
        bc = int(cfg["rocksdb_block_cache_mib"] * 2**20) or None
        store = EmbeddingStore.from_rocksdb(cfg["rocksdb_path"], block_cache_bytes=bc, **cache_kw)
    else:
        tables = _make_tables(cfg)
        kw = dict(cache_kw)
        if backend == "evssd":
            kw["device"] = dev
            kw["device_pooling"] = opts.get("device_pooling", True)
            device_info = {k: getattr(dev.params, k) for k in ("n_channels", "page_size", "ways",
                                                                "pages_per_channel") if hasattr(dev.params, k)}
        store = EmbeddingStore.from_arrays(tables, backend, **kw)
        if opts.get("block_mode"):
            dev.set_block_mode(True)
        if backend == "evssd":
            model_flash_bytes = store.backend.layout.n_pages * store.backend.layout.page_size
        if backend != "dram":
            del tables
    build_s = time.perf_counter() - t_build
    gc.collect()
    rss_built = _rss()

    warm, meas = trace[:cfg["warmup"]], trace[cfg["warmup"]:]
    digests: list[str] = []
    with Pipeline(store, "sum", depth=depth) as pipe:
        for r in pipe.run(warm):
            pass
        s0 = store.stats()
        dev_t0 = _device_time(store)
        pipe.latencies_s.clear()
        peak = _rss()
        lookups = 0
        t0 = time.perf_counter()
        deadline = t0 + cfg["max_seconds"]
        done = 0

        def batches():
            for b in meas:
                if time.perf_counter() > deadline:
                    return
                yield b

        for r in pipe.run(batches()):
            done += 1
            lookups += sum(int(req[0].size) for req in meas[r.index].values())
            d = 0
            for name in sorted(r.results):
                d = zlib.crc32(np.ascontiguousarray(r.results[name]).view(np.uint8), d)
            digests.append(f"{d:08x}")
            if done % 8 == 0:
                peak = max(peak, _rss())
        wall = time.perf_counter() - t0
        lat = pipe.summary()
    peak = max(peak, _rss())
    s1 = store.stats()
    dev_t1 = _device_time(store)
    hits = misses = 0
    for name, c1 in s1["caches"].items():
        c0 = s0["caches"][name]
        hits += c1.get("hits", 0) - c0.get("hits", 0)
        misses += c1.get("misses", 0) - c0.get("misses", 0)
    cache_bytes = sum(int(c.get("memory_bytes", 0)) for c in s1["caches"].values())
    res = {
        "peer": peer, "backend": backend, "cache": cache, "depth": depth, "batches": done, "lookups": lookups,
        "wall_s": wall, "lookups_per_s": lookups / wall if wall else None,
        "latency": lat, "hit_rate": (hits / (hits + misses)) if hits + misses else None,
        "bytes_read": s1["bytes_read"] - s0["bytes_read"],
        "rows_read": s1["rows_read"] - s0["rows_read"],
        "bytes_per_lookup": (s1["bytes_read"] - s0["bytes_read"]) / lookups if lookups else None,
        "storage_bytes": s1["bytes_read"] - s0["bytes_read"],
        "storage_bytes_per_lookup": (s1["bytes_read"] - s0["bytes_read"]) / lookups if lookups else None,
        "build_s": build_s,
        "rss_before_tables": rss0, "rss_built_delta": rss_built - rss0 - model_flash_bytes,
        "rss_peak_delta": peak - rss0 - model_flash_bytes, "model_flash_bytes": model_flash_bytes,
        "cache_memory_bytes": cache_bytes, "transport_open_bytes": transport_bytes,
        "batch_digests": digests,
    }
    if device_info:
        res["device_params"] = device_info
    if dev_t0 is not None and dev_t1 is not None:
        cycles = dev_t1[0] - dev_t0[0]
        clock = getattr(store.backend.device.params, "clock_hz", 0) or cfg["clock_mhz"] * 1e6
        res["modelled_device_cycles"] = cycles
        res["modelled_device_s"] = cycles / clock
        res["modelled_clock_hz"] = clock
        res["device_channel_bytes"] = dev_t1[1] - dev_t0[1]
        res["device_rows"] = dev_t1[2] - dev_t0[2]
        # what left the flash, not the DMA results: comparable with the file peers' bytes_read
        res["storage_bytes"] = res["device_channel_bytes"]
        res["storage_bytes_per_lookup"] = res["storage_bytes"] / lookups if lookups else None
    store.close()
    if dev is not None:
        dev.close()
    Path(cfg["out"]).write_text(json.dumps(res))
    return 0


def _warm_jit(cfg):
    """Compile (or load) the numba kernels of the cache and the pooling before the memory
    baseline is taken: LLVM's tens of MiB are the same for every peer and are not the store's."""
    from evssd.host.store import DTYPES, EmbeddingStore
    t = np.zeros((256, cfg["dim"]), DTYPES[cfg["dtype"]])
    with EmbeddingStore.from_arrays({"w": t}, "dram", cache_fraction=0.5, cache="evcache") as s:
        for _ in range(3):
            s.pooled("w", np.arange(16), np.array([0, 8, 16]))
            s.gather("w", np.arange(4))


def _device_time(store):
    """(cycles, channel bytes moved, rows read) from the device counters (evssd only), or None."""
    dev = getattr(store.backend, "device", None)
    if dev is None or not hasattr(dev, "counters"):
        return None
    try:
        c = dev.counters()
        chans = c.get("channels", [])
        return (int(c["cycles"]), sum(int(ch.get("bytes", 0)) for ch in chans),
                sum(int(ch.get("rows", 0)) for ch in chans))
    except Exception:
        return None


def _base(peer: str) -> str:
    return peer.split("@", 1)[0]


def _depth(peer: str, default: int) -> int:
    if "@d" in peer:
        return int(peer.split("@d", 1)[1])
    return default


# ----------------------------------------------------------------------------------------------
# the parent


def _set_page_cache(paths, mode: str) -> None:
    """Put ``paths`` in a known page-cache state before a peer runs: ``warm`` reads them through
    once, ``cold`` asks the kernel to drop their clean pages (POSIX_FADV_DONTNEED). The run order
    and whatever ran before no longer decide what the peer finds in memory."""
    import os
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except (IsADirectoryError, FileNotFoundError):
            continue
        try:
            if mode == "cold":
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 22):
                    pass
        finally:
            os.close(fd)


def _versions() -> dict:
    """Versions of the peers' packages: a RocksDB or FBGEMM upgrade moves their numbers."""
    from importlib import metadata
    out = {}
    for pkg in ("numpy", "numba", "torch", "fbgemm-gpu-cpu", "rocksdict", "cachetools"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _kernel_peers(args, cfg) -> dict | None:
    """FBGEMM TBE and nn.EmbeddingBag against the dram store, the EV-Cache hit path and the evssd
    host stack (:mod:`evssd.host.bench.store_peers`), in this process; None without torch/fbgemm."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # the core library runs without torch; say so instead of failing
        print(f"  kernel peers skipped: torch/fbgemm_gpu not importable ({exc}); install evssd[torch]")
        return {"skipped": str(exc)}
    from evssd.host.bench import store_peers
    kcfg = dict(tables=cfg["tables"], rows=cfg["rows"], dim=cfg["dim"], pooling_factor=cfg["pooling_factor"],
                seed=cfg["seed"], reps=args.kernel_reps, lookups_per_cell=args.kernel_lookups)
    if args.kernel_peers == "full":
        cells = [(e, t, th, b) for e in ("fp32", "fp16") for t in ("uniform", "meta") for th in (1, 2)
                 for b in (16, 128, 1024, 4096)]
    elif args.kernel_peers == "cache":
        cells = []
    else:
        cells = store_peers.DEFAULT_CELLS
    print(f"  kernel peers: {cfg['tables']} tables x {cfg['rows']} rows x {cfg['dim']}, SUM, "
          f"{cfg['pooling_factor']} lookups per bag, min of {args.kernel_reps} rounds (wall clock), "
          f"own process with OMP_WAIT_POLICY=PASSIVE", flush=True)
    import os
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evssd-bench-peers-") as d:
        cpath, opath = Path(d) / "cfg.json", Path(d) / "out.json"
        cpath.write_text(json.dumps(dict(kcfg, cells=[list(c) for c in cells])))
        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.run([sys.executable, "-m", "evssd.host.bench.store_peers", str(cpath), str(opath)],
                              env=env)
        if proc.returncode != 0 or not opath.exists():
            print(f"  kernel peers FAILED (exit {proc.returncode})")
            return {"error": f"exit {proc.returncode}"}
        res = json.loads(opath.read_text())
    res["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
    res["seconds"] = time.perf_counter() - t0
    print(f"  kernel peers: peak RSS {_fmt_bytes(res['peak_rss_bytes'])}, {res['seconds']:.1f} s")
    return res


def _config(args) -> dict:
    cfg = {k: getattr(args, k) for k in ("tables", "rows", "dim", "dtype", "batch_size", "pooling_factor",
                                         "batches", "warmup", "cache_fraction", "depth", "max_seconds", "seed",
                                         "clock_mhz", "io_threads", "budget", "page_cache",
                                         "rocksdb_block_cache_mib")}
    if args.quick:
        cfg.update(tables=2, rows=20_000, batches=30, warmup=10, max_seconds=3.0, budget=min(args.budget, 20.0))
    return cfg


def _fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _figure(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "error" not in r]
    names = [r["peer"] for r in ok]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [
        ("lookups/s (millions)", [r["lookups_per_s"] / 1e6 for r in ok]),
        ("p99 batch latency (ms)", [r["latency"]["p99_ms"] for r in ok]),
        ("cache hit rate", [r["hit_rate"] or 0 for r in ok]),
        ("bytes from storage / lookup\n(evssd: flash channel bytes)", [r["storage_bytes_per_lookup"] for r in ok]),
    ]
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(range(len(names)), vals, color="tab:blue")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("evssd bench store: same trace, same cache budget", fontsize=11)
    fig.tight_layout()
    return fig


def run(args) -> int:
    if args.child:
        return _child(args.child)
    cfg = _config(args)
    peers = [p.strip() for p in (args.peers or ",".join(QUICK_PEERS if args.quick else PEERS)).split(",")
             if p.strip()]
    for p in peers:
        if _base(p) not in _SPEC or not (p == _base(p) or p[len(_base(p)):].startswith("@d")
                                         and p.split("@d", 1)[1].isdigit() and int(p.split("@d", 1)[1]) >= 1):
            print(f"evssd bench store: unknown peer {p!r} (known: {', '.join(PEERS)})", file=sys.stderr)
            return 2
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="evssd-bench-store-", dir=args.workdir)
    work = Path(tmp.name)
    try:
        files = {}
        if any(_SPEC[_base(p)][0] == "file" for p in peers):
            from evssd.host.store import write_table_file
            for name, arr in _make_tables(cfg).items():
                files[name] = str(write_table_file(work / f"{name}.evt", arr))
        rocksdb_path = work / "rocksdb"
        if any(_SPEC[_base(p)][0] == "rocksdb" for p in peers):
            # loaded here, not in the peer's process, so that its RSS is the serving footprint
            from evssd.host.store import EmbeddingStore
            EmbeddingStore.from_arrays(_make_tables(cfg), "rocksdb", path=rocksdb_path,
                                       cache_fraction=None).close()
        table_bytes = cfg["tables"] * cfg["rows"] * cfg["dim"] * np.dtype(
            {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int32": np.int32}[cfg["dtype"]]).itemsize
        print(f"evssd bench store: {cfg['tables']} tables x {cfg['rows']} rows x {cfg['dim']} {cfg['dtype']} "
              f"({_fmt_bytes(table_bytes)}), batches of {cfg['batch_size']} bags x {cfg['pooling_factor']} "
              f"lookups per table, Meta-calibrated trace, {cfg['warmup']} warm-up + up to {cfg['batches']} "
              f"measured batches, cache {cfg['cache_fraction']:.2%} per table, pipeline depth {cfg['depth']}")
        rows = []
        for k, peer in enumerate(peers):
            # about 4 s of each peer goes to start-up and building; the rest of the budget is shared
            left = cfg["budget"] - (time.perf_counter() - t_all)
            cap = max(0.5, min(cfg["max_seconds"], left / (len(peers) - k) - 4.5))
            c = dict(cfg, peer=peer, max_seconds=cap, files=files, rocksdb_path=str(rocksdb_path),
                     out=str(work / f"{peer}.json"))
            cpath = work / f"{peer}.cfg.json"
            cpath.write_text(json.dumps(c))
            kind = _SPEC[_base(peer)][0]
            if kind == "file":
                _set_page_cache(list(files.values()), cfg["page_cache"])
            elif kind == "rocksdb":
                _set_page_cache(sorted(str(p) for p in rocksdb_path.iterdir()), cfg["page_cache"])
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "evssd.host.bench.store", "--child", str(cpath)],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not Path(c["out"]).exists():
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"  {peer:18s} FAILED: {err}")
                rows.append({"peer": peer, "error": err})
                continue
            r = json.loads(Path(c["out"]).read_text())
            r["subprocess_s"] = time.perf_counter() - t0
            rows.append(r)
        ok = [r for r in rows if "error" not in r]
        # a CRC-32 of every measured batch's pooled outputs; peers cut short by the time cap are
        # compared on the batches they ran
        ref = max(ok, key=lambda r: len(r["batch_digests"]), default=None)
        mismatched = [r["peer"] for r in ok
                      if r["batch_digests"] != ref["batch_digests"][:len(r["batch_digests"])]]
        identical = not mismatched
        hdr = f"  {'peer':18s} {'lookups/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'hit rate':>8s} " \
              f"{'B/lookup':>9s} {'storage B':>11s} {'RSS delta':>10s} {'batches':>7s}"
        print(hdr)
        for r in rows:
            if "error" in r:
                continue
            hr = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
            print(f"  {r['peer']:18s} {r['lookups_per_s']:10.0f} {r['latency']['p50_ms']:8.2f} "
                  f"{r['latency']['p99_ms']:8.2f} {hr:>8s} {r['storage_bytes_per_lookup']:9.1f} "
                  f"{_fmt_bytes(r['storage_bytes']):>11s} {_fmt_bytes(r['rss_peak_delta']):>10s} {r['batches']:7d}")
        notes = [
            "memory: peak RSS sampled every 8 batches in a fresh subprocess per peer, minus its RSS "
            "before the tables were built; evssd: baseline taken after Device.open (the model's "
            "host-memory window, transport_open_bytes) and minus the simulated flash pages written",
            f"page cache {cfg['page_cache']}: before each file/rocksdb peer its files were "
            f"{'read through once' if cfg['page_cache'] == 'warm' else 'dropped from the page cache (fadvise DONTNEED)'}"
            f"; warm file-page / file-row+* reads are optimistic for an SSD; the "
            "*-direct peers use O_DIRECT and bypass it (a hypervisor's cache below the guest may "
            "still serve them); storage bytes are what a block device would move (file: pread "
            "bytes; rocksdb: row bytes returned; evssd: bytes over the flash channels; dram: row "
            "bytes copied)",
            "batch latency runs from a batch's cache lookup to its pooled result; at depth 2 it "
            "includes waiting behind the previous batch, so depth trades latency for throughput",
            "peers with fewer batches than configured were stopped by the time cap "
            "(--max-seconds / --budget); their rates are over the batches they ran",
            "evssd times are wall-clock times of the Python device model, not hardware",
            "hit rate counts distinct rows per batch (lookups are deduplicated before the cache)",
        ]
        for r in ok:
            if "modelled_device_s" in r:
                print(f"  {r['peer']}: modelled device time {r['modelled_device_s'] * 1e3:.1f} ms for "
                      f"{r['batches']} batches ({r['modelled_device_cycles']} cycles at "
                      f"{r['modelled_clock_hz'] / 1e6:.0f} MHz) = "
                      f"{r['lookups'] / r['modelled_device_s']:.3g} lookups/s if the host kept up; "
                      f"{r['device_rows']} rows, {_fmt_bytes(r['device_channel_bytes'])} over the flash channels")
        print(f"  pooled outputs identical, batch by batch, across all peers: {identical}"
              + (f" (differing: {', '.join(mismatched)})" if mismatched else
                 f" ({sum(len(r['batch_digests']) for r in ok)} batch results compared)"))
        for n in notes:
            print(f"  note: {n}")
        kernel = None
        if args.kernel_peers != "none":
            kernel = _kernel_peers(args, cfg)
        data = {"config": cfg, "peers": rows, "outputs_identical": identical, "notes": notes,
                "kernel_peers": kernel, "versions": _versions(), "total_s": time.perf_counter() - t_all}
        command = "evssd bench store " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "store"] else [])
        path = None
        fig = None
        try:
            fig = _figure(rows) if ok else None
        except Exception as exc:  # a plot must never lose the numbers
            print(f"  (no figure: {exc})")
        from evssd.host.bench.common import write_results
        path = write_results("store", data, fig, command=command.strip(), root=args.results)
        if kernel and kernel.get("cells"):
            try:
                from evssd.host.bench.store_peers import figure
                kfig = figure(kernel)
                kfig.savefig(Path(path).parent / "store-peers.png", dpi=110)
            except Exception as exc:
                print(f"  (no peers figure: {exc})")
        print(f"  wrote {path} ({time.perf_counter() - t_all:.1f} s)")
        kernel_ok = kernel is None or "error" not in kernel
        return 0 if ok and identical and len(ok) == len(rows) and kernel_ok else 1
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    _p = argparse.ArgumentParser()
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))
