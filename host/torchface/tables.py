"""Table descriptions shared by the evssd.torch modules, and FBGEMM's INT8 row layout.

A :class:`TableSpec` is what evssd needs to know about one TorchRec table: its name, shape,
element kind, pooling and the features that look it up. :func:`specs_from_configs` reads them
from TorchRec ``EmbeddingBagConfig`` objects; :func:`embedding_names` gives the output keys
exactly as TorchRec's EBC names them (``feature@table`` when a feature feeds several tables).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evssd.host.elements import INT8_ROWWISE

#: bytes of the fp16 scale and fp16 bias in front of an FBGEMM INT8 row
INT8_ROWWISE_HEADER = INT8_ROWWISE.extra

__all__ = ["TableSpec", "TorchFaceError", "specs_from_configs", "embedding_names", "KINDS",
           "rows_from_fbgemm", "rows_to_fbgemm"]

#: element kinds: fp32 / fp16 rows, or FBGEMM row-wise INT8 (fp16 scale + bias + uint8 codes)
KINDS = ("fp32", "fp16", "int8_rowwise")


class TorchFaceError(ValueError):
    """A bad argument to an evssd.torch module (names the argument and the value)."""


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    kind: str = "fp32"                 # one of KINDS
    pooling: str = "sum"               # "sum" or "mean"
    features: tuple[str, ...] = ()
    row_alignment: int = 16            # int8_rowwise: bytes a TorchRec state_dict row is padded to
    quantized: bool = False            # from TorchRec's quantized EBC: FBGEMM byte rows in its state_dict
    fbgemm_kernel: bool = False        # pooled as FBGEMM's kernels do (MEAN = sum * 1/length, fp32 bags)

    def __post_init__(self):
        if not self.name:
            raise TorchFaceError("a table needs a non-empty name")
        if self.rows < 1 or self.dim < 1:
            raise TorchFaceError(f"table {self.name!r}: rows and dim must be >= 1, got {self.rows} x {self.dim}")
        if self.kind not in KINDS:
            raise TorchFaceError(f"table {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in ("sum", "mean"):
            raise TorchFaceError(f"table {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}")

    @property
    def fp16_output(self) -> bool:
        """Pooled bags rounded to fp16: a float EBC's ``nn.EmbeddingBag`` on an fp16 table sums in
        fp32 and returns fp16; FBGEMM's inference kernels (quantized EBC) return fp32."""
        return self.kind == "fp16" and not (self.quantized or self.fbgemm_kernel)

    @property
    def mean_by_reciprocal(self) -> bool:
        """MEAN as FBGEMM's kernels take it (quantized EBC, TBE): sum * (1 / length)."""
        return self.pooling == "mean" and (self.quantized or self.fbgemm_kernel)

    @property
    def itemsize(self) -> int:
        return {"fp32": 4, "fp16": 2, "int8_rowwise": 1}[self.kind]

    @property
    def stored_row_bytes(self) -> int:
        """Bytes of one row as evssd stores it (INT8: header + codes, no alignment padding)."""
        if self.kind == "int8_rowwise":
            return INT8_ROWWISE_HEADER + self.dim
        return self.dim * self.itemsize

    @property
    def fbgemm_row_bytes(self) -> int:
        """Bytes of one row in a TorchRec quantized state_dict (padded to ``row_alignment``)."""
        a = self.row_alignment
        return -(-self.stored_row_bytes // a) * a


def _pooling_name(pooling) -> str:
    name = getattr(pooling, "value", pooling)
    name = str(name).lower()
    if name not in ("sum", "mean"):
        raise TorchFaceError(f"pooling {pooling!r} is not supported (SUM or MEAN)")
    return name


def _kind_of(data_type) -> str:
    name = str(getattr(data_type, "value", data_type)).upper()
    kinds = {"FP32": "fp32", "FP16": "fp16", "INT8": "int8_rowwise"}
    if name not in kinds:
        raise TorchFaceError(f"data type {data_type!r} is not supported (FP32, FP16, INT8)")
    return kinds[name]


def specs_from_configs(configs, *, row_alignment: int = 16, quantized: bool = False) -> list[TableSpec]:
    """TorchRec ``EmbeddingBagConfig``s -> :class:`TableSpec` list (same order).

    ``quantized``: the configs of a quantized EBC (FBGEMM's inference kernels return fp32 bags for
    fp16 tables); a float EBC's ``nn.EmbeddingBag`` sums fp16 rows in fp32 and returns fp16 bags.
    """
    specs, seen = [], set()
    for c in configs:
        name = c.name
        if name in seen:
            raise TorchFaceError(f"duplicate table name {name!r}")
        seen.add(name)
        feats = tuple(c.feature_names) or (name,)
        try:
            kind = _kind_of(c.data_type)
            if kind == "int8_rowwise" and not quantized:
                raise TorchFaceError("INT8 tables come from a quantized EBC (torchrec.quant)")
            specs.append(TableSpec(name, int(c.num_embeddings), int(c.embedding_dim), kind,
                                   _pooling_name(c.pooling), feats, row_alignment, quantized))
        except TorchFaceError as exc:
            raise TorchFaceError(f"table {name!r}: {exc}") from None
    if not specs:
        raise TorchFaceError("no tables given")
    return specs


def embedding_names(specs) -> list[str]:
    """Output keys in TorchRec's order: per table, per feature; ``feature@table`` for a feature
    that several tables look up."""
    count: dict[str, int] = {}
    for s in specs:
        for f in s.features:
            count[f] = count.get(f, 0) + 1
    return [f if count[f] == 1 else f"{f}@{s.name}" for s in specs for f in s.features]


def rows_from_fbgemm(weight, spec: TableSpec) -> np.ndarray:
    """A quantized TorchRec/FBGEMM weight (uint8 ``[rows, >= row bytes]``, padded to the row
    alignment) -> the rows evssd stores: INT8: uint8 ``[rows, 4 + dim]`` (fp16 scale, fp16 bias,
    codes: the store's ``int8_rowwise``); FP16/FP32: ``[rows, dim]`` of that type. The padding is
    dropped."""
    w = np.asarray(weight)
    if w.dtype != np.uint8 and w.dtype != np.int8:
        raise TorchFaceError(f"table {spec.name!r}: a quantized weight must be uint8 bytes, got {w.dtype}")
    if w.ndim != 2 or w.shape[0] != spec.rows or w.shape[1] < spec.stored_row_bytes:
        raise TorchFaceError(f"table {spec.name!r}: weight must be [{spec.rows}, >= {spec.stored_row_bytes}] "
                             f"bytes, got shape {tuple(w.shape)}")
    rows = np.ascontiguousarray(w[:, :spec.stored_row_bytes])
    dtype = {"int8_rowwise": np.uint8, "fp16": np.float16, "fp32": np.float32}[spec.kind]
    return rows.view(dtype)


def rows_to_fbgemm(rows: np.ndarray, spec: TableSpec) -> np.ndarray:
    """Inverse of :func:`rows_from_fbgemm`: uint8 ``[rows, fbgemm_row_bytes]``, zero padding."""
    out = np.zeros((rows.shape[0], spec.fbgemm_row_bytes), np.uint8)
    out[:, :spec.stored_row_bytes] = np.ascontiguousarray(rows).view(np.uint8)
    return out
