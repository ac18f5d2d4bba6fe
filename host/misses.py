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
    by ``uniq[u]`` (distinct, so the order is total); returns how many. An LSD radix sort on
    the row index, 8 bits a pass, as many passes as the largest missed row needs (3 for a
    table of 100k rows): linear in the misses, about 2.5x faster than a comparison sort of
    the few hundred misses of a batch (measured). Callable from other kernels."""
    n = 0
    top = 0
    for u in range(n_u):
        if slots[u] < 0:
            out[n] = u
            k = uniq[u]
            top = k if k > top else top
            n += 1
    if n < 2:
        return n
    tmp = np.empty(n, np.int64)
    count = np.empty(256, np.int64)
    src, dst = out[:n], tmp
    shift = 0
    passes = 0
    while True:
        count[:] = 0
        for i in range(n):
            count[(uniq[src[i]] >> shift) & 255] += 1
        total = 0
        for b in range(256):
            c = count[b]
            count[b] = total
            total += c
        for i in range(n):         # stable: equal digits keep the previous passes' order
            p = src[i]
            b = (uniq[p] >> shift) & 255
            dst[count[b]] = p
            count[b] += 1
        src, dst = dst, src
        shift += 8
        passes += 1
        if shift >= 64 or (top >> shift) == 0:
            break
    if passes & 1:                 # the result is in tmp
        for i in range(n):
            out[i] = tmp[i]
    return n


def miss_order(uniq: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Positions in ``uniq`` (distinct, validated, non-negative row indices) whose ``slots``
    entry is negative (a cache miss), in ascending ``uniq`` order, as int64."""
    out = np.empty(slots.shape[0], np.int64)
    return out[:miss_order_into(uniq, slots, slots.shape[0], out)]
