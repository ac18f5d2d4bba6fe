"""`evssd bench rtl`: the gateware's own numbers, in simulated clock cycles (Verilator).

- sustained lookups/cycle of large gathers (several in flight) against the bound
  ``min(1, channel bandwidth, n_channels * ways / tR)``;
- read amplification (bytes over the flash-channel buses per lookup / row_bytes), fine-grained
  vs ``block_mode``, from the device's channel counters;
- latency p50/p99 per batch (submit to completion) for batch sizes 64..512.

Writes ``results/bench_rtl/bench_rtl.json`` and ``.png`` through
:func:`evssd.host.bench.common.write_results`.

``--sweep``: sustained throughput of the default build (reorder-buffer slots from
:func:`evssd.hw.regmap.default_slots`) for every channels x ways in ``--sweep-channels`` x
``--sweep-ways`` and every tR in ``--sweep-t-r`` on the timing model (fast, an estimate), and on
the RTL for the ``--rtl-configs`` subset (cycle-accurate; each is a Verilator build), the model
next to it on the same lookups. Writes ``results/bench_rtl_sweep/bench_rtl_sweep.json`` + ``.png``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

from evssd.host import cli_types as ct

__all__ = ["add_arguments", "run", "bound", "bench_params", "throughput_batches", "model_throughput",
           "gather_cycles", "model_replay", "sweep", "DEFAULT_RTL_CONFIGS"]

#: builds the sweep runs on the RTL: the corners and the diagonal of 1..8 x 1..8 (channels x ways)
DEFAULT_RTL_CONFIGS = "1x1,1x8,8x1,2x2,4x4,8x8,4x2,2x8"


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
    parser.add_argument("--read-queue", type=ct.nonneg_int, default=None,
                        help="per-channel read queue entries of the build, RTL and model (default: "
                             "hw.regmap.default_read_queue; e.g. 2 for the old 1-way queue)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sweep (CI smoke run)")
    parser.add_argument("--legacy-draw", action="store_true",
                        help="model only (no Verilator): the measurement's cycles with the lookups "
                             "drawn as before git 27335a6 and as now, side by side")
    sw = parser.add_argument_group("sweep of the default build's throughput (--sweep)")
    sw.add_argument("--sweep", action="store_true",
                    help="channels x ways x tR on the model, a subset on the RTL (see --rtl-configs)")
    sw.add_argument("--sweep-channels", type=ct.int_list(), default="1,2,3,4,5,6,7,8",
                    help="channel counts of the sweep (default 1..8)")
    sw.add_argument("--sweep-ways", type=ct.int_list(), default="1,2,3,4,5,6,7,8",
                    help="ways of the sweep (default 1..8)")
    sw.add_argument("--sweep-t-r", type=ct.int_list(), default="1000,2500", help="tR values (default 1000,2500)")
    sw.add_argument("--sweep-lookups", type=ct.positive_int, default=1024,
                    help="lookups per gather of the sweep, --inflight in flight (default 1024: 4,096 "
                         "lookups, so the ramp and the drain of the reorder window weigh little)")
    sw.add_argument("--rtl-configs", type=_configs, default=DEFAULT_RTL_CONFIGS,
                    help=f"CxW builds also run on the RTL, or 'none' (default {DEFAULT_RTL_CONFIGS})")
    parser.add_argument("--cxx-opt", choices=["O0", "O1", "O2", "Os"], default=None,
                        help="C++ optimisation (-O...) of the Verilator build (default: Verilator's "
                             "-Os); O0 compiles the 8-channel builds ~3x faster, for short runs")


def _cxx_opt(args) -> str | None:
    return None if args.cxx_opt is None else f"-{args.cxx_opt}"


def _configs(text: str) -> list[tuple[int, int]]:
    """``"1x1,8x8"`` -> [(1, 1), (8, 8)]; ``"none"`` -> []."""
    if text.strip().lower() == "none":
        return []
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"--rtl-configs: {item.strip()!r} is not CHANNELSxWAYS (e.g. 4x4)")
        out.append((int(parts[0]), int(parts[1])))
    return out


_configs.__name__ = "a CxW list"   # argparse names the type in its error message


def bench_params(channels: int, ways: int, *, host_bits: int = 256, ch_bits: int = 64,
                 page_size: int = 4096, pages: int = 64):
    """The build every `evssd bench rtl` run measures (one definition for the RTL and the sweep)."""
    from evssd.hw.regmap import Params
    return Params(n_channels=channels, ways=ways, host_data_bits=host_bits, ch_data_bits=ch_bits,
                  page_size=page_size, pages_per_channel=pages, max_tables=2, max_extents=2,
                  max_row_bytes=min(512, page_size))


def throughput_batches(n_rows: int, lookups: int, inflight: int, seed: int) -> list:
    """The ``inflight`` gathers of ``lookups`` random rows of the throughput measurement, the
    same on the RTL (``tb_bench_rtl``) and in the model sweep."""
    import numpy as np
    rng = np.random.default_rng([seed, lookups, inflight])
    return [rng.integers(0, n_rows, lookups) for _ in range(inflight)]


async def gather_cycles(dev, gathers) -> int:
    """Cycles ``dev`` (a device model) takes for ``gathers`` (index arrays of table 0), submitted
    together and then finished, as the RTL measurement runs them."""
    c0 = (await dev.counters())["cycles"]
    handles = [await dev.submit_gather(0, idx) for idx in gathers]
    for h in handles:
        await dev.finish(h)
    return (await dev.counters())["cycles"] - c0


def model_throughput(params, *, t_r: int, row_bytes: int = 64, lookups: int = 1024, inflight: int = 4,
                     seed: int = 1, n_slots: int | None = None, read_queue: int | None = None) -> dict:
    """The timing model's estimate of the throughput measurement (``inflight`` gathers submitted
    together, then finished) on a fresh model of ``params`` (``n_slots``, ``read_queue``: of a
    non-default build): lookups, cycles, lookups/cycle."""
    import asyncio

    from evssd.host.device import AsyncDevice
    from evssd.host.model import ModelTransport

    n_rows = params.total_pages * (params.page_size // row_bytes)

    async def main():
        dev = await AsyncDevice.open(ModelTransport(params, host_memory_bytes=16 << 20, n_slots=n_slots,
                                                    read_queue=read_queue),
                                     sq_entries=16, cq_entries=16)
        try:
            await dev.set_timing(t_r=t_r)
            await dev.configure_table(0, row_bytes, "fp32", [(0, n_rows, 0)])
            return await gather_cycles(dev, throughput_batches(n_rows, lookups, inflight, seed))
        finally:
            await dev.close()

    cycles = asyncio.run(main())
    return {"lookups": lookups * inflight, "cycles": cycles, "lookups_per_cycle": lookups * inflight / cycles}


def _run_rtl(params, cfg: dict, n_slots: int, cxx_opt: str | None = None,
             read_queue: int | None = None) -> dict:
    """Run ``tb_bench_rtl`` on the build of ``params`` with ``n_slots`` (and ``read_queue``
    entries per channel unless None: the default build's; C++ compiled with ``cxx_opt``, see
    :func:`evssd.sim.runner.run`); returns its report."""
    from evssd.sim import runner
    # a default read queue is not a top argument: the default build keeps its build directory
    extra = {} if read_queue is None else {"read_queue": read_queue}
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        runner.run("evssd.sim.tb_bench_rtl", "device", params, quiet=True, cxx_opt=cxx_opt,
                   extra_env={"EVSSD_BENCH_RTL": json.dumps(cfg), "EVSSD_BENCH_RTL_REPORT": report_path},
                   n_slots=n_slots, **extra)
        with open(report_path) as fh:
            return json.load(fh)


def sweep(channels, ways, t_rs, rtl_configs, *, row_bytes: int = 64, lookups: int = 1024,
          inflight: int = 4, seed: int = 1, log=print, on_progress=None, cxx_opt: str | None = None,
          read_queue: int | None = None) -> dict:
    """Throughput of the default build (:func:`evssd.hw.regmap.default_slots`,
    :func:`evssd.hw.regmap.default_read_queue` unless ``read_queue`` is given) as a fraction of
    :func:`bound`: every channels x ways x tR on the model, ``rtl_configs`` on the RTL too.
    ``on_progress(report)`` is called after the model part and after each RTL run (an RTL build
    takes minutes: the caller can save what is done)."""
    from evssd.hw.regmap import default_read_queue, default_slots

    def queue(params):
        return default_read_queue(params) if read_queue is None else read_queue

    report = {"row_bytes": row_bytes, "lookups": lookups, "inflight": inflight, "seed": seed,
              "t_r": list(t_rs), "read_queue": read_queue, "model": [], "rtl": []}
    for c in channels:
        for w in ways:
            params = bench_params(c, w)
            for t_r in t_rs:
                m = model_throughput(params, t_r=t_r, row_bytes=row_bytes, lookups=lookups,
                                     inflight=inflight, seed=seed, read_queue=read_queue)
                b = bound(params, row_bytes, t_r)["bound"]
                report["model"].append({"channels": c, "ways": w, "t_r": t_r, "n_slots": default_slots(params),
                                        "read_queue": queue(params),
                                        "bound": b, "fraction_of_bound": m["lookups_per_cycle"] / b, **m})
    if on_progress:
        on_progress(report)
    for c, w in rtl_configs:
        params = bench_params(c, w)
        n_slots = default_slots(params)
        for t_r in t_rs:
            log(f"RTL {c}x{w} tR {t_r} ({n_slots} slots)...")
            cfg = {"t_r": t_r, "row_bytes": row_bytes, "seed": seed, "inflight": inflight,
                   "throughput_sizes": [lookups], "amp_lookups": 0, "latency_sizes": [],
                   "latency_batches": 0}
            tp = _run_rtl(params, cfg, n_slots, cxx_opt, read_queue)["throughput"][0]
            b = bound(params, row_bytes, t_r)["bound"]
            row = {"channels": c, "ways": w, "t_r": t_r, "n_slots": n_slots, "read_queue": queue(params),
                   "bound": b,
                   "lookups": tp["lookups"], "cycles": tp["cycles"], "lookups_per_cycle": tp["lookups_per_cycle"],
                   "fraction_of_bound": tp["lookups_per_cycle"] / b, "model_cycles": tp["model_cycles"],
                   "model_over_rtl": tp["model_over_rtl"]}
            report["rtl"].append(row)
            log(f"  {row['fraction_of_bound']:.1%} of bound, model/RTL cycles {row['model_over_rtl']:.3f}")
            if on_progress:
                on_progress(report)
    return report


def _sweep_figure(report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t_rs = report["t_r"]
    chans = sorted({r["channels"] for r in report["model"]})
    ways = sorted({r["ways"] for r in report["model"]})
    rtl = report["rtl"]
    n_axes = len(t_rs) + bool(rtl)          # an RTL panel only when the sweep ran the RTL
    fig, axes = plt.subplots(1, n_axes, figsize=(5 * n_axes, 4.2), squeeze=False)
    axes = axes[0]
    for ax, t_r in zip(axes, t_rs):
        grid = np.full((len(chans), len(ways)), np.nan)
        for r in report["model"]:
            if r["t_r"] == t_r:
                grid[chans.index(r["channels"]), ways.index(r["ways"])] = r["fraction_of_bound"]
        im = ax.imshow(grid, vmin=0.5, vmax=1.05, cmap="viridis", origin="lower")
        for i in range(len(chans)):
            for j in range(len(ways)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if grid[i, j] < 0.8 else "k")
        for r in report["rtl"]:
            if r["t_r"] == t_r:
                ax.add_patch(plt.Rectangle((ways.index(r["ways"]) - 0.5, chans.index(r["channels"]) - 0.5),
                                           1, 1, fill=False, ec="r", lw=1.5))
        ax.set_xticks(range(len(ways)), ways)
        ax.set_yticks(range(len(chans)), chans)
        ax.set_xlabel("ways")
        ax.set_ylabel("channels")
        ax.set_title(f"model: fraction of bound, tR={t_r}" + ("\n(red: also on the RTL)" if rtl else ""))
    fig.colorbar(im, ax=axes[:len(t_rs)], shrink=0.8)
    if rtl:
        ax = axes[-1]
        labels = [f"{r['channels']}x{r['ways']}\ntR{r['t_r']}" for r in rtl]
        x = np.arange(len(rtl))
        ax.bar(x - 0.2, [r["fraction_of_bound"] for r in rtl], 0.4, label="RTL (cycle-accurate)")
        ax.bar(x + 0.2, [r["fraction_of_bound"] / r["model_over_rtl"] for r in rtl], 0.4,
               label="model (estimate)")
        ax.axhline(0.9, color="r", ls="--", label="90% of bound")
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_ylabel("fraction of bound")
        ax.legend(fontsize=7)
        ax.set_title("default build: RTL vs model")
    return fig


def _run_sweep(args) -> int:
    from evssd.host.bench.common import write_results
    chans = [int(x) for x in args.sweep_channels.split(",")]
    ways = [int(x) for x in args.sweep_ways.split(",")]
    t_rs = [int(x) for x in args.sweep_t_r.split(",")]
    command = " ".join(sys.argv)
    report = sweep(chans, ways, t_rs, args.rtl_configs, row_bytes=args.row_bytes, lookups=args.sweep_lookups,
                   inflight=args.inflight, seed=args.seed, log=lambda m: print(m, file=sys.stderr),
                   on_progress=lambda r: write_results("bench_rtl_sweep", r, command=command),
                   cxx_opt=_cxx_opt(args), read_queue=args.read_queue)
    fig = None
    try:
        fig = _sweep_figure(report)
    except ImportError:
        pass
    path = write_results("bench_rtl_sweep", report, fig, command=command)
    worst = min(report["model"], key=lambda r: r["fraction_of_bound"])
    print(f"model: {len(report['model'])} builds x tR; worst {worst['fraction_of_bound']:.1%} of bound at "
          f"{worst['channels']}x{worst['ways']} tR {worst['t_r']} ({worst['n_slots']} slots)")
    for r in report["rtl"]:
        print(f"RTL {r['channels']}x{r['ways']} tR {r['t_r']} ({r['n_slots']} slots, read queue {r['read_queue']}): "
              f"{r['lookups_per_cycle']:.4f} lookups/cycle = {r['fraction_of_bound']:.1%} of bound; "
              f"model/RTL cycles {r['model_over_rtl']:.3f}")
    print(f"wrote {path}")
    return 0


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


def model_replay(params, *, draw: str, t_r: int, row_bytes: int = 64, inflight: int = 4,
                 seed: int = 1, sizes=(64, 128, 256, 512), batches: int = 3,
                 n_slots: int | None = None, read_queue: int | None = None) -> dict:
    """The timing model's cycles for the whole measurement (sustained 4 x 256 and 4 x 512, then
    the latency batches) with the lookups drawn ``draw="current"`` (the sustained runs from
    :func:`throughput_batches`, as ``tb_bench_rtl`` draws them since git 27335a6) or
    ``draw="legacy"`` (everything from the one generator that first wrote the flash pages, as the
    bench drew before: the same ``seed`` then meant other rows). Runs in seconds; it tells a
    change of the device from a change of the bench's lookups."""
    import asyncio

    import numpy as np

    from evssd.host.device import AsyncDevice
    from evssd.host.model import ModelTransport

    if draw not in ("legacy", "current"):
        raise ValueError(f"draw must be 'legacy' or 'current', not {draw!r}")
    n_rows = params.total_pages * (params.page_size // row_bytes)

    async def main():
        rng = np.random.default_rng(seed)
        for _ in range(params.total_pages):      # the flash pages' contents, as tb_bench_rtl
            rng.integers(0, 256, params.page_size, dtype=np.uint8)
        dev = await AsyncDevice.open(ModelTransport(params, host_memory_bytes=16 << 20, n_slots=n_slots,
                                                    read_queue=read_queue), sq_entries=16, cq_entries=16)
        try:
            await dev.set_timing(t_r=t_r)
            await dev.configure_table(0, row_bytes, "fp32", [(0, n_rows, 0)])

            out = {"draw": draw, "throughput": [], "latency_p50": {}}
            for n in (256, 512):
                gathers = ([rng.integers(0, n_rows, n) for _ in range(inflight)] if draw == "legacy"
                           else throughput_batches(n_rows, n, inflight, seed))
                out["throughput"].append({"lookups": n * inflight,
                                          "cycles": await gather_cycles(dev, gathers)})
            rng.integers(0, n_rows, 64)             # the amplification rows (RTL only)
            for size in sizes:
                samples = [await gather_cycles(dev, [rng.integers(0, n_rows, size)]) for _ in range(batches)]
                out["latency_p50"][str(size)] = float(np.percentile(samples, 50))
            return out
        finally:
            await dev.close()

    return asyncio.run(main())


def _run_legacy_draw(args) -> int:
    from evssd.host.bench.common import write_results
    params = bench_params(args.channels, args.ways, host_bits=args.host_bits, ch_bits=args.ch_bits,
                          page_size=args.page_size, pages=args.pages)
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {"n_slots": args.slots, "read_queue": args.read_queue, "t_r": args.t_r, "runs": []}
    for draw in ("legacy", "current"):
        r = model_replay(params, draw=draw, t_r=args.t_r, row_bytes=args.row_bytes,
                         inflight=args.inflight, seed=args.seed, sizes=sizes, batches=args.batches,
                         n_slots=args.slots, read_queue=args.read_queue)
        report["runs"].append(r)
        tp = ", ".join(f"{t['lookups']} lookups {t['cycles']} cycles" for t in r["throughput"])
        lat = " / ".join(f"{v:.0f}" for v in r["latency_p50"].values())
        print(f"model, {draw} draw: {tp}; latency p50 {lat} cycles")
    path = write_results("bench_rtl_legacy_draw", report, command="evssd bench rtl --legacy-draw")
    print(f"wrote {path}")
    return 0


def run(args) -> int:
    if args.sweep:
        return _run_sweep(args)
    if args.legacy_draw:
        return _run_legacy_draw(args)
    from evssd.host.bench.common import write_results
    from evssd.hw.regmap import default_slots

    params = bench_params(args.channels, args.ways, host_bits=args.host_bits, ch_bits=args.ch_bits,
                          page_size=args.page_size, pages=args.pages)
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = {"t_r": args.t_r, "row_bytes": args.row_bytes, "seed": args.seed,
           "inflight": args.inflight, "throughput_sizes": [256, 512],
           "amp_lookups": 64, "latency_sizes": sizes, "latency_batches": args.batches}
    if args.quick:
        cfg.update(throughput_sizes=[64], amp_lookups=16, latency_sizes=sizes[:1], latency_batches=1)
    n_slots = args.slots or default_slots(params)
    print("building/running the EV-SSD in Verilator (build log: build/sim/*/build.log)...", file=sys.stderr)
    report = _run_rtl(params, cfg, n_slots, _cxx_opt(args), args.read_queue)
    report["n_slots"] = n_slots
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
