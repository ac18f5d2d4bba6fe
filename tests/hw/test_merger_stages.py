"""L1 tests of the ResultMerger's split-out stages: RowIntake and WordPacker.

Random stimulus with random valid/ready; the golden models are the data movement each stage
promises (rows kept whole per channel with their beat indices; words packed contiguously).
"""
import numpy as np
import pytest
from amaranth.sim import Simulator

from evssd.hw.device.merger import row_layout
from evssd.hw.device.merger_intake import RowIntake
from evssd.hw.device.merger_packer import WordPacker
from evssd.hw.regmap import Params


@pytest.mark.parametrize("n_ch, ch_bits, max_row", [(3, 64, 64), (1, 32, 32), (4, 128, 512)])
def test_row_intake_random(n_ch, ch_bits, max_row):
    params = Params(n_channels=n_ch, ch_data_bits=ch_bits, max_row_bytes=max_row, page_size=512)
    n_slots = 8
    dut = RowIntake(params, n_slots, row_layout(params, n_slots))
    rng = np.random.default_rng(n_ch * 100 + ch_bits)
    max_beats = -(-max_row * 8 // ch_bits)
    # per channel: rows of random length, beats numbered so the golden order is checkable
    sent = [[] for _ in range(n_ch)]
    for c in range(n_ch):
        for r in range(12):
            nb = int(rng.integers(1, max_beats + 1))
            for b in range(nb):
                sent[c].append(dict(data=int(rng.integers(0, 1 << 30)) | (c << 30) if ch_bits > 32
                                    else int(rng.integers(0, 1 << 30)),
                                    last=int(b == nb - 1), err=int(rng.random() < 0.1),
                                    tag=int(rng.integers(0, n_slots)), idx=b, ch=c))
    total = sum(len(s) for s in sent)
    got = []

    async def tb(ctx):
        pos = [0] * n_ch
        cur = [None] * n_ch
        cycles = 0
        while len(got) < total:
            cycles += 1
            assert cycles < 20 * total + 100, "intake hung"
            for c in range(n_ch):
                if cur[c] is None and pos[c] < len(sent[c]) and rng.random() < 0.6:
                    cur[c] = sent[c][pos[c]]
                    pos[c] += 1
                    ctx.set(dut.i_row[c].payload, {k: cur[c][k] for k in ("data", "last", "err", "tag")})
                ctx.set(dut.i_row[c].valid, cur[c] is not None)
            sample = []
            for c in range(n_ch):
                sample += [dut.i_row[c].valid, dut.i_row[c].ready]
            _, _, ov, ob, oi, *v = await ctx.tick().sample(
                dut.o_beat.valid, dut.o_beat.payload.beat, dut.o_beat.payload.idx, *sample)
            for c in range(n_ch):
                if v[2 * c] and v[2 * c + 1]:
                    cur[c] = None
            if ov:
                got.append((int(ob.data), int(ob.last), int(ob.err), int(ob.tag), int(oi)))
        for _ in range(10):
            _, _, ov = await ctx.tick().sample(dut.o_beat.valid)
            assert not ov, "a beat out of nothing"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    # golden: every beat exactly once, each channel's beats in its order, the beat index = the
    # beat's position in its row (channels interleave only where a channel pauses mid-row)
    assert len(got) == total
    heads = [0] * n_ch
    as_tuple = lambda b: (b["data"], b["last"], b["err"], b["tag"], b["idx"])  # noqa: E731
    for i, g in enumerate(got):
        c = next((c for c in range(n_ch) if heads[c] < len(sent[c])
                  and as_tuple(sent[c][heads[c]]) == g), None)
        assert c is not None, f"output beat {i} {g} is not the next beat of any channel"
        heads[c] += 1
    assert heads == [len(s) for s in sent]


@pytest.mark.parametrize("k, h", [(2, 2), (4, 1), (1, 4), (3, 2), (16, 4)])
def test_word_packer_random(k, h):
    dut = WordPacker(k, h)
    rng = np.random.default_rng(k * 10 + h)
    # commands: groups of inputs with 0..k words, the last with `last` (and maybe `err`)
    inputs, expected = [], []
    word = 1
    for cmd in range(25):
        words, n_in = [], int(rng.integers(1, 6))
        err = bool(rng.random() < 0.3)
        for j in range(n_in):
            # a command's last input carries words (an empty end after a sent beat has no
            # beat for `last`: the merger's documented 0-byte-row case, not tested here)
            cnt = int(rng.integers(1 if j == n_in - 1 else 0, k + 1))
            ws = [word + w for w in range(cnt)]
            word += cnt
            words += ws
            inputs.append(dict(ws=ws, last=j == n_in - 1, err=err and j == n_in - 1))
        for s in range(0, len(words), h):
            chunk = words[s:s + h]
            expected.append((chunk + [0] * (h - len(chunk)), s + h >= len(words),
                             err and s + h >= len(words)))
    got = []

    async def tb(ctx):
        pos, cur, cycles = 0, None, 0
        while len(got) < len(expected) or pos < len(inputs) or cur is not None:
            cycles += 1
            assert cycles < 10 * len(inputs) + 10 * len(expected) + 100, "packer hung"
            if cur is None and pos < len(inputs) and rng.random() < 0.7:
                cur = inputs[pos]
                pos += 1
                d = sum(w << (32 * i) for i, w in enumerate(cur["ws"]))
                ctx.set(dut.i_words.payload, dict(data=d, count=len(cur["ws"]),
                                                  last=cur["last"], err=cur["err"]))
            ctx.set(dut.i_words.valid, cur is not None)
            ctx.set(dut.o_beat.ready, bool(rng.random() < 0.6))
            _, _, iv, ir, ov, orr, od = await ctx.tick().sample(
                dut.i_words.valid, dut.i_words.ready, dut.o_beat.valid, dut.o_beat.ready,
                dut.o_beat.payload)
            if iv and ir:
                cur = None
            if ov and orr:
                data = int(od.data)
                got.append(([(data >> (32 * i)) & 0xFFFF_FFFF for i in range(h)],
                             bool(od.last), bool(od.err)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert got == expected
