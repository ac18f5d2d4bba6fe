"""The flash channel controller's stages, each alone against a golden model under random idle
cycles and back-pressure: RowRealigner (row bytes from R beats), BurstIssuer (AR bursts and
descriptors in order, AR only after tR), PageRegisters (cycle by cycle against a Python model of
its registers), ReadIntake (planned reads in order; claims as WayModel says) and
ChannelProgrammer (pages written, invalidations, errors, reads fenced off)."""
from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.device.burst_issuer import BurstIssuer
from evssd.hw.device.channel import WayModel
from evssd.hw.device.channel_plan import ChannelGeometry
from evssd.hw.device.channel_programmer import ChannelProgrammer
from evssd.hw.device.page_registers import PageRegisters
from evssd.hw.device.read_intake import ReadIntake
from evssd.hw.device.row_realigner import RowRealigner
from evssd.hw.regmap import Params

from .axi_mem import AXI4Memory
from .streams import receive, send
from .test_channel import expected_bursts

CONFIGS = {
    "ch32-w1": (Params(ch_data_bits=32, ways=1, page_size=2048, pages_per_channel=16), 3),
    "ch64-w4": (Params(ch_data_bits=64, ways=4, page_size=1024, pages_per_channel=32), 8),
    "ch256-w2": (Params(ch_data_bits=256, ways=2, page_size=8192, pages_per_channel=8), 5),
}


# ------------------------------------------------------------------ golden plan of a read
def flags(cnt, rq):
    s0 = rq["shift"] == 0
    relevant = rq["skip"] <= cnt < rq["skip_end"]
    at_skip = cnt == rq["skip"]
    at_flush = cnt == rq["flush_at"]
    at_total_m1 = cnt == rq["total_m1"]
    return {"relevant": relevant, "at_skip": at_skip, "last_emit": cnt == rq["last_at"],
            "at_flush": at_flush, "at_total_m1": at_total_m1, "at_total": cnt == rq["total"],
            "emit": relevant and (s0 or not at_skip), "need_flush": rq["flushes"] and at_flush,
            "ends": rq["ends_r"] and at_total_m1}


def plan(g: ChannelGeometry, page, offset, length, tag, way, block):
    """(pend entry, R-side descriptor) of a read, as the intake plans it."""
    B, W = g.beat_bytes, g.words
    start, end = offset // B, (offset + length - 1) // B
    nb = end - start + 1
    skip = start if block else 0
    shift = (offset >> 2) % W if W > 1 else 0
    lmod = (length >> 2) % W if W > 1 else 0
    total = g.page_beats if block else nb
    n_out = -(-length // B)
    flushes = shift != 0 and length % B != 0 and 4 * shift + length % B <= B
    rq = {"way": way, "tag": tag, "skip": skip, "n_in": nb, "n_out": n_out, "total": total,
          "shift": shift, "lmod": lmod, "skip_end": skip + nb,
          "last_at": skip + n_out - (shift == 0), "flush_at": skip + nb - 1,
          "total_m1": total - 1, "flushes": flushes,
          "ends_r": (not flushes) or (block and end % g.page_beats != g.page_beats - 1)}
    return {"page": page, "start_b": start, "nb_fine": nb, "rq": rq}


def random_read(g, rng, block, max_len=400):
    p = g.params
    length = 4 * rng.randint(1, min(p.page_size, max_len) // 4)
    offset = 4 * rng.randint(0, (p.page_size - length) // 4)
    return (rng.randrange(p.pages_per_channel), offset, length, rng.randrange(1 << g.tag_width),
            rng.randrange(g.ways), block)


def sim_run(dut, *benches, background=()):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for b in background:
        sim.add_testbench(b, background=True)
    for b in benches:
        sim.add_testbench(b)
    sim.run()


# ------------------------------------------------------------------ RowRealigner
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("block", [False, True])
def test_row_realigner(name, block):
    params, tw = CONFIGS[name]
    g = ChannelGeometry(params, tw)
    rng = random.Random(hash((name, block)) & 0xFFFF)
    B = g.beat_bytes
    dut = RowRealigner(g)
    reads = [random_read(g, rng, block) for _ in range(6 if block else 24)]
    reads.append((1, 0, params.page_size, 1, 0, block))
    descs, beats, want = [], [], []
    for page, offset, length, tag, way, blk in reads:
        e = plan(g, page, offset, length, tag, way, blk)
        descs.append({"rq": e["rq"], "first": flags(0, e["rq"])})
        img = rng.randbytes(params.page_size)
        first = 0 if blk else e["start_b"]
        n = g.page_beats if blk else e["nb_fine"]
        err_beat = rng.randrange(first, first + n) if rng.random() < 0.3 else None
        for b in range(first, first + n):
            beats.append({"data": int.from_bytes(img[b * B:(b + 1) * B], "little"),
                          "resp": 2 if b == err_beat else 0})
        err = err_beat is not None and err_beat <= (offset + length - 1) // B
        n_out = -(-length // B)
        want.append((img[offset:offset + length].ljust(n_out * B, b"\0"), err, tag))
    got, dones, way_log = [], [0], []

    async def source_req(ctx):
        await send(ctx, dut.i_req, descs, random.Random(1), 0.3)

    async def source_r(ctx):
        await send(ctx, dut.i_r, beats, random.Random(2), 0.3)

    async def watch(ctx):
        async for _, _, done, way in ctx.tick().sample(dut.done, dut.done_way):
            if done:
                dones[0] += 1
                way_log.append(way)

    async def sink(ctx):
        out, rows = [], []
        rng2 = random.Random(3)
        n_beats = sum(len(w[0]) // B for w in want)
        await receive(ctx, dut.o_row, n_beats, rng2, 0.3, out)
        cur = []
        for beat in out:
            cur.append(beat)
            if beat.last:
                rows.append((b"".join(x.data.to_bytes(B, "little") for x in cur),
                             bool(cur[-1].err), {x.tag for x in cur}))
                cur = []
        got.extend(rows)
        for _ in range(4 * g.page_beats):
            await ctx.tick()
    sim_run(dut, sink, background=(source_req, source_r, watch))
    assert len(got) == len(want)
    for k, ((d, e, tags), (wd, we, wt)) in enumerate(zip(got, want)):
        assert d == wd, f"row {k} {reads[k]}: bytes differ"
        assert e == we, f"row {k}: err {e} != {we}"
        assert tags == {wt}
    assert dones[0] == len(reads)
    assert way_log == [r[4] for r in reads]


# ------------------------------------------------------------------ BurstIssuer
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("block", [False, True])
def test_burst_issuer(name, block):
    params, tw = CONFIGS[name]
    g = ChannelGeometry(params, tw)
    rng = random.Random(7 + block)
    dut = BurstIssuer(g)
    reads = [random_read(g, rng, block, max_len=params.page_size) for _ in range(20)]
    pend = [plan(g, *r) for r in reads]
    want_ar = []
    for e in pend:
        first, n = (0, g.page_beats) if block else (e["start_b"], e["nb_fine"])
        want_ar += expected_bursts(params, e["page"], first, n)
    want_req = [{"rq": e["rq"], "first": flags(0, e["rq"])} for e in pend]
    ar_log, reqs, violations = [], [], []

    async def source(ctx):
        ctx.set(dut.block_mode, block)
        await send(ctx, dut.i_pend, pend, random.Random(1), 0.3)

    async def ways(ctx):
        # each way's tR: ready low for random stretches
        r = random.Random(4)
        ready = (1 << g.ways) - 1
        while True:
            if r.random() < 0.1:
                ready ^= 1 << r.randrange(g.ways)
            ctx.set(dut.way_ready, ready)
            await ctx.tick()

    async def ar(ctx):
        r = random.Random(5)
        head = 0
        while True:
            go = r.random() >= 0.3
            ctx.set(dut.m_axi.arready, go)
            _, _, valid, addr, ln, rdy = await ctx.tick().sample(
                dut.m_axi.arvalid, dut.m_axi.araddr, dut.m_axi.arlen, dut.way_ready)
            if go and valid:
                ar_log.append((addr, ln + 1))

    async def sink(ctx):
        await receive(ctx, dut.o_req, len(want_req), random.Random(6), 0.4, reqs)
        for _ in range(20):
            await ctx.tick()

    async def check_tr(ctx):
        # AR only for a read whose page register is ready: the way of the read at the head
        n_done = 0
        idx = 0
        async for _, _, valid, ready, rdy in ctx.tick().sample(
                dut.m_axi.arvalid, dut.m_axi.arready, dut.way_ready):
            if valid and not (rdy >> pend[min(idx, len(pend) - 1)]["rq"]["way"]) & 1:
                violations.append(idx)
            if valid and ready:
                n_done += 1
                # count bursts to know which read is at the head
                total = 0
                for k, e in enumerate(pend):
                    first, n = (0, g.page_beats) if block else (e["start_b"], e["nb_fine"])
                    total += len(expected_bursts(params, e["page"], first, n))
                    if n_done < total:
                        idx = k
                        break
                else:
                    idx = len(pend)
    sim_run(dut, sink, background=(source, ways, ar, check_tr))
    assert ar_log == want_ar
    got = [{"rq": {k: int(getattr(x.rq, k)) for k in want_req[0]["rq"]},
            "first": {k: bool(getattr(x.first, k)) for k in want_req[0]["first"]}} for x in reqs]
    cw_mask = (1 << g.count_width) - 1
    for k, (a, w) in enumerate(zip(got, want_req)):
        assert a["rq"] == {f: int(v) & cw_mask if f not in ("way", "tag") else v
                           for f, v in w["rq"].items()}, f"read {k}"
        assert a["first"] == w["first"], f"read {k}"
    assert not violations, f"AR while the read's way was in tR: reads {violations[:5]}"


# ------------------------------------------------------------------ PageRegisters
class PageRegistersModel:
    """The page registers' state, one cycle at a time (what the component's ports promise)."""

    def __init__(self, ways):
        self.ways = ways
        self.valid = [0] * ways
        self.page = [0] * ways
        self.timer = [0] * ways
        self.ref = [0] * ways
        self.order = list(range(ways))           # least recently used first
        self.claim_d = 0
        self.done_d = None

    def outputs(self):
        return {"valid": sum(v << w for w, v in enumerate(self.valid)),
                "page": list(self.page),
                "ready": sum((t == 0) << w for w, t in enumerate(self.timer)),
                "ref_zero": sum((r == 0) << w for w, r in enumerate(self.ref)),
                "lru": 1 << self.order[0], "loading": self.claim_d}

    def step(self, t_r, claim, claim_page, touch, done, inval):
        for w in range(self.ways):
            if self.claim_d >> w & 1:
                self.timer[w] = max(t_r - 1, 0)
            elif self.timer[w]:
                self.timer[w] -= 1
            if inval is not None and self.page[w] == inval:
                self.valid[w] = 0
            if claim >> w & 1:
                self.valid[w], self.page[w] = 1, claim_page
        if self.done_d is not None:
            self.ref[self.done_d] -= 1
        if touch is not None:
            self.ref[touch] += 1
            self.order.remove(touch)
            self.order.append(touch)
        self.claim_d = claim
        self.done_d = done


@pytest.mark.parametrize("ways", [1, 2, 4])
def test_page_registers(ways):
    params = Params(ch_data_bits=64, ways=ways, page_size=1024, pages_per_channel=16)
    g = ChannelGeometry(params, 4)
    dut = PageRegisters(g)
    model = PageRegistersModel(ways)
    rng = random.Random(ways)
    mismatches = []

    async def bench(ctx):
        t_r = 5
        ctx.set(dut.t_r, t_r)
        pending_refs = [0] * ways
        for cyc in range(1500):
            if cyc == 700:
                t_r = 1
                ctx.set(dut.t_r, t_r)
            claim = 1 << rng.randrange(ways) if rng.random() < 0.15 else 0
            cpage = rng.randrange(16)
            touch = rng.randrange(ways) if rng.random() < 0.4 else None
            if touch is not None and sum(pending_refs) >= g.pend_depth + g.rq_depth:
                touch = None            # no more reads in flight than the queues hold
            live = [w for w in range(ways) if pending_refs[w] > 0]
            done = rng.choice(live) if live and rng.random() < 0.4 else None
            inval = rng.randrange(16) if rng.random() < 0.05 else None
            if touch is not None:
                pending_refs[touch] += 1
            if done is not None:
                pending_refs[done] -= 1
            ctx.set(dut.claim, claim)
            ctx.set(dut.claim_page, cpage)
            ctx.set(dut.touch, 0 if touch is None else 1 << touch)
            ctx.set(dut.done, done is not None)
            ctx.set(dut.done_way, done or 0)
            ctx.set(dut.invalidate, inval is not None)
            ctx.set(dut.invalidate_page, inval or 0)
            got = {"valid": ctx.get(dut.valid), "page": [ctx.get(dut.page[w]) for w in range(ways)],
                   "ready": ctx.get(dut.ready), "ref_zero": ctx.get(dut.ref_zero),
                   "lru": ctx.get(dut.lru), "loading": ctx.get(dut.loading)}
            want = model.outputs()
            if got != want:
                mismatches.append((cyc, got, want))
            model.step(t_r, claim, cpage, touch, done, inval)
            await ctx.tick()
    sim_run(dut, bench)
    assert not mismatches, mismatches[:3]


# ------------------------------------------------------------------ ReadIntake (+ PageRegisters)
@pytest.mark.parametrize("name", CONFIGS)
def test_read_intake(name):
    """Planned reads come out in order, each on the page register WayModel names, claims exactly
    for the reads WayModel says pay tR; programs waiting hold new reads back."""
    from amaranth import Module
    params, tw = CONFIGS[name]
    g = ChannelGeometry(params, tw)
    rng = random.Random(len(name))
    intake, regs = ReadIntake(g), PageRegisters(g)
    top = Module()
    top.submodules.intake, top.submodules.regs = intake, regs
    top.d.comb += [
        intake.run.eq(1), intake.way_valid.eq(regs.valid), intake.way_page.eq(regs.page),
        intake.way_lru.eq(regs.lru), intake.way_ref_zero.eq(regs.ref_zero),
        regs.claim.eq(intake.claim), regs.claim_page.eq(intake.claim_page),
        regs.touch.eq(intake.use_vec & intake.accept.replicate(g.ways)), regs.t_r.eq(3),
    ]
    pages = rng.sample(range(params.pages_per_channel), min(params.pages_per_channel, g.ways + 2))
    reads = []
    for _ in range(60):
        length = 4 * rng.randint(1, 100)
        offset = 4 * rng.randint(0, (params.page_size - length) // 4)
        reads.append({"page": rng.choice(pages), "offset": offset, "length": length,
                      "tag": rng.randrange(1 << tw)})
    wm = WayModel(g.ways)
    want_miss = [wm.read(r["page"]) for r in reads]
    out, claims, held = [], [], []

    async def source(ctx):
        await send(ctx, intake.i_read, reads, random.Random(1), 0.3)

    async def hold(ctx):
        r = random.Random(9)
        while True:
            h = r.random() < 0.1
            ctx.set(intake.hold, h)
            _, _, ready = await ctx.tick().sample(intake.i_read.ready)
            if h and ready:
                held.append(1)

    async def watch(ctx):
        async for _, _, acc, cl in ctx.tick().sample(intake.accept, intake.claim):
            if acc:
                claims.append(cl != 0)

    async def sink(ctx):
        # the consumer finishes each read some cycles after taking it (drops its reference)
        r = random.Random(2)
        inflight = []
        for cyc in range(20_000):
            if len(out) == len(reads) and not inflight:
                break
            take = r.random() >= 0.3
            ctx.set(intake.o_pend.ready, take)
            fin = inflight and r.random() < 0.5
            ctx.set(regs.done, bool(fin))
            ctx.set(regs.done_way, inflight[0] if fin else 0)
            _, _, valid, pl = await ctx.tick().sample(intake.o_pend.valid, intake.o_pend.payload)
            if fin:
                inflight.pop(0)
            if take and valid:
                out.append(pl)
                inflight.append(pl.rq.way)
        assert cyc < 19_999, f"hang: {len(out)}/{len(reads)} reads out, {len(inflight)} in flight"
    sim_run(top, sink, background=(source, hold, watch))
    assert not held, "i_read taken while a program was waiting"
    assert claims == want_miss
    wm = WayModel(g.ways)
    for k, (r, pl) in enumerate(zip(reads, out)):
        e = plan(g, r["page"], r["offset"], r["length"], r["tag"], int(pl.rq.way), False)
        assert int(pl.page) == r["page"] and int(pl.start_b) == e["start_b"]
        assert int(pl.nb_fine) == e["nb_fine"], f"read {k}"
        for f, v in e["rq"].items():
            width = g.rq_layout[f].width
            assert int(getattr(pl.rq, f)) == int(v) & ((1 << width) - 1), f"read {k}: {f}"


# ------------------------------------------------------------------ ChannelProgrammer
@pytest.mark.parametrize("name", ["ch32-w1", "ch256-w2"])
def test_channel_programmer(name):
    params, tw = CONFIGS[name]
    g = ChannelGeometry(params, tw)
    ps, B = params.page_size, g.beat_bytes
    bad = 2
    dut = ChannelProgrammer(g)
    mem = AXI4Memory(dut.m_axi, size=params.channel_bytes, data_width=params.ch_data_bits,
                     stall=0.3, latency=1, seed=3, err_ranges=[(bad * ps + 64, bad * ps + 96)])
    rng = random.Random(5)
    progs = [(rng.choice([bad, *range(params.pages_per_channel)]), rng.randbytes(ps))
             for _ in range(5)]
    progs.append((bad, rng.randbytes(ps)))
    dones, done_out, inval, fenced, ran_idle = [], [], [], [], []
    t_prog = 9

    async def driver(ctx):
        ctx.set(dut.t_prog, t_prog)
        r = random.Random(1)
        for page, data in progs:
            # reads in flight for a while: the program must wait
            for _ in range(r.randrange(4)):
                ctx.set(dut.reads_idle, 0)
                ctx.set(dut.i_prog.valid, 1)
                ctx.set(dut.i_prog.payload, {"page": page})
                _, _, ready = await ctx.tick().sample(dut.i_prog.ready)
                if ready:
                    fenced.append(page)
            ctx.set(dut.reads_idle, 1)
            await send(ctx, dut.i_prog, [{"page": page}], r, 0.2)
            beats = [{"data": int.from_bytes(data[b * B:(b + 1) * B], "little")}
                     for b in range(ps // B)]
            await send(ctx, dut.i_prog_data, beats, r, 0.3)
            while len(done_out) < len(inval):
                await ctx.tick()

    async def watch(ctx):
        async for _, _, iv, ip, idle, bv in ctx.tick().sample(
                dut.invalidate, dut.invalidate_page, dut.idle, dut.m_axi.bvalid):
            if iv:
                inval.append(ip)
            if idle and bv:
                ran_idle.append(1)

    async def sink(ctx):
        await receive(ctx, dut.o_prog_done, len(progs), random.Random(2), 0.3, done_out)
        dones.extend(bool(x.err) for x in done_out)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    mem.add_to(sim)
    for b in (driver, watch):
        sim.add_testbench(b, background=True)
    sim.add_testbench(sink)
    sim.run()
    assert not fenced, "a program started while reads were in flight"
    assert not ran_idle
    assert inval == [p for p, _ in progs]
    image = bytearray(params.channel_bytes)
    for page, data in progs:
        for b in range(ps // B):
            a = page * ps + b * B
            if not any(lo <= a < hi for lo, hi in mem.err_ranges):
                image[a:a + B] = data[b * B:(b + 1) * B]
    assert bytes(mem.mem) == bytes(image)
    assert dones == [p == bad for p, _ in progs]
    aw = []
    for page, _ in progs:
        aw += expected_bursts(params, page, 0, ps // B)
    assert mem.aw_log == aw
