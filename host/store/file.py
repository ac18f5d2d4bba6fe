"""The ``file`` backend: tables in table files (:mod:`.tablefile`) on the local disk, read with
``os.pread`` page by page (the block-SSD baseline) or row by row, each row checked against its
CRC-32."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from evssd.host.rowmem import empty_rows
from evssd.host.store.backend import Backend, Tables
from evssd.host.store.errors import StoreInputError, TableFileError
from evssd.host.store.tablefile import TableFile, open_table_file, write_table_file
from evssd.host.store.tables import TableInfo, check_table_name

__all__ = ["FileBackend"]


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

    ``verify`` (default True) checks every row read against its CRC-32 from the file's trailer
    and raises :class:`TableFileError` naming the row and page when they differ.
    ``owned_dir``: a directory the backend created for its files, removed by :meth:`close`.
    """
    name = "file"

    def __init__(self, files: Mapping[str, TableFile], mode: str = "row", *, direct: bool = False,
                 io_threads: int = 1, direct_align: int = 512, verify: bool = True,
                 owned_dir: Path | None = None):
        super().__init__()
        self.owned_dir = owned_dir
        self.verify = bool(verify)
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

    @classmethod
    def create(cls, tables: Tables, *, path=None, file_mode: str = "row", page_size: int = 4096,
               direct: bool = False, io_threads: int = 1, direct_align: int = 512, verify: bool = True,
               file_options: Mapping | None = None) -> "FileBackend":
        """Write every table as ``<path>/<name>.evt`` (a fresh temporary directory, removed by
        :meth:`close`, when ``path`` is None) and open them; ``file_options`` is the older spelling
        of ``direct`` / ``io_threads`` / ``direct_align`` / ``verify``."""
        opts = dict(direct=direct, io_threads=io_threads, direct_align=direct_align, verify=verify)
        for k, v in (file_options or {}).items():
            if k not in opts:
                raise StoreInputError(f"file_options: unknown option {k!r} (known: {', '.join(opts)})")
            opts[k] = v
        owned = None
        if path is None:
            d = owned = Path(tempfile.mkdtemp(prefix="evssd-store-"))
        else:
            d = Path(path)
            d.mkdir(parents=True, exist_ok=True)
        try:
            files = {n: open_table_file(write_table_file(d / f"{check_table_name(n)}.evt", src, page_size=page_size))
                     for n, (_, _, src) in tables.items()}
            return cls(files, mode=file_mode, owned_dir=owned, **opts)
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise

    def table_infos(self) -> dict[str, TableInfo]:
        return {n: TableInfo(n, tf.rows, tf.dim, tf.dtype, tf.elem) for n, tf in self.files.items()}

    def _spans(self, tf: TableFile, idx: np.ndarray) -> tuple[list, list, list]:
        """(file offsets, lengths, row starts within the span) of the reads for rows ``idx``."""
        idx = idx.astype(np.int64, copy=False)
        rpp, ppr, ps, rb = tf.rows_per_page, tf.pages_per_row, tf.page_size, tf.row_bytes
        if ppr > 1:
            row_off = tf.data_offset + idx * (ppr * ps)
        else:
            row_off = tf.data_offset + (idx // rpp) * ps + (idx % rpp) * rb
        if self.mode == "page":
            if ppr > 1:
                off, n, start = row_off, np.full(idx.size, ppr * ps), np.zeros(idx.size, np.int64)
            else:
                off, n, start = tf.data_offset + (idx // rpp) * ps, np.full(idx.size, ps), (idx % rpp) * rb
        elif not self.direct:
            off, n, start = row_off, np.full(idx.size, rb), np.zeros(idx.size, np.int64)
        else:
            a = self.align
            off = row_off - row_off % a
            n = -(-(row_off + rb) // a) * a - off
            start = row_off - off
        return off.tolist(), n.tolist(), start.tolist()

    def _buffer(self, size: int):
        import mmap
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, -(-size // 4096) * 4096)  # page-aligned, as O_DIRECT requires
            self._tls.buf = buf
        return buf

    def _read_range(self, tf: TableFile, fd: int, indices: np.ndarray, out: np.ndarray) -> int:
        rb = tf.row_bytes
        total = 0
        offs, lens, starts = self._spans(tf, indices)
        want = tf.crcs[indices].tolist() if self.verify else None
        for k in range(len(offs)):
            off, n, start = offs[k], lens[k], starts[k]
            if self.direct:
                buf = self._buffer(n)
                got = os.preadv(fd, [memoryview(buf)[:n]], off)
                data = buf
            else:
                data = os.pread(fd, n, off)
                got = len(data)
            if got != n:
                raise TableFileError(f"{tf.path}: short read for row {int(indices[k])} at offset {off} "
                                     f"({got} of {n} bytes)")
            row = memoryview(data)[start:start + rb]
            if want is not None:
                crc = zlib.crc32(row)
                if crc != want[k]:
                    raise tf.corrupt_row_error(int(indices[k]), crc)
            out[k] = np.frombuffer(row, np.uint8)
            total += n
        return total

    def read_rows(self, info, indices):
        tf = self.files[info.name]
        fd = self._fds[info.name]
        out = empty_rows((len(indices), tf.row_bytes), np.uint8)
        idx = np.asarray(indices, dtype=np.int64)
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
        return dict(super().stats(), mode=self.mode, direct=self.direct, io_threads=self.io_threads,
                    verify=self.verify)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None


