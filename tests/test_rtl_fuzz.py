"""Fuzz the command path on the RTL (Verilator): a few hundred random descriptors, valid and
invalid, each checked against Status's rules, the numpy golden and the functional model in
lockstep (sim/tb_fuzz.py); the device serves ordinary requests afterwards."""
import pytest

from evssd.hw.regmap import Params
from evssd.sim import runner

pytestmark = pytest.mark.rtl

# The first build of tests/test_rtl_device.py: the Verilator model is shared, not rebuilt.
SMALL = dict(page_size=512, pages_per_channel=64, max_tables=8, max_extents=4, ways=2,
             max_row_bytes=512, max_inflight=4)


def test_fuzz_command_path_on_rtl():
    runner.run("evssd.sim.tb_fuzz", "device", Params(n_channels=1, host_data_bits=64, ch_data_bits=64, **SMALL),
               seed=3, extra_env={"EVSSD_FUZZ_COMMANDS": "500"})
