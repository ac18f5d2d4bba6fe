"""CommandEngine building blocks in amaranth.sim, and EVSSD elaboration over the parameter range.

- ChunkReader: two readers share one HostDMA (the pooled-gather case: indices and offsets
  consumed interleaved) -- bit-exact words, error flags, no deadlock, random stalls everywhere.
- WidthConverter: up and down conversion, random valid/ready stalls, bit-exact stream.
- EVSSD elaborates for n_channels 1..8, host_data_bits 64..512, ch_data_bits 32..512.

The engine's command semantics (validation, probes, emission, fork, result DMA, programs) are
checked end to end in tests/test_rtl_device.py against the functional model and a numpy golden.
"""
import random

import pytest
from amaranth import Fragment, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from evssd.hw.lib.axi import AXI4Signature
from evssd.hw.device.dma import HostDMA
from evssd.hw.device.engine import READ_CHUNK_BYTES
from evssd.hw.lib.chunk_reader import ChunkReader
from evssd.hw.lib.width_converter import WidthConverter
from evssd.hw.regmap import Params

from .axi_mem import AXI4Memory


class ReaderHarness(wiring.Component):
    def __init__(self, params):
        self.dma = HostDMA(params, n_read=2, n_write=1)
        self.r = [ChunkReader(params.host_data_bits, READ_CHUNK_BYTES),
                  ChunkReader(params.host_data_bits, READ_CHUNK_BYTES)]
        super().__init__({"m_axi_host": Out(AXI4Signature(addr_width=64, data_width=params.host_data_bits))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.dma = self.dma
        for i, r in enumerate(self.r):
            m.submodules[f"r{i}"] = r
            wiring.connect(m, r.o_rd_cmd, self.dma.rd_cmd[i])
            wiring.connect(m, self.dma.rd_data[i], r.i_rd_data)
        wiring.connect(m, self.dma.m_axi_host, wiring.flipped(self.m_axi_host))
        return m


@pytest.mark.parametrize("width,stall,seed", [(64, 0.3, 1), (512, 0.4, 2)])
def test_chunk_readers_interleaved(width, stall, seed):
    p = Params(host_data_bits=width)
    dut = ReaderHarness(p)
    mem = AXI4Memory(dut.m_axi_host, size=1 << 15, data_width=width, stall=stall, seed=seed,
                     latency=3, err_ranges=[(0x7000, 0x7040)])
    rng = random.Random(seed)
    mem.mem[:] = rng.randbytes(1 << 15)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    mem.add_to(sim)
    # (addr, words) jobs per reader; reader 1's last job touches the error window
    jobs = [[(0x0000, 300), (0x1000, 1), (0x1040, 37)], [(0x4000, 200), (0x5000, 0), (0x6FC0, 40)]]

    async def tb(ctx):
        for k in range(3):
            for i, r in enumerate(dut.r):
                addr, words = jobs[i][k]
                assert ctx.get(r.idle)
                ctx.set(r.start, 1)
                ctx.set(r.addr, addr)
                ctx.set(r.words, words)
            await ctx.tick()
            for r in dut.r:
                ctx.set(r.start, 0)
            want = [[int.from_bytes(mem.read_bytes(jobs[i][k][0] + 4 * j, 4), "little")
                     for j in range(jobs[i][k][1])] for i in range(2)]
            got = [[], []]
            while len(got[0]) < len(want[0]) or len(got[1]) < len(want[1]):
                # consume from one reader at a time for a while (like the pooled emitter)
                i = rng.randrange(2)
                if len(got[i]) == len(want[i]):
                    continue
                for _ in range(rng.randrange(1, 40)):
                    if len(got[i]) == len(want[i]):
                        break
                    go = rng.random() >= stall
                    ctx.set(dut.r[i].o_word.ready, go)
                    _, _, valid, d, e = await ctx.tick().sample(dut.r[i].o_word.valid,
                                                                dut.r[i].o_word.payload.data,
                                                                dut.r[i].o_word.payload.err)
                    if go and valid:
                        a = jobs[i][k][0] + 4 * len(got[i])
                        assert e == (0x7000 <= a < 0x7040), f"reader {i} word at {a:#x}: err={e}"
                        if not e:
                            assert d == want[i][len(got[i])], f"reader {i} job {k} word {len(got[i])}"
                        got[i].append(d)
                ctx.set(dut.r[i].o_word.ready, 0)
            for _ in range(3):
                await ctx.tick()
            assert ctx.get(dut.r[0].idle) and ctx.get(dut.r[1].idle)
            assert not ctx.get(dut.r[0].o_word.valid) and not ctx.get(dut.r[1].o_word.valid)

    async def watchdog(ctx):
        await ctx.delay(100_000 * 1e-8)
        raise AssertionError("chunk readers hung")

    sim.add_testbench(watchdog, background=True)
    sim.add_testbench(tb)
    sim.run()
    # chunks never exceed 128 bytes, so both readers share the DMA
    assert max(b for _, b in mem.ar_log) * (width // 8) <= 128


@pytest.mark.parametrize("wi,wo", [(64, 64), (256, 32), (64, 512), (128, 64)])
def test_width_converter(wi, wo):
    dut = WidthConverter(wi, wo)
    rng = random.Random(wi * 7 + wo)
    n_in = 64 * max(1, wo // wi)
    beats = [rng.getrandbits(wi) for _ in range(n_in)]
    errs = [int(rng.random() < 0.05) for _ in range(n_in)]
    stream_bits = sum(b << (wi * i) for i, b in enumerate(beats))
    n_out = n_in * wi // wo
    want = [(stream_bits >> (wo * j)) & ((1 << wo) - 1) for j in range(n_out)]
    top = Module()
    top.submodules.dut = dut
    tick = Signal()
    top.d.sync += tick.eq(~tick)   # a sync domain even for the pass-through case
    sim = Simulator(top)
    sim.add_clock(1e-8)

    async def producer(ctx):
        for b, e in zip(beats, errs):
            while rng.random() < 0.3:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
            ctx.set(dut.i.payload.data, b)
            ctx.set(dut.i.payload.err, e)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    got, got_err = [], []

    async def consumer(ctx):
        while len(got) < n_out:
            go = rng.random() >= 0.3
            ctx.set(dut.o.ready, go)
            _, _, valid, d, e = await ctx.tick().sample(dut.o.valid, dut.o.payload.data, dut.o.payload.err)
            if go and valid:
                got.append(d)
                got_err.append(e)

    sim.add_testbench(producer)
    sim.add_testbench(consumer)
    sim.run()
    assert got == want
    # an output beat carries err when any input beat it came from had it (up) / its input had it (down)
    if wo >= wi:
        r = wo // wi
        assert got_err == [int(any(errs[j * r:(j + 1) * r])) for j in range(n_out)]
    else:
        r = wi // wo
        assert got_err == [errs[j // r] for j in range(n_out)]


@pytest.mark.parametrize("n,wh,wc", [(1, 64, 32), (2, 512, 512), (3, 128, 64), (5, 64, 256),
                                     (8, 256, 128), (8, 64, 512)])
def test_device_elaborates(n, wh, wc):
    from evssd.hw.device.top import EVSSD
    p = Params(n_channels=n, host_data_bits=wh, ch_data_bits=wc, page_size=1024, max_tables=4,
               max_extents=2, ways=2, max_row_bytes=256, pages_per_channel=64)
    dut = EVSSD(p)
    Fragment.get(dut, None)
    assert [f"m_axi_ch{c}" for c in range(n)] == [k for k in dut.signature.members if k.startswith("m_axi_ch")]
