"""The store's errors: every one names the table, the argument and the position at fault."""
from __future__ import annotations

__all__ = ["StoreError", "StoreInputError", "TableFileError", "StoreClosedError"]


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreInputError(StoreError, ValueError):
    """A lookup's input is invalid (unknown table, index out of range, bad offsets, bad dtype)."""


class TableFileError(StoreError, ValueError):
    """A table file is corrupt, truncated or not a table file."""


class StoreClosedError(StoreError, RuntimeError):
    """The store was closed; every lookup after :meth:`EmbeddingStore.close` says so."""
