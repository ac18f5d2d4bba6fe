"""Host pooling of gathered rows for what the store does not pool itself (yet): per-sample
weights and FBGEMM's row-wise INT8 rows.

Both follow FBGEMM's CPU kernels, which TorchRec's modules run, bit for bit:

- weighted fp32/fp16 rows (``nn.EmbeddingBag`` with ``per_sample_weights``, TorchRec's weighted
  EBC): rows widened exactly to fp32 (as :mod:`evssd.host.pooling` does), then, in bag order,
  ``acc = fma(w, row, acc)`` from +0.0; an empty bag is zeros;
- row-wise INT8 (FBGEMM's ``SparseType.INT8``, the layout of TorchRec's quantized EBC): a row is
  ``[fp16 scale, fp16 bias, dim x uint8]``; with weight ``w`` (1 without weights)
  ``s = scale * w``, ``b = bias * w`` (fp32), then ``acc = fma(s, q, acc + b)`` in bag order;
  MEAN multiplies the sum by ``1 / length`` (fp32), an empty bag is zeros. FBGEMM's inference
  kernels take MEAN that way for fp16/fp32 rows too (:func:`fbgemm_mean`), where
  ``nn.EmbeddingBag`` (and the store) divide by the length.

The fused multiply-add is computed in float64 (the product of two fp32 values is exact there) and
rounded once to fp32, which is FBGEMM's single rounding except when float64 rounding lands on an
fp32 tie (about one sum in 2**29).
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["pool_weighted_rows", "pool_int8_rowwise", "fbgemm_mean", "INT8_ROWWISE_HEADER"]

#: bytes of the fp16 scale and fp16 bias in front of an FBGEMM INT8 row
INT8_ROWWISE_HEADER = 4


@numba.njit(cache=True, nogil=True)
def _weighted_kernel(rows, offsets, weights, out):  # pragma: no cover - compiled
    dim = rows.shape[1]
    for b in range(offsets.shape[0] - 1):
        for j in range(dim):
            acc = np.float32(0.0)
            for k in range(offsets[b], offsets[b + 1]):
                acc = np.float32(np.float64(weights[k]) * np.float64(rows[k, j]) + np.float64(acc))
            out[b, j] = acc


@numba.njit(cache=True, nogil=True)
def _int8_kernel(raw, scale, bias, offsets, weights, use_weights, mean, out):  # pragma: no cover
    dim = out.shape[1]
    for b in range(offsets.shape[0] - 1):
        lo, hi = offsets[b], offsets[b + 1]
        for j in range(dim):
            out[b, j] = np.float32(0.0)
        for k in range(lo, hi):
            s = scale[k]
            c = bias[k]
            if use_weights:
                s = np.float32(s * weights[k])
                c = np.float32(c * weights[k])
            for j in range(dim):
                q = np.float64(raw[k, 4 + j])
                t = np.float32(out[b, j] + c)
                out[b, j] = np.float32(np.float64(s) * q + np.float64(t))
        if mean and hi > lo:
            inv = np.float32(np.float32(1.0) / np.float32(hi - lo))
            for j in range(dim):
                out[b, j] = np.float32(out[b, j] * inv)


def _check_offsets(offsets, n: int) -> np.ndarray:
    offs = np.ascontiguousarray(offsets, dtype=np.int64)
    if offs.ndim != 1 or offs.size < 1 or offs[0] != 0 or offs[-1] != n or np.any(np.diff(offs) < 0):
        raise ValueError(f"offsets must be 1-D, start at 0, be non-decreasing and end at {n}")
    return offs


def pool_weighted_rows(rows: np.ndarray, offsets, weights) -> np.ndarray:
    """Weighted bag sums ``[B, dim]`` float32 of gathered fp32/fp16 ``rows`` (one per lookup, in
    request order), ``offsets[B+1]``, ``weights[len(rows)]`` (SUM only: PyTorch refuses
    per-sample weights with MEAN)."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.dtype.kind != "f":
        raise ValueError(f"rows must be a 2-D float array, got {rows.dtype} of shape {rows.shape}")
    offs = _check_offsets(offsets, rows.shape[0])
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.shape != (rows.shape[0],):
        raise ValueError(f"per-sample weights must have shape ({rows.shape[0]},), got {w.shape}")
    out = np.empty((offs.size - 1, rows.shape[1]), np.float32)
    _weighted_kernel(np.ascontiguousarray(rows, dtype=np.float32), offs, w, out)
    return out


def pool_int8_rowwise(rows: np.ndarray, dim: int, offsets, weights=None, mean: bool = False) -> np.ndarray:
    """Bag sums ``[B, dim]`` float32 of gathered FBGEMM INT8 rows (``[n, >= 4 + dim]`` bytes, one per
    lookup in request order: fp16 scale, fp16 bias, ``dim`` uint8 codes), ``offsets[B+1]``,
    optional ``weights[n]``; ``mean`` multiplies by 1 / length as FBGEMM does."""
    raw = np.ascontiguousarray(rows).view(np.uint8)
    if raw.ndim != 2 or raw.shape[1] < INT8_ROWWISE_HEADER + dim:
        raise ValueError(f"INT8 rows must be [n, >= {INT8_ROWWISE_HEADER + dim}] bytes, got shape {raw.shape}")
    n = raw.shape[0]
    offs = _check_offsets(offsets, n)
    sb = np.ascontiguousarray(raw[:, :INT8_ROWWISE_HEADER]).view(np.float16).astype(np.float32)
    use_w = weights is not None
    w = np.ascontiguousarray(weights, dtype=np.float32) if use_w else np.zeros(0, np.float32)
    if use_w and w.shape != (n,):
        raise ValueError(f"per-sample weights must have shape ({n},), got {w.shape}")
    out = np.empty((offs.size - 1, dim), np.float32)
    _int8_kernel(raw, np.ascontiguousarray(sb[:, 0]), np.ascontiguousarray(sb[:, 1]), offs, w, use_w,
                 bool(mean), out)
    return out


def fbgemm_mean(sums: np.ndarray, offsets) -> np.ndarray:
    """FBGEMM's inference MEAN of pooled ``sums`` [B, dim] float32: ``sum * (1 / length)`` in fp32
    (in place; empty bags stay as they are, zeros)."""
    lengths = np.diff(np.asarray(offsets, dtype=np.int64))
    nz = lengths > 0
    inv = np.float32(1.0) / lengths[nz].astype(np.float32)
    sums[nz] *= inv[:, None]
    return sums
