"""cocotb bench: the whole EV-SSD driven by the real host driver (AsyncDevice over CocotbTransport).

Every flash channel is a cocotbext-axi AxiRam; the host memory is the transport's AxiRam; all of
them stall at random on every AXI channel. The scoreboard is twofold: a numpy golden computed
here from the table contents (gather rows, ``pool_rows`` sums, bad-index accounting), and the
functional model (:class:`evssd.host.model.ModelTransport`) running the very same command stream
through the same driver; results, status, n_bad and first_bad must match both bit for bit.
"""
from __future__ import annotations

import os
import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles
from cocotbext.axi import AxiBus, AxiRam

from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.host.pooling import pool_rows
from evssd.hw.regmap import (NO_BAD_POSITION, Command, Completion, ElemType, Opcode, Status,
                             pooled_row_bytes)
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, quiet_cocotbext_axi, random_pause, start_clock_and_reset

STALL = float(os.environ.get("EVSSD_STALL", "0.25"))


class Bench:
    def __init__(self, dut, params, seed):
        self.dut = dut
        self.p = params
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.ch_rams = []

    async def start(self):
        dut, p = self.dut, self.p
        await start_clock_and_reset(dut)
        self.transport = CocotbTransport(dut, host_memory_bytes=1 << 20, poll_cycles=32)
        self.transport.set_backpressure(self.rng, STALL)
        for c in range(p.n_channels):
            ram = AxiRam(AxiBus.from_prefix(dut, f"m_axi_ch{c}", bus_separator="__"), dut.clk,
                         dut.rst, size=p.channel_bytes)
            if STALL:
                for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel,
                           ram.write_if.w_channel, ram.write_if.b_channel):
                    ch.set_pause_generator(random_pause(self.rng, STALL))
            self.ch_rams.append(ram)
        from evssd.sim.transport import quiet_cocotbext_axi
        quiet_cocotbext_axi()
        self.dev = await AsyncDevice.open(self.transport, expect=p, sq_entries=8, cq_entries=4,
                                          timeout=600.0)
        self.model = await AsyncDevice.open(ModelTransport(p, host_memory_bytes=1 << 20),
                                            sq_entries=8, cq_entries=4)
        for d in (self.dev, self.model):
            await d.set_timing(t_r=50, t_prog=100)
        self.flash = np.zeros((p.total_pages, p.page_size), np.uint8)   # by LBA
        self.tables = {}

    # ------------------------------------------------------------------ tables
    async def make_table(self, table, row_bytes, elem, n_rows, lba0, split=2):
        """Random rows written with PROGRAM_PAGES; the table in ``split`` extents (with a gap of
        indices between them so that some indices fall in no extent)."""
        p = self.p
        elem = ElemType(elem)
        rows_per_page = p.page_size // row_bytes
        dim = row_bytes // elem.itemsize
        if elem == ElemType.FP32:
            vals = self.nprng.standard_normal((n_rows, dim)).astype("<f4")
        elif elem == ElemType.FP16:
            vals = self.nprng.standard_normal((n_rows, dim)).astype("<f2")
        elif elem == ElemType.INT8:
            vals = self.nprng.integers(-128, 128, (n_rows, dim)).astype("i1")
        else:
            vals = self.nprng.integers(-2**31, 2**31, (n_rows, dim)).astype("<i4")
        raw = vals.view(np.uint8).reshape(n_rows, row_bytes)
        extents = []
        per = -(-n_rows // split)
        lba = lba0
        index_of = {}
        first = 0
        for k in range(split):
            rows = raw[k * per:(k + 1) * per]
            if not len(rows):
                break
            n_pages = -(-len(rows) // rows_per_page)
            pages = np.zeros((n_pages, p.page_size), np.uint8)
            for r in range(len(rows)):
                pg, slot = divmod(r, rows_per_page)
                pages[pg, slot * row_bytes:(slot + 1) * row_bytes] = rows[r]
                index_of[first + r] = k * per + r
            for d in (self.dev, self.model):
                await d.program_pages(lba, pages)
            self.flash[lba:lba + n_pages] = pages
            extents.append((first, len(rows), lba))
            lba += n_pages
            first += len(rows) + 7     # a hole of 7 indices between extents
        for d in (self.dev, self.model):
            await d.configure_table(table, row_bytes, elem, extents)
        self.tables[table] = dict(raw=raw, vals=vals, elem=elem, row_bytes=row_bytes,
                                  index_of=index_of, limit=first + 5)
        return lba

    def random_indices(self, table, n, bad_rate=0.1):
        t = self.tables[table]
        keys = list(t["index_of"])
        out = []
        for _ in range(n):
            if self.rng.random() < bad_rate:
                out.append(self.rng.choice([t["limit"] + self.rng.randrange(1000), 0xFFFF_FFFF,
                                            keys[-1] + 1 + self.rng.randrange(7)]))
            else:
                out.append(self.rng.choice(keys))
        return np.array(out, dtype="<u4")

    # ------------------------------------------------------------------ golden
    def golden_gather(self, table, indices):
        t = self.tables[table]
        rows = np.zeros((len(indices), t["row_bytes"]), np.uint8)
        n_bad, first_bad = 0, NO_BAD_POSITION
        for pos, i in enumerate(indices):
            r = t["index_of"].get(int(i))
            if r is None:
                n_bad += 1
                first_bad = pos if first_bad == NO_BAD_POSITION else first_bad
            else:
                rows[pos] = t["raw"][r]
        return rows, n_bad, first_bad

    def golden_pooled(self, table, indices, offsets):
        t = self.tables[table]
        elem = t["elem"]
        dim = t["row_bytes"] // elem.itemsize
        out = []
        n_bad, first_bad = 0, NO_BAD_POSITION
        for b in range(len(offsets) - 1):
            good = []
            for pos in range(offsets[b], offsets[b + 1]):
                r = t["index_of"].get(int(indices[pos]))
                if r is None:
                    n_bad += 1
                    first_bad = pos if first_bad == NO_BAD_POSITION else first_bad
                else:
                    good.append(t["vals"][r])
            rows = np.array(good, dtype=t["vals"].dtype).reshape(len(good), dim)
            out.append(np.asarray(pool_rows(rows, elem)).view(np.uint8).reshape(-1))
        res = np.array(out, np.uint8).reshape(len(offsets) - 1, pooled_row_bytes(t["row_bytes"], elem))
        return res, n_bad, first_bad

    # ------------------------------------------------------------------ raw commands on both
    async def submit_both(self, cmd_fields, inputs, dst_bytes):
        """Allocate inputs/dst on both devices, submit; returns [(dev, handle, dst)] for both."""
        out = []
        for d in (self.dev, self.model):
            t = d.transport
            fields = dict(cmd_fields)
            bufs = []
            for key, blob in inputs.items():
                addr = t.alloc(max(len(blob), 64))
                await t.mem_write(addr, blob)
                fields[key] = addr + fields.pop(key + "_skew", 0)
                bufs.append(addr)
            dst = t.alloc(max(dst_bytes, 64) + 64)
            await t.mem_write(dst, b"\xA5" * (max(dst_bytes, 64) + 64))
            fields.setdefault("dst_addr", dst)
            fields["dst_addr"] += fields.pop("dst_skew", 0)
            fields.setdefault("dst_bytes", dst_bytes)
            bufs.append(dst)
            h = await d.submit(Command(**fields), bufs)
            out.append((d, h, dst))
        return out

    async def finish_both(self, pair, dst_bytes):
        res = []
        for d, h, dst in pair:
            cpl = await d.wait_for(h)
            mem = await d.transport.mem_read(dst, max(dst_bytes, 64) + 64)
            for a in h.buffers:
                d.transport.free(a)
            res.append((cpl, mem))
        (c_rtl, m_rtl), (c_mod, m_mod) = res
        for f in ("status", "n_bad", "first_bad", "sq_head"):
            assert getattr(c_rtl, f) == getattr(c_mod, f), \
                f"completion {f}: rtl {c_rtl} model {c_mod}"
        assert m_rtl == m_mod, _diff(m_rtl, m_mod)
        return c_rtl, m_rtl


def _diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"result bytes differ first at {i}: rtl {a[i:i+16].hex()} model {b[i:i+16].hex()}"
    return "lengths differ"


async def _counters_check(bench, before, lookups):
    after = await bench.dev.counters()
    assert after["lookups"] - before["lookups"] == lookups, (before["lookups"], after["lookups"], lookups)
    return after


@cocotb.test()
async def device_end_to_end(dut):
    meta = load_meta()
    p = meta["params"]
    seed = int(os.environ.get("EVSSD_SEED", "1"))
    b = Bench(dut, p, seed)
    await b.start()
    rng = b.rng

    # ---- tables: different row sizes and element types, two extents each
    specs = [(0, 64, ElemType.FP32, 40), (1, 24, ElemType.INT8, 50), (2, 16, ElemType.FP16, 30),
             (3, 128, ElemType.INT32, 12)]
    lba = 1
    for table, rb, elem, n in specs[:p.max_tables]:
        lba = await b.make_table(table, rb, elem, n, lba)
    assert lba <= p.total_pages

    # ---- raw pages read back what PROGRAM_PAGES wrote
    for d in (b.dev, b.model):
        pages = await d.read_pages(1, 3)
        assert np.array_equal(pages, b.flash[1:4]), d.transport.name
    c0 = await b.dev.counters()
    assert sum(ch["programs"] for ch in c0["channels"]) >= 1

    # ---- gathers and pooled gathers, several in flight
    lookups = 0
    before = await b.dev.counters()
    for round_ in range(4):
        pending = []
        for _ in range(rng.choice([1, 3, 4])):
            table = rng.choice([t for t in b.tables])
            t = b.tables[table]
            if rng.random() < 0.5:
                n = rng.randrange(1, 40)
                idx = b.random_indices(table, n)
                nbytes = n * t["row_bytes"]
                pair = await b.submit_both(dict(opcode=Opcode.GATHER, table=table, count=n),
                                           {"src_addr": idx.tobytes()}, nbytes)
                rows, n_bad, first_bad = b.golden_gather(table, idx)
                pending.append((pair, nbytes, rows.tobytes(), n_bad, first_bad))
                lookups += n
            else:
                n_bags = rng.randrange(1, 8)
                sizes = [rng.choice([0, 1, 2, 3, 5]) for _ in range(n_bags)]
                start = rng.choice([0, 0, 2])
                offsets = np.cumsum([start] + sizes).astype("<u4")
                count = int(offsets[-1]) + rng.choice([0, 0, 3])
                idx = b.random_indices(table, max(count, 1))[:count]
                out_row = pooled_row_bytes(t["row_bytes"], t["elem"])
                nbytes = n_bags * out_row
                inputs = {"src_addr": idx.tobytes() or b"\0" * 4, "offsets_addr": offsets.tobytes()}
                pair = await b.submit_both(dict(opcode=Opcode.GATHER_POOLED, table=table, count=count,
                                                n_bags=n_bags), inputs, nbytes)
                res, n_bad, first_bad = b.golden_pooled(table, idx, offsets)
                pending.append((pair, nbytes, res.tobytes(), n_bad, first_bad))
                lookups += int(offsets[-1] - offsets[0])
        for pair, nbytes, want, n_bad, first_bad in pending:
            cpl, mem = await b.finish_both(pair, nbytes)
            assert mem[:nbytes] == want, _diff(mem[:nbytes], want)
            assert mem[nbytes:] == b"\xA5" * (len(mem) - nbytes), "wrote past the result"
            assert cpl.n_bad == n_bad and cpl.first_bad == first_bad, (cpl, n_bad, first_bad)
            assert cpl.status == (Status.BAD_INDEX if n_bad else Status.OK), cpl
    await _counters_check(b, before, lookups)

    # ---- error cases: nothing written, device stays usable
    t0 = b.tables[0]
    idx = b.random_indices(0, 8, bad_rate=0)
    cases = [
        ("bad opcode", dict(opcode=0x55, table=0, count=8), {"src_addr": idx.tobytes()}, 8 * 64, Status.BAD_OPCODE),
        ("disabled table", dict(opcode=Opcode.GATHER, table=p.max_tables - 1, count=8),
         {"src_addr": idx.tobytes()}, 8 * 64, Status.TABLE_DISABLED),
        ("table out of range", dict(opcode=Opcode.GATHER, table=200, count=8), {"src_addr": idx.tobytes()},
         8 * 64, Status.TABLE_DISABLED),
        ("misaligned src", dict(opcode=Opcode.GATHER, table=0, count=8, src_addr_skew=4),
         {"src_addr": idx.tobytes() + bytes(4)}, 8 * 64, Status.BAD_ADDRESS),
        ("misaligned dst", dict(opcode=Opcode.GATHER, table=0, count=8, dst_skew=32),
         {"src_addr": idx.tobytes()}, 8 * 64, Status.BAD_ADDRESS),
        ("overflow", dict(opcode=Opcode.GATHER, table=0, count=8, dst_bytes=8 * 64 - 4),
         {"src_addr": idx.tobytes()}, 8 * 64, Status.RESULT_OVERFLOW),
        ("bad offsets", dict(opcode=Opcode.GATHER_POOLED, table=0, count=8, n_bags=2),
         {"src_addr": idx.tobytes(), "offsets_addr": np.array([0, 5, 3], "<u4").tobytes()}, 2 * 64,
         Status.BAD_OFFSETS),
        ("offsets past count", dict(opcode=Opcode.GATHER_POOLED, table=0, count=8, n_bags=2),
         {"src_addr": idx.tobytes(), "offsets_addr": np.array([0, 5, 9], "<u4").tobytes()}, 2 * 64,
         Status.BAD_OFFSETS),
        ("read pages past flash", dict(opcode=Opcode.READ_PAGES, lba=p.total_pages - 1, count=2),
         {}, 2 * p.page_size, Status.BAD_LBA),
        ("nop", dict(opcode=Opcode.NOP), {}, 0, Status.OK),
    ]
    for name, fields, inputs, nbytes, want in cases:
        pair = await b.submit_both(fields, inputs, nbytes)
        cpl, mem = await b.finish_both(pair, nbytes)
        if want is not None:
            assert cpl.status == want, f"{name}: {cpl}"
        if cpl.status != Status.OK:
            assert mem == b"\xA5" * len(mem), f"{name}: wrote into the result buffer"

    # ---- still usable: one more gather after the errors
    idx = b.random_indices(1, 17)
    rows, n_bad, first_bad = b.golden_gather(1, idx)
    pair = await b.submit_both(dict(opcode=Opcode.GATHER, table=1, count=17), {"src_addr": idx.tobytes()},
                               17 * 24)
    cpl, mem = await b.finish_both(pair, 17 * 24)
    assert mem[:17 * 24] == rows.tobytes() and cpl.n_bad == n_bad

    # ---- block mode: same results, every lookup moves a whole page over the channel bus
    idx = b.random_indices(0, 12, bad_rate=0)
    rows, _, _ = b.golden_gather(0, idx)
    for blk in (False, True):
        for d in (b.dev, b.model):
            await d.set_block_mode(blk)
        c_before = await b.dev.counters()
        pair = await b.submit_both(dict(opcode=Opcode.GATHER, table=0, count=12), {"src_addr": idx.tobytes()},
                                   12 * 64)
        cpl, mem = await b.finish_both(pair, 12 * 64)
        assert mem[:12 * 64] == rows.tobytes() and cpl.status == Status.OK
        # in block mode the row leaves the channel before the rest of its page has crossed the bus
        await ClockCycles(dut.clk, 300)
        c_after = await b.dev.counters()
        moved = sum(a["bytes"] - x["bytes"] for a, x in zip(c_after["channels"], c_before["channels"]))
        rows_read = sum(a["rows"] - x["rows"] for a, x in zip(c_after["channels"], c_before["channels"]))
        assert rows_read == 12
        if blk:
            assert moved == 12 * p.page_size, moved
        else:
            assert moved <= 12 * (64 + 2 * p.ch_data_bits // 8), moved
    for d in (b.dev, b.model):
        await d.set_block_mode(False)

    # ---- reprogram a page under a table: a gather after PROGRAM_PAGES sees the new rows
    t0 = b.tables[0]
    new_page = b.nprng.integers(0, 256, (1, p.page_size), dtype=np.uint8)
    lba0 = 1   # table 0's first page
    rows_per_page = p.page_size // 64
    idx = np.arange(0, 6, dtype="<u4")
    pair = await b.submit_both(dict(opcode=Opcode.GATHER, table=0, count=6), {"src_addr": idx.tobytes()}, 6 * 64)
    for d in (b.dev, b.model):
        await d.program_pages(lba0, new_page)
    cpl, mem = await b.finish_both(pair, 6 * 64)
    assert mem[:6 * 64] == t0["raw"][:6].tobytes(), "a gather submitted before the program saw new data"
    for r in range(rows_per_page):
        t0["raw"][r] = new_page[0, r * 64:(r + 1) * 64]
    t0["vals"] = t0["raw"].view(t0["vals"].dtype).reshape(t0["vals"].shape)
    pair = await b.submit_both(dict(opcode=Opcode.GATHER, table=0, count=6), {"src_addr": idx.tobytes()}, 6 * 64)
    cpl, mem = await b.finish_both(pair, 6 * 64)
    assert mem[:6 * 64] == new_page[0, :6 * 64].tobytes()

    # ---- counters are sane
    cnt = await b.dev.counters()
    assert cnt["commands"] > 0 and cnt["errors"] >= 6 and cnt["cycles"] > cnt["busy_cycles"] > 0
    assert sum(ch["rows"] for ch in cnt["channels"]) > 0
    dut._log.warning(f"counters: {cnt}")


@cocotb.test()
async def shared_scenarios(dut):
    """The scenario bodies the model passes in tests/test_driver.py, here on the RTL."""
    from evssd.sim import scenarios
    from evssd.sim.runner import load_meta
    p = load_meta()["params"]
    seed = int(os.environ.get("EVSSD_SEED", "1"))
    rng = random.Random(seed)
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_memory_bytes=1 << 20, poll_cycles=32, params=p)
    transport.set_backpressure(rng, STALL)
    quiet_cocotbext_axi()
    dev = await AsyncDevice.open(transport, expect=p, sq_entries=8, cq_entries=8, timeout=600.0)
    await dev.set_timing(t_r=50, t_prog=100)
    # this gateware pools weighted bags, and row-wise INT8 where its merger can: the
    # rowwise_weighted scenario then checks sums bit for bit, not refusals
    from evssd.hw.device.merger import ResultMerger
    assert await dev.supports("weighted"), "CAPS.weighted reads 0"
    assert await dev.supports("int8_rowwise") == ResultMerger.supports_rowwise(p), "CAPS.int8_rowwise"
    for name, scenario in scenarios.SCENARIOS.items():
        await scenario(dev, np.random.default_rng([seed, len(name)]))
