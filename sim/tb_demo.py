"""cocotb bench behind `evssd demo --backend rtl`: the demo's trace through EV-Cache and the RTL.

Same tables, trace, cache and checks as the model demo, but the device is the gateware in
Verilator and the driver is the async core over cocotbext-axi. Device time is in simulated
clock cycles (cycle-accurate for this RTL), read from the device's own cycle counter.
"""
import json
import os

import cocotb
import numpy as np

from evssd.host.cache import EVCache
from evssd.host.demo import golden_pooled_sum, make_tables
from evssd.host.device import AsyncDevice
from evssd.host.layout import Layout
from evssd.host.store import pool_deduplicated
from evssd.host.workload import meta_calibrated
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, start_clock_and_reset


def _sum_bytes(before, after, key):
    return sum(a[key] - b[key] for a, b in zip(after["channels"], before["channels"]))


def _moved(counters):
    return sum(c["bytes"] for c in counters["channels"])


@cocotb.test()
async def demo_on_rtl(dut):
    cfg = json.loads(os.environ["EVSSD_DEMO"])
    params = load_meta()["params"]
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_memory_bytes=8 << 20, params=params)
    # Wall-clock timeout: Verilator is slow, the bound is only there to catch a hang.
    dev = await AsyncDevice.open(transport, expect=params, sq_entries=16, cq_entries=16, timeout=3600)
    # Fast programming (loading is not what the demo measures), then the reads' tR.
    await dev.set_timing(t_r=cfg.get("t_r", 1000), t_prog=100)
    tables = make_tables(cfg["tables"], cfg["rows"], cfg["dim"], cfg["seed"])
    layout = Layout.plan(tables, params=params)
    for lba, pages in layout.iter_pages(64):
        await dev.program_pages(lba, np.ascontiguousarray(pages))
    slots = {}
    for t in layout.tables:
        await dev.configure_table(t.table_id, t.row_bytes, t.elem, [tuple(e) for e in t.extents])
        slots[t.name] = t
    caches = {}
    for n, a in tables.items():
        try:
            caches[n] = EVCache(a.shape[0], a.shape[1], a.dtype, budget_fraction=cfg["cache_fraction"], name=n)
        except ValueError:  # the budget of a tiny table holds no row: that table runs uncached
            caches[n] = None
    names = list(tables)
    traces = {n: meta_calibrated(cfg["rows"], cfg["batch_size"], cfg["pooling_factor"], seed=cfg["seed"] + k,
                                 n_batches=cfg["batches"]) for k, n in enumerate(names)}
    cycles, checked = [], 0
    before = await dev.counters()
    for b in range(cfg["batches"]):
        c0 = (await dev.counters())["cycles"]
        plans, handles = {}, {}
        for n in names:
            batch = next(traces[n])
            idx, off = np.asarray(batch.indices), np.asarray(batch.offsets)
            uniq, inv = np.unique(idx, return_inverse=True)
            t = slots[n]
            rows = np.empty((uniq.size, t.dim), tables[n].dtype)
            hit = caches[n].lookup(uniq, rows) if caches[n] is not None else np.zeros(uniq.size, bool)
            miss = np.flatnonzero(~hit)
            plans[n] = (idx, off, uniq, inv, rows, miss)
            if miss.size:
                handles[n] = await dev.submit_gather(t.table_id, uniq[miss])
        for n in names:  # all tables' commands are in flight before the first wait
            idx, off, uniq, inv, rows, miss = plans[n]
            if n in handles:
                raw = await dev.finish(handles[n])
                t = slots[n]
                fetched = raw[:, :t.data_bytes].copy().view(tables[n].dtype).reshape(miss.size, t.dim)
                rows[miss] = fetched
                if caches[n] is not None:
                    caches[n].admit(uniq[miss], fetched)
            got = pool_deduplicated(rows, inv, off)
            want = golden_pooled_sum(tables[n], idx, off)
            assert np.array_equal(got, want), f"batch {b} table {n}: pooled result differs from numpy"
            checked += 1
        cycles.append((await dev.counters())["cycles"] - c0)
    after = await dev.counters()
    # Device-side pooling on the last batch: GATHER_POOLED equals the host's pooled result.
    for n in names:
        idx, off = plans[n][0], plans[n][1]
        raw = await dev.gather_pooled(slots[n].table_id, idx, off)
        got = dev.view(slots[n].table_id, raw, pooled=True)[:, :slots[n].dim]
        want = golden_pooled_sum(tables[n], idx, off)
        assert np.array_equal(got, want), f"GATHER_POOLED table {n} differs from numpy"
    # The same misses in block mode: what a block-interface SSD moves.
    await dev.set_block_mode(True)
    await dev.clear_counters()
    n0 = names[0]
    uniq = plans[n0][2]
    await dev.gather(slots[n0].table_id, uniq)
    block = await dev.counters()
    await dev.set_block_mode(False)
    await dev.clear_counters()
    await dev.gather(slots[n0].table_id, uniq)
    fine = await dev.counters()
    hits = sum(c.stats["hits"] for c in caches.values() if c is not None)
    misses = sum(c.stats["misses"] for c in caches.values() if c is not None)
    rows_read = _sum_bytes(before, after, "rows")
    text = "\n".join([
        f"evssd demo on the RTL (Verilator, cycle-accurate): {params.n_channels} channels x {params.ways} ways, "
        f"{params.page_size} B pages, tR {cfg.get('t_r', 1000)} cycles",
        f"  checked  {checked} pooled results ({cfg['batches']} batches x {len(names)} tables) against numpy: all equal;"
        f" GATHER_POOLED on the device equal too",
        f"  EV-Cache hit rate {hits / max(hits + misses, 1):.1%} ({hits} hits, {misses} misses)",
        f"  flash    {rows_read} row reads, {_sum_bytes(before, after, 'bytes') / 1024:.1f} KiB over the channel buses",
        f"  block    the same {uniq.size} lookups move {_moved(fine)} B fine-grained vs {_moved(block)} B in "
        f"block mode ({_moved(block) / max(_moved(fine), 1):.1f}x)",
        f"  device   cycles per batch p50 {np.percentile(cycles, 50):,.0f}, p99 {np.percentile(cycles, 99):,.0f} "
        f"(simulated clock cycles)",
    ])
    dut._log.warning("\n" + text)
    report = os.environ.get("EVSSD_DEMO_REPORT")
    if report:
        with open(report, "w") as fh:
            json.dump({"text": text, "cycles": cycles, "checked": checked}, fh)
