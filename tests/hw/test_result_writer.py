"""ResultWriter (the engine's result stage) against a golden model: random commands with and
without output, random sizes over several chunks, write-response and merger errors, random
idle cycles on every input and back-pressure on every output; DMA commands, data beats,
completions and the completion events must be exactly the model's."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.device.result_writer import RESULT_CHUNK_BYTES, ResultWriter
from evssd.hw.regmap import NO_BAD_POSITION, Params, Status

from .streams import receive, send


def _model(cmds, stats, outs, dones, chunk_bytes, bb):
    """Expected (DMA commands, data beats, completions) for the stimulus."""
    res_cmd, res_data, cpl = [], [], []
    si = di = oi = 0
    for c in cmds:
        if not c["has_output"]:
            cpl.append((0, NO_BAD_POSITION, c["sq_head"], c["cid"], c["status"]))
            continue
        left, addr, err = c["out_bytes"], c["dst_addr"], False
        while left:
            n = min(left, chunk_bytes)
            res_cmd.append((addr, n))
            beats = -(-n // bb)
            for k in range(beats):
                beat = outs[oi]
                oi += 1
                res_data.append((beat["data"], int(k == beats - 1)))
                err |= bool(beat["last"] and beat["err"])
            err |= bool(dones[di]["err"])
            di += 1
            left -= n
            addr += n
        st = stats[si]
        si += 1
        if err or st["err"]:
            cpl.append((0, NO_BAD_POSITION, c["sq_head"], c["cid"], Status.BUS_ERROR))
        else:
            cpl.append((st["n_bad"], st["first_bad"], c["sq_head"], c["cid"], st["status"]))
    return res_cmd, res_data, cpl


def _stimulus(rng, n_cmds, chunk_bytes, bb, p_err):
    cmds, stats, outs, dones = [], [], [], []
    for i in range(n_cmds):
        has_output = rng.random() < 0.8
        out_bytes = rng.randrange(1, 3 * chunk_bytes // bb + 2) * bb if has_output else 0
        if has_output and rng.random() < 0.2:
            out_bytes -= rng.randrange(1, bb) if out_bytes > bb else 0   # a short last beat
        cmds.append({"cid": rng.randrange(1 << 16), "sq_head": rng.randrange(1 << 16),
                     "status": 0 if has_output else rng.choice([int(s) for s in Status]),
                     "has_output": int(has_output), "out_bytes": out_bytes,
                     "dst_addr": rng.randrange(1 << 40) & ~63})
        if not has_output:
            continue
        stats.append({"n_bad": rng.randrange(1 << 32) if rng.random() < 0.3 else 0,
                      "first_bad": rng.randrange(1 << 32),
                      "status": rng.choice([0, 0, int(Status.BAD_INDEX), int(Status.BAD_LBA)]),
                      "err": int(rng.random() < p_err)})
        left = out_bytes
        n_beats = 0
        while left:
            n = min(left, chunk_bytes)
            n_beats += -(-n // bb)
            dones.append({"err": int(rng.random() < p_err)})
            left -= n
        for k in range(n_beats):
            last = k == n_beats - 1
            outs.append({"data": rng.getrandbits(8 * bb), "last": int(last),
                         "err": int(last and rng.random() < p_err)})
    return cmds, stats, outs, dones


def _run(chunk_bytes, idle, stall, p_err, seed, n_cmds=40):
    params = Params()
    bb = params.host_data_bits // 8
    dut = ResultWriter(params, chunk_bytes)
    rng = random.Random(seed)
    cmds, stats, outs, dones = _stimulus(rng, n_cmds, chunk_bytes, bb, p_err)
    want_cmd, want_data, want_cpl = _model(cmds, stats, outs, dones, chunk_bytes, bb)
    got_cmd, got_data, got_cpl = [], [], []
    events = {"complete": 0, "error": 0}

    def driver(port, items):
        async def run(ctx):
            await send(ctx, port, items, random.Random(rng.random()), idle)
        return run

    def sink(port, n, out):
        async def run(ctx):
            await receive(ctx, port, n, random.Random(rng.random()), stall, out)
        return run

    async def monitor(ctx):
        async for _, _, c, e in ctx.tick().sample(dut.ev_complete, dut.ev_error):
            events["complete"] += c
            events["error"] += e

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for port, items in [(dut.i_order, cmds), (dut.i_stats, stats), (dut.i_out, outs),
                        (dut.i_res_done, dones)]:
        sim.add_testbench(driver(port, items), background=True)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(sink(dut.o_res_cmd, len(want_cmd), got_cmd), background=True)
    sim.add_testbench(sink(dut.o_res_data, len(want_data), got_data), background=True)
    sim.add_testbench(sink(dut.o_cpl, len(want_cpl), got_cpl), background=True)

    async def until_done(ctx):     # a bound on the cycles, so a stuck writer fails, not hangs
        for _ in range(20 * (len(want_data) + 10 * len(want_cmd) + 10 * n_cmds) + 1000):
            if len(got_cpl) == len(want_cpl):
                break
            await ctx.tick()
        await ctx.tick().repeat(4)      # a completion too many would show in the events
    sim.add_testbench(until_done)
    sim.run()

    assert [(p.addr, p.bytes) for p in got_cmd] == want_cmd
    assert [(p.data, p.last) for p in got_data] == want_data
    assert [(p.n_bad, p.first_bad, p.sq_head, p.cid, p.status) for p in got_cpl] == want_cpl
    assert events["complete"] == len(want_cpl)
    assert events["error"] == sum(c[4] != 0 for c in want_cpl)
    return want_cpl


@pytest.mark.parametrize("chunk_bytes,idle,stall,p_err,seed", [
    (64, 0.0, 0.0, 0.0, 1),
    (64, 0.3, 0.4, 0.15, 2),
    (RESULT_CHUNK_BYTES, 0.2, 0.3, 0.1, 3),
])
def test_result_writer_random(chunk_bytes, idle, stall, p_err, seed):
    cpl = _run(chunk_bytes, idle, stall, p_err, seed)
    statuses = {c[4] for c in cpl}
    assert 0 in statuses and len(statuses) > 2      # the stimulus reached several outcomes
    if p_err:
        assert Status.BUS_ERROR in statuses


def test_result_writer_rejects_bad_chunk():
    bb = Params().host_data_bits // 8
    for bad in (3 * bb // 2, bb // 2):      # not a power of two; below one beat
        with pytest.raises(ValueError, match="chunk_bytes"):
            ResultWriter(Params(), bad)
