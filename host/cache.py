"""EV-Cache: FlashEmbedding's host-side embedding-vector cache, one instance per table.

Three parts, all over flat numpy arrays and driven by ``numba`` kernels so that a batch of keys
costs one call and no Python-level per-key work:

* **Admission filter.** A 2-bit saturating counter per table row, packed four to a byte
  (``n_rows / 4`` bytes). Every looked-up index bumps its counter (hit or miss). A missed row
  offered to :meth:`EVCache.admit` is a candidate only when its counter is ``>= admit_threshold``
  (default 2: on the second access), so rows touched once in a long while -- about half of the
  distinct rows of a production batch -- never displace anything. What the filter turns away is
  counted as ``rejected_by_filter``. Optionally the counters age (every lane halved) each time
  ``decay_interval`` lookups have accumulated, checked at the end of a lookup batch.
* **Frequency sketch** (``admission="sketch"``, the default). A count-min sketch of 4-bit
  counters, 8 bytes per cached row (one ``uint64`` word of 16 counters; a key's four counters lie
  in one 64-byte block, chosen by a splitmix64 hash independent of the hash table's). Every
  looked-up key increments its counters (saturating at 15) -- except a hit on a row whose CLOCK
  reference counter is already at its ceiling: that row is as protected as CLOCK can make it, its
  frequency only matters again once the hand has taken its references away, and skipping it
  spares the sketch line (a cache miss per key when other tables' rows evicted the sketch) for
  most hits on hot rows. After ``10 x capacity`` counted keys every counter is halved, so the
  sketch estimates recent frequency. Counting starts once the cache is half full and then goes
  on until :meth:`EVCache.clear` (Caffeine starts its sketch at the same point): until then no
  admission reads it -- a free slot takes any candidate -- and a cache with room to spare, such as
  one holding its whole working set, pays no sketch line per lookup. A free slot takes any
  candidate (the filter protects residents; with room there is none to protect: without this, a
  large cache stays part empty for rows seen once). When the cache is full, a candidate that
  passed the filter replaces the victim only if its estimate is strictly higher;
  otherwise it is counted as ``rejected_by_sketch`` and the victim stays (TinyLFU's rule: a row
  that is not more popular than what it would evict is not worth a write).
* **CLOCK.** Row index -> cache slot through Robin Hood open addressing (linear probing;
  a resident's probe distance is recomputed from its key; lookups stop early once they are
  further from home than the resident; deletion by backward shift, so there are no tombstones)
  -- or, for a cache holding at least ``load_factor`` of the table's rows, where one int64 per
  table row costs no more than the hash table, a direct index (entry k: row k's slot or -1): a
  lookup is one load instead of a probe into a table far larger than the CPU cache.
  Recency: one ``uint8`` reference counter per slot and a hand. A hit adds one to its slot's
  counter, saturating at ``ref_max`` (7 in sketch mode, 1 -- classic second chance -- in filter
  mode): one byte store to a slot the probe just found, independent of every other key, so a
  batch's hits overlap in the CPU (a linked LRU list relinks each hit through its neighbours'
  links, dependent loads that cannot be prefetched: ~60 ns per hit with a cold CPU cache). When a
  full cache needs a victim, the hand walks the slots in order, taking one off each non-zero
  counter, and stops at the first zero; a newcomer starts at 0 right behind the hand, so it has a
  full turn to be reused. A row hit k times survives up to k sweeps (the protected segment's job
  in a segmented LRU). Rows live in a preallocated ``values[capacity, dim]`` array; the kernels
  move them as 8/4/2/1-byte words, so any table dtype works (fp32, fp16, int8, int32, ...).

Why the sketch is the default: at equal rows it beats the plain 2-bit filter and W-TinyLFU
(``theine``) on the Meta-calibrated trace at 1-2% and on the shifting-hot-set trace and is
within its run-to-run spread elsewhere (``evssd bench cache``, docs/benchmarks.md); the filter
alone admits anything seen twice and evicts by recency only, which loses hot rows to bursts of
lukewarm ones at small budgets.

Memory per entry (counted against the budget)::

    row_bytes                      the cached row (dim * itemsize)
    + 9                            slot->row key int64, reference counter uint8
    + 8 / load_factor              hash slots per entry * (row index | slot, packed in one int64)
    + 8                            the sketch (sketch mode only; whole 64-byte blocks)

plus ``ceil(n_rows / 4)`` bytes of admission counters and a small fixed part, both also charged
to the budget. The index is the smaller of the hash table and the direct index (``8 * n_rows``
bytes); a budget buys the largest capacity whose arrays, with the index in use, fit. With the default ``load_factor`` 0.8 that is ``row_bytes + 27`` bytes per entry in
sketch mode (``+ 19`` in filter mode): for a 64-dim fp32 table (256-byte rows) the cache holds
90% (93%) as many rows as a budget of raw rows, minus what the counters take.

Semantics, exactly (the test suite checks them against a pure-Python reference):

* ``lookup(indices, out)`` walks the batch in order; for each index: bump its counter and (sketch
  mode, unless it is cached with its reference counter at ``ref_max``) its sketch counters,
  halving the sketch when the sample is full; if cached, copy the row
  into ``out[j]``, count a hit and add one to its slot's reference counter (up to ``ref_max``);
  else count a miss. A row missing twice in one batch is two misses (nothing is inserted by a
  lookup).
* ``admit(indices, rows)`` walks the batch in order; a row already cached is skipped (a duplicate
  in the batch, or admitted earlier); while the cache has a free slot, sketch mode inserts the row;
  otherwise a row whose counter is below the threshold is rejected; if the cache is full, the
  hand sweeps to the victim (decrementing the counters it passes) and in sketch mode a candidate
  no more frequent than the victim is rejected (the hand stays on the victim); otherwise the row
  takes the victim's slot with counter 0 and the hand moves one slot on. ``invalidate`` moves
  the last used slot into the freed one (slots stay dense) and puts a hand past the end at 0.

Thread safety: the kernels release the GIL and each public call holds a per-instance lock, so
calls from several threads serialise per table and different tables run in parallel.
"""
from __future__ import annotations

import math
import threading

import numba
import numpy as np

from evssd.host.dedupe import dedupe_into
from evssd.host.misses import miss_order_into
from evssd.host.rowmem import zeros_rows
from evssd.host.elements import DEVICE_ELEMS
from evssd.host.pooling import (pool2_into, pool2_trusted, _bags, _check as _check_bags, _prefetch,
                                describe_error, kernel_source)

__all__ = ["EVCache", "bytes_per_entry", "DTYPE_ALIASES", "ADMISSION_POLICIES", "DEFAULT_ADMISSION"]

DTYPE_ALIASES = {**{n: el.storage.type for n, el in DEVICE_ELEMS.items()},  # host.elements
                 "fp64": np.float64, "bf16": None}

# state vector layout (int64): mutable scalars shared with the kernels
(_HAND, _SIZE, _HITS, _MISSES, _ADMISSIONS, _EVICTIONS, _REJECTED, _SINCE_DECAY, _LOOKUPS,
 _REJECTED_SKETCH, _SKETCH_ADDS, _EPOCH, _INSERTS) = range(13)
_N_STATE = 13

_EMPTY = np.int64(-1)
_HASH_SLOT_BYTES = 8              # row index | cache slot << kb, one int64
_ENTRY_META_BYTES = 8 + 1        # slot -> key, reference counter
_SKETCH_BYTES_PER_ENTRY = 8       # 16 four-bit counters per cached row (Caffeine's sizing)
_SKETCH_SAMPLE_PER_ENTRY = 10     # halve the sketch after 10 x capacity counted keys
# CLOCK reference counter ceiling per admission mode: a hit adds one up to this, a sweep of the
# hand takes one off. 1 is classic second chance (the filter mode's LRU approximation); the
# sketch mode's 7 lets a row reused several times survive that many sweeps, the role the
# protected segment of a segmented LRU plays.
_REF_MAX = {"sketch": 7, "filter": 1}
ADMISSION_POLICIES = ("sketch", "filter")


DEFAULT_ADMISSION = "sketch"


def bytes_per_entry(row_bytes: int, load_factor: float = 0.8,
                    admission: str = DEFAULT_ADMISSION) -> float:
    """Bytes one cached row costs with the hash index: the row, its key and reference counter,
    its share of the hash table and, with ``admission="sketch"``, its share of the frequency
    sketch. (A cache holding most of its table's rows uses a direct index of ``8 * n_rows``
    bytes instead when that is smaller; see the module docstring.)"""
    sketch = _SKETCH_BYTES_PER_ENTRY if admission == "sketch" else 0
    return row_bytes + _ENTRY_META_BYTES + _HASH_SLOT_BYTES / load_factor + sketch


def _sketch_words(capacity: int) -> int:
    """uint64 words of the sketch for ``capacity`` rows: one word per row, whole 8-word blocks."""
    return 8 * -(-capacity // 8)


# ----------------------------------------------------------------------------------------------
# kernels

_U32 = np.uint64(0xFFFFFFFF)
_NIBBLE_HALF = np.uint64(0x7777777777777777)


@numba.njit(cache=True, inline="always")
def _home(k, m):
    # Fibonacci hashing spreads consecutive row ids; the multiply-shift range reduction maps the
    # top 32 bits onto [0, m) without a division, so m need not be a power of two.
    h = np.uint64(k) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64(((h >> np.uint64(32)) * np.uint64(m)) >> np.uint64(32))


@numba.njit(cache=True, inline="always")
def _dist(pos, k, m):
    # a resident's probe distance is recomputed from its key (cheaper than storing it: one
    # multiply against a cache miss on a third array)
    d = pos - _home(k, m)
    return d + m if d < 0 else d


@numba.njit(cache=True, inline="always")
def _find(k, htab, kb):
    """Position of row ``k`` in the hash table, or -1. An entry packs ``row | slot << kb`` in one
    int64 (-1: empty), so a probe reads one word and a hit needs no second array."""
    if kb == 0:                    # a direct index: entry k is row k's slot or -1
        return k if htab[k] >= 0 else -1
    m = htab.shape[0]
    mask = (np.int64(1) << kb) - 1
    pos = _home(k, m)
    # Most residents sit within three slots of home: compare the first four without branches
    # (selects, not jumps: the probe length is unpredictable, so a loop mispredicts its exit).
    # An empty entry masks to 2**kb - 1 > every row index, so it never matches.
    f = -1
    for i in range(3, -1, -1):
        q = pos + i
        q = q - m if q >= m else q
        f = q if (htab[q] & mask) == k else f
    if f >= 0:
        return f
    d = 0
    while True:
        e = htab[pos]
        if e == -1:
            return -1
        kk = e & mask
        if kk == k:
            return pos
        if _dist(pos, kk, m) < d:
            return -1          # a resident closer to home: k would have displaced it
        pos += 1
        if pos == m:
            pos = 0
        d += 1


@numba.njit(cache=True)
def _insert(k, v, htab, kb):
    if kb == 0:
        htab[k] = v
        return
    m = htab.shape[0]
    mask = (np.int64(1) << kb) - 1
    pos = _home(k, m)
    ce = k | (np.int64(v) << kb)
    cd = 0
    while True:
        e = htab[pos]
        if e == -1:
            htab[pos] = ce
            return
        rd = _dist(pos, e & mask, m)
        if rd < cd:                # rob the rich: the resident is closer to home, take its place
            htab[pos] = ce
            ce = e
            cd = rd
        pos += 1
        if pos == m:
            pos = 0
        cd += 1


@numba.njit(cache=True)
def _delete_at(pos, htab, kb):
    if kb == 0:
        htab[pos] = -1
        return
    m = htab.shape[0]
    mask = (np.int64(1) << kb) - 1
    nxt = pos + 1
    if nxt == m:
        nxt = 0
    while True:
        e = htab[nxt]
        if e == -1 or _dist(nxt, e & mask, m) == 0:
            break
        htab[pos] = e
        pos = nxt
        nxt += 1
        if nxt == m:
            nxt = 0
    htab[pos] = -1


@numba.njit(cache=True, inline="always")
def _index_pos(k, m, kb):
    """Where row ``k``'s index entry is (or its probe starts), for the prefetch hint."""
    return np.int64(k) if kb == 0 else _home(k, m)


@numba.njit(cache=True, inline="always")
def _entry(k, s, kb):
    """The index entry of row ``k`` held in slot ``s``."""
    return np.int64(s) if kb == 0 else k | (np.int64(s) << kb)


@numba.njit(cache=True, inline="always")
def _mix(k):
    # splitmix64's finaliser: every output bit depends on every key bit, unlike _home's
    # multiply, so the sketch's counters are independent of the hash table's placement
    z = np.uint64(k) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _sketch_cells(k, n_blocks):
    """The sketch block (8 words, one 64-byte cache line) of ``k`` and 20 bits choosing its four
    counters: counter i lives in word 2i or 2i+1 of the block, in one of its 16 nibbles."""
    z = _mix(k)
    block = np.int64(((z >> np.uint64(32)) * np.uint64(n_blocks)) >> np.uint64(32))
    return block * 8, np.int64(z & _U32)


@numba.njit(cache=True, inline="always")
def _sketch_estimate(k, sketch):
    base, sel = _sketch_cells(k, sketch.shape[0] >> 3)
    est = 15
    for i in range(4):
        w = base + 2 * i + ((sel >> i) & 1)
        sh = ((sel >> (4 + 4 * i)) & 15) * 4
        c = np.int64((sketch[w] >> np.uint64(sh)) & np.uint64(15))
        if c < est:
            est = c
    return est


@numba.njit(cache=True, inline="always")
def _sketch_increment(k, sketch):
    base, sel = _sketch_cells(k, sketch.shape[0] >> 3)
    for i in range(4):
        w = base + 2 * i + ((sel >> i) & 1)
        sh = np.uint64(((sel >> (4 + 4 * i)) & 15) * 4)
        word = sketch[w]
        # saturating add without a branch (hot rows sit at 15: a branch would mispredict)
        sketch[w] = word + (np.uint64((word >> sh) & np.uint64(15) != np.uint64(15)) << sh)


@numba.njit(cache=True, nogil=True)
def _sketch_halve(sketch):
    for i in range(sketch.shape[0]):
        sketch[i] = (sketch[i] >> np.uint64(1)) & _NIBBLE_HALF


_NO_HIT = np.zeros(0, dtype=np.bool_)
_NO_SKETCH = np.zeros(0, dtype=np.uint64)   # what lookups count into before the sketch starts
_ONE_BAG = np.zeros(1, dtype=np.int64)   # the offsets lookup_dedupe passes (no pooling)
_NO_MISS = np.zeros(0, dtype=np.int64)   # a pooled batch's miss list (never written)
_NO_MISS.flags.writeable = False
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_F32 = np.dtype(np.float32)
_AHEAD = 8  # lookups between a prefetch hint and its use (as the pooling kernels)
_SKETCH_PREFETCH_BYTES = 256 * 1024  # prefetch sketch blocks when the sketch exceeds this (~L2)


@numba.njit(cache=True, nogil=True)
def _count_passes(keys, n, counted, n_counted, counters, sketch, sample, st):
    """The frequency passes of a lookup batch: bump the 2-bit admission counter of each of
    ``keys[:n]``, then add each of ``counted[:n_counted]`` to the sketch (halving it when the
    sample is full). Separate loops over the batch, each with its own prefetch hints: one fused
    loop measured slower."""
    c2 = counters.reshape((counters.shape[0], 1))
    for j in range(n):
        if j + _AHEAD < n:             # one byte per 4 rows: a large table's are beyond L2
            _prefetch(c2, keys[j + _AHEAD] >> 2, 0)
        k = keys[j]
        b = k >> 2
        sh = (k & 3) * 2
        c = counters[b]
        counters[b] = c + np.uint8((((c >> sh) & 3) != 3) << sh)   # saturating, branch-free
    if sketch.shape[0] > 0:
        nb = sketch.shape[0] >> 3
        s2 = sketch.reshape((nb, 8))   # one row per 64-byte block, for the prefetch hint
        adds = st[_SKETCH_ADDS]
        # a sketch beyond the L2 cache: hint the block of the key _AHEAD on (one more hash per
        # key; for a small sketch that is pure cost)
        hint = sketch.shape[0] * 8 > _SKETCH_PREFETCH_BYTES
        for j in range(n_counted):
            if hint and j + _AHEAD < n_counted:
                base, _ = _sketch_cells(counted[j + _AHEAD], nb)
                _prefetch(s2, base >> 3, 0)
            _sketch_increment(counted[j], sketch)
            adds += 1
            if adds >= sample:     # aging: halve every counter once `sample` keys were counted
                _sketch_halve(sketch)
                adds = adds >> 1
        st[_SKETCH_ADDS] = adds


@numba.njit(cache=True, inline="always")
def _probe_pass(keys, n, htab, kb, h2, ref, rmax, slots, counted):
    """The probe pass of a lookup over ``keys[:n]``: each key's slot (or -1) into ``slots``, a
    saturating reference increment per hit, and the keys the sketch counts appended to
    ``counted`` (all but hits on a slot already at ``rmax``; without a branch: the next key
    overwrites a skipped one). Returns (hits, number counted)."""
    m = htab.shape[0]
    hits = 0
    n_counted = 0
    for j in range(n):
        if j + _AHEAD < n:             # hint the home slot of the key _AHEAD positions on
            _prefetch(h2, _index_pos(keys[j + _AHEAD], m, kb), 0)
        k = keys[j]
        pos = _find(k, htab, kb)
        full = False
        if pos >= 0:
            s = np.int32(htab[pos] >> kb)
            r = ref[s]
            full = r >= rmax
            ref[s] = r + np.uint8(r < rmax)      # saturating, branch-free
            hits += 1
        else:
            s = np.int32(-1)
        slots[j] = s
        if counted.shape[0] > 0:
            counted[n_counted] = k
            n_counted += np.int64(not full)
    return hits, n_counted


@numba.njit(cache=True, nogil=True)
def _lookup_kernel(keys, out, hit, slots, copy, n_rows, htab, kb, values, ref, ref_max,
                   counters, sketch, sample, st):
    # ``slots`` (int32, len(keys)) receives each key's cache slot or -1; ``copy``: also copy each
    # hit row into ``out[j]`` (``lookup``) -- without it (``lookup_slots``) ``out`` is not read
    # and ``hit`` is not written. Every other effect is the same either way.
    n = keys.shape[0]
    for j in range(n):             # validate the whole batch before touching any state
        k = keys[j]
        if k < 0 or k >= n_rows:
            return j
    # Passes over the batch: the probes and the counter updates of different keys are
    # independent, so the CPU overlaps their cache misses. Recency is a CLOCK reference counter
    # per slot: a hit is one saturating byte increment, no list to relink, so no pass is serial.
    m = htab.shape[0]
    h2 = htab.reshape((m, 1))          # 2-D view for the prefetch hint
    rmax = np.uint8(ref_max)
    # the keys the sketch counts, in batch order (see _probe_pass)
    counted = np.empty(n if sketch.shape[0] > 0 else 0, dtype=np.int64)
    hits, n_counted = _probe_pass(keys, n, htab, kb, h2, ref, rmax, slots, counted)
    _count_passes(keys, n, counted, n_counted, counters, sketch, sample, st)
    if copy:
        w = values.shape[1]
        rb = w * values.itemsize
        for j in range(n):
            if j + _AHEAD < n and slots[j + _AHEAD] >= 0:   # the row copied _AHEAD lookups later
                for off in range(0, rb, 64):
                    _prefetch(values, slots[j + _AHEAD], off)
            s = slots[j]
            if s >= 0:
                for t in range(w):
                    out[j, t] = values[s, t]
            hit[j] = s >= 0
    st[_HITS] += hits
    st[_MISSES] += n - hits
    st[_LOOKUPS] += n
    st[_SINCE_DECAY] += n
    return -1


# The direct index during a lookup (see _lookup_pool_kernel): a row's first hit in the batch sets
# bit 62 of its entry and keeps its distinct number above bit 32 (the slot stays in the low 32
# bits); its first miss writes -2 - (distinct number). One load then gives the slot and whether
# (and as which distinct key) the row was met before in the batch, with no batch-local table.
# The kernel ends by writing every met row's entry back (its slot or -1), so nothing of it
# outlasts the call; a reader without the lock (``contains``) sees an entry >= 0 for a cached
# row and < 0 otherwise throughout.
_SEEN = np.int64(1) << 62
_LOW32 = np.int64(0xFFFFFFFF)
_DIRECT_MAX_BATCH = 1 << 30     # distinct numbers fit in bits 32..61


@numba.njit(cache=True, inline="always")
def _dedupe_hashed(idx, n, uniq, inv, slots, slot_of, htab, kb, ref, rmax, counted):
    """The dedupe and probe passes for a hash index: the batch's distinct keys
    (:func:`evssd.host.dedupe.dedupe_into`), then ``_probe_pass`` probes them. (Probing each key
    as the dedupe pass first meets it measured slower: the probe then sits behind an
    unpredictable branch, and fewer cache misses overlap.) Returns (distinct keys, hits, number
    counted)."""
    n_u = dedupe_into(idx[:n], uniq, inv)
    h2 = htab.reshape((htab.shape[0], 1))          # 2-D view for the prefetch hint
    hits, n_counted = _probe_pass(uniq, n_u, htab, kb, h2, ref, rmax, slots, counted)
    for j in range(n):
        slot_of[j] = slots[inv[j]]
    return n_u, hits, n_counted


@numba.njit(cache=True)
def _split(buf, n):
    """A lookup's five result arrays in one int64 buffer of >= 4n: uniq (int64), inv (int64),
    slots (int32), slot_of (int32), the miss list (int64)."""
    b32 = buf[2 * n:3 * n].view(np.int32)
    return buf[:n], buf[n:2 * n], b32[:n], b32[n:], buf[3 * n:4 * n]


@numba.njit(cache=True, nogil=True)
def _lookup_pool_kernel(idx, offs, buf, n_rows, htab, kb, ref, ref_max, counters, sketch, sample,
                        st, src, w, out, checked):
    """``lookup_slots(uniq)`` where ``uniq`` are ``idx``'s distinct keys in first-occurrence
    order -- fills uniq/inv/slots (per distinct key)/slot_of (per lookup) in ``buf`` (int64, at
    least 4 * len(idx): see ``_split``), then the frequency passes and the stats, and unless the
    bags were pooled the miss list (:func:`evssd.host.misses.miss_order_into`) -- and, with
    ``out`` (not None), the bags ``offs`` pooled from the
    cache rows ``src`` by the pooling definition (the one-table bag loop of
    :mod:`evssd.host.pooling` over each lookup's slot; ``w``: weights or None) when every
    distinct key hit. ``checked``: the caller validated ``idx`` and ``offs`` against this
    table (the store does, before any I/O), so the kernel does not again. Returns (distinct
    keys, or -1 - j for a bad key at position j; whether ``out`` holds the bags; -1, or the
    pooling check's code for bad ``offs``; the length of the miss list). On an error nothing
    changed.

    Over a direct index the dedupe and the probe are one pass (see ``_SEEN``): probe, mark and
    recency, the index entry ``_AHEAD`` lookups ahead prefetched; over a hash index the
    batch-local dedupe and the probe pass. The pooling comes after either, in its own loop: a
    loop of its own keeps a bag's sums in vector registers, which a loop that also probes
    could not (measured on the hit path's store, 64 fp32 rows: 18.4 -> 16.3 ns per lookup on
    the Meta trace, 33.2 -> 30.4 uniform)."""
    n = idx.shape[0]
    uniq, inv, slots, slot_of, miss = _split(buf, n)
    if not checked and out is not None:    # offsets and keys checked before any state changes
        code = _check_bags(n_rows, idx, offs)
        if code <= -2:
            return 0, False, code, 0
        if code >= 0:
            return -1 - code, False, -1, 0
    elif not checked:
        for j in range(n):         # validate the whole batch before touching any state
            k = idx[j]
            if k < 0 or k >= n_rows:
                return -1 - j, False, -1, 0
    rmax = np.uint8(ref_max)
    counted = np.empty(n if sketch.shape[0] > 0 else 0, dtype=np.int64)
    sk = counted.shape[0] > 0
    if kb == 0 and n < _DIRECT_MAX_BATCH:
        h2 = htab.reshape((htab.shape[0], 1))
        n_u = 0
        hits = 0
        n_counted = 0
        for j in range(n):
            if j + _AHEAD < n:
                _prefetch(h2, idx[j + _AHEAD], 0)
            k = np.int64(idx[j])
            e = htab[k]
            if e >= _SEEN:                 # a hit met before in this batch
                u = (e >> 32) & np.int64(0x3FFFFFFF)
                s = np.int32(e & _LOW32)
            elif e >= 0:                   # the first hit on this row
                u = np.int64(n_u)
                n_u += 1
                s = np.int32(e)
                htab[k] = e | _SEEN | (u << 32)
                uniq[u] = k
                slots[u] = s
                r = ref[s]
                ref[s] = r + np.uint8(r < rmax)      # saturating, branch-free
                hits += 1
                if sk:
                    counted[n_counted] = k
                    n_counted += np.int64(r < rmax)
            elif e == -1:                  # the first miss on this row
                u = np.int64(n_u)
                n_u += 1
                s = np.int32(-1)
                htab[k] = -2 - u
                uniq[u] = k
                slots[u] = s
                if sk:
                    counted[n_counted] = k
                    n_counted += 1
            else:                          # a miss met before in this batch
                u = -2 - e
                s = np.int32(-1)
            inv[j] = u
            slot_of[j] = s
        for u in range(n_u):               # every met row's entry back to its slot or -1
            htab[uniq[u]] = slots[u]
    else:
        n_u, hits, n_counted = _dedupe_hashed(idx, n, uniq, inv, slots, slot_of, htab, kb, ref,
                                              rmax, counted)
    pooled = out is not None and hits == n_u
    if pooled:                     # every distinct key hit: the bags from the cache rows
        _bags(src, None, slot_of, None, offs, w, out, 0, offs.shape[0] - 1)
    _count_passes(uniq, n_u, counted, n_counted, counters, sketch, sample, st)
    st[_HITS] += hits
    st[_MISSES] += n_u - hits
    st[_LOOKUPS] += n_u
    st[_SINCE_DECAY] += n_u
    n_miss = 0
    if not pooled and hits < n_u:
        n_miss = miss_order_into(uniq, slots, n_u, miss)
    return n_u, pooled, -1, n_miss


@numba.njit(cache=True, nogil=True)
def _decay_kernel(counters):
    # halve every 2-bit lane: each lane's high bit moves to its low bit, the rest is masked off
    for i in range(counters.shape[0]):
        counters[i] = (counters[i] >> 1) & np.uint8(0x55)


@numba.njit(cache=True, nogil=True)
def _admit_kernel(keys, rows, threshold, n_rows, htab, kb, values, ref, slot_key,
                  counters, sketch, st, probe):
    # ``probe``: look each key up first (a cached one is skipped); False when the caller knows
    # that none is cached and that they are distinct (a lookup's misses, nothing inserted since)
    n = keys.shape[0]
    for j in range(n):
        k = keys[j]
        if k < 0 or k >= n_rows:
            return j
    cap = values.shape[0]
    w = values.shape[1]
    use_sketch = sketch.shape[0] > 0
    hand = st[_HAND]
    size = st[_SIZE]
    for j in range(n):
        k = keys[j]
        if probe and _find(k, htab, kb) >= 0:
            continue
        c = (counters[k >> 2] >> ((k & 3) * 2)) & 3
        # the filter guards residents against displacement: in sketch mode a free slot is
        # filled whatever the counter says (there is nothing to displace)
        if c < threshold and not (use_sketch and size < cap):
            st[_REJECTED] += 1
            continue
        if size < cap:
            s = size
            size += 1
        else:
            # the victim: the hand's next slot with a zero reference counter; the slots it
            # passes lose one reference each (ends: every pass over a slot decrements it)
            while ref[hand] > 0:
                ref[hand] -= 1
                hand += 1
                if hand == cap:
                    hand = 0
            s = hand
            if use_sketch and _sketch_estimate(k, sketch) <= _sketch_estimate(slot_key[s], sketch):
                st[_REJECTED_SKETCH] += 1
                continue           # the victim is at least as frequent: keep it (hand stays)
            _delete_at(_find(slot_key[s], htab, kb), htab, kb)
            st[_EVICTIONS] += 1
            st[_EPOCH] += 1        # a slot now holds another row
            hand += 1              # the newcomer is the last the hand reaches
            if hand == cap:
                hand = 0
        ref[s] = 0
        slot_key[s] = k
        for t in range(w):
            values[s, t] = rows[j, t]
        _insert(k, s, htab, kb)
        st[_ADMISSIONS] += 1
        st[_INSERTS] += 1
    st[_HAND] = hand
    st[_SIZE] = size
    return -1


@numba.njit(cache=True, nogil=True)
def _pool_admit_kernel(csrc, msrc, rows, uniq, inv, loc, miss, offs, w, out, threshold, n_rows,
                       htab, kb, values, ref, slot_key, counters, sketch, st, inserts, checked):
    """The end of a pooled lookup whose misses were fetched, in one call: miss i (``miss[i]``,
    a position in ``uniq``) becomes location ``-1 - i`` in ``loc``; the bags are pooled from the
    cache rows ``csrc`` and the fetched rows ``msrc`` (:func:`evssd.host.pooling.pool2_into`);
    then ``uniq[miss]`` with ``rows[:len(miss)]`` are admitted (``_admit_kernel``), without
    probing for them again when ``inserts`` (the insert count the lookup saw, or -1) is still
    the cache's: the misses are then still absent (measured: the probes of the missed rows,
    whose unsuccessful Robin Hood walks are the longest, were ~40% of the admission). Returns
    (-1, or the pooling's error code: then nothing was admitted; -1, or the position of a bad
    key in the miss list). ``checked``: ``inv``, ``loc``, ``miss`` and ``offs`` are the
    lookup's own, so the pooling does not check them again
    (:func:`evssd.host.pooling.pool2_trusted`)."""
    n_miss = miss.shape[0]
    for i in range(n_miss):
        loc[miss[i]] = -1 - i
    if checked:
        pool2_trusted(csrc, msrc, inv, loc, offs, w, out)
        code = -1
    else:
        code = pool2_into(csrc, msrc, inv, loc, offs, w, out)
    if code != -1 or n_miss == 0:
        return code, -1
    keys = np.empty(n_miss, dtype=np.int64)
    for i in range(n_miss):
        keys[i] = uniq[miss[i]]
    return -1, _admit_kernel(keys, rows, threshold, n_rows, htab, kb, values, ref, slot_key,
                             counters, sketch, st, inserts < 0 or st[_INSERTS] != inserts)


@numba.njit(cache=True, nogil=True)
def _invalidate_kernel(keys, n_rows, htab, kb, values, ref, slot_key, st):
    n = keys.shape[0]
    for j in range(n):
        k = keys[j]
        if k < 0 or k >= n_rows:
            return -(j + 1)
    w = values.shape[1]
    size = st[_SIZE]
    removed = 0
    for j in range(n):
        pos = _find(keys[j], htab, kb)
        if pos < 0:
            continue
        s = htab[pos] >> kb
        _delete_at(pos, htab, kb)
        removed += 1
        st[_EPOCH] += 1
        last = size - 1
        size -= 1
        if s != last:              # keep slots dense: move the last slot into the hole
            ref[s] = ref[last]
            slot_key[s] = slot_key[last]
            for t in range(w):
                values[s, t] = values[last, t]
            htab[_find(slot_key[s], htab, kb)] = _entry(slot_key[s], s, kb)
        slot_key[last] = -1
        ref[last] = 0
    st[_SIZE] = size
    if st[_HAND] >= size:          # the hand only ever points at a used slot (0 when empty)
        st[_HAND] = 0
    return removed


@numba.njit(cache=True)
def _contains_kernel(keys, htab, kb, res):
    for j in range(keys.shape[0]):
        res[j] = _find(keys[j], htab, kb) >= 0


@numba.njit(cache=True)
def _estimate_kernel(keys, sketch, res):
    for j in range(keys.shape[0]):
        res[j] = _sketch_estimate(keys[j], sketch)


# ----------------------------------------------------------------------------------------------


def _resolve_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str) and dtype.lower() in DTYPE_ALIASES:
        resolved = DTYPE_ALIASES[dtype.lower()]
        if resolved is None:
            raise ValueError(f"EVCache: dtype {dtype!r} is not supported (numpy has no bfloat16)")
        return np.dtype(resolved)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"EVCache: dtype {dtype!r} is not a numpy dtype") from exc
    if dt.kind not in "fiu" or dt.itemsize == 0:
        raise ValueError(f"EVCache: dtype {dtype!r} is not a numeric dtype (fp32, fp16, int8, int32, ...)")
    return dt


def _word_dtype(row_bytes: int) -> np.dtype:
    for size, dt in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if row_bytes % size == 0:
            return np.dtype(dt)
    return np.dtype(np.uint8)


class EVCache:
    """EV-Cache for one table of ``n_rows`` rows of ``dim`` elements of ``dtype``.

    Exactly one of ``capacity`` (rows), ``budget_bytes`` or ``budget_fraction`` (of the table's
    bytes, ``n_rows * dim * itemsize``; default 0.01) sets the size. A budget pays for everything
    the cache allocates: rows, links, hash table, admission counters and sketch (see the module
    docstring for the per-entry cost); ``memory_bytes`` in :attr:`stats` is the actual total.

    ``admit_threshold``: 0..3; a missed row is admitted when its 2-bit counter is at least this
    (0 admits everything offered; 1 admits anything looked up once, i.e. no filter; 2, the
    default, admits on the second access; 3 on the third).
    ``decay_interval``: age the counters after this many looked-up keys (None: never).
    ``load_factor``: maximum fill of the Robin Hood table, in (0, 0.95].
    ``admission``: ``"sketch"`` (default: the 2-bit filter, then the frequency sketch compares the
    candidate with the CLOCK victim) or ``"filter"`` (the 2-bit filter over CLOCK with one
    reference bit, the published design's LRU approximated by second chance). The sketch costs 8 bytes per row, charged to the budget.
    """

    def __init__(self, n_rows: int, dim: int, dtype=np.float32, *, capacity: int | None = None,
                 budget_bytes: int | None = None, budget_fraction: float | None = None,
                 admit_threshold: int = 2, decay_interval: int | None = None,
                 load_factor: float = 0.8, admission: str = DEFAULT_ADMISSION, name: str = ""):
        self.name = str(name)
        if admission not in ADMISSION_POLICIES:
            raise ValueError(f"EVCache {self.name!r}: admission must be one of "
                             f"{', '.join(map(repr, ADMISSION_POLICIES))}, got {admission!r}")
        self.admission = admission
        if isinstance(n_rows, bool) or not isinstance(n_rows, (int, np.integer)) or n_rows < 1:
            raise ValueError(f"EVCache {self.name!r}: n_rows must be a positive integer, got {n_rows!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"EVCache {self.name!r}: dim must be a positive integer, got {dim!r}")
        if isinstance(admit_threshold, bool) or not isinstance(admit_threshold, (int, np.integer)) \
                or not 0 <= admit_threshold <= 3:
            raise ValueError(f"EVCache {self.name!r}: admit_threshold must be an integer in 0..3 "
                             f"(2-bit counters), got {admit_threshold!r}")
        if decay_interval is not None and (not isinstance(decay_interval, (int, np.integer))
                                           or decay_interval < 1):
            raise ValueError(f"EVCache {self.name!r}: decay_interval must be a positive integer "
                             f"or None, got {decay_interval!r}")
        if not isinstance(load_factor, (int, float)) or not 0 < load_factor <= 0.95:
            raise ValueError(f"EVCache {self.name!r}: load_factor must be in (0, 0.95], got {load_factor!r}")
        self.n_rows = int(n_rows)
        self.dim = int(dim)
        self.dtype = _resolve_dtype(dtype)
        self.admit_threshold = int(admit_threshold)
        self.decay_interval = None if decay_interval is None else int(decay_interval)
        self.load_factor = float(load_factor)
        self.row_bytes = self.dim * self.dtype.itemsize
        self._word = _word_dtype(self.row_bytes)
        self._words = self.row_bytes // self._word.itemsize
        counter_bytes = (self.n_rows + 3) // 4
        fixed_bytes = _N_STATE * 8 + counter_bytes

        given = [p for p, v in (("capacity", capacity), ("budget_bytes", budget_bytes),
                                ("budget_fraction", budget_fraction)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"EVCache {self.name!r}: give one of capacity, budget_bytes, "
                             f"budget_fraction, not {' and '.join(given)}")
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
                raise ValueError(f"EVCache {self.name!r}: capacity must be a positive integer, got {capacity!r}")
            cap = int(capacity)
            self.budget_bytes = None
        else:
            if budget_bytes is None:
                fraction = 0.01 if budget_fraction is None else budget_fraction
                if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) \
                        or not 0 < fraction <= 1:
                    raise ValueError(f"EVCache {self.name!r}: budget_fraction must be in (0, 1], "
                                     f"got {budget_fraction!r}")
                budget = int(fraction * self.n_rows * self.row_bytes)
            else:
                if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) \
                        or budget_bytes < 1:
                    raise ValueError(f"EVCache {self.name!r}: budget_bytes must be a positive "
                                     f"integer, got {budget_bytes!r}")
                budget = int(budget_bytes)
            self.budget_bytes = budget
            per_entry = bytes_per_entry(self.row_bytes, self.load_factor, admission)
            # the largest capacity whose layout fits (the layout grows with the capacity; the
            # index is the smaller of the hash table and the direct index, see _index_bytes)
            lo, hi = 0, self.n_rows
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._layout_bytes(mid) + fixed_bytes <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            cap = lo
            if cap < 1:
                raise ValueError(
                    f"EVCache {self.name!r}: budget of {budget} bytes holds no row: one entry costs "
                    f"{per_entry:.1f} bytes plus "
                    f"{fixed_bytes} bytes of counters and state")
        cap = min(cap, self.n_rows)
        if cap >= 2**31 - 1:
            raise ValueError(f"EVCache {self.name!r}: capacity {cap} exceeds the int32 slot range")
        # The index maps a row to its slot. A hash table's entries pack row | slot << kb (kb
        # leaves 2**kb - 1, an empty entry masked, unused); when a direct index (one int64 per
        # table row: the slot or -1) takes no more memory -- a cache of >= load_factor of the
        # table's rows -- it is used instead, marked by kb = 0: a lookup is one load, no probe.
        self.direct_index = self._direct(cap)
        self._kb = 0 if self.direct_index else max(1, self.n_rows.bit_length())
        if not self.direct_index and cap >= 1 << (63 - self._kb):
            raise ValueError(f"EVCache {self.name!r}: capacity {cap} with {self.n_rows} table rows "
                             f"exceeds the packed hash entry ({self._kb} row bits + slot bits <= 63)")
        self.capacity = cap
        m = self.n_rows if self.direct_index else self._hash_slots(cap)

        self._values = zeros_rows((cap, self._words), self._word)   # rows on cache lines
        self._values_view = self._values.view(self.dtype).reshape(cap, self.dim)
        self._slot_key = np.full(cap, -1, dtype=np.int64)
        self._ref = np.zeros(cap, dtype=np.uint8)      # CLOCK reference counter per slot
        self._ref_max = _REF_MAX[admission]
        self._htab = np.full(m, -1, dtype=np.int64)
        self._counters = np.zeros(counter_bytes, dtype=np.uint8)
        # the frequency sketch is empty (and never read) in "filter" mode
        self._sketch = np.zeros(_sketch_words(cap) if admission == "sketch" else 0, dtype=np.uint64)
        self._sketch_sample = _SKETCH_SAMPLE_PER_ENTRY * cap
        self._counting = _NO_SKETCH    # what lookups count into: the sketch once half full
        self._st = np.zeros(_N_STATE, dtype=np.int64)
        self._sources = {}      # the row store as the pooling kernels read it, per element type
        self._scratch = np.empty(0, dtype=np.int64)   # 32 bytes per lookup of the largest pooled batch
        self._last_pooled = True
        # The kernels release the GIL (the store overlaps cache work with device I/O in another
        # thread); the lock keeps two callers from racing on one table's cache.
        self._lock = threading.Lock()

    # -- sizing

    def _hash_slots(self, cap: int) -> int:
        # at least one empty slot (probes end), and at least the 4 slots _find's window reads
        return max(cap + 1, 4, math.ceil(cap / self.load_factor))

    def _direct(self, cap: int) -> bool:
        """A direct index (8 bytes per table row) for ``cap`` rows when it is no larger than the
        hash table (8 bytes per hash slot)."""
        return self.n_rows <= self._hash_slots(cap)

    def _index_bytes(self, cap: int) -> int:
        return _HASH_SLOT_BYTES * min(self.n_rows, self._hash_slots(cap))

    def _layout_bytes(self, cap: int) -> int:
        sketch = 8 * _sketch_words(cap) if self.admission == "sketch" else 0
        return cap * (self.row_bytes + _ENTRY_META_BYTES) + self._index_bytes(cap) + sketch

    @property
    def memory_bytes(self) -> int:
        """Bytes held by every array of the cache (rows, links, hash table, counters, state)."""
        return sum(a.nbytes for a in (self._values, self._slot_key, self._ref, self._htab, self._counters, self._sketch,
                                      self._st))

    # -- input checks (all before any state changes)

    def _keys(self, indices, what: str) -> np.ndarray:
        arr = np.asarray(indices)
        if arr.ndim != 1:
            raise ValueError(f"EVCache {self.name!r}: {what} indices must be 1-D, got shape {arr.shape}")
        if arr.dtype != np.int64:
            if arr.size and arr.dtype.kind not in "iu":
                raise TypeError(f"EVCache {self.name!r}: {what} indices must be integers, got {arr.dtype}")
            if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
                bad = int(np.flatnonzero(arr > np.iinfo(np.int64).max)[0])
                self._bad_index(arr, bad)
            arr = arr.astype(np.int64)
        return np.ascontiguousarray(arr)

    def _bad_index(self, arr, pos: int):
        raise IndexError(f"EVCache {self.name!r}: index {int(arr[pos])} at position {pos} is out "
                         f"of range for a table of {self.n_rows} rows")

    def _row_view(self, arr: np.ndarray) -> np.ndarray:
        return arr.view(self._word).reshape(arr.shape[0], self._words)

    # -- the batched API

    def lookup(self, indices, out: np.ndarray) -> np.ndarray:
        """Serve ``indices`` from the cache: returns the hit mask and fills ``out[hit]``.

        ``out`` is ``(len(indices), dim)`` of the table dtype; rows of misses are left untouched.
        Updates recency, admission counters and the hit/miss counts. An index outside
        ``[0, n_rows)`` raises ``IndexError`` (naming the table and the first bad position)
        before anything changes.
        """
        keys = self._keys(indices, "lookup")
        n = keys.shape[0]
        if not isinstance(out, np.ndarray) or out.shape != (n, self.dim):
            shape = getattr(out, "shape", type(out).__name__)
            raise ValueError(f"EVCache {self.name!r}: out must be an array of shape ({n}, {self.dim}), got {shape}")
        if out.dtype != self.dtype:
            raise TypeError(f"EVCache {self.name!r}: out dtype {out.dtype} != table dtype {self.dtype}")
        if not out.flags.writeable:
            raise ValueError(f"EVCache {self.name!r}: out is read-only")
        hit = np.empty(n, dtype=np.bool_)
        direct = out.flags.c_contiguous
        target = out if direct else np.empty_like(out, order="C")
        slots = np.empty(n, dtype=np.int32)
        with self._lock:
            self._run_lookup(keys, self._row_view(target), hit, slots, True)
        if not direct:
            out[hit] = target[hit]
        return hit

    def lookup_slots(self, indices, slots: np.ndarray | None = None) -> np.ndarray:
        """:meth:`lookup` without the copy: returns each index's slot in :attr:`values` (int32,
        -1 for a miss) and has exactly the effects of ``lookup`` (hit/miss counts, recency,
        counters, sketch, decay). ``slots``: an int32 buffer of ``len(indices)`` to fill.

        A slot stays valid until the next :meth:`admit`, :meth:`invalidate` or :meth:`clear`;
        a caller that reads the rows later must hold :attr:`lock` from the lookup through the
        read, or check :meth:`slot_keys` first."""
        keys = self._keys(indices, "lookup")
        n = keys.shape[0]
        if slots is None:
            slots = np.empty(n, dtype=np.int32)
        elif not isinstance(slots, np.ndarray) or slots.dtype != np.int32 or slots.shape != (n,) \
                or not slots.flags.c_contiguous or not slots.flags.writeable:
            raise ValueError(f"EVCache {self.name!r}: slots must be a writeable contiguous int32 "
                             f"array of shape ({n},), got {getattr(slots, 'dtype', type(slots).__name__)} "
                             f"{getattr(slots, 'shape', '')}")
        with self._lock:
            self._run_lookup(keys, self._values[:0], _NO_HIT, slots, False)
        return slots

    def lookup_dedupe(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Deduplicate a batch and look up its distinct indices in one pass: returns ``(uniq,
        inv, slots, slot_of, misses)`` with ``uniq`` the distinct indices in first-occurrence
        order (int64), ``indices == uniq[inv]`` (``inv`` int64), ``slots`` each distinct
        index's slot (int32, -1 for a miss), ``slot_of == slots[inv]`` (int32, per lookup) and
        ``misses`` the positions in ``uniq`` of the -1 slots in ascending index order (int64: the
        order a backend reads them in; :func:`evssd.host.misses.miss_order`). Exactly the effects of ``lookup_slots(uniq)`` (the
        cache counts distinct indices); the slots' validity is as for :meth:`lookup_slots`.
        ``indices``: int32 or int64 (used as they are), or any integer array."""
        return self._lookup_pool(self._batch_keys(indices), _ONE_BAG, None, None)[1:]

    def lookup_pool(self, indices, offsets, out: np.ndarray, elem, weights=None, *,
                    checked: bool = False) -> tuple:
        """:meth:`lookup_dedupe`, and when every distinct index hit, the bags pooled straight
        from the cache rows into ``out`` in the same call, under the lock (no row can move
        between the lookup and the read). Returns ``(pooled, uniq, inv, slots, slot_of,
        misses)``: ``pooled`` says whether ``out`` holds the bags (then the rest is ``None``
        and an empty miss list: no one reads them, so they stay in a scratch buffer of the cache's); otherwise
        ``out``'s contents are unspecified and the rest is what :meth:`lookup_dedupe` returns.

        ``offsets``: FBGEMM's B+1 bag offsets (int32/int64); ``elem``: the table's
        :class:`evssd.host.elements.Elem` (fp32, fp16, int8, int32: pooled by
        :mod:`evssd.host.pooling`'s definition; int8_rowwise is not taken); ``out``: a
        C-contiguous ``(B, dim)`` array of ``elem``'s pooled dtype, or float32 with ``weights``
        (float32, one per index). A bad index or offset raises before anything changes.
        ``checked=True``: the caller has validated every argument as this method requires --
        contiguous int32/int64 indices and offsets that :func:`evssd.host.pooling.check_bags`
        accepts against this table's rows, ``out`` and ``weights`` as above (the store does, for
        every request of a batch before its first I/O) -- so the lookup does not check them
        again (the pass over the batch: ~2.7 us of a 2,560-lookup table)."""
        if elem.extra or elem.storage != self.dtype:
            raise ValueError(f"EVCache {self.name!r}: lookup_pool pools fp32/fp16/int8/int32 rows of "
                             f"the table dtype {self.dtype}, not {elem.name}")
        if checked:
            return self._lookup_pool(indices, offsets, weights, out, elem, True)
        arr = self._batch_keys(indices)
        offs = offsets
        if not isinstance(offs, np.ndarray) or offs.ndim != 1 or offs.dtype not in _INDEX_DTYPES \
                or offs.size < 1 or not offs.flags.c_contiguous:
            raise ValueError(f"EVCache {self.name!r}: offsets must be a contiguous 1-D int32/int64 "
                             f"array of B+1 >= 1 entries, got {getattr(offs, 'dtype', type(offs).__name__)} "
                             f"{getattr(offs, 'shape', '')}")
        dtype = _F32 if weights is not None else elem.pooled
        if not isinstance(out, np.ndarray) or out.shape != (offs.size - 1, self.dim) or out.dtype != dtype \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"EVCache {self.name!r}: out must be a writeable C-contiguous {dtype} "
                             f"array of shape ({offs.size - 1}, {self.dim})")
        if weights is not None and (not isinstance(weights, np.ndarray) or weights.dtype != _F32
                                    or weights.shape != arr.shape or not weights.flags.c_contiguous):
            raise ValueError(f"EVCache {self.name!r}: weights must be a contiguous float32 array of "
                             f"shape ({arr.shape[0]},)")
        return self._lookup_pool(arr, offs, weights, out, elem, False)

    def _batch_keys(self, indices) -> np.ndarray:
        """A batch's keys: int32/int64 contiguous arrays as they are, anything else checked and
        converted (:meth:`_keys`)."""
        if isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype in _INDEX_DTYPES \
                and indices.flags.c_contiguous:
            return indices
        return self._keys(indices, "lookup")

    def _lookup_pool(self, arr, offs, weights, out, elem=None, checked=False) -> tuple:
        n = arr.shape[0]
        if out is None:
            src = self._values
        else:
            src = self._sources.get(elem.name)
            if src is None:
                src = self._sources[elem.name] = kernel_source(self._values_view, elem)
        with self._lock:
            # the results go to a buffer of their own, except a pooled batch's, which no one
            # reads: they stay in the cache's scratch buffer (one allocation less per batch).
            # Whether a batch will pool is guessed from the last one (a wrong guess costs a
            # copy), so a cache that mostly misses allocates as lookup_dedupe does.
            if out is None or not self._last_pooled:
                buf = np.empty(4 * n, dtype=np.int64)
            else:
                if self._scratch.shape[0] < 4 * n:
                    self._scratch = np.empty(4 * n, dtype=np.int64)
                buf = self._scratch
            n_u, pooled, code, n_miss = _lookup_pool_kernel(
                arr, offs, buf, self.n_rows, self._htab, self._kb, self._ref, self._ref_max,
                self._counters, self._counting, self._sketch_sample, self._st, src, weights, out,
                checked)
            if code == -1 and n_u >= 0:
                self._maybe_decay()
                if not pooled and buf is self._scratch:
                    buf = buf[:4 * n].copy()
                if out is not None:
                    self._last_pooled = pooled
        if code != -1:
            raise ValueError(f"EVCache {self.name!r}: {describe_error(code, arr, offs, self.n_rows)}")
        if n_u < 0:
            self._bad_index(arr, -1 - n_u)
        if pooled:
            return True, None, None, None, None, _NO_MISS
        b32 = buf[2 * n:3 * n].view(np.int32)     # the layout of _split
        return False, buf[:n_u], buf[n:2 * n], b32[:n_u], b32[n:], buf[3 * n:3 * n + n_miss]

    def _run_lookup(self, keys, out, hit, slots, copy) -> None:
        bad = _lookup_kernel(keys, out, hit, slots, copy, self.n_rows, self._htab,
                             self._kb, self._values, self._ref, self._ref_max,
                             self._counters, self._counting, self._sketch_sample, self._st)
        if bad < 0:
            self._maybe_decay()
        if bad >= 0:
            self._bad_index(keys, bad)

    def _start_counting(self) -> None:
        # under the lock, after an admission: from half full on, lookups count into the sketch
        if self._counting is _NO_SKETCH and self._sketch.size and 2 * self._st[_SIZE] >= self.capacity:
            self._counting = self._sketch

    def _maybe_decay(self) -> None:
        # the counters age at the end of a lookup batch once decay_interval keys accumulated
        if self.decay_interval is not None and self._st[_SINCE_DECAY] >= self.decay_interval:
            _decay_kernel(self._counters)
            self._st[_SINCE_DECAY] = 0

    @property
    def lock(self) -> threading.Lock:
        """The per-instance lock every public call holds (see :meth:`lookup_slots`)."""
        return self._lock

    @property
    def epoch(self) -> int:
        """Counts the events that change which row a used slot holds (an eviction, an
        invalidation, :meth:`clear`); lookups and admissions into free slots leave it alone. A
        caller that read it before :meth:`lookup_slots` and reads the same value later knows
        every slot it got still holds its row, without checking :attr:`slot_keys`."""
        return int(self._st[_EPOCH])

    @property
    def inserts(self) -> int:
        """Counts the rows ever put into a slot (never reset, unlike the ``admissions``
        statistic). A caller that read it before a lookup and reads the same value later knows
        that no row was cached since: the lookup's misses are still absent."""
        return int(self._st[_INSERTS])

    @property
    def slot_keys(self) -> np.ndarray:
        """The row index each slot holds (-1: free), read-only view (to check slots)."""
        v = self._slot_key.view()
        v.flags.writeable = False
        return v

    def admit(self, indices, rows: np.ndarray) -> int:
        """Offer rows fetched for misses; inserts those that pass the filter. Returns how many.

        ``rows[j]`` is the row of ``indices[j]``, shape ``(len(indices), dim)``, table dtype.
        Rows already cached (duplicates in the batch included) are skipped; rows whose counter
        is below ``admit_threshold`` are rejected and counted; the rest take a free slot or, when
        full, the CLOCK victim's (see the module docstring).
        """
        keys = self._keys(indices, "admit")
        n = keys.shape[0]
        rows = np.asarray(rows)
        if rows.shape != (n, self.dim):
            raise ValueError(f"EVCache {self.name!r}: rows must have shape ({n}, {self.dim}), got {rows.shape}")
        if rows.dtype != self.dtype:
            raise TypeError(f"EVCache {self.name!r}: rows dtype {rows.dtype} != table dtype {self.dtype}")
        rows = np.ascontiguousarray(rows)
        with self._lock:
            before = int(self._st[_ADMISSIONS])
            bad = _admit_kernel(keys, self._row_view(rows), self.admit_threshold, self.n_rows,
                                self._htab, self._kb, self._values, self._ref,
                                self._slot_key, self._counters,
                                self._sketch, self._st, True)
            admitted = int(self._st[_ADMISSIONS]) - before
            self._start_counting()
        if bad >= 0:
            self._bad_index(keys, bad)
        return admitted

    def pool_admit(self, fetched: np.ndarray, elem, uniq, inv, loc, miss, offsets, out,
                   weights=None, inserts: int | None = None, *, checked: bool = False) -> int:
        """Finish a pooled lookup (:meth:`lookup_pool`/:meth:`lookup_dedupe`) whose misses were
        read, in one call under the lock: ``fetched[i]`` is the row of ``uniq[miss[i]]``;
        ``loc`` (the lookup's ``slots``, int32) gets ``-1 - i`` for miss i; the bags are pooled
        into ``out`` from the cache rows and ``fetched`` exactly as
        :func:`evssd.host.pooling.pool_two_sources`; then the misses are offered for admission
        as :meth:`admit` offers them. Only while every slot still holds the row the lookup found
        (:attr:`epoch` unchanged). ``elem``: fp32/fp16/int8/int32 of the table dtype; ``out`` and
        ``weights`` as for ``pool_two_sources``. ``inserts``: :attr:`inserts` read with
        :attr:`epoch` before the lookup (under the same lock), or None: while it is unchanged the
        misses are known to be absent and are admitted without another probe. ``checked=True``:
        ``uniq``, ``inv``, ``loc``, ``miss`` and ``offsets`` are exactly what this cache's
        lookup returned for a batch the caller validated (the store's case), so the pooling does
        not check them again. Returns -1, or the pooling's error code
        (:func:`evssd.host.pooling.describe_error`; then nothing was admitted)."""
        if elem.extra or elem.storage != self.dtype:
            raise ValueError(f"EVCache {self.name!r}: pool_admit pools fp32/fp16/int8/int32 rows of "
                             f"the table dtype {self.dtype}, not {elem.name}")
        if not isinstance(fetched, np.ndarray) or fetched.dtype != self.dtype or fetched.ndim != 2 \
                or fetched.shape[1] != self.dim or fetched.shape[0] < miss.shape[0]:
            raise ValueError(f"EVCache {self.name!r}: fetched must be a ({miss.shape[0]}, {self.dim}) "
                             f"{self.dtype} array, got {getattr(fetched, 'dtype', type(fetched).__name__)} "
                             f"{getattr(fetched, 'shape', '')}")
        if not isinstance(out, np.ndarray) or out.shape != (offsets.shape[0] - 1, self.dim) \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"EVCache {self.name!r}: out must be a writeable C-contiguous array of "
                             f"shape ({offsets.shape[0] - 1}, {self.dim}), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        if weights is not None and (not isinstance(weights, np.ndarray) or weights.shape != inv.shape):
            raise ValueError(f"EVCache {self.name!r}: weights must be one per lookup ({inv.shape[0]}), "
                             f"got {getattr(weights, 'shape', type(weights).__name__)}")
        fetched = np.ascontiguousarray(fetched)
        src = self._sources.get(elem.name)
        if src is None:
            src = self._sources[elem.name] = kernel_source(self._values_view, elem)
        with self._lock:
            code, bad = _pool_admit_kernel(src, kernel_source(fetched, elem), self._row_view(fetched),
                                           uniq, inv, loc, miss, offsets, weights, out,
                                           self.admit_threshold, self.n_rows, self._htab, self._kb,
                                           self._values, self._ref, self._slot_key, self._counters,
                                           self._sketch, self._st, -1 if inserts is None else int(inserts),
                                           bool(checked))
            self._start_counting()
        if bad >= 0:
            self._bad_index(uniq[miss], bad)
        return code

    def invalidate(self, indices) -> int:
        """Drop ``indices`` from the cache (e.g. after the table was rewritten). Returns how many
        were cached. Counters are left alone."""
        keys = self._keys(indices, "invalidate")
        with self._lock:
            r = _invalidate_kernel(keys, self.n_rows, self._htab, self._kb, self._values,
                                   self._ref, self._slot_key, self._st)
        if r < 0:
            self._bad_index(keys, -r - 1)
        return int(r)

    def contains(self, indices) -> np.ndarray:
        """Which of ``indices`` are cached, without touching recency, counters or stats."""
        keys = self._keys(indices, "contains")
        res = np.empty(keys.shape[0], dtype=np.bool_)
        _contains_kernel(keys, self._htab, self._kb, res)
        res &= (keys >= 0) & (keys < self.n_rows)
        return res

    def counters(self, indices) -> np.ndarray:
        """The admission counters (0..3) of ``indices``, read-only introspection."""
        keys = self._keys(indices, "counters")
        if keys.size and (keys.min() < 0 or keys.max() >= self.n_rows):
            self._bad_index(keys, int(np.flatnonzero((keys < 0) | (keys >= self.n_rows))[0]))
        return (self._counters[keys >> 2] >> ((keys & 3) * 2).astype(np.uint8)) & 3

    def frequencies(self, indices) -> np.ndarray:
        """The sketch's frequency estimates (0..15) of ``indices``, read-only introspection;
        all zero in ``"filter"`` mode, which keeps no sketch."""
        keys = self._keys(indices, "frequencies")
        if keys.size and (keys.min() < 0 or keys.max() >= self.n_rows):
            self._bad_index(keys, int(np.flatnonzero((keys < 0) | (keys >= self.n_rows))[0]))
        res = np.zeros(keys.shape[0], dtype=np.int64)
        if self._sketch.size:
            with self._lock:
                _estimate_kernel(keys, self._sketch, res)
        return res

    def clear(self) -> None:
        """Empty the cache and the counters; statistics are kept (see :meth:`reset_stats`)."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._st[_EPOCH] += 1
        self._htab.fill(-1)
        self._sketch.fill(0)
        self._counting = _NO_SKETCH
        self._st[_SKETCH_ADDS] = 0
        self._slot_key.fill(-1)
        self._ref.fill(0)
        self._counters.fill(0)
        self._st[_HAND] = 0
        self._st[_SIZE] = 0
        self._st[_SINCE_DECAY] = 0

    def keys_clock(self) -> np.ndarray:
        """Cached row indices in the order the CLOCK hand reaches them (from the hand on, slot
        order, wrapping): with all reference counters zero, the next victims first (debug/tests)."""
        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        order = (int(self._st[_HAND]) + np.arange(n)) % n
        return self._slot_key[order].astype(np.int64)

    def references(self, indices) -> np.ndarray:
        """The CLOCK reference counters (0..``ref_max``) of ``indices``; -1 for a row not cached.
        Read-only introspection."""
        keys = self._keys(indices, "references")
        res = np.full(keys.shape[0], -1, dtype=np.int64)
        with self._lock:
            for j, k in enumerate(keys.tolist()):
                if 0 <= k < self.n_rows:
                    pos = _find(k, self._htab, self._kb)
                    if pos >= 0:
                        res[j] = self._ref[int(self._htab[pos]) >> self._kb]
        return res

    @property
    def ref_max(self) -> int:
        """The reference counter ceiling: 7 in ``"sketch"`` mode, 1 (second chance) in ``"filter"``."""
        return self._ref_max

    @property
    def values(self) -> np.ndarray:
        """The preallocated row store, ``(capacity, dim)`` of the table dtype (a view)."""
        return self._values_view

    def __len__(self) -> int:
        return int(self._st[_SIZE])

    @property
    def stats(self) -> dict:
        st = self._st
        lookups = int(st[_LOOKUPS])
        return {
            "lookups": lookups,
            "hits": int(st[_HITS]),
            "misses": int(st[_MISSES]),
            "hit_rate": (int(st[_HITS]) / lookups) if lookups else 0.0,
            "admissions": int(st[_ADMISSIONS]),
            "evictions": int(st[_EVICTIONS]),
            "rejected_by_filter": int(st[_REJECTED]),
            "rejected_by_sketch": int(st[_REJECTED_SKETCH]),
            "size": int(st[_SIZE]),
            "capacity": self.capacity,
            "memory_bytes": self.memory_bytes,
        }

    def reset_stats(self) -> None:
        for i in (_HITS, _MISSES, _ADMISSIONS, _EVICTIONS, _REJECTED, _REJECTED_SKETCH, _LOOKUPS):
            self._st[i] = 0

    def __repr__(self) -> str:
        return (f"EVCache(name={self.name!r}, n_rows={self.n_rows}, dim={self.dim}, "
                f"dtype={self.dtype}, capacity={self.capacity}, size={len(self)}, "
                f"admission={self.admission!r}, admit_threshold={self.admit_threshold})")

    # -- debug

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` unless the index, the slots and the CLOCK agree.

        Index: every resident is found at its entry. Robin Hood (hash index): along the probe sequence a slot after an empty one has distance 0 and
        distances grow by at most one per step. Slots:
        ``0..size-1`` are used, each once, the rest free (key -1, counter 0). CLOCK: the hand
        is on a used slot (0 when empty), no counter above ``ref_max``.
        """
        m = self._htab.shape[0]
        mask = (1 << self._kb) - 1
        size = len(self)
        occ = np.flatnonzero(self._htab != -1)
        if self.direct_index:
            assert m == self.n_rows and self._kb == 0, "direct index: one entry per table row"
            keys, slots_of = occ, self._htab[occ]
        else:
            keys = self._htab[occ] & mask
            slots_of = self._htab[occ] >> self._kb
        assert occ.size == size, f"index holds {occ.size} keys, size is {size}"
        for pos, k in zip(occ.tolist(), keys.tolist()):
            assert _find(k, self._htab, self._kb) == pos, f"key {k} at {pos} not found"
        for pos in range(0 if self.direct_index else m):
            nxt = (pos + 1) % m
            if self._htab[nxt] == -1:
                continue
            prev_d = -1 if self._htab[pos] == -1 else int(_dist(pos, self._htab[pos] & mask, m))
            assert int(_dist(nxt, self._htab[nxt] & mask, m)) <= prev_d + 1, \
                f"Robin Hood order broken at slot {nxt}"
        assert np.array_equal(np.sort(slots_of), np.arange(size)), "cache slots are not 0..size-1 once each"
        assert np.array_equal(self._slot_key[slots_of], keys), "slot->key mismatch"
        hand = int(self._st[_HAND])
        assert (hand == 0) if size == 0 else (0 <= hand < size), f"hand {hand} with {size} rows"
        assert int(self._ref[:size].max(initial=0)) <= self._ref_max, "reference counter over ref_max"
        assert not self._ref[size:].any() and (self._slot_key[size:] == -1).all(), "free slot in use"
