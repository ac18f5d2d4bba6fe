"""Floating-point units of the EV Merger: a pipelined binary32 adder and the fp16 widening.

``Fp32Adder``: IEEE-754 binary32 a + b, round-to-nearest-even, subnormal inputs and outputs kept
(no flush to zero), +-0 rules of RNE (x + -x = +0, -0 + -0 = -0), infinities, overflow to
infinity. **NaN payloads are canonicalised**: every NaN result is the quiet NaN ``0x7FC00000``
(numpy's result for non-NaN operands is the same value up to the sign; with NaN operands numpy
propagates a payload). The host model (``evssd.host.pooling``) canonicalises the same way, and
``evssd.host.pooling.fp32_add_bits`` is this adder's algorithm step by step. Fixed latency
:attr:`Fp32Adder.LATENCY` = 4 cycles, one operation per cycle, no stall (free-running).

Alone on ECP5-85F (yosys synth_ecp5, nextpnr out of context): 766 LUT4 + 95 CCU2C, 182 FF,
69.4 MHz (critical path: stage 3, leading-zero count -> shift limit -> normalising shift).

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


class Fp32Adder(wiring.Component):
    """Pipelined binary32 adder: ``o_sum`` = ``i_a + i_b`` :attr:`LATENCY` cycles later.

    ``i_valid`` travels along the pipeline to ``o_valid`` (the arithmetic does not need it).
    """
    LATENCY = 4

    i_a: In(32)
    i_b: In(32)
    i_valid: In(1)
    o_sum: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()

        # ---- stage 1: order by magnitude, unpack, classify ----
        a, b = self.i_a, self.i_b
        swap = b[:31] > a[:31]          # bit patterns without the sign order as magnitudes
        x = Mux(swap, b, a)
        y = Mux(swap, a, b)
        ex, ey = x[23:31], y[23:31]
        fx, fy = x[:23], y[:23]
        x_max, y_max = ex == 0xFF, ey == 0xFF
        x_nan = x_max & (fx != 0)
        y_nan = y_max & (fy != 0)
        both_inf_opp = x_max & y_max & (fx == 0) & (fy == 0) & (x[31] != y[31])
        exf = Mux(ex == 0, 1, ex)       # subnormals: exponent 1, no hidden bit
        # Both exponent differences are computed from the unswapped operands, in parallel with
        # the magnitude compare, and selected by it: the compare -> swap -> subtract chain was
        # the critical path.
        ea, eb = a[23:31], b[23:31]
        eaf = Mux(ea == 0, 1, ea)
        ebf = Mux(eb == 0, 1, eb)
        d_ab, d_ba = Signal(9), Signal(9)
        m.d.comb += [d_ab.eq(eaf - ebf), d_ba.eq(ebf - eaf)]
        diff = Mux(swap, d_ba, d_ab)    # = exf - max(ey, 1) >= 0

        s1_sign = Signal()
        s1_sub = Signal()
        s1_e = Signal(8)
        s1_mx = Signal(24)
        s1_my = Signal(24)
        s1_d = Signal(5)
        s1_nan = Signal()
        s1_inf = Signal()
        s1_valid = Signal()
        m.d.sync += [
            s1_sign.eq(x[31]),
            s1_sub.eq(x[31] ^ y[31]),
            s1_e.eq(exf),
            s1_mx.eq(Cat(fx, ex != 0)),
            s1_my.eq(Cat(fy, ey != 0)),
            # Shifts of 27 or more leave only the sticky bit, so 31 stands for all of them.
            s1_d.eq(Mux(diff[5:] != 0, 31, diff[:5])),
            s1_nan.eq(x_nan | y_nan | both_inf_opp),
            s1_inf.eq(x_max),           # |x| >= |y|: x is infinite whenever the sum is
            s1_valid.eq(self.i_valid),
        ]

        # ---- stage 2: align the smaller operand (with sticky) and add or subtract ----
        X = Cat(Const(0, _GRS), s1_mx)
        Y = Cat(Const(0, _GRS), s1_my)
        y_shift = Signal(_W)
        m.d.comb += y_shift.eq(Y >> s1_d)
        lost = (y_shift << s1_d)[:_W] != Y
        y_al = y_shift | lost
        s2_S = Signal(_W + 1)
        s2_sign = Signal()
        s2_sub = Signal()
        s2_e = Signal(8)
        s2_nan = Signal()
        s2_inf = Signal()
        s2_valid = Signal()
        m.d.sync += [
            s2_S.eq(Mux(s1_sub, X - y_al, X + y_al)),
            s2_sign.eq(s1_sign), s2_sub.eq(s1_sub), s2_e.eq(s1_e),
            s2_nan.eq(s1_nan), s2_inf.eq(s1_inf), s2_valid.eq(s1_valid),
        ]

        # ---- stage 3: normalise (right by one on carry, else left by the leading zeros but
        # never below exponent 1: what remains unnormalised is a subnormal) ----
        lz = Signal(range(_W + 1))
        m.d.comb += lz.eq(_W)
        for i in range(_W):             # later (higher) bits win: a priority encoder
            with m.If(s2_S[i]):
                m.d.comb += lz.eq(_W - 1 - i)
        e_m1 = s2_e - 1
        sh = Signal(range(_W + 1))
        m.d.comb += sh.eq(Mux(lz > e_m1, e_m1, lz))
        carry = s2_S[_W]
        s3_S = Signal(_W)
        s3_e = Signal(9)
        s3_zero = Signal()
        s3_sign = Signal()
        s3_sub = Signal()
        s3_nan = Signal()
        s3_inf = Signal()
        s3_valid = Signal()
        m.d.sync += [
            s3_S.eq(Mux(carry, s2_S[1:] | s2_S[0], (s2_S << sh)[:_W])),
            s3_e.eq(Mux(carry, s2_e + 1, s2_e - sh)),
            s3_zero.eq(s2_S == 0),
            s3_sign.eq(s2_sign), s3_sub.eq(s2_sub),
            s3_nan.eq(s2_nan), s3_inf.eq(s2_inf), s3_valid.eq(s2_valid),
        ]

        # ---- stage 4: round to nearest even, pack (the rounding carry ripples into the
        # exponent through the addition), overflow to infinity, special cases ----
        mant = s3_S[_GRS:]
        g = s3_S[2]
        rs = s3_S[:2] != 0
        up = g & (rs | mant[0])
        packed = Signal(33)
        m.d.comb += packed.eq(((s3_e - 1) << 23) + mant + up)
        with m.If(s3_nan):
            m.d.sync += self.o_sum.eq(CANONICAL_NAN)
        with m.Elif(s3_inf | (packed >= 0x7F80_0000)):
            m.d.sync += self.o_sum.eq(Cat(Const(0x7F80_0000, 31), s3_sign))
        with m.Elif(s3_zero):
            m.d.sync += self.o_sum.eq(Cat(Const(0, 31), s3_sign & ~s3_sub))
        with m.Else():
            m.d.sync += self.o_sum.eq(Cat(packed[:31], s3_sign))
        m.d.sync += self.o_valid.eq(s3_valid)
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
