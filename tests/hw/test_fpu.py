"""Fp32Adder / Fp16ToFp32 against numpy, through the bit-level model in evssd.host.pooling.

Two layers: the vectorised model ``fp32_add_bits`` (the RTL's algorithm step by step) is checked
against numpy on millions of vectors, then the RTL is checked against the model on ~20k vectors
streamed one per cycle through the pipeline (special values included).
"""
import numpy as np
import pytest
from amaranth.sim import Simulator

from evssd.host.pooling import (CANONICAL_NAN, canonicalize_nan, fp16_to_fp32_bits,
                                fp32_add_bits)
from evssd.hw.lib.fpu import Fp16ToFp32, Fp32Adder

SPECIALS = np.array([
    0x0000_0000, 0x8000_0000,               # +-0
    0x7F80_0000, 0xFF80_0000,               # +-inf
    0x7FC0_0000, 0xFFC0_0000, 0x7F80_0001, 0xFFBF_FFFF, 0x7FC1_2345,  # quiet/signalling NaNs
    0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F7F_FFFE,  # +-max finite (overflow on addition)
    0x0000_0001, 0x8000_0001, 0x007F_FFFF, 0x807F_FFFF,  # subnormal extremes
    0x0080_0000, 0x8080_0000, 0x0080_0001,  # smallest normals
    0x3F80_0000, 0xBF80_0000, 0x3380_0000, 0x3400_0000, 0x4B80_0000,  # 1, -1, ulp-ish, 2**24
], dtype=np.uint32)


def vectors(n, seed):
    """Operand pairs that stress every path: random bits, nearby exponents (cancellation),
    x + -x, subnormals, ties (low bits 100...), specials."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    b = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    e = np.clip(((a >> 23) & 0xFF).astype(np.int64) + rng.integers(-3, 4, n), 0, 255).astype(np.uint32)
    b = np.where(rng.random(n) < 0.5, (b & 0x807F_FFFF) | (e << 23), b)
    b = np.where(rng.random(n) < 0.08, a ^ 0x8000_0000 ^ rng.integers(0, 4, n).astype(np.uint32), b)
    b = np.where(rng.random(n) < 0.05, (a & 0xFFFF_FFF8) | 0x4, b)          # rounding ties
    a = np.where(rng.random(n) < 0.15, a & 0x807F_FFFF, a)                  # subnormal a
    b = np.where(rng.random(n) < 0.15, (b & 0x807F_FFFF) | (rng.integers(0, 2, n).astype(np.uint32) << 23), b)
    a = np.where(rng.random(n) < 0.05, rng.choice(SPECIALS, n), a)
    b = np.where(rng.random(n) < 0.05, rng.choice(SPECIALS, n), b)
    return a, b


def numpy_add(a, b):
    with np.errstate(all="ignore"):
        return canonicalize_nan(a.view("<f4") + b.view("<f4")).view("<u4")


def test_model_matches_numpy():
    """The bit-level model equals numpy (NaNs canonicalised) on 4M vectors + all special pairs."""
    for seed in range(8):
        a, b = vectors(500_000, seed)
        got, ref = fp32_add_bits(a, b), numpy_add(a, b)
        bad = np.nonzero(got != ref)[0]
        assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    a, b = np.meshgrid(SPECIALS, SPECIALS)
    a, b = a.ravel(), b.ravel()
    assert np.array_equal(fp32_add_bits(a, b), numpy_add(a, b))
    # the sign rules the merger relies on
    assert fp32_add_bits(0x8000_0000, 0x8000_0000) == 0x8000_0000
    assert fp32_add_bits(0x3F80_0000, 0xBF80_0000) == 0
    assert fp32_add_bits(0x7F80_0000, 0xFF80_0000) == CANONICAL_NAN


def test_fp16_model_matches_numpy_exhaustive():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    assert np.array_equal(fp16_to_fp32_bits(h), h.view("<f2").astype("<f4").view("<u4"))


def run_adder(a, b, stall_seed=None):
    """Stream the pairs through the pipeline (one per cycle, or with random idle cycles when
    stall_seed is given); return the results in order, checking o_valid tracks i_valid."""
    dut = Fp32Adder()
    out = []
    L = Fp32Adder.LATENCY
    rng = np.random.default_rng(stall_seed)

    async def tb(ctx):
        hist = []
        i = 0
        while len(out) < len(a):
            if i < len(a) and (stall_seed is None or rng.random() < 0.7):
                ctx.set(dut.i_a, int(a[i])); ctx.set(dut.i_b, int(b[i])); ctx.set(dut.i_valid, 1)
                hist.append(True)
                i += 1
            else:
                ctx.set(dut.i_a, 0x7FC0_0000); ctx.set(dut.i_valid, 0)
                hist.append(False)
            await ctx.tick()
            if len(hist) >= L:
                exp_valid = hist[-L]
                assert ctx.get(dut.o_valid) == exp_valid
                if exp_valid:
                    out.append(ctx.get(dut.o_sum))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(out, dtype=np.uint32)


def test_adder_rtl_specials_exhaustive_pairs():
    a, b = np.meshgrid(SPECIALS, SPECIALS)
    a, b = a.ravel(), b.ravel()
    got = run_adder(a, b)
    assert np.array_equal(got, numpy_add(a, b)), "special-value pairs"


def test_adder_rtl_random():
    a, b = vectors(20_000, seed=1234)
    got = run_adder(a, b)
    ref = fp32_add_bits(a, b)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    assert np.array_equal(ref, numpy_add(a, b))


def test_adder_rtl_equal_exponents_second_larger():
    """Operands with equal effective exponents (subnormal against exponent 1 included) where
    the second has the larger significand, both signs: the adder orders by exponent only, so
    these take the stage-2 swap (a difference then has the second operand's sign)."""
    rng = np.random.default_rng(31)
    n = 4000
    e = rng.integers(0, 40, n).astype(np.uint32)
    e = np.where(rng.random(n) < 0.5, e, rng.integers(0, 255, n).astype(np.uint32))
    fa = rng.integers(0, 1 << 23, n).astype(np.uint32)
    fb = rng.integers(0, 1 << 23, n).astype(np.uint32)
    fa, fb = np.minimum(fa, fb), np.maximum(fa, fb)
    eb = np.where((e == 0) & (rng.random(n) < 0.5), 1, e).astype(np.uint32)  # 0 vs 1: same scale
    sa = (rng.random(n) < 0.5).astype(np.uint32) << 31
    sb = (rng.random(n) < 0.5).astype(np.uint32) << 31
    a = (sa | (e << 23) | fa).astype(np.uint32)
    b = (sb | (eb << 23) | fb).astype(np.uint32)
    got = run_adder(a, b)
    ref = fp32_add_bits(a, b)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    assert np.array_equal(ref, numpy_add(a, b))
    assert np.array_equal(run_adder(b, a), ref)      # and the other way round: commutative


def test_adder_rtl_clamped_normalisation():
    """Cancellation at the bottom of the exponent range, where the normalising shift is clamped
    at e - 1 and the result is subnormal or just normal: exponents 1..30, opposite signs,
    nearby significands."""
    rng = np.random.default_rng(77)
    n = 4_000
    e = rng.integers(1, 31, n).astype(np.uint32)
    a = (e << 23) | rng.integers(0, 1 << 23, n).astype(np.uint32)
    de = rng.integers(0, 3, n).astype(np.uint32)
    b = 0x8000_0000 | (np.maximum(e, de + 1) - de) << 23 | (a & 0x7F_FF00) | rng.integers(0, 256, n).astype(np.uint32)
    a = np.where(rng.random(n) < 0.5, a ^ 0x8000_0000, a).astype(np.uint32)
    b = np.where(a >> 31 == b >> 31, b ^ 0x8000_0000, b).astype(np.uint32)
    ref = fp32_add_bits(a, b)
    assert (((ref >> 23) & 0xFF) == 0).sum() > n // 10, "the vectors reach subnormal results"
    got = run_adder(a, b)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    assert np.array_equal(ref, numpy_add(a, b))


def test_adder_rtl_rounding_into_overflow():
    """Sums at the top of the range, where rounding carries into the exponent field and the
    result becomes infinity (or stays the largest finite value): operands near +-max finite and
    addends from one ulp down to far below half an ulp."""
    rng = np.random.default_rng(5)
    n = 3_000
    a = (0x7F7F_FF00 | rng.integers(0, 256, n)).astype(np.uint32)
    a = np.where(rng.random(n) < 0.3, np.uint32(0x7F7F_FFFF), a).astype(np.uint32)
    eb = rng.integers(100, 255, n).astype(np.uint32)
    b = (eb << 23) | rng.integers(0, 1 << 23, n).astype(np.uint32)
    sign = (rng.random(n) < 0.5).astype(np.uint32) << 31
    a, b = a | sign, b | sign                  # same signs: the magnitude grows
    ref = fp32_add_bits(a, b)
    inf = (ref & 0x7FFF_FFFF) == 0x7F80_0000
    assert inf.sum() > n // 10 and (~inf).sum() > n // 10, "both outcomes are reached"
    got = run_adder(a, b)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    assert np.array_equal(ref, numpy_add(a, b))


def test_adder_rtl_with_bubbles():
    a, b = vectors(2_000, seed=99)
    assert np.array_equal(run_adder(a, b, stall_seed=5), numpy_add(a, b))


def test_fp16_rtl_exhaustive():
    dut = Fp16ToFp32()
    h = np.arange(1 << 16, dtype=np.uint32)
    ref = fp16_to_fp32_bits(h)
    got = []

    async def tb(ctx):
        for v in h[::1]:
            ctx.set(dut.i_h, int(v))
            got.append(ctx.get(dut.o_f))

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    assert np.array_equal(np.array(got, dtype=np.uint32), ref)


def test_pool_bags_equals_adder_chain():
    """host.pooling.pool_bags (numpy, used by the host model) equals a chain of the adder's
    bit model starting from -0.0, for fp32 and fp16 with special values, and wrapping int sums."""
    from evssd.host.pooling import pool_bags
    from evssd.hw.regmap import ElemType
    rng = np.random.default_rng(4)
    n, dim = 40, 6
    offsets = np.array([0, 0, 1, 5, 5, 12, 20, 33, 40])
    good = rng.random(n) < 0.8
    a, _ = vectors(n * dim, seed=77)
    rows32 = a.reshape(n, dim).view("<f4")
    h = rng.integers(0, 1 << 16, n * dim).astype(np.uint16).reshape(n, dim)
    for elem, rows, wide in ((ElemType.FP32, rows32, rows32.view("<u4")),
                             (ElemType.FP16, h.view("<f2"), fp16_to_fp32_bits(h).reshape(n, dim))):
        got = pool_bags(rows, offsets, good, elem).view("<u4")
        for bag in range(len(offsets) - 1):
            idx = [i for i in range(offsets[bag], offsets[bag + 1]) if good[i]]
            acc = np.full(dim, 0x8000_0000, dtype=np.uint32)
            for i in idx:
                acc = fp32_add_bits(acc, wide[i])
            exp = acc if idx else np.zeros(dim, np.uint32)
            assert np.array_equal(got[bag], exp), (elem, bag)
    i8 = rng.integers(-128, 128, (n, dim)).astype("i1")
    got = pool_bags(i8, offsets, good, ElemType.INT8)
    for bag in range(len(offsets) - 1):
        sl = slice(offsets[bag], offsets[bag + 1])
        assert np.array_equal(got[bag], i8[sl][good[sl]].astype(np.int64).sum(0).astype("<i4"))
    i32 = rng.integers(-2**31, 2**31, (n, dim)).astype("<i4")
    got = pool_bags(i32, offsets, good, ElemType.INT32)
    for bag in range(len(offsets) - 1):
        sl = slice(offsets[bag], offsets[bag + 1])
        exp = (i32[sl][good[sl]].astype(np.int64).sum(0) & 0xFFFF_FFFF).astype(np.uint32).view("<i4")
        assert np.array_equal(got[bag], exp)
