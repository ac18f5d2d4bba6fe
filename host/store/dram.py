"""The ``dram`` backend: every row in host memory, the ideal the others are measured against.
The store pools straight from its arrays (:meth:`DramBackend.table_array`)."""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

from evssd.host.rowmem import available_memory, is_on_cache_line, on_cache_lines
from evssd.host.store.backend import Backend, Tables
from evssd.host.store.tables import TableInfo, table_info

__all__ = ["DramBackend"]


class DramBackend(Backend):
    """All rows in memory. ``bytes_read`` counts the row bytes copied out.

    :meth:`create` keeps each given array when it starts on a cache line and is contiguous, and
    otherwise serves a copy that does (:func:`evssd.host.rowmem.on_cache_lines`: a row split
    across an extra cache line nearly doubled the pooling's cost), so a store built from arrays
    may or may not see later writes to them: rewrite a table through a new store. A copy that
    would take more than half the memory still available (Linux ``MemAvailable``) is not made:
    that table is served where it is, slower, with a warning saying so (an optimisation must
    not run the machine out of memory)."""
    name = "dram"

    def __init__(self, arrays: Mapping[str, np.ndarray], infos: Mapping[str, TableInfo] | None = None):
        super().__init__()
        self.arrays = dict(arrays)
        self.infos = dict(infos) if infos is not None else \
            {n: TableInfo(n, a.shape[0], a.shape[1], a.dtype) for n, a in self.arrays.items()}

    @classmethod
    def create(cls, tables: Tables) -> "DramBackend":
        arrays = {}
        for n, (a, _, _) in tables.items():
            # memory is asked about only for a table that needs the copy
            avail = None if is_on_cache_line(a) else available_memory()
            arrays[n] = on_cache_lines(a, None if avail is None else avail // 2)
            if not is_on_cache_line(arrays[n]):
                warnings.warn(f"table {n!r}: served from its own memory, which does not start on a "
                              f"cache line: a {a.nbytes / 2**30:.1f} GiB aligned copy would take more "
                              f"than half the memory available; pooling it costs up to 2x more (give "
                              f"it as evssd.host.rowmem.empty_rows builds it, or as a .npy memmap)",
                              stacklevel=4)
        return cls(arrays, {n: table_info(n, a, el) for n, (a, el, _) in tables.items()})

    def table_infos(self):
        return dict(self.infos)

    def read_rows(self, info, indices):
        self._count(1, len(indices), len(indices) * info.row_bytes)
        return self.arrays[info.name][indices]

    def table_array(self, info):
        return self.arrays[info.name]


