"""`evssd bench rtl`: the gateware's own numbers, in simulated clock cycles (Verilator).

- sustained lookups/cycle of large gathers (several in flight) against the bound
  ``min(1, channel bandwidth, n_channels * ways / tR)``;
- read amplification (bytes over the flash-channel buses per lookup / row_bytes), fine-grained
  vs ``block_mode``, from the device's channel counters;
- latency p50/p99 per batch (submit to completion) for batch sizes 64..512.

Writes ``results/bench_rtl/bench_rtl.json`` and ``.png`` through
:func:`evssd.host.bench.common.write_results`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

from evssd.host import cli_types as ct

__all__ = ["add_arguments", "run", "bound"]


def add_arguments(parser):
    parser.add_argument("--channels", type=ct.int_range(1, 16, "a channel count"), default=4, help="flash channels (default 4)")
    parser.add_argument("--ways", type=ct.positive_int, default=4, help="page registers per channel (default 4)")
    parser.add_argument("--host-bits", type=ct.power_of_two, default=256, help="host DMA data width (default 256)")
    parser.add_argument("--ch-bits", type=ct.power_of_two, default=64, help="channel data width (default 64)")
    parser.add_argument("--page-size", type=ct.power_of_two, default=4096, help="flash page bytes (default 4096)")
    parser.add_argument("--pages", type=ct.positive_int, default=64, help="pages per channel (default 64)")
    parser.add_argument("--row-bytes", type=ct.positive_int, default=64, help="row size of the bench table (default 64)")
    parser.add_argument("--t-r", type=ct.int_range(0, (1 << 24) - 1, "a tR in cycles"), default=1000, help="tR in cycles (default 1000)")
    parser.add_argument("--sizes", default="64,128,256,512", type=ct.int_list(), help="batch sizes for the latency sweep")
    parser.add_argument("--batches", type=ct.positive_int, default=3, help="batches per size in the latency sweep")
    parser.add_argument("--inflight", type=ct.positive_int, default=4, help="gathers in flight for throughput")
    parser.add_argument("--slots", type=ct.positive_int, default=None,
                        help="reorder-buffer slots (default: hw.regmap.default_slots)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sweep (CI smoke run)")


def bound(params, row_bytes: int, t_r: int) -> dict:
    """Upper bounds on lookups/cycle for random lookups that each pay tR."""
    beats = math.ceil(row_bytes / (params.ch_data_bits // 8))
    channel_bw = params.n_channels / beats
    flash = params.n_channels * params.ways / max(t_r, 1)
    # The merger writes one channel beat per cycle into its ROB (shared by all channels), and
    # the result DMA moves one host beat per cycle.
    merger = 1 / beats
    host = (params.host_data_bits // 8) / row_bytes
    return {"engine": 1.0, "channel_bw": channel_bw, "flash": flash, "merger_ingest": merger,
            "host_dma": host, "bound": min(1.0, channel_bw, flash),
            "bound_device": min(1.0, channel_bw, flash, merger, host)}


def run(args) -> int:
    from evssd.host.bench.common import write_results
    from evssd.hw.regmap import Params
    from evssd.sim import runner

    params = Params(n_channels=args.channels, ways=args.ways, host_data_bits=args.host_bits,
                    ch_data_bits=args.ch_bits, page_size=args.page_size,
                    pages_per_channel=args.pages, max_tables=2, max_extents=2,
                    max_row_bytes=min(512, args.page_size))
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = {"t_r": args.t_r, "row_bytes": args.row_bytes, "seed": args.seed,
           "inflight": args.inflight, "throughput_sizes": [256, 512],
           "amp_lookups": 64, "latency_sizes": sizes, "latency_batches": args.batches}
    if args.quick:
        cfg.update(throughput_sizes=[64], amp_lookups=16, latency_sizes=sizes[:1], latency_batches=1)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        top_args = {} if args.slots is None else {"n_slots": args.slots}
        print("building/running the EV-SSD in Verilator (build log: build/sim/*/build.log)...", file=sys.stderr)
        runner.run("evssd.sim.tb_bench_rtl", "device", params, quiet=True,
                   extra_env={"EVSSD_BENCH_RTL": json.dumps(cfg), "EVSSD_BENCH_RTL_REPORT": report_path},
                   **top_args)
        with open(report_path) as fh:
            report = json.load(fh)
    from evssd.hw.regmap import default_slots
    report["n_slots"] = args.slots or default_slots(params)
    report["bound"] = bound(params, args.row_bytes, args.t_r)
    for row in report["throughput"]:
        row["fraction_of_bound"] = row["lookups_per_cycle"] / report["bound"]["bound"]
        row["fraction_of_device_bound"] = row["lookups_per_cycle"] / report["bound"]["bound_device"]

    fig = None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        tp = report["throughput"]
        axes[0].bar([str(r["lookups"]) for r in tp], [r["lookups_per_cycle"] for r in tp], label="RTL")
        axes[0].axhline(report["bound"]["bound"], color="r", ls="--", label="bound")
        if report["bound"]["bound_device"] < report["bound"]["bound"]:
            axes[0].axhline(report["bound"]["bound_device"], color="k", ls=":", label="with merger/DMA")
        axes[0].set_xlabel(f"lookups ({args.inflight} gathers in flight)")
        axes[0].set_ylabel("lookups / cycle")
        axes[0].set_title(f"sustained throughput, tR={args.t_r}")
        axes[0].legend()
        amp = report["amplification"]
        axes[1].bar(list(amp), [amp[k]["bytes_per_lookup"] for k in amp])
        axes[1].set_ylabel("channel bytes / lookup")
        axes[1].set_title(f"read amplification ({args.row_bytes} B rows)")
        lat = report["latency"]
        xs = [int(k) for k in lat]
        axes[2].plot(xs, [lat[k]["p50"] for k in lat], "o-", label="p50")
        axes[2].plot(xs, [lat[k]["p99"] for k in lat], "s--", label="p99")
        axes[2].plot(xs, [lat[k]["model_p50"] for k in lat], "^:", label="model p50")
        axes[2].set_xlabel("batch size")
        axes[2].set_ylabel("cycles")
        axes[2].set_title("batch latency")
        axes[2].legend()
        fig.tight_layout()
    except ImportError:
        pass
    path = write_results("bench_rtl", report, fig, command=" ".join(sys.argv))
    b = report["bound"]
    print(f"bound: {b['bound']:.4f} lookups/cycle (channel bw {b['channel_bw']:.3f}, flash {b['flash']:.4f}); "
          f"with merger ingest ({b['merger_ingest']:.3f}) and host DMA ({b['host_dma']:.3f}): {b['bound_device']:.4f}")
    for row in report["throughput"]:
        print(f"throughput: {row['lookups']} lookups in {row['cycles']} cycles = "
              f"{row['lookups_per_cycle']:.4f}/cycle ({100 * row['fraction_of_bound']:.0f}% of bound, "
              f"{100 * row['fraction_of_device_bound']:.0f}% of device bound); "
              f"model estimate {row['model_cycles']} cycles ({row['model_over_rtl']:.2f}x)")
    for k, v in report["amplification"].items():
        print(f"amplification {k}: {v['bytes_per_lookup']:.0f} B/lookup ({v['amplification']:.1f}x)")
    for k, v in report["latency"].items():
        print(f"latency batch {k}: p50 {v['p50']:.0f} p99 {v['p99']:.0f} cycles (model p50 {v['model_p50']:.0f})")
    print(f"wrote {path}")
    return 0
