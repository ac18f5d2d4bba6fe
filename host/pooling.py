"""Pooling arithmetic with exactly the EV Merger's semantics (no Amaranth import).

The functional model and the gateware tests share these functions, so the device and the model
agree bit for bit:

- :func:`pool_rows`: one bag's sum. fp32: IEEE-754 binary32 round-to-nearest-even, sequential
  in bag order starting from -0.0 (the additive identity: a one-row bag returns the row itself,
  -0.0 included), subnormals kept (no flush to zero), every NaN result canonicalised to the quiet
  NaN ``0x7FC00000``. fp16 rows are widened exactly to fp32 and summed as fp32. int8 rows are
  sign-extended to int32 and int32 rows are summed with 32-bit wrap-around. A bag with no good
  rows (all bad, or an empty bag) is all zeros (+0.0 for floats).
- :func:`pool_bags`: the FBGEMM ``indices + offsets[B+1]`` form over a gathered row matrix with a
  per-lookup "good" mask (bad indices are skipped).
- :func:`fp32_add_bits` / :func:`fp16_to_fp32_bits`: vectorised bit-level models of the gateware
  ``Fp32Adder`` and ``Fp16ToFp32`` (same algorithm, step by step), used to check the RTL and to
  prove the algorithm against numpy on millions of vectors.
"""
from __future__ import annotations

import numpy as np

from evssd.hw.regmap import ElemType

__all__ = ["CANONICAL_NAN", "fp32_add_bits", "fp16_to_fp32_bits", "canonicalize_nan",
           "pool_rows", "pool_bags"]

CANONICAL_NAN = 0x7FC0_0000

_GRS = 3          # guard, round and sticky bits below the 24-bit significand
_W = 24 + _GRS    # aligned significand width (27); a sum carries into bit 27


def canonicalize_nan(x: np.ndarray) -> np.ndarray:
    """float32 array -> copy with every NaN replaced by the canonical quiet NaN."""
    out = np.array(x, dtype="<f4", copy=True)
    bits = out.view("<u4")
    bits[np.isnan(out)] = CANONICAL_NAN
    return out


def fp32_add_bits(a, b) -> np.ndarray:
    """Bit-level model of ``Fp32Adder``: binary32 a + b (RNE), NaN canonicalised.

    ``a`` and ``b`` are uint32 bit patterns (scalars or arrays, broadcast); returns uint32.
    """
    a = np.asarray(a, dtype=np.uint32).astype(np.int64)
    b = np.asarray(b, dtype=np.uint32).astype(np.int64)
    a, b = np.broadcast_arrays(a, b)
    # Stage 1: order the operands by magnitude (bit patterns without the sign order as magnitudes).
    swap = (b & 0x7FFF_FFFF) > (a & 0x7FFF_FFFF)
    x = np.where(swap, b, a)
    y = np.where(swap, a, b)
    sx, sy = x >> 31, y >> 31
    ex, ey = (x >> 23) & 0xFF, (y >> 23) & 0xFF
    fx, fy = x & 0x7F_FFFF, y & 0x7F_FFFF
    x_nan = (ex == 0xFF) & (fx != 0)
    y_nan = (ey == 0xFF) & (fy != 0)
    x_inf = (ex == 0xFF) & (fx == 0)
    y_inf = (ey == 0xFF) & (fy == 0)
    is_nan = x_nan | y_nan | (x_inf & y_inf & (sx != sy))
    is_inf = x_inf & ~is_nan           # |x| >= |y|: an infinite y makes x infinite too
    exf = np.maximum(ex, 1)            # subnormals have exponent 1 and no hidden bit
    eyf = np.maximum(ey, 1)
    mx = np.where(ex != 0, 1 << 23, 0) | fx
    my = np.where(ey != 0, 1 << 23, 0) | fy
    d = np.minimum(exf - eyf, 31)      # >= 27 shifts everything into the sticky bit
    sub = sx != sy
    # Stage 2: align y with sticky, add or subtract.
    X = mx << _GRS
    Y = my << _GRS
    lost = (Y & ((np.int64(1) << d) - 1)) != 0
    Ya = (Y >> d) | lost.astype(np.int64)
    S = np.where(sub, X - Ya, X + Ya)
    # Stage 3: normalise (right by one on carry; left by the leading zeros, but never below
    # exponent 1, which leaves a subnormal).
    carry = (S >> _W) & 1
    bitlen = np.where(S > 0, np.frexp(S.astype(np.float64))[1], 0)
    lz = _W - bitlen
    sh = np.minimum(lz, exf - 1)
    S_norm = np.where(carry == 1, (S >> 1) | (S & 1), S << np.maximum(sh, 0))
    e = np.where(carry == 1, exf + 1, exf - sh)
    # Stage 4: round to nearest even and pack; a significand that rounds up to 2**24 carries into
    # the exponent through the addition, a subnormal that rounds up to 2**23 becomes normal.
    mant = S_norm >> _GRS
    g = (S_norm >> 2) & 1
    rs = (S_norm & 3) != 0
    up = g & (rs | ((mant & 1) == 1)).astype(np.int64)
    packed = ((e - 1) << 23) + mant + up
    packed = np.where(packed >= 0x7F80_0000, 0x7F80_0000, packed)
    res = (sx << 31) | packed
    zero = np.where(sub, 0, sx << 31)  # exact cancellation is +0 in RNE; -0 + -0 = -0
    res = np.where(S == 0, zero, res)
    res = np.where(is_inf, x, res)
    res = np.where(is_nan, CANONICAL_NAN, res)
    return res.astype(np.uint32)


def fp16_to_fp32_bits(h) -> np.ndarray:
    """Bit-level model of ``Fp16ToFp32``: exact binary16 -> binary32 (NaN payloads kept, as numpy)."""
    h = np.asarray(h, dtype=np.uint16).astype(np.int64)
    s = (h >> 15) << 31
    e = (h >> 10) & 0x1F
    f = h & 0x3FF
    n = np.where(f > 0, np.frexp(f.astype(np.float64))[1], 0)   # bit length of a subnormal
    sub_res = s | ((n + 102) << 23) | ((f << np.maximum(24 - n, 0)) & 0x7F_FFFF)
    res = np.where(e == 0x1F, s | (0xFF << 23) | (f << 13), s | ((e + 112) << 23) | (f << 13))
    res = np.where(e == 0, np.where(f == 0, s, sub_res), res)
    return res.astype(np.uint32)


def pool_rows(rows: np.ndarray, elem) -> np.ndarray:
    """Sum one bag's good rows, shape ``[k, dim]`` of the element dtype, with the device semantics.

    Returns ``dim`` float32 (fp32, fp16) or int32 (int8, int32) values; ``k == 0`` gives zeros.
    """
    elem = ElemType(elem)
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D [k, dim], got shape {rows.shape}")
    k, dim = rows.shape
    if elem in (ElemType.FP32, ElemType.FP16):
        if k == 0:
            return np.zeros(dim, dtype="<f4")
        src = rows.astype("<f4")     # fp16 -> fp32 is exact
        acc = np.full(dim, -0.0, dtype="<f4")
        with np.errstate(all="ignore"):
            for r in src:
                acc = acc + r
        return canonicalize_nan(acc)
    acc = np.zeros(dim, dtype="<i4")
    with np.errstate(all="ignore"):
        for r in rows.astype("<i4"):
            acc = acc + r        # int32 arrays wrap
    return acc


def pool_bags(rows: np.ndarray, offsets, good, elem) -> np.ndarray:
    """FBGEMM-style pooled sums: ``rows[i]`` is lookup i's row, ``offsets`` has B+1 entries,
    ``good[i]`` is False for a bad index (skipped). Returns ``[B, dim]`` (see :func:`pool_rows`)."""
    rows = np.asarray(rows)
    offsets = np.asarray(offsets, dtype=np.int64)
    good = np.asarray(good, dtype=bool)
    if offsets.ndim != 1 or len(offsets) < 1 or np.any(np.diff(offsets) < 0) or offsets[-1] > len(rows):
        raise ValueError(f"offsets {offsets!r} must be non-decreasing and end at most at {len(rows)}")
    elem = ElemType(elem)
    dim = rows.shape[1]
    out = np.zeros((len(offsets) - 1, dim), dtype=elem.pooled_dtype)
    for bag in range(len(offsets) - 1):
        lo, hi = offsets[bag], offsets[bag + 1]
        out[bag] = pool_rows(rows[lo:hi][good[lo:hi]], elem)
    return out
