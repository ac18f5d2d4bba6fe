"""Fp32Fma against the host definition of fused multiply-add (``evssd.host.pooling.fma32_model``,
itself checked against the numba kernel's ``llvm.fma.f32``), NaNs canonicalised.

Vectors are streamed one per cycle through the pipeline (and with random idle cycles): random
bit patterns, products near the addend's magnitude (cancellation, including exact), products far
above and below the addend, subnormal factors and results, overflow, rounding ties, and every
triple of special values.
"""
import numba
import numpy as np
from amaranth.sim import Simulator

from evssd.host.pooling import CANONICAL_NAN, canonicalize_nan, fma32, fma32_model
from evssd.hw.lib.fma import Fp32Fma

SPECIALS = np.array([
    0x0000_0000, 0x8000_0000,                       # +-0
    0x7F80_0000, 0xFF80_0000,                       # +-inf
    0x7FC0_0000, 0xFF80_0001,                       # quiet / signalling NaN
    0x7F7F_FFFF, 0xFF7F_FFFF,                       # +-max finite
    0x0000_0001, 0x8000_0001, 0x007F_FFFF,          # subnormal extremes
    0x0080_0000, 0x8080_0000,                       # smallest normals
    0x3F80_0000, 0xBF80_0000, 0x3F80_0001,          # 1, -1, 1 + ulp
    0x3400_0000, 0x4B80_0000, 0x1F80_0000, 0x5F80_0000,  # 2**-23, 2**24, 2**-64, 2**64
], dtype=np.uint32)


def reference(a, b, c):
    return canonicalize_nan(fma32_model(a.view("<f4"), b.view("<f4"), c.view("<f4"))).view("<u4")


def vectors(n, seed):
    """Triples stressing every path of the FMA."""
    rng = np.random.default_rng(seed)

    def bits(k):
        return rng.integers(0, 2**32, k, dtype=np.uint64).astype(np.uint32)

    def with_exp(x, e):
        return (x & np.uint32(0x807F_FFFF)) | (np.clip(e, 0, 255).astype(np.uint32) << np.uint32(23))

    a, b, c = bits(n), bits(n), bits(n)
    # moderate exponents, so products and addends meet (most random triples are far apart)
    a = np.where(rng.random(n) < 0.7, with_exp(a, rng.integers(97, 158, n)), a)
    b = np.where(rng.random(n) < 0.7, with_exp(b, rng.integers(97, 158, n)), b)
    ea = ((a >> 23) & 0xFF).astype(np.int64)
    eb = ((b >> 23) & 0xFF).astype(np.int64)
    ep = ea + eb - 127
    # addend near the product's magnitude: cancellation; or 20..80 binades above/below
    near = rng.random(n)
    c = np.where(near < 0.4, with_exp(c, ep + rng.integers(-3, 4, n)), c)
    c = np.where((near >= 0.4) & (near < 0.55), with_exp(c, ep + rng.integers(-60, 60, n)), c)
    # exact cancellation: c = -round(a*b) (the product's rounding error remains)
    with np.errstate(all="ignore"):
        p = a.view("<f4").astype(np.float64) * b.view("<f4").astype(np.float64)
        negp = (-p).astype(np.float32).view(np.uint32)
    c = np.where(rng.random(n) < 0.08, negp, c)
    # factors with few significand bits: exact products, rounding ties of the sum
    short = rng.random(n) < 0.1
    a = np.where(short, a & np.uint32(0xFFF0_0000), a)
    b = np.where(short, b & np.uint32(0xFFF8_0000), b)
    # subnormal factors / addends, and underflowing products
    a = np.where(rng.random(n) < 0.08, a & np.uint32(0x807F_FFFF), a)
    c = np.where(rng.random(n) < 0.08, c & np.uint32(0x807F_FFFF), c)
    tiny = rng.random(n) < 0.08
    a = np.where(tiny, with_exp(a, rng.integers(1, 60, n)), a)
    b = np.where(tiny, with_exp(b, rng.integers(1, 80, n)), b)
    c = np.where(tiny & (rng.random(n) < 0.5), c & np.uint32(0x807F_FFFF), c)
    # overflowing products
    huge = rng.random(n) < 0.04
    a = np.where(huge, with_exp(a, rng.integers(190, 255, n)), a)
    b = np.where(huge, with_exp(b, rng.integers(190, 255, n)), b)
    # specials anywhere
    for x in (a, b, c):
        sel = rng.random(n) < 0.03
        x[sel] = rng.choice(SPECIALS, int(sel.sum()))
    return a, b, c


def run_fma(a, b, c, stall_seed=None):
    """Stream the triples through the pipeline; return the results in order, checking that
    o_valid follows i_valid LATENCY cycles later."""
    dut = Fp32Fma()
    L = Fp32Fma.LATENCY
    out = []
    rng = np.random.default_rng(stall_seed)

    async def tb(ctx):
        hist = []
        i = 0
        while len(out) < len(a):
            if i < len(a) and (stall_seed is None or rng.random() < 0.6):
                ctx.set(dut.i_a, int(a[i])); ctx.set(dut.i_b, int(b[i])); ctx.set(dut.i_c, int(c[i]))
                ctx.set(dut.i_valid, 1)
                hist.append(True)
                i += 1
            else:
                ctx.set(dut.i_a, 0x7F80_0000); ctx.set(dut.i_b, 0); ctx.set(dut.i_valid, 0)
                hist.append(False)
            await ctx.tick()
            if len(hist) >= L:
                assert ctx.get(dut.o_valid) == hist[-L]
                if hist[-L]:
                    out.append(ctx.get(dut.o_res))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(out, dtype=np.uint32)


def check(a, b, c, got):
    ref = reference(a, b, c)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [tuple(hex(int(v)) for v in (a[i], b[i], c[i], ref[i], got[i])) for i in bad[:6]]


@numba.njit
def _llvm_fma(a, b, c, out):
    for i in range(a.shape[0]):
        out[i] = fma32(a[i], b[i], c[i])


def test_reference_is_the_kernels_fma():
    """The numpy model the RTL is checked against equals the kernels' llvm.fma.f32."""
    for seed in range(4):
        a, b, c = vectors(200_000, seed)
        out = np.empty(a.size, np.float32)
        _llvm_fma(a.view("<f4"), b.view("<f4"), c.view("<f4"), out)
        assert np.array_equal(canonicalize_nan(out).view("<u4"), reference(a, b, c))


def test_fma_rtl_specials_all_triples():
    a, b, c = (x.ravel() for x in np.meshgrid(SPECIALS, SPECIALS, SPECIALS))
    got = run_fma(a, b, c)
    check(a, b, c, got)
    # the rules the pooling relies on
    i = np.nonzero((a == 0x7F80_0000) & (b == 0) & (c == 0))[0][0]
    assert got[i] == CANONICAL_NAN                           # inf * 0
    i = np.nonzero((a == 0x8000_0000) & (b == 0x3F80_0000) & (c == 0x8000_0000))[0][0]
    assert got[i] == 0x8000_0000                             # -0 * 1 + -0 = -0
    i = np.nonzero((a == 0x3F80_0000) & (b == 0x3F80_0000) & (c == 0xBF80_0000))[0][0]
    assert got[i] == 0                                       # 1 * 1 - 1 = +0


def test_fma_rtl_random():
    a, b, c = vectors(12_000, seed=2024)
    ref = reference(a, b, c)
    e, f = (ref >> 23) & 0xFF, ref & 0x7F_FFFF
    # the vectors reach every result class (so a broken path cannot hide)
    assert ((e == 0) & (f != 0)).sum() > 300            # subnormal results
    assert ((ref & 0x7FFF_FFFF) == 0).sum() > 10        # zeros
    assert ((e == 0xFF) & (f == 0)).sum() > 300         # overflow / infinities
    assert (ref == CANONICAL_NAN).sum() > 100
    with np.errstate(all="ignore"):
        mag = np.maximum(np.abs(a.view("<f4").astype(np.float64) * b.view("<f4").astype(np.float64)),
                         np.abs(c.view("<f4").astype(np.float64)))
        res = np.abs(ref.view("<f4").astype(np.float64))
    assert ((res > 0) & (res < mag * 2.0 ** -8)).sum() > 300   # massive cancellation
    check(a, b, c, run_fma(a, b, c))


def test_fma_rtl_with_bubbles():
    a, b, c = vectors(1_500, seed=7)
    check(a, b, c, run_fma(a, b, c, stall_seed=3))
