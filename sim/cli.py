"""``evssd sim``: generate Verilog and run the cocotb benches on Verilator."""
from __future__ import annotations

import sys

from evssd.hw.regmap import Params
from evssd.host import cli_types as ct

BENCHES = {
    "mmio": ("evssd.sim.tb_mmio", "mmio", "the driver opens the MMIO manager and checks registers"),
    "device": ("evssd.sim.tb_device", "device", "the whole device through the driver, random back-pressure"),
    "demo": ("evssd.sim.tb_demo", "device", "the demo trace on the RTL (see `evssd demo --backend rtl`)"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run a cocotb bench", description="Run a cocotb bench on Verilator.")
    run.add_argument("bench", choices=BENCHES, help="; ".join(f"{k}: {v[2]}" for k, v in BENCHES.items()))
    _params(run)
    run.add_argument("--seed", type=ct.nonneg_int, default=None)
    run.add_argument("--waves", action="store_true", help="dump an FST waveform in the build directory")
    run.add_argument("--testcase", default=None, help="run only this cocotb test")
    ver = sub.add_parser("verilog", help="write the Verilog of a top", description="Write Verilog of a top.")
    ver.add_argument("top", choices=("mmio", "device", "board"))
    _params(ver)


def _params(parser):
    d = Params()
    parser.add_argument("--channels", type=ct.int_range(1, 16, "a channel count"), default=d.n_channels)
    parser.add_argument("--host-bits", type=ct.power_of_two, default=d.host_data_bits)
    parser.add_argument("--ch-bits", type=ct.power_of_two, default=d.ch_data_bits)
    parser.add_argument("--page-size", type=ct.power_of_two, default=d.page_size)
    parser.add_argument("--ways", type=ct.positive_int, default=d.ways)
    parser.add_argument("--pages-per-channel", type=ct.positive_int, default=256)


def _make(args) -> Params:
    return Params(n_channels=args.channels, host_data_bits=args.host_bits, ch_data_bits=args.ch_bits,
                  page_size=args.page_size, ways=args.ways, pages_per_channel=args.pages_per_channel)


def run(args) -> int:
    from evssd.sim import runner
    params = _make(args)
    if args.sim_command == "verilog":
        build = runner.generate_verilog(args.top, params)
        print(build.verilog)
        return 0
    module, top, _ = BENCHES[args.bench]
    try:
        xml = runner.run(module, top, params, seed=args.seed, waves=args.waves, testcase=args.testcase)
    except runner.SimulationFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"passed: {module} on {top} ({params}); results {xml}")
    return 0
