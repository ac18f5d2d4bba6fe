"""Property tests: every path returns the pooling definition's bits.

Paths: dram, file (row and page), rocksdb and evssd (the model; pooled on the device without a
cache), each with no cache, the EV-Cache and a plain LRU, plus the pipeline. Tables hold the
awkward values (-0.0, NaN payloads, infinities, subnormals, int8/int32 extremes); hypothesis draws
the bags (duplicates, empty bags) and per-sample weights. The reference is slow and independent of
the kernels: the gateware adder's bit model for float sums, Python integers for int sums.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from evssd.host import pooling as P
from evssd.host.pipeline import Pipeline
from evssd.host.store import EmbeddingStore, RowwiseInt8

ROWS = 48


def _tables():
    rng = np.random.default_rng(42)
    f32 = (rng.standard_normal((ROWS, 5)) * 10.0 ** rng.integers(-3, 4, (ROWS, 1))).astype(np.float32)
    b = f32.view(np.uint32)
    specials = [0x8000_0000, 0x0000_0000, 0x7FC0_0001, 0xFFBF_FFFF, 0x7F80_0001, 0x7F80_0000, 0xFF80_0000,
                0x0000_0001, 0x807F_FFFF, 0x0040_0000, 0x7F7F_FFFF, 0xFF7F_FFFF]
    for k, v in enumerate(specials):
        b[k, k % 5] = v
        b[k + 12, (k + 2) % 5] = v
    b[30] = 0x8000_0000  # a whole row of -0.0
    f16 = rng.standard_normal((ROWS, 4)).astype(np.float16)
    h = f16.view(np.uint16)
    for k, v in enumerate([0x8000, 0x0001, 0x8001, 0x03FF, 0x7C00, 0xFC00, 0x7E01, 0xFD00, 0x7BFF, 0xFBFF]):
        h[k, k % 4] = v
    h[31] = 0x8000
    i8 = rng.integers(-128, 128, (ROWS, 6)).astype(np.int8)
    i8[:6] = [127, -128, 127, -128, 1, -1]
    i32 = rng.integers(-2**31, 2**31, (ROWS, 3), dtype=np.int64).astype(np.int32)
    i32[:4] = [[2**31 - 1, -2**31, 2**24 + 1]] * 4
    q = np.empty((ROWS, 4 + 7), np.uint8)
    q[:, 0:2] = (rng.standard_normal(ROWS) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    q[:, 2:4] = rng.standard_normal(ROWS).astype(np.float16).view(np.uint8).reshape(-1, 2)
    q[:, 4:] = rng.integers(0, 256, (ROWS, 7))
    q[0, 0:4] = [0, 0x80, 0, 0x80]  # scale -0.0, bias -0.0
    return {"f32": f32, "f16": f16, "i8": i8, "i32": i32, "q": q}


TABLES = _tables()
ELEM = {"f32": "fp32", "f16": "fp16", "i8": "int8", "i32": "int32", "q": "int8_rowwise"}


def reference(name, idx, offs, w=None):
    """The definition, slowly: bit-model adds for floats, Python ints for ints."""
    t = TABLES[name]
    n_bags = len(offs) - 1
    if name in ("i8", "i32") and w is None:
        out = np.zeros((n_bags, t.shape[1]), np.int32)
        for b in range(n_bags):
            s = [0] * t.shape[1]
            for k in range(offs[b], offs[b + 1]):
                s = [a + int(x) for a, x in zip(s, t[idx[k]])]
            out[b] = [((v + 2**31) % 2**32) - 2**31 for v in s]
        return out
    if name == "q":
        from tests.test_pooling import ref_rowwise
        out = ref_rowwise(t, idx, offs, w)
        out[np.isnan(out)] = np.float32(np.nan)
        out.view(np.uint32)[np.isnan(out)] = P.CANONICAL_NAN
        return out
    if name == "f16":
        rows = P.fp16_to_fp32_bits(t.view(np.uint16))
    elif name == "f32":
        rows = t.view(np.uint32)
    else:
        rows = t.astype(np.float32).view(np.uint32)  # weighted ints: converted to fp32 first
    out = np.zeros((n_bags, t.shape[1]), np.uint32)
    for b in range(n_bags):
        acc = np.full(t.shape[1], 0x8000_0000, np.uint32)
        for k in range(offs[b], offs[b + 1]):
            x = rows[idx[k]]
            if w is not None:
                acc = P.fma32_model(w[k], x.view(np.float32), acc.view(np.float32)).view(np.uint32)
            else:
                acc = P.fp32_add_bits(acc, x)
        out[b] = P.canonicalize_nan(acc.view(np.float32)).view(np.uint32) if offs[b + 1] > offs[b] else 0
    return out.view(np.float32)


def _arrays():
    return {n: (RowwiseInt8(a) if n == "q" else a) for n, a in TABLES.items()}


PATHS = {
    "dram": ("dram", {}),
    "dram+ev": ("dram", {"cache_fraction": 0.3}),
    "dram+lru": ("dram", {"cache_fraction": 0.3, "cache": "lru"}),
    "file-row": ("file", {"cache_fraction": None}),
    "file-row+ev": ("file", {"cache_fraction": 0.3}),
    # a cache holding the whole table: the second round is all hits, pooled from the cache's
    # rows by the dram path's kernel (serial, and parallel over bags)
    "file-row+ev-all": ("file", {"cache_fraction": 1.0}),
    "file-row+ev-all-par": ("file", {"cache_fraction": 1.0, "parallel": True}),
    "file-page+lru": ("file", {"cache_fraction": 0.3, "cache": "lru", "file_mode": "page"}),
    "rocksdb": ("rocksdb", {"cache_fraction": None}),
    "rocksdb+ev": ("rocksdb", {"cache_fraction": 0.3}),
    "evssd": ("evssd", {"cache_fraction": None}),
    "evssd+ev": ("evssd", {"cache_fraction": 0.3}),
    "evssd+lru": ("evssd", {"cache_fraction": 0.3, "cache": "lru"}),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for name, (backend, kw) in PATHS.items():
        kw = dict(kw)
        if backend in ("file", "rocksdb"):
            kw["path"] = tmp_path_factory.mktemp(name.replace("+", "_"))
        out[name] = EmbeddingStore.from_arrays(_arrays(), backend, **kw)
    yield out
    for s in out.values():
        s.close()


@st.composite
def bags(draw):
    n_bags = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 5), min_size=n_bags, max_size=n_bags))
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # few distinct rows, so that duplicates and the special rows (low indices) come up often
    idx = np.array(draw(st.lists(st.integers(0, ROWS - 1) | st.integers(0, 15), min_size=int(offs[-1]),
                                 max_size=int(offs[-1]))), dtype=np.int64)
    weights = draw(st.none() | st.lists(st.sampled_from([1.0, -1.0, 0.5, -0.0, 3e38, 1e-40, 2.0 ** -20,
                                                         float("inf"), float("nan"), 0.1]),
                                        min_size=idx.size, max_size=idx.size))
    return idx, offs, None if weights is None else np.array(weights, np.float32)


def _check(got, want, what):
    assert got.dtype == want.dtype, what
    np.testing.assert_array_equal(got.view(np.uint32) if got.dtype.itemsize == 4 else got,
                                  want.view(np.uint32), err_msg=what)


@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=st.fixed_dictionaries({n: bags() for n in TABLES}))
def test_every_path_pools_to_the_definition(stores, path, req):
    store = stores[path]
    requests = {n: (i, o) if w is None else (i, o, w) for n, (i, o, w) in req.items()}
    for _ in range(2):  # the second round hits the caches
        got = store.lookup_many(requests)
        for n, (i, o, w) in req.items():
            _check(got[n], reference(n, i, o, w), f"{path} {n} weighted={w is not None}")
    n = "f32"
    i, o, _ = req[n]
    _check(store.pooled(n, i, o), reference(n, i, o), f"{path} pooled")


@pytest.mark.parametrize("path", ["file-row+ev", "evssd", "evssd+ev"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.fixed_dictionaries({n: bags() for n in ("f32", "f16", "i32")}), min_size=1, max_size=4))
def test_pipeline_pools_to_the_definition(stores, path, batches):
    reqs = [{n: (i, o) if w is None else (i, o, w) for n, (i, o, w) in b.items()} for b in batches]
    with Pipeline(stores[path], "sum", depth=2) as pipe:
        for r in pipe.run(reqs):
            for n, (i, o, w) in batches[r.index].items():
                _check(r.results[n], reference(n, i, o, w), f"pipeline {path} {n}")
