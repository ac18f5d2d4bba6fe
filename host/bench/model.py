"""`evssd bench model`: wall-clock speed of the functional + timing model behind the real driver.

The issue-15 trace: ``--tables`` tables of ``--rows`` x ``--dim`` fp32 (default 4 x 100,000 x 64),
batches of ``--bags`` bags x ``--pooling`` lookups per table with Meta-calibrated indices
(:func:`evssd.host.workload.meta_calibrated`), through ``Device.open("model")`` doing GATHER and
GATHER_POOLED (one command per table per batch, submitted together like the store does). The
tables are programmed through PROGRAM_PAGES into the model's sparse flash, sized to them.

Reported per command kind: wall-clock lookups/s (a measurement of the simulator, single thread),
the modelled device cycles per lookup (a model estimate), and a check of the pooled results
against :func:`evssd.host.pooling.pool_bags` on the host copy of the tables (bit for bit).
Writes ``results/bench_model/bench_model.json`` (+ ``.png``).
"""
from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["add_arguments", "run", "measure"]


def add_arguments(parser):
    parser.add_argument("--tables", type=int, default=4, help="tables (default 4)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows per table (default 100,000)")
    parser.add_argument("--dim", type=int, default=64, help="fp32 elements per row (default 64)")
    parser.add_argument("--bags", type=int, default=128, help="bags per table per batch (default 128)")
    parser.add_argument("--pooling", type=int, default=20, help="lookups per bag (default 20)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per kind (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run (CI smoke test)")


def _check_pos(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def measure(tables: int = 4, rows: int = 100_000, dim: int = 64, bags: int = 128, pooling: int = 20,
            batches: int = 20, seed: int = 0) -> dict:
    """Run the trace through ``Device.open("model")``; returns the numbers of the report."""
    for name, v in (("tables", tables), ("rows", rows), ("dim", dim), ("bags", bags),
                    ("pooling", pooling), ("batches", batches)):
        _check_pos(name, v)
    from evssd.host.device import Device
    from evssd.host.layout import plan_tables
    from evssd.host.model import ModelTransport
    from evssd.host.pooling import pool_bags
    from evssd.host.workload import meta_calibrated
    from evssd.hw.regmap import ElemType

    rng = np.random.default_rng(seed)
    data = [rng.standard_normal((rows, dim), dtype=np.float32) for _ in range(tables)]
    row_bytes = 4 * dim
    transport = ModelTransport.sized_for([(rows, row_bytes)] * tables)
    params = transport.params
    dev = Device.open(transport)
    try:
        plan = plan_tables(params, [(rows, row_bytes)] * tables)
        t0 = time.perf_counter()
        for t, tp in enumerate(plan):
            for lba, pages in tp.pages(data[t].view(np.uint8)):
                dev.program_pages(lba, pages)
            dev.configure_table(t, row_bytes, ElemType.FP32, tp.extents)
        program_s = time.perf_counter() - t0
        traces = [meta_calibrated(rows, bags, pooling, seed=seed + 1 + t, n_batches=batches + 1)
                  for t in range(tables)]
        work = [[next(tr) for tr in traces] for _ in range(batches + 1)]
        report = {"params": params.as_dict(), "tables": tables, "rows": rows, "dim": dim,
                  "bags": bags, "pooling": pooling, "batches": batches,
                  "program_seconds": program_s, "kinds": {}}
        for kind in ("gather_pooled", "gather"):
            def one(batch):
                if kind == "gather_pooled":
                    handles = [dev.run(dev.aio.submit_gather_pooled(t, b.indices, b.offsets))
                               for t, b in enumerate(batch)]
                else:
                    handles = [dev.run(dev.aio.submit_gather(t, b.indices)) for t, b in enumerate(batch)]
                return [dev.run(dev.aio.finish(h)) for h in handles]
            one(work[0])   # warm-up (numba compilation, caches)
            c0 = dev.counters()
            t0 = time.perf_counter()
            outs = [one(batch) for batch in work[1:]]
            wall = time.perf_counter() - t0
            c1 = dev.counters()
            lookups = sum(len(b.indices) for batch in work[1:] for b in batch)
            exact = True
            for batch, out in zip(work[1:], outs):
                for t, (b, got) in enumerate(zip(batch, out)):
                    if kind == "gather_pooled":
                        want = pool_bags(data[t][b.indices], b.offsets, np.ones(len(b.indices), bool),
                                         ElemType.FP32)
                    else:
                        want = data[t][b.indices]
                    got = np.asarray(got).view(np.float32).reshape(want.shape)
                    exact &= bool(np.array_equal(got.view(np.uint32), want.view(np.uint32)))
            cycles = c1["cycles"] - c0["cycles"]
            report["kinds"][kind] = {"lookups": lookups, "wall_seconds": wall,
                                     "lookups_per_second": lookups / wall,
                                     "model_cycles": cycles, "model_cycles_per_lookup": cycles / lookups,
                                     "bit_exact": exact}
        return report
    finally:
        dev.close()


def run(args) -> int:
    from evssd.host.bench.common import write_results
    kw = dict(tables=args.tables, rows=args.rows, dim=args.dim, bags=args.bags, pooling=args.pooling,
              batches=args.batches, seed=args.seed)
    if args.quick:
        kw.update(rows=min(args.rows, 20_000), batches=min(args.batches, 3))
    report = measure(**kw)
    fig = None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        kinds = list(report["kinds"])
        ax.bar(kinds, [report["kinds"][k]["lookups_per_second"] / 1e6 for k in kinds])
        ax.axhline(10, color="r", ls="--", label="target 10 M/s")
        ax.set_ylabel("M lookups / s (wall clock)")
        ax.set_title(f"model backend, {report['tables']} x {report['rows']} x {report['dim']} fp32")
        ax.legend()
        fig.tight_layout()
    except ImportError:
        pass
    path = write_results("bench_model", report, fig, command=" ".join(sys.argv))
    print(f"programmed {report['tables']} x {report['rows']} x {report['dim']} fp32 in "
          f"{report['program_seconds']:.2f} s; flash {report['params']['pages_per_channel']} pages x "
          f"{report['params']['n_channels']} channels (sparse)")
    for kind, v in report["kinds"].items():
        print(f"{kind}: {v['lookups']} lookups in {v['wall_seconds']:.3f} s wall = "
              f"{v['lookups_per_second'] / 1e6:.2f} M lookups/s; model {v['model_cycles_per_lookup']:.2f} "
              f"cycles/lookup (estimate); bit-exact vs pooling.pool_bags: {v['bit_exact']}")
    print(f"wrote {path}")
    return 0 if all(v["bit_exact"] for v in report["kinds"].values()) else 1
