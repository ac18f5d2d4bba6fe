"""``evssd synth``: build the board bitstream, or check that the committed one is current.

    evssd synth --board ulx3s-85f          # bitstream + manifest + report into bitstreams/ulx3s-85f/
    evssd synth --check                    # exit 1 when the committed bitstream is stale
    evssd synth --digest                   # the build digest of the default build now
    evssd synth --adopt                    # record the digest in an older manifest (no rebuild)
    evssd synth --release                  # check; rebuild when stale; exit 1 unless current and timing met
    evssd synth --list                     # supported boards

The flow itself lives in :mod:`evssd.hw.synth` (gateware side; needs Amaranth, amaranth-boards
and the YoWASP tools from ``pip install 'evssd[synth]'``).
"""
from __future__ import annotations

import sys

# hw/build_plan.py imports Amaranth only inside its functions, so `evssd synth --help` and bad
# board names work without Amaranth installed.
from ..hw.build_plan import BOARDS
from evssd.host import cli_types as ct

SUPPORTED = {name: spec.description for name, spec in BOARDS.items()}


def _board_defaults(board: str) -> str:
    """The default clock and seed of a board's build, for the help text."""
    spec = BOARDS[board]
    return f"{spec.clock_mhz:g} MHz, seed {spec.seed} for {board}"


def add_arguments(parser):
    defaults = _board_defaults("ulx3s-85f")
    parser.add_argument("--board", default="ulx3s-85f",
                        help=f"target board (supported: {', '.join(SUPPORTED)}; default ulx3s-85f)")
    parser.add_argument("--check", action="store_true",
                        help="only check whether the committed bitstream is current: its manifest's "
                             "build digest against the elaborated design and build options now")
    parser.add_argument("--digest", action="store_true",
                        help="print the build digest (and its parts) of the board's default build")
    parser.add_argument("--adopt", action="store_true",
                        help="record the build digest in a manifest that predates it, when the tree "
                             "it was built from elaborates to the same build plan (no rebuild)")
    parser.add_argument("--release", action="store_true",
                        help="release step: keep the committed bitstream if current, else rebuild it; "
                             "exit 1 unless it is current and meets timing")
    parser.add_argument("--list", action="store_true", help="list the supported boards")
    parser.add_argument("--clock-mhz", type=ct.positive_float, default=None, help=f"design clock in MHz (default: the board's, {defaults}; the design's target is 100)")
    parser.add_argument("--baud", type=ct.positive_int, default=None, help="UART baud rate (default 115200)")
    parser.add_argument("--out", default=None, help="output directory (default bitstreams/<board>/)")
    parser.add_argument("--build-dir", default=None, help="work directory (default build/synth/<board>/)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=None,
                        help=f"nextpnr placement seed (default: the board's, {defaults})")
    parser.add_argument("--router", choices=("router1", "router2"), default="router2",
                        help="nextpnr router (router2 is faster; router1 converges on some "
                             "designs where router2 does not)")
    parser.add_argument("--nextpnr-opts", default=None, metavar="OPTS",
                        help="extra nextpnr-ecp5 options instead of the board's defaults "
                             "(recorded in the manifest; '' for none)")
    parser.add_argument("--mmio-only", action="store_true",
                        help="build the board around the MMIO manager alone (no EV-SSD pipeline)")


def run(args) -> int:
    if args.list:
        for name, desc in SUPPORTED.items():
            print(f"{name:12s} {desc}")
        return 0
    if args.board not in SUPPORTED:
        print(f"evssd synth: unsupported board {args.board!r}; supported boards: "
              f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}", file=sys.stderr)
        return 2
    from evssd.hw import synth
    if args.check or args.adopt:
        fn = synth.check_bitstream if args.check else synth.adopt_digest
        try:
            ok, message = fn(args.board, args.out)
        except synth.SynthError as exc:
            ok, message = False, f"evssd synth: {exc}"
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.digest:
        from evssd.hw import build_plan
        d = build_plan.board_digest(args.board)
        print(f"build digest {d['build_digest']}")
        for name, h in d["parts"].items():
            print(f"  {h[:16]}  {build_plan.describe_parts(name)}")
        for pkg, v in d["tools"].items():
            print(f"  tool {pkg} {v}")
        return 0
    if args.release:
        try:
            return synth.release(args.board)
        except synth.SynthError as exc:
            print(f"evssd synth: {exc}", file=sys.stderr)
            return 1
    try:
        manifest = synth.build_bitstream(args.board, out_dir=args.out, build_dir=args.build_dir,
                                         clock_mhz=args.clock_mhz, baud=args.baud, seed=args.seed,
                                         router=args.router, nextpnr_extra=args.nextpnr_opts,
                                         device=False if args.mmio_only else None)
    except synth.SynthError as exc:
        print(f"evssd synth: {exc}", file=sys.stderr)
        return 1
    s = manifest["summary"]
    print(f"bitstream: {manifest['bitstream']} ({manifest['bitstream_bytes']} bytes) in "
          f"{manifest['build_seconds']:.0f} s; LUT4 {s['LUT4']}, FF {s['FF']}, DP16KD {s['DP16KD']}, "
          f"MULT18X18D {s['MULT18X18D']}")
    for clk, v in manifest["fmax"].items():
        print(f"  {clk}: {v['achieved_mhz']:.1f} MHz (target {v['target_mhz']:.1f}: "
              f"{'met' if v['pass'] else 'NOT met'})")
    return 0
