"""The ``evssd`` command line.

Subcommands live next to the feature they drive; this file only wires them. Every subcommand
module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is imported lazily, so
``evssd --help`` works without Amaranth, cocotb or the synthesis tools installed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("evssd.host.demo", "the main job: tables on the device, a trace through EV-Cache + pipeline, checked against numpy"),
    "info": ("evssd.host.info", "open a device and print its identity and build parameters"),
    "regmap": ("evssd.host.regmap_doc", "print or write the register map documentation (docs/registers.md)"),
    "sim": ("evssd.sim.cli", "run the cocotb + Verilator benches of the RTL"),
    "synth": ("evssd.host.synth_cli", "synthesize the gateware for an FPGA board or estimate resources"),
    "serve": ("evssd.host.serving.cli", "run embedding servers and rankers (FlexEMR disaggregated serving)"),
}

# `evssd bench NAME`: name -> (module, one-line help)
BENCHES = {
    "cache": ("evssd.host.bench.cache", "EV-Cache vs plain LRU: keys/s and hit rate on calibrated traces"),
    "store": ("evssd.host.bench.store", "embedding store backends side by side: dram, file, evssd model, RocksDB"),
    "serve": ("evssd.host.bench.serve", "FlexEMR engine: multi- vs single-threaded, pooling, adaptive cache"),
    "rtl": ("evssd.sim.bench_rtl", "cycle-accurate RTL: lookups/cycle vs bound, read amplification, latency"),
    "model": ("evssd.host.bench.model", "functional + timing model: wall-clock lookups/s through the driver (GATHER, GATHER_POOLED)"),
    "synth": ("evssd.host.bench.synth", "resource estimates for 1..8 channels and 64..512-bit widths (ECP5, UltraScale+)"),
    "dlrm": ("evssd.host.bench.dlrm", "TorchRec DLRM end to end: DRAM vs EV-SSD (fine-grained, EV-Cache, pipeline) vs block mode"),
    "device": ("evssd.host.bench.device", "driver facade: per-call cost of the thread-safe Device.run vs a bare loop"),
}


def _add(subparsers, name: str, module: str, help_: str):
    parser = subparsers.add_parser(name, help=help_, description=help_)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        missing = str(exc)
        def run_missing(args, _missing=missing):
            print(f"evssd {name}: not available here ({_missing})", file=sys.stderr)
            return 2
        parser.set_defaults(_run=run_missing)
        return parser
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evssd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        _add(sub, name, module, help_)
    bench = sub.add_parser("bench", help="benchmarks: JSON + PNG under results/<name>/",
                           description="Benchmarks; each writes JSON + PNG under results/<name>/.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHES.items():
        _add(bench_sub, name, module, help_)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn failures into one line: a bad argument exits 2 (argparse, or a
    :class:`~evssd.host.cli_types.UsageError`), any other error exits 1 with its message;
    ``EVSSD_DEBUG=1`` shows the traceback instead."""
    from evssd.host.cli_types import UsageError
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"evssd {args.command}" + (f" {args.bench}" if getattr(args, "bench", None) else "")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("EVSSD_DEBUG"):
            raise
        print(f"{prog}: error: {type(exc).__name__}: {exc} (EVSSD_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
