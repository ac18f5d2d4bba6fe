"""L1 tests of the ResultMerger's components: RowIntake, DescriptorQueue, RowEntries,
IssueStage, BagEmitter, ReadStages, AccumulatorPath, OutputQueue and WordPacker.

Random stimulus with random valid/ready (or random idle cycles and credits where a port has no
ready); the golden models are what each component promises: rows kept whole per channel with
their beat indices, the op-count rule of a descriptor, the head rows in order with their slots'
flags, the ops of a walk through the rows (and the hazard rules), a bag's words, the stages'
delays, sums equal to ``evssd.host.pooling``'s, output ops in order, words packed contiguously.
"""
import numpy as np
import pytest
from amaranth import Shape
from amaranth.lib import data
from amaranth.sim import Simulator

from evssd.hw.device.merger_accum import AccumulatorPath
from evssd.hw.device.merger import ResultMerger, desc_layout, row_layout
from evssd.hw.device.merger_descq import DescriptorQueue
from evssd.hw.device.merger_emitter import BagEmitter
from evssd.hw.device.merger_entries import RowEntries
from evssd.hw.device.merger_intake import RowIntake
from evssd.hw.device.merger_issue import IssueStage
from evssd.hw.device.merger_layouts import (ACCUM_HAZARD_CYCLES, FMA_HAZARD_CYCLES,
                                            FMA_PATH_LATENCY, MergerGeometry, emit_op_layout,
                                            entry_layout, issue_op_layout, stage_op_layout)
from evssd.hw.device.merger_outq import OutputQueue
from evssd.hw.device.merger_read_stages import ReadStages
from evssd.hw.lib.fpu import Fp32Adder
from evssd.hw.device.merger_packer import WordPacker, words_layout
from evssd.hw.regmap import ROWWISE_HEADER_BYTES, ElemType, Params

from .streams import receive, send
from .test_merger import Cmd, Lookup, merge_golden, random_row, random_weight


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


# ---------------------------------------------------------------------------------------------
# The components between the intake and the packer. Shared: the merger's geometry and the
# golden op-count rule of a descriptor (what DescriptorQueue precomputes and IssueStage walks).

def _geometry(ch_bits, max_row, n_slots=4, host_bits=64):
    return MergerGeometry(Params(n_channels=1, ch_data_bits=ch_bits, host_data_bits=host_bits,
                                 max_row_bytes=max_row, page_size=512), n_slots)


def entry_golden(d: dict, K: int) -> dict:
    """The entry fields of descriptor ``d``: every element widens to one 32-bit lane, so an op
    takes K elements (GATHER: K words), an INT8_ROWWISE row one more op for its header."""
    pooled, elem, rb = d["pooled"], ElemType(d["elem"]), d["row_bytes"]
    hdr = bool(pooled and elem == ElemType.INT8_ROWWISE and rb > ROWWISE_HEADER_BYTES)
    itemsize = 4 if not pooled else {ElemType.FP16: 2, ElemType.INT8: 1,
                                     ElemType.INT8_ROWWISE: 1}.get(elem, 4)
    n_elems = rb // itemsize - (ROWWISE_HEADER_BYTES if hdr else 0)
    return dict(
        desc={k: d[k] for k, _ in desc_layout(2)}, hdr=int(hdr), sub_shift={4: 0, 2: 1, 1: 2}[itemsize],
        n_ops=1 if n_elems == 0 else -(-n_elems // K) + hdr,
        last_cnt=0 if n_elems == 0 else (n_elems - 1) % K + 1,
        one_op=int(n_elems <= K and not hdr),
        fma=int(bool(pooled and (d["weighted"] or elem == ElemType.INT8_ROWWISE))),
        gather=int(not pooled and not d["empty_bag"]),
        accum=int(pooled and not d["empty_bag"] and not d["bad"]),
        bad_or_empty=int(d["bad"] or d["empty_bag"]),
        pooled_or_empty=int(pooled or d["empty_bag"]),
        goes_emit=int(bool(d["empty_bag"] or (pooled and d["bag_end"]))))


def random_desc(rng, g, slot=0):
    elem = int(rng.integers(0, 5))
    rb = 4 * int(rng.integers(0, g.params.max_row_bytes // 4 + 1))
    return dict(slot=slot, row_bytes=rb, elem=elem, pooled=int(rng.random() < 0.6),
                weighted=int(rng.random() < 0.3), weight=int(rng.integers(0, 1 << 32)),
                bad=int(rng.random() < 0.2), bag_end=int(rng.random() < 0.4),
                empty_bag=int(rng.random() < 0.15), cmd_end=int(rng.random() < 0.3))


def _as_dict(view, layout):
    """A simulator struct value as plain ints (nested structs as dicts)."""
    out = {}
    for name, field in layout:
        v = getattr(view, name)
        out[name] = _as_dict(v, field.shape) if isinstance(field.shape, data.StructLayout) else int(v)
    return out


def _run(dut, *testbenches):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for tb in testbenches:
        sim.add_testbench(tb)
    sim.run()


@pytest.mark.parametrize("ch_bits, max_row, n_slots", [(64, 64, 8), (32, 32, 2), (128, 512, 4)])
def test_descriptor_queue_random(ch_bits, max_row, n_slots):
    g = _geometry(ch_bits, max_row, n_slots)
    dut = DescriptorQueue(g, max(4, 2 * n_slots))
    rng = np.random.default_rng(ch_bits + max_row)
    descs = [random_desc(rng, g, slot=int(rng.integers(0, n_slots))) for _ in range(300)]
    got = []

    async def source(ctx):
        await send(ctx, dut.i_desc, descs, rng, idle=0.3)

    async def sink(ctx):
        await receive(ctx, dut.o_entry, len(descs), rng, stall=0.5, out=got)

    _run(dut, source, sink)
    xl = entry_layout(g)
    assert [_as_dict(e, xl) for e in got] == [entry_golden(d, g.K) for d in descs]


@pytest.mark.parametrize("n_slots", [2, 8])
def test_row_entries_random(n_slots):
    """The head follows i_entry in order; its done/err flags follow the beats (set) and the
    frees (cleared one cycle after the head retires, as the issue stage's registered o_free).
    The testbench plays the engine and the channels: a slot is reused as soon as it is freed,
    and its row's beats (err on any of them, ``last`` on the final one) follow at random."""
    g = _geometry(64, 64, n_slots=n_slots)
    dut = RowEntries(g)
    rng = np.random.default_rng(5 + n_slots)
    n = 300
    sent, heads = [], []
    pool = list(range(n_slots))          # slots free for a new lookup
    beats_left = {}                      # slot in use -> beats of its row still to come

    async def source(ctx):
        cur = None
        while len(sent) < n:
            if cur is None and pool and rng.random() < 0.7:
                slot = pool.pop(int(rng.integers(0, len(pool))))
                cur = entry_golden(random_desc(rng, g, slot=slot), g.K)
                beats_left[slot] = int(rng.integers(0, 4)) if not cur["desc"]["bad"] else 0
                ctx.set(dut.i_entry.payload, cur)
            ctx.set(dut.i_entry.valid, cur is not None)
            _, _, ready = await ctx.tick().sample(dut.i_entry.ready)
            if cur is not None and ready:
                sent.append(cur)
                cur = None
        ctx.set(dut.i_entry.valid, 0)

    async def tb(ctx):
        done, err = [0] * n_slots, [0] * n_slots
        free = None
        for cycle in range(40 * n):
            if len(heads) == n:
                break
            # a beat of a row still arriving (never of the slot being freed)
            arriving = [s for s, left in beats_left.items() if left and s != free]
            beat = bool(arriving) and rng.random() < 0.6
            tag = int(rng.choice(arriving)) if beat else 0
            last = int(beat and beats_left[tag] == 1)
            berr = int(beat and rng.random() < 0.15)
            ctx.set(dut.i_beat.valid, beat)
            ctx.set(dut.i_beat.payload, dict(beat=dict(data=0, last=last, err=berr, tag=tag), idx=0))
            ctx.set(dut.i_free.valid, free is not None)
            ctx.set(dut.i_free.payload, free or 0)
            valid, head, o_done, o_err = (ctx.get(dut.o_head.valid), ctx.get(dut.o_head.payload),
                                          ctx.get(dut.o_done), ctx.get(dut.o_err))
            pop = bool(valid and rng.random() < 0.5)
            ctx.set(dut.o_head.ready, pop)
            if valid:
                slot = int(head.desc.slot)
                assert (o_done, o_err) == (done[slot], err[slot]), f"cycle {cycle}: flags"
            await ctx.tick()
            if free is not None:
                done[free] = err[free] = 0
                beats_left.pop(free, None)
                pool.append(free)
            if beat:
                done[tag] |= last
                err[tag] |= berr
                beats_left[tag] -= 1
            free = None
            if pop:
                heads.append(_as_dict(head, entry_layout(g)))
                free = int(head.desc.slot)
        assert len(heads) == n, "row entries hung"

    _run(dut, source, tb)
    assert heads == sent


def random_commands(rng, g, n_cmds):
    """Descriptors of whole commands in request order (GATHER lookups, or pooled bags with
    empty-bag tokens), each with the testbench's facts: ``err`` (the row arrives with err) and
    ``delay`` (cycles from becoming the head to the row's arrival)."""
    rowwise_ok = g.K <= ROWWISE_HEADER_BYTES
    descs = []
    for _ in range(n_cmds):
        pooled = int(rng.random() < 0.6)
        elem = int(rng.integers(0, 5 if pooled and rowwise_ok else 4))
        weighted = int(pooled and rng.random() < 0.3)
        rb = 4 * int(rng.integers(0 if not pooled else 1, g.params.max_row_bytes // 4 + 1))
        if elem == ElemType.INT8_ROWWISE:
            rb = max(rb, 8)
        if pooled:
            bags = [int(rng.choice([0, 1, 2, 3])) for _ in range(int(rng.integers(1, 4)))]
        else:
            bags = [int(rng.integers(1, 5))]
        items = []
        for n in bags:
            if pooled and n == 0:
                items.append(dict(empty_bag=1, bag_end=0, bad=0))
            for k in range(n):
                items.append(dict(empty_bag=0, bag_end=int(pooled and k == n - 1),
                                  bad=int(rng.random() < 0.15)))
        for k, it in enumerate(items):
            it.update(row_bytes=rb, elem=elem, pooled=pooled, weighted=weighted,
                      weight=int(rng.integers(0, 1 << 32)), cmd_end=int(k == len(items) - 1),
                      slot=0, err=int(not it["bad"] and not it["empty_bag"] and rng.random() < 0.1),
                      delay=int(rng.integers(0, 25)))
            descs.append(it)
    return descs


def issue_golden(g, descs):
    """(ops, bags, frees) the issue stage sends for ``descs`` (with their slots): each op as
    the fields it promises, in order."""
    ops, bags, frees = [], [], []
    bank, bag_good, cmd_err = 0, False, False
    for d in descs:
        x = entry_golden(d, g.K)
        n, last_cnt = x["n_ops"], x["last_cnt"]
        cmd_err |= bool(d["err"])
        good = x["accum"] and not d["err"]
        if x["gather"]:
            for j in range(n):
                ops.append(dict(kind="out", zero=int(bool(d["bad"] or d["err"])),
                                count=last_cnt if j == n - 1 else g.K,
                                last=int(d["cmd_end"] and j == n - 1),
                                rob=(d["slot"] << g.beat_bits) | j,
                                err=int(cmd_err) if d["cmd_end"] and j == n - 1 else None))
        elif good:
            mask = (1 << x["sub_shift"]) - 1
            for j in range(n):
                rj = j + g.hoff if x["hdr"] else j
                ops.append(dict(kind="hdr" if x["hdr"] and j == 0 else "accum",
                                rob=(d["slot"] << g.beat_bits) | (rj >> x["sub_shift"]),
                                addr=(bank << g.acc_jbits) | j, sub=rj & mask,
                                first=int(not bag_good), elem=d["elem"], fma=x["fma"],
                                rowwise=x["hdr"], weighted=d["weighted"], weight=d["weight"],
                                row_start=j == 0))
            bag_good = True
        if not d["empty_bag"]:
            frees.append(d["slot"])
        if x["goes_emit"]:
            bags.append(dict(bank=bank, n=n, last_cnt=last_cnt, zero=int(not bag_good),
                             cmd_last=d["cmd_end"], hdr=x["hdr"],
                             err=int(cmd_err) if d["cmd_end"] else None))
            bank ^= 1
            bag_good = False
        if d["cmd_end"]:
            cmd_err = False
    return ops, bags, frees


@pytest.mark.parametrize("ch_bits, max_row", [(64, 64), (32, 32), (128, 64)])
def test_issue_stage_random(ch_bits, max_row):
    """Ops, bag handovers and frees in request order against a golden walk of the rows, under
    random row arrival, emitter busy times and output credits; and the rules the stages behind
    rely on: pooled rows of a bag start the hazard distance apart and never stall, adder rows
    keep off the FMA path's write cycles, no output op without a credit or while the emitter
    is busy."""
    g = _geometry(ch_bits, max_row, n_slots=4)
    dut = IssueStage(g)
    rng = np.random.default_rng(ch_bits * 3 + max_row)
    descs = random_commands(rng, g, 60)
    for k, d in enumerate(descs):          # slots in turn: at most n_slots rows in flight
        d["slot"] = k % g.n_slots
    exp_ops, exp_bags, exp_frees = issue_golden(g, descs)
    ops, bags, frees = [], [], []
    L, LF = Fp32Adder.LATENCY, FMA_PATH_LATENCY

    async def tb(ctx):
        pos, head_since, busy_until = 0, 0, -1
        row_start, last_fma, bag_row_start, in_row = None, -100, None, False
        for cycle in range(100 * len(descs)):
            if pos == len(descs) and len(frees) == len(exp_frees):
                break
            have = pos < len(descs)
            d = descs[pos] if have else descs[-1]
            arrived = have and not d["bad"] and not d["empty_bag"] and \
                cycle >= head_since + d["delay"]
            busy = cycle <= busy_until
            ok = bool(rng.random() < 0.7)
            ctx.set(dut.i_row.valid, have)
            ctx.set(dut.i_row.payload, entry_golden(d, g.K))
            ctx.set(dut.i_done, arrived)
            ctx.set(dut.i_err, arrived and d["err"])
            ctx.set(dut.i_emit_busy, busy)
            ctx.set(dut.i_out_ok, ok)
            (ov, op, rob, acc, used, bv, bag, fv, fs, pop) = (
                ctx.get(dut.o_op.valid), ctx.get(dut.o_op.payload), ctx.get(dut.o_rob_addr),
                ctx.get(dut.o_acc_addr), ctx.get(dut.o_acc_used), ctx.get(dut.o_bag.valid),
                ctx.get(dut.o_bag.payload), ctx.get(dut.o_free.valid), ctx.get(dut.o_free.payload),
                ctx.get(dut.i_row.ready))
            if fv:
                frees.append(int(fs))
            assert not pop or have, "ready without a row"
            if ov:
                if op.out:
                    assert ok and not busy, f"cycle {cycle}: output op without credit / while busy"
                    ops.append(dict(kind="out", zero=int(op.zero), count=int(op.count),
                                    last=int(op.last), rob=int(rob),
                                    err=int(op.err) if op.last else None))
                else:
                    kind = "hdr" if op.hdr else "accum"
                    assert int(used) == int(kind == "accum" and not op.first)
                    assert kind == "hdr" or int(acc) == int(op.addr)
                    start = not in_row
                    ops.append(dict(kind=kind, rob=int(rob), addr=int(op.addr), sub=int(op.sub),
                                    first=int(op.first), elem=int(op.elem), fma=int(op.fma),
                                    rowwise=int(op.rowwise), weighted=int(op.weighted),
                                    weight=int(op.weight), row_start=start))
                    if start:
                        if bag_row_start is not None:
                            gap = FMA_HAZARD_CYCLES if op.fma else ACCUM_HAZARD_CYCLES
                            assert cycle - bag_row_start >= gap, f"cycle {cycle}: hazard"
                        if not op.fma:
                            assert cycle - last_fma > LF - L, f"cycle {cycle}: write port"
                        bag_row_start = cycle
                    elif in_row:
                        assert cycle == row_start + 1, f"cycle {cycle}: a started row stalled"
                    row_start, in_row = cycle, not pop
                    if op.fma:
                        last_fma = cycle
            else:
                assert not in_row, f"cycle {cycle}: a started pooled row stalled"
            if bv:
                assert not busy, f"cycle {cycle}: bag handed over to a busy emitter"
                bags.append(dict(bank=int(bag.bank), n=int(bag.n), last_cnt=int(bag.last_cnt),
                                 zero=int(bag.zero), cmd_last=int(bag.cmd_last), hdr=int(bag.hdr),
                                 err=int(bag.err) if bag.cmd_last else None))
                busy_until = cycle + 1 + int(rng.integers(0, 8))
                bag_row_start = None
            await ctx.tick()
            if pop:
                pos += 1
                head_since = cycle + 1 + int(rng.integers(0, 3)) * (rng.random() < 0.3)
        assert pos == len(descs), "issue stage hung"
        await ctx.tick()
        if ctx.get(dut.o_free.valid):
            frees.append(int(ctx.get(dut.o_free.payload)))

    _run(dut, tb)
    assert ops == exp_ops
    assert bags == exp_bags
    assert frees == exp_frees


@pytest.mark.parametrize("ch_bits, max_row", [(64, 64), (32, 32), (512, 256)])
def test_bag_emitter_random(ch_bits, max_row):
    """Each bag's words in order (row-wise bags from word 1), count/last/err on the last word,
    the read address of each; the first sum waits the cooldown + 2 after the take-over, zeros
    go at once, and an op goes in every cycle it may (a credit, the wait over)."""
    g = _geometry(ch_bits, max_row)
    dut = BagEmitter(g)
    rng = np.random.default_rng(ch_bits + 1)
    bags = []
    for _ in range(60):
        n = int(rng.integers(1, g.max_ops + 1))
        bags.append(dict(bank=int(rng.integers(0, 2)), n=n, last_cnt=int(rng.integers(1, g.K + 1)),
                         zero=int(rng.random() < 0.3), cmd_last=int(rng.random() < 0.5),
                         err=int(rng.random() < 0.3), hdr=int(n >= 2 and rng.random() < 0.3)))
    expected = [dict(zero=b["zero"], count=b["last_cnt"] if j == b["n"] - 1 else g.K,
                     last=int(b["cmd_last"] and j == b["n"] - 1), err=int(b["err"] and j == b["n"] - 1),
                     addr=(b["bank"] << g.acc_jbits) | j)
                for b in bags for j in range(b["hdr"], b["n"])]
    got = []

    async def tb(ctx):
        pending = list(bags)
        handed, busy, cur, j, wait = False, False, None, 0, 0
        for cycle in range(50 * len(expected) + 100):
            if not pending and not busy and not handed:
                break
            ok = bool(rng.random() < 0.6)
            cooldown = int(rng.integers(0, FMA_HAZARD_CYCLES))
            give = bool(pending) and not (busy or handed) and rng.random() < 0.4
            ctx.set(dut.i_ok, ok)
            ctx.set(dut.i_cooldown, cooldown)
            ctx.set(dut.i_bag.valid, give)
            ctx.set(dut.i_bag.payload, pending[0] if give else bags[0])
            fire = busy and (cur["zero"] or wait == 0) and ok
            assert ctx.get(dut.o_busy) == (busy or handed), f"cycle {cycle}: busy"
            assert ctx.get(dut.o_op.valid) == fire, f"cycle {cycle}: op"
            if fire:
                op = ctx.get(dut.o_op.payload)
                got.append(dict(zero=int(op.zero), count=int(op.count), last=int(op.last),
                                err=int(op.err), addr=int(ctx.get(dut.o_read_addr))))
            await ctx.tick()
            if handed:
                cur, busy, j, wait = taken, True, taken["hdr"], cooldown + 2
            else:
                wait = max(wait - 1, 0)
                if fire:
                    j += 1
                    busy = j < cur["n"]
            handed = give
            if give:
                taken = pending.pop(0)
        assert not pending and not busy, "emitter hung"

    _run(dut, tb)
    assert got == expected


def test_read_stages_random():
    """Stage Q holds the cycle's op one cycle later (the emitter's output facts over the issue
    stage's), stage R the same one cycle after that."""
    g = _geometry(64, 64)
    dut = ReadStages(g)
    rng = np.random.default_rng(11)
    il, el, sl = issue_op_layout(g), emit_op_layout(g), stage_op_layout(g)

    def rand(layout):
        return {k: int(rng.integers(0, 1 << Shape.cast(f.shape).width)) for k, f in layout}

    async def tb(ctx):
        history = []
        for cycle in range(500):
            iss, em = rand(il), rand(el)
            iv = bool(rng.random() < 0.5)
            ev = bool(rng.random() < 0.4) and not (iv and iss["out"])
            ctx.set(dut.i_issue.valid, iv)
            ctx.set(dut.i_issue.payload, iss)
            ctx.set(dut.i_emit.valid, ev)
            ctx.set(dut.i_emit.payload, em)
            out = (iv and iss["out"]) or ev
            assert ctx.get(dut.o_out_fire) == out
            q = dict(iss, accum=int(iv and iss["accum"]), hdr=int(iv and iss["hdr"]),
                     out=int(out), is_sum=int(ev))
            if ev:
                q.update(em)
            history.append(q)
            if cycle >= 2:
                assert _as_dict(ctx.get(dut.o_q), sl) == history[-2], f"cycle {cycle}: stage Q"
                assert _as_dict(ctx.get(dut.o_r), sl) == history[-3], f"cycle {cycle}: stage R"
            await ctx.tick()

    _run(dut, tb)


@pytest.mark.parametrize("ch_bits", [64, 256])
def test_output_queue_random(ch_bits):
    """Output ops fired under the credit (``o_ok``) and arriving in stage R two cycles later
    come out in order as zeros, the ROB beat or the accumulator word, under random
    back-pressure; the queue never overflows (its simulation Assert)."""
    g = _geometry(ch_bits, 64)
    depth = ResultMerger.OUT_FIFO_DEPTH
    dut = OutputQueue(g, depth)
    rng = np.random.default_rng(ch_bits + 7)
    n = 400
    expected, got = [], []

    async def source(ctx):
        fired = [None, None]             # the ops in stages Q and R
        sent = 0
        for cycle in range(40 * n):
            if sent == n and fired == [None, None]:
                break
            fire = sent < n and ctx.get(dut.o_ok) and rng.random() < 0.8
            op = None
            if fire:
                op = dict(zero=int(rng.random() < 0.2), is_sum=int(rng.random() < 0.5),
                          count=int(rng.integers(0, g.K + 1)), last=int(rng.random() < 0.2),
                          err=int(rng.random() < 0.2),
                          rob=int.from_bytes(rng.bytes(g.Wc // 8), "little"),
                          acc=int.from_bytes(rng.bytes(g.Wc // 8), "little"))
                sent += 1
            r = fired[1]
            ctx.set(dut.i_fire, fire)
            ctx.set(dut.i_r, dict(out=int(r is not None), **({k: r[k] for k in (
                "zero", "is_sum", "count", "last", "err")} if r else {})))
            ctx.set(dut.i_rob_data, r["rob"] if r else 0)
            ctx.set(dut.i_acc_data, r["acc"] if r else 0)
            if r:
                data = 0 if r["zero"] else (r["acc"] if r["is_sum"] else r["rob"])
                expected.append(dict(data=data, count=r["count"], last=r["last"], err=r["err"]))
            fired = [op, fired[0]]
            await ctx.tick()
        assert sent == n
        ctx.set(dut.i_r.out, 0)

    async def sink(ctx):
        await receive(ctx, dut.o_words, n, rng, stall=0.5, out=got)

    _run(dut, source, sink)
    assert [_as_dict(w, words_layout(g.K)) for w in got] == expected


@pytest.mark.parametrize("ch_bits, max_row", [(64, 64), (32, 32), (128, 64), (256, 128)])
def test_accumulator_path_random(ch_bits, max_row):
    """Bags of random rows summed by accumulate ops as the issue stage sends them (rows of a bag
    the hazard distance apart plus random gaps, a row's ops back to back, the two banks in
    turn, each bag read back through the emitter's port while the next one sums): every sum
    equals ``evssd.host.pooling``'s, for every element type, weighted and row-wise INT8 too."""
    g = _geometry(ch_bits, max_row)
    dut = AccumulatorPath(g)
    rng = np.random.default_rng(ch_bits * 5 + max_row)
    L, LF = Fp32Adder.LATENCY, FMA_PATH_LATENCY
    cb = g.Wc // 8
    issue, reads = {}, {}                # cycle -> op; cycle -> (bag, word)
    bags, t, last_fma, bank_free = [], 0, -100, [0, 0]
    for b in range(14):
        weighted = int(rng.random() < 0.3)
        rowwise = g.K <= ROWWISE_HEADER_BYTES and rng.random() < 0.25
        elem = ElemType.INT8_ROWWISE if rowwise else ElemType(int(rng.integers(0, 4)))
        rb = 4 * int(rng.integers(1, max_row // 4 + 1))
        rb = max(rb, 8) if rowwise else rb
        rows = [Lookup(random_row(rng, elem, rb), weight=random_weight(rng))
                for _ in range(int(rng.integers(1, 4)))]
        x = entry_golden(dict(slot=0, row_bytes=rb, elem=int(elem), pooled=1, weighted=weighted,
                              weight=0, bad=0, bag_end=1, empty_bag=0, cmd_end=1), g.K)
        bank, mask = b % 2, (1 << x["sub_shift"]) - 1
        t = max(t, bank_free[bank]) if x["fma"] else max(t, bank_free[bank], last_fma + LF - L + 1)
        for r, lk in enumerate(rows):
            start = t
            for j in range(x["n_ops"]):
                rj = j + g.hoff if x["hdr"] else j
                padded = lk.row + rng.bytes(-len(lk.row) % cb)
                beat = rj >> x["sub_shift"]
                issue[t] = dict(accum=int(not (x["hdr"] and j == 0)), hdr=int(x["hdr"] and j == 0),
                                first=int(r == 0), addr=(bank << g.acc_jbits) | j, sub=rj & mask,
                                elem=int(elem), fma=x["fma"], rowwise=x["hdr"], weighted=weighted,
                                weight=lk.weight,
                                data=int.from_bytes(padded[beat * cb:(beat + 1) * cb], "little"))
                if x["fma"]:
                    last_fma = t
                t += 1
            gap = FMA_HAZARD_CYCLES if x["fma"] else ACCUM_HAZARD_CYCLES
            t = max(t, start + gap + int(rng.integers(0, 3)))
        # the emitter reads the bag once its last sums are written; the bag after next (same
        # bank) starts after those reads
        r0 = max(t + LF + 2, max(reads, default=0) + 1)      # one bag at a time
        words = range(x["hdr"], x["n_ops"])
        for k, j in enumerate(words):
            reads[r0 + k] = (b, (bank << g.acc_jbits) | j)
        bank_free[bank] = r0 + len(words) + 1
        exp, _ = merge_golden(Cmd(True, elem, rb, [rows], weighted=bool(weighted)))
        bags.append(dict(expected=exp, got=b"", info=(elem.name, weighted, rb, len(rows))))
    end = max(reads) + 4

    async def tb(ctx):
        pipe = [None, None]              # the ops issued one and two cycles ago (stages Q, R)
        read_pipe = [None, None]
        for cycle in range(end):
            op = issue.get(cycle)
            ctx.set(dut.i_read_addr, op["addr"] if op else 0)
            ctx.set(dut.i_read_used, bool(op and op["accum"] and not op["first"]))
            q, r = pipe
            ctx.set(dut.i_q, dict(accum=q["accum"], addr=q["addr"]) if q else dict(accum=0))
            ctx.set(dut.i_r, {k: v for k, v in r.items() if k != "data"} if r else dict(accum=0))
            ctx.set(dut.i_rob_data, r["data"] if r else 0)
            rd = reads.get(cycle)
            ctx.set(dut.i_emit_addr, rd[1] if rd else 0)
            ctx.set(dut.i_emit_used, rd is not None)
            if read_pipe[1] is not None:
                bags[read_pipe[1][0]]["got"] += ctx.get(dut.o_emit_data).to_bytes(cb, "little")
            pipe = [op, q]
            read_pipe = [rd, read_pipe[0]]
            await ctx.tick()

    _run(dut, tb)
    for b, bag in enumerate(bags):
        assert bag["got"][:len(bag["expected"])] == bag["expected"], f"bag {b} {bag['info']}"
