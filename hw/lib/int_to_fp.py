"""int32 -> binary32 conversion for weighted pooling of int8/int32 tables.

``Int32ToFp32``: ``o_f = float32(i_x)`` for a two's-complement int32, round-to-nearest-even
(values beyond 2**24 round; -2**31 is exact), 0 -> +0.0: numpy's ``astype(np.float32)`` and the
host definition's ``float32(x)`` (``evssd.host.pooling``, weighted bags of int tables). An int8
element, sign-extended, converts exactly through it. Fixed latency :attr:`Int32ToFp32.LATENCY`
= 4, one per cycle, free-running. Stages: 1 magnitude (a negation), 2 leading-zero count, 3
normalising shift (leading one to bit 31) and the exponent, 4 round and pack. Each stage holds
one carry chain or one tree, so the converter is no slower than the merger's adders.
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .fpu import _lzc

__all__ = ["Int32ToFp32"]


class Int32ToFp32(wiring.Component):
    """Pipelined ``o_f = float32(i_x)`` (RNE), :attr:`LATENCY` cycles later."""
    LATENCY = 4

    i_x: In(32)
    i_valid: In(1)
    o_f: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()
        x = self.i_x

        # ---- stage 1: magnitude (-2**31 stays 0x8000_0000: its magnitude) ----
        s1_mag = Signal(32)
        s1_sign = Signal()
        s1_valid = Signal()
        m.d.sync += [s1_mag.eq(Mux(x[31], -x, x)), s1_sign.eq(x[31]), s1_valid.eq(self.i_valid)]

        # ---- stage 2: leading zeros ----
        s2_mag = Signal(32)
        s2_lz = Signal(6)
        s2_zero = Signal()
        s2_sign = Signal()
        s2_valid = Signal()
        m.d.sync += [s2_mag.eq(s1_mag), s2_lz.eq(_lzc(m, s1_mag)), s2_zero.eq(s1_mag == 0),
                     s2_sign.eq(s1_sign), s2_valid.eq(s1_valid)]

        # ---- stage 3: leading one to bit 31; biased exponent 158 - lz for a leading one at
        # bit 31 - lz, kept as 157 - lz because the hidden bit adds one in the packing ----
        s3_n = Signal(32)
        s3_e = Signal(8)
        s3_zero = Signal()
        s3_sign = Signal()
        s3_valid = Signal()
        m.d.sync += [s3_n.eq(s2_mag << s2_lz[:5]), s3_e.eq(157 - s2_lz), s3_zero.eq(s2_zero),
                     s3_sign.eq(s2_sign), s3_valid.eq(s2_valid)]

        # ---- stage 4: 24 kept bits, guard at bit 7, sticky below; round to nearest even (the
        # rounding carry ripples into the exponent through the addition; 2**32 never occurs:
        # |x| <= 2**31) ----
        mant = s3_n[8:]
        up = s3_n[7] & ((s3_n[:7] != 0) | mant[0])
        packed_c = Signal(33)
        # one carry chain: the increment rides in below bit 0 (up + up carries up)
        m.d.comb += packed_c.eq(Cat(up, Const(0, 23), s3_e) + Cat(up, mant))
        packed = packed_c[1:]
        with m.If(s3_zero):
            m.d.sync += self.o_f.eq(0)
        with m.Else():
            m.d.sync += self.o_f.eq(Cat(packed[:31], s3_sign))
        m.d.sync += self.o_valid.eq(s3_valid)
        return m
