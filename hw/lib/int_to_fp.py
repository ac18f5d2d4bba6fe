"""int32 -> binary32 conversion for weighted pooling of int8/int32 tables.

``Int32ToFp32``: ``o_f = float32(i_x)`` for a two's-complement int32, round-to-nearest-even
(values beyond 2**24 round; -2**31 is exact), 0 -> +0.0: numpy's ``astype(np.float32)`` and the
host definition's ``float32(x)`` (``evssd.host.pooling``, weighted bags of int tables). An int8
element, sign-extended, converts exactly through it. Fixed latency :attr:`Int32ToFp32.LATENCY`
= 2 (stage 1: magnitude and leading-zero count, stage 2: normalise, round, pack), one per
cycle, free-running.
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .fpu import _lzc

__all__ = ["Int32ToFp32"]


class Int32ToFp32(wiring.Component):
    """Pipelined ``o_f = float32(i_x)`` (RNE), :attr:`LATENCY` cycles later."""
    LATENCY = 2

    i_x: In(32)
    i_valid: In(1)
    o_f: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()
        x = self.i_x
        mag = Signal(32)
        m.d.comb += mag.eq(Mux(x[31], -x, x))          # -2**31 stays 0x8000_0000: its magnitude
        s1_mag = Signal(32)
        s1_lz = Signal(6)
        s1_sign = Signal()
        s1_valid = Signal()
        m.d.sync += [s1_mag.eq(mag), s1_lz.eq(_lzc(m, mag)), s1_sign.eq(x[31]),
                     s1_valid.eq(self.i_valid)]

        # leading one to bit 31; 24 kept bits, guard at bit 7, sticky below
        n = Signal(32)
        m.d.comb += n.eq(s1_mag << s1_lz[:5])
        mant = n[8:]
        up = n[7] & ((n[:7] != 0) | mant[0])
        # biased exponent 158 - lz for a leading one at bit 31 - lz; the rounding carry
        # ripples into the exponent through the addition (2**32 never occurs: |x| <= 2**31)
        packed = Signal(32)
        m.d.comb += packed.eq(((157 - s1_lz) << 23) + mant + up)
        with m.If(s1_mag == 0):
            m.d.sync += self.o_f.eq(0)
        with m.Else():
            m.d.sync += self.o_f.eq(Cat(packed[:31], s1_sign))
        m.d.sync += self.o_valid.eq(s1_valid)
        return m
