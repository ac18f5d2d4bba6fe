"""Fuzz the command path on the functional model: thousands of random descriptors, valid and
invalid (sim/fuzz.py); each completes with the status Status's rules give, writes only its
result, and the device serves ordinary requests afterwards."""
import asyncio

import numpy as np
import pytest

from evssd.hw.regmap import Params
from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.sim.fuzz import fuzz_commands


@pytest.mark.parametrize("params,seed", [
    (Params(n_channels=2, page_size=1024, pages_per_channel=64, max_tables=4, max_extents=3), 1),
    (Params(n_channels=3, page_size=512, pages_per_channel=64, max_row_bytes=256), 2),
], ids=["2ch-1k", "3ch-512"])
def test_fuzz_command_path_on_the_model(params, seed):
    async def main():
        dev = await AsyncDevice.open(ModelTransport(params, host_memory_bytes=1 << 20),
                                     sq_entries=8, cq_entries=8)
        return await fuzz_commands(dev, np.random.default_rng(seed), 2000)
    stats = asyncio.run(main())
    assert stats.commands == 2000
    # the stream reached every status the device can give here
    assert set(stats.statuses) >= {"OK", "BAD_INDEX", "TABLE_DISABLED", "BAD_OPCODE", "BUS_ERROR",
                                   "RESULT_OVERFLOW", "BAD_LBA", "BAD_OFFSETS", "BAD_ADDRESS"}, stats
