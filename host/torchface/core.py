"""The tables of one evssd.torch module in one :class:`~evssd.host.store.EmbeddingStore`, and the
pooled lookup of several features per batch (torch-free: numpy in, numpy out).

Features that look up the same table are concatenated into one request per table (one device
command per table and batch); the pooled bags are split back per feature. Tables with the same
row format and pooling can be packed into one store table (rows stacked, indices shifted by the
table's first row, as FBGEMM's table-batched weights are): ``pack=True``, or automatically when
the device has fewer table slots than the module has tables (26 Criteo tables, 16 slots).

Every bag is pooled by the store, by the one pooling definition of :mod:`evssd.host.pooling` (on
the device when it pools): SUM/MEAN of fp32/fp16 rows (bit-exact with ``nn.EmbeddingBag``),
per-sample weights, and FBGEMM's row-wise INT8 (``int8_rowwise``, bit-exact with FBGEMM's
inference kernel). Two output rules of TorchRec's modules are applied here on top: FBGEMM's
inference kernels (quantized EBC, TBE) take MEAN as ``sum * (1 / length)`` (:func:`fbgemm_mean`),
and a float EBC's fp16 tables return their bags rounded to fp16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from evssd.host.rowmem import empty_rows
from .tables import TableSpec, TorchFaceError, rows_from_fbgemm

__all__ = ["EmbeddingTables", "FeatureRequest", "BatchPlan", "BACKENDS", "fbgemm_mean"]

BACKENDS = ("dram", "file", "rocksdb", "evssd")

_AUTO = object()


def fbgemm_mean(sums: np.ndarray, offsets) -> np.ndarray:
    """FBGEMM's inference MEAN of pooled float32 ``sums`` [B, dim]: ``sum * float32(1 / length)``
    (FBGEMM multiplies by the reciprocal where ``nn.EmbeddingBag`` and the store divide); empty
    bags stay zeros. Returns a new array."""
    out = np.array(sums, dtype=np.float32, copy=True)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    nz = lengths > 0
    out[nz] *= (np.float32(1.0) / lengths[nz].astype(np.float32))[:, None]
    return out


@dataclass
class FeatureRequest:
    """One feature of a batch: ``table``, ``indices`` (any int dtype), ``offsets[B+1]``, ``weights``."""
    feature: str
    table: str
    indices: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray | None = None


@dataclass
class BatchPlan:
    """A batch split into store requests: ``groups[mode] = {table: (indices, offsets[, weights])}``
    with mode "sum" or "mean"; ``parts[table]`` = the output column of each of the table's features,
    in bag order."""
    groups: dict
    parts: dict
    n_bags: int
    width: int

    @property
    def single_mode(self):
        """The only store mode this batch needs, or raise (the pipeline runs one mode)."""
        modes = [m for m, reqs in self.groups.items() if reqs]
        if len(modes) != 1:
            raise TorchFaceError(f"this batch needs store modes {modes}; the pipeline runs one")
        return modes[0]


class EmbeddingTables:
    """Tables in an EmbeddingStore with pooled multi-feature lookups.

    ``arrays[name]``: fp32/fp16 ``[rows, dim]``, or FBGEMM's uint8 rows (``int8_rowwise``, and
    fp16/fp32 tables of a quantized EBC).
    ``backend``: dram, file, rocksdb or evssd (``device=`` an open Device: the model, the RTL or a board
    over uart; ``block_mode=True`` switches that device to whole-page reads). ``cache_fraction``: EV-Cache
    budget per table (default: the store's, 1% except dram). Other options go to
    :meth:`EmbeddingStore.from_arrays`. ``pack``: stack tables of one row format and pooling into
    one store table (None: only when an ``evssd`` device has too few table slots).
    """

    def __init__(self, specs: Sequence[TableSpec], arrays: Mapping[str, np.ndarray], *, backend: str = "dram",
                 cache_fraction=_AUTO, block_mode: bool = False, pack: bool | None = None, **backend_options):
        if backend not in BACKENDS:
            raise TorchFaceError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if block_mode and backend != "evssd":
            raise TorchFaceError(f"block_mode is a device setting: it needs backend='evssd', got {backend!r}")
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise TorchFaceError("duplicate table names")
        self.backend_name = backend
        self.block_mode = block_mode
        self._options = dict(backend_options)
        if cache_fraction is not _AUTO:
            self._options["cache_fraction"] = cache_fraction
        self.store = None
        self._place(pack)
        self._build(arrays)

    def _place(self, pack) -> None:
        """Map each table to (store table, first row): itself at row 0, or a slice of a pack."""
        if pack is None:
            slots = None
            if self.backend_name == "evssd":
                dev = self._options.get("device")
                if dev is not None:
                    slots = dev.params.max_tables
                else:
                    from evssd.hw.regmap import Params
                    slots = Params().max_tables
            pack = slots is not None and len(self.specs) > slots
        self.where: dict[str, tuple[str, int]] = {}
        self.packs: dict[str, list[TableSpec]] = {}
        if not pack:
            for n, s in self.specs.items():
                self.where[n] = (n, 0)
                self.packs[n] = [s]
            return
        groups: dict[tuple, list[TableSpec]] = {}
        for s in self.specs.values():
            groups.setdefault((s.kind, s.dim, s.pooling, s.quantized, s.fbgemm_kernel, s.row_alignment), []).append(s)
        for k, members in enumerate(groups.values()):
            name = members[0].name if len(members) == 1 else f"pack{k}"
            while name in self.specs and len(members) > 1:   # never the name of a module's table
                name = f"_{name}"
            base = 0
            for s in members:
                self.where[s.name] = (name, base)
                base += s.rows
            self.packs[name] = members

    # -- construction ---------------------------------------------------------------------------

    def _stored(self, spec: TableSpec, arr) -> np.ndarray:
        a = np.asarray(arr)
        if spec.kind == "int8_rowwise" or (spec.quantized and a.dtype in (np.uint8, np.int8)):
            a = rows_from_fbgemm(a, spec)
            if spec.kind == "int8_rowwise":
                return np.array(a, copy=True)
        if a.shape != (spec.rows, spec.dim):
            raise TorchFaceError(f"table {spec.name!r}: weight must have shape ({spec.rows}, {spec.dim}), "
                                 f"got {tuple(a.shape)}")
        want = np.float32 if spec.kind == "fp32" else np.float16
        if a.dtype.kind != "f":   # other float types are converted, as Tensor.copy_ does in PyTorch
            raise TorchFaceError(f"table {spec.name!r}: weight must be floating point ({spec.kind}), got {a.dtype}")
        out = empty_rows(a.shape, want)   # copied (the module owns its tables), on cache lines
        out[...] = a                     # (so the dram store serves it without a copy of its own)
        return out

    def _build(self, arrays) -> None:
        from evssd.host.store import EmbeddingStore, RowwiseInt8
        missing = [n for n in self.specs if n not in arrays]
        if missing:
            raise TorchFaceError(f"no weights for table(s) {', '.join(map(repr, missing))}")
        extra = [n for n in arrays if n not in self.specs]
        if extra:
            raise TorchFaceError(f"weights for unknown table(s) {', '.join(map(repr, extra))}")
        per_table = {n: self._stored(s, arrays[n]) for n, s in self.specs.items()}
        stored = {}
        for name, members in self.packs.items():
            parts = [per_table.pop(s.name) for s in members]
            rows = parts[0] if len(parts) == 1 else \
                np.concatenate(parts, out=empty_rows((sum(len(p) for p in parts),) + parts[0].shape[1:],
                                                     parts[0].dtype))
            stored[name] = RowwiseInt8(rows, members[0].dim) if members[0].kind == "int8_rowwise" else rows
        store = EmbeddingStore.from_arrays(stored, self.backend_name, **self._options)
        if self.block_mode:
            try:
                store.backend.device.set_block_mode(True)
            except BaseException:
                store.close()
                raise
        old, self.store = self.store, store
        if old is not None:
            old.close()

    def replace(self, arrays: Mapping[str, np.ndarray]) -> None:
        """New contents for every table (same shapes); the old store is closed after the new one
        is built, so a bad argument loses nothing."""
        self._build(arrays)

    def read_table(self, name: str, chunk: int = 8192) -> np.ndarray:
        """The stored rows of ``name`` (fp32/fp16 ``[rows, dim]``, INT8: uint8 ``[rows, 4 + dim]``)
        straight from the backend (no cache traffic); dram returns its array without a copy."""
        spec = self.specs[name]
        sname, base = self.where[name]
        be = self.store.backend
        arrays = getattr(be, "arrays", None)
        if arrays is not None:
            return arrays[sname][base:base + spec.rows]
        info = self.store.tables[sname]
        out = np.empty((spec.rows, info.width), info.dtype)
        for lo in range(0, spec.rows, chunk):
            hi = min(spec.rows, lo + chunk)
            out[lo:hi] = be.read_rows(info, np.arange(base + lo, base + hi, dtype=np.int64))
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    # -- lookups --------------------------------------------------------------------------------

    def _check(self, r: FeatureRequest, n_bags: int):
        spec = self.specs.get(r.table)
        if spec is None:
            raise TorchFaceError(f"feature {r.feature!r}: unknown table {r.table!r}")
        idx = np.asarray(r.indices)
        offs = np.asarray(r.offsets)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TorchFaceError(f"feature {r.feature!r}: indices must be a 1-D integer array, "
                                 f"got {idx.dtype} of shape {idx.shape}")
        if offs.ndim != 1 or offs.dtype.kind not in "iu" or offs.size != n_bags + 1:
            raise TorchFaceError(f"feature {r.feature!r}: offsets must be 1-D integers with B+1 = {n_bags + 1} "
                                 f"entries, got {offs.dtype} of shape {offs.shape}")
        offs = offs.astype(np.int64, copy=False)
        if offs[0] != 0 or offs[-1] != idx.size or (offs.size > 1 and np.any(offs[1:] < offs[:-1])):
            raise TorchFaceError(f"feature {r.feature!r}: offsets must start at 0, be non-decreasing and end "
                                 f"at len(indices) = {idx.size}")
        if idx.size and (idx.min() < 0 or idx.max() >= spec.rows):   # two reductions, no mask
            bad = (idx < 0) | (idx >= spec.rows)
            if bad.any():
                pos = int(np.flatnonzero(bad)[0])
                raise TorchFaceError(f"feature {r.feature!r} (table {spec.name!r}): index {int(idx[pos])} at "
                                     f"position {pos} out of range [0, {spec.rows})")
        w = None
        if r.weights is not None:
            w = np.asarray(r.weights)
            if w.shape != idx.shape or w.dtype.kind != "f":
                raise TorchFaceError(f"feature {r.feature!r}: weights must be floats of shape {idx.shape}, "
                                     f"got {w.dtype} of shape {w.shape}")
            if spec.pooling == "mean":
                raise TorchFaceError(f"feature {r.feature!r} (table {spec.name!r}): per-sample weights need "
                                     f"SUM pooling (as in PyTorch), the table pools with MEAN")
        return spec, idx, offs, w

    def plan(self, requests: Sequence[FeatureRequest], n_bags: int) -> BatchPlan:
        """Validate every feature (before any I/O) and group them into one request per table."""
        by_table: dict[str, list] = {}
        col = 0
        for r in requests:
            spec, idx, offs, w = self._check(r, n_bags)
            sname, base = self.where[spec.name]
            if base:
                idx = idx.astype(np.int64) + base
            by_table.setdefault(sname, []).append((col, idx, offs, w, r.feature))
            col += spec.dim
        groups: dict = {"sum": {}, "mean": {}}
        parts = {}
        for name, feats in by_table.items():
            spec = self.packs[name][0]          # the pack's members share format and pooling
            weighted = [f[3] is not None for f in feats]
            if any(weighted) and not all(weighted):
                raise TorchFaceError(f"table {name!r}: features {[f[4] for f in feats]} mix weighted and "
                                     f"unweighted lookups")
            if len(feats) == 1:
                _, idx, offs, w, _ = feats[0]
            else:
                idx = np.concatenate([f[1] for f in feats])
                starts = np.cumsum([0] + [f[1].size for f in feats[:-1]])
                offs = np.concatenate([f[2][:-1] + s for f, s in zip(feats, starts)] + [[idx.size]])
                w = np.concatenate([f[3] for f in feats]) if weighted[0] else None
            mode = "sum" if spec.mean_by_reciprocal else spec.pooling   # fbgemm_mean in finish()
            groups[mode][name] = (idx, offs) if w is None else (idx, offs, np.asarray(w, np.float32))
            parts[name] = [f[0] for f in feats]
        return BatchPlan(groups, parts, n_bags, col)

    def lookup(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        """The store lookups of ``plan`` (unpipelined): table -> store result."""
        results = {}
        for mode, reqs in plan.groups.items():
            if reqs:
                results.update(self.store.lookup_many(reqs, mode=mode))
        return results

    def finish(self, plan: BatchPlan, results: Mapping[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """The output ``[B, width]`` float32 of a planned batch from its store results, each
        feature's bags in its columns (``out`` is filled when given)."""
        if out is None:
            out = np.empty((plan.n_bags, plan.width), np.float32)
        B = plan.n_bags
        for name, cols in plan.parts.items():
            spec = self.packs[name][0]
            res = results[name]
            if spec.mean_by_reciprocal:
                res = fbgemm_mean(res, plan.groups["sum"][name][1])
            if spec.fp16_output:
                res = res.astype(np.float16)
            for k, c in enumerate(cols):
                out[:, c:c + spec.dim] = res[k * B:(k + 1) * B]
        return out

    def pool(self, requests: Sequence[FeatureRequest], n_bags: int, out: np.ndarray | None = None) -> np.ndarray:
        """Pooled ``[n_bags, sum of dims]`` float32 for ``requests`` in order."""
        plan = self.plan(requests, n_bags)
        return self.finish(plan, self.lookup(plan), out)
