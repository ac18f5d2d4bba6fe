"""What a table is to the store: its shape and element type (:class:`TableInfo`), the accepted
ways to hand one over (array, ``.npy`` path, torch tensor/module, :class:`RowwiseInt8`), and the
names a table may have (no path separators or ``..``: names become file names)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evssd.host.elements import ELEMS, INT8_ROWWISE, Elem, ElemError, elem_of_dtype
from evssd.host.store.errors import StoreInputError

__all__ = ["DTYPES", "TableInfo", "RowwiseInt8", "quantize_rowwise_int8", "dtype_name", "check_table",
           "check_table_name", "table_info"]

#: element types a table may hold: name -> numpy dtype of the stored rows (from host.elements)
DTYPES: dict[str, np.dtype] = {name: el.storage for name, el in ELEMS.items()}


def check_table_name(name) -> str:
    """A table name as a string; refuses names that could leave the store directory."""
    if not isinstance(name, str) or not name:
        raise StoreInputError(f"table name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise StoreInputError(f"table name {name!r} contains a path separator, NUL or '..': "
                              f"table names become file names inside the store directory")
    return name


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
    # derived once (read on every lookup)
    el: Elem = field(init=False, repr=False, compare=False)
    width: int = field(init=False, repr=False, compare=False)      # columns of the stored rows
    row_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "dtype", np.dtype(self.dtype))
        if not self.elem:
            set_(self, "elem", dtype_name(self.dtype))
        elif self.elem not in ELEMS:
            raise StoreInputError(f"table {self.name!r}: unknown element type {self.elem!r}")
        el = ELEMS[self.elem]
        if self.dtype != el.storage:
            raise StoreInputError(f"table {self.name!r}: {self.elem} rows are stored as {el.storage}, got {self.dtype}")
        set_(self, "el", el)
        set_(self, "width", el.width(self.dim))
        set_(self, "row_bytes", self.width * self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def acc_dtype(self) -> np.dtype:
        """dtype of pooled sums: float32 for float rows, int32 for integer rows."""
        return self.el.pooled


def table_info(name: str, arr: np.ndarray, el: Elem) -> TableInfo:
    return TableInfo(name, arr.shape[0], arr.shape[1] - el.extra, el.storage, el.name)


def check_table(name: str, arr) -> tuple[np.ndarray, Elem]:
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
        except (TypeError, RuntimeError) as exc:  # e.g. a torch.bfloat16 tensor numpy cannot hold
            raise StoreInputError(f"table {name!r}: unsupported element type "
                                  f"{getattr(arr, 'dtype', type(arr).__name__)} (supported: "
                                  f"{', '.join(ELEMS)}; convert it first) ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise StoreInputError(f"table {name!r}: expected an array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise StoreInputError(f"table {name!r}: expected a 2-D array [rows, dim], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise StoreInputError(f"table {name!r}: empty table of shape {arr.shape}")
    try:
        elem = dtype_name(arr.dtype)
    except StoreInputError as exc:
        raise StoreInputError(f"table {name!r}: {exc}") from None
    return np.ascontiguousarray(arr, dtype=DTYPES[elem])

