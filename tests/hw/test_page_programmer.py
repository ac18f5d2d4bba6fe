"""PageProgrammer (the engine's PROGRAM_PAGES data path) against a golden model: random jobs
(LBAs anywhere in 32 bits, counts 0..2 * n_channels + 1), random page data, DMA read errors and
program-completion errors, random idle cycles on the DMA data and the completions and
back-pressure on every output; the DMA commands, each channel's (page, bytes) sequence and every
job's error flag must be exactly the model's, with the mapping of ``ftl_model`` (the golden model
of the one LBA -> channel/page definition), and no channel may get a page while its previous
program is outstanding."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.device.ftl import ftl_model
from evssd.hw.device.page_programmer import PageProgrammer
from evssd.hw.regmap import Params

from .streams import receive, send


def _stimulus(rng, params, n_jobs, p_err):
    """Jobs, the host memory they read (per page address), and the error plan."""
    n_ch, ps = params.n_channels, params.page_size
    jobs, pages, dma_err, done_err = [], {}, {}, []
    addr = 0x1000
    for _ in range(n_jobs):
        count = rng.randrange(0, 2 * n_ch + 2)
        lba = rng.choice([rng.randrange(1 << 32), rng.randrange(64)])
        lba = min(lba, (1 << 32) - count)
        jobs.append({"src_addr": addr, "lba": lba, "count": count})
        for k in range(count):
            a = addr + k * ps
            pages[a] = rng.randbytes(ps)
            dma_err[a] = rng.random() < p_err
            done_err.append(rng.random() < p_err)
        addr += count * ps + 64 * rng.randrange(0, 3)
    return jobs, pages, dma_err, done_err


def _model(params, jobs, pages, dma_err, done_err):
    """Expected (DMA commands, per channel [(page, bytes)], per job err)."""
    ps = params.page_size
    cmds, per_ch, errs = [], [[] for _ in range(params.n_channels)], []
    g = 0
    for j in jobs:
        err = False
        for k in range(j["count"]):
            a = j["src_addr"] + k * ps
            ch, page = ftl_model(params, j["lba"] + k)
            cmds.append((a, ps))
            per_ch[ch].append((page, pages[a]))
            err |= dma_err[a] or done_err[g]
            g += 1
        errs.append(int(err))
    return cmds, per_ch, errs


def _run(params, idle, stall, seed, n_jobs=12, p_err=0.08):
    dut = PageProgrammer(params)
    rng = random.Random(seed)
    jobs, pages, dma_err, done_err = _stimulus(rng, params, n_jobs, p_err)
    want_cmds, want_ch, want_errs = _model(params, jobs, pages, dma_err, done_err)
    n_ch, ps = params.n_channels, params.page_size
    hb, cb = params.host_data_bits // 8, params.ch_data_bits // 8
    got_cmds, got_ch, got_done = [], [[] for _ in range(n_ch)], []
    issued = [0]                      # programs accepted so far, over all channels
    violations = []

    async def dma(ctx):
        """Answers each page read with the page's bytes (an error flag on one random beat)."""
        drng = random.Random(seed + 1)
        while True:
            got = []
            await receive(ctx, dut.o_pg_cmd, 1, drng, stall, got)
            a, n = got[0].addr, got[0].bytes
            got_cmds.append((a, n))
            data = pages.get(a, bytes(n))
            bad_beat = drng.randrange(n // hb) if dma_err.get(a) else -1
            beats = [{"data": int.from_bytes(data[i * hb:(i + 1) * hb], "little"),
                      "err": int(i == bad_beat), "last": int(i == n // hb - 1)}
                     for i in range(n // hb)]
            await send(ctx, dut.i_pg_data, beats, drng, idle)

    def channel(i):
        async def tb(ctx):
            crng = random.Random(seed * 100 + i)
            outstanding = False
            while True:
                req = []
                ctx.set(dut.o_prog[i].ready, 0)
                while not req:
                    ready = crng.random() >= stall
                    ctx.set(dut.o_prog[i].ready, ready)
                    _, _, valid, payload = await ctx.tick().sample(dut.o_prog[i].valid,
                                                                   dut.o_prog[i].payload)
                    if valid and outstanding:
                        violations.append((i, "page offered while a program is outstanding"))
                    if ready and valid:
                        req.append(payload.page)
                        g = issued[0]         # pages are requested one at a time, in LBA order
                        issued[0] += 1
                ctx.set(dut.o_prog[i].ready, 0)
                beats = []
                await receive(ctx, dut.o_prog_data[i], ps // cb, crng, stall, beats)
                got_ch[i].append((req[0], b"".join(b.data.to_bytes(cb, "little") for b in beats)))
                outstanding = True
                await ctx.tick().repeat(crng.randrange(1, 30))          # tPROG
                err = done_err[g]
                await send(ctx, dut.i_prog_done[i], [{"err": int(err)}], crng, 0.0)
                outstanding = False
        return tb

    sim = Simulator(dut)
    sim.add_clock(1e-8)

    async def jobs_in(ctx):
        await send(ctx, dut.i_job, jobs, random.Random(seed + 2), idle)

    async def done_out(ctx):
        await receive(ctx, dut.o_done, len(jobs), random.Random(seed + 3), stall, got_done)

    sim.add_testbench(dma, background=True)
    for i in range(n_ch):
        sim.add_testbench(channel(i), background=True)
    sim.add_testbench(jobs_in, background=True)

    async def until_done(ctx):      # a bound on the cycles, so a stuck programmer fails, not hangs
        cycles = len(want_cmds) * (ps // min(hb, cb) * 4 + 80) + 500
        for _ in range(cycles):
            if len(got_done) == len(jobs):
                break
            await ctx.tick()
    sim.add_testbench(done_out, background=True)
    sim.add_testbench(until_done)
    sim.run()

    assert len(got_done) == len(jobs), f"{len(got_done)} of {len(jobs)} jobs completed"
    assert got_cmds == want_cmds
    assert got_ch == want_ch
    assert violations == []
    assert [d.err for d in got_done] == want_errs
    # the stimulus reached the outcomes that matter
    assert 0 in want_errs and 1 in want_errs and any(j["count"] == 0 for j in jobs)
    assert n_ch == 1 or any(j["lba"] % n_ch != 0 for j in jobs if j["count"])


@pytest.mark.parametrize("n_ch,wh,wc,idle,stall,seed", [
    (1, 64, 64, 0.0, 0.0, 1),
    (4, 256, 64, 0.3, 0.4, 2),
    (3, 128, 32, 0.2, 0.3, 3),      # lba_split by the reciprocal multiply
    (2, 64, 256, 0.4, 0.2, 4),      # up conversion
])
def test_page_programmer_random(n_ch, wh, wc, idle, stall, seed):
    params = Params(n_channels=n_ch, host_data_bits=wh, ch_data_bits=wc, page_size=512,
                    max_row_bytes=512)
    _run(params, idle, stall, seed)


def test_page_programmer_rejects_bad_params():
    with pytest.raises(TypeError):
        PageProgrammer("params")
