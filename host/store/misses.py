"""The miss list of a cached lookup: which distinct indices the backend must read, in the order
it reads them (ascending row: file offsets and device pages in order), in one numba pass instead
of numpy's mask, gather and stable argsort (~6 us instead of ~14 us for 300 distinct rows)."""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["miss_order"]


@numba.njit(cache=True, nogil=True)
def _miss_order_kernel(uniq, slots, out):
    """Positions ``u`` with ``slots[u] < 0`` into ``out``, ordered by ``uniq[u]`` (distinct, so
    the order is total); returns how many, or -1 when a missed row index is not below 2**31.
    Keys and positions are packed into one int64 (row index above bit 32, position below) so
    one sort orders both."""
    n = 0
    for u in range(slots.shape[0]):
        if slots[u] < 0:
            k = uniq[u]
            if k >= 2147483648:
                return -1
            out[n] = (k << 32) | u
            n += 1
    packed = np.sort(out[:n])
    for i in range(n):
        out[i] = packed[i] & 0xFFFFFFFF
    return n


def miss_order(uniq: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Positions in ``uniq`` (distinct, validated, non-negative row indices) whose ``slots``
    entry is negative (a cache miss), in ascending ``uniq`` order, as int64."""
    out = np.empty(slots.shape[0], np.int64)
    n = _miss_order_kernel(uniq, slots, out) if uniq.shape[0] < 1 << 32 else -1
    if n >= 0:
        return out[:n]
    miss = np.flatnonzero(slots < 0)   # rows beyond 2**31: numpy's sort
    return miss[np.argsort(uniq[miss], kind="stable")]
