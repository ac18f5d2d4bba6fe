"""cocotb bench: the command-path fuzzer (:mod:`evssd.sim.fuzz`) on the RTL, the functional model
running every descriptor in lockstep; random stalls on every AXI channel.

Addresses stay inside the host window: the bench's AxiRam decodes addresses modulo its size, so
an address outside the window would alias host memory instead of answering DECERR (the model
fuzz covers those).
"""
from __future__ import annotations

import os
import random

import cocotb
import numpy as np

from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.sim.fuzz import fuzz_commands
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, quiet_cocotbext_axi, start_clock_and_reset

STALL = float(os.environ.get("EVSSD_STALL", "0.25"))


@cocotb.test()
async def fuzz_against_model(dut):
    p = load_meta()["params"]
    seed = int(os.environ.get("EVSSD_SEED", "1"))
    n = int(os.environ.get("EVSSD_FUZZ_COMMANDS", "300"))
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_memory_bytes=1 << 20, poll_cycles=32, params=p)
    transport.set_backpressure(random.Random(seed), STALL)
    quiet_cocotbext_axi()
    dev = await AsyncDevice.open(transport, expect=p, sq_entries=8, cq_entries=8, timeout=600.0)
    twin = await AsyncDevice.open(ModelTransport(p, host_memory_bytes=1 << 20), sq_entries=8, cq_entries=8)
    for d in (dev, twin):
        await d.set_timing(t_r=20, t_prog=40)
    stats = await fuzz_commands(dev, np.random.default_rng(seed), n, twin=twin, in_window_only=True,
                                max_count=12, check_every=100)
    dut._log.warning(f"fuzz: {stats}")
    assert stats.commands == n
