"""The vectorised functional model (host/model.py, host/sparse_flash.py) against per-index
references: translation, sparse flash, and whole GATHER / GATHER_POOLED commands through the
driver with good and bad indices, every element type, empty bags and a bag range that does not
start at 0; plus the 100 MB store that used to overflow the default flash."""
import numpy as np
import pytest

from evssd.host.device import Device, DeviceError
from evssd.host.model import MODEL_PAGES_PER_CHANNEL, ModelTransport, _Table, translate_many
from evssd.host.pooling import pool_rows
from evssd.host.sparse_flash import LEAF_PAGES, SparseFlash
from evssd.hw import regmap
from evssd.hw.regmap import NO_BAD_POSITION, ElemType, Params, Status


def _translate_one(index, table, total_pages):
    """The ExtentTranslator's rule, one index at a time (the model's original code)."""
    for first, n_rows, lba0 in table.extents:
        if n_rows and first <= index < first + n_rows:
            rel = index - first
            q = rel // table.rows_per_page
            lba = lba0 + q
            offset = (rel - q * table.rows_per_page) * table.row_bytes
            return (3 if lba >= total_pages else 0), lba, offset
    return 1, 0, 0


@pytest.mark.parametrize("seed", range(6))
def test_translate_many_matches_the_per_index_rule(seed):
    rng = np.random.default_rng(seed)
    table = _Table(8)
    table.row_bytes = int(rng.choice([4, 64, 256]))
    table.rows_per_page = max(1, 4096 // table.row_bytes - int(rng.integers(0, 2)))
    total = 200
    # random (possibly overlapping: first match wins) extents, some running past the flash
    table.extents = [(int(rng.integers(0, 500)), int(rng.integers(0, 400)), int(rng.integers(0, 260)))
                     for _ in range(8)]
    idx = rng.integers(0, 1000, 3000)
    st, lba, off = translate_many(idx, table, total)
    for k, i in enumerate(idx.tolist()):
        assert (int(st[k]), int(lba[k]), int(off[k])) == _translate_one(i, table, total)


def test_sparse_flash_matches_a_dense_array_and_stays_small():
    rng = np.random.default_rng(3)
    total, ps = 1 << 26, 512
    flash = SparseFlash(total, ps)
    dense = {}
    for _ in range(40):
        lba = int(rng.choice([0, LEAF_PAGES - 3, 7 * LEAF_PAGES, total - 5, int(rng.integers(0, total - 40))]))
        n = int(rng.integers(1, 6))
        pages = rng.integers(0, 256, (n, ps), dtype=np.uint8)
        flash.program(lba, pages)
        for k in range(n):
            dense[lba + k] = pages[k]
    lbas = np.array(sorted(dense) + [1, 5 * LEAF_PAGES + 1, total - 40], np.int64)
    want = np.stack([dense.get(int(x), np.zeros(ps, np.uint8)) for x in lbas])
    assert np.array_equal(flash.read(int(lbas[-1]), 1)[0], want[-1])
    for x, w in zip(lbas, want):
        assert np.array_equal(flash.read(int(x), 1)[0], w)
    for row_bytes in (12, 64):     # words and bytes
        offs = rng.integers(0, ps // row_bytes, lbas.size) * row_bytes
        out = np.full((lbas.size + 2, row_bytes), 0xAA, np.uint8)
        pos = np.arange(lbas.size) + 1
        flash.gather(lbas, offs, row_bytes, out, pos)
        for k in range(lbas.size):
            assert np.array_equal(out[pos[k]], want[k, offs[k]:offs[k] + row_bytes])
        assert (out[0] == 0xAA).all() and (out[-1] == 0xAA).all()
    # a row running past the page's end reads zeros there
    out = np.zeros((1, 8), np.uint8)
    flash.gather(lbas[:1], [ps - 4], 8, out, [0])
    assert np.array_equal(out[0], np.concatenate([want[0, ps - 4:], np.zeros(4, np.uint8)]))
    # memory follows the programmed pages, not the 32 GiB capacity
    assert flash.programmed_pages == len(dense)
    assert flash.nbytes < 2 * 64 * ps + 16 * LEAF_PAGES * 8 + (total // LEAF_PAGES) * 4 + (1 << 16)
    with pytest.raises(ValueError, match="outside the flash"):
        flash.program(total - 1, np.zeros((2, ps), np.uint8))
    with pytest.raises(ValueError, match="outside the flash"):
        flash.read(-1, 1)


def _reference_command(flash_pages, params, table, elem, indices, offsets):
    """(status, n_bad, first_bad, result bytes) of one command by the per-index definition."""
    pooled = offsets is not None
    lo, hi = (offsets[0], offsets[-1]) if pooled else (0, len(indices))
    rows = np.zeros((len(indices), table.row_bytes), np.uint8)
    good = np.zeros(len(indices), bool)
    n_bad, first_bad, worst = 0, NO_BAD_POSITION, Status.OK
    for pos in range(lo, hi):
        st, lba, off = _translate_one(int(indices[pos]), table, params.total_pages)
        if st:
            n_bad += 1
            first_bad = pos if first_bad == NO_BAD_POSITION else first_bad
            worst = Status.BAD_INDEX if st == 1 or worst == Status.BAD_INDEX else Status.BAD_LBA
            continue
        rows[pos] = flash_pages.get(lba, np.zeros(params.page_size, np.uint8))[off:off + table.row_bytes]
        good[pos] = True
    if not pooled:
        return worst, n_bad, first_bad, rows.tobytes()
    dim = table.row_bytes // elem.itemsize
    out = [pool_rows(rows[b0:b1][good[b0:b1]].view(elem.numpy_dtype).reshape(-1, dim), elem)
           for b0, b1 in zip(offsets[:-1], offsets[1:])]
    return worst, n_bad, first_bad, b"".join(np.asarray(o).tobytes() for o in out)


@pytest.mark.parametrize("elem,row_bytes", [(e, 64) for e in ElemType] + [(ElemType.FP32, 12), (ElemType.FP16, 12)])
def test_commands_match_the_per_index_reference(elem, row_bytes):
    """64-byte rows pool in place from the flash pages; 12-byte rows (4096 % 12 != 0) take the
    gather-then-pool path."""
    rng = np.random.default_rng(int(elem) + 10)
    params = Params(n_channels=2, pages_per_channel=64, ways=2)
    with Device.open(ModelTransport(params, host_memory_bytes=8 << 20)) as dev:
        flash_pages = {}
        for lba in rng.choice(params.total_pages, 40, replace=False).tolist():
            page = rng.integers(0, 256, params.page_size, dtype=np.uint8)
            if elem == ElemType.FP32:   # specials: -0.0, NaN payloads, inf, subnormals
                words = page.view(np.uint32)
                words[rng.integers(0, words.size, 64)] = rng.choice(
                    [0x80000000, 0x7F800001, 0xFFC12345, 0x7F800000, 0x00000001, 0x807FFFFF], 64)
            flash_pages[lba] = page
            dev.program_pages(lba, page[None])
        extents = [(0, 300, 3), (1000, 200, 50), (5000, 1000, params.total_pages - 20)]
        dev.configure_table(1, row_bytes, elem, extents)
        # an extent running past the flash (BAD_LBA), which the driver refuses to write: set it in
        # the model's table registers directly
        extents[2] = (5000, 1000, params.total_pages - 2)
        dev.transport.device.tables[1].extent_array[2] = extents[2]
        table = _Table(8)
        table.row_bytes, table.rows_per_page = row_bytes, params.page_size // row_bytes
        table.extents = extents + [(0, 0, 0)] * 5
        seen = set()
        for trial in range(12):
            n = int(rng.integers(0, 300))
            bad_kind, mode = trial % 3, (trial // 3) % 3
            bad_pool = rng.integers(0, 6000, n) if bad_kind == 1 else rng.integers(5128, 6000, n)  # 2: BAD_LBA only
            idx = np.where(rng.random(n) < (0.2 if bad_kind else 0.0), bad_pool,
                           rng.choice(np.r_[0:300, 1000:1200, 5000:5128], n))
            if mode == 2:
                cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 40))))
                offsets = np.concatenate([[cuts[0] if cuts.size else 0], cuts, [n]]).astype(np.int64)
                offsets[0] = min(offsets[0], int(rng.integers(0, 3)))  # the bag range need not start at 0
                offsets = np.maximum.accumulate(offsets)
            else:
                offsets = None if mode == 0 else np.linspace(0, n, 17).astype(np.int64)
            want = _reference_command(flash_pages, params, table, elem, idx, offsets)
            try:
                raw = dev.gather(1, idx) if offsets is None else dev.gather_pooled(1, idx, offsets)
                status, n_bad, first_bad = Status.OK, 0, NO_BAD_POSITION
            except DeviceError as exc:
                raw, status = exc.result, exc.status
                n_bad, first_bad = exc.completion.n_bad, exc.completion.first_bad
            assert (status, n_bad, first_bad) == want[:3]
            assert raw.tobytes() == want[3]
            seen.add(status)
        assert seen == {Status.OK, Status.BAD_INDEX, Status.BAD_LBA}


def test_default_model_flash_is_large_and_sparse():
    with Device.open("model") as dev:
        assert dev.params.pages_per_channel == MODEL_PAGES_PER_CHANNEL
        flash = dev.transport.device.flash
        before = flash.nbytes
        lba = dev.params.total_pages - 1
        dev.program_pages(lba, np.full((1, dev.params.page_size), 7, np.uint8))
        assert (dev.read_pages(lba, 1) == 7).all()
        assert (dev.read_pages(0, 1) == 0).all()
        assert flash.nbytes - before < 64 << 10


def test_100_mb_of_tables_through_the_store():
    """4 tables of 100k x 64 fp32 (100 MB): from_arrays(.., "evssd") without a device fits, and
    the model holds about the tables' bytes, not its capacity."""
    from evssd.host.store import EmbeddingStore
    rng = np.random.default_rng(0)
    tables = {f"t{k}": rng.standard_normal((100_000, 64), dtype=np.float32) for k in range(4)}
    store = EmbeddingStore.from_arrays(tables, "evssd")
    try:
        idx = rng.integers(0, 100_000, 500)
        for name, arr in tables.items():
            assert np.array_equal(np.asarray(store.gather(name, idx)).view(np.uint32), arr[idx].view(np.uint32))
        dev = getattr(store.backend, "device", None) or store.backend.dev
        held = dev.transport.device.flash.nbytes
        assert 100e6 <= held <= 2 * 4 * 100_000 * 256 + (8 << 20)
    finally:
        store.close()


def test_bench_model_smoke(tmp_path, monkeypatch):
    """`evssd bench model` runs the trace through the driver and checks every result bit for bit."""
    import argparse

    from evssd.host.bench import model as bench
    monkeypatch.setenv("EVSSD_RESULTS", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--tables", "2", "--rows", "3000", "--bags", "16", "--batches", "2"])
    assert bench.run(args) == 0
    import json
    report = json.loads((tmp_path / "bench_model" / "bench_model.json").read_text())
    assert len(report["load_average_before"]) == len(report["load_average_after"]) == 3
    for kind in ("gather_pooled", "gather"):
        r = report["kinds"][kind]
        assert r["bit_exact"] is True and r["lookups"] == 2 * 2 * 16 * 20
        assert r["model_cycles"] > 0
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        bench.measure(rows=0)


@pytest.mark.parametrize("row_bytes", [64, 12])
def test_command_cycles_match_the_timing_model_with_result_schedule(row_bytes):
    """The model runs a command's translation, rows and timing in one kernel: its cycles and
    channel counters must be those of :meth:`TimingModel.lookups` fed the translated good lookups
    and :func:`result_schedule`'s units (GATHER rows, pooled bags with empty bags, a bag range
    not starting at 0, bad lookups among them, block mode on and off), command after command."""
    from evssd.host.timing import TimingModel, result_schedule

    rng = np.random.default_rng(row_bytes)
    params = Params(n_channels=3, ways=2, pages_per_channel=64, page_size=1024, max_row_bytes=256)
    with Device.open(ModelTransport(params, host_memory_bytes=8 << 20)) as dev:
        dev.configure_table(0, row_bytes, "fp32", [(0, 2000, 0), (3000, 500, 150)])
        model = dev.transport.device
        ref = TimingModel(params, t_r=model.timing.t_r, n_slots=model.timing.n_slots)
        ref.cycles = ref.engine_free = dev.counters()["cycles"]
        for trial in range(30):
            block = trial % 5 == 4
            dev.set_block_mode(block)
            n = int(rng.integers(0, 400))
            idx = rng.choice(np.r_[0:2000, 3000:3500], n)
            if n and trial % 2:
                idx[rng.integers(0, n, 5)] = 2500           # in no extent
            pooled = trial % 3 != 0
            if pooled:
                cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 30))))
                offsets = np.concatenate([[min(cuts[0], 2) if cuts.size else 0], cuts, [n]])
                offsets = np.maximum.accumulate(offsets)
                lo, hi = int(offsets[0]), int(offsets[-1])
                ends = offsets[1:] - 1
            else:
                lo, hi = 0, n
                ends = np.arange(n)
            c0 = dev.counters()
            try:
                dev.gather_pooled(0, idx, offsets) if pooled else dev.gather(0, idx)
            except DeviceError as exc:
                assert exc.status == Status.BAD_INDEX
            c1 = dev.counters()
            st, lba, off = translate_many(idx[lo:hi], model.tables[0], params.total_pages)
            good = np.flatnonzero(st == 0)
            lba, off = lba[good], off[good]
            unit = regmap.pooled_row_bytes(row_bytes, ElemType.FP32) if pooled else row_bytes
            ref.lookups(lba % 3, lba // 3, off, row_bytes, result_schedule(good + lo, ends, unit), block)
            assert c1["cycles"] == ref.cycles > c0["cycles"] + hi - lo, trial
            for name, arr in (("tr_waits", ref.ch_tr_waits), ("busy_cycles", ref.ch_busy_cycles),
                              ("rows", ref.ch_rows), ("bytes", ref.ch_bytes)):
                assert [ch[name] for ch in c1["channels"]] == arr.tolist(), (trial, name)
