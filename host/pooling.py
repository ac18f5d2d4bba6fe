"""The pooling definition: what every path (device, host, every backend, cache on or off, the
pipeline) returns for a bag, bit for bit, and the fast kernels that implement it.

A bag is the FBGEMM ``indices[offsets[b]:offsets[b+1]]`` slice; its pooled sum over ``dim``
columns is, per element type (:data:`evssd.host.elements.ELEMS`):

fp32, fp16
    IEEE-754 binary32, round-to-nearest-even, summed sequentially in bag order starting from
    -0.0 (the additive identity: a one-row bag returns the row itself, -0.0 included),
    subnormals kept (no flush to zero), no reassociation and no FMA; fp16 elements are widened
    to fp32 exactly first. A NaN result is canonicalised to the quiet NaN ``0x7FC00000``.
int8, int32
    int32 with two's-complement wrap-around (int8 sign-extended first).
int8_rowwise (FBGEMM's row-wise quantized INT8, host only)
    fp32 in bag order from -0.0, per row ``acc = fma(scale, q, acc + bias)`` (one rounding for
    the multiply-add, scale and bias widened from fp16 exactly): FBGEMM's CPU kernel order, so
    the inference TBE's fp32 output matches bit for bit (it starts from +0.0, which differs only
    when every term is -0.0). NaN canonicalised.
empty bag (or, on the device, no good rows)
    zeros (+0.0 for float sums).

**Per-sample weights** (TorchRec's weighted KJT, FBGEMM ``per_sample_weights``), float32 ``w[k]``
per lookup, SUM only: fp32/fp16/int8/int32 rows become ``acc = fma(w[k], float32(x), acc)`` (one
rounding, as FBGEMM's CPU TBE and nn.EmbeddingBag compute it, checked bit for bit), in bag order
from -0.0, output fp32 for
every type (int8/int32 elements are converted to fp32 first; int32 values beyond 2**24 round to
nearest even). int8_rowwise uses ``scale*w`` and ``bias*w`` (each rounded to fp32) in the formula
above, as FBGEMM does.

**mean** divides each float32 sum by the bag length in float32 (int sums are converted to
float32 first); an empty bag gives zeros. Weights and mean do not combine.

The kernels (numba, nogil) read straight from a table (``src[indices[k]]``, the fused
gather+pool of the dram path), from a deduplicated row matrix (``src[inverse[k]]``) or from two
row matrices, the cache's storage and the fetched misses (:func:`pool_two_sources`); they check
every index and offset before writing anything. :func:`pool_rows` / :func:`pool_bags` are the
device-style helpers the functional model and the gateware tests use; :func:`fp32_add_bits` and
:func:`fp16_to_fp32_bits` are bit-level models of the gateware's ``Fp32Adder`` and ``Fp16ToFp32``
(slow, vectorised numpy) that check the RTL against this definition.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from evssd.host.elements import ELEMS, Elem

__all__ = ["CANONICAL_NAN", "PoolingError", "fp32_add_bits", "fp16_to_fp32_bits", "canonicalize_nan",
           "pool", "pool_into", "pool_two_sources", "fma32", "fma32_model", "pool_rows", "pool_bags", "describe_error", "kernel_source",
           "check_bags", "check_indices", "check_weights", "apply_mean"]

CANONICAL_NAN = 0x7FC0_0000


class PoolingError(ValueError):
    """A bad index, offset, weight or argument given to :func:`pool`."""


def canonicalize_nan(x: np.ndarray) -> np.ndarray:
    """float32 array -> copy with every NaN replaced by the canonical quiet NaN."""
    out = np.array(x, dtype="<f4", copy=True)
    bits = out.view("<u4")
    bits[np.isnan(out)] = CANONICAL_NAN
    return out



# ----------------------------------------------------------------------------------------------
# scalar helpers for the kernels


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret a 32-bit integer as a binary32 (no conversion)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        return builder.bitcast(v, ir.FloatType())
    return types.float32(x), codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    """Reinterpret a binary32 as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """``a * b + c`` in binary32 with one rounding (LLVM's ``llvm.fma.f32``: the hardware FMA
    where there is one, a correctly rounded library call otherwise; never float64 emulation,
    which can round twice)."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
        return builder.call(fn, list(args))
    return types.float32(a, b, c), codegen


def fma32_model(a, b, c) -> np.ndarray:
    """Vectorised numpy model of :func:`fma32` (float32 arrays in, float32 out), independent of
    the hardware: the product of two binary32 values is exact in float64; the float64 sum is
    rounded to odd (TwoSum error term, then the odd neighbour), which 53 >= 2 * 24 + 2 bits make
    round to the same binary32 as the exact value. The tests' reference for weighted bags."""
    with np.errstate(all="ignore"):
        p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
        cc = np.asarray(c, np.float32).astype(np.float64)
        s = p + cc
        bb = s - p
        e = (p - (s - bb)) + (cc - bb)
        bits = s.view(np.uint64)
        fix = np.isfinite(s) & (e != 0) & ((bits & 1) == 0)
        toward = np.where(e > 0, np.inf, -np.inf)
        s = np.where(fix, np.nextafter(s, toward), s)
        return s.astype(np.float32)


def _prefetch_hint(locality: int, doc: str):
    """An intrinsic ``f(arr, r, off)`` hinting the CPU to fetch byte ``off`` of row ``r`` of a
    2-D array (no fault if invalid) with LLVM's prefetch ``locality`` (3: into L1, ``prefetcht0``
    on x86; 2: into L2, ``prefetcht1``)."""
    @intrinsic
    def hint(typingctx, arr, r, off):
        if not isinstance(arr, types.Array) or arr.ndim != 2:
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            data = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
            stride0 = builder.extract_value(ary.strides, 0)
            off = builder.add(builder.mul(context.cast(builder, args[1], sig.args[1], types.intp), stride0),
                              context.cast(builder, args[2], sig.args[2], types.intp))
            ptr = builder.gep(data, [off])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
            fn = builder.module.globals.get("llvm.prefetch.p0i8") or \
                ir.Function(builder.module, fnty, name="llvm.prefetch.p0i8")
            # read, the locality, data cache
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(arr, r, off), codegen
    hint.__doc__ = doc
    return hint


_prefetch = _prefetch_hint(3, "Hint the CPU to fetch byte ``off`` of row ``r`` of a 2-D array into L1.")
_prefetch_l2 = _prefetch_hint(2, "Hint the CPU to fetch byte ``off`` of row ``r`` of a 2-D array into L2.")


#: lookups ahead whose rows are prefetched: random rows come from DRAM, and the out-of-order
#: window alone keeps too few of them in flight (measured: 2.8x faster on 4 x 100k x 64 fp32).
#: 16 rather than 8: the same at 128 bags, 10-20% faster from 1,024 bags on (more rows in flight
#: once a batch's rows no longer fit the CPU caches); 32 loses on uniform rows
PREFETCH_DISTANCE = 16

#: lookups ahead whose rows the one-table loop also hints into L2 (``prefetcht1``): more rows in
#: flight than the L1 hints alone keep, without evicting the rows about to be added from L1.
#: Measured against FBGEMM side by side (64 fp32, 4 x 100k rows, ours / FBGEMM): uniform 4,096
#: bags 0.86-0.90x -> 1.15-1.19x, Meta 4,096 bags 0.89-0.92x -> 1.23x, 128 bags unchanged or
#: better; 32 ahead was less steady, 80 lost on uniform rows
L2_PREFETCH_DISTANCE = 48


_TWO_112 = np.float32(2.0 ** 112)


@intrinsic
def _h2f_f16c(typingctx, h):
    """fp16 bits -> float32 by the CPU's conversion (``vcvtph2ps`` with F16C): exact, and vectorises."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())
    return types.float32(h), codegen


def _host_has_f16c() -> bool:
    try:
        import llvmlite.binding as llvm
        return "+f16c" in llvm.get_host_cpu_features().flatten()
    except Exception:  # pragma: no cover - unknown host: use the portable conversion
        return False


@numba.njit(inline="always")
def _h2f_soft(h):
    """fp16 bits -> float32, exactly: normals and subnormals by rescaling the shifted bits
    (a multiplication by a power of two), inf/NaN by setting the exponent (payload kept)."""
    h = np.uint32(h)
    mag = (h & np.uint32(0x7FFF)) << np.uint32(13)
    f = _bits_to_f32(mag) * _TWO_112
    bits = _f32_to_bits(f)
    if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):
        bits = np.uint32(0x7F800000) | mag
    return _bits_to_f32(bits | ((h & np.uint32(0x8000)) << np.uint32(16)))


#: the conversion the kernels use: the CPU's own where it has one (a signalling NaN comes out
#: quiet, which no result shows: NaN sums are canonicalised), else the portable one
if _host_has_f16c():
    @numba.njit(inline="always")
    def _h2f(h):
        return _h2f_f16c(np.uint16(h))
else:  # pragma: no cover
    _h2f = _h2f_soft


def _load(src, r, j):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_load, inline="always")
def _ol_load(src, r, j):
    """Element (r, j) of a stored row matrix, widened to its accumulator type."""
    dt = src.dtype
    if dt == types.float32:
        return lambda src, r, j: src[r, j]
    if dt == types.uint16:  # fp16 rows, passed as their bits
        return lambda src, r, j: _h2f(src[r, j])
    if dt == types.int8:
        return lambda src, r, j: np.int32(src[r, j])
    if dt == types.int32:
        return lambda src, r, j: src[r, j]
    return None


def _loadf(src, r, j):  # pragma: no cover
    raise NotImplementedError


@overload(_loadf, inline="always")
def _ol_loadf(src, r, j):
    """Element (r, j) as float32 (the weighted definition converts every type to fp32)."""
    dt = src.dtype
    if dt == types.float32:
        return lambda src, r, j: src[r, j]
    if dt == types.uint16:
        return lambda src, r, j: _h2f(src[r, j])
    if dt in (types.int8, types.int32):
        return lambda src, r, j: np.float32(src[r, j])
    return None


def _start(out):  # pragma: no cover
    raise NotImplementedError


@overload(_start, inline="always")
def _ol_start(out):
    """The accumulator's first value: -0.0 for float sums, 0 for int sums."""
    if isinstance(out.dtype, types.Float):
        return lambda out: np.float32(-0.0)
    return lambda out: np.int32(0)


@intrinsic
def _canonical(typingctx, v):
    """A bag's sum as stored: a float NaN becomes the canonical quiet NaN, an int sum stays as
    it is. A select, not a branch, so the store of a row vectorises."""
    if isinstance(v, types.Integer):
        return v(v), lambda context, builder, sig, args: args[0]
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        nan = ir.Constant(ir.IntType(32), CANONICAL_NAN).bitcast(ir.FloatType())
        return builder.select(builder.fcmp_unordered("uno", x, x), nan, x)
    return types.float32(v), codegen


@numba.njit(inline="always")
def _check(n_src, idx, offs):
    """-1 when every offset and index is good, else the error code :func:`describe_error`
    decodes: ``k >= 0`` index at position k out of range, ``-2 - p`` offset at position p bad."""
    n_bags = offs.shape[0] - 1
    if offs[0] != 0:
        return -2
    for b in range(n_bags):
        if offs[b + 1] < offs[b]:
            return -3 - b
    if offs[n_bags] != idx.shape[0]:
        return -2 - n_bags
    for k in range(idx.shape[0]):
        r = idx[k]
        if r < 0 or r >= n_src:
            return k
    return -1


@intrinsic
def _stack_row(typingctx, like, n):
    """A pointer to ``n`` (a literal) elements of ``like``'s dtype on the calling kernel's stack,
    64-byte aligned, for :func:`numba.carray`. A bag sums in such a row: the compiler knows no
    other pointer reaches it, so no source row or output store can alias it, and with a
    constant width it keeps the sums in vector registers across the bag's lookups (a row from
    ``np.empty`` is heap memory the compiler must assume aliased: it reloads and stores the
    sums on every lookup)."""
    if not isinstance(n, types.IntegerLiteral) or not isinstance(like, types.Array):
        return None
    size, dt = n.literal_value, like.dtype

    def codegen(context, builder, sig, args):
        el = context.get_value_type(dt)
        p = cgutils.alloca_once(builder, ir.ArrayType(el, size))
        p.align = 64
        return builder.bitcast(p, el.as_pointer())
    return types.CPointer(dt)(like, n), codegen


def _itemsize(src):  # pragma: no cover
    raise NotImplementedError


@overload(_itemsize, inline="always")
def _ol_itemsize(src):
    """``src.itemsize`` as a compile-time constant (the array's attribute is read at run time,
    which keeps a constant-width loop's prefetch hints in a loop of their own)."""
    size = src.dtype.bitwidth // 8
    return lambda src: size


#: columns a general-width bag loop sums at a time (its stack row; wider rows go in blocks)
_BLOCK = 256


def _bag_loop(dim: int, rowwise: bool = False, two: bool = False):
    """Bags ``b0..b1-1`` of a pooling kernel, with the row width ``dim`` a constant of the
    compiled loop (0: the width of ``out``, known only when it runs, summed in blocks of
    :data:`_BLOCK` columns). fp32/fp16/int8/int32 rows, ``acc += row`` (``w`` None) or ``acc =
    fma(w[k], row, acc)`` (one rounding), from :func:`_start`; or with ``rowwise`` row-wise INT8
    rows (fp16 scale and bias in each row's first 4 bytes; ``w`` the weights when ``weighted``).
    A bag's sums are stored by :func:`_canonical`; an empty bag is zeros.

    One table (``two`` False): lookup k reads ``src[idx[k]]`` (``msrc``, ``loc`` unused: pass
    None). Two sources (the cache's hit path): lookup k's row is ``idx`` entry ``u = idx[k]``
    of the batch's distinct rows, in the cache's row storage ``src`` at slot ``loc[u]`` (>= 0)
    or, for a miss, in row ``-1 - loc[u]`` of the fetched rows ``msrc``; the source is chosen
    per lookup as a value, so the row loop has no branch around it (8-13% faster than a loop
    per source on cache-resident rows, measured); so is the source of the row hinted ahead (a
    branch there mispredicted on about every miss: 24.7 -> 17.3 us for a table of 2,560 Meta
    lookups with 40% of its distinct rows cached, against 13.4-15.3 for one source).

    Each bag sums in a row on the stack (:func:`_stack_row`) and is stored to ``out[b]`` at its
    end; with a constant width the sums stay in vector registers across the bag's lookups
    (measured, 64 fp32 rows, one table, ns per lookup: 8.5 -> 3.7-4.6 from L2, 21.6 -> 8.7-14.6
    over 100k uniform rows). The row ``PREFETCH_DISTANCE`` lookups on is hinted into L1, and
    from one table the one ``L2_PREFETCH_DISTANCE`` on into L2 (the cache's rows are near:
    the L2 hint slowed the two-source loop). Indices were checked before any bag is pooled.
    The prefetch and the row's term are written out here, not in helpers: numba
    reference-counts arrays passed to a helper, which doubled the loop's cost (an inlined
    overload for the row-wise term: 7.0 -> 19.8 ns per lookup). Same additions in the same
    order as the definition: the same bits."""
    width = dim if dim else _BLOCK

    @numba.njit(inline="always")
    def loop(src, msrc, idx, loc, offs, w, weighted, out, b0, b1):
        d = dim if dim else out.shape[1]
        n = idx.shape[0]
        # the row's bytes: a constant with the width, but for a row-wise row (its header too)
        rb = src.shape[1] * src.itemsize if rowwise else d * _itemsize(src)
        acc = numba.carray(_stack_row(out, width), (width,))
        z = _start(out)
        for b in range(b0, b1):
            lo = offs[b]
            hi = offs[b + 1]
            for c0 in range(0, d, width):
                cw = dim if dim else min(width, d - c0)
                for j in range(cw):
                    acc[j] = z
                for k in range(lo, hi):
                    ahead = k + PREFETCH_DISTANCE
                    if (dim or c0 == 0) and ahead < n:
                        if two:
                            la = loc[idx[ahead]]
                            pa = src if la >= 0 else msrc
                            la = la if la >= 0 else -1 - la
                            for off in range(0, rb, 64):
                                _prefetch(pa, la, off)
                        else:
                            ra = idx[ahead]
                            for off in range(0, rb, 64):
                                _prefetch(src, ra, off)
                            far = k + L2_PREFETCH_DISTANCE
                            if far < n:
                                ra = idx[far]
                                for off in range(0, rb, 64):
                                    _prefetch_l2(src, ra, off)
                    if two:
                        r = loc[idx[k]]
                        row = src if r >= 0 else msrc
                        r = r if r >= 0 else -1 - r
                    else:
                        r = idx[k]
                        row = src
                    if rowwise:
                        s = _h2f(np.uint32(row[r, 0]) | (np.uint32(row[r, 1]) << np.uint32(8)))
                        c = _h2f(np.uint32(row[r, 2]) | (np.uint32(row[r, 3]) << np.uint32(8)))
                        if weighted:
                            s = s * w[k]
                            c = c * w[k]
                        for j in range(cw):
                            acc[j] = fma32(s, np.float32(row[r, 4 + c0 + j]), acc[j] + c)
                    elif w is None:
                        for j in range(cw):
                            acc[j] += _load(row, r, c0 + j)
                    else:
                        wk = w[k]
                        for j in range(cw):
                            acc[j] = fma32(wk, _loadf(row, r, c0 + j), acc[j])
                if lo == hi:
                    for j in range(cw):
                        out[b, c0 + j] = 0
                else:
                    for j in range(cw):
                        out[b, c0 + j] = _canonical(acc[j])
    return loop


def _width_dispatch(two: bool):
    """Bags ``b0..b1-1`` (arguments as the loop of :func:`_bag_loop`, without ``weighted``)
    by a loop compiled for the row width where it is one of the two most common in
    recommendation models (64, 128), else by the general loop; one table or, with ``two``, two
    sources. Each specialised loop is compiled into every kernel signature, so the list is
    short: with 16 and 32 as well the pooling kernels took ~5x as long to compile as with the
    general loop alone."""
    l64, l128, lany = _bag_loop(64, two=two), _bag_loop(128, two=two), _bag_loop(0, two=two)

    @numba.njit(inline="always")
    def bags(src, msrc, idx, loc, offs, w, out, b0, b1):
        d = out.shape[1]
        if d == 64:
            l64(src, msrc, idx, loc, offs, w, False, out, b0, b1)
        elif d == 128:
            l128(src, msrc, idx, loc, offs, w, False, out, b0, b1)
        else:
            lany(src, msrc, idx, loc, offs, w, False, out, b0, b1)
    return bags


#: fp32/fp16/int8/int32 bags from one table (pass None for ``msrc`` and ``loc``) / two sources
_bags = _width_dispatch(False)
_bags2 = _width_dispatch(True)
_bags_rowwise = _bag_loop(0, rowwise=True)
_bags2_rowwise = _bag_loop(0, rowwise=True, two=True)


#: bags per task of the parallel kernels (each task has its own accumulator row)
_CHUNK = 16


# One kernel per (arithmetic, serial/parallel); numba specialises each on the array dtypes.

@numba.njit(cache=True, nogil=True)
def _pool_serial(src, idx, offs, w, out):
    code = _check(src.shape[0], idx, offs)
    if code != -1:
        return code
    _bags(src, None, idx, None, offs, w, out, 0, offs.shape[0] - 1)
    return -1


@numba.njit(cache=True, nogil=True, parallel=True)
def _pool_parallel(src, idx, offs, w, out):
    code = _check(src.shape[0], idx, offs)
    if code != -1:
        return code
    n_bags = offs.shape[0] - 1
    for c in numba.prange((n_bags + _CHUNK - 1) // _CHUNK):
        _bags(src, None, idx, None, offs, w, out, c * _CHUNK, min(n_bags, (c + 1) * _CHUNK))
    return -1


@numba.njit(cache=True, nogil=True)
def _rowwise_serial(src, idx, offs, w, weighted, out):
    code = _check(src.shape[0], idx, offs)
    if code != -1:
        return code
    _bags_rowwise(src, None, idx, None, offs, w, weighted, out, 0, offs.shape[0] - 1)
    return -1


@numba.njit(cache=True, nogil=True, parallel=True)
def _rowwise_parallel(src, idx, offs, w, weighted, out):
    code = _check(src.shape[0], idx, offs)
    if code != -1:
        return code
    n_bags = offs.shape[0] - 1
    for c in numba.prange((n_bags + _CHUNK - 1) // _CHUNK):
        _bags_rowwise(src, None, idx, None, offs, w, weighted, out, c * _CHUNK, min(n_bags, (c + 1) * _CHUNK))
    return -1


# Two-source kernels (the cache hit path): the bag loops with ``two`` (see :func:`_bag_loop`).


@numba.njit(inline="always")
def _check2(n_c, n_m, inv, loc, offs):
    """As :func:`_check` for the two-source kernels: ``k >= 0`` names lookup k whose inverse
    index or location is out of range."""
    n_bags = offs.shape[0] - 1
    if offs[0] != 0:
        return -2
    for b in range(n_bags):
        if offs[b + 1] < offs[b]:
            return -3 - b
    if offs[n_bags] != inv.shape[0]:
        return -2 - n_bags
    for k in range(inv.shape[0]):
        u = inv[k]
        if u < 0 or u >= loc.shape[0]:
            return k
        r = loc[u]
        if r >= n_c or -1 - r >= n_m:
            return k
    return -1


@numba.njit(cache=True, nogil=True)
def _pool2_kernel(csrc, msrc, inv, loc, offs, w, out):
    code = _check2(csrc.shape[0], msrc.shape[0], inv, loc, offs)
    if code != -1:
        return code
    _bags2(csrc, msrc, inv, loc, offs, w, out, 0, offs.shape[0] - 1)
    return -1


@numba.njit(cache=True, nogil=True)
def _pool2_rowwise_kernel(csrc, msrc, inv, loc, offs, w, weighted, out):
    code = _check2(csrc.shape[0], msrc.shape[0], inv, loc, offs)
    if code != -1:
        return code
    _bags2_rowwise(csrc, msrc, inv, loc, offs, w, weighted, out, 0, offs.shape[0] - 1)
    return -1


@numba.njit(cache=True, nogil=True)
def pool2_into(csrc, msrc, inv, loc, offs, w, out):
    """:func:`pool_two_sources` of fp32/fp16/int8/int32 rows (``w``: float32 weights or None),
    callable from other kernels (the EV-Cache pools and admits a batch's misses in one call)."""
    return _pool2_kernel(csrc, msrc, inv, loc, offs, w, out)


@numba.njit(cache=True, nogil=True)
def pool2_trusted(csrc, msrc, inv, loc, offs, w, out):
    """:func:`pool2_into` without its pass over the batch checking ``offs``, ``inv`` and
    ``loc``: for locations a kernel made from a validated batch (the EV-Cache's lookup and its
    miss list; ~2-3 us of a 2,560-lookup table). A bad one reads outside the arrays."""
    _bags2(csrc, msrc, inv, loc, offs, w, out, 0, offs.shape[0] - 1)


def pool_two_sources(csrc, msrc, elem: Elem, inv, loc, offsets, out, weights=None) -> int:
    """Pool bags whose rows live in two row matrices (both viewed by :func:`kernel_source`):
    lookup k's row is ``csrc[loc[inv[k]]]`` when that is >= 0, else ``msrc[-1 - loc[inv[k]]]``
    (the cache's row storage and the fetched misses). Same definition and output as
    :func:`pool_into`; returns -1 or an error code (``k >= 0``: lookup k's ``inv``/``loc`` is
    out of range), ``out`` untouched on error."""
    if elem.extra:  # int8_rowwise
        w = _NO_WEIGHTS if weights is None else weights
        return _pool2_rowwise_kernel(csrc, msrc, inv, loc, offsets, w, weights is not None, out)
    return pool2_into(csrc, msrc, inv, loc, offsets, weights, out)


@numba.njit(cache=True, nogil=True)
def check_bags(n_src, idx, offs):
    """-1 when ``offs`` is a valid B+1 offset array over ``idx`` and every index is in
    ``[0, n_src)``; else an error code for :func:`describe_error`."""
    return _check(n_src, idx, offs)


@numba.njit(cache=True, nogil=True)
def check_indices(n_src, idx):
    """-1 when every index is in ``[0, n_src)``, else the position of the first bad one."""
    for k in range(idx.shape[0]):
        r = idx[k]
        if r < 0 or r >= n_src:
            return k
    return -1


_NO_WEIGHTS = np.zeros(0, dtype=np.float32)


def kernel_source(src: np.ndarray, elem: Elem) -> np.ndarray:
    """The array view a kernel reads for a stored row matrix of ``elem`` (fp16 as its bits)."""
    if elem.name == "fp16":
        return src.view(np.uint16)
    return src


def pool_into(src, elem: Elem, indices, offsets, out, weights=None, parallel: bool = False) -> int:
    """Pool bags of ``src[indices[k]]`` into ``out`` [B, dim] (``elem``'s pooled dtype, or float32
    with weights): the low-level entry point, no argument checks beyond the kernel's. ``src`` is
    the stored row matrix viewed by :func:`kernel_source`; ``indices`` and ``offsets`` int32 or
    int64 (contiguous); ``weights`` float32 or None. Returns -1, or the error code of the first
    bad index or offset (:func:`describe_error`), in which case ``out`` is untouched."""
    if elem.extra:  # int8_rowwise
        w = _NO_WEIGHTS if weights is None else weights
        kern = _rowwise_parallel if parallel else _rowwise_serial
        return kern(src, indices, offsets, w, weights is not None, out)
    return (_pool_parallel if parallel else _pool_serial)(src, indices, offsets, weights, out)


def describe_error(code: int, indices, offsets, n_src: int) -> str:
    """The message for a :func:`pool_into` error code (names the argument and the position)."""
    if code >= 0:
        return f"index {int(indices[code])} at position {code} out of range [0, {n_src})"
    p = -2 - code
    if p == 0:
        return f"offsets[0] must be 0, got {int(offsets[0])}"
    if p == len(offsets) - 1 and offsets[p] >= offsets[p - 1]:
        return f"offsets[-1] = {int(offsets[p])} must equal len(indices) = {len(indices)}"
    return f"offsets not monotonic at position {p} ({int(offsets[p - 1])} -> {int(offsets[p])})"


def _elem(elem) -> Elem:
    if isinstance(elem, Elem):
        return elem
    if isinstance(elem, str):
        if elem not in ELEMS:
            raise PoolingError(f"unknown element type {elem!r} (known: {', '.join(ELEMS)})")
        return ELEMS[elem]
    name = getattr(elem, "name", None)  # an ElemType
    if isinstance(name, str) and name.lower() in ELEMS:
        return ELEMS[name.lower()]
    raise PoolingError(f"unknown element type {elem!r} (known: {', '.join(ELEMS)})")


def _int_array(a, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise PoolingError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0 and arr.dtype.kind not in "iu":
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise PoolingError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype not in (np.int64, np.int32):
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise PoolingError(f"{what}: value {int(arr.max())} out of range")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def check_weights(weights, n: int, what: str = "per_sample_weights") -> np.ndarray:
    """``weights`` as contiguous float32 of length ``n`` (a float64 array is rounded to float32)."""
    w = np.asarray(weights)
    if w.ndim != 1 or w.shape[0] != n:
        raise PoolingError(f"{what} must be 1-D with one weight per index ({n}), got shape {w.shape}")
    if w.dtype.kind != "f":
        raise PoolingError(f"{what} must be floating point, got dtype {w.dtype}")
    return np.ascontiguousarray(w, dtype=np.float32)


def apply_mean(out: np.ndarray, offsets) -> np.ndarray:
    """``mode="mean"``: each float32 sum divided by its bag length; empty bags stay zero."""
    res = out.astype(np.float32, copy=out.dtype != np.float32)
    lengths = np.diff(np.asarray(offsets, dtype=np.int64)).astype(np.float32)
    nz = lengths > 0
    with np.errstate(all="ignore"):
        res[nz] /= lengths[nz, None]
    res[~nz] = 0
    bits = res.view(np.uint32)
    bits[np.isnan(res)] = CANONICAL_NAN
    return res


def pool(src, elem, indices, offsets, *, per_sample_weights=None, mode: str = "sum", out=None,
         parallel: bool = False) -> np.ndarray:
    """Pooled bags ``[B, dim]`` of the stored row matrix ``src`` (``[rows, width]`` of ``elem``'s
    storage dtype) by this module's definition. ``out`` (sum only): a C-contiguous array of the
    pooled dtype (float32 with weights) to write into. Bad input raises :class:`PoolingError`
    naming the argument and position, before anything is written."""
    el = _elem(elem)
    src = np.asarray(src)
    if src.ndim != 2 or src.dtype != el.storage or src.shape[1] < el.extra + 1:
        raise PoolingError(f"src must be a 2-D {el.storage} array of {el.name} rows, got "
                           f"{src.dtype} {src.shape}")
    src = np.ascontiguousarray(src)
    idx = _int_array(indices, "indices")
    offs = _int_array(offsets, "offsets")
    if offs.size < 1:
        raise PoolingError("offsets must have B+1 >= 1 entries")
    if mode not in ("sum", "mean"):
        raise PoolingError(f"mode must be 'sum' or 'mean', got {mode!r}")
    w = None
    if per_sample_weights is not None:
        if mode != "sum":
            raise PoolingError("per_sample_weights need mode='sum'")
        w = check_weights(per_sample_weights, idx.size)
    dim = src.shape[1] - el.extra
    dtype = np.dtype(np.float32) if w is not None else el.pooled
    shape = (offs.size - 1, dim)
    if out is None:
        res = np.empty(shape, dtype)
    else:
        if mode != "sum":
            raise PoolingError("out= needs mode='sum'")
        if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise PoolingError(f"out must be a writeable C-contiguous {dtype} array of shape {shape}, got "
                               f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        res = out
    code = pool_into(kernel_source(src, el), el, idx, offs, res, w, parallel)
    if code != -1:
        raise PoolingError(describe_error(code, idx, offs, src.shape[0]))
    return apply_mean(res, offs) if mode == "mean" else res


def pool_rows(rows: np.ndarray, elem) -> np.ndarray:
    """One bag's sum of its good rows ``[k, dim]`` with the device semantics (``k == 0``: zeros).

    Returns ``dim`` float32 (fp32, fp16, int8_rowwise) or int32 (int8, int32) values."""
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"rows must be 2-D [k, dim], got shape {rows.shape}")
    el = _elem(elem)
    k = rows.shape[0]
    return pool(np.ascontiguousarray(rows, dtype=el.storage) if k else
                np.zeros((1, rows.shape[1]), el.storage), el,
                np.arange(k, dtype=np.int64), np.array([0, k], np.int64))[0]


def pool_bags(rows: np.ndarray, offsets, good, elem) -> np.ndarray:
    """FBGEMM-style pooled sums: ``rows[i]`` is lookup i's row, ``offsets`` has B+1 entries,
    ``good[i]`` is False for a bad index (skipped). Returns ``[B, dim]`` (see :func:`pool_rows`)."""
    rows = np.asarray(rows)
    offsets = np.asarray(offsets, dtype=np.int64)
    good = np.asarray(good, dtype=bool)
    if offsets.ndim != 1 or len(offsets) < 1 or np.any(np.diff(offsets) < 0) or offsets[-1] > len(rows) \
            or offsets[0] < 0:
        raise ValueError(f"offsets {offsets!r} must be non-decreasing and end at most at {len(rows)}")
    el = _elem(elem)
    lo = offsets[0]
    keep = np.flatnonzero(good[lo:offsets[-1]]) + lo
    counts = np.add.reduceat(good[lo:offsets[-1]].astype(np.int64), offsets[:-1] - lo) \
        if len(offsets) > 1 and offsets[-1] > lo else np.zeros(len(offsets) - 1, np.int64)
    counts = np.where(np.diff(offsets) == 0, 0, counts)  # reduceat repeats a value for empty bags
    new_offs = np.concatenate([[0], np.cumsum(counts)])
    src = np.ascontiguousarray(rows, dtype=el.storage) if len(rows) else np.zeros((1, rows.shape[1]), el.storage)
    return pool(src, el, keep.astype(np.int64), new_offs)


# ----------------------------------------------------------------------------------------------
# bit-level models of the gateware's arithmetic (slow; they check the RTL against the definition)

_GRS = 3          # guard, round and sticky bits below the 24-bit significand
_W = 24 + _GRS    # aligned significand width (27); a sum carries into bit 27


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


