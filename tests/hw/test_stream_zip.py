"""StreamZip against a golden model: random items on both inputs with random idle cycles and
back-pressure; paired items come out in lockstep, unpaired ones take the first input alone."""
import numpy as np
import pytest
from amaranth import Module, Signal
from amaranth.sim import Simulator

from evssd.hw.lib.stream_zip import StreamZip

from .streams import receive, send


@pytest.mark.parametrize("pair", [1, 0])
@pytest.mark.parametrize("idle, stall", [(0.0, 0.0), (0.4, 0.5)])
def test_zip_random(pair, idle, stall):
    rng = np.random.default_rng(pair * 10 + int(idle * 10))
    n = 200
    a = [int(x) for x in rng.integers(0, 1 << 16, n)]
    b = [int(x) for x in rng.integers(0, 1 << 12, n)]
    dut = StreamZip(16, 12)
    out = []
    taken_b = []

    async def src_a(ctx):
        await send(ctx, dut.i_a, a, np.random.default_rng(1), idle)

    async def src_b(ctx):
        if pair:
            await send(ctx, dut.i_b, b, np.random.default_rng(2), idle)
        else:    # offered but never to be taken
            ctx.set(dut.i_b.valid, 1)
            ctx.set(dut.i_b.payload, 0x5A5)
            for _ in range(4 * n):
                _, _, ready = await ctx.tick().sample(dut.i_b.ready)
                taken_b.append(ready)

    async def sink(ctx):
        ctx.set(dut.pair, pair)
        await receive(ctx, dut.o, n, np.random.default_rng(3), stall, out)

    top = Module()                   # the zip is combinational: a clock for the testbenches
    top.submodules.dut = dut
    tick = Signal()
    top.d.sync += tick.eq(~tick)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(src_a)
    sim.add_testbench(src_b, background=True)
    sim.add_testbench(sink)
    sim.run()
    assert [int(o.a) for o in out] == a
    assert [int(o.b) for o in out] == (b if pair else [0] * n)
    assert not any(taken_b)
