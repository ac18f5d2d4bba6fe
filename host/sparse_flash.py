"""The functional model's flash array, allocated page by page on first program.

A device model can advertise a large flash while holding only the pages it was given:
programmed pages live in one pool (grown by doubling; the OS zero-fills its pages only when
touched) and a two-level map finds a page's pool slot: a directory entry per ``LEAF_PAGES``
LBAs points to a leaf of slot numbers, allocated when the first page of its range is
programmed. A page that was never programmed reads as zeros (slot 0 of the pool, never written),
like the zero-initialised RAMs behind the RTL's channels in simulation.

Memory: the directory (4 bytes per ``LEAF_PAGES`` pages of capacity: 64 KiB for 2**26 pages),
plus at most twice the programmed pages' bytes, plus one 16 KiB leaf per touched range of
``LEAF_PAGES`` pages (0.4% of a densely programmed range).
"""
from __future__ import annotations

import numba
import numpy as np

from evssd.host.prefetch import prefetch

__all__ = ["SparseFlash", "LEAF_PAGES", "slot_of", "gather_rows"]

LEAF_PAGES = 4096


@numba.njit(cache=True, nogil=True, inline="always")
def slot_of(directory, leaves, lba):
    """The pool slot of page ``lba`` (0, the erased page, where it was never programmed)."""
    leaf = directory[lba // LEAF_PAGES]
    return 0 if leaf < 0 else leaves[leaf, lba % LEAF_PAGES]


@numba.njit(cache=True, nogil=True)
def _slots(directory, leaves, lbas, out):
    """``out[k]`` = pool slot of ``lbas[k]`` (0 where never programmed)."""
    for k in range(lbas.shape[0]):
        out[k] = slot_of(directory, leaves, lbas[k])


#: rows ahead whose cache lines :func:`_copy_rows` prefetches before copying the current one
PREFETCH_ROWS = 8


@numba.njit(cache=True, nogil=True)
def _copy_rows(directory, leaves, pool, lbas, offsets, row_units, out, pos):
    """``out[pos[k]] = page(lbas[k])[offsets[k]:offsets[k] + row_units]`` for every k, in units
    of the arrays' item (bytes, or 32-bit words); units past the page's end read as zeros.

    Rows are scattered over the pool, so each one is a cache miss: the loop prefetches the
    cache lines of the row :data:`PREFETCH_ROWS` ahead before copying the current row, so the
    misses of several rows overlap instead of being paid one after the other."""
    page_units = pool.shape[1]
    n_rows = lbas.shape[0]
    line = max(1, 64 // pool.itemsize)           # units per 64-byte cache line
    slots = np.empty(n_rows, np.int64)
    for k in range(n_rows):
        slots[k] = slot_of(directory, leaves, lbas[k])
    for k in range(n_rows):
        a = k + PREFETCH_ROWS
        if a < n_rows:
            sa, oa = slots[a], offsets[a]
            for j in range(0, min(row_units, page_units - oa), line):
                prefetch(pool, sa, oa + j)
        s, o, r = slots[k], offsets[k], pos[k]
        n = max(0, min(row_units, page_units - o))
        for j in range(n):
            out[r, j] = pool[s, o + j]
        for j in range(n, row_units):
            out[r, j] = 0


@numba.njit(cache=True, nogil=True)
def gather_rows(directory, leaves, pool, lbas, offsets, row_bytes, out, pos):
    """:func:`_copy_rows` in bytes (``pool``, ``out``: uint8 matrices, ``offsets`` in bytes),
    as 32-bit words when the row size and every offset allow it (4x fewer loads)."""
    words = row_bytes % 4 == 0 and pool.shape[1] % 4 == 0 and out.shape[1] % 4 == 0
    if words:
        for k in range(offsets.shape[0]):
            if offsets[k] % 4:
                words = False
                break
    if not words:
        _copy_rows(directory, leaves, pool, lbas, offsets, row_bytes, out, pos)
    else:
        _copy_rows(directory, leaves, pool.view(np.uint32), lbas, offsets // 4, row_bytes // 4,
                   out.view(np.uint32), pos)


class SparseFlash:
    """``total_pages`` pages of ``page_size`` bytes, addressed by LBA; reads of pages never
    programmed return zeros."""

    def __init__(self, total_pages: int, page_size: int):
        if total_pages < 1 or page_size < 1:
            raise ValueError(f"total_pages and page_size must be >= 1, got {total_pages}, {page_size}")
        self.total_pages, self.page_size = int(total_pages), int(page_size)
        self._dir = np.full(-(-self.total_pages // LEAF_PAGES), -1, np.int32)
        self._leaves = np.zeros((1, LEAF_PAGES), np.int64)
        self._n_leaves = 0
        self._pool = np.zeros((16, page_size), np.uint8)
        self._used = 1                            # slot 0: the erased page

    @property
    def programmed_pages(self) -> int:
        return self._used - 1

    @property
    def nbytes(self) -> int:
        """Bytes held (pool, directory, leaves), whatever the capacity."""
        return self._pool.nbytes + self._dir.nbytes + self._leaves.nbytes

    def _check_range(self, lba: int, n: int):
        if lba < 0 or n < 0 or lba + n > self.total_pages:
            raise ValueError(f"pages {lba}..{lba + n - 1} outside the flash of {self.total_pages} pages")

    def slots(self, lbas) -> np.ndarray:
        """Pool slot of every LBA (0, the erased page, where none was programmed)."""
        lbas = np.ascontiguousarray(lbas, np.int64)
        out = np.empty(lbas.shape[0], np.int64)
        _slots(self._dir, self._leaves, lbas, out)
        return out

    @staticmethod
    def _grown(arr: np.ndarray, need: int) -> np.ndarray:
        cap = arr.shape[0]
        if need <= cap:
            return arr
        while cap < need:
            cap *= 2
        new = np.zeros((cap,) + arr.shape[1:], arr.dtype)
        new[:arr.shape[0]] = arr
        return new

    def program(self, lba: int, pages) -> None:
        """Write ``pages`` (``[n, page_size]`` uint8) at LBAs ``lba .. lba + n - 1``."""
        pages = np.asarray(pages, np.uint8).reshape(-1, self.page_size)
        n = pages.shape[0]
        self._check_range(lba, n)
        lbas = np.arange(lba, lba + n, dtype=np.int64)
        for d in np.unique(lbas // LEAF_PAGES):
            if self._dir[d] < 0:
                self._leaves = self._grown(self._leaves, self._n_leaves + 1)
                self._dir[d] = self._n_leaves
                self._n_leaves += 1
        slots = self.slots(lbas)
        new = np.flatnonzero(slots == 0)
        if new.size:
            self._pool = self._grown(self._pool, self._used + new.size)
            slots[new] = np.arange(self._used, self._used + new.size)
            self._used += new.size
            self._leaves[self._dir[lbas[new] // LEAF_PAGES], lbas[new] % LEAF_PAGES] = slots[new]
        self._pool[slots] = pages

    def read(self, lba: int, n: int) -> np.ndarray:
        """Pages ``lba .. lba + n - 1`` as a new ``[n, page_size]`` uint8 array."""
        self._check_range(lba, n)
        return self._pool[self.slots(np.arange(lba, lba + n, dtype=np.int64))]

    def rows(self, lbas, offsets, row_bytes: int):
        """The flash as a row matrix, for reading rows in place: ``(matrix, row_numbers)`` with
        ``matrix[row_numbers[k]]`` = the ``row_bytes`` bytes at (``lbas[k]``, ``offsets[k]``).

        Needs ``page_size % row_bytes == 0`` and offsets that are multiples of ``row_bytes``
        below ``page_size`` (rows on the page's row grid). ``matrix`` is a view, valid until the
        next :meth:`program`.
        """
        matrix = self.row_matrix(row_bytes)
        return matrix, self.slots(lbas) * (self.page_size // row_bytes) + np.asarray(offsets, np.int64) // row_bytes

    def row_matrix(self, row_bytes: int) -> np.ndarray:
        """The pool viewed as rows of ``row_bytes`` (:meth:`rows`' matrix; row number of the row
        at (lba, offset) = ``slot * (page_size // row_bytes) + offset // row_bytes``)."""
        if self.page_size % row_bytes:
            raise ValueError(f"row_bytes {row_bytes} does not divide the page size {self.page_size}")
        return self._pool.reshape(-1, row_bytes)

    def gather(self, lbas, offsets, row_bytes: int, out: np.ndarray, pos) -> None:
        """Copy the ``row_bytes`` bytes at (``lbas[k]``, ``offsets[k]``) into ``out[pos[k]]``.

        The caller checks ``0 <= offsets[k]`` and ``0 <= lbas[k] < total_pages`` (the
        translator's rules); bytes past a page's end read as zeros. ``out``: a uint8 matrix.
        """
        if not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 2
                and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("gather: out must be a writable C-contiguous uint8 matrix")
        gather_rows(self._dir, self._leaves, self._pool, np.ascontiguousarray(lbas, np.int64),
                     np.ascontiguousarray(offsets, np.int64), int(row_bytes), out,
                     np.ascontiguousarray(pos, np.int64))
