"""The miss list of a cached lookup: which distinct indices the backend must read, in the order
it reads them (ascending row: file offsets and device pages in order), in one numba pass instead
of numpy's mask, gather and stable argsort. A leaf module: the EV-Cache's lookup kernel builds
the list in its own call (:func:`miss_order_into`), and the store's tests check it here."""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["miss_order", "miss_order_into"]


@numba.njit(cache=True, nogil=True)
def miss_order_into(uniq, slots, n_u, out):
    """Positions ``u < n_u`` with ``slots[u] < 0`` into ``out`` (at least ``n_u`` long), ordered
    by ``uniq[u]`` (distinct, so the order is total); returns how many. Keys below 2**31 and
    positions are packed into one int64 (row index above bit 32, position below) so one sort
    orders both; larger keys take an argsort. Callable from other kernels."""
    n = 0
    wide = False
    for u in range(n_u):
        if slots[u] < 0:
            k = uniq[u]
            wide |= k >= 2147483648
            out[n] = (k << 32) | u if k < 2147483648 else u
            n += 1
    if not wide:
        packed = np.sort(out[:n])
        for i in range(n):
            out[i] = packed[i] & 0xFFFFFFFF
        return n
    pos = np.empty(n, np.int64)
    keys = np.empty(n, np.int64)
    for i in range(n):
        pos[i] = out[i] & 0xFFFFFFFF      # a packed entry's or a bare position
        keys[i] = uniq[pos[i]]
    order = np.argsort(keys)
    for i in range(n):
        out[i] = pos[order[i]]
    return n


def miss_order(uniq: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Positions in ``uniq`` (distinct, validated, non-negative row indices) whose ``slots``
    entry is negative (a cache miss), in ascending ``uniq`` order, as int64."""
    out = np.empty(slots.shape[0], np.int64)
    return out[:miss_order_into(uniq, slots, slots.shape[0], out)]
