"""LookupFork (the engine's join of translator responses with side entries) against a golden
model: random commands of lookups (good, no extent, bad LBA, bus errors), empty-bag tokens,
READ_PAGES chunks and table probes, random idle cycles on both inputs and back-pressure on the
descriptor and FTL outputs; descriptors, FTL requests, per-command statistics and probe answers
must be exactly the model's."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.device.fork import Kind, LookupFork, raw_chunk_bytes
from evssd.hw.device.translator import TranslateStatus
from evssd.hw.regmap import NO_BAD_POSITION, Params, Status

from .streams import receive, send

N_SLOTS = 16


def _stimulus(rng, n_cmds):
    """(side entries, translator responses): commands of random items, each ending in cmd_end."""
    sides, rsps = [], []
    for _ in range(n_cmds):
        kind = rng.choice([Kind.LOOKUP, Kind.LOOKUP, Kind.RAW, Kind.PROBE])
        if kind == Kind.PROBE:
            items = [Kind.PROBE]
        elif kind == Kind.RAW:
            items = [Kind.RAW] * rng.randrange(1, 5)
        else:
            items = [rng.choice([Kind.LOOKUP] * 4 + [Kind.TOKEN]) for _ in range(rng.randrange(1, 8))]
        for k, kd in enumerate(items):
            last = k == len(items) - 1
            sides.append({"kind": kd, "slot": rng.randrange(N_SLOTS), "pos": rng.randrange(1 << 32),
                          "offset": rng.randrange(1 << 16), "pooled": rng.randrange(2),
                          "bag_end": rng.randrange(2), "cmd_end": int(last and kd != Kind.PROBE),
                          "err": int(rng.random() < 0.1),
                          "need_desc": int(kd != Kind.PROBE), "lookup": int(kd == Kind.LOOKUP),
                          "raw": int(kd == Kind.RAW)})
            status = rng.choice([0, 0, 0, 0, 1, 2, 3]) if kd in (Kind.LOOKUP, Kind.PROBE) else 0
            rsps.append({"lba": rng.randrange(1 << 32), "offset": rng.randrange(1 << 16),
                         "row_bytes": rng.randrange(1 << 16), "elem": rng.randrange(4),
                         "status": status, "tag": 0})
    return sides, rsps


def _model(sides, rsps, raw_chunk):
    descs, ftls, stats, probes = [], [], [], []
    n_bad, first_bad, worst, err = 0, NO_BAD_POSITION, 0, 0
    for sd, r in zip(sides, rsps):
        bad = sd["lookup"] and r["status"] != 0
        if sd["need_desc"]:
            descs.append((sd["slot"], raw_chunk if sd["raw"] else r["row_bytes"], r["elem"],
                          sd["pooled"], int(bad), sd["bag_end"], int(sd["kind"] == Kind.TOKEN),
                          sd["cmd_end"]))
        else:
            probes.append((r["status"], r["row_bytes"], r["elem"]))
        if sd["raw"]:
            ftls.append((sd["pos"], sd["offset"], raw_chunk, sd["slot"]))
        elif sd["lookup"] and r["status"] == 0:
            ftls.append((r["lba"], r["offset"], r["row_bytes"], sd["slot"]))
        if not sd["need_desc"]:
            continue
        if bad:
            if first_bad == NO_BAD_POSITION and n_bad == 0:
                first_bad = sd["pos"]
            n_bad += 1
            if r["status"] == TranslateStatus.BAD_LBA:
                worst = worst if worst == Status.BAD_INDEX else Status.BAD_LBA
            else:
                worst = Status.BAD_INDEX
        err |= sd["err"] and sd["lookup"]
        if sd["cmd_end"]:
            stats.append((n_bad, first_bad, worst, int(err)))
            n_bad, first_bad, worst, err = 0, NO_BAD_POSITION, 0, 0
    return descs, ftls, stats, probes


@pytest.mark.parametrize("idle,stall,seed", [(0.0, 0.0, 1), (0.3, 0.5, 2), (0.6, 0.2, 3)])
def test_fork_random(idle, stall, seed, n_cmds=60):
    params = Params()
    dut = LookupFork(params, N_SLOTS)
    rng = random.Random(seed)
    sides, rsps = _stimulus(rng, n_cmds)
    want_desc, want_ftl, want_stats, want_probe = _model(sides, rsps, raw_chunk_bytes(params))
    got_desc, got_ftl, got_stats, got_probe = [], [], [], []

    async def probe_monitor(ctx):
        async for _, _, done, st, rb, el in ctx.tick().sample(
                dut.probe_done, dut.probe_status, dut.probe_row_bytes, dut.probe_elem):
            if done:
                got_probe.append((st, rb, el))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    def run(fn, *args):
        async def tb(ctx):
            await fn(ctx, *args)
        return tb

    sim.add_testbench(run(send, dut.i_side, sides, random.Random(seed + 10), idle), background=True)
    sim.add_testbench(run(send, dut.i_xlat, rsps, random.Random(seed + 20), idle), background=True)
    sim.add_testbench(run(receive, dut.o_desc, len(want_desc), random.Random(seed + 30), stall,
                          got_desc), background=True)
    sim.add_testbench(run(receive, dut.o_ftl, len(want_ftl), random.Random(seed + 40), stall,
                          got_ftl), background=True)
    # the engine admits at most max_inflight commands, so the statistics are always taken in time
    sim.add_testbench(run(receive, dut.o_stats, len(want_stats), random.Random(0), 0.0, got_stats),
                      background=True)
    sim.add_testbench(probe_monitor, background=True)

    async def until_done(ctx):      # a bound on the cycles, so a stuck fork fails, not hangs
        for _ in range(40 * len(sides) + 1000):
            if (len(got_desc), len(got_ftl), len(got_stats)) == (len(want_desc), len(want_ftl),
                                                                  len(want_stats)):
                break
            await ctx.tick()
        await ctx.tick().repeat(4)
    sim.add_testbench(until_done)
    sim.run()

    assert [(d.slot, d.row_bytes, d.elem, d.pooled, d.bad, d.bag_end, d.empty_bag, d.cmd_end)
            for d in got_desc] == want_desc
    assert [(f.lba, f.offset, f.row_bytes, f.tag) for f in got_ftl] == want_ftl
    assert [(s.n_bad, s.first_bad, s.status, s.err) for s in got_stats] == want_stats
    assert got_probe == want_probe
    # the stimulus reached every outcome
    assert {s[2] for s in want_stats} >= {0, Status.BAD_INDEX, Status.BAD_LBA}
    assert any(s[3] for s in want_stats) and want_probe and any(d[6] for d in want_desc)


def test_fork_rejects_bad_slots():
    for bad in (1, 12, 512):
        with pytest.raises(ValueError, match="n_slots"):
            LookupFork(Params(), bad)
