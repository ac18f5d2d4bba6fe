"""EV-Cache against a pure-Python reference of the same rules (a list of slots with a CLOCK hand,
a dict of 2-bit counters, the count-min sketch re-implemented with Python integers)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evssd.host.cache import EVCache, bytes_per_entry

M64 = (1 << 64) - 1


class ReferenceSketch:
    """The count-min sketch of host/cache.py, one Python integer per 64-bit word: 4-bit counters,
    four per key in one 8-word block, saturating at 15, every counter halved after ``sample``
    counted keys."""

    def __init__(self, capacity):
        self.words = [0] * (8 * -(-capacity // 8))
        self.sample = 10 * capacity
        self.adds = 0

    def _cells(self, k):
        z = (k + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        base = 8 * (((z >> 32) * (len(self.words) // 8)) >> 32)
        sel = z & 0xFFFFFFFF
        return [(base + 2 * i + ((sel >> i) & 1), ((sel >> (4 + 4 * i)) & 15) * 4) for i in range(4)]

    def estimate(self, k):
        return min((self.words[w] >> sh) & 15 for w, sh in self._cells(k))

    def add(self, k):
        for w, sh in self._cells(k):
            if (self.words[w] >> sh) & 15 < 15:
                self.words[w] += 1 << sh
        self.adds += 1
        if self.adds >= self.sample:
            self.words = [(w >> 1) & 0x7777777777777777 for w in self.words]
            self.adds >>= 1


class ReferenceCache:
    """The EV-Cache semantics, one key at a time, with no cleverness (see host/cache.py).

    Slots are a Python list filled in order; each has a CLOCK reference counter (a hit adds one,
    saturating at ``ref_max``: 7 in ``"sketch"`` mode, 1 in ``"filter"`` mode). A free slot takes
    the candidate (in ``"filter"`` mode only if its 2-bit counter passed); when full, the hand
    walks the slots, taking one off each non-zero counter, and stops at the first zero: the
    victim. ``"sketch"`` keeps the victim (and the hand on it) unless the candidate's estimate is
    strictly higher; otherwise the candidate takes the victim's slot with counter 0 and the hand
    moves one on. Invalidation moves the last slot into the hole; a hand past the end goes to 0."""

    def __init__(self, n_rows, capacity, threshold, decay_interval=None, admission="filter"):
        self.n_rows, self.capacity, self.threshold = n_rows, capacity, threshold
        self.decay_interval = decay_interval
        self.admission = admission
        self.ref_max = 7 if admission == "sketch" else 1
        self.sketch = ReferenceSketch(capacity) if admission == "sketch" else None
        self.counting = False                # lookups count into the sketch once half full
        self.since_decay = 0
        self.counters = np.zeros(n_rows, dtype=np.uint8)
        self.slots: list[int] = []           # slot -> key
        self.refs: list[int] = []            # slot -> reference counter
        self.row: dict[int, np.ndarray] = {}
        self.hand = 0
        self.hits = self.misses = self.admissions = self.evictions = 0
        self.rejected = self.rejected_sketch = 0

    def lookup(self, keys):
        hit, rows = [], []
        for k in map(int, keys):
            self.counters[k] = min(3, self.counters[k] + 1)
            s = self.slots.index(k) if k in self.row else None
            # the sketch counts every key but a hit whose reference counter is at the ceiling
            if self.counting and (s is None or self.refs[s] < self.ref_max):
                self.sketch.add(k)
            if s is not None:
                self.refs[s] = min(self.ref_max, self.refs[s] + 1)
                hit.append(True)
                rows.append(self.row[k])
                self.hits += 1
            else:
                hit.append(False)
                rows.append(None)
                self.misses += 1
        self.since_decay += len(keys)
        if self.decay_interval is not None and self.since_decay >= self.decay_interval:
            self.counters >>= 1
            self.since_decay = 0
        return np.array(hit, dtype=bool), rows

    def admit(self, keys, rows):
        for k, row in zip(map(int, keys), rows):
            if k in self.row:
                continue
            full = len(self.slots) == self.capacity
            if self.counters[k] < self.threshold and (full or self.sketch is None):
                self.rejected += 1
                continue
            if not full:
                self.slots.append(k)
                self.refs.append(0)
            else:
                while self.refs[self.hand] > 0:
                    self.refs[self.hand] -= 1
                    self.hand = (self.hand + 1) % self.capacity
                victim = self.slots[self.hand]
                if self.sketch is not None and \
                        self.sketch.estimate(k) <= self.sketch.estimate(victim):
                    self.rejected_sketch += 1
                    continue
                del self.row[victim]
                self.evictions += 1
                self.slots[self.hand] = k
                self.refs[self.hand] = 0
                self.hand = (self.hand + 1) % self.capacity
            self.row[k] = row.copy()
            self.admissions += 1
        if self.sketch is not None and 2 * len(self.slots) >= self.capacity:
            self.counting = True

    def invalidate(self, keys):
        n = 0
        for k in map(int, keys):
            if k not in self.row:
                continue
            del self.row[k]
            s = self.slots.index(k)
            self.slots[s], self.refs[s] = self.slots[-1], self.refs[-1]
            self.slots.pop()
            self.refs.pop()
            n += 1
        if self.hand >= len(self.slots):
            self.hand = 0
        return n

    def stats(self):
        return {"hits": self.hits, "misses": self.misses, "admissions": self.admissions,
                "evictions": self.evictions, "rejected_by_filter": self.rejected,
                "rejected_by_sketch": self.rejected_sketch, "size": len(self.slots)}

    def keys_clock(self):
        n = len(self.slots)
        return [self.slots[(self.hand + i) % n] for i in range(n)]

    def references(self, keys):
        return [self.refs[self.slots.index(int(k))] if int(k) in self.row else -1 for k in keys]


DTYPES = [np.float32, np.float16, np.int8, np.int32]


def _table(n_rows, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal((n_rows, dim)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (n_rows, dim), endpoint=True).astype(dtype)


def _compare(cache: EVCache, ref: ReferenceCache, keyspace=None):
    s = cache.stats
    assert {k: s[k] for k in ref.stats()} == ref.stats()
    assert cache._slot_key[: len(cache)].tolist() == ref.slots       # same key in every slot
    assert cache.keys_clock().tolist() == ref.keys_clock()           # same hand
    assert len(cache) <= cache.capacity
    if keyspace is not None:
        assert cache.references(keyspace).tolist() == ref.references(keyspace)
    # every cached row is the admitted row, bit for bit
    held = cache.values[: len(cache)]
    for slot, key in enumerate(ref.slots):
        assert held[slot].tobytes() == ref.row[key].tobytes(), key
    if ref.sketch is not None and keyspace is not None:
        assert cache.frequencies(keyspace).tolist() == [ref.sketch.estimate(int(k)) for k in keyspace]
    cache.check_invariants()


ops = st.lists(
    st.tuples(st.sampled_from(["serve", "serve", "serve", "admit", "invalidate"]),
              st.lists(st.integers(0, 39), min_size=0, max_size=24)),
    min_size=1, max_size=30)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 12), threshold=st.integers(0, 3), dtype=st.sampled_from(DTYPES),
       dim=st.sampled_from([1, 3, 4, 8]), decay=st.sampled_from([None, 7, 50]),
       admission=st.sampled_from(["sketch", "filter"]), wide=st.booleans(), direct=st.booleans(),
       ops=ops)
def test_matches_reference(capacity, threshold, dtype, dim, decay, admission, wide, direct, ops):
    # 40 distinct rows, either 0..39 or spread over a table of a million rows (other hash slots
    # and sketch blocks); ``direct``: a load factor low enough that the direct index (one entry
    # per table row) is no larger than the hash table, so the cache uses it (same semantics)
    n_rows = 10**6 if wide else 40
    direct = direct and not wide
    keyspace = np.random.default_rng(capacity).choice(n_rows, 40, replace=False) if wide \
        else np.arange(40)
    table = _table(40, dim, dtype)
    row_of = {int(k): table[i] for i, k in enumerate(keyspace)}
    cache = EVCache(n_rows, dim, dtype, capacity=capacity, admit_threshold=threshold,
                    decay_interval=decay, admission=admission, name="emb",
                    load_factor=0.02 if direct else 0.8)
    assert cache.direct_index == direct
    ref = ReferenceCache(n_rows, capacity, threshold, decay, admission)
    for op, ids in ops:
        keys = keyspace[np.array(ids, dtype=np.int64)]
        rows = np.array([row_of[int(k)] for k in keys], dtype=dtype).reshape(len(keys), dim)
        if op == "serve":               # the store's loop: lookup, fetch the misses, admit them
            out = np.zeros((len(keys), dim), dtype=dtype)
            hit = cache.lookup(keys, out)
            rhit, rrows = ref.lookup(keys)
            assert hit.tolist() == rhit.tolist()
            for j in np.flatnonzero(hit):
                assert out[j].tobytes() == rrows[j].tobytes() == rows[j].tobytes()
            assert not out[~hit].any()  # misses untouched
            cache.admit(keys[~hit], rows[~hit])
            ref.admit(keys[~hit], rows[~hit])
        elif op == "admit":             # rows offered without a lookup (counters unchanged)
            cache.admit(keys, rows)
            ref.admit(keys, rows)
        else:
            assert cache.invalidate(keys) == ref.invalidate(keys)
        _compare(cache, ref, keyspace)
    assert np.array_equal(cache.counters(keyspace), ref.counters[keyspace])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(8, 64))
def test_sketch_mode_long_random_stream(seed, capacity):
    """Longer skewed streams than above (several sketch agings, saturated reference counters,
    many evictions and hand sweeps): same hits, same slots, same hand, same references and
    frequencies as the reference."""
    rng = np.random.default_rng(seed)
    n_rows, dim = 5000, 2
    hot = rng.choice(n_rows, 400, replace=False)
    cache = EVCache(n_rows, dim, np.int32, capacity=capacity, admission="sketch")
    ref = ReferenceCache(n_rows, capacity, 2, None, "sketch")
    top = 0
    for _ in range(40):
        keys = np.where(rng.random(48) < 0.8, hot[np.minimum(rng.zipf(1.3, 48), 400) - 1],
                        rng.integers(0, n_rows, 48))
        rows = np.stack([keys, -keys], axis=1).astype(np.int32)
        out = np.zeros((len(keys), dim), np.int32)
        hit = cache.lookup(keys, out)
        rhit, _ = ref.lookup(keys)
        assert hit.tolist() == rhit.tolist()
        assert np.array_equal(out[hit], rows[hit])
        cache.admit(keys[~hit], rows[~hit])
        ref.admit(keys[~hit], rows[~hit])
        _compare(cache, ref, hot[:50])
        top = max(top, int(cache.references(hot[:50]).max()))
    s = cache.stats
    assert s["evictions"] > 0 and s["rejected_by_sketch"] > 0
    assert top == cache.ref_max                 # a counter reached the ceiling at some point


@settings(max_examples=25, deadline=None)
@given(load=st.sampled_from([0.5, 0.8, 0.95]), seed=st.integers(0, 2**32 - 1),
       key_range=st.sampled_from([300, 10**6, 10**7]))
def test_robin_hood_invariants_random_insert_delete(load, seed, key_range):
    rng = np.random.default_rng(seed)
    n_rows = key_range
    cap = 64
    cache = EVCache(n_rows, 2, np.int32, capacity=cap, admit_threshold=0, load_factor=load,
                    admission="filter")
    live: set[int] = set()
    for _ in range(40):
        keys = rng.integers(0, n_rows, rng.integers(1, 40))
        rows = np.repeat(keys[:, None], 2, axis=1).astype(np.int32)
        cache.admit(keys, rows)
        if rng.random() < 0.5 and len(cache):
            drop = rng.choice(cache.keys_clock(), size=rng.integers(1, len(cache) + 1), replace=False)
            assert cache.invalidate(drop) == len(drop)
        cache.check_invariants()
        live = set(cache.keys_clock().tolist())
        assert len(live) == len(cache) <= cap
        # every live row is findable and holds its own data
        k = np.array(sorted(live), dtype=np.int64)
        assert cache.contains(k).all()
        s = cache.values[: len(cache)]
        assert sorted(s[:, 0].tolist()) == sorted((k.astype(np.int32)).tolist())


def test_filter_admits_on_second_access_and_counts_rejections():
    cache = EVCache(100, 4, np.float32, capacity=4, name="t", admission="filter")
    rows = np.ones((3, 4), np.float32)
    out = np.zeros((3, 4), np.float32)
    keys = np.array([5, 6, 7])
    assert not cache.lookup(keys, out).any()
    assert cache.admit(keys, rows) == 0
    assert cache.stats["rejected_by_filter"] == 3
    assert not cache.lookup(keys, out).any()
    assert cache.admit(keys, rows * 2) == 3
    assert cache.lookup(keys, out).all()
    assert np.array_equal(out, rows * 2)
    assert cache.counters(np.array([5, 6, 7, 8])).tolist() == [3, 3, 3, 0]
    # a row seen twice within one batch is admitted at once; duplicates inserted once
    k2 = np.array([9, 9])
    cache.lookup(k2, np.zeros((2, 4), np.float32))
    assert cache.admit(k2, np.full((2, 4), 9, np.float32)) == 1
    assert cache.stats["evictions"] == 0 and len(cache) == 4
    # full: the hand clears the reference bits of 5, 6, 7 (hit since admission) and stops at 9,
    # never reused: 9 goes, 1 takes its slot and the hand moves on to slot 0
    assert cache.references(np.array([5, 6, 7, 9])).tolist() == [1, 1, 1, 0]
    cache.lookup(np.array([1, 1]), np.zeros((2, 4), np.float32))
    cache.admit(np.array([1]), np.zeros((1, 4), np.float32))
    assert cache.stats["evictions"] == 1
    assert cache.keys_clock().tolist() == [5, 6, 7, 1]
    assert cache.references(np.array([5, 6, 7, 1, 9])).tolist() == [0, 0, 0, 0, -1]
    cache.reset_stats()
    assert all(cache.stats[k] == 0 for k in ("hits", "misses", "admissions", "evictions",
                                               "rejected_by_filter"))
    assert cache.stats["size"] == 4


def test_sketch_admission_compares_candidate_with_victim_and_protects_reused_rows():
    cache = EVCache(1000, 2, np.int32, capacity=5, admission="sketch", name="t")
    assert cache.admission == "sketch" and cache.ref_max == 7

    def serve(keys):
        keys = np.array(keys, dtype=np.int64)
        out = np.zeros((len(keys), 2), np.int32)
        hit = cache.lookup(keys, out)
        rows = np.stack([keys, keys], axis=1).astype(np.int32)
        assert np.array_equal(out[hit], rows[hit])
        cache.admit(keys[~hit], rows[~hit])
        return hit

    serve([1, 2, 3, 4, 5])         # free slots take rows on first sight (nothing to displace)
    assert cache.keys_clock().tolist() == [1, 2, 3, 4, 5] and cache.stats["rejected_by_filter"] == 0
    # the sketch counts from half full on: the lookups of the empty cache left it at zero
    assert cache.frequencies(np.array([1, 2, 3, 4, 5])).tolist() == [0] * 5
    assert serve([1, 2, 3, 4, 5]).all() and serve([1, 2, 3, 4, 5]).all()   # each hit, a reference
    assert cache.references(np.array([1, 2, 3, 4, 5])).tolist() == [2] * 5
    assert cache.frequencies(np.array([1, 2, 3, 4, 5])).tolist() == [2] * 5
    serve([9])                     # full, seen once: the 2-bit filter turns it away
    assert cache.stats["rejected_by_filter"] == 1 and not cache.contains(np.array([9]))[0]
    assert cache.references(np.array([1])).tolist() == [2]          # no sweep for a rejection
    serve([9])                     # passes the filter: the hand sweeps two full turns (references
    # 2 -> 0) back to 1, the victim; 9 is no more frequent than 1, so 1 stays
    assert cache.frequencies(np.array([9, 1])).tolist() == [2, 2]
    assert cache.stats["rejected_by_sketch"] == 1 and not cache.contains(np.array([9]))[0]
    assert cache.references(np.array([1, 2, 3, 4, 5])).tolist() == [0] * 5
    serve([9])                     # now more frequent: the victim (1, under the hand) goes
    assert cache.contains(np.array([9]))[0] and not cache.contains(np.array([1]))[0]
    assert cache.keys_clock().tolist() == [2, 3, 4, 5, 9]           # the hand moved past 9
    assert cache.stats["evictions"] == 1
    assert serve([9, 9]).tolist() == [True, True]
    assert cache.references(np.array([9])).tolist() == [2]
    serve([20, 20, 20, 20])        # four misses in one batch, admitted once: 2 is the victim
    assert cache.keys_clock().tolist() == [3, 4, 5, 9, 20] and cache.stats["evictions"] == 2
    # a row hit more often than ref_max times keeps only ref_max sweeps' worth of credit
    serve([9] * 10)
    assert cache.references(np.array([9])).tolist() == [7]
    # the plain 2-bit mode never fills a free slot with a row seen once
    plain = EVCache(1000, 2, np.int32, capacity=5, admission="filter")
    assert plain.ref_max == 1
    plain.lookup(np.array([1]), np.zeros((1, 2), np.int32))
    assert plain.admit(np.array([1]), np.ones((1, 2), np.int32)) == 0
    cache.check_invariants()


def test_clock_second_chance_keeps_a_reused_row_through_a_scan():
    """Filter mode is CLOCK with one reference bit: a run of newcomers evicts the rows not hit
    since they came in, in slot order, and the row that was hit survives one more turn."""
    cache = EVCache(100, 1, np.int32, capacity=4, admission="filter", admit_threshold=0)
    cache.admit(np.arange(1, 5), np.arange(1, 5, dtype=np.int32)[:, None])
    cache.lookup(np.array([2]), np.zeros((1, 1), np.int32))
    assert cache.admit(np.array([10, 11, 12]), np.array([[10], [11], [12]], np.int32)) == 3
    assert cache.keys_clock().tolist() == [10, 2, 11, 12]          # 1, 3, 4 went; the hand is at 10
    assert cache.references(np.array([2, 10])).tolist() == [0, 0]  # the sweep spent 2's bit
    assert cache.admit(np.array([13]), np.array([[13]], np.int32)) == 1
    assert not cache.contains(np.array([10]))[0]
    assert cache.stats["evictions"] == 4
    cache.check_invariants()


def test_budget_accounting():
    n_rows, dim = 100_000, 64
    cache = EVCache(n_rows, dim, np.float32)          # default: 1% of the table's bytes
    budget = int(0.01 * n_rows * dim * 4)
    assert cache.budget_bytes == budget
    assert cache.memory_bytes <= budget
    per_entry = bytes_per_entry(dim * 4)
    # row, slot key + reference counter, hash slots (row | slot packed) at load 0.8, 8 B of sketch
    assert per_entry == 256 + 9 + 8 / 0.8 + 8
    assert bytes_per_entry(dim * 4, admission="filter") == 256 + 9 + 8 / 0.8
    counters = (n_rows + 3) // 4
    # capacity is what fits after the counters, within one entry (and one sketch block) of the bound
    bound = (budget - counters) / per_entry
    assert bound - 10 <= cache.capacity <= bound
    assert cache._sketch.nbytes == 64 * -(-cache.capacity // 8)     # whole 64-byte blocks
    plain = EVCache(n_rows, dim, np.float32, admission="filter")
    assert plain.memory_bytes <= budget and plain._sketch.nbytes == 0
    assert plain.capacity > cache.capacity      # the sketch is paid for in rows
    assert cache.stats["capacity"] == cache.capacity
    assert cache.stats["memory_bytes"] == cache.memory_bytes
    small = EVCache(n_rows, dim, np.float32, budget_bytes=200_000)
    assert small.memory_bytes <= 200_000 and small.capacity < cache.capacity


@pytest.mark.parametrize("kwargs, match", [
    ({"n_rows": 0}, "n_rows .* 0"),
    ({"dim": -1}, "dim .* -1"),
    ({"dtype": "complex64"}, "complex64"),
    ({"dtype": "bf16"}, "bf16"),
    ({"admit_threshold": 4}, "admit_threshold .* 4"),
    ({"admission": "tinylfu"}, "admission .* 'tinylfu'"),
    ({"capacity": 0}, "capacity .* 0"),
    ({"budget_fraction": 1.5}, "budget_fraction .* 1.5"),
    ({"budget_bytes": 100}, "budget of 100 bytes"),
    ({"capacity": 4, "budget_bytes": 10**6}, "capacity and budget_bytes"),
    ({"load_factor": 1.0}, "load_factor .* 1.0"),
    ({"decay_interval": 0}, "decay_interval .* 0"),
])
def test_constructor_errors_name_the_value(kwargs, match):
    args = {"n_rows": 1000, "dim": 8, "dtype": np.float32, **kwargs}
    with pytest.raises(ValueError, match=match):
        EVCache(args.pop("n_rows"), args.pop("dim"), args.pop("dtype"), **args)


def test_bad_indices_raise_before_touching_state():
    cache = EVCache(50, 4, np.float32, capacity=8, name="user_table")
    keys = np.array([1, 2, 3])
    cache.lookup(keys, np.zeros((3, 4), np.float32))
    cache.lookup(keys, np.zeros((3, 4), np.float32))
    cache.admit(keys, np.ones((3, 4), np.float32))
    snap = (cache.stats, cache.counters(np.arange(50)).copy(), cache.keys_clock().copy())
    for bad, pos in ((np.array([1, 2, 50, 3]), 2), (np.array([-1, 2]), 0)):
        with pytest.raises(IndexError, match=r"'user_table'.*position %d" % pos):
            cache.lookup(bad, np.zeros((len(bad), 4), np.float32))
        with pytest.raises(IndexError, match=r"'user_table'.*position %d" % pos):
            cache.admit(bad, np.ones((len(bad), 4), np.float32))
        with pytest.raises(IndexError, match="user_table"):
            cache.invalidate(bad)
    after = (cache.stats, cache.counters(np.arange(50)), cache.keys_clock())
    assert after[0] == snap[0]
    assert np.array_equal(after[1], snap[1]) and np.array_equal(after[2], snap[2])
    cache.check_invariants()
    with pytest.raises(ValueError, match="shape"):
        cache.lookup(keys, np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        cache.lookup(keys, np.zeros((3, 4), np.float64))
    with pytest.raises(TypeError, match="integers"):
        cache.lookup(np.array([1.5]), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="1-D"):
        cache.lookup(np.zeros((2, 2), np.int64), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="rows must have shape"):
        cache.admit(keys, np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="int32"):
        cache.admit(keys, np.ones((3, 4), np.int32))


def test_non_contiguous_out_and_empty_batch():
    cache = EVCache(10, 3, np.float16, capacity=4, admit_threshold=0)
    rows = np.arange(12, dtype=np.float16).reshape(4, 3)
    cache.admit(np.arange(4), rows)
    big = np.zeros((4, 6), np.float16)
    out = big[:, ::2]                                 # strided view
    hit = cache.lookup(np.array([3, 9, 0, 1]), out)
    assert hit.tolist() == [True, False, True, True]
    assert np.array_equal(big[[0, 2, 3], ::2], rows[[3, 0, 1]])
    assert not big[1].any() and not big[:, 1::2].any()
    assert cache.lookup(np.array([], np.int64), np.zeros((0, 3), np.float16)).shape == (0,)
    assert cache.admit(np.array([], np.int64), np.zeros((0, 3), np.float16)) == 0


def test_direct_index_when_it_is_no_larger_and_budget_counts_it():
    """The index is whichever is smaller, the hash table (8 bytes per hash slot) or the direct
    index (8 bytes per table row), and a budget pays for the one in use: the capacity is the
    largest whose arrays fit."""
    n_rows, dim = 10_000, 16
    for frac in (0.01, 0.3, 0.7, 0.8, 0.9, 1.0):
        for admission in ("sketch", "filter"):
            c = EVCache(n_rows, dim, np.float32, budget_fraction=frac, admission=admission)
            budget = int(frac * n_rows * dim * 4)
            hash_bytes = 8 * max(c.capacity + 1, 4, -(-c.capacity * 10 // 8))
            assert c.direct_index == (8 * n_rows <= hash_bytes), (frac, admission)
            assert c._htab.nbytes == min(8 * n_rows, hash_bytes)
            assert c.memory_bytes <= budget
            bigger = c._layout_bytes(c.capacity + 1) + (n_rows + 3) // 4 + 12 * 8
            assert c.capacity == n_rows or bigger > budget      # the largest that fits
    # a whole-table budget for 64-wide fp32 rows holds ~90% of the rows: the direct index; for
    # 16-wide rows the per-row costs leave ~70%, below the 80% where the index sizes cross
    full = EVCache(n_rows, 64, np.float32, budget_fraction=1.0)
    assert full.direct_index and full.capacity > 0.85 * n_rows
    assert not EVCache(n_rows, 16, np.float32, budget_fraction=1.0).direct_index
    assert not EVCache(n_rows, dim, np.float32).direct_index   # the default 1%: hashed
    # a direct-index cache works like the hashed one: fill, evict, invalidate, look up
    rows = np.arange(n_rows * dim, dtype=np.float32).reshape(n_rows, dim)
    for c in (EVCache(200, dim, np.float32, capacity=180, admit_threshold=0),
              EVCache(200, dim, np.float32, capacity=180, admit_threshold=0, load_factor=0.95)):
        assert c.direct_index == (c.load_factor == 0.8)
        keys = np.arange(200)
        c.admit(keys, rows[:200])
        assert len(c) == 180 and c.stats["rejected_by_sketch"] + c.stats["evictions"] == 20
        c.check_invariants()
        held = int(c.contains(keys[:50]).sum())
        assert held > 0 and c.invalidate(keys[:50]) == held and not c.contains(keys[:50]).any()
        c.check_invariants()
        out = np.zeros((200, dim), np.float32)
        hit = c.lookup(keys, out)
        assert np.array_equal(out[hit], rows[:200][hit]) and hit.sum() == len(c)


def test_tiny_caches_have_room_for_the_probe_window():
    # _find reads four consecutive hash slots without bounds checks: tables never have fewer
    for cap in (1, 2, 3):
        cache = EVCache(1 << 20, 1, np.int8, capacity=cap, admit_threshold=0, admission="filter")
        assert cache._htab.shape[0] >= 4
        keys = np.arange(10, dtype=np.int64) * 77_777
        cache.admit(keys, np.ones((10, 1), np.int8))
        assert cache.contains(keys).tolist() == [False] * (10 - cap) + [True] * cap
        cache.check_invariants()


def test_clear_and_capacity_capped_by_rows():
    cache = EVCache(10, 2, np.float32, capacity=100, admit_threshold=0)
    assert cache.capacity == 10
    cache.admit(np.arange(10), np.ones((10, 2), np.float32))
    assert len(cache) == 10 and cache.contains(np.arange(10)).all()
    cache.clear()
    assert len(cache) == 0 and not cache.contains(np.arange(10)).any()
    cache.check_invariants()
    cache.admit(np.arange(3), np.ones((3, 2), np.float32))
    cache.check_invariants()
    assert cache.keys_clock().tolist() == [0, 1, 2]


def test_bench_cache_smoke(tmp_path):
    """`evssd bench cache` at toy size: it runs, writes JSON, every policy and peer reports on
    every trace, budgets are respected, and the plain-LRU peer (cachetools, an independent
    implementation) and plain CLOCK both report, and peak RSS is recorded."""
    import json

    from evssd.host.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "cache", "--rows", "200000", "--dim", "8", "--batch-size", "64", "--batches", "4",
         "--warmup", "3", "--budgets", "1,5", "--repeats", "1", "--lru-keys", "3000", "--no-plot",
         "--alphas", "1.1", "--results-root", str(tmp_path)])
    assert args._run(args) == 0
    data = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert set(data["hit_rate"]) == {"meta_calibrated", "zipf_1.1", "shift_scan"}
    for trace, by_budget in data["hit_rate"].items():
        for budget in ("1.0", "5.0"):
            r = by_budget[budget]
            er, eb = r["equal_rows"], r["equal_bytes"]
            assert {er[k]["rows"] for k in ("evcache", "evcache_filter", "clock", "theine",
                                            "cachetools")} == {er["rows"]}
            for k in ("evcache", "evcache_filter", "clock", "theine", "cachetools"):
                assert 0 <= er[k]["hit_rate"] <= 1 and 0 <= eb[k]["hit_rate"] <= 1
            # theine charged its measured footprint holds fewer rows than the lean estimate
            assert eb["theine_measured"]["rows"] < eb["theine"]["rows"]
            for k in ("evcache", "evcache_filter"):
                assert eb[k]["memory_bytes"] <= r["budget_bytes"] == float(budget) / 100 * 200000 * 8 * 4
            assert eb["evcache"]["rows"] < eb["evcache_filter"]["rows"]   # the sketch costs rows
    assert data["hit_rate"]["meta_calibrated"]["1.0"]["equal_rows"]["evcache"]["hit_rate"] > 0.3
    # hot set = half the capacity, 95% of keys: every hot key hits once the cache is warm
    assert data["throughput"]["hot_set"]["evcache"]["hit_rate"] > 0.9
    assert set(data["throughput"]) == {"meta_calibrated", "meta_distinct", "hot_set"}
    for row in data["throughput"].values():  # the copying and the slot protocol: same effects
        for k in ("evcache", "evcache_filter"):
            assert row[f"{k}_slots"]["hit_rate"] == row[k]["hit_rate"] and row[f"{k}_slots"]["keys_per_cpu_s"] > 0
    assert data["peak_rss_mib"] > 10


def test_threads_share_one_cache_safely():
    import threading

    n_rows, dim = 5000, 4
    table = _table(n_rows, dim, np.float32)
    cache = EVCache(n_rows, dim, np.float32, capacity=300)
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            keys = rng.integers(0, 600, 64)
            out = np.zeros((64, dim), np.float32)
            hit = cache.lookup(keys, out)
            if not np.array_equal(out[hit], table[keys[hit]]):
                errors.append(seed)
            cache.admit(keys[~hit], table[keys[~hit]])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = cache.stats
    assert s["hits"] + s["misses"] == s["lookups"] == 3 * 200 * 64
    assert s["admissions"] - s["evictions"] == s["size"] == 300
    cache.check_invariants()


def test_no_memory_growth_across_batches():
    """Per-batch work allocates only what the call returns: after a warm-up, 300 more batches of
    lookups, admissions and invalidations leave traced memory where it was (within 64 KiB)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n_rows, dim = 20_000, 16
    table = _table(n_rows, dim, np.float32)
    cache = EVCache(n_rows, dim, np.float32, capacity=500)
    out = np.zeros((512, dim), np.float32)
    slots = np.empty(512, np.int32)

    def batch():
        keys = np.minimum(rng.zipf(1.2, 512), n_rows) - 1
        hit = cache.lookup(keys, out)
        cache.admit(keys[~hit], table[keys[~hit]])
        cache.lookup_slots(keys, slots)
        cache.invalidate(keys[:2])

    for _ in range(50):
        batch()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            batch()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, (before, after)
    assert cache.stats["lookups"] == 2 * 350 * 512
    cache.check_invariants()


@pytest.mark.parametrize("admission", ["sketch", "filter"])
@pytest.mark.parametrize("capacity", [1, 3, 16])
@pytest.mark.parametrize("threshold", [0, 2])
def test_back_to_back_batches_match_reference(admission, capacity, threshold):
    """Deterministic companion of the property test: capacity 1 and small caches kept full by
    batches with many duplicates, lookup then admit, batch after batch, in every admission mode;
    kernels and reference agree after every batch (hits, slots, hand, references, counts)."""
    rng = np.random.default_rng(capacity * 10 + threshold)
    n_rows, dim = 60, 2
    keyspace = np.arange(n_rows)
    cache = EVCache(n_rows, dim, np.int32, capacity=capacity, admit_threshold=threshold,
                    admission=admission)
    ref = ReferenceCache(n_rows, capacity, threshold, None, admission)
    for step in range(40):
        keys = rng.zipf(1.4, 32) % n_rows if step % 2 else rng.integers(0, 3 * capacity + 2, 32)
        rows = np.stack([keys, keys + 1], axis=1).astype(np.int32)
        out = np.zeros((32, dim), np.int32)
        hit = cache.lookup(keys, out)
        rhit, _ = ref.lookup(keys)
        assert hit.tolist() == rhit.tolist()
        assert np.array_equal(out[hit], rows[hit])
        cache.admit(keys[~hit], rows[~hit])
        ref.admit(keys[~hit], rows[~hit])
        _compare(cache, ref, keyspace)
    assert len(cache) == capacity and cache.stats["evictions"] > 0
