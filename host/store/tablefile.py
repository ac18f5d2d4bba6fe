"""The table file: one embedding table in a file, laid out in pages like a flash device, with a
CRC-32 per row so that a flipped bit is an error naming the row instead of a different row.

Format version 2 (little-endian), written by :func:`write_table_file`::

    offset size  field
    0      8     magic b"EVSSDTBL"
    8      4     version (u32) = 2
    12     4     element-type code (u32): host.elements (0 fp32, 1 fp16, 2 int8, 3 int32,
                 16 int8_rowwise)
    16     8     rows (u64)
    24     4     dim (u32): logical elements per row (int8_rowwise rows hold dim + 4 bytes)
    28     4     page_size (u32): rows are packed so that none straddles a page
    32     8     data_offset (u64): first data byte, a multiple of page_size
    40     8     crc_offset (u64): first byte of the row-CRC trailer (= end of the last page)
    48     12    reserved, zero
    60     4     crc32 of bytes 0..59
    data_offset: pages; row r lives in page r // rows_per_page at byte
                 (r % rows_per_page) * row_bytes (a row larger than a page takes
                 ceil(row_bytes / page_size) whole pages); padding is zero.
    crc_offset:  rows x u32, the CRC-32 of each row's row_bytes, then u32, the CRC-32 of
                 those rows x 4 bytes.

Why per row and not per page: the row-granular reader reads only a row's bytes, and must be able
to check what it serves without reading the rest of the page. The trailer is read (and its own
CRC checked) when the file is opened and kept in memory: 4 bytes per row (1.6% of a 64 x fp32
row). Version 1 files (header CRC only) are refused with an error that says to rewrite them.

A file is written to ``<name>.tmp`` and renamed into place; a failed write removes the ``.tmp``.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evssd.host.elements import ELEMS
from evssd.host.store.errors import StoreInputError, TableFileError
from evssd.host.store.tables import DTYPES, check_table

__all__ = ["TableFile", "write_table_file", "open_table_file", "verify_table_file", "FILE_MAGIC",
           "FILE_VERSION", "HEADER_BYTES"]

FILE_MAGIC = b"EVSSDTBL"
FILE_VERSION = 2
_HEADER = struct.Struct("<8sIIQIIQQ12s")  # 60 bytes, then crc32 (u32)
HEADER_BYTES = 64
_CODE_ELEM = {el.code: el for el in ELEMS.values()}


def row_crcs(raw: np.ndarray) -> np.ndarray:
    """CRC-32 of every row of a ``uint8 [rows, row_bytes]`` matrix."""
    return np.fromiter((zlib.crc32(r) for r in raw), dtype="<u4", count=raw.shape[0])


def _file_geometry(row_bytes: int, page_size: int) -> tuple[int, int]:
    """(rows_per_page, pages_per_row): one of them is 1."""
    if row_bytes <= page_size:
        return page_size // row_bytes, 1
    return 1, -(-row_bytes // page_size)


def write_table_file(path, table, *, page_size: int = 4096) -> Path:
    """Write ``table`` (a [rows, dim] fp32/fp16/int8/int32 array or a RowwiseInt8) as a table
    file at ``path``; returns the path. Nothing is left behind if the write fails."""
    path = Path(path)
    arr, el = check_table(path.name, table)
    if page_size < 64 or page_size & (page_size - 1):
        raise StoreInputError(f"page_size must be a power of two >= 64, got {page_size}")
    rows, width = arr.shape
    dim = width - el.extra
    row_bytes = width * arr.dtype.itemsize
    rpp, ppr = _file_geometry(row_bytes, page_size)
    data_offset = page_size * -(-HEADER_BYTES // page_size)
    n_pages = rows * ppr if ppr > 1 else -(-rows // rpp)
    crc_offset = data_offset + n_pages * page_size
    head = _HEADER.pack(FILE_MAGIC, FILE_VERSION, el.code, rows, dim, page_size,
                        data_offset, crc_offset, b"\0" * 12)
    head += struct.pack("<I", zlib.crc32(head))
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_body(tmp, head, arr, rows, row_bytes, rpp, ppr, page_size, data_offset)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_body(tmp: Path, head: bytes, arr, rows, row_bytes, rpp, ppr, page_size, data_offset) -> None:
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
        crcs = row_crcs(raw).tobytes()
        f.write(crcs + struct.pack("<I", zlib.crc32(crcs)))


@dataclass(frozen=True)
class TableFile:
    """A parsed, validated table-file header plus the geometry derived from it."""
    path: Path
    elem: str
    rows: int
    dim: int
    page_size: int
    data_offset: int
    crcs: np.ndarray = field(repr=False, compare=False)   # u32 per row (the trailer)
    # geometry, derived once (the readers use it per row)
    width: int = field(init=False, repr=False, compare=False)
    row_bytes: int = field(init=False, repr=False, compare=False)
    rows_per_page: int = field(init=False, repr=False, compare=False)
    pages_per_row: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        width = ELEMS[self.elem].width(self.dim)
        row_bytes = width * DTYPES[self.elem].itemsize
        rpp, ppr = _file_geometry(row_bytes, self.page_size)
        for k, v in (("width", width), ("row_bytes", row_bytes), ("rows_per_page", rpp), ("pages_per_row", ppr)):
            object.__setattr__(self, k, v)

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.elem]


    @property
    def n_pages(self) -> int:
        rpp, ppr = _file_geometry(self.row_bytes, self.page_size)
        return self.rows * ppr if ppr > 1 else -(-self.rows // rpp)

    @property
    def crc_offset(self) -> int:
        return self.data_offset + self.n_pages * self.page_size

    @property
    def file_bytes(self) -> int:
        return self.crc_offset + 4 * self.rows + 4

    def page_of(self, index: int) -> int:
        rpp, ppr = _file_geometry(self.row_bytes, self.page_size)
        return index * ppr if ppr > 1 else index // rpp

    def corrupt_row_error(self, index: int, crc: int) -> TableFileError:
        """The error for row ``index`` whose bytes have CRC ``crc`` instead of the stored one."""
        return TableFileError(
            f"{self.path}: row {index} (page {self.page_of(index)}, file offset {self.row_offset(index)}) "
            f"is corrupt: CRC-32 {crc:#010x}, the file says {int(self.crcs[index]):#010x}")

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


def open_table_file(path, *, verify: bool = False) -> TableFile:
    """Parse and validate a table file's header, size and row-CRC trailer (``verify``: also
    check every row now, see :func:`verify_table_file`); :class:`TableFileError` names the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as exc:
        raise TableFileError(f"{path}: cannot read table file ({exc.strerror or exc})") from exc
    if len(head) < HEADER_BYTES:
        raise TableFileError(f"{path}: truncated header ({len(head)} of {HEADER_BYTES} bytes)")
    magic, version, code, rows, dim, page_size, data_offset, crc_offset, _ = _HEADER.unpack(head[:60])
    if magic != FILE_MAGIC:
        raise TableFileError(f"{path}: not an evssd table file (magic {magic!r}, expected {FILE_MAGIC!r})")
    (crc,) = struct.unpack("<I", head[60:64])
    if crc != zlib.crc32(head[:60]):
        raise TableFileError(f"{path}: header checksum mismatch (stored {crc:#010x}, "
                             f"computed {zlib.crc32(head[:60]):#010x}): the header is corrupt")
    if version == 1:
        raise TableFileError(f"{path}: table-file format version 1 has no row checksums and is no longer "
                             f"read; rewrite the table with write_table_file (format {FILE_VERSION})")
    if version != FILE_VERSION:
        raise TableFileError(f"{path}: unsupported version {version} (this reader knows {FILE_VERSION})")
    if code not in _CODE_ELEM:
        raise TableFileError(f"{path}: unknown dtype code {code}")
    if rows < 1 or dim < 1 or page_size < 64 or page_size & (page_size - 1) or data_offset % page_size:
        raise TableFileError(f"{path}: inconsistent header (rows={rows}, dim={dim}, "
                             f"page_size={page_size}, data_offset={data_offset})")
    tf = TableFile(path, _CODE_ELEM[code].name, rows, dim, page_size, data_offset, np.zeros(0, "<u4"))
    if crc_offset != tf.crc_offset:
        raise TableFileError(f"{path}: inconsistent header (crc_offset={crc_offset}, the geometry puts the "
                             f"row checksums at {tf.crc_offset})")
    if size < tf.file_bytes:
        raise TableFileError(f"{path}: truncated: {size} bytes, the header describes {tf.file_bytes} "
                             f"({rows} rows x {dim} {tf.elem} in {tf.n_pages} pages of {page_size} B)")
    if size > tf.file_bytes:
        raise TableFileError(f"{path}: {size - tf.file_bytes} trailing bytes after the row checksums")
    with open(path, "rb") as f:
        f.seek(crc_offset)
        trailer = f.read(4 * rows + 4)
    (tcrc,) = struct.unpack("<I", trailer[-4:])
    if tcrc != zlib.crc32(trailer[:-4]):
        raise TableFileError(f"{path}: the row-checksum trailer at offset {crc_offset} is corrupt "
                             f"(CRC-32 {zlib.crc32(trailer[:-4]):#010x}, stored {tcrc:#010x})")
    object.__setattr__(tf, "crcs", np.frombuffer(trailer[:-4], dtype="<u4").copy())
    if verify:
        verify_table_file(tf)
    return tf


def verify_table_file(tf: TableFile, chunk_rows: int = 1 << 16) -> None:
    """Check every row of an open table file against its CRC; the error names the first bad row."""
    if not isinstance(tf, TableFile):
        tf = open_table_file(tf)
    rpp, ppr = _file_geometry(tf.row_bytes, tf.page_size)
    with open(tf.path, "rb") as f:
        for r0 in range(0, tf.rows, chunk_rows):
            r1 = min(tf.rows, r0 + chunk_rows)
            if ppr > 1:
                f.seek(tf.row_offset(r0))
                raw = np.frombuffer(f.read((r1 - r0) * ppr * tf.page_size), np.uint8)
                rows = raw.reshape(r1 - r0, ppr * tf.page_size)[:, :tf.row_bytes]
            else:
                p0, p1 = r0 // rpp, -(-r1 // rpp)
                f.seek(tf.data_offset + p0 * tf.page_size)
                raw = np.frombuffer(f.read((p1 - p0) * tf.page_size), np.uint8)
                pages = raw.reshape(p1 - p0, tf.page_size)[:, :rpp * tf.row_bytes]
                rows = pages.reshape(-1, tf.row_bytes)[r0 - p0 * rpp:r1 - p0 * rpp]
            got = row_crcs(np.ascontiguousarray(rows))
            bad = np.flatnonzero(got != tf.crcs[r0:r1])
            if bad.size:
                i = r0 + int(bad[0])
                raise tf.corrupt_row_error(i, int(got[bad[0]]))

