"""The seam between the ECPIX-5 core and the generated LiteX cores: LiteDRAM and LiteEth are
generated (about a second each, in a child process) and every port the board top connects must
exist with the direction and width the Amaranth side has (hw/boards/ecpix5.py, hw/boards/udp_bridge.py)."""
import gc
import hashlib
import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("litedram")
pytest.importorskip("liteeth")

from amaranth import Shape

from evssd.hw.boards.ecpix5 import DRAM_BYTES, Ecpix5Core, ecpix5_params
from evssd.hw.boards.litex_cores import (COMMITTED_DRAM_DATA, DRAM_CONFIG, DRAM_DATA, ETH_CONFIG, NAMES,
                                        check_dram_data, core_ports, generate, normalise_verilog)
from evssd.hw.boards.udp_bridge import UdpStreamSignature


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("litex")
    return {k: generate(k, d) for k in ("dram", "eth")}


@pytest.fixture(scope="module")
def cores(generated):
    return {k: core_ports(v, v.stem) for k, v in generated.items()}


@pytest.mark.parametrize("kind", ["dram", "eth"])
def test_generation_is_reproducible(generated, kind, tmp_path):
    """The build digest covers the generated Verilog, so a fresh generation must give the same
    bytes: here the generator child runs again on its own, with another string-hash seed (the
    order of LiteX's hierarchy comment follows it) and at another time (its header's date), and
    the post-processed output is compared with the fixture's :func:`generate` output."""
    config = DRAM_CONFIG if kind == "dram" else ETH_CONFIG
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    raw = tmp_path / "gateware" / f"{NAMES[kind]}.v"
    proc = subprocess.run([sys.executable, "-m", "evssd.hw.boards.litex_cores", kind, str(cfg), str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = raw.read_text()
    assert "// Date" in text          # what made the digest stale: present in the raw output ...
    ours = generated[kind].read_text()
    assert "Date" not in ours and "//" not in ours and "/*" not in ours   # ... and gone from the build's
    assert hashlib.sha256(normalise_verilog(text).encode()).hexdigest() == \
        hashlib.sha256(ours.encode()).hexdigest()
    if kind == "dram":
        assert (tmp_path / DRAM_DATA).read_text() == (generated[kind].parent.parent / DRAM_DATA).read_text()


def test_normalise_keeps_strings_and_code():
    text = ('// Date : today\nmodule m (input wire a); /* tree\n b */ wire x; // tail\n'
            'initial $display("a // b /* c */"); endmodule\n')
    assert normalise_verilog(text) == 'module m (input wire a);  wire x;\ninitial $display("a // b /* c */"); endmodule\n'


def test_committed_dram_data_is_the_generated_cores(generated, tmp_path):
    """The host initialises the DDR3 from the committed copy (evssd.host.dram_init): it must be the
    generated core's, and a board build refuses a core whose data differ."""
    assert check_dram_data(generated["dram"]) == generated["dram"].parent.parent / DRAM_DATA
    data = json.loads(COMMITTED_DRAM_DATA.read_text())
    # litedram's own DDR3 sequence: MR2, MR3, MR1, MR0 (DLL reset, bit 8), ZQCL (A10)
    mrs = [(s["bank"], s["address"]) for s in data["init_sequence"] if s["kind"] == "command"]
    assert [b for b, _ in mrs] == [2, 3, 1, 0, 0] and mrs[3][1] & 0x100 and mrs[4][1] == 0x400
    fake = tmp_path / "litedram_core-x" / "gateware" / "litedram_core.v"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    (fake.parent.parent / DRAM_DATA).write_text(COMMITTED_DRAM_DATA.read_text().replace('"cl": 6', '"cl": 7'))
    with pytest.raises(RuntimeError, match="differ from the committed copy"):
        check_dram_data(fake)


def test_dram_user_port_matches_the_channel_port(cores):
    ports = cores["dram"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # only its signature is wanted: never elaborated
        core = Ecpix5Core(ecpix5_params(), dram_addr_width=(DRAM_BYTES - 1).bit_length())
        sig = core.signature.members["m_axi_dram"].signature
        del core
        gc.collect()
    for name, member in sig.members.items():
        if name in ("arprot", "awprot"):
            continue                               # LiteDRAM's AXI port has no protection bits
        d, width = ports[f"user_port_axi_0_{name}"]
        want = "input" if member.flow.name == "Out" else "output"
        assert d == want, (name, d)
        # LiteDRAM declares a 4-bit size; AXI's is 3 bits (the top pads it)
        assert width == (4 if name in ("arsize", "awsize") else Shape.cast(member.shape).width), (name, width)
    for name in ("init_done", "init_error", "user_clk", "user_rst", "pll_locked", "clk", "rst"):
        assert name in ports, name
    for name in ("wb_ctrl_adr", "wb_ctrl_dat_w", "wb_ctrl_dat_r", "wb_ctrl_cyc", "wb_ctrl_stb",
                 "wb_ctrl_ack", "wb_ctrl_we", "wb_ctrl_sel"):
        assert name in ports, name


def test_eth_raw_port_matches_the_bridge(cores):
    ports = cores["eth"]
    sig = UdpStreamSignature()
    for name, member in sig.members.items():
        if name == "error":
            continue
        # the core's source feeds the bridge's i_udp, the bridge's o_udp feeds the core's sink;
        # payload and valid go with the data, ready against it
        for side, data_dir in (("source", "output"), ("sink", "input")):
            d, width = ports[f"evssd_{side}_{name}"]
            against = {"output": "input", "input": "output"}[data_dir]
            assert d == (against if name == "ready" else data_dir), (side, name, d)
            assert width == Shape.cast(member.shape).width, (side, name, width)
    assert ports["evssd_source_error"] == ("output", 1)
    for name in ("rgmii_clocks_rx", "rgmii_clocks_tx", "rgmii_rx_ctl", "rgmii_rx_data", "rgmii_tx_ctl",
                 "rgmii_tx_data", "rgmii_mdc", "rgmii_mdio", "rgmii_rst_n", "sys_clock", "sys_reset"):
        assert name in ports, name


def test_generation_is_reused_and_bad_kind_named(tmp_path):
    a = generate("eth", tmp_path)
    mtime = a.stat().st_mtime_ns
    assert generate("eth", tmp_path) == a and a.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="core kind 'ddr'"):
        generate("ddr", tmp_path)


def test_the_board_build_plan_holds_both_cores_and_the_clock_constraints():
    """`evssd synth --board ecpix5-85f`'s plan (elaborated, not built): the generated cores are
    in it, the RGMII receive clock and the oscillator are constrained, the DDR3 and RGMII pads
    are placed, and a clock the DRAM controller does not run at is refused."""
    pytest.importorskip("amaranth_boards")
    from evssd.hw.build_plan import SynthError, prepare_board
    build = prepare_board("ecpix5-85f", device=False)
    files = build.plan.files
    assert {"litedram_core.v", "liteeth_core.v"} <= set(files)
    lpf = files["evssd.lpf"]
    assert 'FREQUENCY PORT "eth_rgmii_0__rx_clk__io" 125.0 MHz;' in lpf
    assert 'FREQUENCY PORT "clk100_0__io"' in lpf
    for pad, site in (("ddr3_0__dq__io[0]", "T4"), ("ddr3_0__a__io[14]", "H1"), ("eth_rgmii_0__tx_data__io[3]", "A8")):
        assert f'LOCATE COMP "{pad}" SITE "{site}";' in lpf, pad
    assert "inout  wire   [15:0] ddram_dq" in files["litedram_core.v"]
    assert build.params.clock_hz == 75_000_000 and build.top.divisor == 0
    with pytest.raises(SynthError, match="75 MHz"):
        prepare_board("ecpix5-85f", clock_mhz=100.0, device=False)


def test_a_fresh_generation_keeps_the_board_digest(monkeypatch, tmp_path):
    """`evssd synth --check` compares build digests; the plan's files, the generated cores
    included, must not change when the cores are generated again from scratch (the bug: the
    date, the git revision and the hierarchy order in LiteX's comments made every generation
    stale). Two plans from two empty generation directories (device=False: the cores are what
    is compared, the EV-SSD's elaboration is covered elsewhere)."""
    pytest.importorskip("amaranth_boards")
    from evssd.hw import build_plan
    parts = []
    for d in ("one", "two"):
        monkeypatch.setattr(build_plan, "REPO_BUILD", tmp_path / d)
        build = build_plan.prepare_board("ecpix5-85f", device=False)
        parts.append(build_plan.file_digests(build.plan.files))
        assert (tmp_path / d / "litex").is_dir()
    assert parts[0] == parts[1]
    assert build_plan.build_digest(parts[0], {}) == build_plan.build_digest(parts[1], {})
