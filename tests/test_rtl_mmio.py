"""L2 (foundation slice): the host driver opens the RTL MMIO manager through cocotb + Verilator."""
import pytest

from evssd.hw.regmap import Params
from evssd.sim import runner

pytestmark = pytest.mark.rtl


@pytest.mark.parametrize("params", [Params(n_channels=4), Params(n_channels=1, page_size=512)],
                         ids=["4ch-4k", "1ch-512"])
def test_driver_over_cocotb_on_mmio(params):
    runner.run("evssd.sim.tb_mmio", "mmio", params)
