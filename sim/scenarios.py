"""Device scenarios shared by every backend: one test body for the model and the RTL.

Each scenario is ``async def scenario(dev: AsyncDevice, rng: numpy.random.Generator)`` and
asserts against a numpy golden model. ``tests/test_driver.py`` runs them on the functional
model; ``sim/tb_device.py`` runs the same functions on the RTL through cocotb. No cocotb import
here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evssd.hw import regmap
from evssd.hw.regmap import Command, ElemType, Opcode, Status
from evssd.host.device import AsyncDevice, DeviceError
from evssd.host.pooling import pool_rows

__all__ = ["GoldenTable", "place_tables", "SCENARIOS", "scenario_tables", "scenario_errors",
           "scenario_inflight", "scenario_queue_wrap", "scenario_rowwise_weighted", "golden_pooled",
           "run_all"]


@dataclass
class GoldenTable:
    slot: int
    elem: ElemType
    data: np.ndarray               # [rows, dim] of elem's dtype
    row_bytes: int
    extents: list                  # (first_index, n_rows, start_lba)

    @property
    def rows(self) -> int:
        return self.data.shape[0]


def _random_values(rng, elem: ElemType, shape):
    if elem == ElemType.FP32:
        vals = rng.standard_normal(shape).astype("<f4") * np.float32(rng.choice([1e-3, 1.0, 1e3]))
        return vals
    if elem == ElemType.FP16:
        return (rng.standard_normal(shape) * 4).astype("<f2")
    if elem == ElemType.INT8:
        return rng.integers(-128, 128, shape).astype("i1")
    return rng.integers(-2**31, 2**31, shape, dtype=np.int64).astype("<i4")


def place_tables(params, rng, n_tables: int, max_rows: int = 300, first_lba: int = 0):
    """Random tables (dtypes, dims, several extents with gaps in the index space) and their pages.

    Returns (tables, pages) where pages maps lba -> uint8[page_size].
    """
    ps = params.page_size
    max_row = min(params.max_row_bytes, ps)
    lba = first_lba
    tables, pages = [], {}
    for slot in range(n_tables):
        elem = ElemType(int(rng.integers(0, 4)))
        max_dim = max_row // elem.itemsize
        dim = int(rng.integers(1, max_dim + 1))
        row_bytes = -(-dim * elem.itemsize // 4) * 4
        dim = row_bytes // elem.itemsize  # rows are whole 32-bit words
        rpp = ps // row_bytes
        # Each table gets an equal share of the flash; every extent starts on a fresh page.
        share = (params.total_pages - first_lba) // n_tables
        n_ext = int(rng.integers(1, params.max_extents + 1))
        fit = (share - n_ext) * rpp
        if fit < 1:
            raise ValueError(f"{n_tables} tables do not fit {params.total_pages} pages")
        rows = int(rng.integers(1, min(max_rows, fit) + 1))
        n_ext = min(n_ext, rows)
        data = _random_values(rng, elem, (rows, dim))
        cuts = sorted(set(rng.choice(np.arange(1, rows), size=n_ext - 1, replace=False).tolist())) if rows > 1 and n_ext > 1 else []
        bounds = [0] + cuts + [rows]
        extents = []
        for a, b in zip(bounds, bounds[1:]):
            n_pages = -(-(b - a) // rpp)
            if lba + n_pages > params.total_pages:
                raise ValueError("tables do not fit the flash; use fewer rows")
            extents.append((a, b - a, lba))
            raw = np.zeros((n_pages, ps), np.uint8)
            chunk = data[a:b].view(np.uint8).reshape(b - a, row_bytes)
            for r in range(b - a):
                p, o = divmod(r, rpp)
                raw[p, o * row_bytes:(o + 1) * row_bytes] = chunk[r]
            for p in range(n_pages):
                pages[lba + p] = raw[p]
            lba += n_pages
        tables.append(GoldenTable(slot, elem, data, row_bytes, extents))
    return tables, pages


async def load(dev: AsyncDevice, tables, pages):
    """Program the pages (in runs of consecutive LBAs) and configure the tables."""
    lbas = sorted(pages)
    run_start = None
    run = []
    for lba in lbas + [None]:
        if run and (lba is None or lba != run_start + len(run)):
            await dev.program_pages(run_start, np.stack(run))
            run = []
        if lba is not None:
            if not run:
                run_start = lba
            run.append(pages[lba])
    for t in tables:
        await dev.configure_table(t.slot, t.row_bytes, t.elem, t.extents)


def golden_pooled(table: GoldenTable, indices, offsets) -> np.ndarray:
    out = []
    for b in range(len(offsets) - 1):
        sel = indices[offsets[b]:offsets[b + 1]]
        out.append(np.asarray(pool_rows(table.data[sel], table.elem)))
    dt = np.dtype(table.elem.pooled_dtype)
    if not out:
        return np.zeros((0, table.data.shape[1]), dt)
    return np.stack(out).astype(dt, copy=False)


def _random_bags(rng, n_indices: int, n_bags: int):
    cuts = np.sort(rng.integers(0, n_indices + 1, n_bags - 1)) if n_bags > 1 else np.array([], np.int64)
    return np.concatenate([[0], cuts, [n_indices]]).astype(np.uint32)


def _same_bits(got: np.ndarray, want: np.ndarray, what: str):
    g = np.ascontiguousarray(got).view(np.uint8)
    w = np.ascontiguousarray(want).view(np.uint8)
    if g.shape != w.shape or not np.array_equal(g, w):
        bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1)) if g.shape == w.shape else []
        raise AssertionError(f"{what}: results differ from the golden model "
                             f"(shape {got.shape} vs {want.shape}; first differing byte {bad[:1]})")


async def scenario_tables(dev: AsyncDevice, rng, n_tables: int = 3, lookups: int = 60):
    """Random tables of every type, several extents; READ_PAGES, GATHER, GATHER_POOLED bit-exact."""
    tables, pages = place_tables(dev.params, rng, n_tables)
    await load(dev, tables, pages)
    # Pages read back exactly.
    some = sorted(rng.choice(sorted(pages), size=min(3, len(pages)), replace=False).tolist())
    for lba in some:
        got = await dev.read_pages(lba, 1)
        _same_bits(got[0], pages[lba], f"READ_PAGES lba {lba}")
    for t in tables:
        idx = rng.integers(0, t.rows, lookups).astype(np.uint32)
        # repeated indices: page-register hits
        idx[lookups // 2: lookups // 2 + 5] = idx[0]
        raw = await dev.gather(t.slot, idx)
        _same_bits(raw, t.data[idx].view(np.uint8).reshape(len(idx), t.row_bytes), f"GATHER table {t.slot}")
        n_bags = int(rng.integers(1, 12))
        offsets = _random_bags(rng, lookups, n_bags)
        raw = await dev.gather_pooled(t.slot, idx, offsets)
        want = golden_pooled(t, idx, offsets)
        _same_bits(raw, want, f"GATHER_POOLED table {t.slot} ({t.elem.name})")
    return tables


async def _expect_error(coro, status: Status, what: str):
    try:
        await coro
    except DeviceError as exc:
        if exc.status != status:
            raise AssertionError(f"{what}: status {exc.status!r}, expected {status.name}") from exc
        return exc
    raise AssertionError(f"{what}: no error, expected {status.name}")


async def _raw(dev: AsyncDevice, cmd: Command):
    return await dev._run(cmd)


async def scenario_errors(dev: AsyncDevice, rng):
    """Every error status; good work in the same command still correct; device usable after."""
    tables, pages = place_tables(dev.params, rng, 2, max_rows=120)
    await load(dev, tables, pages)
    t = tables[0]
    # Index in no extent: zero row at that position, others correct, count and first position.
    idx = rng.integers(0, t.rows, 20).astype(np.uint32)
    bad_pos = [3, 11, 12]
    idx[bad_pos] = [t.rows + 5, 0xFFFF_FFFF, t.rows]
    exc = await _expect_error(dev.gather(t.slot, idx), Status.BAD_INDEX, "index in no extent")
    assert exc.completion.n_bad == 3 and exc.completion.first_bad == 3, exc.completion
    want = t.data[np.where(idx < t.rows, idx, 0)].view(np.uint8).reshape(20, t.row_bytes).copy()
    want[bad_pos] = 0
    _same_bits(exc.result, want, "GATHER with bad indices")
    # Pooled with a bad index: it is left out of its bag's sum.
    offsets = np.array([0, 5, 5, 20], np.uint32)
    exc = await _expect_error(dev.gather_pooled(t.slot, idx, offsets), Status.BAD_INDEX, "pooled bad index")
    good = [i for i in range(20) if i not in bad_pos]
    bags = []
    for b in range(3):
        sel = [idx[i] for i in range(offsets[b], offsets[b + 1]) if i in good]
        bags.append(np.asarray(pool_rows(t.data[np.array(sel, np.int64)], t.elem)))
    _same_bits(exc.result, np.stack(bags).astype(np.dtype(t.elem.pooled_dtype)), "pooled with bad index")
    # Disabled table and a slot out of range.
    await dev.configure_table(1, tables[1].row_bytes, tables[1].elem, tables[1].extents, enable=False)
    await _expect_error(dev.gather(1, np.array([0], np.uint32)), Status.TABLE_DISABLED, "disabled table")
    cpl = await _raw(dev, Command(opcode=Opcode.GATHER, table=dev.params.max_tables, count=1,
                                  src_addr=dev.transport.alloc(64), dst_addr=dev.transport.alloc(64), dst_bytes=64))
    assert cpl.status == Status.TABLE_DISABLED, cpl
    # Bad opcode.
    cpl = await _raw(dev, Command(opcode=0x7E))
    assert cpl.status == Status.BAD_OPCODE, cpl
    # Misaligned buffer.
    src = dev.transport.alloc(128)
    dst = dev.transport.alloc(4096)
    cpl = await _raw(dev, Command(opcode=Opcode.GATHER, table=0, count=1, src_addr=src + 4, dst_addr=dst,
                                  dst_bytes=4096))
    assert cpl.status == Status.BAD_ADDRESS, cpl
    # Result buffer too small: nothing written (canary intact).
    canary = bytes(rng.integers(0, 256, 256, dtype=np.uint8))
    await dev.transport.mem_write(dst, canary)
    await dev.transport.mem_write(src, np.array([0, 1], np.uint32).tobytes())
    cpl = await _raw(dev, Command(opcode=Opcode.GATHER, table=0, count=2, src_addr=src, dst_addr=dst,
                                  dst_bytes=2 * t.row_bytes - 4))
    assert cpl.status == Status.RESULT_OVERFLOW, cpl
    assert await dev.transport.mem_read(dst, 256) == canary, "RESULT_OVERFLOW wrote into the buffer"
    # Offsets decreasing, or past the index count.
    for offs in ([0, 2, 1], [0, 1, 3]):
        cpl = await _raw(dev, Command(opcode=Opcode.GATHER_POOLED, table=0, count=2, n_bags=2, src_addr=src,
                                      offsets_addr=await dev._put(np.array(offs, np.uint32).tobytes()),
                                      dst_addr=dst, dst_bytes=4096))
        assert cpl.status == Status.BAD_OFFSETS, (offs, cpl)
    assert await dev.transport.mem_read(dst, 256) == canary, "BAD_OFFSETS wrote into the buffer"
    # Pages beyond the flash.
    cpl = await _raw(dev, Command(opcode=Opcode.READ_PAGES, count=2, lba=dev.params.total_pages - 1,
                                  dst_addr=dst, dst_bytes=2 * dev.params.page_size))
    assert cpl.status == Status.BAD_LBA, cpl
    # Still usable and still correct.
    idx = rng.integers(0, t.rows, 10).astype(np.uint32)
    _same_bits(await dev.gather(t.slot, idx), t.data[idx].view(np.uint8).reshape(10, t.row_bytes), "after errors")


async def scenario_inflight(dev: AsyncDevice, rng, n_commands: int = 6):
    """Several commands in flight at once; each result correct."""
    tables, pages = place_tables(dev.params, rng, 2, max_rows=200)
    await load(dev, tables, pages)
    handles, wants = [], []
    for k in range(n_commands):
        t = tables[k % 2]
        idx = rng.integers(0, t.rows, int(rng.integers(1, 40))).astype(np.uint32)
        if k % 3 == 2:
            offsets = _random_bags(rng, len(idx), int(rng.integers(1, 6)))
            handles.append(await dev.submit_gather_pooled(t.slot, idx, offsets))
            wants.append(golden_pooled(t, idx, offsets))
        else:
            handles.append(await dev.submit_gather(t.slot, idx))
            wants.append(t.data[idx])
    for k, (h, want) in enumerate(zip(handles, wants)):
        _same_bits(await dev.finish(h), want, f"in-flight command {k}")


async def scenario_queue_wrap(dev: AsyncDevice, rng):
    """More commands than queue entries: both rings wrap and the phase bit flips."""
    n = dev.cq_entries * 2 + 3
    for _ in range(n):
        await dev.nop()
    tables, pages = place_tables(dev.params, rng, 1, max_rows=50)
    await load(dev, tables, pages)
    t = tables[0]
    idx = rng.integers(0, t.rows, 7).astype(np.uint32)
    _same_bits(await dev.gather(t.slot, idx), t.data[idx], "after queue wrap")


def _rowwise_table(params, rng, slot: int, lba: int, rows: int = 40):
    """A row-wise INT8 table (fp16 scale, fp16 bias, uint8 codes) in one extent from ``lba``."""
    dim = int(min(params.max_row_bytes, params.page_size, 64)) - 4
    data = np.empty((rows, dim + 4), np.uint8)
    data[:, 0:2] = rng.normal(0, 0.05, rows).astype("<f2").view(np.uint8).reshape(rows, 2)
    data[:, 2:4] = rng.normal(0, 1, rows).astype("<f2").view(np.uint8).reshape(rows, 2)
    data[:, 4:] = rng.integers(0, 256, (rows, dim), dtype=np.uint8)
    rpp = params.page_size // (dim + 4)
    pages = {}
    for p in range(-(-rows // rpp)):
        page = np.zeros(params.page_size, np.uint8)
        chunk = data[p * rpp:(p + 1) * rpp].reshape(-1)
        page[:chunk.size] = chunk
        pages[lba + p] = page
    return GoldenTable(slot, ElemType.INT8_ROWWISE, data, dim + 4, [(0, rows, lba)]), pages


async def scenario_rowwise_weighted(dev: AsyncDevice, rng):
    """INT8_ROWWISE tables and GATHER_POOLED_WEIGHTED, bit for bit against host/pooling.py where
    the device's CAPS says it pools them; where it does not (row-wise INT8 on a channel bus wider
    than 128 bits, or gateware older than the merger's FMA path), the device refuses them:
    TABLE_DISABLED and BAD_OPCODE, nothing summed wrongly."""
    from evssd.host.elements import ELEM_OF_DEVICE
    from evssd.host.pooling import pool
    tables, pages = place_tables(dev.params, rng, 1, max_rows=60)
    t = tables[0]
    q, qpages = _rowwise_table(dev.params, rng, 1, max(pages) + 1)
    await load(dev, tables, {**pages, **qpages})
    idx = rng.integers(0, t.rows, 24).astype(np.uint32)
    qidx = rng.integers(0, q.rows, 24).astype(np.uint32)
    offsets = _random_bags(rng, 24, 5)
    w = rng.normal(0, 2, 24).astype(np.float32)
    rowwise, weighted = await dev.supports("int8_rowwise"), await dev.supports("weighted")
    if weighted:
        want = pool(t.data, ELEM_OF_DEVICE[t.elem], idx.astype(np.int64), offsets.astype(np.int64),
                    per_sample_weights=w)
        _same_bits(dev.view(t.slot, await dev.gather_pooled(t.slot, idx, offsets, weights=w), True)
                   .view("<f4"), want, "weighted GATHER_POOLED")
    else:
        cpl = await _raw(dev, Command(opcode=Opcode.GATHER_POOLED_WEIGHTED, table=t.slot, count=24, n_bags=5,
                                      src_addr=await dev._put(idx.tobytes()),
                                      offsets_addr=await dev._put(offsets.tobytes()),
                                      weights_addr=await dev._put(w.tobytes()),
                                      dst_addr=dev.transport.alloc(4096), dst_bytes=4096))
        assert cpl.status == Status.BAD_OPCODE, cpl
    if not rowwise:  # configure it as the driver would on a device that claimed support
        dev._caps |= regmap.register("CAPS").field("int8_rowwise").mask
    await dev.configure_table(q.slot, q.row_bytes, q.elem, q.extents)
    if rowwise:
        for wts in (None, w):
            want = pool(q.data, ELEM_OF_DEVICE[q.elem], qidx.astype(np.int64), offsets.astype(np.int64),
                        per_sample_weights=wts)
            got = await dev.gather_pooled(q.slot, qidx, offsets, weights=wts)
            _same_bits(got.view("<f4"), want, f"INT8_ROWWISE GATHER_POOLED weighted={wts is not None}")
        _same_bits(await dev.gather(q.slot, qidx), q.data[qidx], "INT8_ROWWISE GATHER")
    else:
        await _expect_error(dev.gather_pooled(q.slot, qidx, offsets), Status.TABLE_DISABLED,
                            "INT8_ROWWISE on a device without it")
        dev._caps = None    # read CAPS again


SCENARIOS = {
    "tables": scenario_tables,
    "errors": scenario_errors,
    "inflight": scenario_inflight,
    "queue_wrap": scenario_queue_wrap,
    "rowwise_weighted": scenario_rowwise_weighted,
}


async def run_all(dev: AsyncDevice, seed: int):
    for name, scenario in SCENARIOS.items():
        await scenario(dev, np.random.default_rng([seed, len(name)]))
