"""``evssd.torch.EmbeddingBagCollection``: TorchRec's EmbeddingBagCollection served by evssd.

An inference ``nn.Module`` with TorchRec's interface: ``forward(KeyedJaggedTensor) ->
KeyedTensor``, ``embedding_bag_configs()``, ``is_weighted()``, and state_dict names
``embedding_bags.<table>.weight``. The tables live in an :class:`~evssd.host.store.EmbeddingStore`
(dram, file, rocksdb or the EV-SSD through any device), optionally behind EV-Cache; see
:class:`~evssd.torch.core.EmbeddingTables` for how a batch is looked up.

Built from a float TorchRec EBC, a quantized one (``torchrec.quant.embedding_modules``, row-wise
INT8/FP16/FP32 tables), or ``EmbeddingBagConfig``s plus weights.
"""
from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .core import EmbeddingTables, FeatureRequest
from .tables import TableSpec, TorchFaceError, embedding_names, rows_to_fbgemm, specs_from_configs

__all__ = ["EmbeddingBagCollection", "kjt_requests"]

_STORE_DEFAULT = object()


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's data as numpy without a copy."""
    return t.detach().cpu().numpy()


def kjt_requests(kjt, feature_tables: list[tuple[str, str]], weighted: bool) -> tuple[list[FeatureRequest], int]:
    """Split a KeyedJaggedTensor into per-feature requests for ``feature_tables`` = [(feature,
    table)] in output order; returns (requests, batch size).

    A plain KJT gives numpy views (no copies). A KJT with ``inverse_indices`` (TorchRec's
    variable batch per feature, ``stride_per_key_per_rank``, or deduplicated bags) gives each
    feature's bags expanded to the batch the inverse indices describe, bag ``b`` being the
    feature's bag ``inverse[feature][b]``: the output TorchRec's EBC returns (it pools, then
    index-selects, and pooling a bag twice gives the same bits).
    """
    keys = kjt.keys()
    pos = {k: i for i, k in enumerate(keys)}
    inverse = kjt.inverse_indices_or_none()
    if kjt.variable_stride_per_key() and inverse is None:
        raise TorchFaceError("a KeyedJaggedTensor with a variable batch size per feature needs inverse_indices "
                             "(as TorchRec's EmbeddingBagCollection does): they give the output's batch")
    if inverse is None:
        B = int(kjt.stride()) if keys else 0
        strides = [B] * len(keys)
    else:
        strides = [int(s) for s in kjt.stride_per_key()] if keys else []
    starts = np.concatenate([[0], np.cumsum(strides)]).astype(np.int64)
    values = _np(kjt.values())
    offsets = _np(kjt.offsets())
    w_all = None
    if weighted:
        w = kjt.weights_or_none()
        if w is None:
            raise TorchFaceError("this module is weighted (is_weighted=True): the KeyedJaggedTensor needs weights")
        w_all = _np(w)
    inv_rows = None
    if inverse is not None:
        inv_keys, inv = inverse[0], _np(inverse[1])
        if inv.ndim != 2 or inv.shape[0] != len(inv_keys) or inv.dtype.kind not in "iu":
            raise TorchFaceError(f"inverse_indices must be (keys, an integer tensor [len(keys), batch]), got "
                                 f"{len(inv_keys)} keys and a {inv.dtype} tensor of shape {tuple(inv.shape)}")
        inv_rows = {k: inv[i] for i, k in enumerate(inv_keys)}
        B = int(inv.shape[1])
    reqs = []
    for feature, table in feature_tables:
        p = pos.get(feature)
        if p is None:
            raise TorchFaceError(f"feature {feature!r} is not in the KeyedJaggedTensor (keys: {keys})")
        o = offsets[starts[p]:starts[p + 1] + 1]
        lo, hi = int(o[0]), int(o[-1])
        vals, offs = values[lo:hi], o - lo
        w = None if w_all is None else w_all[lo:hi]
        if inv_rows is not None:
            vals, offs, w = _expand_bags(feature, inv_rows, vals, offs, w)
        reqs.append(FeatureRequest(feature, table, vals, offs, w))
    return reqs, B


def _expand_bags(feature, inv_rows, vals, offs, w):
    """The bags ``inv_rows[feature]`` of one feature (indices, offsets, weights) as new arrays."""
    sel = inv_rows.get(feature)
    if sel is None:
        raise TorchFaceError(f"feature {feature!r} has no row in the KeyedJaggedTensor's inverse_indices "
                             f"(keys: {list(inv_rows)})")
    sel = sel.astype(np.int64, copy=False)
    n_bags = offs.size - 1
    if sel.size and (sel.min() < 0 or sel.max() >= n_bags):
        bad = int(sel[(sel < 0) | (sel >= n_bags)][0])
        raise TorchFaceError(f"feature {feature!r}: inverse index {bad} out of range [0, {n_bags}) "
                             f"(the feature's batch size)")
    offs = offs.astype(np.int64, copy=False)
    lengths = (offs[1:] - offs[:-1])[sel]
    new_offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # position of every looked-up index in the feature's values: its bag's start + rank in the bag
    src = np.repeat(offs[:-1][sel] - new_offs[:-1], lengths) + np.arange(int(new_offs[-1]), dtype=np.int64)
    return vals[src], new_offs, None if w is None else w[src]


class EmbeddingBagCollection(nn.Module):
    """TorchRec-compatible pooled embedding tables on an evssd backend (inference only).

    Construct with :meth:`from_torchrec` or :meth:`from_configs`; ``backend`` and the options
    are those of :class:`~evssd.torch.core.EmbeddingTables`. :meth:`close` releases the store.
    """

    def __init__(self, configs, weights: Mapping[str, object], *, is_weighted: bool = False,
                 output_dtype: torch.dtype = torch.float32, row_alignment: int = 16, quantized: bool = False,
                 backend: str = "dram", **backend_options):
        super().__init__()
        self._configs = [copy.copy(c) for c in configs]
        specs = specs_from_configs(self._configs, row_alignment=row_alignment, quantized=quantized)
        if quantized:
            # TorchRec's quantized EBC runs one FBGEMM kernel per pooling type, tables grouped by
            # pooling in order of first appearance, and emits its outputs in that order
            groups: dict[str, list] = {}
            for s in specs:
                groups.setdefault(s.pooling, []).append(s)
            specs = [s for g in groups.values() for s in g]
        self._specs = specs
        self._is_weighted = bool(is_weighted)
        self._output_dtype = output_dtype
        self._names = embedding_names(specs)
        self._feature_tables = [(f, s.name) for s in specs for f in s.features]
        self._length_per_key = [s.dim for s in specs for _ in s.features]
        arrays = {n: (_np(w) if isinstance(w, torch.Tensor) else np.asarray(w)) for n, w in weights.items()}
        self.tables = EmbeddingTables(specs, arrays, backend=backend, **backend_options)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_configs(cls, configs, weights: Mapping[str, object], *, is_weighted: bool = False,
                     quantized: bool = False, backend: str = "dram", **backend_options) -> "EmbeddingBagCollection":
        """From TorchRec ``EmbeddingBagConfig``s and ``{table: weight}`` (tensor or array).
        ``quantized``: behave like TorchRec's quantized EBC (INT8 tables take FBGEMM's uint8 rows)."""
        return cls(configs, weights, is_weighted=is_weighted, quantized=quantized, backend=backend,
                   **backend_options)

    @classmethod
    def from_torchrec(cls, ebc, backend: str = "dram", cache_fraction=_STORE_DEFAULT,
                      **backend_options) -> "EmbeddingBagCollection":
        """Copy the tables of a TorchRec EBC (``torchrec.EmbeddingBagCollection`` or the
        quantized ``torchrec.quant.embedding_modules.EmbeddingBagCollection``) into ``backend``.

        ``cache_fraction``: EV-Cache budget per table as a fraction of the table (None: no cache;
        left out: the store's default, 1% for every backend but dram). Other options: see
        :class:`~evssd.torch.core.EmbeddingTables` (``device``, ``block_mode``, ``pack``, ``path``...).
        """
        configs = ebc.embedding_bag_configs()
        sd = ebc.state_dict()
        weights = {}
        for c in configs:
            key = f"embedding_bags.{c.name}.weight"
            if key not in sd:
                raise TorchFaceError(f"the TorchRec module has no {key!r} in its state_dict "
                                     f"(split scale/bias state dicts are not supported)")
            weights[c.name] = sd[key]
        quant = type(ebc).__module__.startswith("torchrec.quant")
        out_dtype = ebc.output_dtype() if quant else torch.float32
        if cache_fraction is not _STORE_DEFAULT:
            backend_options["cache_fraction"] = cache_fraction
        return cls(configs, weights, is_weighted=ebc.is_weighted(), output_dtype=out_dtype,
                   row_alignment=getattr(ebc, "row_alignment", 16), quantized=quant, backend=backend,
                   **backend_options)

    # -- TorchRec interface ---------------------------------------------------------------------

    def embedding_bag_configs(self):
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def store(self):
        """The :class:`~evssd.host.store.EmbeddingStore` holding the tables."""
        return self.tables.store

    def embedding_names(self) -> list[str]:
        return list(self._names)

    def requests(self, kjt):
        """(per-feature requests, batch size) of a KJT: the input of :meth:`plan`."""
        return kjt_requests(kjt, self._feature_tables, self._is_weighted)

    def plan(self, kjt):
        """Validate a KJT and group it into store requests (:class:`~evssd.torch.core.BatchPlan`)."""
        reqs, B = self.requests(kjt)
        return self.tables.plan(reqs, B)

    def keyed_tensor(self, plan, results):
        """The KeyedTensor of a planned batch from its store results (see :meth:`plan`)."""
        from torchrec.sparse.jagged_tensor import KeyedTensor
        values = torch.from_numpy(self.tables.finish(plan, results))
        if self._output_dtype != torch.float32:
            values = values.to(self._output_dtype)
        return KeyedTensor(keys=list(self._names), length_per_key=list(self._length_per_key), values=values)

    def forward(self, features):
        plan = self.plan(features)
        return self.keyed_tensor(plan, self.tables.lookup(plan))

    # -- state_dict with TorchRec's names -------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for s in self._specs:
            rows = self.tables.read_table(s.name)
            if s.quantized:
                rows = rows_to_fbgemm(rows, s)
            destination[f"{prefix}embedding_bags.{s.name}.weight"] = torch.from_numpy(rows)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ours = {f"{prefix}embedding_bags.{s.name}.weight": s for s in self._specs}
        arrays = {}
        for key, s in ours.items():
            if key not in state_dict:
                missing_keys.append(key)
                continue
            arrays[s.name] = _np(state_dict[key])
        for key in state_dict:   # this module has no other parameters, buffers or children
            if key.startswith(prefix) and key not in ours:
                unexpected_keys.append(key)
        if not arrays:
            return
        # As PyTorch does for parameters: the tables the state_dict names are loaded, the others
        # keep their rows (load_state_dict then reports them missing; it always passes strict=True).
        for s in self._specs:
            arrays.setdefault(s.name, self.tables.read_table(s.name))
        try:
            self.tables.replace(arrays)
        except TorchFaceError as exc:
            error_msgs.append(str(exc))

    def close(self) -> None:
        self.tables.close()

    def extra_repr(self) -> str:
        t = ", ".join(f"{s.name}: {s.rows}x{s.dim} {s.kind} {s.pooling.upper()}" for s in self._specs)
        return f"backend={self.tables.backend_name!r}, tables=[{t}]"
