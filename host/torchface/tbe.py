"""FBGEMM's calling convention on evssd tables: ``TableBatchedEmbeddingBags``.

``forward(indices, offsets, per_sample_weights=None)`` as FBGEMM's table-batched embedding bag
(``SplitTableBatchedEmbeddingBagsCodegen``): the indices of all T features concatenated,
``offsets`` of T*B+1 entries (feature-major), output ``[B, sum of the features' dims]``.
Feature t looks up table ``feature_table_map[t]`` (several features may share a table).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .core import EmbeddingTables, FeatureRequest
from .tables import TableSpec, TorchFaceError

__all__ = ["TableBatchedEmbeddingBags"]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class TableBatchedEmbeddingBags(nn.Module):
    """Tables ``weights`` (list of [rows, dim] fp32/fp16 tensors or arrays), one pooling mode
    ("sum" or "mean") for all, ``feature_table_map`` (default: feature t -> table t)."""

    def __init__(self, weights: Sequence, *, pooling: str = "sum", feature_table_map: Sequence[int] | None = None,
                 backend: str = "dram", **backend_options):
        super().__init__()
        arrays = [_np(w) for w in weights]
        if not arrays:
            raise TorchFaceError("no tables given")
        kinds = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}
        specs = []
        for t, a in enumerate(arrays):
            if a.ndim != 2 or a.dtype not in kinds:
                raise TorchFaceError(f"weights[{t}] must be a 2-D fp32/fp16 table, got {a.dtype} of shape {a.shape}")
            specs.append(TableSpec(f"t{t}", a.shape[0], a.shape[1], kinds[a.dtype], pooling, fbgemm_kernel=True))
        ftm = list(range(len(specs))) if feature_table_map is None else [int(t) for t in feature_table_map]
        for f, t in enumerate(ftm):
            if not 0 <= t < len(specs):
                raise TorchFaceError(f"feature_table_map[{f}] = {t} is not a table (0..{len(specs) - 1})")
        self.feature_table_map = ftm
        self.dims = [specs[t].dim for t in ftm]
        self.tables = EmbeddingTables(specs, {s.name: a for s, a in zip(specs, arrays)}, backend=backend,
                                      **backend_options)

    @classmethod
    def from_fbgemm(cls, tbe, backend: str = "dram", **backend_options) -> "TableBatchedEmbeddingBags":
        """Copy the tables of an FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` (SUM or MEAN)."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        modes = {PoolingMode.SUM: "sum", PoolingMode.MEAN: "mean"}
        if tbe.pooling_mode not in modes:
            raise TorchFaceError(f"pooling mode {tbe.pooling_mode} is not supported (SUM or MEAN)")
        weights = [w.detach() for w in tbe.split_embedding_weights()]
        return cls(weights, pooling=modes[tbe.pooling_mode], feature_table_map=list(tbe.feature_table_map),
                   backend=backend, **backend_options)

    def forward(self, indices, offsets, per_sample_weights=None) -> torch.Tensor:
        idx, offs = _np(indices), _np(offsets)
        T = len(self.feature_table_map)
        if offs.ndim != 1 or offs.size < 1 or (offs.size - 1) % T:
            raise TorchFaceError(f"offsets must have T*B+1 entries for T = {T} features, got shape {offs.shape}")
        if idx.ndim != 1 or (offs.size and int(offs[-1]) != idx.size):
            raise TorchFaceError(f"indices must be 1-D with offsets[-1] = {int(offs[-1])} entries, "
                                 f"got shape {idx.shape}")
        if offs[0] != 0:
            raise TorchFaceError(f"offsets[0] must be 0, got {int(offs[0])}")
        w = None if per_sample_weights is None else _np(per_sample_weights)
        if w is not None and w.shape != idx.shape:
            raise TorchFaceError(f"per_sample_weights must have the shape of indices {idx.shape}, got {w.shape}")
        B = (offs.size - 1) // T
        reqs = []
        for f, t in enumerate(self.feature_table_map):
            o = offs[f * B:(f + 1) * B + 1]
            lo, hi = int(o[0]), int(o[-1])
            reqs.append(FeatureRequest(f"feature {f}", f"t{t}", idx[lo:hi], o - lo,
                                       None if w is None else w[lo:hi]))
        return torch.from_numpy(self.tables.pool(reqs, B))

    def split_embedding_weights(self) -> list[torch.Tensor]:
        """Each table's rows as a tensor (FBGEMM's accessor)."""
        return [torch.from_numpy(self.tables.read_table(f"t{t}")) for t in range(len(self.tables.specs))]

    def close(self) -> None:
        self.tables.close()
