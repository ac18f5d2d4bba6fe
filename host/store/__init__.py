"""The embedding store: one lookup API (:class:`EmbeddingStore`) over interchangeable backends.

One module per idea: :mod:`.tables` (what a table is), :mod:`.tablefile` (the on-disk format),
:mod:`.lru` (the plain-LRU peer and the cache factory), :mod:`.backend` (the
interface) and one module per backend (:mod:`.dram`, :mod:`.file`, :mod:`.rocksdb`,
:mod:`.evssd`), and :mod:`.store` (the store itself). The pooling definition and its kernels are
:mod:`evssd.host.pooling`; the batch deduplication both the store and the EV-Cache use is
:mod:`evssd.host.dedupe`.
"""
from __future__ import annotations

from evssd.host.store.backend import Backend
from evssd.host.dedupe import dedupe
from evssd.host.store.dram import DramBackend
from evssd.host.store.errors import StoreClosedError, StoreError, StoreInputError, TableFileError
from evssd.host.store.evssd import EvssdBackend
from evssd.host.store.file import FileBackend
from evssd.host.store.lru import PlainLRU
from evssd.host.store.rocksdb import RocksDBBackend
from evssd.host.store.store import BACKENDS, EmbeddingStore, pool_deduplicated
from evssd.host.store.tablefile import (FILE_VERSION, TableFile, open_table_file, verify_table_file,
                                        write_table_file)
from evssd.host.store.tables import DTYPES, RowwiseInt8, TableInfo, dtype_name, quantize_rowwise_int8

__all__ = [
    "EmbeddingStore", "TableInfo", "StoreError", "StoreInputError", "TableFileError", "StoreClosedError",
    "BACKENDS",
    "PlainLRU", "TableFile", "write_table_file", "open_table_file", "verify_table_file", "FILE_VERSION",
    "DTYPES", "pool_deduplicated", "RowwiseInt8", "quantize_rowwise_int8", "dtype_name", "dedupe",
    "Backend", "DramBackend", "FileBackend", "RocksDBBackend", "EvssdBackend",
]
