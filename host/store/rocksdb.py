"""The ``rocksdb`` backend: rows in RocksDB (rocksdict), the SSD tier of FBGEMM SSD-TBE and
HugeCTR HPS."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from evssd.host.elements import ELEMS
from evssd.host.store.backend import Backend, Tables
from evssd.host.store.errors import StoreError, StoreInputError
from evssd.host.store.tables import DTYPES, TableInfo, dtype_name, table_info

__all__ = ["RocksDBBackend"]


class RocksDBBackend(Backend):
    """Rows in RocksDB (rocksdict), one column family per table, key = index as 8 big-endian bytes.

    The default column family holds ``_META_KEY`` -> JSON ``{name: [rows, dim, elem]}`` so that
    :meth:`EmbeddingStore.from_rocksdb` can reopen a database without the arrays.
    """
    name = "rocksdb"
    thread_safe = False  # rocksdict's handles are not documented as thread-safe: serialise
    _META_KEY = b"evssd-tables"

    def __init__(self, path, tables: Mapping[str, TableInfo] | None = None, *, owned_dir: Path | None = None,
                 block_cache_bytes: int | None = None):
        """``block_cache_bytes``: RocksDB's own LRU block cache (None: RocksDB's default, which
        differs between versions -- 8 MiB in older releases, 32 MiB in newer ones -- and moves
        read throughput a lot when the cache in front of it is small)."""
        super().__init__()
        from rocksdict import BlockBasedOptions, Cache, Options, Rdict
        if block_cache_bytes is not None and (not isinstance(block_cache_bytes, int) or block_cache_bytes < 1):
            raise StoreInputError(f"block_cache_bytes must be a positive integer or None, got {block_cache_bytes!r}")
        self.owned_dir = owned_dir
        self.block_cache_bytes = block_cache_bytes
        self.path = str(path)
        self._opts = Options(raw_mode=True)
        if block_cache_bytes is not None:
            table = BlockBasedOptions()
            table.set_block_cache(Cache(block_cache_bytes))
            self._opts.set_block_based_table_factory(table)
        self._opts.create_if_missing(True)
        self._opts.create_missing_column_families(True)
        self.db = Rdict(self.path, self._opts)
        self._cf = {}
        self.infos = dict(tables or {})

    @classmethod
    def create(cls, tables: Tables, *, path=None, block_cache_bytes: int | None = None) -> "RocksDBBackend":
        """Load every table into a database at ``path`` (a fresh temporary directory, removed by
        :meth:`close`, when None)."""
        owned = None
        if path is None:
            path = owned = Path(tempfile.mkdtemp(prefix="evssd-store-rocksdb-"))
        be = None
        try:
            be = cls(path, {n: table_info(n, a, el) for n, (a, el, _) in tables.items()}, owned_dir=owned,
                     block_cache_bytes=block_cache_bytes)
            for n, (a, el, _) in tables.items():
                be.load(n, a, elem=el.name)
            return be
        except BaseException:
            if be is not None:
                be.close()
            elif owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise

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

    def stats(self):
        return dict(super().stats(), block_cache_bytes=self.block_cache_bytes)

    def close(self):
        self._cf.clear()
        try:
            self.db.close()
        except Exception:
            pass
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
            self.owned_dir = None


