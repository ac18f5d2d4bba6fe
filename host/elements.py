"""The host's element-type table: one entry per row format a table may hold.

The device's element types come from :class:`evssd.hw.regmap.ElemType` (the one definition that
crosses the hardware/host line); every host module (store, layout, cache, pooling) reads its
names, numpy dtypes and pooled dtypes from :data:`ELEMS` instead of keeping its own copy.

``int8_rowwise`` (the device's ``ElemType.INT8_ROWWISE``, kept out of :data:`DEVICE_ELEMS`
because its rows are plain bytes that no dtype identifies)
    FBGEMM's row-wise quantized INT8 (``SparseType.INT8`` of the inference TBE
    ``IntNBitTableBatchedEmbeddingBagsCodegen``): each stored row is ``4 + dim`` bytes, an fp16
    scale, an fp16 bias, then ``dim`` uint8 codes; element ``j`` is ``scale * q[j] + bias``.
    Stored as a ``uint8 [rows, dim + 4]`` array; pooled sums are fp32.

Names are the short lower-case ones users type (``"fp32"``); ``code`` is the element type's number
in table files (the device types keep their ElemType value).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evssd.hw.regmap import ROWWISE_HEADER_BYTES, ElemType

__all__ = ["Elem", "ELEMS", "DEVICE_ELEMS", "ELEM_OF_DEVICE", "elem_of_dtype", "ElemError",
           "INT8_ROWWISE", "ROWWISE_HEADER_BYTES"]


class ElemError(ValueError):
    """A dtype or element-type name the host does not support."""


@dataclass(frozen=True)
class Elem:
    """One element type: how its rows are stored and what pooling them gives."""
    name: str
    code: int                    # table-file code (ElemType value for the device's types)
    storage: np.dtype            # dtype of the stored row array
    pooled: np.dtype             # dtype of pooled sums
    device: ElemType | None      # the device's type
    extra: int = 0               # storage columns per row beyond ``dim`` (scale + bias bytes)

    def width(self, dim: int) -> int:
        """Columns of the stored row array for ``dim`` logical elements."""
        return dim + self.extra

    def row_bytes(self, dim: int) -> int:
        return self.width(dim) * self.storage.itemsize

    @property
    def is_float(self) -> bool:
        """Pooled sums are float32 (the NaN, -0.0 and rounding rules apply)."""
        return self.pooled.kind == "f"


def _device_elem(e: ElemType) -> Elem:
    return Elem(e.name.lower(), int(e), np.dtype(e.numpy_dtype), np.dtype(e.pooled_dtype), e)


#: the device's element types, derived from ElemType
DEVICE_ELEMS: dict[str, Elem] = {el.name: el for el in map(_device_elem, ElemType)
                                 if el.device is not ElemType.INT8_ROWWISE}

# table-file code 16 (older than the device type; kept so existing table files load)
INT8_ROWWISE = Elem("int8_rowwise", 16, np.dtype(np.uint8), np.dtype("<f4"), ElemType.INT8_ROWWISE,
                    extra=ElemType.INT8_ROWWISE.header_bytes)

#: the host's entry of every device element type
ELEM_OF_DEVICE: dict[ElemType, Elem] = {**{el.device: el for el in DEVICE_ELEMS.values()},
                                        ElemType.INT8_ROWWISE: INT8_ROWWISE}

#: every element type the host stores, by name
ELEMS: dict[str, Elem] = {**DEVICE_ELEMS, INT8_ROWWISE.name: INT8_ROWWISE}


def elem_of_dtype(dtype) -> Elem:
    """The device element type whose rows have numpy ``dtype`` (any byte order of the same kind
    and size); :class:`ElemError` names the dtype otherwise. ``int8_rowwise`` is never inferred
    from a dtype (its rows are plain uint8): name it explicitly."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ElemError(f"unsupported element type {dtype!r} (supported: {', '.join(DEVICE_ELEMS)})") from None
    for el in DEVICE_ELEMS.values():
        if dt.kind == el.storage.kind and dt.itemsize == el.storage.itemsize:
            return el
    raise ElemError(f"unsupported element type {dt} (supported: {', '.join(DEVICE_ELEMS)}; "
                    f"int8_rowwise tables are given as RowwiseInt8 rows)")
