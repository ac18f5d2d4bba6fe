"""FlashChannelController (EV-FC) against a golden model: row bytes, AXI bursts, counters, the
page-register (LRU) policy and the tR timing properties, under random stalls on every stream and
every AXI channel (tests/hw/axi_mem.py)."""
from __future__ import annotations

import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.device.channel import FlashChannelController, WayModel
from evssd.hw.regmap import Params

from .axi_mem import AXI4Memory


def expected_bursts(params, page, first_beat, n_beats):
    """(byte address, beats) of each AR/AW burst: split at aligned min(4 KiB, 256-beat) chunks."""
    bb = params.ch_data_bits // 8
    chunk = min(4096 // bb, 256, params.page_size // bb)
    out = []
    cur, rem = first_beat, n_beats
    while rem:
        n = min(rem, chunk - cur % chunk)
        out.append((page * params.page_size + cur * bb, n))
        cur += n
        rem -= n
    return out


class Bench:
    def __init__(self, params, tag_width, *, t_r=0, t_prog=0, block=False, mem_stall=0.0,
                 mem_latency=0, idle=0.0, stall=0.0, seed=0, err_ranges=()):
        self.p = params
        self.tw = tag_width
        self.bb = params.ch_data_bits // 8
        self.t_r, self.t_prog, self.block = t_r, t_prog, block
        self.idle, self.stall = idle, stall
        self.rng = random.Random(seed)
        self.dut = FlashChannelController(params, tag_width, checks=True)
        self.mem = AXI4Memory(self.dut.m_axi, size=params.channel_bytes,
                              data_width=params.ch_data_bits, stall=mem_stall, latency=mem_latency,
                              seed=seed + 1, err_ranges=err_ranges)
        self.mem.mem[:] = self.rng.randbytes(params.channel_bytes)
        self.err_ranges = list(err_ranges)

    def _is_err(self, addr):
        return any(lo <= addr < hi for lo, hi in self.err_ranges)

    # ------------------------------------------------------------ golden model
    def model(self, ops, initial: bytes):
        """Expected rows (bytes, err), bursts, program errors and counters for `ops`."""
        p, bb = self.p, self.bb
        mem = bytearray(initial)
        ways = WayModel(p.ways)
        rows, ar, aw, prog_err = [], [], [], []
        cnt = {"rows": 0, "bytes": 0, "tr_waits": 0, "programs": 0}
        for op in ops:
            if op[0] == "read":
                _, page, offset, length, tag = op
                base = page * p.page_size
                start, end = offset // bb, (offset + length - 1) // bb
                first, n = (0, p.page_size // bb) if self.block else (start, end - start + 1)
                ar += expected_bursts(p, page, first, n)
                err = any(self._is_err(base + b * bb) for b in range(first, end + 1))
                n_out = -(-length // bb)
                # The memory model answers an error beat with zeros.
                page_img = bytearray(mem[base:base + p.page_size])
                for b in range(p.page_size // bb):
                    if self._is_err(base + b * bb):
                        page_img[b * bb:(b + 1) * bb] = bytes(bb)
                data = bytes(page_img[offset:offset + length]).ljust(n_out * bb, b"\0")
                rows.append((data, err, tag))
                cnt["rows"] += 1
                cnt["bytes"] += n * bb
                cnt["tr_waits"] += ways.read(page)
            else:
                _, page, data = op
                base = page * p.page_size
                aw += expected_bursts(p, page, 0, p.page_size // bb)
                bad = any(self._is_err(base + b * bb) for b in range(p.page_size // bb))
                if not bad:
                    mem[base:base + p.page_size] = data
                else:   # the memory model drops nothing: it writes the non-error beats
                    for b in range(p.page_size // bb):
                        if not self._is_err(base + b * bb):
                            mem[base + b * bb:base + (b + 1) * bb] = data[b * bb:(b + 1) * bb]
                prog_err.append(bad)
                ways.program(page)
                cnt["bytes"] += p.page_size
                cnt["programs"] += 1
        return rows, ar, aw, prog_err, cnt, bytes(mem)

    # ------------------------------------------------------------ simulation
    def run(self, ops, max_cycles=200_000, serial=False):
        """Drive `ops` in order; with `serial`, each read waits for the previous row."""
        dut, bb = self.dut, self.bb
        n_reads = sum(op[0] == "read" for op in ops)
        n_progs = len(ops) - n_reads
        initial = bytes(self.mem.mem)
        rows, dones = [], []
        ev = {"accept": [], "done": [], "first_beat": []}
        res = {}

        async def row_sink(ctx):
            rng = random.Random(self.rng.random())
            beats, cyc = [], 0
            while True:
                ready = rng.random() >= self.stall
                ctx.set(dut.o_row.ready, ready)
                _, _, valid, pl = await ctx.tick().sample(dut.o_row.valid, dut.o_row.payload)
                if ready and valid:
                    if not beats:
                        ev["first_beat"].append(cyc)
                    beats.append((pl.data, pl.err, pl.tag))
                    if pl.last:
                        data = b"".join(d.to_bytes(bb, "little") for d, _, _ in beats)
                        rows.append((data, bool(beats[-1][1]), [t for _, _, t in beats],
                                     [e for _, e, _ in beats]))
                        ev["done"].append(cyc)
                        beats = []
                cyc += 1

        async def done_sink(ctx):
            rng = random.Random(self.rng.random())
            while True:
                ready = rng.random() >= self.stall
                ctx.set(dut.o_prog_done.ready, ready)
                _, _, valid, pl = await ctx.tick().sample(dut.o_prog_done.valid,
                                                          dut.o_prog_done.payload)
                if ready and valid:
                    dones.append(bool(pl.err))

        async def driver(ctx):
            rng = random.Random(self.rng.random())
            ctx.set(dut.t_r, self.t_r)
            ctx.set(dut.t_prog, self.t_prog)
            ctx.set(dut.block_mode, self.block)
            cyc = 0

            async def push(strm, payload):
                nonlocal cyc
                while rng.random() < self.idle:
                    ctx.set(strm.valid, 0)
                    await ctx.tick()
                    cyc += 1
                ctx.set(strm.valid, 1)
                ctx.set(strm.payload, payload)
                while True:
                    _, _, ready = await ctx.tick().sample(strm.ready)
                    cyc += 1
                    if ready:
                        break
                ctx.set(strm.valid, 0)
                return cyc - 1

            for op in ops:
                if op[0] == "read":
                    _, page, offset, length, tag = op
                    ev["accept"].append(await push(dut.i_read, {
                        "page": page, "offset": offset, "length": length, "tag": tag}))
                    while serial and len(rows) < len(ev["accept"]):
                        await ctx.tick()
                        cyc += 1
                else:
                    _, page, data = op
                    await push(dut.i_prog, {"page": page})
                    for b in range(self.p.page_size // bb):
                        await push(dut.i_prog_data,
                                   {"data": int.from_bytes(data[b * bb:(b + 1) * bb], "little")})
            while len(rows) < n_reads or len(dones) < n_progs:
                await ctx.tick()
                cyc += 1
                assert cyc < max_cycles, f"hang: {len(rows)}/{n_reads} rows, {len(dones)}/{n_progs} programs"
            # Block mode: the page's trailing beats still cross the bus after the row is out.
            while self.mem._ar or self.mem._aw or self.mem._b:
                await ctx.tick()
                cyc += 1
            for _ in range(8):
                await ctx.tick()
            res["cycles"] = cyc
            res["cnt"] = {k: ctx.get(getattr(dut, "cnt_" + k))
                          for k in ("rows", "bytes", "tr_waits", "busy", "programs")}
            # clear_counters zeroes every counter
            ctx.set(dut.clear_counters, 1)
            await ctx.tick()
            ctx.set(dut.clear_counters, 0)
            await ctx.tick()
            res["cleared"] = [ctx.get(getattr(dut, "cnt_" + k))
                              for k in ("rows", "bytes", "tr_waits", "busy", "programs")]

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        self.mem.add_to(sim)
        sim.add_testbench(row_sink, background=True)
        sim.add_testbench(done_sink, background=True)
        sim.add_testbench(driver)
        sim.run()
        res["rows"], res["dones"], res["ev"] = rows, dones, ev
        res["initial"] = initial
        return res

    def check(self, ops, res, *, exact_busy=True):
        rows, ar, aw, prog_err, cnt, final = self.model(ops, res["initial"])
        assert len(res["rows"]) == len(rows)
        for k, ((data, err, tag), (gdata, gerr, gtags, gerrs)) in enumerate(zip(rows, res["rows"])):
            read = [op for op in ops if op[0] == "read"][k]
            assert gdata == data, f"row {k} {read}: bytes differ"
            assert gerr == err, f"row {k} {read}: err {gerr} != {err}"
            assert all(t == tag for t in gtags), f"row {k}: tags {gtags} != {tag}"
            assert gerrs == sorted(gerrs), f"row {k}: err not sticky {gerrs}"
        assert self.mem.ar_log == ar
        assert self.mem.aw_log == aw
        assert res["dones"] == prog_err
        assert bytes(self.mem.mem) == final
        got = dict(res["cnt"])
        busy = got.pop("busy")
        assert got == cnt
        assert res["cleared"] == [0] * 5
        if exact_busy:
            # Busy cycles = edges with a read outstanding (accepted, last beat not yet delivered).
            acc, done = res["ev"]["accept"], res["ev"]["done"]
            horizon = max(done, default=0) + 1
            want = sum(1 for e in range(horizon)
                       if sum(a < e for a in acc) > sum(d < e for d in done))
            assert busy == want
        else:
            assert 0 < busy <= res["cycles"]


def random_reads(params, rng, n, tag_width, n_pages=None, max_len=None):
    pages = rng.sample(range(params.pages_per_channel), n_pages or params.ways + 2)
    ops = []
    for _ in range(n):
        length = 4 * rng.randint(1, (max_len or min(params.page_size, 400)) // 4)
        offset = 4 * rng.randint(0, (params.page_size - length) // 4)
        ops.append(("read", rng.choice(pages), offset, length, rng.randrange(1 << tag_width)))
    return ops


CONFIGS = {
    "ch32-w1": (Params(ch_data_bits=32, ways=1, page_size=2048, pages_per_channel=16), 3),
    "ch64-w4": (Params(ch_data_bits=64, ways=4, page_size=1024, pages_per_channel=32), 8),
    "ch256-w4": (Params(ch_data_bits=256, ways=4, page_size=8192, pages_per_channel=8), 12),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("stalls", [False, True])
def test_fine_grained_reads(name, stalls):
    params, tw = CONFIGS[name]
    seed = list(CONFIGS).index(name) * 10 + stalls
    s = 0.3 if stalls else 0.0
    b = Bench(params, tw, t_r=7, mem_stall=s, mem_latency=3 if stalls else 0, idle=s, stall=s,
              seed=seed)
    ops = random_reads(params, random.Random(seed), 40, tw,
                       max_len=256 if params.ch_data_bits == 32 else None)
    ops.insert(20, ("read", ops[0][1], 0, params.page_size, 1))   # READ_PAGES: a whole page
    b.check(ops, b.run(ops))


@pytest.mark.parametrize("name", CONFIGS)
def test_block_mode_moves_whole_pages(name):
    params, tw = CONFIGS[name]
    b = Bench(params, tw, t_r=5, block=True, mem_stall=0.3, mem_latency=2, idle=0.3, stall=0.3,
              seed=11)
    ops = random_reads(params, random.Random(5), 4 if params.ch_data_bits == 32 else 8, tw)
    res = b.run(ops)
    b.check(ops, res, exact_busy=False)


@pytest.mark.parametrize("name", ["ch32-w1", "ch64-w4"])
def test_programs_and_reads_interleaved(name):
    params, tw = CONFIGS[name]
    rng = random.Random(3)
    ps = params.page_size
    bad_page = 3
    b = Bench(params, tw, t_r=20, t_prog=30, mem_stall=0.3, mem_latency=1, idle=0.3, stall=0.3,
              seed=4, err_ranges=[(bad_page * ps + 64, bad_page * ps + 96)])
    ops = []
    for _ in range(3):
        ops += random_reads(params, rng, 4, tw, n_pages=3, max_len=128)
        page = rng.choice([bad_page, *range(5)])
        ops.append(("prog", page, rng.randbytes(ps)))
        ops.append(("read", page, 0, 64, 1))    # re-read what was just programmed: pays tR again
    ops.append(("prog", bad_page, rng.randbytes(ps)))
    ops.append(("read", bad_page, 60, 40, 2))   # overlaps the error range: err on its row
    ops.append(("read", bad_page, 0, 32, 3))
    res = b.run(ops)
    b.check(ops, res, exact_busy=False)
    assert any(res["dones"]) and not all(res["dones"])
    assert any(r[1] for r in res["rows"])


def _lat(res):
    return [f - a for a, f in zip(res["ev"]["accept"], res["ev"]["first_beat"])]


def test_page_register_hit_skips_tr():
    params, tw = CONFIGS["ch64-w4"]
    t_r = 200
    b = Bench(params, tw, t_r=t_r, seed=9)
    # One read at a time (the driver waits for each row before the next), so latency is clean.
    ops = [("read", 5, 0, 64, 0), ("read", 5, 512, 64, 1), ("read", 6, 8, 16, 2),
           ("read", 5, 128, 8, 3)]
    res = b.run(ops, serial=True)
    b.check(ops, res)
    lat = _lat(res)
    assert lat[0] >= t_r and lat[2] >= t_r          # misses pay tR
    assert lat[1] < 10 and lat[3] < 10              # hits do not


def test_misses_overlap_up_to_ways():
    t_r = 300
    for ways, pages in ((4, 4), (1, 4)):
        params = Params(ch_data_bits=64, ways=ways, page_size=1024, pages_per_channel=32)
        b = Bench(params, 4, t_r=t_r, seed=2)
        ops = [("read", pg, 0, 64, pg) for pg in range(pages)]
        res = b.run(ops)
        b.check(ops, res)
        span = res["ev"]["done"][-1] - res["ev"]["accept"][0]
        if ways >= pages:
            assert t_r <= span < t_r + 50, span          # all tR waits overlap
        else:
            assert span >= pages * t_r, span              # one page register: serial


@pytest.mark.parametrize("row", [8, 64])
def test_sustained_read_throughput(row):
    """Many outstanding page-register hits keep the R channel streaming: AR of the next request
    is issued while R of the previous one is in flight (memory latency 4 cycles)."""
    params, tw = CONFIGS["ch64-w4"]
    b = Bench(params, tw, t_r=0, mem_latency=4, seed=1)
    n = 64
    ops = [("read", 2, (k * row) % params.page_size, row, k % 256) for k in range(n)]
    res = b.run(ops)
    b.check(ops, res)
    beats = n * row // 8
    span = res["ev"]["done"][-1] - res["ev"]["accept"][0]
    assert span <= beats + 10, (span, beats)
