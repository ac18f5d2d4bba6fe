"""Row memory on cache-line boundaries: where the host keeps rows the pooling kernels read.

numpy puts an array's data 16 bytes past a 64-byte boundary whenever the allocator serves it
from ``mmap`` (every array above ~128 KiB, so every real table). A 256-byte row (64 fp32) then
spans five cache lines instead of four, and every 64-byte vector load of it splits across two:
measured on this project's benchmark machine, the dram path's SUM pooling over four 100k x 64
fp32 tables cost 32.5-35.3 ns per lookup with the tables so placed and 17.8-18.4 ns with the
same tables on cache-line boundaries (4,096 bags of 20 uniform lookups, one thread; 20.8-24.0
against 38.9-43.8 at 128 bags). FBGEMM's weights sit on such boundaries (torch's CPU allocator
aligns to 64), so the host must too to be compared fairly.

Everything that holds rows for a kernel comes from here: the dram backend's tables, the
EV-Cache's row storage, the driver's result buffers, the store's pooled outputs.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["CACHE_LINE", "empty_rows", "zeros_rows", "on_cache_lines", "is_on_cache_line",
           "available_memory"]

#: bytes of a CPU cache line, the boundary rows start on
CACHE_LINE = 64


@numba.njit(cache=True, nogil=True)
def _address(arr):
    # an array's data address; a fifth of what ``arr.ctypes.data`` costs from Python, which
    # matters to buffers made every batch
    return arr.ctypes.data


def is_on_cache_line(arr: np.ndarray) -> bool:
    """Whether ``arr``'s first byte is on a cache-line boundary."""
    return arr.ctypes.data % CACHE_LINE == 0


def empty_rows(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose first byte is on a cache-line boundary (the
    memory is a slice of a slightly larger allocation, which the array keeps alive; an empty
    array has no byte to place)."""
    dt = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + CACHE_LINE, dtype=np.uint8)
    start = -_address(raw) % CACHE_LINE
    return raw[start:start + nbytes].view(dt).reshape(shape)


def zeros_rows(shape, dtype) -> np.ndarray:
    """:func:`empty_rows`, zero-filled."""
    out = empty_rows(shape, dtype)
    out.fill(0)
    return out


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux ``MemAvailable``), or None
    where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def on_cache_lines(arr: np.ndarray, max_copy_bytes: int | None = None) -> np.ndarray:
    """``arr`` itself when it is C-contiguous and starts on a cache-line boundary, else a copy
    that is (same dtype, shape and values). ``max_copy_bytes``: a contiguous array larger than
    this is returned as it is instead of copied (None: no limit)."""
    if arr.flags.c_contiguous and (is_on_cache_line(arr) or
                                   (max_copy_bytes is not None and arr.nbytes > max_copy_bytes)):
        return arr
    out = empty_rows(arr.shape, arr.dtype)
    out[...] = arr
    return out
