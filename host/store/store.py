"""EmbeddingStore: one lookup API over interchangeable storage backends.

Backends (``backend=`` in :meth:`EmbeddingStore.from_arrays`, each a module of this package that
creates itself from the tables and takes its own options):

``dram`` (:mod:`.dram`)
    every row in host memory: the ideal every other backend is measured against.
``file`` (:mod:`.file`)
    the table in a table file (:mod:`.tablefile`) read through the OS with ``os.pread``;
    ``file_mode="page"`` reads the whole page(s) holding a row (the block-SSD baseline),
    ``file_mode="row"`` only the row's bytes; ``direct=True`` (O_DIRECT), ``io_threads``;
    every row read is checked against its CRC-32 (``verify``).
``evssd`` (:mod:`.evssd`)
    the EV-SSD through :class:`evssd.host.device.Device` (any transport); without a cache,
    unweighted bags of the device's element types are pooled on the device.
``rocksdb`` (:mod:`.rocksdb`)
    rows in RocksDB (rocksdict): the SSD tier of FBGEMM SSD-TBE and HugeCTR HPS.

Each table can be fronted by the EV-Cache (:class:`evssd.host.cache.EVCache`, a fraction of the
table, 1% by default for every backend but ``dram``) or a plain LRU (:class:`.lru.PlainLRU`).

Pooled results follow :mod:`evssd.host.pooling` bit for bit on every path, cache on or off, in
the pipeline or not. Without a cache, a table in host memory is pooled straight from the table by
one fused gather+pool kernel; a backend that pools (the EV-SSD) pools the bags it can; every
other lookup deduplicates its indices (:mod:`evssd.host.dedupe`), serves what the cache holds, reads each
distinct miss once, admits the misses to the cache and pools the distinct rows; a pooled lookup
through an EV-Cache takes the hits' cache slots instead of copying their rows and pools from the
cache's row storage and the fetched misses in one kernel (:func:`evssd.host.pooling.pool_two_sources`);
a table whose rows were all cached is pooled from the cache's rows in the lookup's own call
(:meth:`evssd.host.cache.EVCache.lookup_pool`). Every input is
validated before any I/O; errors name the table, the argument and the position.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numba
import numpy as np

from evssd.host import pooling
from evssd.host.rowmem import empty_rows
from evssd.host.store.backend import Backend
from evssd.host.dedupe import dedupe
from evssd.host.store.dram import DramBackend
from evssd.host.store.errors import StoreClosedError, StoreError, StoreInputError
from evssd.host.store.evssd import EvssdBackend
from evssd.host.store.file import FileBackend
from evssd.host.store.lru import make_cache
from evssd.host.store.rocksdb import RocksDBBackend
from evssd.host.store.tablefile import open_table_file
from evssd.host.store.tables import TableInfo, check_table, check_table_name, table_info
from evssd.host.store.tablethreads import TableThreads

__all__ = ["EmbeddingStore", "BACKENDS", "BAG_PARALLEL_MIN_LOOKUPS", "pool_deduplicated"]

def pool_deduplicated(rows: np.ndarray, inv: np.ndarray, offsets: np.ndarray, mode: str = "sum",
                      elem: str | None = None, per_sample_weights=None) -> np.ndarray:
    """Pool bags over deduplicated rows: bag b pools ``rows[inv[offsets[b]:offsets[b+1]]]`` in
    order, by :mod:`evssd.host.pooling`'s definition. ``elem`` defaults to the rows' dtype."""
    from evssd.host.elements import ELEMS, elem_of_dtype
    el = ELEMS[elem] if elem else elem_of_dtype(rows.dtype)
    return pooling.pool(rows, el, inv, offsets, per_sample_weights=per_sample_weights, mode=mode)


#: with ``parallel=True``, one table's bags are pooled on numba's threads only from this many
#: lookups on: starting a parallel region costs ~30-40 us when numba's OpenMP threads sleep
#: between regions (OMP_WAIT_POLICY=PASSIVE, which a process sharing libgomp with torch needs),
#: a 128-bag table's whole pooling; from ~10k lookups (512 bags of 20) it pays (measured on 2
#: cores: 0.81x at 2,560 lookups, 1.23x at 10,240, 1.96x at 82k)
BAG_PARALLEL_MIN_LOOKUPS = 8192

#: the backends ``from_arrays`` can build, by name
BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (DramBackend, FileBackend, RocksDBBackend, EvssdBackend)}


def _index_array(info, a, what: str) -> np.ndarray:
    """A contiguous int32/int64 index array (others converted); errors name table and argument."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
        if a.size == 0:
            a = a.astype(np.int64)
    if a.ndim != 1:
        raise StoreInputError(f"table {info.name!r}: {what} must be 1-D, got shape {a.shape}")
    if a.dtype != np.int64 and a.dtype != np.int32:
        if a.dtype.kind not in "iu":
            raise StoreInputError(f"table {info.name!r}: {what} must be integers, got dtype {a.dtype}")
        if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
            pos = int(np.argmax(a))
            raise StoreInputError(f"table {info.name!r}: {what[:-1] if what.endswith('s') else what} "
                                  f"{int(a[pos])} at position {pos} out of range")
        a = a.astype(np.int64)
    elif not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


_GATHER, _DIRECT, _DEVICE, _ROWS, _SLOTS, _CACHED = "gather", "direct", "device", "rows", "slots", "cached"


@dataclass
class _Plan:
    """One table lookup between its phases (prepare -> fetch -> finish); see :mod:`.pipeline`.

    ``kind``: ``direct`` pools straight from a table in memory; ``device`` lets the backend pool;
    ``rows`` deduplicates, serves the cache, fetches the misses and pools the distinct rows;
    ``slots`` (pooled lookups through an EV-Cache) deduplicates, takes the hits' cache slots
    without copying their rows, fetches the misses and pools from both sources in one kernel;
    ``cached``: every row was in the EV-Cache, which pooled the bags in the lookup's call."""
    info: TableInfo
    indices: np.ndarray          # validated int32/int64, request order
    offsets: np.ndarray | None   # validated [B+1] or None for gather
    mode: str | None
    kind: str
    weights: np.ndarray | None = None   # float32 per lookup, or None
    out: np.ndarray | None = None       # output buffer: the caller's (sum only), or the lookup's
    uniq: np.ndarray | None = None      # distinct indices (first-occurrence order)
    inv: np.ndarray | None = None       # indices == uniq[inv]
    rows: np.ndarray | None = None      # [len(uniq), width] being filled
    miss: np.ndarray | None = None      # positions in uniq not served by the cache
    fetched: np.ndarray | None = None
    pooled: np.ndarray | None = None    # result pooled by the backend or the cache
    slots: np.ndarray | None = None     # int32 per distinct index: cache slot, -1 for a miss
    epoch: int = -1                     # the cache's epoch before the slots were looked up
    inserts: int | None = None          # the cache's insert count then (EVCache.inserts)
    slot_of: np.ndarray | None = None   # int32 per lookup: slots[inv]


@numba.njit(cache=True, nogil=True)
def _locate(loc, miss, slot_key, uniq, stale, check):
    """Turn the cache slots of a ``slots`` plan into pooling locations: miss i (in fetch order)
    is ``-1 - i``; with ``check``, a hit whose slot no longer holds its row is listed in
    ``stale`` (positions in ``uniq``). Returns how many are stale. (Without ``check`` -- the
    cache's epoch is unchanged since the lookup -- no slot can be stale, and the pass that reads
    every hit's slot key, a cache miss each on a large cache, is skipped.)"""
    for i in range(miss.shape[0]):
        loc[miss[i]] = -1 - i
    n = 0
    if not check:
        return 0
    for u in range(loc.shape[0]):
        s = loc[u]
        if s >= 0 and slot_key[s] != uniq[u]:
            stale[n] = u
            n += 1
    return n


_AUTO = object()


class EmbeddingStore:
    """Gather and pooled lookups over one backend, each table optionally fronted by a cache.

    Pooled results follow :mod:`evssd.host.pooling` bit for bit on every path. Without a cache, a
    table held in memory (``dram``) is pooled straight from the table by one fused kernel; a
    backend that pools (the EV-SSD) pools unweighted bags of the device's element types itself;
    every other lookup deduplicates, serves the cache, fetches the distinct misses once and
    pools on the host. With ``parallel=True``, the tables of a :meth:`lookup_many` batch run on
    threads (each table's dedupe, cache lookup and pooling on one;
    :class:`.tablethreads.TableThreads`), and a single table's bags are pooled on numba's
    threads when the table has enough lookups to pay for a parallel region.

    Safe to call from several threads: each table's cache has its own lock (held for the
    lookup and for the admission, not across the I/O), and the calls into a backend that is
    not thread-safe (``evssd``, ``rocksdb``) are serialised.
    """

    def __init__(self, tables: Mapping[str, TableInfo], backend: Backend, *,
                 cache_fraction: float | None = 0.01, cache="evcache", parallel: bool = False):
        self.tables: dict[str, TableInfo] = dict(tables)
        #: use ``numba.get_num_threads()`` threads: a batch's tables side by side, else one large
        #: table's bags (prange); worth it on idle cores, harmful on a loaded machine, so opt-in
        self.parallel = bool(parallel)
        self.backend = backend
        self.cache_fraction = cache_fraction
        self.caches = {}
        if cache_fraction is not None:
            if not 0 < cache_fraction <= 1:
                raise StoreInputError(f"cache_fraction must be in (0, 1] or None, got {cache_fraction}")
            for name, info in self.tables.items():
                self.caches[name] = make_cache(cache, info, cache_fraction)
        #: tables whose cache was made for exactly the table's rows and width (every cache the
        #: store makes; a caller's factory may make another): the batches the store validated
        #: need no second check in such a cache's lookup
        self._cache_fits = {n: getattr(c, "n_rows", None) == self.tables[n].rows and
                            getattr(c, "dim", None) == self.tables[n].width for n, c in self.caches.items()}
        self._arrays = {} if self.caches else \
            {n: a for n, a in ((n, backend.table_array(i)) for n, i in self.tables.items()) if a is not None}
        self._lookups = 0
        self._batches = 0
        self._io_s = 0.0  # wall time inside the backend's reads (device calls included)
        self._lock = threading.Lock()
        self._cache_locks = {name: threading.Lock() for name in self.caches}
        self._io_lock = contextlib.nullcontext() if backend.thread_safe else threading.Lock()
        self._threads = TableThreads()

    def _table_threads(self, n_tables: int) -> int:
        """Threads for a batch's per-table work: with ``parallel``, one per numba thread (the
        tables' caches and kernels are independent, and the kernels release the GIL); else 1.
        One hand-off per worker per batch, where pooling each table's bags on numba's threads
        costs a parallel region per table."""
        if not self.parallel or n_tables < 2:
            return 1
        return numba.get_num_threads()

    def _bag_parallel(self, n_lookups: int) -> bool:
        """Pool one table's bags on numba's threads? Only for a table with at least
        :data:`BAG_PARALLEL_MIN_LOOKUPS` lookups, and not inside a table thread (the tables
        already share the cores)."""
        return self.parallel and n_lookups >= BAG_PARALLEL_MIN_LOOKUPS and numba.get_num_threads() > 1 \
            and not self._threads.on_worker

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, tables: Mapping[str, object], backend: str = "dram", *,
                    cache_fraction=_AUTO, cache="evcache", parallel: bool = False,
                    **options) -> "EmbeddingStore":
        """Build a store holding ``tables``: name -> a [rows, dim] fp32/fp16/int8/int32 array, a
        ``.npy`` path, a torch tensor, an ``nn.Embedding``/``nn.EmbeddingBag``, or a
        :class:`RowwiseInt8` (FBGEMM's row-wise INT8 rows).

        ``cache_fraction``: per-table cache budget as a fraction of the table (None: no cache);
        the default is 0.01 for every backend but ``dram``, which has nothing to cache.
        ``cache``: "evcache" (EV-Cache), "lru" (:class:`PlainLRU`) or ``f(TableInfo, fraction)``.
        ``parallel``: use numba's threads -- with caches, a batch's tables side by side, else
        each table's bags (results are the same bits).
        ``dram`` pools straight from the arrays, each from one that starts on a cache line: a
        table that does not (numpy's large arrays start 16 bytes past one) is copied once (unless
        the copy would take more than half the memory available: then it is served where it is,
        slower, with a warning), so to serve a large table in place give it as built by
        :func:`evssd.host.rowmem.empty_rows` or as a ``.npy`` file or
        ``np.load(..., mmap_mode="r")`` array (the format aligns the data to 64 bytes).

        ``options`` go to the backend's ``create`` (an unknown one is an error naming it):

        - ``file``: ``path`` (directory, created; default a temporary one removed by
          :meth:`close`), ``file_mode`` ("row"/"page"), ``page_size``, ``direct``,
          ``io_threads``, ``direct_align``, ``verify``, ``file_options`` (a dict of the same).
        - ``rocksdb``: ``path`` (as for ``file``).
        - ``evssd``: ``device`` (an open :class:`evssd.host.device.Device`; default the model,
          sized to the tables), ``layout_options`` (to :meth:`evssd.host.layout.Layout.plan`),
          ``device_pooling`` (default True).
        """
        if not tables:
            raise StoreInputError("no tables given")
        be_cls = BACKENDS.get(backend) if isinstance(backend, str) else None
        if be_cls is None:
            raise StoreInputError(f"unknown backend {backend!r} (expected {', '.join(BACKENDS)})")
        be_cls.check_options(options)
        checked = {}
        for n, src in tables.items():
            name = check_table_name(n)
            arr, el = check_table(name, src)
            checked[name] = (arr, el, src if not isinstance(src, np.ndarray) else arr)
        infos = {n: table_info(n, a, el) for n, (a, el, _) in checked.items()}
        if cache_fraction is _AUTO:
            cache_fraction = None if backend == "dram" else 0.01
        be = be_cls.create(checked, **options)
        try:
            return cls(infos, be, cache_fraction=cache_fraction, cache=cache, parallel=parallel)
        except BaseException:
            be.close()
            raise

    @classmethod
    def from_files(cls, files: Mapping[str, str | os.PathLike], *, file_mode: str = "row",
                   cache_fraction: float | None = 0.01, cache="evcache", **file_options) -> "EmbeddingStore":
        """Open existing table files (name -> path) with the ``file`` backend (``file_options``:
        ``direct``, ``io_threads``, ``direct_align``, ``verify``; see :class:`FileBackend`)."""
        tfs = {check_table_name(str(n)): open_table_file(p) for n, p in files.items()}
        unknown = sorted(set(file_options) - {"direct", "io_threads", "direct_align", "verify"})
        if unknown:
            raise StoreInputError(f"from_files takes no option {', '.join(map(repr, unknown))}")
        be = FileBackend(tfs, mode=file_mode, **file_options)
        return cls._over(be, cache_fraction, cache)

    @classmethod
    def from_rocksdb(cls, path, *, cache_fraction: float | None = 0.01, cache="evcache",
                     block_cache_bytes: int | None = None) -> "EmbeddingStore":
        """Open a RocksDB database written by ``from_arrays(..., backend="rocksdb", path=...)``
        (``block_cache_bytes``: see :class:`RocksDBBackend`)."""
        if not Path(path).exists():
            raise StoreInputError(f"rocksdb {path}: no such database")
        be = RocksDBBackend(path, block_cache_bytes=block_cache_bytes)
        try:
            be.infos = be.table_infos()
        except BaseException:
            be.close()
            raise
        if not be.infos:
            be.close()
            raise StoreInputError(f"rocksdb {path}: holds no evssd tables")
        return cls._over(be, cache_fraction, cache)

    @classmethod
    def from_device(cls, device, layout, *, cache_fraction: float | None = 0.01,
                    cache="evcache") -> "EmbeddingStore":
        """Serve a device that already holds ``layout`` (a Layout or its JSON path/text).
        (An int8_rowwise table comes back as int8 rows of dim + 4: the layout does not record
        host-only element types.)"""
        from evssd.host.layout import Layout
        if not isinstance(layout, Layout):
            layout = Layout.load(layout)
        layout.configure(device)
        return cls._over(EvssdBackend(device, layout), cache_fraction, cache)

    @classmethod
    def _over(cls, be: Backend, cache_fraction, cache) -> "EmbeddingStore":
        try:
            return cls(be.table_infos(), be, cache_fraction=cache_fraction, cache=cache)
        except BaseException:
            be.close()
            raise

    def close(self) -> None:
        """Close the backend (and remove the directory it created, if any). Idempotent; every
        lookup afterwards raises :class:`StoreClosedError`."""
        self._closed = True
        self._threads.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- validation -----------------------------------------------------------------------------

    def _info(self, table) -> TableInfo:
        if getattr(self, "_closed", False):
            raise StoreClosedError(f"the store is closed (its {self.backend.name} backend was closed); "
                                   f"open it again to look up {table!r}")
        info = self.tables.get(table)
        if info is None:
            raise StoreInputError(f"unknown table {table!r} (tables: {', '.join(map(repr, self.tables))})")
        return info

    def _check(self, info: TableInfo, indices, offsets, weights, mode) -> tuple:
        """Validated (indices, offsets, weights) of one request; errors name table and position."""
        idx = _index_array(info, indices, "indices")
        if mode is None:
            code = pooling.check_indices(info.rows, idx)
            if code != -1:
                raise StoreInputError(f"table {info.name!r}: {pooling.describe_error(code, idx, None, info.rows)}")
            return idx, None, None
        offs = _index_array(info, offsets, "offsets")
        if offs.size < 1:
            raise StoreInputError(f"table {info.name!r}: offsets must be 1-D with B+1 >= 1 entries, "
                                  f"got shape {offs.shape}")
        code = pooling.check_bags(info.rows, idx, offs)
        if code != -1:
            raise StoreInputError(f"table {info.name!r}: {pooling.describe_error(code, idx, offs, info.rows)}")
        w = None
        if weights is not None:
            if mode != "sum":
                raise StoreInputError(f"table {info.name!r}: per_sample_weights need mode='sum', got {mode!r}")
            try:
                w = pooling.check_weights(weights, idx.size)
            except pooling.PoolingError as exc:
                raise StoreInputError(f"table {info.name!r}: {exc}") from None
        return idx, offs, w

    def _check_out(self, info: TableInfo, out, n_bags: int, weighted: bool, mode) -> np.ndarray | None:
        if out is None:
            return None
        dtype = np.dtype(np.float32) if weighted else info.acc_dtype
        shape = (n_bags, info.dim)
        if mode != "sum" or not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise StoreInputError(f"table {info.name!r}: out must be a writeable C-contiguous {dtype} array "
                                  f"of shape {shape} (mode 'sum'), got {getattr(out, 'dtype', type(out).__name__)} "
                                  f"{getattr(out, 'shape', '')}")
        return out

    # -- the three phases of a lookup (the pipeline runs them on different threads) -------------

    def _plan(self, info: TableInfo, idx, offs, w, mode, out=None) -> _Plan:
        """Choose the path of one validated request and serve what the cache holds (CPU work)."""
        if mode is not None and info.name in self._arrays:
            return _Plan(info, idx, offs, mode, _DIRECT, w, out)
        if mode is None and info.name in self._arrays:
            return _Plan(info, idx, None, None, _GATHER, None, None)
        if mode is not None and not self.caches and w is None and self.backend.pools(info):
            return _Plan(info, idx, offs, mode, _DEVICE, None, out)
        cache = self.caches.get(info.name)
        if mode is not None and cache is not None and hasattr(cache, "lookup_dedupe"):
            # dedupe and cache lookup in one pass over the batch (EVCache.lookup_dedupe)
            n_bags = offs.size - 1
            fuse = hasattr(cache, "lookup_pool") and not info.el.extra and not self._bag_parallel(idx.size)
            if fuse:   # an all-hit batch is pooled from the cache rows in the lookup's call
                dst = out if out is not None else \
                    empty_rows((n_bags, info.dim), np.float32 if w is not None else info.acc_dtype)
            with self._cache_locks[info.name]:
                epoch = cache.epoch
                inserts = getattr(cache, "inserts", None)
                if fuse:
                    # validated by _check (check_bags against this table): not again in a cache
                    # made for the table
                    pooled, uniq, inv, slots, slot_of, miss = cache.lookup_pool(
                        idx, offs, dst, info.el, w, checked=self._cache_fits[info.name])
                    if pooled:
                        return _Plan(info, idx, offs, mode, _CACHED, w, out, pooled=dst)
                    out = dst   # the finish pools into the buffer made for the lookup
                else:   # the misses come in ascending row order (file offsets, device pages)
                    uniq, inv, slots, slot_of, miss = cache.lookup_dedupe(idx)
            return _Plan(info, idx, offs, mode, _SLOTS, w, out, uniq, inv, None, miss, slots=slots,
                         epoch=epoch, inserts=inserts, slot_of=slot_of)
        uniq, inv = dedupe(idx)
        rows = empty_rows((uniq.size, info.width), info.dtype)
        if cache is not None and uniq.size:
            with self._cache_locks[info.name]:
                hit = np.asarray(cache.lookup(uniq, rows), dtype=bool)
            miss = np.flatnonzero(~hit)
        else:
            miss = np.arange(uniq.size)
        if miss.size > 1:  # ascending row order for the backend (file offsets, device pages)
            miss = miss[np.argsort(uniq[miss], kind="stable")]
        return _Plan(info, idx, offs, mode, _ROWS, w, out, uniq, inv, rows, miss)

    def _prepare(self, table, indices, offsets=None, mode: str | None = None, weights=None, out=None) -> _Plan:
        """Validate one request and plan it."""
        info = self._info(table)
        if mode not in (None, "sum", "mean"):
            raise StoreInputError(f"table {info.name!r}: pooling mode must be 'sum' or 'mean', got {mode!r}")
        idx, offs, w = self._check(info, indices, offsets, weights, mode)
        out = self._check_out(info, out, offs.size - 1, w is not None, mode) if offs is not None else None
        return self._plan(info, idx, offs, w, mode, out)

    def _fetch(self, plan: _Plan) -> _Plan:
        """Backend I/O for the misses (releases the GIL in pread / the driver)."""
        self._fetch_many({plan.info.name: plan})
        return plan

    def _fetch_many(self, plans: Mapping[str, _Plan]) -> None:
        """Backend I/O for every table of a batch in one go (the device overlaps the commands)."""
        jobs, targets = [], []
        for p in plans.values():
            if p.kind == _DEVICE:
                if p.indices.size == 0:  # nothing for the device to do: every bag is empty
                    p.pooled = np.zeros((p.offsets.size - 1, p.info.dim), p.info.acc_dtype)
                    continue
                jobs.append(("pooled", p.info, p.indices, p.offsets))
                targets.append(p)
            elif p.kind in (_ROWS, _SLOTS) and p.miss.size:
                jobs.append(("rows", p.info, p.uniq[p.miss], None))
                targets.append(p)
        if not jobs:
            return
        t0 = time.perf_counter()
        with self._io_lock:
            results = self.backend.read_many(jobs)
        dt = time.perf_counter() - t0
        with self._lock:
            self._io_s += dt
        for p, res in zip(targets, results):
            if p.kind == _DEVICE:
                p.pooled = res
            else:
                p.fetched = res

    def _pool(self, plan: _Plan, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
        info = plan.info
        n_bags = plan.offsets.size - 1
        out = plan.out
        if out is None:
            out = empty_rows((n_bags, info.dim), np.float32 if plan.weights is not None else info.acc_dtype)
        parallel = self._bag_parallel(idx.size)
        code = pooling.pool_into(pooling.kernel_source(src, info.el), info.el, idx, plan.offsets, out,
                                 plan.weights, parallel)
        if code != -1:  # validated before: only a backend returning the wrong rows gets here
            raise StoreError(f"table {info.name!r}: {pooling.describe_error(code, idx, plan.offsets, src.shape[0])}")
        return pooling.apply_mean(out, plan.offsets) if plan.mode == "mean" else out

    def _finish(self, plan: _Plan) -> np.ndarray:
        """Merge misses, fill the cache, gather or pool (CPU work)."""
        info = plan.info
        with self._lock:
            self._lookups += plan.indices.size
        if plan.kind in (_DIRECT, _GATHER):  # rows read straight from the backend's memory
            self.backend._count(1, plan.indices.size, plan.indices.size * info.row_bytes)
            if plan.kind == _GATHER:
                return np.take(self._arrays[info.name], plan.indices, axis=0)
            return self._pool(plan, self._arrays[info.name], plan.indices)
        if plan.kind == _DEVICE:
            out = plan.pooled
            if plan.mode == "mean":
                return pooling.apply_mean(out, plan.offsets)
            if plan.out is not None:
                plan.out[...] = out
                return plan.out
            return out
        if plan.kind == _SLOTS:
            return self._finish_slots(plan)
        if plan.kind == _CACHED:
            return pooling.apply_mean(plan.pooled, plan.offsets) if plan.mode == "mean" else plan.pooled
        if plan.fetched is not None:
            plan.rows[plan.miss] = plan.fetched
            cache = self.caches.get(info.name)
            if cache is not None:
                with self._cache_locks[info.name]:
                    cache.admit(plan.uniq[plan.miss], plan.fetched)
        if plan.mode is None:
            return plan.rows[plan.inv]
        return self._pool(plan, plan.rows, plan.inv)

    def _finish_slots(self, plan: _Plan) -> np.ndarray:
        """Pool a ``slots`` plan: hits straight from the cache's row storage, misses from the
        fetched rows, in one kernel; then admit the misses. Runs under the table's cache lock,
        so no admission moves a row while it is read; a slot another batch's admission or an
        invalidation reused since the lookup is re-read from the backend first."""
        info = plan.info
        cache = self.caches[info.name]
        el = info.el
        loc = plan.slots
        miss = plan.miss
        n_bags = plan.offsets.size - 1
        out = plan.out
        if out is None:
            out = empty_rows((n_bags, info.dim), np.float32 if plan.weights is not None else info.acc_dtype)
        if not miss.size:
            # every distinct row was a hit: pool straight from the cache's row storage with each
            # lookup's slot (the dram path's kernel, parallel over bags if asked), unless an
            # eviction or invalidation since the lookup may have moved a row
            slot_of = plan.slot_of if plan.slot_of is not None else loc[plan.inv]
            parallel = self._bag_parallel(slot_of.size)
            with self._cache_locks[info.name]:
                if cache.epoch == plan.epoch:
                    code = pooling.pool_into(pooling.kernel_source(cache.values, el), el, slot_of,
                                             plan.offsets, out, plan.weights, parallel)
                    if code != -1:  # validated before: a slot outside the cache cannot happen
                        raise StoreError(f"table {info.name!r}: pooling over cache slots failed ({code})")
                    return pooling.apply_mean(out, plan.offsets) if plan.mode == "mean" else out
        fetched = plan.fetched if plan.fetched is not None else np.empty((0, info.width), info.dtype)
        fetched = np.ascontiguousarray(fetched)
        with self._cache_locks[info.name]:
            if cache.epoch == plan.epoch and not el.extra and hasattr(cache, "pool_admit"):
                # no slot moved since the lookup: pool and admit in the cache's one call
                code = cache.pool_admit(fetched, el, plan.uniq, plan.inv, loc, miss, plan.offsets, out,
                                        plan.weights, plan.inserts, checked=True)
                if code != -1:
                    raise StoreError(f"table {info.name!r}: pooling over cache slots failed at lookup {code}")
                return pooling.apply_mean(out, plan.offsets) if plan.mode == "mean" else out
            stale = np.empty(loc.size, np.int64)
            check = cache.epoch != plan.epoch   # an eviction or invalidation since the lookup
            stale = stale[:_locate(loc, miss, cache.slot_keys, plan.uniq, stale, check)]
            if stale.size:  # rare: evicted or moved since the lookup, read them again
                stale = stale[np.argsort(plan.uniq[stale], kind="stable")]
                t0 = time.perf_counter()
                with self._io_lock:
                    again = self.backend.read_many([("rows", info, plan.uniq[stale], None)])[0]
                with self._lock:
                    self._io_s += time.perf_counter() - t0
                loc[stale] = -1 - (fetched.shape[0] + np.arange(stale.size, dtype=np.int32))
                fetched = np.concatenate([fetched, np.asarray(again, info.dtype)])
            code = pooling.pool_two_sources(pooling.kernel_source(cache.values, el),
                                            pooling.kernel_source(fetched, el), el, plan.inv, loc,
                                            plan.offsets, out, plan.weights)
            if miss.size:
                cache.admit(plan.uniq[miss], fetched[:miss.size])
        if code != -1:  # validated before: only a backend returning the wrong rows gets here
            raise StoreError(f"table {info.name!r}: pooling over cache slots failed at lookup {code}")
        return pooling.apply_mean(out, plan.offsets) if plan.mode == "mean" else out

    # -- public API -----------------------------------------------------------------------------

    def gather(self, table: str, indices) -> np.ndarray:
        """Rows ``[len(indices), width]`` of ``table`` in request order, in the stored dtype
        (int8_rowwise rows include their 4 scale/bias bytes)."""
        plan = self._prepare(table, indices)
        self._count_batch()
        return self._finish(self._fetch(plan))

    def pooled(self, table: str, indices, offsets, mode: str = "sum", *, per_sample_weights=None,
               out=None) -> np.ndarray:
        """Pooled bags ``[B, dim]``: FBGEMM ``indices`` + ``offsets[B+1]``, by the definition in
        :mod:`evssd.host.pooling`.

        sum: float32 for fp32/fp16/int8_rowwise tables, int32 for int8/int32; mean: float32.
        ``per_sample_weights`` (one float32 per index, sum only): weighted sum, float32 for every
        element type. ``out``: a C-contiguous array of the result's dtype and shape to write into
        (sum only), so that a serving loop allocates nothing per batch.
        """
        plan = self._prepare(table, indices, offsets, mode, per_sample_weights, out)
        self._count_batch()
        return self._finish(self._fetch(plan))

    def lookup_many(self, requests: Mapping[str, tuple], mode: str | None = "sum", *,
                    out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``{table: (indices, offsets[, per_sample_weights])}`` -> ``{table: pooled}``;
        ``mode=None`` gathers (offsets ignored). ``out``: optional ``{table: array}`` to pool into
        (see :meth:`pooled`). Every request is validated before the first I/O.
        """
        checked = self._check_many(requests, mode, out)
        self._count_batch()
        threads = self._table_threads(len(checked))

        def plan(c):  # a table that needs no I/O (e.g. every row cached) finishes at once
            p = self._plan(c[0], c[1], c[2], c[3], mode, c[4])
            return p, (None if self._needs_io(p) else self._finish(p))

        first = self._threads.map(plan, checked, threads)
        pending = {c[0].name: p for c, (p, r) in zip(checked, first) if r is None}
        self._fetch_many(pending)
        rest = dict(zip(pending, self._threads.map(lambda n: self._finish(pending[n]), list(pending), threads)))
        return {c[0].name: rest[c[0].name] if r is None else r for c, (_, r) in zip(checked, first)}

    @staticmethod
    def _needs_io(plan: _Plan) -> bool:
        return plan.kind == _DEVICE or (plan.kind in (_ROWS, _SLOTS) and plan.miss.size > 0)

    def _prepare_many(self, requests, mode, out=None):
        checked = self._check_many(requests, mode, out)
        plans = self._threads.map(lambda c: self._plan(c[0], c[1], c[2], c[3], mode, c[4]), checked,
                                  self._table_threads(len(checked)))
        return {c[0].name: p for c, p in zip(checked, plans)}

    def _check_many(self, requests, mode, out=None) -> list[tuple]:
        """Every request of a batch validated: (info, indices, offsets, weights, out) per table."""
        if mode not in (None, "sum", "mean"):
            raise StoreInputError(f"pooling mode must be 'sum', 'mean' or None, got {mode!r}")
        if out is not None:
            unknown = set(out) - set(requests)
            if unknown:
                raise StoreInputError(f"out names tables without a request: {sorted(map(str, unknown))}")
        checked = []
        for name, req in requests.items():
            info = self._info(name)
            if mode is None:
                indices = req[0] if isinstance(req, tuple) else req
                checked.append((info, *self._check(info, indices, None, None, None), None))
            else:
                if not isinstance(req, tuple) or len(req) not in (2, 3):
                    raise StoreInputError(f"table {name!r}: expected (indices, offsets) or (indices, offsets, "
                                          f"per_sample_weights), got {type(req).__name__}")
                idx, offs, w = self._check(info, req[0], req[1], req[2] if len(req) == 3 else None, mode)
                o = self._check_out(info, out.get(name), offs.size - 1, w is not None, mode) if out else None
                checked.append((info, idx, offs, w, o))
        return checked

    def _count_batch(self) -> None:
        with self._lock:
            self._batches += 1

    def stats(self) -> dict:
        """Lookups, batches, backend bytes/rows read and per-table cache stats (with hit rate)."""
        caches = {}
        hits = lookups = 0
        for name, c in self.caches.items():
            s = dict(c.stats)
            caches[name] = s
            hits += int(s.get("hits", 0))
            lookups += int(s.get("hits", 0)) + int(s.get("misses", 0))
        return {
            "backend": self.backend.name,
            "lookups": self._lookups,
            "batches": self._batches,
            "io_s": self._io_s,
            **self.backend.stats(),
            "cache_hit_rate": (hits / lookups) if lookups else None,
            "caches": caches,
        }

