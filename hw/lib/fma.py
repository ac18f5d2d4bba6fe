"""A pipelined binary32 fused multiply-add for the merger's weighted and row-wise INT8 pooling.

``Fp32Fma``: ``o_res = round(i_a * i_b + i_c)`` with ONE rounding (the exact product is never
rounded), round-to-nearest-even, subnormal inputs and outputs kept (no flush to zero),
infinities, overflow to infinity, the IEEE zero-sign rules of RNE (an exact zero sum of
non-zero terms is +0; ``(+-0) + (+-0)`` keeps the sign only when both are negative), and
``inf * 0``, ``inf - inf`` and every NaN operand give the canonical quiet NaN ``0x7FC00000``
(as :class:`~evssd.hw.fpu.Fp32Adder`). This is ``llvm.fma.f32``, the host definition of
weighted and row-wise INT8 pooling (:func:`evssd.host.pooling.fma32`), bit for bit after NaN
canonicalisation; ``evssd.host.pooling.fma32_model`` is the numpy reference the tests use.
With ``i_c = -0.0`` it is a correctly rounded multiplier (``scale * w`` of weighted row-wise
INT8 bags).

Fixed latency :attr:`Fp32Fma.LATENCY` = 11 cycles, one operation per cycle, free-running
(``i_valid`` only travels along to ``o_valid``).

Algorithm (all exact until the single rounding in the last stage). The 48-bit product ``P`` of
the two 24-bit significands sits at bits ``[26, 74)`` of a 101-bit window; the addend's
significand starts at bits ``[76, 100)`` and is shifted right to its place, bits shifted out
below bit 0 OR-ed into bit 0 (sticky). The 26 zero bits under the product keep the rounding
point at least two bits above bit 0 whenever a sticky bit can be set, so the sticky
approximation rounds like the exact value (no input normalisation is needed for subnormal
factors). When the addend is far larger than the product (or the product is zero) it stays at
the top of the window and the window is anchored to it: the product then lies below a quarter of
the addend's ulp and acts only as a sticky bit. Then: add or subtract (both differences are
computed so the magnitude needs no negation), leading-zero count, a normalising left shift
limited so the biased exponent stays >= 1 (what remains unnormalised is a subnormal), round
to nearest even and pack as ``Fp32Adder`` does.

Stages: 1 unpack/classify + the exponent sums that place the addend, 2 four 12x12 partial
products (DSP MULT18X18D) + the addend's shift amount and window anchor, 3 partial-product middle
sum + the addend's alignment shift with sticky, 4 product assembly, 5a add/subtract of the
window's low 50 bits, 5b of the rest with their carries, 6a leading zeros of four 26-bit chunks,
6b their combination + the shift limit, 7 normalising shift by multiples of 16, 8a the rest of
the shift on the kept bits and guard + the rounding decision, 8b pack. Cost and Fmax alone on
ECP5: docs/synthesis.md.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .fpu import CANONICAL_NAN, _lzc

__all__ = ["Fp32Fma"]

_PLSB = 26            # the product's lowest bit in the window
_CLSB = 76            # the addend's lowest bit before its alignment shift
_WIN = 101            # window bits: addend (< 2**100) + product (< 2**74) never carries past bit 100
_ROUND = _WIN - 24    # lowest kept bit of a normalised result (leading one at bit 100)
_LZ_CHUNK = 26        # the leading-zero count: per chunk in one stage, chunks combined in the next
_LZ_CHUNKS = 4
_SPLIT = 50           # window bits added in stage 5a; the rest, with 5a's carries, in 5b
_ECK = (300 + _PLSB - 150) - _CLSB   # (eaf + ebf) - (ecf + _ECK) = _CLSB - the addend's offset
_FINE = 4             # the normalising shift: by multiples of 2**_FINE in stage 7, the rest in 8a


class Fp32Fma(wiring.Component):
    """Pipelined binary32 ``o_res = i_a * i_b + i_c``, one rounding, :attr:`LATENCY` cycles later."""
    LATENCY = 11

    i_a: In(32)
    i_b: In(32)
    i_c: In(32)
    i_valid: In(1)
    o_res: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()

        def stage(name, value, shape=None):
            """A pipeline register holding ``value`` (a Signal named ``name``)."""
            sig = Signal(shape if shape is not None else value.shape(), name=name)
            m.d.sync += sig.eq(value)
            return sig

        # ---- stage 1: unpack, classify, the addend's offset ----
        a, b, c = self.i_a, self.i_b, self.i_c
        ea, eb, ec = a[23:31], b[23:31], c[23:31]
        fa, fb, fc = a[:23], b[:23], c[:23]
        a_max, b_max, c_max = ea == 0xFF, eb == 0xFF, ec == 0xFF
        a_zero = (ea == 0) & (fa == 0)
        b_zero = (eb == 0) & (fb == 0)
        c_zero = (ec == 0) & (fc == 0)
        a_nan, b_nan, c_nan = a_max & (fa != 0), b_max & (fb != 0), c_max & (fc != 0)
        a_inf, b_inf, c_inf = a_max & (fa == 0), b_max & (fb == 0), c_max & (fc == 0)
        p_inf = a_inf | b_inf
        sp = a[31] ^ b[31]
        nan = a_nan | b_nan | c_nan | (a_inf & b_zero) | (b_inf & a_zero) | \
            (p_inf & c_inf & (sp != c[31]))
        eaf = Mux(ea == 0, 1, ea)      # subnormals: exponent 1, no hidden bit
        ebf = Mux(eb == 0, 1, eb)
        ecf = Mux(ec == 0, 1, ec)
        # where the addend's lowest bit falls in a product-anchored window: its weight is
        # 2**(ec-150), the window's lowest bit weighs 2**(ea+eb-300-_PLSB)
        eaf_s, ebf_s, ecf_s = Signal(signed(11)), Signal(signed(11)), Signal(signed(11))
        m.d.comb += [eaf_s.eq(eaf), ebf_s.eq(ebf), ecf_s.eq(ecf)]
        # the offset is pos = ecf - (eaf + ebf) + (300 + _PLSB - 150); stage 2 needs only
        # _CLSB - pos = (eaf + ebf) - (ecf + _ECK), so stage 1 holds the two sums (one carry
        # chain each, side by side) and stage 2 subtracts them once
        eck = Signal(signed(11))
        m.d.comb += eck.eq(ecf_s + _ECK)
        s1_ma = stage("s1_ma", Cat(fa, ea != 0))
        s1_mb = stage("s1_mb", Cat(fb, eb != 0))
        s1_mc = stage("s1_mc", Cat(fc, ec != 0))
        s1_eck = stage("s1_eck", eck)
        s1_eab = stage("s1_eab", eaf_s + ebf_s, signed(11))
        s1_ecf = stage("s1_ecf", ecf_s, signed(11))
        s1_pzero = stage("s1_pzero", a_zero | b_zero)
        s1_cnz = stage("s1_cnz", ~c_zero)
        s1_sp = stage("s1_sp", sp)
        s1_sc = stage("s1_sc", c[31])
        s1_nan = stage("s1_nan", nan)
        s1_inf = stage("s1_inf", p_inf | c_inf)
        s1_isign = stage("s1_isign", Mux(p_inf, sp, c[31]))
        s1_valid = stage("s1_valid", self.i_valid)

        # ---- stage 2: partial products; the addend's shift and the window's anchor ----
        al, ah = s1_ma[:12], s1_ma[12:]
        bl, bh = s1_mb[:12], s1_mb[12:]
        s2_ll = stage("s2_ll", al * bl, 24)
        s2_lh = stage("s2_lh", al * bh, 24)
        s2_hl = stage("s2_hl", ah * bl, 24)
        s2_hh = stage("s2_hh", ah * bh, 24)
        # d = _CLSB - pos: the addend's right shift when 0 <= d <= 127; d < 0 puts it above the
        # window's top (anchored to the addend, or the product is 0: shift 0), d > 127 below
        d = Signal(signed(12))
        m.d.comb += d.eq(s1_eab - s1_eck)
        above = d[-1]
        c_based = s1_cnz & (s1_pzero | above)
        sh = Signal(7)
        with m.If(c_based | above):
            m.d.comb += sh.eq(0)
        with m.Elif(d[7:] != 0):
            m.d.comb += sh.eq(127)
        with m.Else():
            m.d.comb += sh.eq(d[:7])
        # lim = the largest normalising left shift that keeps the biased exponent >= 1: with
        # the window's lowest bit weighing 2**w, a leading one at bit _WIN-1-shift has biased
        # exponent w + _WIN + 126 - shift = lim + 1 - shift. Anchored to the addend
        # w = ec - 150 - _CLSB, to the product w = ea + eb - 300 - _PLSB.
        lim = Signal(signed(11))
        m.d.comb += lim.eq(Mux(c_based, s1_ecf - (150 + _CLSB - _WIN - 125),
                               s1_eab - (300 + _PLSB - _WIN - 125)))
        s2_sh = stage("s2_sh", sh)
        s2_mc = stage("s2_mc", s1_mc)
        s2_lim = stage("s2_lim", lim)
        s2_sp = stage("s2_sp", s1_sp)
        s2_sc = stage("s2_sc", s1_sc)
        s2_nan = stage("s2_nan", s1_nan)
        s2_inf = stage("s2_inf", s1_inf)
        s2_isign = stage("s2_isign", s1_isign)
        s2_valid = stage("s2_valid", s1_valid)

        # ---- stage 3: middle partial sum; align the addend (sticky into bit 0) ----
        Y = Cat(Const(0, _CLSB), s2_mc)                      # 100 bits
        lost = Cat(*[s2_mc[i] & (s2_sh > _CLSB + i) for i in range(24)]).any()
        s3_mid = stage("s3_mid", s2_lh + s2_hl, 25)
        s3_hhll = stage("s3_hhll", Cat(s2_ll, s2_hh), 48)
        s3_Y = stage("s3_Y", (Y >> s2_sh) | lost, _WIN)
        s3_lim = stage("s3_lim", s2_lim)
        s3_sp = stage("s3_sp", s2_sp)
        s3_sc = stage("s3_sc", s2_sc)
        s3_nan = stage("s3_nan", s2_nan)
        s3_inf = stage("s3_inf", s2_inf)
        s3_isign = stage("s3_isign", s2_isign)
        s3_valid = stage("s3_valid", s2_valid)

        # ---- stage 4: the exact product ----
        s4_P = stage("s4_P", s3_hhll + (s3_mid << 12), 48)
        s4_Y = stage("s4_Y", s3_Y)
        s4_lim = stage("s4_lim", s3_lim)
        s4_sp = stage("s4_sp", s3_sp)
        s4_sc = stage("s4_sc", s3_sc)
        s4_nan = stage("s4_nan", s3_nan)
        s4_inf = stage("s4_inf", s3_inf)
        s4_isign = stage("s4_isign", s3_isign)
        s4_valid = stage("s4_valid", s3_valid)

        # ---- stages 5a, 5b: add or subtract (both differences, so no negation follows), the
        # low _SPLIT bits of the window in 5a and the rest with 5a's carries in 5b: a 101-bit
        # carry chain and the selection behind it did not fit in one 10 ns cycle on the board ----
        X = Cat(Const(0, _PLSB), s4_P)                       # 74 bits
        sub = s4_sp ^ s4_sc
        hi_w = _WIN - _SPLIT
        lo_add = Signal(_SPLIT + 1)
        lo_xy = Signal(_SPLIT + 1)                            # bit _SPLIT: the borrow
        lo_yx = Signal(_SPLIT + 1)
        m.d.comb += [lo_add.eq(X[:_SPLIT] + s4_Y[:_SPLIT]),
                     lo_xy.eq(X[:_SPLIT] - s4_Y[:_SPLIT]),
                     lo_yx.eq(s4_Y[:_SPLIT] - X[:_SPLIT])]
        s5a_add = stage("s5a_add", lo_add)
        s5a_xy = stage("s5a_xy", lo_xy)
        s5a_yx = stage("s5a_yx", lo_yx)
        s5a_Xh = stage("s5a_Xh", X[_SPLIT:])
        s5a_Yh = stage("s5a_Yh", s4_Y[_SPLIT:])
        s5a_sp = stage("s5a_sp", s4_sp)
        s5a_sc = stage("s5a_sc", s4_sc)
        s5a_sub = stage("s5a_sub", sub)
        s5a_lim = stage("s5a_lim", s4_lim)
        s5a_nan = stage("s5a_nan", s4_nan)
        s5a_inf = stage("s5a_inf", s4_inf)
        s5a_isign = stage("s5a_isign", s4_isign)
        s5a_valid = stage("s5a_valid", s4_valid)

        def add_carry(a, b, cin):
            # a + b + cin in one carry chain (cin rides in below bit 0: cin + cin carries cin)
            t = Signal(hi_w + 2)
            m.d.comb += t.eq(Cat(cin, a) + Cat(cin, b))
            return t[1:]                                   # hi_w bits and the carry out

        xh = Cat(s5a_Xh, Const(0, hi_w - len(s5a_Xh)))
        yh = s5a_Yh
        hi_add = add_carry(xh, yh, s5a_add[_SPLIT])
        # a - b - borrow = a + ~b + (1 - borrow); its carry out is 1 unless the result is negative
        hi_xy = add_carry(xh, ~yh, ~s5a_xy[_SPLIT])
        hi_yx = add_carry(yh, ~xh, ~s5a_yx[_SPLIT])
        neg = ~hi_xy[hi_w]                                    # X < Y
        d_xy = Cat(s5a_xy[:_SPLIT], hi_xy[:hi_w])
        d_yx = Cat(s5a_yx[:_SPLIT], hi_yx[:hi_w])
        d_add = Cat(s5a_add[:_SPLIT], hi_add[:hi_w])
        s5_S = stage("s5_S", Mux(s5a_sub, Mux(neg, d_yx, d_xy), d_add), _WIN)
        s5_sign = stage("s5_sign", Mux(s5a_sub & neg, s5a_sc, s5a_sp))
        s5_sub = stage("s5_sub", s5a_sub)
        s5_lim = stage("s5_lim", s5a_lim)
        s5_nan = stage("s5_nan", s5a_nan)
        s5_inf = stage("s5_inf", s5a_inf)
        s5_isign = stage("s5_isign", s5a_isign)
        s5_valid = stage("s5_valid", s5a_valid)

        # ---- stage 6a: leading zeros of each _LZ_CHUNK-bit chunk (MSB chunk first) ----
        padded = Cat(Const(0, _LZ_CHUNKS * _LZ_CHUNK - _WIN), s5_S)   # zeros below bit 0
        chunks = [padded[(_LZ_CHUNKS - 1 - k) * _LZ_CHUNK:(_LZ_CHUNKS - k) * _LZ_CHUNK]
                  for k in range(_LZ_CHUNKS)]
        s6a_lz = [stage(f"s6a_lz{k}", _lzc(m, ch)) for k, ch in enumerate(chunks)]
        s6a_nz = [stage(f"s6a_nz{k}", ch != 0) for k, ch in enumerate(chunks)]
        s6a_lim = stage("s6a_lim", s5_lim)
        s6a_S = stage("s6a_S", s5_S)
        s6a_sign = stage("s6a_sign", s5_sign)
        s6a_sub = stage("s6a_sub", s5_sub)
        s6a_nan = stage("s6a_nan", s5_nan)
        s6a_inf = stage("s6a_inf", s5_inf)
        s6a_isign = stage("s6a_isign", s5_isign)
        s6a_valid = stage("s6a_valid", s5_valid)

        # ---- stage 6b: leading zeros of the window and the shift limit ----
        lz = Signal(range(_LZ_CHUNKS * _LZ_CHUNK + 1))
        m.d.comb += lz.eq(_LZ_CHUNKS * _LZ_CHUNK)
        for k in reversed(range(_LZ_CHUNKS)):   # the first non-zero chunk wins
            with m.If(s6a_nz[k]):
                m.d.comb += lz.eq(k * _LZ_CHUNK + s6a_lz[k])
        lz_win = lz   # the padding is below the window's bit 0: it counts only when S == 0
        lim_neg = s6a_lim < 0
        s6_sh = stage("s6_sh", Mux(~lim_neg & (s6a_lim < lz_win), s6a_lim[:7], lz_win), 7)
        s6_lim = stage("s6_lim", s6a_lim)
        s6_tiny = stage("s6_tiny", lim_neg)     # < 2**-152 with a zero addend: rounds to 0
        s6_zero = stage("s6_zero", ~Cat(*s6a_nz).any())
        s6_S = stage("s6_S", s6a_S)
        s6_sign = stage("s6_sign", s6a_sign)
        s6_sub = stage("s6_sub", s6a_sub)
        s6_nan = stage("s6_nan", s6a_nan)
        s6_inf = stage("s6_inf", s6a_inf)
        s6_isign = stage("s6_isign", s6a_isign)
        s6_valid = stage("s6_valid", s6a_valid)

        # ---- stage 7: normalise, coarse part (multiples of 2**_FINE) ----
        s7_S = stage("s7_S", (s6_S << Cat(Const(0, _FINE), s6_sh[_FINE:]))[:_WIN], _WIN)
        s7_fine = stage("s7_fine", s6_sh[:_FINE])
        s7_em1 = stage("s7_em1", s6_lim - s6_sh, signed(11))   # biased exponent - 1
        s7_tiny = stage("s7_tiny", s6_tiny)
        s7_zero = stage("s7_zero", s6_zero)
        s7_sign = stage("s7_sign", s6_sign)
        s7_sub = stage("s7_sub", s6_sub)
        s7_nan = stage("s7_nan", s6_nan)
        s7_inf = stage("s7_inf", s6_inf)
        s7_isign = stage("s7_isign", s6_isign)
        s7_valid = stage("s7_valid", s6_valid)

        # ---- stage 8a: the fine part of the shift on the kept bits and the guard, and the
        # rounding decision (guard, sticky, last kept bit). Bits below _ROUND - 2**_FINE end
        # below the guard whatever the fine shift; of the 2**_FINE - 1 above them, bit j does
        # when j + fine < _ROUND - 1. ----
        span = (1 << _FINE) - 1
        top = s7_S[_ROUND - 1 - span:]                      # 24 kept + guard + span bits
        kept = Signal(len(top))
        m.d.comb += kept.eq(top << s7_fine)
        g = kept[span]
        base = _ROUND - 1 - span
        st_lo = s7_S[:base] != 0
        st_mid = Cat(*[s7_S[base + k] & (s7_fine < span - k) for k in range(span)]).any()
        mant = kept[span + 1:span + 25]
        s8_mant = stage("s8_mant", mant)
        s8_up = stage("s8_up", g & (st_lo | st_mid | mant[0]))
        s8_em1 = stage("s8_em1", s7_em1.as_unsigned()[:8])     # >= 0 unless tiny
        s8_big = stage("s8_big", s7_em1 >= 0xFF)                # overflows whatever the rounding
        s8_tiny = stage("s8_tiny", s7_tiny)
        s8_zero = stage("s8_zero", s7_zero)
        s8_sign = stage("s8_sign", s7_sign)
        s8_sub = stage("s8_sub", s7_sub)
        s8_nan = stage("s8_nan", s7_nan)
        s8_inf = stage("s8_inf", s7_inf)
        s8_isign = stage("s8_isign", s7_isign)
        s8_valid = stage("s8_valid", s7_valid)

        # ---- stage 8b: pack (the rounding carry ripples into the exponent), specials ----
        packed = Signal(32)
        m.d.comb += packed.eq((s8_em1 << 23) + s8_mant + s8_up)
        overflow = s8_big | packed[31] | (packed[23:31] == 0xFF)
        with m.If(s8_nan):
            m.d.sync += self.o_res.eq(CANONICAL_NAN)
        with m.Elif(s8_inf):
            m.d.sync += self.o_res.eq(Cat(Const(0x7F80_0000, 31), s8_isign))
        with m.Elif(s8_zero):
            m.d.sync += self.o_res.eq(Cat(Const(0, 31), s8_sign & ~s8_sub))
        with m.Elif(s8_tiny):
            m.d.sync += self.o_res.eq(Cat(Const(0, 31), s8_sign))
        with m.Elif(overflow):
            m.d.sync += self.o_res.eq(Cat(Const(0x7F80_0000, 31), s8_sign))
        with m.Else():
            m.d.sync += self.o_res.eq(Cat(packed[:31], s8_sign))
        m.d.sync += self.o_valid.eq(s8_valid)
        return m
