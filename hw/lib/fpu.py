"""Floating-point units of the EV Merger: a pipelined binary32 adder and the fp16 widening.

``Fp32Adder``: IEEE-754 binary32 a + b, round-to-nearest-even, subnormal inputs and outputs kept
(no flush to zero), +-0 rules of RNE (x + -x = +0, -0 + -0 = -0), infinities, overflow to
infinity. **NaN payloads are canonicalised**: every NaN result is the quiet NaN ``0x7FC00000``
(numpy's result for non-NaN operands is the same value up to the sign; with NaN operands numpy
propagates a payload). The host model (``evssd.host.pooling``) canonicalises the same way, and
``evssd.host.pooling.fp32_add_bits`` is this adder's arithmetic bit for bit (the model orders the
operands by magnitude in one step; the pipeline by exponent, then by significand where the
exponents tie). Fixed latency
:attr:`Fp32Adder.LATENCY` = 6 cycles, one operation per cycle, no stall (free-running).
Stages: 1 exponent order/unpack/classify, 2 alignment shift + sticky (and the significand
order when nothing aligns), 3 add/subtract,
4 leading-zero count (balanced tree) + shift limit, 5 normalising shift, 6 round and pack.

Alone on ECP5-85F (yosys synth_ecp5, nextpnr-ecp5 --85k --out-of-context --freq 100): 573 LUT4 +
80 CCU2C, 293 FF, 121.5 MHz (critical path: stage 6, rounding increment -> overflow test ->
special-case mux). The 4-stage version was 766 LUT4 + 95 CCU2C, 182 FF, 69.4 MHz.

``Fp16ToFp32``: exact binary16 -> binary32, combinational (subnormal halves become normal
singles; infinities; NaN payloads shifted into the top of the fp32 fraction, as numpy does).
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Fp32Adder", "Fp16ToFp32", "CANONICAL_NAN"]

CANONICAL_NAN = 0x7FC0_0000
_GRS = 3            # guard, round, sticky below the 24-bit significand
_W = 24 + _GRS      # aligned significand width; a sum may carry into bit _W


def _lzc(m, v):
    """Leading zeros of ``v`` (``len(v)`` when zero) as a balanced tree of 2-way merges."""
    def rec(bits):
        # returns (all_zero, count) for a slice, MSB = bits[-1]
        n = len(bits)
        if n == 1:
            return ~bits[0], Const(0, 1)
        lo_n = n // 2
        hi_z, hi_c = rec(bits[lo_n:])
        lo_z, lo_c = rec(bits[:lo_n])
        hi_n = n - lo_n
        w = n.bit_length()
        cnt = Signal(w)
        m.d.comb += cnt.eq(Mux(hi_z, hi_n + lo_c, hi_c))
        zero = Signal()
        m.d.comb += zero.eq(hi_z & lo_z)
        return zero, cnt
    z, c = rec(v)
    out = Signal(range(len(v) + 1))
    m.d.comb += out.eq(Mux(z, len(v), c))
    return out


class Fp32Adder(wiring.Component):
    """Pipelined binary32 adder: ``o_sum`` = ``i_a + i_b`` :attr:`LATENCY` cycles later.

    ``i_valid`` travels along the pipeline to ``o_valid`` (the arithmetic does not need it).
    """
    LATENCY = 6

    i_a: In(32)
    i_b: In(32)
    i_valid: In(1)
    o_sum: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()

        # ---- stage 1: order by exponent, unpack, classify ----
        # The operand with the larger raw exponent goes first (an 8-bit compare; ordering by
        # the whole magnitude, a 31-bit compare in front of the swap's fan-out, missed 10 ns).
        # With equal effective exponents either order aligns nothing; stage 2 then puts the
        # larger significand first (see s1_flip). Everything else is computed from each
        # unswapped operand in parallel with the compare and only selected by it.
        a, b = self.i_a, self.i_b
        ea, eb = a[23:31], b[23:31]
        swap = eb > ea
        fa, fb = a[:23], b[:23]
        a_max, b_max = ea == 0xFF, eb == 0xFF
        a_nan = a_max & (fa != 0)
        b_nan = b_max & (fb != 0)
        both_inf_opp = a_max & b_max & (fa == 0) & (fb == 0) & (a[31] != b[31])
        eaf = Mux(ea == 0, 1, ea)       # subnormals: exponent 1, no hidden bit
        ebf = Mux(eb == 0, 1, eb)
        ma = Cat(fa, ea != 0)
        mb = Cat(fb, eb != 0)
        d_ab, d_ba = Signal(9), Signal(9)
        m.d.comb += [d_ab.eq(eaf - ebf), d_ba.eq(ebf - eaf)]
        # Shifts of 27 or more leave only the sticky bit, so 31 stands for all of them.
        d_ab5 = Mux(d_ab[5:] != 0, 31, d_ab[:5])
        d_ba5 = Mux(d_ba[5:] != 0, 31, d_ba[:5])

        s1_sign = Signal()
        s1_sub = Signal()
        s1_e = Signal(8)
        s1_mx = Signal(24)
        s1_my = Signal(24)
        s1_d = Signal(5)
        s1_nan = Signal()
        s1_inf = Signal()
        s1_valid = Signal()
        # With equal effective exponents (nothing to align) the second significand may be the
        # larger: stage 2 then swaps the two, and a difference takes the second one's sign.
        # Decided here beside the exponent order (24-bit compares of the unswapped operands),
        # so stage 2's selects come from one register.
        s1_flip = Signal()
        m.d.sync += [
            s1_flip.eq((eaf == ebf) & Mux(swap, ma > mb, mb > ma)),
            s1_sign.eq(Mux(swap, b[31], a[31])),
            s1_sub.eq(a[31] ^ b[31]),
            s1_e.eq(Mux(swap, ebf, eaf)),
            s1_mx.eq(Mux(swap, mb, ma)),
            s1_my.eq(Mux(swap, ma, mb)),
            s1_d.eq(Mux(swap, d_ba5, d_ab5)),   # = exf - max(ey, 1) >= 0, saturated
            s1_nan.eq(a_nan | b_nan | both_inf_opp),
            # the larger magnitude has exponent 0xFF whenever either has: it is infinite
            # whenever the sum is (NaN cases are overridden)
            s1_inf.eq(a_max | b_max),
            s1_valid.eq(self.i_valid),
        ]

        # ---- stage 2: align the smaller operand; sticky = OR of the bits shifted out; the
        # two swap when stage 1 found the second significand larger (nothing then aligns) ----
        X = Cat(Const(0, _GRS), s1_mx)
        Y = Cat(Const(0, _GRS), s1_my)
        # the bits below the shift amount, from a decoded mask: cheaper and shallower than
        # shifting back and comparing
        below = Signal(_W)
        for i in range(_W):
            m.d.comb += below[i].eq(s1_d > i)
        s2_X = Signal(_W)
        s2_Y = Signal(_W)
        s2_sign = Signal()
        s2_sub = Signal()
        s2_e = Signal(8)
        s2_nan = Signal()
        s2_inf = Signal()
        s2_valid = Signal()
        m.d.sync += [
            s2_X.eq(Mux(s1_flip, Y, X)),
            s2_Y.eq(Mux(s1_flip, X, (Y >> s1_d) | (Y & below).any())),
            s2_sign.eq(s1_sign ^ (s1_flip & s1_sub)),
            s2_sub.eq(s1_sub), s2_e.eq(s1_e),
            s2_nan.eq(s1_nan), s2_inf.eq(s1_inf), s2_valid.eq(s1_valid),
        ]

        # ---- stage 3: add or subtract ----
        s3_S = Signal(_W + 1)
        s3_sign = Signal()
        s3_sub = Signal()
        s3_e = Signal(8)
        s3_nan = Signal()
        s3_inf = Signal()
        s3_valid = Signal()
        # The normalising shift may not take the exponent below 1, so it is at most e - 1. A
        # one at bit _W - 1 - (e - 1) of the leading-zero count's input stops the count there:
        # the count is then min(leading zeros, e - 1) with no compare after it (for e - 1 >= _W
        # no bit is set and the shift is never clamped).
        s3_stop = Signal(_W)
        m.d.sync += [
            s3_stop.eq(Cat(*(s2_e == _W - i for i in range(_W)))),
            s3_S.eq(Mux(s2_sub, s2_X - s2_Y, s2_X + s2_Y)),
            s3_sign.eq(s2_sign), s3_sub.eq(s2_sub), s3_e.eq(s2_e),
            s3_nan.eq(s2_nan), s3_inf.eq(s2_inf), s3_valid.eq(s2_valid),
        ]

        # ---- stage 4: leading-zero count and the normalising shift amount (never below
        # exponent 1: what remains unnormalised is a subnormal) ----
        lz = _lzc(m, s3_S[:_W] | s3_stop)
        s4_S = Signal(_W + 1)
        s4_sh = Signal(range(_W + 1))
        s4_e = Signal(8)
        s4_zero = Signal()
        s4_sign = Signal()
        s4_sub = Signal()
        s4_nan = Signal()
        s4_inf = Signal()
        s4_valid = Signal()
        m.d.sync += [
            s4_S.eq(s3_S),
            s4_sh.eq(lz),
            s4_e.eq(s3_e),
            s4_zero.eq(s3_S == 0),
            s4_sign.eq(s3_sign), s4_sub.eq(s3_sub),
            s4_nan.eq(s3_nan), s4_inf.eq(s3_inf), s4_valid.eq(s3_valid),
        ]

        # ---- stage 5: normalise (right by one on carry, else left by the shift amount) ----
        carry = s4_S[_W]
        s5_S = Signal(_W)
        s5_em1 = Signal(9)              # biased exponent - 1 (>= 0: the shift keeps e >= 1)
        s5_zero = Signal()
        s5_sign = Signal()
        s5_sub = Signal()
        s5_nan = Signal()
        s5_inf = Signal()
        s5_valid = Signal()
        m.d.sync += [
            s5_S.eq(Mux(carry, s4_S[1:] | s4_S[0], (s4_S << s4_sh)[:_W])),
            s5_em1.eq(Mux(carry, s4_e, s4_e - 1 - s4_sh)),
            s5_zero.eq(s4_zero),
            s5_sign.eq(s4_sign), s5_sub.eq(s4_sub),
            s5_nan.eq(s4_nan), s5_inf.eq(s4_inf), s5_valid.eq(s4_valid),
        ]

        # ---- stage 6: round to nearest even, pack (the rounding carry ripples into the
        # exponent through the addition), overflow to infinity, special cases ----
        mant = s5_S[_GRS:]
        g = s5_S[2]
        rs = s5_S[:2] != 0
        up = g & (rs | mant[0])
        # one carry chain: the rounding increment rides in below bit 0 (up + up carries up)
        packed_c = Signal(34)
        m.d.comb += packed_c.eq(Cat(up, s5_em1 << 23) + Cat(up, mant))
        packed = packed_c[1:]
        # Overflow to infinity, worked out beside the chain from the unrounded fields: the
        # exponent field is e - 1 + the hidden bit (compared with constants, no adder). When
        # only the rounding carries it to 0xFF the fraction is 0, so `packed` is already
        # infinity and needs no override.
        hidden = mant[23]
        em1 = s5_em1
        overflow = em1[8] | Mux(hidden, em1[1:8] == 0x7F, em1[:8] == 0xFF)
        with m.If(s5_nan):
            m.d.sync += self.o_sum.eq(CANONICAL_NAN)
        with m.Elif(s5_inf | overflow):
            m.d.sync += self.o_sum.eq(Cat(Const(0x7F80_0000, 31), s5_sign))
        with m.Elif(s5_zero):
            m.d.sync += self.o_sum.eq(Cat(Const(0, 31), s5_sign & ~s5_sub))
        with m.Else():
            m.d.sync += self.o_sum.eq(Cat(packed[:31], s5_sign))
        m.d.sync += self.o_valid.eq(s5_valid)
        return m


class Fp16ToFp32(wiring.Component):
    """Exact binary16 -> binary32 conversion (combinational)."""
    i_h: In(16)
    o_f: Out(32)

    def elaborate(self, platform):
        m = Module()
        s = self.i_h[15]
        e = self.i_h[10:15]
        f = self.i_h[:10]
        with m.If(e == 0x1F):
            m.d.comb += self.o_f.eq(Cat(Const(0, 13), f, Const(0xFF, 8), s))
        with m.Elif(e != 0):
            m.d.comb += self.o_f.eq(Cat(Const(0, 13), f, e + 112, s))
        with m.Elif(f == 0):
            m.d.comb += self.o_f.eq(Cat(Const(0, 31), s))
        with m.Else():
            # Subnormal half: value f * 2**-24 with f's top set bit at n-1 becomes a normal
            # single with exponent n + 102 and f shifted so that bit lands on the hidden bit.
            for n in range(1, 11):
                with m.If(f[n - 1]):
                    m.d.comb += self.o_f.eq(
                        Cat(Const(0, 24 - n), f[:n - 1], Const(n + 102, 8), s))
        return m
