"""CommandQueue (with HostDMA and the behavioural AXI memory): descriptor layouts vs regmap,
SQ fetch over ring wrap, CQ posting with phase flips, CQ-full back-pressure, irq, reset_queues,
fetch error -> fatal; random stalls on every AXI channel and on o_cmd / i_cpl."""
import random

import pytest
from amaranth import Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from evssd.hw.lib.axi import AXI4Signature
from evssd.hw.device.dma import HostDMA
from evssd.hw.device.queues import (COMMAND_LAYOUT, COMPLETION_LAYOUT, CommandQueue)
from evssd.hw.regmap import Command, Completion, Params

from .axi_mem import AXI4Memory


def test_layouts_match_regmap():
    rng = random.Random(5)
    for _ in range(50):
        c = Command(opcode=rng.randrange(256), table=rng.randrange(256), cid=rng.randrange(1 << 16),
                    count=rng.randrange(1 << 32), n_bags=rng.randrange(1 << 32), lba=rng.randrange(1 << 32),
                    src_addr=rng.randrange(1 << 64), offsets_addr=rng.randrange(1 << 64),
                    dst_addr=rng.randrange(1 << 64), dst_bytes=rng.randrange(1 << 32))
        v = data.Const(COMMAND_LAYOUT, int.from_bytes(c.pack(), "little"))
        for name in ("opcode", "table", "cid", "count", "n_bags", "lba", "src_addr", "offsets_addr",
                     "dst_addr", "dst_bytes"):
            assert getattr(v, name) == getattr(c, name), name
        e = Completion(n_bad=rng.randrange(1 << 32), first_bad=rng.randrange(1 << 32),
                       sq_head=rng.randrange(1 << 16), cid=rng.randrange(1 << 16),
                       phase=rng.randrange(2), status=rng.randrange(256))
        v = data.Const(COMPLETION_LAYOUT, int.from_bytes(e.pack(), "little"))
        for name in ("n_bad", "first_bad", "sq_head", "cid", "phase", "status"):
            assert getattr(v, name) == getattr(e, name), name


class QueueHarness(wiring.Component):
    def __init__(self, params):
        self.params = params
        self.q = CommandQueue(params)
        self.dma = HostDMA(params, n_read=1, n_write=1)
        super().__init__({"m_axi_host": Out(AXI4Signature(addr_width=64, data_width=params.host_data_bits))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.q = self.q
        m.submodules.dma = self.dma
        wiring.connect(m, self.q.o_rd_cmd, self.dma.rd_cmd[0])
        wiring.connect(m, self.dma.rd_data[0], self.q.i_rd_data)
        wiring.connect(m, self.q.o_wr_cmd, self.dma.wr_cmd[0])
        wiring.connect(m, self.q.o_wr_data, self.dma.wr_data[0])
        wiring.connect(m, self.dma.wr_done[0], self.q.i_wr_done)
        wiring.connect(m, self.dma.m_axi_host, wiring.flipped(self.m_axi_host))
        return m


SQ, CQ = 0x1000, 0x3000


@pytest.mark.parametrize("width,stall,seed", [(64, 0.3, 1), (256, 0.4, 2), (512, 0.0, 3)])
def test_queue_roundtrip(width, stall, seed):
    p = Params(host_data_bits=width)
    dut = QueueHarness(p)
    q = dut.q
    mem = AXI4Memory(dut.m_axi_host, size=0x8000, data_width=width, stall=stall, seed=seed,
                     err_ranges=[(0x6000, 0x6040)])
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    mem.add_to(sim)
    rng = random.Random(seed)
    sq_n, cq_n, n_cmds = 4, 4, 11

    async def doorbell(ctx, sig, written, value):
        ctx.set(sig, value)
        ctx.set(written, 1)
        await ctx.tick()
        ctx.set(written, 0)

    async def tb(ctx):
        ctx.set(q.sq_base, SQ)
        ctx.set(q.sq_size, sq_n)
        ctx.set(q.cq_base, CQ)
        ctx.set(q.cq_size, cq_n)
        ctx.set(q.irq_enable, 1)
        await ctx.tick()
        assert ctx.get(q.cq_phase) == 1
        cmds = [Command(opcode=rng.randrange(256), cid=k, count=rng.randrange(1 << 32),
                        src_addr=rng.randrange(1 << 64), dst_bytes=rng.randrange(1 << 32))
                for k in range(n_cmds)]
        tail = 0
        cq_head = 0
        phase = 1
        posted = 0
        fetched = 0
        # Fetching waits for CTRL.enable.
        mem.write_bytes(SQ, cmds[0].pack())
        await doorbell(ctx, q.sq_tail, q.sq_tail_written, 1)
        tail = 1
        for _ in range(30):
            await ctx.tick()
        assert not ctx.get(q.o_cmd.valid) and ctx.get(q.sq_head) == 0
        ctx.set(q.enable, 1)
        while fetched < n_cmds:
            # keep the SQ topped up (one slot stays empty)
            while tail - fetched < sq_n - 1 and tail < n_cmds:
                mem.write_bytes(SQ + (tail % sq_n) * 64, cmds[tail].pack())
                tail += 1
                await doorbell(ctx, q.sq_tail, q.sq_tail_written, tail % sq_n)
            go = rng.random() >= stall
            ctx.set(q.o_cmd.ready, go)
            _, _, valid, payload = await ctx.tick().sample(q.o_cmd.valid, q.o_cmd.payload)
            if not (go and valid):
                continue
            ctx.set(q.o_cmd.ready, 0)
            got = Command.unpack(int(payload.cmd.as_value().value).to_bytes(64, "little"))
            assert got == cmds[fetched]
            fetched += 1
            assert payload.sq_head == fetched % sq_n
            # post its completion; the CQ fills (3 usable entries) before the host consumes
            cpl = Completion(n_bad=rng.randrange(1 << 32), first_bad=rng.randrange(1 << 32),
                             sq_head=fetched % sq_n, cid=got.cid, status=rng.randrange(256))
            for name in ("n_bad", "first_bad", "sq_head", "cid", "status"):
                ctx.set(getattr(q.i_cpl.payload, name), getattr(cpl, name))
            ctx.set(q.i_cpl.valid, 1)
            waited = 0
            while True:
                _, _, ready = await ctx.tick().sample(q.i_cpl.ready)
                if ready:
                    break
                waited += 1
                if waited == 200:
                    # CQ must be full: 3 entries unread; the host now consumes them all
                    assert (posted - cq_head) == cq_n - 1, (posted, cq_head)
                    assert ctx.get(q.irq)
                    for k in range(cq_head, posted):
                        raw = mem.read_bytes(CQ + (k % cq_n) * 16, 16)
                        e = Completion.unpack(raw)
                        assert e.cid == k and e.phase == (1 if (k // cq_n) % 2 == 0 else 0)
                        assert e.n_bad == expect[k].n_bad and e.first_bad == expect[k].first_bad
                        assert e.status == expect[k].status and e.sq_head == expect[k].sq_head
                    cq_head = posted
                    fulls.append(posted)
                    await doorbell(ctx, q.cq_head, q.cq_head_written, cq_head % cq_n)
            ctx.set(q.i_cpl.valid, 0)
            expect.append(cpl)
            posted += 1
        # wait for the last posts, then check them and the wrap state
        for _ in range(300):
            await ctx.tick()
        assert ctx.get(q.cq_tail) == posted % cq_n
        assert ctx.get(q.cq_phase) == (1 if (posted // cq_n) % 2 == 0 else 0)
        for k in range(cq_head, posted):
            e = Completion.unpack(mem.read_bytes(CQ + (k % cq_n) * 16, 16))
            assert e.cid == k and e.status == expect[k].status
        cq_head = posted
        await doorbell(ctx, q.cq_head, q.cq_head_written, cq_head % cq_n)
        await ctx.tick()
        assert not ctx.get(q.irq)
        # a fetch that hits a bus error stops the queue: fatal
        ctx.set(q.sq_base, 0x6000)
        ctx.set(q.reset_queues, 1)
        await ctx.tick()
        ctx.set(q.reset_queues, 0)
        assert ctx.get(q.sq_head) == 0 and ctx.get(q.cq_tail) == 0 and ctx.get(q.cq_phase) == 1
        await doorbell(ctx, q.sq_tail, q.sq_tail_written, 1)
        for _ in range(300):
            await ctx.tick()
        assert ctx.get(q.fatal) and not ctx.get(q.o_cmd.valid) and ctx.get(q.sq_head) == 0

    expect = []
    fulls = []
    sim.add_testbench(tb)
    sim.run()
    assert fulls == [3, 6, 9]
