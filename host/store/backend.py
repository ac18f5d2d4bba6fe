"""The backend interface: where rows live. Each backend module defines one subclass that builds
itself from the tables (:meth:`Backend.create`, taking only its own options) and says what it
can do (:meth:`Backend.pools`, :meth:`Backend.table_array`, ``thread_safe``); the store asks,
it never switches on a backend's name."""
from __future__ import annotations

import inspect
import threading
from typing import Mapping

import numpy as np

from evssd.host.elements import Elem
from evssd.host.store.errors import StoreInputError
from evssd.host.store.tables import TableInfo

__all__ = ["Backend", "Tables"]

#: what :meth:`Backend.create` gets: name -> (stored row matrix, element type, the caller's object)
Tables = Mapping[str, tuple[np.ndarray, Elem, object]]


class Backend:
    """Reads rows by index. ``read_rows`` gets distinct, validated, ascending int64 indices and
    returns ``[n, width]`` rows of the table's stored dtype.

    ``thread_safe``: whether the store may call it from several threads at once; if not, the
    store serialises its calls.
    """
    name = "?"
    thread_safe = True

    @classmethod
    def create(cls, tables: Tables, **options) -> "Backend":
        """Build the backend holding ``tables``; ``options`` are the backend's own keywords."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options :meth:`create` takes (checked by the store before calling it)."""
        params = inspect.signature(cls.create).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def check_options(cls, options: Mapping) -> None:
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise StoreInputError(f"backend {cls.name!r} takes no option {', '.join(map(repr, unknown))} "
                                  f"(its options: {', '.join(cls.option_names()) or 'none'})")

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

    def table_infos(self) -> dict[str, TableInfo]:
        """The tables this backend holds (name -> TableInfo)."""
        raise NotImplementedError

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


