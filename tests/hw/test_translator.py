"""ExtentTranslator against translate_model: random tables and indices, random stalls on both
streams, plus the one-lookup-per-cycle throughput property."""
from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.regmap import Params, div_magic
from evssd.hw.device.translator import (ExtentTranslator, LATENCY, OUTPUT_FIFO_DEPTH, TableEntry,
                                 TranslateStatus, translate_model)

from .streams import receive, send


# ---------------------------------------------------------------- configuration

async def commit_table(ctx, cfg, slot, t: TableEntry):
    ctx.set(cfg.table, slot)
    ctx.set(cfg.row_bytes, t.row_bytes)
    ctx.set(cfg.elem, t.elem)
    ctx.set(cfg.enable, t.enable)
    ctx.set(cfg.rows_per_page, t.rows_per_page)
    ctx.set(cfg.magic, t.magic)
    ctx.set(cfg.shift, t.shift)
    ctx.set(cfg.commit_table, 1)
    await ctx.tick()
    ctx.set(cfg.commit_table, 0)


async def commit_extent(ctx, cfg, slot, e, ext):
    ctx.set(cfg.table, slot)
    ctx.set(cfg.extent, e)
    ctx.set(cfg.ext_first, ext[0])
    ctx.set(cfg.ext_rows, ext[1])
    ctx.set(cfg.ext_lba, ext[2])
    ctx.set(cfg.commit_extent, 1)
    await ctx.tick()
    ctx.set(cfg.commit_extent, 0)


def random_tables(params: Params, rng: random.Random):
    tables = {}
    for slot in range(params.max_tables):
        row_bytes = rng.choice([4, 8, 12, 64, 100, 128, 512, params.page_size])
        rpp = params.page_size // row_bytes
        dm = div_magic(rpp)
        t = TableEntry(enable=rng.random() < 0.85, row_bytes=row_bytes, elem=rng.randrange(4),
                       rows_per_page=rpp, magic=dm.magic, shift=dm.shift)
        if slot == 1:
            # Arbitrary constants: the hardware must match the model bit for bit even then.
            t.rows_per_page = rng.randrange(1 << 16)
            t.magic = rng.randrange(1 << 33)
            t.shift = rng.randrange(64)
            t.enable = True
        exts = []
        base = rng.choice([0, rng.randrange(1 << 32), (1 << 32) - 1000])
        for _ in range(params.max_extents):
            kind = rng.random()
            if kind < 0.2:
                exts.append((rng.randrange(1 << 32), 0, rng.randrange(1 << 32)))  # unused
                continue
            rows = rng.choice([1, 7, rng.randrange(1, 5000), rng.randrange(1, 1 << 32)])
            first = base if kind < 0.8 else rng.randrange(1 << 32)  # some overlap / wrap past 2**32
            lba = (rng.randrange(params.total_pages) if rng.random() < 0.8
                   else rng.choice([params.total_pages - 1, rng.randrange(1 << 32)]))
            exts.append((first, rows, lba))
            base = (first + rows) % (1 << 32)
        t.extents = exts
        tables[slot] = t
    return tables


def random_requests(params, tables, rng, n, tag_width):
    reqs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.05:
            table = rng.randrange(params.max_tables, 256)
        else:
            table = rng.randrange(params.max_tables)
        exts = [e for e in tables[table % params.max_tables].extents if e[1]] or [(0, 1, 0)]
        first, rows, _ = rng.choice(exts)
        index = rng.choice([first, first + rows - 1, first + rows, first - 1,
                            first + rng.randrange(min(rows, 1 << 20)), rng.randrange(1 << 32)])
        reqs.append({"table": table, "index": index % (1 << 32),
                     "tag": rng.randrange(1 << tag_width)})
    return reqs


def run(params, tag_width, seed, n, idle, stall):
    rng = random.Random(seed)
    dut = ExtentTranslator(params, tag_width)
    tables = random_tables(params, rng)
    reqs = random_requests(params, tables, rng, n, tag_width)
    got = []

    async def tb(ctx):
        for slot, t in tables.items():
            await commit_table(ctx, dut.cfg, slot, t)
            for e, ext in enumerate(t.extents):
                await commit_extent(ctx, dut.cfg, slot, e, ext)
        # Out-of-range slots are ignored (they must not alias onto real slots).
        if params.max_tables < 256:
            await commit_table(ctx, dut.cfg, params.max_tables, TableEntry(enable=True))
        await commit_extent(ctx, dut.cfg, 0, params.max_extents, (0, 1 << 31, 0))
        await ctx.tick()
        await receive(ctx, dut.o_resp, n, random.Random(seed + 2), stall, got)

    async def src_tb(ctx):
        # Starts after the configuration: wait until the sink loop has begun.
        for _ in range(len(tables) * (1 + params.max_extents) + 4):
            await ctx.tick()
        await send(ctx, dut.i_req, reqs, random.Random(seed + 1), idle)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.add_testbench(src_tb, background=True)
    sim.run()

    assert len(got) == n
    for k, (req, resp) in enumerate(zip(reqs, got)):
        want = translate_model(params, tables, req["table"], req["index"])
        have = (resp.lba, resp.offset, resp.row_bytes, resp.elem, resp.status)
        assert have == tuple(want), f"lookup {k} {req}: got {have}, want {tuple(want)}"
        assert resp.tag == req["tag"], f"lookup {k}: tag {resp.tag} != {req['tag']}"
    statuses = {translate_model(params, tables, r["table"], r["index"])[4] for r in reqs}
    return statuses


CONFIGS = [
    # (params, tag_width)
    (Params(n_channels=2, pages_per_channel=64, max_tables=4, max_extents=3), 3),
    (Params(), 8),
    (Params(n_channels=8, pages_per_channel=1 << 20, page_size=16384, max_tables=2,
            max_extents=16), 16),
]


@pytest.mark.parametrize("params,tag_width", CONFIGS)
@pytest.mark.parametrize("idle,stall", [(0.0, 0.0), (0.4, 0.5)])
def test_translator_matches_model(params, tag_width, idle, stall):
    statuses = run(params, tag_width, seed=params.max_extents * 7 + tag_width, n=400,
                      idle=idle, stall=stall)
    # The stimulus must exercise every outcome, or the comparison proves little.
    assert statuses == set(TranslateStatus), statuses


def test_translator_one_lookup_per_cycle():
    """With no stalls, N lookups leave the pipeline in N + LATENCY cycles."""
    params = Params(n_channels=2, pages_per_channel=64, max_tables=4, max_extents=3)
    n = 300
    dut = ExtentTranslator(params, 8)
    rb = 64
    dm = div_magic(params.page_size // rb)
    table = TableEntry(True, rb, 0, params.page_size // rb, dm.magic, dm.shift,
                       [(0, 1000, 0), (5000, 1000, 30)])
    reqs = [{"table": 0, "index": (i * 37) % 7000, "tag": i % 256} for i in range(n)]
    got = []
    cyc = {}

    async def tb(ctx):
        await commit_table(ctx, dut.cfg, 0, table)
        for e, ext in enumerate(table.extents):
            await commit_extent(ctx, dut.cfg, 0, e, ext)
        ctx.set(dut.o_resp.ready, 1)
        ctx.set(dut.i_req.valid, 1)
        cycle = 0
        sent = 0
        first_accept = last_resp = None
        while len(got) < n:
            if sent < n:
                ctx.set(dut.i_req.payload, reqs[sent])
            else:
                ctx.set(dut.i_req.valid, 0)
            _, _, iv, ir, ov, payload = await ctx.tick().sample(
                dut.i_req.valid, dut.i_req.ready, dut.o_resp.valid, dut.o_resp.payload)
            if iv and ir:
                if first_accept is None:
                    first_accept = cycle
                sent += 1
            if ov:
                got.append(payload)
                last_resp = cycle
            cycle += 1
        cyc["first"], cyc["last"] = first_accept, last_resp

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    # Accepted on edge `first`, the last response is taken on edge first + (n - 1) + LATENCY.
    assert cyc["last"] - cyc["first"] == n - 1 + LATENCY
    for req, resp in zip(reqs, got):
        want = translate_model(params, {0: table}, 0, req["index"])
        assert (resp.lba, resp.offset, resp.row_bytes, resp.elem, resp.status) == tuple(want)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_translator_holds_lookups_while_output_blocked():
    """With o_resp never ready, the translator takes exactly OUTPUT_FIFO_DEPTH lookups (its
    credits), then refuses more; released, it returns all of them in order and unchanged."""
    params = Params(n_channels=2, pages_per_channel=64, max_tables=4, max_extents=3)
    dut = ExtentTranslator(params, 8)
    rb = 128
    dm = div_magic(params.page_size // rb)
    table = TableEntry(True, rb, 1, params.page_size // rb, dm.magic, dm.shift, [(100, 900, 7)])
    reqs = [{"table": 0, "index": 90 + 13 * i, "tag": i} for i in range(3 * OUTPUT_FIFO_DEPTH)]
    got = []
    accepted = {}

    async def tb(ctx):
        await commit_table(ctx, dut.cfg, 0, table)
        await commit_extent(ctx, dut.cfg, 0, 0, table.extents[0])
        ctx.set(dut.o_resp.ready, 0)
        ctx.set(dut.i_req.valid, 1)
        sent = 0
        for _ in range(4 * LATENCY):     # long enough for every credit to come back if it could
            ctx.set(dut.i_req.payload, reqs[sent])
            _, _, ir = await ctx.tick().sample(dut.i_req.ready)
            sent += ir
        accepted["blocked"] = sent
        ctx.set(dut.o_resp.ready, 1)
        while len(got) < len(reqs):
            if sent < len(reqs):
                ctx.set(dut.i_req.payload, reqs[sent])
            ctx.set(dut.i_req.valid, sent < len(reqs))
            _, _, ir, ov, payload = await ctx.tick().sample(
                dut.i_req.ready, dut.o_resp.valid, dut.o_resp.payload)
            sent += ir and sent < len(reqs)
            if ov:
                got.append(payload)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert accepted["blocked"] == OUTPUT_FIFO_DEPTH
    assert [r.tag for r in got] == list(range(len(reqs)))
    for req, resp in zip(reqs, got):
        want = translate_model(params, {0: table}, 0, req["index"])
        assert (resp.lba, resp.offset, resp.row_bytes, resp.elem, resp.status) == tuple(want)


def test_translator_rejects_bad_parameters():
    with pytest.raises(ValueError, match="tag_width 0"):
        ExtentTranslator(Params(), 0)
    with pytest.raises(TypeError):
        ExtentTranslator({}, 4)


@pytest.mark.parametrize("bad", [0, 33, -1, True, 4.0, "8"])
def test_tag_width_checked_once_everywhere(bad):
    """The translator, the FTL and the channel geometry share regmap.require_tag_width."""
    from evssd.hw.device.channel_plan import ChannelGeometry
    from evssd.hw.device.ftl import LinearFTL
    from evssd.hw.regmap import require_tag_width
    for make in (lambda: require_tag_width(bad), lambda: ExtentTranslator(Params(), bad),
                 lambda: LinearFTL(Params(), bad), lambda: ChannelGeometry(Params(), bad)):
        with pytest.raises(ValueError, match=f"tag_width {bad!r} must be 1..32"):
            make()
    assert require_tag_width(32) == 32 and ChannelGeometry(Params(), 1).tag_width == 1
