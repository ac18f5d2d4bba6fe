"""A plain LRU (cachetools) with the EV-Cache's batched API: the cache peer without an admission
filter, and the factory that puts the chosen cache in front of a table."""
from __future__ import annotations

import numpy as np

from evssd.host.store.errors import StoreInputError
from evssd.host.store.tables import TableInfo

__all__ = ["PlainLRU", "make_cache"]


class PlainLRU:
    """A plain LRU (cachetools) with the EV-Cache's batched API: the peer without admission filter.

    Admits every miss; capacity = budget_bytes // row_bytes rows.
    """

    def __init__(self, n_rows: int, dim: int, dtype, budget_fraction: float = 0.01,
                 budget_bytes: int | None = None, name: str = ""):
        import cachetools
        self.dim, self.dtype, self.name = dim, np.dtype(dtype), name
        row_bytes = dim * self.dtype.itemsize
        budget = budget_bytes if budget_bytes is not None else int(n_rows * row_bytes * budget_fraction)
        self.capacity = max(1, budget // row_bytes)
        self._lru = cachetools.LRUCache(maxsize=self.capacity)
        self._c = {"lookups": 0, "hits": 0, "misses": 0, "admissions": 0, "evictions": 0}

    def lookup(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(indices), dtype=bool)
        get = self._lru.get
        for k, i in enumerate(indices.tolist()):
            row = get(i)
            if row is not None:
                out[k] = row
                hit[k] = True
        n_hit = int(hit.sum())
        self._c["lookups"] += len(indices)
        self._c["hits"] += n_hit
        self._c["misses"] += len(indices) - n_hit
        return hit

    def admit(self, indices: np.ndarray, rows: np.ndarray) -> None:
        lru = self._lru
        for k, i in enumerate(indices.tolist()):
            if i not in lru and len(lru) >= self.capacity:
                self._c["evictions"] += 1
            lru[i] = rows[k].copy()
            self._c["admissions"] += 1

    @property
    def stats(self) -> dict:
        return dict(self._c, capacity_rows=self.capacity, resident_rows=len(self._lru))




def make_cache(kind, info: TableInfo, fraction: float):
    if callable(kind) and not isinstance(kind, str):
        return kind(info, fraction)
    if kind in (None, "evcache"):
        from evssd.host.cache import EVCache
        try:
            return EVCache(info.rows, info.width, info.dtype, budget_fraction=fraction, name=info.name)
        except ValueError as exc:
            if "holds no row" not in str(exc):
                raise
            # a tiny table whose budget cannot pay for one entry: keep one row rather than fail
            return EVCache(info.rows, info.width, info.dtype, capacity=1, name=info.name)
    if kind == "lru":
        return PlainLRU(info.rows, info.width, info.dtype, budget_fraction=fraction, name=info.name)
    raise StoreInputError(f"unknown cache kind {kind!r} (expected 'evcache', 'lru' or a callable)")

