"""L2 ECPIX-5: Ecpix5Core (UDP bridge + BRAM window + the EV-SSD, its channels behind the AXI
arbiter on one DRAM port) in Verilator, driven by the real driver over UDP datagrams at the
LiteEth raw-port seam, with cocotbext-axi's AxiRam where LiteDRAM's user port is on the board
(sim/tb_ecpix5.py). The ULX3S board test's scenarios (one body each, sim/board_scenarios.py), plus
the UDP link's own."""
import pytest

from evssd.hw.boards.board import board_params
from evssd.sim import runner
from evssd.sim.board_scenarios import scenario_names

pytestmark = pytest.mark.rtl

# The ULX3S simulation build's device (32 KiB channels): 4 regions of 32 KiB, 17 address bits.
ARGS = dict(window_bytes=16384, dram_addr_width=17)


@pytest.mark.parametrize("testcase", scenario_names(device=False) + ["resent_writes_run_once"])
def test_ecpix5_link(testcase):
    # The link needs only the register side: the core around the MMIO manager alone builds fast.
    runner.run("evssd.sim.tb_ecpix5", "ecpix5", board_params(clock_hz=0), testcase=testcase,
               device=False, **ARGS)


def test_ecpix5_dram_bring_up():
    """The transport's DDR3 initialisation and read levelling (evssd.host.dram_init) through the
    RTL bridge and AXI-Lite split into the register-level mock of the DRAM controller
    (tests/dram_model.py; no board here)."""
    from pathlib import Path
    runner.run("evssd.sim.tb_ecpix5", "ecpix5", board_params(clock_hz=0), testcase="dram_bring_up",
               device=False, extra_env={"EVSSD_REPO": str(Path(__file__).resolve().parents[1])}, **ARGS)


def test_ecpix5_link_cycles(tmp_path):
    """The link's cycle counts (docs/udp-protocol.md quotes them): deterministic in simulation;
    the bounds catch a bridge that stalls per byte, not a slow machine."""
    import json
    out = tmp_path / "link.json"
    runner.run("evssd.sim.tb_ecpix5", "ecpix5", board_params(clock_hz=0), testcase="link_throughput",
               device=False, extra_env={"EVSSD_LINK_JSON": str(out)}, **ARGS)
    r = json.loads(out.read_text())
    frame_in, frame_out = 16 + 4 * r["words"], 16
    assert frame_in + frame_out < r["write_1k_cycles"] < 24 * r["words"] + 200, r
    assert 32 < r["ping_cycles"] < 200, r
    assert frame_in < r["read_1k_cycles"] < 24 * r["words"] + 200, r


@pytest.mark.parametrize("testcase", scenario_names(device=True))
def test_ecpix5_gather_pooled(testcase):
    # Two channels (two masters on the arbiter; tests/hw/test_axi_arbiter.py has 3 and 4): the
    # whole device's Verilator build is most of this test's cost, and it halves with the channels.
    runner.run("evssd.sim.tb_ecpix5", "ecpix5", board_params(clock_hz=0, n_channels=2),
               testcase=testcase, device=True, **ARGS)
