"""LinearFTL and ChannelDemux against ftl_model, random stalls on every stream."""
from __future__ import annotations

import random

import pytest
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.sim import Simulator

from evssd.hw.device.channel import read_request_layout
from evssd.hw.device.ftl import ChannelDemux, LinearFTL, ftl_model, request_layout
from evssd.hw.regmap import Params

from .streams import send


def random_lbas(rng, n):
    edge = [0, 1, 2, 3, 5, 6, 7, 8, (1 << 32) - 1, (1 << 32) - 2, (1 << 32) - 7, 0x7FFF_FFFF]
    return [rng.choice(edge) if rng.random() < 0.2 else rng.randrange(1 << 32) for _ in range(n)]


@pytest.mark.parametrize("n_channels", [1, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("idle,stall", [(0.0, 0.0), (0.5, 0.5)])
def test_ftl_matches_model(n_channels, idle, stall):
    params = Params(n_channels=n_channels)
    tag_width = 5
    rng = random.Random(n_channels * 10 + int(idle * 10))
    n = 300
    reqs = [{"lba": lba, "offset": rng.randrange(1 << 16), "row_bytes": rng.randrange(1 << 16),
             "tag": rng.randrange(1 << tag_width)} for lba in random_lbas(rng, n)]
    dut = LinearFTL(params, tag_width)
    got = []
    cycles = {}

    async def sink(ctx):
        cycle = 0
        while len(got) < n:
            ready = rng.random() >= stall
            ctx.set(dut.o_req.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.o_req.valid, dut.o_req.payload)
            cycle += 1
            if ready and valid:
                got.append(payload)
        cycles["n"] = cycle

    async def src(ctx):
        await send(ctx, dut.i_req, reqs, random.Random(7), idle)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(sink)
    sim.add_testbench(src, background=True)
    sim.run()
    for req, out in zip(reqs, got):
        ch, page = ftl_model(params, req["lba"])
        assert (out.channel, out.page) == (ch, page), f"lba {req['lba']:#x}"
        assert (out.offset, out.row_bytes, out.tag) == (req["offset"], req["row_bytes"], req["tag"])
    if idle == 0 and stall == 0:
        assert cycles["n"] == n + 1   # one per cycle plus the register stage


class _FTLWithDemux(wiring.Component):
    def __init__(self, params, tag_width):
        self.ftl = LinearFTL(params, tag_width)
        self.demux = ChannelDemux(params, tag_width)
        super().__init__({
            "i_req": wiring.In(stream.Signature(request_layout(tag_width))),
            "o_read": wiring.Out(stream.Signature(read_request_layout(tag_width))).array(
                params.n_channels),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.ftl = self.ftl
        m.submodules.demux = self.demux
        wiring.connect(m, wiring.flipped(self.i_req), self.ftl.i_req)
        wiring.connect(m, self.ftl.o_req, self.demux.i_req)
        for outer, inner in zip(self.o_read, self.demux.o_read):
            wiring.connect(m, inner, wiring.flipped(outer))
        return m


@pytest.mark.parametrize("n_channels", [1, 3, 4, 8])
def test_demux_routes_each_request_to_its_channel(n_channels):
    params = Params(n_channels=n_channels)
    tag_width = 8
    rng = random.Random(n_channels)
    n = 250
    reqs = [{"lba": rng.randrange(params.total_pages), "offset": 4 * rng.randrange(1024),
             "row_bytes": 4 * rng.randrange(1, 1024), "tag": k % 256} for k in range(n)]
    dut = _FTLWithDemux(params, tag_width)
    got = [[] for _ in range(n_channels)]

    def sink(c):
        async def proc(ctx):
            srng = random.Random(100 + c)
            strm = dut.o_read[c]
            while True:
                ready = srng.random() >= 0.4
                ctx.set(strm.ready, ready)
                _, _, valid, payload = await ctx.tick().sample(strm.valid, strm.payload)
                if ready and valid:
                    got[c].append(payload)
        return proc

    async def src(ctx):
        await send(ctx, dut.i_req, reqs, random.Random(3), 0.3)
        for _ in range(20):
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for c in range(n_channels):
        sim.add_testbench(sink(c), background=True)
    sim.add_testbench(src)
    sim.run()
    for c in range(n_channels):
        want = [r for r in reqs if r["lba"] % n_channels == c]
        assert len(got[c]) == len(want), f"channel {c}"
        for r, o in zip(want, got[c]):
            assert (o.page, o.offset, o.length, o.tag) == (
                r["lba"] // n_channels, r["offset"], r["row_bytes"], r["tag"])
