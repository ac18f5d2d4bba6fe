"""Batch deduplication: the distinct indices of a lookup and where each lookup finds its row.

A numba open-addressing hash over one batch (sized to more than twice the batch, a power of two):
linear in the batch, no sort (``np.unique`` sorted, and cost more than the pooling).
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["dedupe"]


@numba.njit(cache=True, nogil=True)
def _dedupe_kernel(idx, keys, uniq, inv):
    """Open addressing over ``keys`` (power-of-two size > 2 * len(idx), any contents): fills
    ``uniq`` with the distinct indices in first-occurrence order and ``inv`` with each lookup's
    position in it; returns the number of distinct indices."""
    m = keys.shape[0]
    for s in range(m):
        keys[s] = -1
    mask = np.uint64(m - 1)
    pos = np.empty(m, dtype=np.int32)
    n_u = 0
    for k in range(idx.shape[0]):
        x = np.int64(idx[k])
        h = (np.uint64(x) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        s = np.int64(h & mask)
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
            s = (s + 1) & (m - 1)
    return n_u


def dedupe(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct indices in first-occurrence order, inverse) of a validated index array."""
    n = idx.shape[0]
    m = 1 << max(4, (2 * n).bit_length())
    keys = np.empty(m, dtype=np.int64)
    uniq = np.empty(n, dtype=np.int64)
    inv = np.empty(n, dtype=np.int64)
    n_u = _dedupe_kernel(idx, keys, uniq, inv)
    return uniq[:n_u], inv

