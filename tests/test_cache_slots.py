"""The EV-Cache hit path: ``EVCache.lookup_slots`` has exactly ``lookup``'s effects, the
two-source pooling kernels equal the definition bit for bit, and the store's slot path stays
right when another batch evicts or an invalidation moves the rows it planned to read;
``EVCache.lookup_dedupe`` and ``lookup_pool`` are ``dedupe`` + ``lookup_slots`` (+ pooling)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evssd.host import pooling as P
from evssd.host.cache import EVCache
from evssd.host.elements import ELEMS
from evssd.host.store import EmbeddingStore, RowwiseInt8


def _state(cache: EVCache) -> tuple:
    n = len(cache)
    return (cache.stats, cache.keys_clock().tolist(), cache._ref.tolist(),
            cache._slot_key.tolist(), cache.values[:n].tobytes(), cache._counters.tobytes(),
            cache._sketch.tobytes(), cache._st.tolist(), cache._htab.tobytes())


def _admit_to_twins(a: EVCache, b: EVCache, miss, table, rng, step: int) -> None:
    """The same admissions (and every 7th step three invalidations) on twin caches, which must
    then be in the same state."""
    a.admit(miss, table[miss])
    b.admit(miss, table[miss])
    if step % 7 == 6:
        drop = rng.integers(0, table.shape[0], 3)
        assert a.invalidate(drop) == b.invalidate(drop)
    assert _state(a) == _state(b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 40),
       admission=st.sampled_from(["sketch", "filter"]), decay=st.sampled_from([None, 13]),
       threshold=st.integers(0, 3), n_keys=st.sampled_from([30, 200]))
def test_lookup_slots_has_the_effects_of_lookup(seed, capacity, admission, decay, threshold, n_keys):
    rng = np.random.default_rng(seed)
    dim = 3
    table = rng.standard_normal((n_keys, dim)).astype(np.float32)
    a, b = (EVCache(n_keys, dim, np.float32, capacity=capacity, admission=admission,
                    decay_interval=decay, admit_threshold=threshold, name="t") for _ in range(2))
    for step in range(25):
        keys = rng.zipf(1.3, rng.integers(0, 40)) % n_keys
        out = np.zeros((keys.size, dim), np.float32)
        hit = a.lookup(keys, out)
        buf = np.full(keys.size, 7, np.int32)
        slots = b.lookup_slots(keys, buf)
        assert slots is buf
        assert (slots >= 0).tolist() == hit.tolist()
        # the slot holds the key's row: the same bytes lookup copied out
        assert np.array_equal(b.slot_keys[slots[hit]], keys[hit])
        assert b.values[slots[hit]].tobytes() == out[hit].tobytes()
        assert np.array_equal(out[hit], table[keys[hit]])
        miss = keys[~hit]
        _admit_to_twins(a, b, miss, table, rng, step)
    b.check_invariants()


def test_lookup_slots_bad_input_changes_nothing():
    cache = EVCache(50, 2, np.float32, capacity=8, admit_threshold=0, name="emb")
    cache.admit([1, 2], np.ones((2, 2), np.float32))
    before = _state(cache)
    with pytest.raises(IndexError, match=r"'emb'.*index 50 at position 1"):
        cache.lookup_slots([1, 50])
    with pytest.raises(ValueError, match="slots must be a writeable contiguous int32"):
        cache.lookup_slots([1, 2], np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cache.lookup_slots([1, 2], np.zeros(3, np.int32))
    assert _state(cache) == before
    assert cache.lookup_slots([2, 3, 1]).tolist()[1] == -1
    with pytest.raises(ValueError):
        cache.slot_keys[0] = 5   # a read-only view


def _rows(el, n, rng):
    if el.name == "int8_rowwise":
        q = np.empty((n, 4 + 5), np.uint8)
        q[:, 0:2] = (rng.standard_normal(n) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
        q[:, 2:4] = rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(-1, 2)
        q[:, 4:] = rng.integers(0, 256, (n, 5))
        return q.view(el.storage)
    if el.storage.kind == "f":
        r = rng.standard_normal((n, 5)).astype(el.storage)
        r[0] = -0.0
        if n > 1:
            r[1, 0] = np.nan
        return r
    info = np.iinfo(el.storage)
    return rng.integers(info.min, info.max, (n, 5), endpoint=True).astype(el.storage)


@pytest.mark.parametrize("elem", ["fp32", "fp16", "int8", "int32", "int8_rowwise"])
@pytest.mark.parametrize("weighted", [False, True])
def test_two_source_pooling_is_the_definition(elem, weighted):
    el = ELEMS[elem]
    rng = np.random.default_rng(len(elem) + weighted)
    for trial in range(20):
        n_u = int(rng.integers(1, 30))
        rows = _rows(el, n_u, rng)                 # the distinct rows, in uniq order
        held = rng.random(n_u) < 0.6
        cap = n_u + 3
        csrc = np.zeros((cap, rows.shape[1]), el.storage)
        slot_of = rng.permutation(cap)[:n_u]
        csrc[slot_of[held]] = rows[held]
        miss = np.flatnonzero(~held)
        rng.shuffle(miss)
        msrc = np.ascontiguousarray(rows[miss])
        loc = np.where(held, slot_of, 0).astype(np.int32)
        loc[miss] = -1 - np.arange(miss.size)
        n_bags = int(rng.integers(0, 6))
        offs = np.concatenate([[0], np.cumsum(rng.integers(0, 6, n_bags))]).astype(np.int64)
        inv = rng.integers(0, n_u, int(offs[-1])).astype(np.int64)
        w = rng.choice(np.array([1.0, -0.5, 0.0, -0.0, 3.0, 1e-3], np.float32), inv.size) \
            if weighted else None
        want = P.pool(rows, el, inv, offs, per_sample_weights=w)
        out = np.full_like(want, 99)
        code = P.pool_two_sources(P.kernel_source(csrc, el), P.kernel_source(msrc, el), el, inv,
                                  loc, offs, out, w)
        assert code == -1
        assert out.tobytes() == want.tobytes(), (elem, weighted, trial)
    # a location outside either source is reported (lookup 0), out untouched
    bad = loc.copy()
    bad[inv[0] if inv.size else 0] = cap
    if inv.size:
        out = np.full_like(want, 99)
        assert P.pool_two_sources(P.kernel_source(csrc, el), P.kernel_source(msrc, el), el, inv,
                                  bad, offs, out, w) == 0
        assert (out == 99).all()


@pytest.mark.parametrize("all_hits", [False, True])
@pytest.mark.parametrize("disturb", ["evict", "invalidate"])
def test_slots_reused_between_plan_and_finish_are_read_again(tmp_path, disturb, all_hits):
    """The pipeline plans batch i+1 before it finishes batch i: batch i's admissions (or an
    invalidation) may reuse slots batch i+1 planned to read. The finish notices and re-reads
    (``all_hits``: a batch the cache served whole, which otherwise pools straight from the
    cache's rows; bag-parallel pooling keeps it out of the lookup's own call, which could not
    go stale)."""
    rng = np.random.default_rng(3)
    tables = {"f": rng.standard_normal((400, 8)).astype(np.float32),
              "q": RowwiseInt8(rng.integers(0, 256, (400, 4 + 8)).astype(np.uint8))}
    with EmbeddingStore.from_arrays(tables, "file", path=tmp_path, cache_fraction=0.05) as store:
        cache = store.caches["f"]
        cap = cache.capacity
        warm = np.arange(cap, dtype=np.int64)
        for _ in range(3):  # fill the cache with rows 0..cap-1 (seen enough to be admitted)
            store.pooled("f", warm, np.array([0, cap]))
        assert cache.lookup_slots(warm).min() >= 0
        idx = np.concatenate([warm, warm[::-1]] + ([] if all_hits else [[cap + 5]]))
        offs = np.array([0, 3, cap, idx.size])
        store._bag_parallel = lambda n_bags: True   # the two-phase path, pooled on numba's threads
        plan = store._prepare("f", idx, offs, "sum")
        assert plan.kind == "slots" and plan.miss.size == (0 if all_hits else 1)
        if disturb == "evict":
            other = np.arange(cap + 10, 3 * cap + 10, dtype=np.int64)
            for _ in range(4):
                store.pooled("f", other, np.array([0, other.size]))
        else:
            cache.invalidate(warm[: cap // 2])
        held = plan.slots >= 0
        assert (cache.slot_keys[plan.slots[held]] != plan.uniq[held]).any()  # really stale
        got = store._finish(store._fetch(plan))
        want = P.pool(tables["f"], "fp32", idx, offs)
        assert got.tobytes() == want.tobytes()
        cache.check_invariants()


def test_epoch_moves_exactly_when_a_used_slot_changes_rows():
    """The store skips its stale-slot check when the epoch is unchanged: the epoch must move on
    every eviction, invalidation and clear, and (so the skip is worth it) on nothing else."""
    cache = EVCache(100, 2, np.float32, capacity=3, admission="filter", admit_threshold=0)
    e = cache.epoch
    cache.admit([1, 2, 3], np.ones((3, 2), np.float32))          # free slots only
    cache.lookup_slots([1, 2, 3, 4])
    cache.lookup([1, 5], np.zeros((2, 2), np.float32))
    assert cache.epoch == e
    cache.admit([4], np.ones((1, 2), np.float32))                # full: one eviction
    assert cache.epoch == e + 1 and cache.stats["evictions"] == 1
    assert cache.invalidate([99]) == 0 and cache.epoch == e + 1  # nothing cached: no change
    assert cache.invalidate([4]) == 1 and cache.epoch == e + 2
    cache.clear()
    assert cache.epoch == e + 3
    sk = EVCache(100, 2, np.float32, capacity=1, admission="sketch")
    sk.admit([1], np.ones((1, 2), np.float32))
    e = sk.epoch
    sk.admit([2], np.ones((1, 2), np.float32))                   # rejected (filter): no change
    assert sk.epoch == e and sk.stats["evictions"] == 0


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("elem", ["fp32", "fp16", "int8_rowwise"])
def test_all_hit_batches_pool_from_the_cache_rows(tmp_path, elem, parallel):
    """A batch whose distinct rows are all cached pools straight from the cache's row storage
    (no fetch, no admission): the definition's bits, sum, mean and weighted, with nothing read
    from the backend."""
    rng = np.random.default_rng(11)
    n, dim = 300, 9
    if elem == "int8_rowwise":
        t = rng.integers(0, 256, (n, 4 + dim)).astype(np.uint8)
        t[:, 0:4] = rng.standard_normal((n, 2)).astype(np.float16).view(np.uint8)  # scale, bias
    else:
        t = rng.standard_normal((n, dim)).astype(np.float32 if elem == "fp32" else np.float16)
    src = RowwiseInt8(t) if elem == "int8_rowwise" else t
    with EmbeddingStore.from_arrays({"t": src}, "file", path=tmp_path, cache_fraction=1.0,
                                    parallel=parallel) as store:
        cache = store.caches["t"]
        hot = rng.choice(n, 60, replace=False)
        for _ in range(2):
            store.pooled("t", hot, np.array([0, hot.size]))
        assert cache.contains(hot).all()
        reads = store.stats()["rows_read"]
        idx = rng.choice(hot, 40 * 20)
        offs = np.concatenate([[0], np.sort(rng.integers(0, idx.size, 39)), [idx.size]])
        w = rng.standard_normal(idx.size).astype(np.float32)
        plan = store._prepare("t", idx, offs, "sum")
        # fp32/fp16 bags pooled serially are pooled in the lookup's call (EVCache.lookup_pool);
        # the rest take the cache slots and pool them in the finish
        if elem == "int8_rowwise" or store._bag_parallel(40):
            assert plan.kind == "slots" and plan.miss.size == 0
        else:
            assert plan.kind == "cached" and plan.pooled.tobytes() == P.pool(t, elem, idx, offs).tobytes()
        got = store._finish(store._fetch(plan))
        assert got.tobytes() == P.pool(t, elem, idx, offs).tobytes()
        assert store.pooled("t", idx, offs, "mean").tobytes() == P.pool(t, elem, idx, offs, mode="mean").tobytes()
        assert store.pooled("t", idx, offs, per_sample_weights=w).tobytes() == \
            P.pool(t, elem, idx, offs, per_sample_weights=w).tobytes()
        out = np.empty((40, dim), np.float32)
        assert store.pooled("t", idx, offs, out=out) is out and out.tobytes() == P.pool(t, elem, idx, offs).tobytes()
        assert store.stats()["rows_read"] == reads
        hits = cache.stats["hits"]
        store.pooled("t", idx, offs)
        assert cache.stats["hits"] == hits + np.unique(idx).size


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 40),
       admission=st.sampled_from(["sketch", "filter"]), decay=st.sampled_from([None, 13]),
       threshold=st.integers(0, 3), n_keys=st.sampled_from([30, 200]),
       itype=st.sampled_from([np.int32, np.int64, np.uint16]))
def test_lookup_dedupe_is_dedupe_then_lookup_slots(seed, capacity, admission, decay, threshold,
                                                   n_keys, itype):
    """The fused pass returns what ``dedupe`` + ``lookup_slots(uniq)`` return and leaves the
    cache in the same state (recency, counters, sketch, its aging, stats)."""
    from evssd.host.dedupe import dedupe
    rng = np.random.default_rng(seed)
    dim = 3
    table = rng.standard_normal((n_keys, dim)).astype(np.float32)
    a, b = (EVCache(n_keys, dim, np.float32, capacity=capacity, admission=admission,
                    decay_interval=decay, admit_threshold=threshold, name="t") for _ in range(2))
    a._sketch_sample = b._sketch_sample = 37     # halve the sketch within a batch now and then
    for step in range(25):
        keys = (rng.zipf(1.3, rng.integers(0, 60)) % n_keys).astype(itype)
        uniq_a, inv_a = dedupe(keys.astype(np.int64))
        slots_a = a.lookup_slots(uniq_a)
        uniq, inv, slots, slot_of, misses = b.lookup_dedupe(keys)
        assert uniq.dtype == np.int64 and inv.dtype == np.int64
        assert slots.dtype == np.int32 and slot_of.dtype == np.int32
        assert uniq.tolist() == uniq_a.tolist() and inv.tolist() == inv_a.tolist()
        assert slots.tolist() == slots_a.tolist()
        assert slot_of.tolist() == slots[inv].tolist()
        assert misses.dtype == np.int64
        assert misses.tolist() == sorted(np.flatnonzero(slots < 0).tolist(), key=lambda u: uniq[u])
        assert np.array_equal(uniq[inv], keys.astype(np.int64))
        miss = uniq[slots < 0]
        _admit_to_twins(a, b, miss, table, rng, step)
    b.check_invariants()


def test_lookup_dedupe_bad_input_changes_nothing():
    cache = EVCache(50, 2, np.float32, capacity=8, admit_threshold=0, name="emb")
    cache.admit([1, 2], np.ones((2, 2), np.float32))
    before = _state(cache)
    for bad in ([1, 2, 50], np.array([3, -1], np.int32)):
        with pytest.raises(IndexError, match=r"'emb'.*at position"):
            cache.lookup_dedupe(bad)
    with pytest.raises(TypeError, match="integers"):
        cache.lookup_dedupe(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        cache.lookup_dedupe(np.zeros((2, 2), np.int64))
    assert _state(cache) == before
    uniq, inv, slots, slot_of, misses = cache.lookup_dedupe(np.zeros(0, np.int64))
    assert uniq.size == inv.size == slots.size == slot_of.size == misses.size == 0
    uniq, inv, slots, slot_of, misses = cache.lookup_dedupe([2, 7, 2, 1, 7])
    assert uniq.tolist() == [2, 7, 1] and inv.tolist() == [0, 1, 0, 2, 1] and misses.tolist() == [1]
    assert slots[1] == -1 and slot_of.tolist() == slots[inv].tolist()
    assert cache.stats["hits"] == 2 and cache.stats["misses"] == 1


def _table_and_twins(seed, n_keys: int, elem: str, **cache_args):
    """(rng, element type, a random 3-wide table of ``elem`` with NaNs among float rows, twin
    EV-Caches over it whose sketch halves within a batch now and then)."""
    rng = np.random.default_rng(seed)
    dim = 3
    el = ELEMS[elem]
    if el.name in ("int8", "int32"):
        table = rng.integers(-100, 100, (n_keys, dim)).astype(el.storage)
    else:
        table = rng.standard_normal((n_keys, dim)).astype(el.storage)
        table[rng.random(table.shape) < 0.05] = np.nan
    a, b = (EVCache(n_keys, dim, el.storage, name="t", **cache_args) for _ in range(2))
    a._sketch_sample = b._sketch_sample = 37
    return rng, el, table, a, b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 40),
       admission=st.sampled_from(["sketch", "filter"]), decay=st.sampled_from([None, 13]),
       threshold=st.integers(0, 3), n_keys=st.sampled_from([24, 30, 200]),
       elem=st.sampled_from(["fp32", "fp16", "int8", "int32"]), weighted=st.booleans(),
       itype=st.sampled_from([np.int32, np.int64]), checked=st.booleans())
def test_lookup_pool_is_lookup_dedupe_then_pooling(seed, capacity, admission, decay, threshold,
                                                   n_keys, elem, weighted, itype, checked):
    """``lookup_pool`` on one cache, ``lookup_dedupe`` then the definition's pooling on its twin:
    the same returns, the same cache state after every batch (index included: the direct
    index's in-batch marks leave no trace), the definition's bits exactly when every row hit. Direct and hash indexes both occur (a cache of >= 80% of its table's
    rows takes the direct index). ``checked``: the store's call, whose batch it validated, so the
    lookup skips its own check; same results."""
    rng, el, table, a, b = _table_and_twins(seed, n_keys, elem, capacity=capacity, admission=admission,
                                            decay_interval=decay, admit_threshold=threshold)
    dim = a.dim
    for step in range(25):
        keys = (rng.zipf(1.3, rng.integers(0, 60)) % n_keys).astype(itype)
        cached = np.flatnonzero(a.contains(np.arange(n_keys)))
        all_cached = step % 3 == 2 and cached.size > 0
        if all_cached:          # a batch of cached rows only: pooled in the lookup's call
            keys = rng.choice(cached, rng.integers(1, 60)).astype(itype)
        offs = np.concatenate([[0], np.sort(rng.integers(0, keys.size + 1, rng.integers(0, 6))),
                               [keys.size]]).astype(np.int64)
        w = rng.standard_normal(keys.size).astype(np.float32) if weighted else None
        out = np.full((offs.size - 1, dim), 7, np.float32 if weighted else el.pooled)
        ref = a.lookup_dedupe(keys)
        got = b.lookup_pool(keys, offs, out, el, w, checked=checked)
        assert got[0] == (ref[4].size == 0) and (got[0] or not all_cached)
        if not got[0]:
            assert [x.tolist() for x in got[1:]] == [x.tolist() for x in ref]
        else:
            assert got[1:5] == (None, None, None, None) and got[5].size == 0
            want = P.pool(table, el, keys, offs, per_sample_weights=w)
            assert out.tobytes() == want.tobytes()
        miss = ref[0][ref[2] < 0]
        _admit_to_twins(a, b, miss, table, rng, step)
    b.check_invariants()


def test_lookup_pool_bad_input_changes_nothing():
    el = ELEMS["fp32"]
    for capacity in (8, 50):    # hash index, direct index
        cache = EVCache(50, 2, np.float32, capacity=capacity, admit_threshold=0, name="emb")
        cache.admit([1, 2], np.ones((2, 2), np.float32))
        before = _state(cache)
        out = np.zeros((2, 2), np.float32)
        with pytest.raises(IndexError, match=r"'emb'.*position 2"):
            cache.lookup_pool(np.array([1, 2, 50]), np.array([0, 1, 3]), out, el)
        with pytest.raises(ValueError, match=r"'emb'.*offsets\[-1\] = 2 must equal len"):
            cache.lookup_pool(np.array([1, 2, 1]), np.array([0, 1, 2]), out, el)
        with pytest.raises(ValueError, match=r"'emb'.*not monotonic at position 2"):
            cache.lookup_pool(np.array([1, 2, 1]), np.array([0, 2, 1, 3]), np.zeros((3, 2), np.float32), el)
        with pytest.raises(ValueError, match="out must be"):
            cache.lookup_pool(np.array([1, 2]), np.array([0, 1, 2]), np.zeros((2, 2), np.float64), el)
        with pytest.raises(ValueError, match="weights must be"):
            cache.lookup_pool(np.array([1, 2]), np.array([0, 1, 2]), out, el, np.ones(3, np.float32))
        with pytest.raises(ValueError, match="int8_rowwise"):
            cache.lookup_pool(np.array([1, 2]), np.array([0, 1, 2]), out, ELEMS["int8_rowwise"])
        assert _state(cache) == before and (out == 0).all()
        assert cache.lookup_pool(np.array([2, 1, 2]), np.array([0, 1, 3]), out, el)[0]
        assert out.tolist() == [[1, 1], [2, 2]]
        pooled, uniq, inv, slots, slot_of, misses = cache.lookup_pool(np.array([2, 3, 2]),
                                                                      np.array([0, 1, 3]), out, el)
        assert not pooled and misses.tolist() == [1] and uniq.tolist() == [2, 3] and inv.tolist() == [0, 1, 0]
        assert slots[1] == -1 and slot_of.tolist() == slots[inv].tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 40),
       admission=st.sampled_from(["sketch", "filter"]), decay=st.sampled_from([None, 13]),
       threshold=st.integers(0, 3), n_keys=st.sampled_from([24, 30, 200]),
       elem=st.sampled_from(["fp32", "fp16", "int8", "int32"]), weighted=st.booleans(),
       checked=st.booleans())
def test_pool_admit_is_pool_two_sources_then_admit(seed, capacity, admission, decay, threshold,
                                                   n_keys, elem, weighted, checked):
    """``pool_admit`` on one cache, the two-source pooling then ``admit`` on its twin: the same
    bits in ``out`` (the definition's), the same locations and the same cache state after every
    batch (direct and hash indexes; the misses in ``lookup_dedupe``'s ascending order), with and
    without the insert count that lets it skip probing for the misses again, with and without
    the pooling's own check of the lookup's locations (``checked``)."""
    rng, el, table, a, b = _table_and_twins(seed, n_keys, elem, capacity=capacity, admission=admission,
                                            decay_interval=decay, admit_threshold=threshold)
    dim = a.dim
    for step in range(25):
        inserts = b.inserts if step % 2 else None
        keys = (rng.zipf(1.3, rng.integers(0, 60)) % n_keys).astype(np.int64)
        offs = np.concatenate([[0], np.sort(rng.integers(0, keys.size + 1, rng.integers(0, 6))),
                               [keys.size]]).astype(np.int64)
        w = rng.standard_normal(keys.size).astype(np.float32) if weighted else None
        dtype = np.float32 if weighted else el.pooled
        ua, ia, la, _, ma = a.lookup_dedupe(keys)
        ub, ib, lb, _, mb = b.lookup_dedupe(keys)
        assert ma.tolist() == mb.tolist()
        assert np.all(np.diff(ua[ma]) > 0)
        fetched = table[ua[ma]]
        want = np.full((offs.size - 1, dim), 7, dtype)
        la[ma] = -1 - np.arange(ma.size, dtype=np.int32)
        assert P.pool_two_sources(P.kernel_source(a.values, el), P.kernel_source(fetched, el), el, ia,
                                  la, offs, want, w) == -1
        if ma.size:
            a.admit(ua[ma], fetched)
        got = np.full((offs.size - 1, dim), 7, dtype)
        assert b.pool_admit(fetched, el, ub, ib, lb, mb, offs, got, w, inserts, checked=checked) == -1
        assert got.tobytes() == want.tobytes()
        assert got.tobytes() == P.pool(table, el, keys, offs, per_sample_weights=w).tobytes()
        assert lb.tolist() == la.tolist()
        assert _state(a) == _state(b)
    b.check_invariants()


@pytest.mark.parametrize("capacity", [6, 90])   # a hash index, a direct index
def test_pool_admit_probes_again_after_an_insert_since_its_lookup(capacity):
    """Two lookups of the same missing rows, then both finish (as the store's pipeline does):
    the second's insert count is stale, so it probes, and no row is cached twice; the
    statistics reset does not fake an unchanged count."""
    el = ELEMS["fp32"]
    cache = EVCache(100, 4, np.float32, capacity=capacity, admit_threshold=0, name="t")
    table = np.arange(400, dtype=np.float32).reshape(100, 4)
    keys = np.array([5, 9, 5, 17, 9], np.int64)
    offs = np.array([0, 2, 5])
    finish = []
    for _ in range(2):
        token = cache.inserts
        uniq, inv, slots, _, miss = cache.lookup_dedupe(keys)
        assert miss.size == 3 and token == cache.inserts
        finish.append((token, uniq, inv, slots, miss))
    for token, uniq, inv, slots, miss in finish:
        out = np.zeros((2, 4), np.float32)
        assert cache.pool_admit(table[uniq[miss]], el, uniq, inv, slots, miss, offs, out, None, token) == -1
        assert out.tobytes() == P.pool(table, el, keys, offs).tobytes()
    assert len(cache) == 3 and cache.inserts == 3 and cache.contains([5, 9, 17]).all()
    cache.check_invariants()
    cache.reset_stats()
    assert cache.inserts == 3 and cache.stats["admissions"] == 0


def test_pool_admit_bad_input_changes_nothing():
    el = ELEMS["fp32"]
    cache = EVCache(50, 2, np.float32, capacity=8, admit_threshold=0, name="emb")
    cache.admit([1, 2], np.ones((2, 2), np.float32))
    uniq, inv, slots, _, miss = cache.lookup_dedupe(np.array([1, 3, 4, 1]))
    before = _state(cache)
    out = np.zeros((2, 2), np.float32)
    offs = np.array([0, 2, 4])
    for bad in (np.ones((1, 2), np.float32), np.ones((2, 3), np.float32), np.ones((2, 2), np.float64)):
        with pytest.raises(ValueError, match=r"'emb'.*fetched must be"):
            cache.pool_admit(bad, el, uniq, inv, slots, miss, offs, out)
    with pytest.raises(ValueError, match="int8_rowwise"):
        cache.pool_admit(np.ones((2, 2), np.float32), ELEMS["int8_rowwise"], uniq, inv, slots, miss, offs, out)
    # an output wider than the cache's rows, one that is not an array, short weights: refused
    # before the kernel could read or write past an array, even for a checked call
    for bad_out in (np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), [[0, 0], [0, 0]]):
        with pytest.raises(ValueError, match=r"'emb'.*out must be"):
            cache.pool_admit(np.ones((2, 2), np.float32), el, uniq, inv, slots, miss, offs, bad_out,
                             checked=True)
    with pytest.raises(ValueError, match=r"'emb'.*weights must be one per lookup \(4\)"):
        cache.pool_admit(np.ones((2, 2), np.float32), el, uniq, inv, slots, miss, offs, out,
                         np.ones(3, np.float32), checked=True)
    # offsets that do not cover the batch: the pooling's error code, nothing admitted
    assert cache.pool_admit(np.ones((2, 2), np.float32), el, uniq, inv, slots, miss, np.array([0, 2, 3]),
                            out) == -4
    assert _state(cache) == before and (out == 0).all()
    assert cache.pool_admit(np.full((2, 2), 2, np.float32), el, uniq, inv, slots, miss, offs, out) == -1
    assert out.tolist() == [[3, 3], [3, 3]] and cache.contains([3, 4]).all()
