"""AxiLiteExecutor (the AXI4-Lite side both board bridges share) against a golden model: random
READ and WRITE requests of 1..MAX_WORDS words over RAM, SLVERR and DECERR regions, random byte
strobes, random idle cycles on the requests and back-pressure on the read words and completions,
an AXI4-Lite slave with random stalls; the memory afterwards, the read words with their
indices, each request's first non-OKAY response and the bus-error pulses must be the model's."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.boards.axil_executor import AxiLiteExecutor
from evssd.hw.bridge_protocol import MAX_WORDS

from .axil_models import LiteMemory, axil_slave
from .streams import receive, send


def _stimulus(rng, n):
    cmds, bufs = [], []
    for _ in range(n):
        words = rng.choice([1, 1, 2, 3, 7, rng.randrange(1, 40), MAX_WORDS])
        base = rng.choice([rng.randrange(0, 0x1000 - 4 * words + 1) & ~3,
                           0x4000_0000 - 8, 0x8000_0000 - 4, 0x4000_0100, 0x8000_0040])
        cmds.append({"write": rng.random() < 0.5, "addr": base, "n_words_m1": words - 1,
                     "strb": rng.choice([0xF, 0xF, rng.randrange(16)])})
        bufs.append([rng.getrandbits(32) for _ in range(MAX_WORDS)])
    return cmds, bufs


def _model(cmds, bufs):
    mem = LiteMemory()
    rdata, dones, n_err = [], [], 0
    for c, buf in zip(cmds, bufs):
        first = 0
        for k in range(c["n_words_m1"] + 1):
            a = c["addr"] + 4 * k
            if c["write"]:
                r = mem.write(a, buf[k], c["strb"])
            else:
                d, r = mem.read(a)
                rdata.append((d, k))
            n_err += r != 0
            first = first or r
        dones.append(first)
    return mem.words, rdata, dones, n_err


@pytest.mark.parametrize("idle,stall,seed", [(0.0, 0.0, 1), (0.3, 0.4, 2), (0.5, 0.2, 3)])
def test_executor_random(idle, stall, seed, n=30):
    rng = random.Random(seed)
    cmds, bufs = _stimulus(rng, n)
    want_mem, want_rdata, want_done, want_err = _model(cmds, bufs)
    dut = AxiLiteExecutor()
    mem = LiteMemory()
    got_rdata, got_done = [], []
    n_err = [0]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for tb in axil_slave(dut.m_axil, mem, random.Random(seed + 1), stall > 0):
        sim.add_testbench(tb, background=True)

    async def wbuf(ctx):
        """The bridge's request buffer: a read port of one cycle latency, holding the buffer of
        the request in execution (requests complete in order, one at a time)."""
        async for _, _, addr, err in ctx.tick().sample(dut.wbuf_addr, dut.bus_error):
            ctx.set(dut.wbuf_data, bufs[min(len(got_done), n - 1)][addr])
            n_err[0] += err

    async def cmds_in(ctx):
        await send(ctx, dut.i_cmd, cmds, random.Random(seed + 2), idle)

    async def rdata_out(ctx):
        await receive(ctx, dut.o_rdata, len(want_rdata), random.Random(seed + 3), stall, got_rdata)

    async def done_out(ctx):
        await receive(ctx, dut.o_done, n, random.Random(seed + 4), stall, got_done)

    async def until_done(ctx):      # a bound on the cycles, so a stuck executor fails, not hangs
        for _ in range(60 * sum(c["n_words_m1"] + 1 for c in cmds) + 1000):
            if len(got_done) == n:
                break
            await ctx.tick()
        await ctx.tick().repeat(4)

    for tb in (wbuf, cmds_in, rdata_out, done_out):
        sim.add_testbench(tb, background=True)
    sim.add_testbench(until_done)
    sim.run()

    assert len(got_done) == n, f"{len(got_done)} of {n} requests completed"
    assert [(r.data, r.index) for r in got_rdata] == want_rdata
    assert [d.resp for d in got_done] == want_done
    assert mem.words == want_mem
    assert n_err[0] == want_err
    assert {0, 2, 3} <= set(want_done) and want_mem


def test_executor_signature_widths():
    """A request's word count and a read word's index span the protocols' MAX_WORDS exactly."""
    dut = AxiLiteExecutor()
    dut._MustUse__silence = True    # only its signature is looked at
    assert 1 << len(dut.i_cmd.payload.n_words_m1) == MAX_WORDS
    assert 1 << len(dut.o_rdata.payload.index) == MAX_WORDS
