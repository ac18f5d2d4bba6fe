"""EmbeddingStore backends against numpy: gather, pooled sum/mean, every dtype, bad input, bad files."""
from __future__ import annotations

import importlib.util
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from evssd.host.store import (
    EmbeddingStore, PlainLRU, StoreInputError, TableFileError, open_table_file, write_table_file,
)

DTYPES = ["fp32", "fp16", "int8", "int32"]
NP = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int32": np.int32}
HAVE_CACHE = importlib.util.find_spec("evssd.host.cache") is not None
HAVE_DEVICE = importlib.util.find_spec("evssd.host.device") is not None


def make_table(rows, dim, elem, seed=0):
    rng = np.random.default_rng(seed)
    if elem in ("fp32", "fp16"):
        return rng.standard_normal((rows, dim)).astype(NP[elem])
    if elem == "int8":
        return rng.integers(-128, 128, (rows, dim)).astype(np.int8)
    return rng.integers(-(1 << 20), 1 << 20, (rows, dim)).astype(np.int32)


def golden_pooled(table, indices, offsets, mode):
    """Sequential bag-order reference: float rows accumulate in float32, ints in int32."""
    acc = np.float32 if table.dtype.kind == "f" else np.int32
    out = np.zeros((len(offsets) - 1, table.shape[1]), acc)
    for b in range(len(offsets) - 1):
        s = np.zeros(table.shape[1], acc)
        for k in range(offsets[b], offsets[b + 1]):
            s = (s + table[indices[k]].astype(acc)).astype(acc)
        out[b] = s
    if mode == "mean":
        n = np.diff(offsets).astype(np.float32)
        m = out.astype(np.float32)
        for b in range(len(n)):
            m[b] = m[b] / n[b] if n[b] else 0
        return m
    return out


def random_bags(rng, rows, n_bags, max_len=6):
    lengths = rng.integers(0, max_len + 1, n_bags)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # skewed so that rows repeat within a batch (dedupe path) and caches get hits
    idx = (rng.zipf(1.3, offsets[-1]) - 1) % rows
    return idx.astype(np.int64), offsets


class DictCache:
    """Minimal stand-in with the EV-Cache API (admits everything, unbounded)."""

    def __init__(self, info, fraction):
        self.rows = {}
        self.stats = {"hits": 0, "misses": 0}

    def lookup(self, indices, out):
        hit = np.array([int(i) in self.rows for i in indices], dtype=bool)
        for k in np.flatnonzero(hit):
            out[k] = self.rows[int(indices[k])]
        self.stats["hits"] += int(hit.sum())
        self.stats["misses"] += int((~hit).sum())
        return hit

    def admit(self, indices, rows):
        for i, r in zip(indices.tolist(), rows):
            self.rows[i] = r.copy()


def backends(tmp_path):
    """(backend, kwargs) pairs that can run here."""
    out = [("dram", {}),
           ("file", {"path": tmp_path / "page", "file_mode": "page"}),
           ("file", {"path": tmp_path / "row", "file_mode": "row"}),
           ("rocksdb", {"path": tmp_path / "rdb"})]
    if HAVE_DEVICE:
        out.append(("evssd", {}))
    return out


def _store(tables, backend, kw, cache):
    return EmbeddingStore.from_arrays(tables, backend, cache_fraction=0.05 if cache else None,
                                      cache=cache or "evcache", **kw)


CACHES = [None, DictCache, "lru"] + (["evcache"] if HAVE_CACHE else [])


@pytest.mark.parametrize("cache", CACHES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_backends_match_numpy(tmp_path, cache):
    rng = np.random.default_rng(1)
    tables = {elem: make_table(300 + 7 * k, 3 + 5 * k, elem, seed=k) for k, elem in enumerate(DTYPES)}
    for backend, kw in backends(tmp_path / str(cache)):
        if backend == "evssd" and cache is not None:
            continue  # exercised below without the cost of a second device per cache kind
        with _store(tables, backend, kw, cache) as store:
            assert set(store.tables) == set(tables)
            for _ in range(3):  # several batches so caches see repeats
                for name, t in tables.items():
                    idx, offs = random_bags(rng, t.shape[0], 9)
                    np.testing.assert_array_equal(store.gather(name, idx), t[idx], err_msg=f"{backend} {name}")
                    for mode in ("sum", "mean"):
                        got = store.pooled(name, idx, offs, mode)
                        want = golden_pooled(t, idx, offs, mode)
                        assert got.dtype == want.dtype, (backend, name, mode)
                        np.testing.assert_array_equal(got, want, err_msg=f"{backend} {name} {mode}")
            s = store.stats()
            assert s["lookups"] > 0 and s["bytes_read"] > 0
            if cache is not None:
                assert s["cache_hit_rate"] is not None and s["cache_hit_rate"] > 0


def test_file_page_vs_row_bytes(tmp_path):
    t = make_table(1000, 16, "fp32")  # 64-byte rows, 64 rows per page
    idx = np.array([0, 1, 64, 999, 1], dtype=np.int64)
    for mode, per_row in (("page", 4096), ("row", 64)):
        with EmbeddingStore.from_arrays({"t": t}, "file", path=tmp_path / mode, file_mode=mode,
                                        cache_fraction=None) as s:
            np.testing.assert_array_equal(s.gather("t", idx), t[idx])
            st_ = s.stats()
            assert st_["rows_read"] == 4  # distinct rows in the lookup
            assert st_["bytes_read"] == 4 * per_row


@pytest.mark.parametrize("cache", [None, "evcache"])
def test_lookup_many_and_empty(tmp_path, cache):
    rng = np.random.default_rng(3)
    tables = {"a": make_table(50, 4, "fp32", 1), "b": make_table(70, 7, "int8", 2)}  # b: padded rows
    for backend, kw in backends(tmp_path / str(cache)):
        with _store(tables, backend, kw, cache) as store:
            reqs = {n: random_bags(rng, t.shape[0], 5) for n, t in tables.items()}
            res = store.lookup_many(reqs, "mean")
            for n, (i, o) in reqs.items():
                np.testing.assert_array_equal(res[n], golden_pooled(tables[n], i, o, "mean"), err_msg=backend)
            g = store.lookup_many({"a": np.array([3, 3, 1]), "b": np.array([69])}, mode=None)
            np.testing.assert_array_equal(g["a"], tables["a"][[3, 3, 1]])
            np.testing.assert_array_equal(g["b"], tables["b"][[69]])
            # empty lookups and all-empty bags
            assert store.gather("a", np.array([], np.int64)).shape == (0, 4)
            z = store.pooled("a", np.array([], np.int64), np.array([0, 0, 0]), "mean")
            np.testing.assert_array_equal(z, np.zeros((2, 4), np.float32))
            e = store.pooled("b", np.array([], np.int64), np.array([0]), "sum")
            assert e.shape == (0, 7) and e.dtype == np.int32
            m = store.lookup_many({"a": (np.array([], np.int64), np.array([0, 0])),
                                   "b": (np.array([5]), np.array([0, 1]))}, "sum")
            np.testing.assert_array_equal(m["b"], tables["b"][[5]].astype(np.int32))


def test_fp32_sum_is_sequential_in_bag_order():
    # 1e8 + 1 - 1e8 in float32: sequential order gives 0, pairwise or float64 would give 1
    t = np.array([[1e8], [1.0], [-1e8]], np.float32)
    store = EmbeddingStore.from_arrays({"t": t})
    got = store.pooled("t", np.array([0, 1, 2]), np.array([0, 3]))
    assert got[0, 0] == np.float32(np.float32(1e8 + 1.0) - np.float32(1e8))


def test_int_sums_wrap_like_the_device():
    t = np.full((2, 1), 2**30, np.int32)
    store = EmbeddingStore.from_arrays({"t": t})
    got = store.pooled("t", np.array([0, 1, 0, 1]), np.array([0, 4]))
    assert got.dtype == np.int32 and got[0, 0] == np.int32(0)  # 4 * 2**30 wraps to 0


@pytest.mark.parametrize("call, match", [
    (lambda s: s.gather("nope", [1]), r"unknown table 'nope'"),
    (lambda s: s.gather("t", np.array([1, 2, 10])), r"table 't': index 10 at position 2 out of range \[0, 10\)"),
    (lambda s: s.gather("t", np.array([1, -1])), r"table 't': index -1 at position 1"),
    (lambda s: s.gather("t", np.array([1.0, 2.0])), r"table 't': indices must be integers"),
    (lambda s: s.gather("t", np.array([[1, 2]])), r"table 't': indices must be 1-D"),
    (lambda s: s.pooled("t", np.array([1, 2, 3]), np.array([0, 2, 1, 3])),
     r"table 't': offsets not monotonic at position 2"),
    (lambda s: s.pooled("t", np.array([1, 2, 3]), np.array([1, 3])), r"offsets\[0\] must be 0"),
    (lambda s: s.pooled("t", np.array([1, 2, 3]), np.array([0, 2])), r"offsets\[-1\] = 2 must equal"),
    (lambda s: s.pooled("t", np.array([1]), np.array([0.0, 1.0])), r"offsets must be integers"),
    (lambda s: s.pooled("t", np.array([1]), np.array([0, 1]), "max"), r"pooling mode"),
    (lambda s: s.lookup_many({"t": (np.array([1]), np.array([0, 1])), "u": (np.array([5]), np.array([0, 1]))}),
     r"table 'u': index 5 at position 0"),
])
def test_bad_input_raises_before_io(tmp_path, call, match):
    tables = {"t": make_table(10, 4, "fp32"), "u": make_table(5, 4, "fp32")}
    store = EmbeddingStore.from_arrays(tables, "file", path=tmp_path, cache_fraction=None)
    with pytest.raises(StoreInputError, match=match):
        call(store)
    assert store.stats()["bytes_read"] == 0  # validated before any read
    store.close()


def test_bad_tables_and_backends(tmp_path):
    with pytest.raises(StoreInputError, match="unsupported element type float64"):
        EmbeddingStore.from_arrays({"t": np.zeros((4, 4))})
    with pytest.raises(StoreInputError, match="expected a 2-D array"):
        EmbeddingStore.from_arrays({"t": np.zeros(4, np.float32)})
    with pytest.raises(StoreInputError, match="unknown backend 'tape'"):
        EmbeddingStore.from_arrays({"t": np.zeros((4, 4), np.float32)}, "tape")
    for backend in ("file", "rocksdb"):  # no path: a temporary directory, removed by close()
        s = EmbeddingStore.from_arrays({"t": np.ones((4, 4), np.float32)}, backend)
        tmp = s.backend.owned_dir
        assert tmp.exists()
        np.testing.assert_array_equal(s.gather("t", [3]), np.ones((1, 4), np.float32))
        s.close()
        assert not tmp.exists()


# -- the table file ------------------------------------------------------------------------------

@pytest.mark.parametrize("elem", DTYPES)
@pytest.mark.parametrize("rows, dim", [(1, 1), (130, 5), (3, 1500)])  # 1500 fp32 > one page
def test_table_file_roundtrip(tmp_path, elem, rows, dim):
    t = make_table(rows, dim, elem)
    tf = open_table_file(write_table_file(tmp_path / "t.evt", t))
    assert (tf.rows, tf.dim, tf.elem) == (rows, dim, elem)
    assert os.path.getsize(tf.path) == tf.file_bytes == tf.crc_offset + 4 * rows + 4
    assert tf.crc_offset % 4096 == 0
    np.testing.assert_array_equal(tf.read_all(), t)
    for mode in ("page", "row"):
        s = EmbeddingStore.from_files({"t": tf.path}, file_mode=mode, cache_fraction=None)
        idx = np.arange(rows)[::-1]
        np.testing.assert_array_equal(s.gather("t", idx), t[idx])
        s.close()


def _corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_table_file_errors(tmp_path):
    t = make_table(100, 8, "fp32")
    p = write_table_file(tmp_path / "t.evt", t)
    good = p.read_bytes()

    p.write_bytes(good[:-1])
    with pytest.raises(TableFileError, match=rf"t\.evt: truncated: {len(good) - 1} bytes"):
        open_table_file(p)
    p.write_bytes(good[:40])
    with pytest.raises(TableFileError, match=r"t\.evt: truncated header \(40 of 64"):
        open_table_file(p)
    p.write_bytes(good + b"x")
    with pytest.raises(TableFileError, match="trailing bytes"):
        open_table_file(p)
    p.write_bytes(b"NOTATABL" + good[8:])
    with pytest.raises(TableFileError, match="not an evssd table file"):
        open_table_file(p)
    p.write_bytes(good)
    _corrupt(p, 16, struct.pack("<Q", 101))  # rows changed, checksum not
    with pytest.raises(TableFileError, match=r"t\.evt: header checksum mismatch"):
        open_table_file(p)
    with pytest.raises(TableFileError, match="cannot read table file"):
        open_table_file(tmp_path / "missing.evt")
    with pytest.raises(TableFileError, match="t.evt"):
        EmbeddingStore.from_files({"t": p})


def test_plain_lru_evicts():
    lru = PlainLRU(100, 2, np.float32, budget_bytes=3 * 8)
    assert lru.capacity == 3
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    lru.admit(np.arange(5), rows)
    out = np.zeros((5, 2), np.float32)
    hit = lru.lookup(np.arange(5), out)
    assert hit.tolist() == [False, False, True, True, True]
    np.testing.assert_array_equal(out[2:], rows[2:])
    assert lru.stats["evictions"] == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), elem=st.sampled_from(DTYPES), rows=st.integers(1, 40), dim=st.integers(1, 9))
def test_pooled_property_file_row_with_lru(tmp_path_factory, data, elem, rows, dim):
    t = make_table(rows, dim, elem, seed=rows * 31 + dim)
    lengths = data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=6))
    offs = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    idx = np.array(data.draw(st.lists(st.integers(0, rows - 1), min_size=int(offs[-1]),
                                      max_size=int(offs[-1]))), dtype=np.int64)
    d = tmp_path_factory.mktemp("prop")
    with EmbeddingStore.from_arrays({"t": t}, "file", path=d, cache="lru", cache_fraction=0.2) as s:
        for _ in range(2):
            for mode in ("sum", "mean"):
                np.testing.assert_array_equal(s.pooled("t", idx, offs, mode), golden_pooled(t, idx, offs, mode))


@pytest.mark.skipif(not HAVE_DEVICE, reason="evssd.host.device not available")
def test_evssd_multi_extent_and_reopen_from_layout_json(tmp_path):
    from evssd.host.device import Device
    rng = np.random.default_rng(5)
    tables = {"a": make_table(3000, 10, "fp16", 1), "b": make_table(1000, 7, "int8", 2)}
    with Device.open("model", pages_per_channel=256) as dev:
        store = EmbeddingStore.from_arrays(tables, "evssd", device=dev, cache_fraction=None,
                                           layout_options={"max_rows_per_extent": 700})
        layout = store.backend.layout
        assert [len(t.extents) for t in layout.tables] == [5, 2]
        path = layout.save(tmp_path / "layout.json")
        # a server that did not write the device: layout from JSON, verified by CRC, then served
        again = EmbeddingStore.from_device(dev, path, cache_fraction=0.05)
        assert again.backend.layout.verify(dev) == layout.n_pages
        for _ in range(3):
            reqs = {n: random_bags(rng, t.shape[0], 12) for n, t in tables.items()}
            for s in (store, again):
                got = s.lookup_many(reqs, "sum")  # two commands in flight at once
                for n, (i, o) in reqs.items():
                    np.testing.assert_array_equal(got[n], golden_pooled(tables[n], i, o, "sum"))
        idx = np.arange(3000)[::-1]
        np.testing.assert_array_equal(again.gather("a", idx), tables["a"][idx])
        assert store.stats()["backend"] == "evssd" and again.stats()["cache_hit_rate"] > 0


def test_from_npy_path(tmp_path):
    t = make_table(40, 3, "int32")
    np.save(tmp_path / "t.npy", t)
    s = EmbeddingStore.from_arrays({"t": tmp_path / "t.npy"})
    np.testing.assert_array_equal(s.gather("t", [5, 0]), t[[5, 0]])
    with pytest.raises(StoreInputError, match="only .npy"):
        EmbeddingStore.from_arrays({"t": tmp_path / "t.bin"})


def test_rocksdb_reopen(tmp_path):
    tables = {"a": make_table(200, 5, "fp16", 1), "b": make_table(90, 3, "int32", 2)}
    EmbeddingStore.from_arrays(tables, "rocksdb", path=tmp_path / "db").close()
    with EmbeddingStore.from_rocksdb(tmp_path / "db", cache_fraction=None) as s:
        assert {n: (i.rows, i.dim, i.elem) for n, i in s.tables.items()} == \
            {"a": (200, 5, "fp16"), "b": (90, 3, "int32")}
        idx = np.array([199, 0, 7, 7])
        np.testing.assert_array_equal(s.gather("a", idx), tables["a"][idx])
        np.testing.assert_array_equal(s.gather("b", idx % 90), tables["b"][idx % 90])
    with pytest.raises(StoreInputError, match="no such database"):
        EmbeddingStore.from_rocksdb(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["page", "row"])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_file_direct_and_threads(tmp_path, mode, direct, threads):
    t = make_table(3000, 20, "fp16")  # 40-byte rows: some straddle 512-byte sectors
    p = write_table_file(tmp_path / "t.evt", t)
    try:
        s = EmbeddingStore.from_files({"t": p}, file_mode=mode, cache_fraction=None,
                                      direct=direct, io_threads=threads)
    except TableFileError as exc:
        pytest.skip(f"O_DIRECT unsupported here: {exc}")
    idx = np.array([0, 2999, 12, 13, 1500, 1501, 700, 3, 2048, 101, 102, 999])
    np.testing.assert_array_equal(s.gather("t", idx), t[idx])
    offs = np.array([0, 5, 5, 12])
    np.testing.assert_array_equal(s.pooled("t", idx, offs, "mean"), golden_pooled(t, idx, offs, "mean"))
    st_ = s.stats()
    per = {"page": 4096, "row": 40}[mode]
    if mode == "row" and direct:
        assert st_["bytes_read"] % 512 == 0 and st_["bytes_read"] >= 2 * 12 * 512
    else:
        assert st_["bytes_read"] == 2 * 12 * per  # two lookups of 12 distinct rows
    s.close()


def test_bench_store_smoke(tmp_path):
    """`evssd bench store` end to end on a tiny configuration: JSON + PNG, outputs agree."""
    import json
    from evssd.host.cli import main
    rc = main(["bench", "store", "--tables", "2", "--rows", "3000", "--dim", "8", "--batches", "3",
               "--warmup", "1", "--batch-size", "8", "--peers", "dram,file-page,rocksdb+ev",
               "--page-cache", "cold", "--kernel-reps", "2", "--kernel-lookups", "4000",
               "--results", str(tmp_path), "--workdir", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "store" / "store.json").read_text())
    assert data["outputs_identical"] is True
    assert [p["peer"] for p in data["peers"]] == ["dram", "file-page", "rocksdb+ev"]
    assert all(p["batches"] == 3 and p["lookups"] == 3 * 2 * 8 * 20 for p in data["peers"])
    assert data["peers"][1]["bytes_per_lookup"] > data["peers"][0]["bytes_per_lookup"]
    assert (tmp_path / "store" / "store.png").stat().st_size > 0
    k = data["kernel_peers"]
    assert {(c["elem"], c["trace"], c["threads"], c["bags"]) for c in k["cells"]} >= {
        ("fp32", "uniform", 1, 128), ("fp16", "meta", 2, 128), ("fp32", "uniform", 1, 4096)}
    for c in k["cells"]:  # same tables, same batches: FBGEMM's sums are ours, bit for bit
        assert c["peers"]["fbgemm_tbe"]["outputs_bit_identical"], c
        # nn.EmbeddingBag returns fp16 sums for fp16 weights: close, not equal
        assert c["peers"]["nn_embeddingbag"]["max_abs_diff"] < (1e-3 if c["elem"] == "fp32" else 0.05), c
        assert c["ratios"]["fbgemm_tbe"] > 0
    assert k["cache_paths"]["evcache_hit_path"]["hit_rate"] == 1.0
    hs = k["cache_paths"]["evssd_host_stack"]
    assert hs["us_per_batch_host_stack"] > 0
    # the floor's cache calls pool the same bags as the dram path, bit for bit (else its
    # numbers would time the wrong work)
    floor = hs["floor"]
    assert floor["cache_calls_bit_identical_to_dram"] is True
    assert floor["batches"] == hs["batches"] and floor["rounds"] >= 2
    assert all(floor[f"us_per_batch_{p}"] > 0 for p in ("cache_calls", "dedupe", "pool_cache_rows", "dram"))
    assert k["peak_rss_bytes"] > 0 and data["versions"]["rocksdict"]
    assert (tmp_path / "store" / "store-peers.png").stat().st_size > 0


@pytest.mark.parametrize("backend", ["file", "rocksdb"] + (["evssd"] if HAVE_DEVICE else []))
def test_concurrent_callers(tmp_path, backend):
    """Several threads on one store (as the serving engine's workers do) get numpy's answers."""
    from concurrent.futures import ThreadPoolExecutor
    tables = {"a": make_table(500, 8, "fp32", 1), "b": make_table(300, 6, "int8", 2)}
    kw = {} if backend == "evssd" else {"path": tmp_path / "d"}
    store = EmbeddingStore.from_arrays(tables, backend, cache_fraction=0.1, **kw)

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(15):
            name = "ab"[rng.integers(2)]
            idx, offs = random_bags(rng, tables[name].shape[0], 6)
            np.testing.assert_array_equal(store.pooled(name, idx, offs), golden_pooled(tables[name], idx, offs, "sum"))
        return True

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(8)))
    s = store.stats()
    assert s["batches"] == 8 * 15 and s["cache_hit_rate"] > 0
    store.close()


@pytest.mark.skipif(not HAVE_CACHE, reason="needs evssd.host.cache")
def test_a_cache_from_a_factory_for_other_rows_is_checked_by_its_own_lookup(tmp_path):
    """The store skips the cache's second check of a batch it validated only for a cache made
    for exactly the table's rows and width: a factory's cache for fewer rows gets every batch
    checked by its own lookup (a clear error naming the index, nothing cached), never an
    unchecked read past its index."""
    from evssd.host.cache import EVCache
    table = make_table(100, 8, "fp32")
    made = []

    def small_cache(info, fraction):
        made.append(EVCache(50, info.width, info.dtype, capacity=10, name=info.name))
        return made[-1]

    with EmbeddingStore.from_arrays({"t": table}, "file", path=tmp_path / "f", cache=small_cache) as store:
        assert store._cache_fits == {"t": False}
        offs = np.array([0, 2, 3])
        np.testing.assert_array_equal(store.pooled("t", np.array([1, 2, 3]), offs),
                                      golden_pooled(table, [1, 2, 3], offs, "sum"))
        before = len(made[0])
        with pytest.raises(IndexError, match=r"index 70 at position 1 is out of range for a table of 50 rows"):
            store.pooled("t", np.array([1, 70, 3]), offs)
        assert len(made[0]) == before
    with EmbeddingStore.from_arrays({"t": table}, "file", path=tmp_path / "g") as store:
        assert store._cache_fits == {"t": True}
