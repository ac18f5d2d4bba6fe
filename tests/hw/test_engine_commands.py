"""CommandEngine command semantics in amaranth.sim, with the real HostDMA over the behavioural AXI
memory and Python models of the translator, the FTL sink and the merger (random stalls on every
stream): validation statuses, bad-index accounting, pooled bags (empty ones, offsets[0] > 0),
ROB credits (4 slots for up to 40 lookups), several commands in flight, result bytes in host
memory bit-exact and nothing written past them or for failed commands."""
import random
from collections import deque

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from evssd.hw.lib.axi import AXI4Signature
from evssd.hw.device.dma import HostDMA
from evssd.hw.device.engine import CommandEngine
from evssd.hw.regmap import (NO_BAD_POSITION, Command, ElemType, Opcode, Params, Status,
                             pooled_row_bytes)

from .axi_mem import AXI4Memory

ROW = 16          # table 0: fp32, 16-byte rows, indices < GOOD translate
GOOD = 100
SLOTS = 4
ERR_LO, ERR_HI = 0xF000, 0xF100   # host memory that answers SLVERR


def xlat(table, index):
    """(status, lba, offset, row_bytes, elem) of the translator model."""
    if table == 0:
        if index < GOOD:
            return 0, index // 4, (index % 4) * ROW, ROW, ElemType.FP32
        if index < GOOD + 10:
            return 3, 9999, 0, ROW, ElemType.FP32          # page outside the flash
        return 1, 0, 0, ROW, ElemType.FP32
    if table == 2:
        return (0 if index < GOOD else 1), index // 2, (index % 2) * 8, 8, ElemType.INT8
    return 2, 0, 0, ROW if table == 1 else 0, ElemType.FP32


def row_pattern(lba, offset, n):
    return bytes(((lba * 7 + offset + k) & 0xFF) for k in range(n))


class Harness(wiring.Component):
    def __init__(self, p):
        self.eng = CommandEngine(p, SLOTS)
        self.dma = HostDMA(p, n_read=3, n_write=1)
        super().__init__({"m_axi_host": Out(AXI4Signature(addr_width=64, data_width=p.host_data_bits))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.eng, m.submodules.dma = e, d = self.eng, self.dma
        wiring.connect(m, e.o_idx_cmd, d.rd_cmd[0])
        wiring.connect(m, d.rd_data[0], e.i_idx_data)
        wiring.connect(m, e.o_off_cmd, d.rd_cmd[1])
        wiring.connect(m, d.rd_data[1], e.i_off_data)
        wiring.connect(m, e.o_pg_cmd, d.rd_cmd[2])
        wiring.connect(m, d.rd_data[2], e.i_pg_data)
        wiring.connect(m, e.o_res_cmd, d.wr_cmd[0])
        wiring.connect(m, e.o_res_data, d.wr_data[0])
        wiring.connect(m, d.wr_done[0], e.i_res_done)
        wiring.connect(m, d.m_axi_host, wiring.flipped(self.m_axi_host))
        return m


def golden(cmd, mem):
    """(status, n_bad, first_bad, result bytes or None) for a command."""
    if cmd.opcode not in (0, 1, 2, 0x10, 0x11):
        return Status.BAD_OPCODE, 0, NO_BAD_POSITION, None
    if cmd.opcode == Opcode.NOP:
        return Status.OK, 0, NO_BAD_POSITION, None
    addrs = [cmd.src_addr, cmd.dst_addr] + ([cmd.offsets_addr] if cmd.opcode == Opcode.GATHER_POOLED else [])
    if any(a % 64 for a in addrs):
        return Status.BAD_ADDRESS, 0, NO_BAD_POSITION, None
    st, _, _, rb, elem = xlat(cmd.table, 0)
    if st == 2 or rb == 0:
        return Status.TABLE_DISABLED, 0, NO_BAD_POSITION, None
    pooled = cmd.opcode == Opcode.GATHER_POOLED
    out_row = pooled_row_bytes(rb, elem) if pooled else rb
    out_bytes = out_row * (cmd.n_bags if pooled else cmd.count)
    if out_bytes > cmd.dst_bytes:
        return Status.RESULT_OVERFLOW, 0, NO_BAD_POSITION, None
    idx = [int.from_bytes(mem[cmd.src_addr + 4 * k:cmd.src_addr + 4 * k + 4], "little") for k in range(cmd.count)]
    if pooled:
        offs = [int.from_bytes(mem[cmd.offsets_addr + 4 * k:cmd.offsets_addr + 4 * k + 4], "little")
                for k in range(cmd.n_bags + 1)]
        if any(b < a for a, b in zip(offs, offs[1:])) or offs[-1] > cmd.count:
            return Status.BAD_OFFSETS, 0, NO_BAD_POSITION, None
        bags = [range(offs[b], offs[b + 1]) for b in range(cmd.n_bags)]
    else:
        bags = [[k] for k in range(cmd.count)]
    n_bad, first_bad, worst, out = 0, NO_BAD_POSITION, Status.OK, b""
    for bag in bags:
        acc, n_good = 0, 0
        for pos in bag:
            s, lba, off, rb_, _ = xlat(cmd.table, idx[pos])
            if s:
                n_bad += 1
                first_bad = pos if first_bad == NO_BAD_POSITION else first_bad
                worst = Status.BAD_INDEX if s == 1 else (Status.BAD_LBA if worst != Status.BAD_INDEX else worst)
                if not pooled:
                    out += bytes(rb)
            elif pooled:
                acc += lba + off
                n_good += 1
            else:
                out += row_pattern(lba, off, rb)
        if pooled:
            out += bytes([(n_good * 17 + acc) & 0xFF]) * out_row
    return worst, n_bad, first_bad, (out if out_bytes else None)


@pytest.mark.parametrize("width,stall,seed", [(64, 0.3, 1), (256, 0.2, 2), (512, 0.5, 3), (128, 0.0, 4)])
def test_engine_commands(width, stall, seed):
    p = Params(host_data_bits=width, ch_data_bits=64, n_channels=2, max_inflight=3)
    dut = Harness(p)
    e = dut.eng
    mem = AXI4Memory(dut.m_axi_host, size=1 << 16, data_width=width, stall=stall, seed=seed, latency=2,
                     err_ranges=[(ERR_LO, ERR_HI)])
    rng = random.Random(seed)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    mem.add_to(sim)

    # ---- commands
    cmds = []
    heap = [0x100]

    def alloc(n):
        a = heap[0]
        heap[0] += (n + 63) // 64 * 64 + 64
        return a

    def put(blob):
        a = alloc(len(blob))
        mem.write_bytes(a, blob)
        return a

    def idx_list(n, bad=0.15):
        out = []
        for _ in range(n):
            r = rng.random()
            out.append(rng.randrange(GOOD) if r > bad else rng.choice([GOOD + 3, GOOD + 50, 0xFFFFFFFF]))
        return out

    def gather(n, table=0, **kw):
        idx = idx_list(n)
        src = put(b"".join(i.to_bytes(4, "little") for i in idx) or bytes(4))
        rb = 8 if table == 2 else ROW
        dst = alloc(max(n * rb, 64))
        fields = dict(opcode=Opcode.GATHER, table=table, count=n, src_addr=src, dst_addr=dst, dst_bytes=n * rb)
        fields.update(kw)
        return Command(**fields)

    def pooled(sizes, start=0, extra=0, table=0, offsets=None):
        count = start + sum(sizes) + extra
        idx = idx_list(count)
        src = put(b"".join(i.to_bytes(4, "little") for i in idx) or bytes(4))
        if offsets is None:
            offsets = [start]
            for s in sizes:
                offsets.append(offsets[-1] + s)
        off = put(b"".join(o.to_bytes(4, "little") for o in offsets))
        elem_rb = pooled_row_bytes(8, ElemType.INT8) if table == 2 else ROW
        nb = len(offsets) - 1
        dst = alloc(max(nb * elem_rb, 64))
        return Command(opcode=Opcode.GATHER_POOLED, table=table, count=count, n_bags=nb, src_addr=src,
                       offsets_addr=off, dst_addr=dst, dst_bytes=nb * elem_rb)

    cmds += [gather(40), gather(1), pooled([2, 0, 3, 1]), gather(7, table=2),
             pooled([0, 0]), pooled([3, 5, 0, 2], start=2, extra=3, table=2),
             Command(opcode=0x7F), Command(opcode=Opcode.NOP),
             gather(5, table=1), gather(5, table=9), gather(5, src_addr=0x104),
             gather(6, dst_bytes=6 * ROW - 1), pooled([1, 1], offsets=[0, 3, 1]),
             pooled([1, 1], offsets=[0, 1, 5]), gather(0), gather(33), pooled([4] * 6)]
    # bus errors: an index list (rows are still written: found while streaming) and an offsets
    # list (found in the validation pass: nothing written)
    bus_err = [gather(6, src_addr=ERR_LO), pooled([2, 2], offsets=None)]
    bus_err[1].offsets_addr = ERR_LO + 0x80
    cmds += bus_err
    for _ in range(10):   # a random tail: more overlap between commands
        if rng.random() < 0.5:
            cmds.append(gather(rng.randrange(1, 24), table=rng.choice([0, 2])))
        else:
            cmds.append(pooled([rng.choice([0, 1, 2, 5]) for _ in range(rng.randrange(1, 6))],
                               start=rng.choice([0, 1]), table=rng.choice([0, 2])))
    for c, cmd in enumerate(cmds):
        cmd.cid = c
    # fill every result buffer with a marker: untouched bytes must keep it
    for cmd in cmds:
        if cmd.dst_addr:
            mem.write_bytes(cmd.dst_addr, b"\x5A" * (max(cmd.dst_bytes, 64) + 64))
    snapshot = bytes(mem.mem)
    expect = [golden(cmd, snapshot) for cmd in cmds]
    for k, cmd in enumerate(cmds):
        if cmd in bus_err:
            expect[k] = (Status.BUS_ERROR, 0, NO_BAD_POSITION, None)

    # ---- translator model: in order, a few cycles of latency, random stalls both ways
    xq = deque()
    stats = {"lookups": 0, "max_inflight": 0}

    async def translator_in(ctx):
        while True:
            go = rng.random() >= stall and len(xq) < 6
            ctx.set(e.o_xlat.ready, go)
            _, _, valid, table, index = await ctx.tick().sample(e.o_xlat.valid, e.o_xlat.payload.table,
                                                                e.o_xlat.payload.index)
            if go and valid:
                xq.append(xlat(table, index))

    async def translator_out(ctx):
        while True:
            if not xq or rng.random() < stall:
                ctx.set(e.i_xlat.valid, 0)
                await ctx.tick()
                continue
            s, lba, off, rb, elem = xq[0]
            pl = e.i_xlat.payload
            for name, v in (("status", s), ("lba", lba), ("offset", off), ("row_bytes", rb), ("elem", elem)):
                ctx.set(getattr(pl, name), v)
            ctx.set(e.i_xlat.valid, 1)
            _, _, ready = await ctx.tick().sample(e.i_xlat.ready)
            if ready:
                xq.popleft()

    # ---- FTL sink: remembers each slot's (lba, offset) for the merger model
    by_slot = {}

    async def ftl(ctx):
        while True:
            go = rng.random() >= stall
            ctx.set(e.o_ftl.ready, go)
            _, _, valid, lba, off, rb, tag = await ctx.tick().sample(
                e.o_ftl.valid, e.o_ftl.payload.lba, e.o_ftl.payload.offset, e.o_ftl.payload.row_bytes,
                e.o_ftl.payload.tag)
            if go and valid:
                assert tag not in by_slot, f"slot {tag} reused before it was freed"
                by_slot[tag] = (lba, off, rb)

    # ---- merger model: descriptors in order -> packed bytes per command, slots freed in order
    out_q = deque()   # beats (data, last)
    free_q = deque()

    async def merger_desc(ctx):
        buf = b""
        acc, n_good = 0, 0
        while True:
            go = rng.random() >= stall and len(out_q) < 8
            ctx.set(e.o_desc.ready, go)
            _, _, valid, d = await ctx.tick().sample(e.o_desc.valid, e.o_desc.payload)
            if not (go and valid):
                continue
            if d.empty_bag:
                buf += bytes(pooled_row_bytes(d.row_bytes, ElemType(d.elem)))
            else:
                if not d.bad:
                    # not ready while waiting for the FTL request: a descriptor offered in the
                    # meantime must not be taken (and lost)
                    ctx.set(e.o_desc.ready, 0)
                    while d.slot not in by_slot:
                        await ctx.tick()
                    lba, off, rb = by_slot.pop(d.slot)
                    assert rb == d.row_bytes
                else:
                    assert d.slot not in by_slot, "bad lookup was sent to the FTL"
                free_q.append(d.slot)
                if d.pooled:
                    if not d.bad:
                        acc += lba + off
                        n_good += 1
                    if d.bag_end:
                        buf += bytes([(n_good * 17 + acc) & 0xFF]) * pooled_row_bytes(d.row_bytes, ElemType(d.elem))
                        acc, n_good = 0, 0
                else:
                    buf += bytes(d.row_bytes) if d.bad else row_pattern(lba, off, d.row_bytes)
            if d.cmd_end:
                bb = width // 8
                buf += bytes(-len(buf) % bb)
                for k in range(0, len(buf), bb):
                    out_q.append((int.from_bytes(buf[k:k + bb], "little"), k + bb == len(buf)))
                buf = b""

    async def merger_out(ctx):
        while True:
            slot = free_q.popleft() if free_q and rng.random() >= stall else None
            ctx.set(e.i_free.valid, slot is not None)
            ctx.set(e.i_free.payload, slot or 0)
            if not out_q or rng.random() < stall:
                ctx.set(e.i_out.valid, 0)
                await ctx.tick()
                continue
            data, last = out_q[0]
            ctx.set(e.i_out.payload.data, data)
            ctx.set(e.i_out.payload.last, last)
            ctx.set(e.i_out.payload.err, 0)
            ctx.set(e.i_out.valid, 1)
            _, _, ready = await ctx.tick().sample(e.i_out.ready)
            ctx.set(e.i_free.valid, 0)
            if ready:
                out_q.popleft()

    async def lookups(ctx):
        async for _, _, ev, infl in ctx.tick().sample(e.ev_lookup, e.inflight):
            stats["lookups"] += ev
            stats["max_inflight"] = max(stats["max_inflight"], infl)

    # ---- queue model: feed commands, collect completions
    cpls = []

    async def feeder(ctx):
        for c, cmd in enumerate(cmds):
            while rng.random() < stall:
                await ctx.tick()
            ctx.set(e.i_cmd.payload.as_value(), int.from_bytes(cmd.pack(), "little") | (((c + 1) & 0xFFFF) << 512))
            ctx.set(e.i_cmd.valid, 1)
            await ctx.tick().until(e.i_cmd.ready)
            ctx.set(e.i_cmd.valid, 0)

    async def collector(ctx):
        while len(cpls) < len(cmds):
            go = rng.random() >= stall
            ctx.set(e.o_cpl.ready, go)
            _, _, valid, c = await ctx.tick().sample(e.o_cpl.valid, e.o_cpl.payload)
            if go and valid:
                cpls.append((c.cid, c.status, c.n_bad, c.first_bad, c.sq_head))

    async def watchdog(ctx):
        await ctx.delay(200_000 * 1e-8)
        raise AssertionError(f"engine hung after {len(cpls)} completions: {cpls[-3:]}")

    for proc in (translator_in, translator_out, ftl, merger_desc, merger_out, lookups, feeder, watchdog):
        sim.add_testbench(proc, background=True)
    sim.add_testbench(collector)
    sim.run()

    assert [c[0] for c in cpls] == list(range(len(cmds))), "completions out of order"
    for cmd, (cid, status, n_bad, first_bad, sq_head), (w_status, w_nbad, w_fbad, w_out) in zip(cmds, cpls, expect):
        assert (status, n_bad, first_bad) == (w_status, w_nbad, w_fbad), f"cid {cid} ({cmd})"
        assert sq_head == (cid + 1) & 0xFFFF
        if cmd is bus_err[0]:
            # index words read as zeros: index 0's row repeated, and nothing past the result
            region = mem.read_bytes(cmd.dst_addr, max(cmd.dst_bytes, 64) + 64)
            assert region[:cmd.dst_bytes] == row_pattern(0, 0, ROW) * cmd.count
            assert region[cmd.dst_bytes:] == b"\x5A" * (len(region) - cmd.dst_bytes)
        elif cmd.dst_addr:
            region = mem.read_bytes(cmd.dst_addr, max(cmd.dst_bytes, 64) + 64)
            n = len(w_out) if (w_out is not None and status in (Status.OK, Status.BAD_INDEX, Status.BAD_LBA)) else 0
            assert region[:n] == (w_out or b"")[:n], f"cid {cid}: result bytes"
            assert region[n:] == b"\x5A" * (len(region) - n), f"cid {cid}: wrote outside its result"
    used = sum(c.count if c.opcode == Opcode.GATHER else 0 for c, x in zip(cmds, expect) if x[3] is not None)
    used += sum(int.from_bytes(snapshot[c.offsets_addr + 4 * c.n_bags:c.offsets_addr + 4 * c.n_bags + 4], "little")
                - int.from_bytes(snapshot[c.offsets_addr:c.offsets_addr + 4], "little")
                for c, x in zip(cmds, expect) if c.opcode == Opcode.GATHER_POOLED and x[3] is not None)
    used += bus_err[0].count
    assert stats["lookups"] == used
    assert stats["max_inflight"] >= 2, "commands never overlapped"
    assert not by_slot and not free_q
