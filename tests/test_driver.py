"""L0: the driver over the functional model: identity checks, scenarios, bad input."""
import asyncio

import numpy as np
import pytest

from evssd.hw import regmap
from evssd.hw.regmap import Params
from evssd.host.device import AsyncDevice, Device, DeviceMismatchError
from evssd.host.model import ModelTransport
from evssd.host.regfile import MMIOError
from evssd.host.backends import open_transport
from evssd.sim import scenarios


def _open(params, **kw):
    transport = ModelTransport(params)
    return asyncio.run(AsyncDevice.open(transport, **kw)), transport


@pytest.mark.parametrize("params", [
    Params(),
    Params(n_channels=1, page_size=512, max_row_bytes=256, pages_per_channel=512),
    Params(n_channels=3, host_data_bits=256, ch_data_bits=256, page_size=1024, pages_per_channel=1024),
], ids=["4ch-4k", "1ch-512", "3ch-1k"])
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_scenarios_on_model(params, name):
    async def main():
        dev = await AsyncDevice.open(ModelTransport(params), sq_entries=8, cq_entries=8)
        await scenarios.SCENARIOS[name](dev, np.random.default_rng(11))
    asyncio.run(main())


def test_open_reports_build_parameters():
    params = Params(n_channels=2, page_size=2048, max_tables=4)
    with Device.open(ModelTransport(params)) as dev:
        assert dev.params == params


def _model_answering(addr_name, value):
    transport = ModelTransport()
    addr = regmap.register(addr_name).addr
    orig = transport.device.regs.read
    transport.device.regs.read = lambda a: (value, 0) if a == addr else orig(a)
    return transport


def test_open_refuses_other_regmap_hash():
    other = regmap.REGMAP_HASH ^ 0x10
    with pytest.raises(DeviceMismatchError, match=f"register map hash 0x{other:08x} differs"):
        Device.open(_model_answering("ID_REGMAP_HASH", other))


def test_open_refuses_other_major_version():
    with pytest.raises(DeviceMismatchError, match="version 7.0"):
        Device.open(_model_answering("ID_VERSION", 7 << 16))


def test_open_refuses_a_device_that_is_not_an_evssd():
    with pytest.raises(DeviceMismatchError, match="no EV-SSD here"):
        Device.open(_model_answering("ID_MAGIC", 0xDEADBEEF))


def test_open_refuses_unexpected_parameters():
    with pytest.raises(DeviceMismatchError, match="expected"):
        Device.open(ModelTransport(Params(n_channels=2)), expect=Params(n_channels=4))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"unknown backend 'ssd'.*model"):
        open_transport("ssd")
    with pytest.raises(ValueError, match="only exists inside a cocotb test"):
        open_transport("cocotb")


def test_unmapped_mmio_address_names_the_address():
    with Device.open("model") as dev:
        with pytest.raises(MMIOError, match="0xffc.*DECERR"):
            dev.read32(0xFFC)
        with pytest.raises(MMIOError, match="0x000.*SLVERR"):
            dev.write32(0x000, 1)


def test_configure_table_validates():
    with Device.open("model") as dev:
        with pytest.raises(ValueError, match="row_bytes=6"):
            dev.configure_table(0, 6, "fp32", [(0, 10, 0)])
        with pytest.raises(ValueError, match="table 99"):
            dev.configure_table(99, 8, "fp32", [(0, 10, 0)])
        with pytest.raises(ValueError, match="overlap"):
            dev.configure_table(0, 8, "fp32", [(0, 10, 0), (5, 10, 20)])
        with pytest.raises(ValueError, match="beyond the flash"):
            dev.configure_table(0, 8, "fp32", [(0, 10, dev.params.total_pages)])
        with pytest.raises(ValueError, match="unknown element type"):
            dev.configure_table(0, 8, "bf16", [(0, 10, 0)])
        with pytest.raises(KeyError, match="table 3 is not configured"):
            dev.gather(3, [1])
        dev.configure_table(0, 8, "fp32", [(0, 10, 0)])
        with pytest.raises(IndexError, match="position 1"):
            dev.gather(0, np.array([1, -1]))
        with pytest.raises(ValueError, match="one-dimensional"):
            dev.gather(0, np.zeros((2, 2), np.int64))


def test_counters_count_lookups_and_block_mode_moves_pages():
    params = Params(n_channels=2, page_size=1024, pages_per_channel=64)
    with Device.open(ModelTransport(params)) as dev:
        rng = np.random.default_rng(3)
        data = rng.standard_normal((100, 16)).astype(np.float32)  # 64-byte rows, 16 per page
        pages = np.zeros((7, 1024), np.uint8)
        pages.reshape(-1)[:data.nbytes] = data.view(np.uint8).reshape(-1)
        dev.program_pages(0, pages)
        dev.configure_table(0, 64, "fp32", [(0, 100, 0)])
        idx = rng.integers(0, 100, 40).astype(np.uint32)
        dev.clear_counters()
        np.testing.assert_array_equal(dev.view(0, dev.gather(0, idx)), data[idx])
        fine = dev.counters()
        assert fine["lookups"] == 40 and fine["commands"] == 1
        assert sum(c["rows"] for c in fine["channels"]) == 40
        assert sum(c["bytes"] for c in fine["channels"]) == 40 * 64  # beat-aligned rows: amplification 1.0
        dev.set_block_mode(True)
        dev.clear_counters()
        dev.gather(0, idx)
        block = dev.counters()
        assert sum(c["bytes"] for c in block["channels"]) == 40 * 1024
