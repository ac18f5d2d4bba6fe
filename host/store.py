"""EmbeddingStore: one lookup API over interchangeable storage backends.

Backends (``backend=`` in :meth:`EmbeddingStore.from_arrays`):

``dram``
    every row in host memory: the ideal every other backend is measured against.
``file``
    the table in a file on the local disk (format below), read through the OS with ``os.pread``.
    ``file_mode="page"`` reads the whole page(s) that hold a row for every distinct looked-up
    row: the block-interface SSD baseline. ``file_mode="row"`` reads only the row's bytes
    (fine-grained). ``direct=True`` (``O_DIRECT``) bypasses the OS page cache; ``io_threads``
    keeps several reads in flight.
``evssd``
    the EV-SSD through :class:`evssd.host.device.Device` (any transport); tables placed by
    :mod:`evssd.host.layout`. Without a cache (and with ``device_pooling``, the default), pooled
    lookups are pooled on the device (``GATHER_POOLED``, duplicates included); otherwise the
    distinct misses are gathered (``GATHER``) and the host pools. A multi-table batch
    (``lookup_many``, the pipeline) submits one command per table before waiting for any.
``rocksdb``
    rows in RocksDB (rocksdict), key = row index as 8 big-endian bytes: the SSD tier of FBGEMM
    SSD-TBE and HugeCTR HPS.

Each backend can be fronted per table by the EV-Cache (:class:`evssd.host.cache.EVCache`, budget
a fraction of the table, 1% by default) or by a plain LRU (:class:`PlainLRU`, the cachetools peer).

A lookup deduplicates its indices, serves what the cache holds, reads the misses from the
backend (once per distinct row per lookup), admits them to the cache and then gathers or pools.
Pooling follows FBGEMM and the device: ``indices`` + ``offsets[B+1]``; fp32/fp16 rows are summed
in float32 in bag order (IEEE round-to-nearest-even, no reassociation), int8/int32 rows in int32
(wrapping, like the device); ``mean`` divides the sum by the bag length in float32 and an empty
bag gives zeros. Every input is validated before any I/O; errors name the table and the position.

Table file format (little-endian), written by :func:`write_table_file`::

    offset size  field
    0      8     magic b"EVSSDTBL"
    8      4     version (u32) = 1
    12     4     dtype code (u32): 0 fp32, 1 fp16, 2 int8, 3 int32
    16     8     rows (u64)
    24     4     dim (u32)
    28     4     page_size (u32): rows are packed so that none straddles a page
    32     8     data_offset (u64): first data byte, a multiple of page_size
    40     20    reserved, zero
    60     4     crc32 of bytes 0..59
    data_offset: pages; row r lives in page r // rows_per_page at byte
                 (r % rows_per_page) * row_bytes, row_bytes = dim * itemsize,
                 rows_per_page = page_size // row_bytes (a row larger than a page takes
                 ceil(row_bytes / page_size) whole pages); padding is zero.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from evssd.host import pooling
from evssd.host.elements import ELEMS, INT8_ROWWISE, Elem, ElemError, elem_of_dtype

__all__ = [
    "EmbeddingStore", "TableInfo", "StoreError", "StoreInputError", "TableFileError",
    "PlainLRU", "TableFile", "write_table_file", "open_table_file", "DTYPES", "pool_deduplicated",
    "RowwiseInt8", "quantize_rowwise_int8",
]

#: element types a table may hold: name -> numpy dtype of the stored rows (from host.elements)
DTYPES: dict[str, np.dtype] = {name: el.storage for name, el in ELEMS.items()}
_CODE_ELEM = {el.code: el for el in ELEMS.values()}

FILE_MAGIC = b"EVSSDTBL"
FILE_VERSION = 1
_HEADER = struct.Struct("<8sIIQIIQ20s")  # 60 bytes, then crc32 (u32)
HEADER_BYTES = 64


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreInputError(StoreError, ValueError):
    """A lookup's input is invalid (unknown table, index out of range, bad offsets, bad dtype)."""


class TableFileError(StoreError, ValueError):
    """A table file is corrupt, truncated or not a table file."""


def dtype_name(dtype) -> str:
    """The element-type name ('fp32', 'fp16', 'int8', 'int32') of a numpy dtype; error otherwise."""
    try:
        return elem_of_dtype(dtype).name
    except ElemError as exc:
        raise StoreInputError(str(exc)) from None


@dataclass(frozen=True)
class RowwiseInt8:
    """A table of FBGEMM row-wise quantized INT8 rows (``int8_rowwise``): ``data`` is uint8
    ``[rows, dim + 4]``, each row an fp16 scale, an fp16 bias and ``dim`` codes (the layout of
    ``IntNBitTableBatchedEmbeddingBagsCodegen``'s INT8 rows without their alignment padding).
    Extra columns beyond ``dim + 4`` (FBGEMM's row padding) are dropped when ``dim`` is given."""
    data: np.ndarray
    dim: int | None = None

    def rows_array(self, name: str) -> np.ndarray:
        d = np.asarray(self.data)
        if d.ndim != 2 or d.dtype != np.uint8:
            raise StoreInputError(f"table {name!r}: int8_rowwise rows must be a 2-D uint8 array, "
                                  f"got {d.dtype} {d.shape}")
        dim = d.shape[1] - INT8_ROWWISE.extra if self.dim is None else int(self.dim)
        if dim < 1 or d.shape[1] < dim + INT8_ROWWISE.extra or d.shape[0] < 1:
            raise StoreInputError(f"table {name!r}: int8_rowwise rows of shape {d.shape} cannot hold "
                                  f"dim={dim} codes plus the 4-byte scale and bias")
        return np.ascontiguousarray(d[:, :dim + INT8_ROWWISE.extra])


def quantize_rowwise_int8(table) -> RowwiseInt8:
    """Quantize a float table row by row the way FBGEMM's INT8 TBE rows are built:
    ``scale = (max - min) / 255``, ``bias = min`` (both stored as fp16), ``q = round((x - bias) / scale)``."""
    x = np.asarray(table, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        raise StoreInputError(f"quantize_rowwise_int8: expected a non-empty 2-D array, got shape {x.shape}")
    lo = x.min(axis=1)
    scale = ((x.max(axis=1) - lo) / 255).astype(np.float16)
    bias = lo.astype(np.float16)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32[:, None] > 0, np.rint((x - bias.astype(np.float32)[:, None]) / s32[:, None]), 0)
    out = np.empty((x.shape[0], x.shape[1] + 4), np.uint8)
    out[:, 0:2] = scale.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = bias.view(np.uint8).reshape(-1, 2)
    out[:, 4:] = np.clip(q, 0, 255).astype(np.uint8)
    return RowwiseInt8(out, x.shape[1])


@dataclass(frozen=True)
class TableInfo:
    """A table's shape and element type. ``dim`` is the logical row length (pooled columns);
    the stored rows are ``[rows, width]`` of ``dtype`` (width = dim, plus 4 for int8_rowwise)."""
    name: str
    rows: int
    dim: int
    dtype: np.dtype
    elem: str = ""

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not self.elem:
            object.__setattr__(self, "elem", dtype_name(self.dtype))
        elif self.elem not in ELEMS:
            raise StoreInputError(f"table {self.name!r}: unknown element type {self.elem!r}")

    @property
    def el(self) -> Elem:
        return ELEMS[self.elem]

    @property
    def width(self) -> int:
        """Columns of the stored row matrix."""
        return self.el.width(self.dim)

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def acc_dtype(self) -> np.dtype:
        """dtype of pooled sums: float32 for float rows, int32 for integer rows."""
        return self.el.pooled


def _table_info(name: str, arr: np.ndarray, el: Elem) -> TableInfo:
    return TableInfo(name, arr.shape[0], arr.shape[1] - el.extra, el.storage, el.name)


def _check_table(name: str, arr) -> tuple[np.ndarray, Elem]:
    """(stored row matrix, element type) of a table given as an array, RowwiseInt8, path, tensor..."""
    if isinstance(arr, RowwiseInt8):
        return arr.rows_array(name), INT8_ROWWISE
    a = _check_table_array(name, arr)
    return a, elem_of_dtype(a.dtype)


def _check_table_array(name: str, arr) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        # .npy paths, torch tensors and nn.Embedding/EmbeddingBag modules, as the layout reads them
        from evssd.host.layout import LayoutError, load_table
        try:
            arr = load_table(name, arr)
        except LayoutError as exc:
            raise StoreInputError(str(exc)) from None
    if arr.ndim != 2:
        raise StoreInputError(f"table {name!r}: expected a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise StoreInputError(f"table {name!r}: empty table of shape {arr.shape}")
    try:
        elem = dtype_name(arr.dtype)
    except StoreInputError as exc:
        raise StoreInputError(f"table {name!r}: {exc}") from None
    return np.ascontiguousarray(arr, dtype=DTYPES[elem])


# ----------------------------------------------------------------------------------------------
# pooling (the definition and its kernels live in evssd.host.pooling)


def pool_deduplicated(rows: np.ndarray, inv: np.ndarray, offsets: np.ndarray, mode: str = "sum",
                      elem: str | None = None, per_sample_weights=None) -> np.ndarray:
    """Pool bags over deduplicated rows: bag b pools ``rows[inv[offsets[b]:offsets[b+1]]]`` in
    order, by :mod:`evssd.host.pooling`'s definition. ``elem`` defaults to the rows' dtype."""
    el = ELEMS[elem] if elem else elem_of_dtype(rows.dtype)
    return pooling.pool(rows, el, inv, offsets, per_sample_weights=per_sample_weights, mode=mode)


# ----------------------------------------------------------------------------------------------
# the table file


def _file_geometry(row_bytes: int, page_size: int) -> tuple[int, int]:
    """(rows_per_page, pages_per_row): one of them is 1."""
    if row_bytes <= page_size:
        return page_size // row_bytes, 1
    return 1, -(-row_bytes // page_size)


def write_table_file(path, table, *, page_size: int = 4096) -> Path:
    """Write ``table`` [rows, dim] (fp32/fp16/int8/int32) as a table file; returns the path."""
    path = Path(path)
    arr, el = _check_table(path.name, table)
    if page_size < 64 or page_size & (page_size - 1):
        raise StoreInputError(f"page_size must be a power of two >= 64, got {page_size}")
    rows, width = arr.shape
    dim = width - el.extra
    row_bytes = width * arr.dtype.itemsize
    rpp, ppr = _file_geometry(row_bytes, page_size)
    data_offset = page_size * -(-HEADER_BYTES // page_size)
    head = _HEADER.pack(FILE_MAGIC, FILE_VERSION, el.code, rows, dim, page_size,
                        data_offset, b"\0" * 20)
    head += struct.pack("<I", zlib.crc32(head))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head.ljust(data_offset, b"\0"))
        raw = arr.view(np.uint8).reshape(rows, row_bytes)
        if ppr > 1:
            stride = ppr * page_size
        else:
            stride = page_size
        chunk_pages = max(1, (16 << 20) // stride)
        if ppr > 1:
            for start in range(0, rows, chunk_pages):
                block = raw[start:start + chunk_pages]
                buf = np.zeros((block.shape[0], stride), np.uint8)
                buf[:, :row_bytes] = block
                f.write(buf.tobytes())
        else:
            n_pages = -(-rows // rpp)
            for p0 in range(0, n_pages, chunk_pages):
                p1 = min(n_pages, p0 + chunk_pages)
                block = raw[p0 * rpp:p1 * rpp]
                buf = np.zeros((p1 - p0, page_size), np.uint8)
                full = np.zeros(((p1 - p0) * rpp, row_bytes), np.uint8)
                full[:block.shape[0]] = block
                buf[:, :rpp * row_bytes] = full.reshape(p1 - p0, rpp * row_bytes)
                f.write(buf.tobytes())
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class TableFile:
    """A parsed, validated table-file header plus the geometry derived from it."""
    path: Path
    elem: str
    rows: int
    dim: int
    page_size: int
    data_offset: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.elem]

    @property
    def width(self) -> int:
        """Columns of the stored row matrix (dim, plus the scale/bias bytes of int8_rowwise)."""
        return ELEMS[self.elem].width(self.dim)

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    @property
    def rows_per_page(self) -> int:
        return _file_geometry(self.row_bytes, self.page_size)[0]

    @property
    def pages_per_row(self) -> int:
        return _file_geometry(self.row_bytes, self.page_size)[1]

    @property
    def n_pages(self) -> int:
        rpp, ppr = _file_geometry(self.row_bytes, self.page_size)
        return self.rows * ppr if ppr > 1 else -(-self.rows // rpp)

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.n_pages * self.page_size

    def row_offset(self, index: int) -> int:
        rpp, ppr = _file_geometry(self.row_bytes, self.page_size)
        if ppr > 1:
            return self.data_offset + index * ppr * self.page_size
        return self.data_offset + (index // rpp) * self.page_size + (index % rpp) * self.row_bytes

    def read_all(self) -> np.ndarray:
        """The whole table as an array [rows, dim] (for tests and tools)."""
        raw = np.fromfile(self.path, dtype=np.uint8, offset=self.data_offset,
                          count=self.n_pages * self.page_size)
        rpp, ppr = _file_geometry(self.row_bytes, self.page_size)
        if ppr > 1:
            rows = raw.reshape(self.rows, ppr * self.page_size)[:, :self.row_bytes]
        else:
            pages = raw.reshape(self.n_pages, self.page_size)[:, :rpp * self.row_bytes]
            rows = pages.reshape(self.n_pages * rpp, self.row_bytes)[:self.rows]
        return np.ascontiguousarray(rows).view(self.dtype).reshape(self.rows, self.width)


def open_table_file(path) -> TableFile:
    """Parse and validate a table file's header and size; :class:`TableFileError` names the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as exc:
        raise TableFileError(f"{path}: cannot read table file ({exc.strerror or exc})") from exc
    if len(head) < HEADER_BYTES:
        raise TableFileError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
    magic, version, code, rows, dim, page_size, data_offset, _ = _HEADER.unpack(head[:60])
    if magic != FILE_MAGIC:
        raise TableFileError(f"{path}: not an evssd table file (magic {magic!r}, expected {FILE_MAGIC!r})")
    (crc,) = struct.unpack("<I", head[60:64])
    if crc != zlib.crc32(head[:60]):
        raise TableFileError(f"{path}: header checksum mismatch (stored {crc:#010x}, "
                             f"computed {zlib.crc32(head[:60]):#010x}): the header is corrupt")
    if version != FILE_VERSION:
        raise TableFileError(f"{path}: unsupported version {version} (this reader knows {FILE_VERSION})")
    if code not in _CODE_ELEM:
        raise TableFileError(f"{path}: unknown dtype code {code}")
    if rows < 1 or dim < 1 or page_size < 64 or page_size & (page_size - 1) or data_offset % page_size:
        raise TableFileError(f"{path}: inconsistent header (rows={rows}, dim={dim}, "
                             f"page_size={page_size}, data_offset={data_offset})")
    tf = TableFile(path, _CODE_ELEM[code].name, rows, dim, page_size, data_offset)
    if size < tf.file_bytes:
        raise TableFileError(f"{path}: truncated: {size} bytes, the header describes {tf.file_bytes} "
                             f"({rows} rows x {dim} {tf.elem} in {tf.n_pages} pages of {page_size} B)")
    if size > tf.file_bytes:
        raise TableFileError(f"{path}: {size - tf.file_bytes} trailing bytes after the last page")
    return tf


# ----------------------------------------------------------------------------------------------
# caches


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


def _make_cache(kind, info: TableInfo, fraction: float):
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


# ----------------------------------------------------------------------------------------------
# backends


class Backend:
    """Reads rows by index. ``read_rows`` gets sorted, distinct, validated int64 indices.

    ``thread_safe``: whether the store may call it from several threads at once; if not, the
    store serialises its calls.
    """
    name = "?"
    thread_safe = True

    def __init__(self):
        self.bytes_read = 0
        self.rows_read = 0
        self.requests = 0
        self._stat_lock = threading.Lock()

    def _count(self, requests: int, rows: int, nbytes: int) -> None:
        with self._stat_lock:
            self.requests += requests
            self.rows_read += rows
            self.bytes_read += nbytes

    def read_rows(self, info: TableInfo, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pools(self, info: TableInfo) -> bool:
        """Whether :meth:`read_pooled` pools ``info``'s bags itself (unweighted sums by the
        pooling definition); the store pools on the host otherwise."""
        return False

    def table_array(self, info: TableInfo) -> np.ndarray | None:
        """The table's whole stored row matrix when it is in host memory (the store then pools
        straight from it, no copy), else None."""
        return None

    def read_pooled(self, info: TableInfo, indices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Pooled sums computed by the backend (only called when :meth:`pools` says so)."""
        raise NotImplementedError(f"backend {self.name!r} does not pool")

    def read_many(self, jobs: list[tuple]) -> list[np.ndarray]:
        """Several reads of one batch: ``("rows", info, indices, None)`` or
        ``("pooled", info, indices, offsets)``. Backends that can overlap them override this."""
        return [self.read_rows(info, idx) if kind == "rows" else self.read_pooled(info, idx, offs)
                for kind, info, idx, offs in jobs]

    def stats(self) -> dict:
        return {"bytes_read": self.bytes_read, "rows_read": self.rows_read, "requests": self.requests}

    def close(self) -> None:
        pass


class DramBackend(Backend):
    """All rows in memory. ``bytes_read`` counts the row bytes copied out."""
    name = "dram"

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        super().__init__()
        self.arrays = dict(arrays)

    def read_rows(self, info, indices):
        self._count(1, len(indices), len(indices) * info.row_bytes)
        return self.arrays[info.name][indices]

    def table_array(self, info):
        return self.arrays[info.name]


class FileBackend(Backend):
    """Table files read with ``os.pread``; page-granular (block-SSD baseline) or row-granular.

    ``mode="page"`` reads, for every distinct row of a lookup, the whole page(s) holding it;
    ``mode="row"`` reads only the row's bytes. ``bytes_read`` counts the bytes requested from
    the OS, i.e. what a block device would move.

    Without ``direct`` the reads may be served by the OS page cache (dropping it needs root).
    ``direct=True`` opens the files with ``O_DIRECT`` (no root needed, the file system must
    support it), which bypasses the page cache so every read reaches the device: page mode
    reads whole pages, row mode the ``direct_align``-aligned span of sectors around the row.
    ``io_threads`` > 1 splits a lookup's reads over that many threads (the queue depth a real
    block-SSD stack would use); pread releases the GIL.
    """
    name = "file"

    def __init__(self, files: Mapping[str, TableFile], mode: str = "row", *, direct: bool = False,
                 io_threads: int = 1, direct_align: int = 512):
        super().__init__()
        if mode not in ("page", "row"):
            raise StoreInputError(f"file mode must be 'page' or 'row', got {mode!r}")
        if io_threads < 1:
            raise StoreInputError(f"io_threads must be >= 1, got {io_threads}")
        if direct_align < 512 or direct_align & (direct_align - 1):
            raise StoreInputError(f"direct_align must be a power of two >= 512, got {direct_align}")
        if direct and not hasattr(os, "O_DIRECT"):
            raise StoreInputError("direct=True needs O_DIRECT, which this platform lacks")
        self.mode, self.direct, self.io_threads, self.align = mode, direct, io_threads, direct_align
        self.files = dict(files)
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        self._fds = {}
        for name, tf in self.files.items():
            try:
                self._fds[name] = os.open(tf.path, flags)
            except OSError as exc:
                self.close()
                what = " with O_DIRECT (the file system may not support it)" if direct else ""
                raise TableFileError(f"{tf.path}: cannot open{what}: {exc.strerror or exc}") from exc
        self._tls = threading.local()
        self._pool = None
        if io_threads > 1:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="evssd-pread")

    def _span(self, tf: TableFile, i: int) -> tuple[int, int, int]:
        """(file offset, length, row start within the span) of the read for row ``i``."""
        if self.mode == "page":
            rpp, ppr, ps = tf.rows_per_page, tf.pages_per_row, tf.page_size
            if ppr == 1:
                return tf.data_offset + (i // rpp) * ps, ps, (i % rpp) * tf.row_bytes
            return tf.data_offset + i * ppr * ps, ppr * ps, 0
        off = tf.row_offset(i)
        if not self.direct:
            return off, tf.row_bytes, 0
        a = self.align
        lo = off - off % a
        hi = -(-(off + tf.row_bytes) // a) * a
        return lo, hi - lo, off - lo

    def _buffer(self, size: int):
        import mmap
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, -(-size // 4096) * 4096)  # page-aligned, as O_DIRECT requires
            self._tls.buf = buf
        return buf

    def _read_range(self, tf: TableFile, fd: int, indices: list, out: np.ndarray) -> int:
        rb = tf.row_bytes
        total = 0
        for k, i in enumerate(indices):
            off, n, start = self._span(tf, i)
            if self.direct:
                buf = self._buffer(n)
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                data = buf
            else:
                data = os.pread(fd, n, off)
                got = len(data)
            if got != n:
                raise TableFileError(f"{tf.path}: short read for row {i} at offset {off} ({got} of {n} bytes)")
            out[k] = np.frombuffer(data, np.uint8, count=rb, offset=start)
            total += n
        return total

    def read_rows(self, info, indices):
        tf = self.files[info.name]
        fd = self._fds[info.name]
        out = np.empty((len(indices), tf.row_bytes), dtype=np.uint8)
        idx = indices.tolist()
        if self._pool is None or len(idx) < 2 * self.io_threads:
            nbytes = self._read_range(tf, fd, idx, out)
        else:
            cuts = np.linspace(0, len(idx), self.io_threads + 1).astype(int)
            futs = [self._pool.submit(self._read_range, tf, fd, idx[a:b], out[a:b])
                    for a, b in zip(cuts[:-1], cuts[1:])]
            nbytes = sum(f.result() for f in futs)
        self._count(len(indices), len(indices), nbytes)
        return out.view(tf.dtype).reshape(len(indices), tf.width)

    def stats(self):
        return dict(super().stats(), mode=self.mode, direct=self.direct, io_threads=self.io_threads)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class RocksDBBackend(Backend):
    """Rows in RocksDB (rocksdict), one column family per table, key = index as 8 big-endian bytes.

    The default column family holds ``_META_KEY`` -> JSON ``{name: [rows, dim, elem]}`` so that
    :meth:`EmbeddingStore.from_rocksdb` can reopen a database without the arrays.
    """
    name = "rocksdb"
    thread_safe = False  # rocksdict's handles are not documented as thread-safe: serialise
    _META_KEY = b"evssd-tables"

    def __init__(self, path, tables: Mapping[str, TableInfo]):
        super().__init__()
        from rocksdict import Options, Rdict
        self.path = str(path)
        self._opts = Options(raw_mode=True)
        self._opts.create_if_missing(True)
        self._opts.create_missing_column_families(True)
        self.db = Rdict(self.path, self._opts)
        self._cf = {}
        self.infos = dict(tables)

    def _family(self, name):
        cf = self._cf.get(name)
        if cf is None:
            try:
                cf = self.db.get_column_family(name)
            except Exception:
                cf = self.db.create_column_family(name, self._opts)
            self._cf[name] = cf
        return cf

    def load(self, name: str, arr: np.ndarray, chunk: int = 65536, elem: str | None = None) -> None:
        elem = elem or dtype_name(arr.dtype)
        from rocksdict import WriteBatch
        cf = self._family(name)
        handle = self.db.get_column_family_handle(name)
        rb = arr.shape[1] * arr.dtype.itemsize
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(arr.shape[0], rb)
        for start in range(0, arr.shape[0], chunk):
            wb = WriteBatch(raw_mode=True)
            wb.set_default_column_family(handle)
            block = raw[start:start + chunk].tobytes()
            for k in range(min(chunk, arr.shape[0] - start)):
                wb.put((start + k).to_bytes(8, "big"), block[k * rb:(k + 1) * rb])
            self.db.write(wb)
        del cf
        meta = self._read_meta()
        meta[name] = [int(arr.shape[0]), int(arr.shape[1]) - ELEMS[elem].extra, elem]
        self.db.put(self._META_KEY, json.dumps(meta).encode())
        self.db.flush()

    def _read_meta(self) -> dict:
        raw = self.db.get(self._META_KEY)
        return json.loads(raw) if raw else {}

    def table_infos(self) -> dict[str, TableInfo]:
        """Tables recorded in the database (name -> TableInfo)."""
        try:
            meta = self._read_meta()
        except ValueError as exc:
            raise StoreError(f"rocksdb {self.path}: unreadable table metadata ({exc})") from None
        return {n: TableInfo(n, int(r), int(d), DTYPES[e], e) for n, (r, d, e) in meta.items()}

    def read_rows(self, info, indices):
        cf = self._family(info.name)
        keys = [i.to_bytes(8, "big") for i in indices.tolist()]
        vals = cf[keys]
        rb = info.row_bytes
        for k, v in enumerate(vals):
            if v is None or len(v) != rb:
                raise StoreError(f"rocksdb {self.path}: table {info.name!r} row {int(indices[k])} "
                                 f"missing or wrong size")
        self._count(1, len(indices), len(indices) * rb)
        return np.frombuffer(b"".join(vals), dtype=info.dtype).reshape(len(indices), info.width)

    def close(self):
        self._cf.clear()
        try:
            self.db.close()
        except Exception:
            pass


class EvssdBackend(Backend):
    """The EV-SSD through the driver. ``bytes_read`` counts result bytes returned by DMA."""
    name = "evssd"
    thread_safe = False  # the driver's sync facade runs one private event loop

    def __init__(self, device, layout, owns_device: bool = False, device_pooling: bool = True):
        super().__init__()
        self.device_pooling = device_pooling
        self.device = device
        self.layout = layout
        self.owns_device = owns_device
        self._ids = {t.name: t for t in layout.tables}

    def read_rows(self, info, indices):
        if len(indices) == 0:
            return np.zeros((0, info.dim), info.dtype)
        raw = self.device.gather(self._ids[info.name].table_id, indices.astype(np.uint32))
        self._count(1, 0, 0)
        return self._rows_view(info, raw, len(indices))

    def pools(self, info):
        return self.device_pooling and info.el.device is not None

    def read_pooled(self, info, indices, offsets):
        if len(indices) == 0:  # nothing for the device to do: every bag is empty
            return np.zeros((len(offsets) - 1, info.dim), info.acc_dtype)
        raw = self.device.gather_pooled(self._ids[info.name].table_id, indices.astype(np.uint32),
                                        offsets.astype(np.uint32))
        self._count(1, 0, 0)
        return self._pooled_view(info, raw, len(offsets) - 1, len(indices))

    def _rows_view(self, info, raw, n):
        row_bytes = self._ids[info.name].row_bytes  # padded to a multiple of 4 by the layout
        raw = np.asarray(raw, dtype=np.uint8).reshape(n, row_bytes)
        self._count(0, n, raw.nbytes)
        return np.ascontiguousarray(raw[:, :info.row_bytes]).view(info.dtype).reshape(n, info.width)

    def _pooled_view(self, info, raw, n_bags, n):
        width = self._ids[info.name].row_bytes // info.dtype.itemsize * 4  # pad elements widen too
        raw = np.asarray(raw, dtype=np.uint8).reshape(n_bags, width)
        self._count(0, n, raw.nbytes)
        return np.ascontiguousarray(raw[:, :info.dim * 4]).view(info.acc_dtype).reshape(n_bags, info.dim)

    def read_many(self, jobs):
        """Submit every command of the batch before waiting for the first, so the device
        overlaps them (one command per table); through the driver's async core."""
        aio = getattr(self.device, "aio", None)
        run = getattr(self.device, "_do", None)
        if aio is None or run is None or len(jobs) < 2 or any(len(j[2]) == 0 for j in jobs):
            return super().read_many(jobs)

        async def go():
            handles, out, error = [], [], None
            for kind, info, idx, offs in jobs:
                tid = self._ids[info.name].table_id
                if kind == "rows":
                    handles.append(await aio.submit_gather(tid, idx.astype(np.uint32)))
                else:
                    handles.append(await aio.submit_gather_pooled(tid, idx.astype(np.uint32),
                                                                  offs.astype(np.uint32)))
            for h in handles:  # finish every handle, even after an error, so buffers are freed
                try:
                    out.append(await aio.finish(h))
                except Exception as exc:
                    error = error or exc
                    out.append(None)
            if error is not None:
                raise error
            return out

        raws = run(go())
        self._count(len(jobs), 0, 0)
        return [self._rows_view(info, raw, len(idx)) if kind == "rows"
                else self._pooled_view(info, raw, len(offs) - 1, len(idx))
                for (kind, info, idx, offs), raw in zip(jobs, raws)]

    def close(self):
        if self.owns_device:
            self.device.close()


# ----------------------------------------------------------------------------------------------
# the store


import numba


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


_GATHER, _DIRECT, _DEVICE, _ROWS = "gather", "direct", "device", "rows"


@dataclass
class _Plan:
    """One table lookup between its phases (prepare -> fetch -> finish); see :mod:`.pipeline`.

    ``kind``: ``direct`` pools straight from a table in memory; ``device`` lets the backend pool;
    ``rows`` deduplicates, serves the cache, fetches the misses and pools the distinct rows."""
    info: TableInfo
    indices: np.ndarray          # validated int32/int64, request order
    offsets: np.ndarray | None   # validated [B+1] or None for gather
    mode: str | None
    kind: str
    weights: np.ndarray | None = None   # float32 per lookup, or None
    out: np.ndarray | None = None       # caller's output buffer (sum only)
    uniq: np.ndarray | None = None      # distinct indices (first-occurrence order)
    inv: np.ndarray | None = None       # indices == uniq[inv]
    rows: np.ndarray | None = None      # [len(uniq), width] being filled
    miss: np.ndarray | None = None      # positions in uniq not served by the cache
    fetched: np.ndarray | None = None
    pooled: np.ndarray | None = None    # result pooled by the backend (device pooling)


_AUTO = object()


class EmbeddingStore:
    """Gather and pooled lookups over one backend, each table optionally fronted by a cache.

    Pooled results follow :mod:`evssd.host.pooling` bit for bit on every path. Without a cache, a
    table held in memory (``dram``) is pooled straight from the table by one fused kernel
    (parallel over bags when numba has more than one thread); a backend that pools (the EV-SSD)
    pools unweighted bags of the device's element types itself; every other lookup deduplicates,
    serves the cache, fetches the distinct misses once and pools on the host.

    Safe to call from several threads: each table's cache has its own lock (held for the
    lookup and for the admission, not across the I/O), and the calls into a backend that is
    not thread-safe (``evssd``, ``rocksdb``) are serialised.
    """

    def __init__(self, tables: Mapping[str, TableInfo], backend: Backend, *,
                 cache_fraction: float | None = 0.01, cache="evcache", device_pooling: bool = True):
        self.tables: dict[str, TableInfo] = dict(tables)
        self.backend = backend
        self.cache_fraction = cache_fraction
        self.caches = {}
        if cache_fraction is not None:
            if not 0 < cache_fraction <= 1:
                raise StoreInputError(f"cache_fraction must be in (0, 1] or None, got {cache_fraction}")
            for name, info in self.tables.items():
                self.caches[name] = _make_cache(cache, info, cache_fraction)
        self.device_pooling = device_pooling
        self._arrays = {} if self.caches else \
            {n: a for n, a in ((n, backend.table_array(i)) for n, i in self.tables.items()) if a is not None}
        self._lookups = 0
        self._batches = 0
        self._lock = threading.Lock()
        self._cache_locks = {name: threading.Lock() for name in self.caches}
        self._io_lock = contextlib.nullcontext() if backend.thread_safe else threading.Lock()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, tables: Mapping[str, np.ndarray], backend: str = "dram", *,
                    cache_fraction=_AUTO, cache="evcache", path=None, device=None,
                    file_mode: str = "row", page_size: int = 4096, layout_options: dict | None = None,
                    device_pooling: bool = True, file_options: dict | None = None) -> "EmbeddingStore":
        """Build a store holding ``tables`` (name -> [rows, dim] fp32/fp16/int8/int32 array, a
        ``.npy`` path, a torch tensor or an ``nn.Embedding``/``nn.EmbeddingBag``).

        ``cache_fraction``: per-table cache budget as a fraction of the table (None: no cache);
        the default is 0.01 for every backend but ``dram``, which has nothing to cache.
        ``cache``: "evcache" (EV-Cache), "lru" (:class:`PlainLRU`) or ``f(TableInfo, fraction)``.
        ``path``: directory for the ``file`` / ``rocksdb`` backends (created); without one a
        temporary directory is used and removed by :meth:`close`.
        ``device``: an open :class:`evssd.host.device.Device` for ``evssd`` (default: the model).
        ``file_options``: passed to :class:`FileBackend` (``direct``, ``io_threads``, ``direct_align``).
        ``layout_options``: passed to :meth:`evssd.host.layout.Layout.plan` (e.g.
        ``max_rows_per_extent``).
        """
        if not tables:
            raise StoreInputError("no tables given")
        checked = {str(n): _check_table(str(n), a) for n, a in tables.items()}
        arrays = {n: a for n, (a, _) in checked.items()}
        infos = {n: _table_info(n, a, el) for n, (a, el) in checked.items()}
        if cache_fraction is _AUTO:
            cache_fraction = None if backend == "dram" else 0.01
        if backend == "dram":
            be: Backend = DramBackend(arrays)
        elif backend == "file":
            d = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="evssd-store-"))
            d.mkdir(parents=True, exist_ok=True)
            files = {n: open_table_file(write_table_file(d / f"{n}.evt", tables[n], page_size=page_size))
                     for n in arrays}
            be = FileBackend(files, mode=file_mode, **(file_options or {}))
            if path is None:
                be.cleanup_dir = d
        elif backend == "rocksdb":
            d = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="evssd-store-rocksdb-"))
            be = RocksDBBackend(d, infos)
            if path is None:
                be.cleanup_dir = d
            for n, a in arrays.items():
                be.load(n, a, elem=infos[n].elem)
        elif backend == "evssd":
            from evssd.host.layout import Layout
            owns = device is None
            if owns:
                from evssd.host.device import Device
                device = Device.open("model")
            # host-pooled types (int8_rowwise) are placed as raw int8 bytes and only gathered
            placed = {n: (a if infos[n].el.device is not None else a.view(np.int8)) for n, a in arrays.items()}
            layout = Layout.plan(placed, device=device, **(layout_options or {}))
            layout.write(device)
            layout.forget_data()  # the device holds the rows now; do not pin the arrays
            be = EvssdBackend(device, layout, owns_device=owns, device_pooling=device_pooling)
        else:
            raise StoreInputError(f"unknown backend {backend!r} (expected dram, file, evssd, rocksdb)")
        return cls(infos, be, cache_fraction=cache_fraction, cache=cache, device_pooling=device_pooling)

    @classmethod
    def from_files(cls, files: Mapping[str, str | os.PathLike], *, file_mode: str = "row",
                   cache_fraction: float | None = 0.01, cache="evcache", **file_options) -> "EmbeddingStore":
        """Open existing table files (name -> path) with the ``file`` backend
        (``file_options``: ``direct``, ``io_threads``, ``direct_align``; see :class:`FileBackend`)."""
        tfs = {str(n): open_table_file(p) for n, p in files.items()}
        infos = {n: TableInfo(n, tf.rows, tf.dim, tf.dtype) for n, tf in tfs.items()}
        return cls(infos, FileBackend(tfs, mode=file_mode, **file_options), cache_fraction=cache_fraction,
                   cache=cache)

    @classmethod
    def from_rocksdb(cls, path, *, cache_fraction: float | None = 0.01, cache="evcache") -> "EmbeddingStore":
        """Open a RocksDB database written by ``from_arrays(..., backend="rocksdb", path=...)``."""
        if not Path(path).exists():
            raise StoreInputError(f"rocksdb {path}: no such database")
        be = RocksDBBackend(path, {})
        infos = be.table_infos()
        if not infos:
            be.close()
            raise StoreInputError(f"rocksdb {path}: holds no evssd tables")
        be.infos = infos
        return cls(infos, be, cache_fraction=cache_fraction, cache=cache)

    @classmethod
    def from_device(cls, device, layout, *, cache_fraction: float | None = 0.01,
                    cache="evcache") -> "EmbeddingStore":
        """Serve a device that already holds ``layout`` (a Layout or its JSON path/text)."""
        from evssd.host.layout import Layout
        if not isinstance(layout, Layout):
            layout = Layout.load(layout)
        layout.configure(device)
        infos = {t.name: TableInfo(t.name, t.rows, t.dim, DTYPES[t.elem]) for t in layout.tables}
        return cls(infos, EvssdBackend(device, layout), cache_fraction=cache_fraction, cache=cache)

    def close(self) -> None:
        self.backend.close()
        tmp = getattr(self.backend, "cleanup_dir", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            self.backend.cleanup_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- validation -----------------------------------------------------------------------------

    def _info(self, table) -> TableInfo:
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
        if mode is not None and not self.caches and w is None and self.device_pooling \
                and self.backend.pools(info):
            return _Plan(info, idx, offs, mode, _DEVICE, None, out)
        uniq, inv = dedupe(idx)
        rows = np.empty((uniq.size, info.width), dtype=info.dtype)
        cache = self.caches.get(info.name)
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
            elif p.kind == _ROWS and p.miss.size:
                jobs.append(("rows", p.info, p.uniq[p.miss], None))
                targets.append(p)
        if not jobs:
            return
        with self._io_lock:
            results = self.backend.read_many(jobs)
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
            out = np.empty((n_bags, info.dim), np.float32 if plan.weights is not None else info.acc_dtype)
        parallel = n_bags >= 32 and numba.get_num_threads() > 1
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
        if plan.fetched is not None:
            plan.rows[plan.miss] = plan.fetched
            cache = self.caches.get(info.name)
            if cache is not None:
                with self._cache_locks[info.name]:
                    cache.admit(plan.uniq[plan.miss], plan.fetched)
        if plan.mode is None:
            return plan.rows[plan.inv]
        return self._pool(plan, plan.rows, plan.inv)

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
        plans = self._prepare_many(requests, mode, out)
        self._count_batch()
        self._fetch_many(plans)
        return {name: self._finish(p) for name, p in plans.items()}

    def _prepare_many(self, requests, mode, out=None):
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
        return {info.name: self._plan(info, idx, offs, w, mode, o) for info, idx, offs, w, o in checked}

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
            **self.backend.stats(),
            "cache_hit_rate": (hits / lookups) if lookups else None,
            "caches": caches,
        }
