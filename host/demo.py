"""``evssd demo``: the main job, end to end.

Embedding tables go onto an EV-SSD (the functional + timing model by default, the RTL in
Verilator with ``--backend rtl``); a trace calibrated to Meta's production reuse statistics runs
through EV-Cache, the lookup pipeline and the device; every pooled result is checked against
numpy; the report says what the cache kept, what the flash moved compared with a block-interface
SSD, and how long batches took.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from evssd.hw.regmap import Params
from evssd.host import cli_types as ct

__all__ = ["add_arguments", "run", "make_tables", "golden_pooled_sum", "DemoFailed"]

DTYPES = ("fp32", "fp16", "int8", "fp32")


class DemoFailed(AssertionError):
    """A result differed from numpy."""


def make_tables(n_tables: int, rows: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Tables of mixed element types (fp32, fp16, int8), ``rows`` x ``dim`` each."""
    rng = np.random.default_rng(seed)
    tables = {}
    for t in range(n_tables):
        kind = DTYPES[t % len(DTYPES)]
        if kind == "int8":
            arr = rng.integers(-128, 128, (rows, dim), dtype=np.int8)
        else:
            arr = rng.standard_normal((rows, dim)).astype(np.float32 if kind == "fp32" else np.float16)
        tables[f"t{t}_{kind}"] = arr
    return tables


def golden_pooled_sum(table: np.ndarray, indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-bag sums in bag order (fp32 for float tables, int32 for integer ones), in numpy."""
    acc_t = np.float32 if table.dtype.kind == "f" else np.int32
    lengths = np.diff(offsets)
    out = np.zeros((lengths.size, table.shape[1]), acc_t)
    starts = offsets[:-1]
    for k in range(int(lengths.max(initial=0))):
        live = lengths > k
        out[live] += table[indices[starts[live] + k]].astype(acc_t)
    return out


def add_arguments(parser):
    parser.add_argument("--backend", choices=("model", "rtl"), default="model",
                        help="model: functional + timing model (default); rtl: the gateware in Verilator")
    parser.add_argument("--tables", type=ct.int_range(1, 16, "a table count"), default=4, help="number of tables (default 4)")
    parser.add_argument("--rows", type=ct.positive_int, default=None,
                        help="rows per table (default 100000 on model, 2000 on rtl)")
    parser.add_argument("--dim", type=ct.positive_int, default=32, help="elements per row (default 32)")
    parser.add_argument("--batches", type=ct.positive_int, default=None, help="batches (default 60 on model, 4 on rtl)")
    parser.add_argument("--batch-size", type=ct.positive_int, default=None, help="bags per batch (default 256 on model, 16 on rtl)")
    parser.add_argument("--pooling-factor", type=ct.positive_int, default=20, help="lookups per bag (default 20)")
    parser.add_argument("--cache-fraction", type=ct.fraction, default=0.01, help="EV-Cache budget per table (default 0.01)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=1)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_fits(n_tables: int, rows: int, dim: int, params: Params) -> None:
    """Refuse (:class:`~evssd.host.cli_types.UsageError`) a table set that the demo device cannot
    hold, before any table is generated: rows must fit a page and the pages the flash."""
    pages = 0
    for t in range(n_tables):
        itemsize = {"fp32": 4, "fp16": 2, "int8": 1}[DTYPES[t % len(DTYPES)]]
        row_bytes = -(-dim * itemsize // 4) * 4
        if row_bytes > min(params.page_size, params.max_row_bytes):
            raise ct.UsageError(f"--dim {dim}: a {DTYPES[t % len(DTYPES)]} row of {row_bytes} bytes is "
                                f"longer than the device's {min(params.page_size, params.max_row_bytes)}-byte "
                                f"row limit")
        pages += -(-rows // (params.page_size // row_bytes))
    if pages > params.total_pages:
        raise ct.UsageError(f"--tables {n_tables} --rows {rows} --dim {dim}: {pages:,} pages do not fit "
                            f"the demo device's {params.total_pages:,} pages "
                            f"({params.total_pages * params.page_size // 2**20} MiB)")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(args) -> int:
    if args.backend == "rtl":
        return _run_rtl(args)
    return _run_model(args)


def _run_model(args) -> int:
    from tqdm import tqdm

    from evssd.host.device import Device
    from evssd.host.model import ModelTransport
    from evssd.host.pipeline import Pipeline
    from evssd.host.store import EmbeddingStore
    from evssd.host.workload import meta_calibrated

    rows = args.rows or 100_000
    n_batches = args.batches or 60
    batch_size = args.batch_size or 256
    params = Params(n_channels=4, page_size=4096, pages_per_channel=4096)
    check_fits(args.tables, rows, args.dim, params)
    tables = make_tables(args.tables, rows, args.dim, args.seed)
    out = sys.stdout
    print("evssd demo: embedding lookups served from an EV-SSD", file=out)
    dev = Device.open(ModelTransport(params))
    p = dev.params
    print(f"  device   model backend (functional + timing model, bit-exact with the RTL): "
          f"{p.n_channels} channels x {p.ways} ways, {p.page_size} B pages, "
          f"{p.total_pages * p.page_size // 2**20} MiB flash, tR 1000 cycles", file=out)
    t0 = time.perf_counter()
    store = EmbeddingStore.from_arrays(tables, backend="evssd", device=dev,
                                       cache_fraction=args.cache_fraction, device_pooling=False)
    layout = store.backend.layout
    pages = sum(t.n_pages for t in layout.tables)
    extents = sum(len(t.extents) for t in layout.tables)
    print(f"  tables   {len(tables)} x {rows:,} rows x {args.dim} "
          f"({', '.join(sorted({str(a.dtype) for a in tables.values()}))}): "
          f"{_mib(sum(a.nbytes for a in tables.values()))} written as {pages:,} pages in {extents} extents "
          f"(PROGRAM_PAGES, {time.perf_counter() - t0:.1f} s)", file=out)
    print(f"  trace    Meta-calibrated reuse (host/data/dlrm_locality_stats_2021.txt): "
          f"{n_batches} batches x {batch_size} bags x {args.pooling_factor} lookups per table", file=out)
    print(f"  cache    EV-Cache per table: 2-bit admission filter (admit on 2nd access) + Robin Hood "
          f"LRU, budget {args.cache_fraction:.1%} of the table", file=out)

    names = list(tables)
    traces = {n: meta_calibrated(rows, batch_size, args.pooling_factor, seed=args.seed + k,
                                 n_batches=n_batches) for k, n in enumerate(names)}
    batches = []
    for _ in range(n_batches):
        batch = {}
        for n in names:
            b = next(traces[n])
            batch[n] = (np.asarray(b.indices), np.asarray(b.offsets))
        batches.append(batch)

    _warm_up(tables, args)
    before = dev.counters()
    checked = 0
    pipe = Pipeline(store, mode="sum", depth=2)
    wall0 = time.perf_counter()
    try:
        for res in tqdm(pipe.run(batches), total=n_batches, desc="  batches", unit="batch",
                        disable=args.no_progress or not sys.stderr.isatty(), file=sys.stderr):
            for n in names:
                idx, off = batches[res.index][n]
                want = golden_pooled_sum(tables[n], idx, off)
                got = res.results[n]
                if got.shape != want.shape or not np.array_equal(got, want):
                    diff = np.flatnonzero(~np.isclose(got, want).all(axis=1)) if got.shape == want.shape else []
                    raise DemoFailed(f"batch {res.index} table {n}: pooled result differs from numpy "
                                     f"(first bad bag {diff[:1]})")
                checked += 1
    finally:
        pipe.close()
    wall = time.perf_counter() - wall0
    after = dev.counters()
    stats = store.stats()

    lookups = n_batches * batch_size * args.pooling_factor * len(names)
    hits = sum(int(c["hits"]) for c in stats["caches"].values())
    misses = sum(int(c["misses"]) for c in stats["caches"].values())
    admissions = sum(int(c["admissions"]) for c in stats["caches"].values())
    rejected = sum(int(c.get("rejected_by_filter", 0)) for c in stats["caches"].values())
    evictions = sum(int(c["evictions"]) for c in stats["caches"].values())
    dev_rows = sum(a["rows"] - b["rows"] for a, b in zip(after["channels"], before["channels"]))
    dev_bytes = sum(a["bytes"] - b["bytes"] for a, b in zip(after["channels"], before["channels"]))
    tr_waits = sum(a["tr_waits"] - b["tr_waits"] for a, b in zip(after["channels"], before["channels"]))
    block_bytes = dev_rows * p.page_size
    cycles = after["cycles"] - before["cycles"]
    summary = pipe.summary()

    print(f"\n  checked  {checked} pooled results ({n_batches} batches x {len(names)} tables) against numpy: "
          f"all equal", file=out)
    print(f"  lookups  {lookups:,} (unique per batch and table go to the cache; "
          f"{hits + misses:,} distinct-row requests)", file=out)
    print(f"  served   {1 - dev_rows / lookups:.1%} of lookups without a flash read "
          f"(in-batch deduplication + EV-Cache)", file=out)
    print(f"  EV-Cache hit rate {hits / max(hits + misses, 1):.1%}; admitted {admissions:,}, "
          f"kept out by the filter {rejected:,} (one-touch rows), evicted {evictions:,}", file=out)
    print(f"  flash    {dev_rows:,} row reads ({tr_waits:,} paid tR): {_mib(dev_bytes)} moved over the "
          f"channel buses; a block-interface SSD moves whole pages: {_mib(block_bytes)} "
          f"({block_bytes / max(dev_bytes, 1):.1f}x more)", file=out)
    print(f"  device   {cycles:,} cycles modelled for the run ({cycles / n_batches:,.0f} per batch; "
          f"{cycles / 200e6 * 1e3:.1f} ms at 200 MHz) [timing model estimate]", file=out)
    print(f"  host     batch latency p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms; "
          f"{lookups / wall:,.0f} lookups/s [wall clock, pipelined, this machine]", file=out)
    store.close()
    dev.close()
    return 0


def _warm_up(tables, args):
    """Compile the numba kernels (cache, pooling) for these dtypes before anything is timed."""
    from evssd.host.device import Device
    from evssd.host.model import ModelTransport
    from evssd.host.store import EmbeddingStore
    small = {n: a[:2000] for n, a in tables.items()}
    with Device.open(ModelTransport(Params(n_channels=1, pages_per_channel=1024))) as dev:
        store = EmbeddingStore.from_arrays(small, backend="evssd", device=dev,
                                           cache_fraction=args.cache_fraction, device_pooling=False)
        idx = np.arange(40) % 2000
        for _ in range(2):
            store.lookup_many({n: (idx, np.array([0, 20, 40])) for n in small}, mode="sum")
        store.close()


RTL_PARAMS = dict(n_channels=4, page_size=4096, pages_per_channel=256, host_data_bits=64, ch_data_bits=64)


def _run_rtl(args) -> int:
    cfg = {
        "tables": args.tables, "rows": args.rows or 2000, "dim": args.dim,
        "batches": args.batches or 4, "batch_size": args.batch_size or 16,
        "pooling_factor": args.pooling_factor, "cache_fraction": args.cache_fraction, "seed": args.seed,
    }
    check_fits(cfg["tables"], cfg["rows"], cfg["dim"], Params(**RTL_PARAMS))
    print("evssd demo --backend rtl: building the EV-SSD gateware with Verilator (minutes on first run)...",
          file=sys.stderr)
    try:
        text = run_rtl_demo(cfg, Params(**RTL_PARAMS))
    except ImportError as exc:
        print(f"evssd demo --backend rtl needs the sim extra: pip install 'evssd[sim]' ({exc})", file=sys.stderr)
        return 2
    except AssertionError as exc:
        print(f"RTL demo failed: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def run_rtl_demo(cfg: dict, params: Params) -> str:
    """Run the demo trace on the RTL (cocotb + Verilator); returns the report text.

    Raises :class:`evssd.sim.runner.SimulationFailed` (an AssertionError) when a check fails.
    """
    import json

    from evssd.sim import runner

    report = runner.build_root() / f"demo-report-{os.getpid()}.json"
    if report.exists():
        report.unlink()
    runner.run("evssd.sim.tb_demo", "device", params, quiet=True,
               extra_env={"EVSSD_DEMO": json.dumps(cfg), "EVSSD_DEMO_REPORT": str(report)})
    data = json.loads(report.read_text())
    report.unlink()
    return data["text"]
