"""L2: the whole EV-SSD (cocotb + Verilator) driven by the real host driver, scoreboarded against a
numpy golden and the functional model (sim/tb_device.py)."""
import os

import pytest

from evssd.hw.regmap import Params
from evssd.sim import runner

pytestmark = pytest.mark.rtl


SMALL = dict(page_size=512, pages_per_channel=64, max_tables=8, max_extents=4, ways=2,
             max_row_bytes=512, max_inflight=4)


@pytest.mark.parametrize("params", [
    Params(n_channels=1, host_data_bits=64, ch_data_bits=64, **SMALL),
    Params(n_channels=4, host_data_bits=256, ch_data_bits=256, **SMALL),
    Params(n_channels=3, host_data_bits=128, ch_data_bits=32, **SMALL),
], ids=["1ch-h64-c64", "4ch-h256-c256", "3ch-h128-c32"])
def test_device_end_to_end(params):
    runner.run("evssd.sim.tb_device", "device", params, seed=1)


def test_demo_trace_on_rtl():
    """`evssd demo --backend rtl` in small: EV-Cache + driver + RTL, every pooled result checked
    against numpy inside the bench (a mismatch fails it). Reuses the 4-channel build above."""
    from evssd.host.demo import run_rtl_demo
    cfg = dict(tables=3, rows=300, dim=16, batches=3, batch_size=8, pooling_factor=6,
               cache_fraction=0.05, seed=3, t_r=50)
    text = run_rtl_demo(cfg, Params(n_channels=4, host_data_bits=256, ch_data_bits=256, **SMALL))
    assert "checked  9 pooled results" in text and "all equal" in text
