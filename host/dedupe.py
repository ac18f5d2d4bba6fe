"""Batch deduplication: the distinct indices of a lookup and where each lookup finds its row.

A numba open-addressing hash over one batch (sized to more than twice the batch, a power of two):
linear in the batch, no sort (``np.unique`` sorted, and cost more than the pooling).
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["dedupe", "dedupe_into"]


@numba.njit(cache=True, nogil=True)
def dedupe_into(idx, uniq, inv):
    """Fills ``uniq`` with the distinct indices of ``idx`` in first-occurrence order and ``inv``
    with each lookup's position in it; returns the number of distinct indices. Open addressing
    over a table of the smallest power of two above ``2 * len(idx)`` (at least 16). Callable
    from other kernels (the EV-Cache's lookup uses it for its hash index)."""
    n = idx.shape[0]
    m = 16
    while m <= 2 * n:
        m *= 2
    keys = np.full(m, -1, dtype=np.int64)
    pos = np.empty(m, dtype=np.int32)
    mask = np.uint64(m - 1)
    n_u = 0
    for k in range(n):
        x = np.int64(idx[k])
        s = np.int64(((np.uint64(x) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask)
        while True:
            kk = keys[s]
            if kk == x:
                inv[k] = pos[s]
                break
            if kk == -1:
                keys[s] = x
                pos[s] = n_u
                uniq[n_u] = x
                inv[k] = n_u
                n_u += 1
                break
            s = np.int64((np.uint64(s) + np.uint64(1)) & mask)
    return n_u


def dedupe(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct indices in first-occurrence order, inverse) of a validated index array."""
    n = idx.shape[0]
    uniq = np.empty(n, dtype=np.int64)
    inv = np.empty(n, dtype=np.int64)
    n_u = dedupe_into(idx, uniq, inv)
    return uniq[:n_u], inv
