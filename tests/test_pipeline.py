"""The pipeline returns exactly what the unpipelined path returns, for every backend and depth."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from evssd.host.pipeline import Pipeline, latency_summary, run_unpipelined
from evssd.host.store import EmbeddingStore, StoreInputError
from .test_store import golden_pooled

HAVE_DEVICE = importlib.util.find_spec("evssd.host.device") is not None


def make_tables():
    rng = np.random.default_rng(7)
    return {"f32": rng.standard_normal((2000, 16)).astype(np.float32),
            "f16": rng.standard_normal((500, 6)).astype(np.float16),
            "i8": rng.integers(-128, 128, (800, 12)).astype(np.int8)}


def make_batches(tables, n=12, bags=16, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        batch = {}
        for name, t in tables.items():
            lengths = rng.integers(0, 8, bags)
            offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            idx = ((rng.zipf(1.2, offs[-1]) - 1) % t.shape[0]).astype(np.int64)
            batch[name] = (idx, offs)
        out.append(batch)
    return out


def stores(tmp_path):
    tables = make_tables()
    yield "dram", lambda: EmbeddingStore.from_arrays(tables, "dram", cache_fraction=0.02)
    yield "file-page", lambda: EmbeddingStore.from_arrays(tables, "file", path=tmp_path / "p", file_mode="page")
    yield "file-row-lru", lambda: EmbeddingStore.from_arrays(tables, "file", path=tmp_path / "r", cache="lru")
    yield "rocksdb", lambda: EmbeddingStore.from_arrays(tables, "rocksdb", path=tmp_path / "db")
    if HAVE_DEVICE:
        yield "evssd", lambda: EmbeddingStore.from_arrays(tables, "evssd", cache_fraction=0.02)
        yield "evssd-nocache", lambda: EmbeddingStore.from_arrays(tables, "evssd", cache_fraction=None)


@pytest.mark.parametrize("mode", ["sum", "mean", None])
def test_pipeline_equals_unpipelined(tmp_path, mode):
    tables = make_tables()
    batches = make_batches(tables)
    if mode is None:
        batches = [{n: idx for n, (idx, _) in b.items()} for b in batches]
    for name, make in stores(tmp_path / str(mode)):
        with make() as ref_store:
            ref = list(run_unpipelined(ref_store, batches, mode))
        for depth in (1, 2, 4):
            with make() as store, Pipeline(store, mode, depth=depth) as pipe:
                got = pipe.run_all(batches)
                assert [r.index for r in got] == list(range(len(batches)))
                for r, g in zip(ref, got):
                    for t in tables:
                        assert g.results[t].dtype == r.results[t].dtype
                        np.testing.assert_array_equal(g.results[t], r.results[t], err_msg=f"{name} {depth} {t}")
                assert pipe.summary()["batches"] == len(batches)
                assert store.stats()["batches"] == len(batches)
        # and the reference itself is numpy's answer
        for b, r in zip(batches, ref):
            for t, req in b.items():
                idx = req if mode is None else req[0]
                if mode is None:
                    np.testing.assert_array_equal(r.results[t], tables[t][idx])
                else:
                    np.testing.assert_array_equal(r.results[t], golden_pooled(tables[t], idx, req[1], mode))


def test_pipeline_propagates_bad_input(tmp_path):
    tables = make_tables()
    batches = make_batches(tables, n=3)
    bad = dict(batches[1])
    bad["f16"] = (np.array([0, 500]), np.array([0, 2]))
    store = EmbeddingStore.from_arrays(tables, "file", path=tmp_path)
    with Pipeline(store) as pipe:
        it = pipe.run([batches[0], bad, batches[2]])
        with pytest.raises(StoreInputError, match=r"table 'f16': index 500 at position 1"):
            list(it)
    store.close()


def test_latency_summary():
    s = latency_summary([0.001, 0.002, 0.003])
    assert s["batches"] == 3 and s["p50_ms"] == pytest.approx(2.0) and s["max_ms"] == pytest.approx(3.0)
    assert latency_summary([]) == {"batches": 0}
    with pytest.raises(ValueError, match="depth"):
        Pipeline(None, depth=0)


def test_pipeline_overlaps_io_with_next_prepare():
    """Batch 0's backend read blocks until batch 1's cache lookup has happened: only a pipeline
    that prepares batch i+1 while batch i's I/O is in flight gets past it (no timing involved:
    the unpipelined path is shown to run the other way round)."""
    import threading
    from evssd.host.store import DramBackend, TableInfo

    t = np.arange(40, dtype=np.float32).reshape(20, 2)
    info = TableInfo("t", 20, 2, t.dtype)
    events = []
    second_lookup = threading.Event()

    class Cache:
        stats = {}

        def __init__(self, info, fraction):
            self.n = 0

        def lookup(self, indices, out):
            self.n += 1
            events.append(("lookup", self.n, threading.get_ident()))
            if self.n == 2:
                second_lookup.set()
            return np.zeros(len(indices), bool)

        def admit(self, indices, rows):
            pass

    class Backend(DramBackend):
        def read_rows(self, info, indices):
            events.append(("read", second_lookup.wait(timeout=10), threading.get_ident()))
            return super().read_rows(info, indices)

    batches = [{"t": (np.array([1, 2]), np.array([0, 2]))}, {"t": (np.array([3]), np.array([0, 1]))}]
    store = EmbeddingStore({"t": info}, Backend({"t": t}), cache_fraction=0.5, cache=Cache)
    with Pipeline(store, "sum", depth=2) as pipe:
        out = pipe.run_all(batches)
    np.testing.assert_array_equal(out[0].results["t"], [[2 + 4, 3 + 5]])
    first_read = next(e for e in events if e[0] == "read")
    assert first_read[1] is True                      # batch 1 was prepared while batch 0 read
    main = events[0][2]
    assert all(e[2] != main for e in events if e[0] == "read")  # I/O on the worker thread
    assert all(e[2] == main for e in events if e[0] == "lookup")  # cache only on the caller

    events.clear()
    second_lookup.clear()
    store2 = EmbeddingStore({"t": info}, Backend({"t": t}), cache_fraction=0.5, cache=Cache)
    second_lookup.set()  # unpipelined: lookup 1, read 0, lookup 2, read 1 -- in that order
    list(run_unpipelined(store2, batches))
    assert [e[0] for e in events] == ["lookup", "read", "lookup", "read"]
