"""Row memory on cache-line boundaries (host/rowmem.py) and the places that must use it."""
import warnings

import numpy as np
import pytest

from evssd.host.cache import EVCache
from evssd.host.rowmem import CACHE_LINE, empty_rows, is_on_cache_line, on_cache_lines, zeros_rows
from evssd.host.store import EmbeddingStore
from tests.test_pooling import ref_fp32


def _misaligned(shape, dtype, shift=16):
    """An array of ``shape`` whose first byte is ``shift`` bytes past a cache line."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(n + 2 * CACHE_LINE, np.uint8)
    start = (-raw.ctypes.data % CACHE_LINE) + shift
    arr = raw[start:start + n].view(dtype).reshape(shape)
    assert arr.ctypes.data % CACHE_LINE == shift
    return arr


@pytest.mark.parametrize("shape", [(0,), 7, (1, 1), (3, 5), (128, 64), (1000, 33), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.int32, np.float64])
def test_empty_rows_is_on_a_cache_line_with_the_asked_shape(shape, dtype):
    want = (shape,) if isinstance(shape, int) else shape
    for _ in range(20):  # several allocations: the heap's own alignment varies between them
        a = empty_rows(shape, dtype)
        assert a.shape == want and a.dtype == np.dtype(dtype)
        assert a.flags.c_contiguous and a.flags.writeable
        if a.size:                # an empty array has no byte to place
            assert a.ctypes.data % CACHE_LINE == 0 and is_on_cache_line(a)
    z = zeros_rows(shape, dtype)
    assert z.shape == want and not z.any() and (not z.size or is_on_cache_line(z))


def test_empty_rows_arrays_do_not_overlap():
    arrs = [empty_rows((17, 9), np.float32) for _ in range(50)]
    for i, a in enumerate(arrs):
        a.fill(i)
    assert all((a == i).all() for i, a in enumerate(arrs))


def test_on_cache_lines_keeps_an_aligned_array_and_copies_the_rest():
    rng = np.random.default_rng(3)
    good = empty_rows((100, 64), np.float32)
    good[:] = rng.standard_normal((100, 64))
    assert on_cache_lines(good) is good
    for shift in (4, 16, 32, 48):
        bad = _misaligned((100, 64), np.float32, shift)
        bad[:] = good
        fixed = on_cache_lines(bad)
        assert fixed is not bad and not np.shares_memory(fixed, bad)
        assert is_on_cache_line(fixed) and fixed.dtype == bad.dtype and np.array_equal(fixed, bad)
    strided = good[:, ::2]               # not contiguous: a contiguous copy on a cache line
    fixed = on_cache_lines(strided)
    assert fixed.flags.c_contiguous and is_on_cache_line(fixed) and np.array_equal(fixed, strided)
    fortran = np.asfortranarray(good)
    fixed = on_cache_lines(fortran)
    assert fixed.flags.c_contiguous and is_on_cache_line(fixed) and np.array_equal(fixed, good)


def test_the_dram_backend_serves_rows_on_cache_lines_with_the_given_values():
    rng = np.random.default_rng(5)
    t = _misaligned((1000, 64), np.float32)
    t[:] = rng.standard_normal((1000, 64))
    u = empty_rows((500, 32), np.float16)
    u[:] = rng.standard_normal((500, 32))
    with EmbeddingStore.from_arrays({"t": t, "u": u}, "dram") as store:
        arrs = store.backend.arrays
        assert all(is_on_cache_line(a) for a in arrs.values())
        assert arrs["u"] is u                       # already aligned: no copy
        assert np.array_equal(arrs["t"], t) and not np.shares_memory(arrs["t"], t)
        idx = rng.integers(0, 1000, 60)
        offs = np.arange(0, 61, 20)
        got = store.pooled("t", idx, offs)
        assert is_on_cache_line(got)
        assert np.array_equal(got.view(np.uint32), ref_fp32(t.view(np.uint32), idx, offs))


def test_the_cache_rows_and_the_devices_results_are_on_cache_lines():
    c = EVCache(10_000, 64, np.float32, capacity=300)
    assert is_on_cache_line(c.values)
    rng = np.random.default_rng(7)
    tables = {"t": rng.standard_normal((2000, 64)).astype(np.float32)}
    with EmbeddingStore.from_arrays(tables, "evssd", cache_fraction=None) as store:
        rows = store.gather("t", rng.integers(0, 2000, 100))
        raw = store.backend.device.gather(store.backend._ids["t"].table_id,
                                          rng.integers(0, 2000, 50).astype(np.uint32))
        assert is_on_cache_line(raw)
        assert rows.shape == (100, 64)


def test_npy_tables_are_served_in_place(tmp_path):
    """The .npy format starts the data on a 64-byte boundary: a memory-mapped table needs no
    copy (so a table larger than memory stays on disk), and a path loads onto a cache line."""
    rng = np.random.default_rng(9)
    t = rng.standard_normal((3000, 64)).astype(np.float32)
    np.save(tmp_path / "t.npy", t)
    m = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert is_on_cache_line(m)
    with EmbeddingStore.from_arrays({"m": m, "p": tmp_path / "t.npy"}, "dram") as store:
        assert np.shares_memory(store.backend.arrays["m"], m)
        assert is_on_cache_line(store.backend.arrays["p"])
        idx = rng.integers(0, 3000, 40)
        offs = np.array([0, 10, 40])
        want = ref_fp32(t.view(np.uint32), idx, offs)
        for name in ("m", "p"):
            assert np.array_equal(store.pooled(name, idx, offs).view(np.uint32), want)


@pytest.mark.parametrize("pack", [False, True])
def test_torch_face_tables_reach_the_dram_store_on_cache_lines(pack, monkeypatch):
    """The TorchRec face copies its tables once (it owns them), onto cache lines, packed or not:
    the dram store then serves that copy and makes none of its own."""
    from evssd.host.store import dram
    from evssd.host.torchface.core import EmbeddingTables
    from evssd.host.torchface.tables import TableSpec
    kept = []
    real = dram.on_cache_lines
    monkeypatch.setattr(dram, "on_cache_lines", lambda a, *limit: (kept.append(real(a) is a), real(a))[1])
    rng = np.random.default_rng(11)
    specs = [TableSpec("a", 300, 64, "fp32", features=("fa",)), TableSpec("b", 200, 64, "fp32", features=("fb",))]
    arrays = {"a": _misaligned((300, 64), np.float32), "b": _misaligned((200, 64), np.float32)}
    for a in arrays.values():
        a[:] = rng.standard_normal(a.shape)
    et = EmbeddingTables(specs, arrays, backend="dram", pack=pack)
    try:
        assert kept == [True] * (1 if pack else 2)       # every table served as the face built it
        arrs = et.store.backend.arrays
        assert all(is_on_cache_line(a) and not np.shares_memory(a, arrays["a"]) for a in arrs.values())
        got = np.concatenate([arrs[n] for n in sorted(arrs)])
        assert np.array_equal(got, np.concatenate([arrays["a"], arrays["b"]]))
    finally:
        et.store.close()


def test_a_table_too_large_to_copy_is_served_in_place_with_a_warning(monkeypatch):
    """A cache-line copy that would take more than half the available memory is not made: the
    table is served where it is (same results) and a warning names it."""
    from evssd.host.store import dram
    rng = np.random.default_rng(13)
    t = _misaligned((2000, 64), np.float32)
    t[:] = rng.standard_normal(t.shape)
    for limit in (None, 4 * t.nbytes):            # unknown, or room: copied, no warning
        monkeypatch.setattr(dram, "available_memory", lambda: limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with EmbeddingStore.from_arrays({"t": t}, "dram") as store:
                assert is_on_cache_line(store.backend.arrays["t"])
    monkeypatch.setattr(dram, "available_memory", lambda: t.nbytes)   # a copy would take it all
    with pytest.warns(UserWarning, match=r"table 't': served from its own memory.*cache line"):
        store = EmbeddingStore.from_arrays({"t": t}, "dram")
    with store:
        assert store.backend.arrays["t"] is t
        idx = rng.integers(0, 2000, 50)
        offs = np.array([0, 20, 50])
        assert np.array_equal(store.pooled("t", idx, offs).view(np.uint32),
                              ref_fp32(t.view(np.uint32), idx, offs))
    assert on_cache_lines(t, max_copy_bytes=t.nbytes - 1) is t
    assert on_cache_lines(t, max_copy_bytes=t.nbytes) is not t
