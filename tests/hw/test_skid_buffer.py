"""SkidBuffer and RegisterStage: every beat passes once, in order, under random valid/ready
stalls; full rate."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.lib.register_stage import RegisterStage
from evssd.hw.lib.skid_buffer import SkidBuffer


def _run(p_valid, p_ready, n=300, seed=1, cls=SkidBuffer):
    dut = cls(16)
    rng = random.Random(seed)
    sent = [rng.randrange(1 << 16) for _ in range(n)]
    got = []
    cycles = [0]

    async def src(ctx):
        for v in sent:
            ctx.set(dut.i.payload, v)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            while rng.random() > p_valid:
                await ctx.tick()

    async def sink(ctx):
        while len(got) < n:
            ready = rng.random() < p_ready
            ctx.set(dut.o.ready, ready)
            # a testbench reads settled values: this is the handshake of the coming edge
            if ready and ctx.get(dut.o.valid):
                got.append(ctx.get(dut.o.payload))
            await ctx.tick()
            cycles[0] += 1
        ctx.set(dut.o.ready, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(src, background=True)
    sim.add_testbench(sink)
    sim.run()
    return sent, got, cycles[0]


@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.4), (0.6, 0.6)])
def test_skid_buffer_order(p_valid, p_ready):
    sent, got, cycles = _run(p_valid, p_ready)
    assert got == sent


def test_skid_buffer_full_rate():
    sent, got, cycles = _run(1.0, 1.0)
    assert got == sent
    assert cycles <= len(sent) + 3


@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.4), (0.6, 0.6)])
def test_register_stage_order(p_valid, p_ready):
    sent, got, cycles = _run(p_valid, p_ready, seed=2, cls=RegisterStage)
    assert got == sent


def test_register_stage_full_rate():
    sent, got, cycles = _run(1.0, 1.0, cls=RegisterStage)
    assert got == sent
    assert cycles <= len(sent) + 2
