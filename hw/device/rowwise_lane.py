"""One lane of row-wise INT8 pooling arithmetic: the step the merger takes per element of a row.

``RowwiseLane``: ``o_acc = fma(i_scale, i_x, i_acc + i_bias)`` with the host definition
(``evssd.host.pooling``, int8_rowwise): ``i_acc + i_bias`` by an :class:`~evssd.hw.fpu.Fp32Adder`
(one rounding), then one :class:`~evssd.hw.lib.fma.Fp32Fma` (one rounding); NaNs come out
canonical. ``i_x`` is the element as fp32 (a uint8 code widened exactly by
an :class:`~evssd.hw.lib.int_to_fp.Int32ToFp32` in the merger). The same step with ``i_scale = w`` and
``i_bias = -0.0`` is a weighted bag's ``fma(w, x, acc)`` (``acc + -0.0 == acc`` for every acc),
so the merger uses one lane kind for weighted and row-wise bags. ``i_scale``/``i_bias`` are fp32: the row's fp16 scale
and bias widened by :class:`~evssd.hw.fpu.Fp16ToFp32`, and for a weighted bag first multiplied
by the lookup's weight (``Fp32Fma(scale, w, -0.0)``: ``scale*w`` rounded to fp32 once, as the
definition says) - outside the lane (the merger forms the two products per op in two
Fp32Fma shared by its lanes).

Fixed latency :attr:`RowwiseLane.LATENCY` (adder + FMA), one element per cycle, free-running:
``i_valid`` travels to ``o_valid``. A bag's elements are sequential through ``i_acc``, so the
merger feeds element j of the next row only once element j of the previous row is out (the
same accumulator hazard rule as its fp32 adder path, with this longer latency).
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..lib.fma import Fp32Fma
from ..lib.fpu import Fp32Adder

__all__ = ["RowwiseLane"]


class RowwiseLane(wiring.Component):
    """``o_acc = fma(i_scale, i_x, i_acc + i_bias)``, :attr:`LATENCY` cycles later."""
    LATENCY = Fp32Adder.LATENCY + Fp32Fma.LATENCY

    i_acc: In(32)
    i_x: In(32)
    i_scale: In(32)
    i_bias: In(32)
    i_valid: In(1)
    o_acc: Out(32)
    o_valid: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.submodules.add = add = Fp32Adder()
        m.submodules.fma = fma = Fp32Fma()
        m.d.comb += [add.i_a.eq(self.i_acc), add.i_b.eq(self.i_bias), add.i_valid.eq(self.i_valid)]
        # scale and the element wait for the adder's sum
        scale, qf = self.i_scale, self.i_x
        for k in range(Fp32Adder.LATENCY):
            s_next, q_next = Signal(32, name=f"scale_d{k}"), Signal(32, name=f"qf_d{k}")
            m.d.sync += [s_next.eq(scale), q_next.eq(qf)]
            scale, qf = s_next, q_next
        m.d.comb += [fma.i_a.eq(scale), fma.i_b.eq(qf), fma.i_c.eq(add.o_sum),
                     fma.i_valid.eq(add.o_valid),
                     self.o_acc.eq(fma.o_res), self.o_valid.eq(fma.o_valid)]
        return m
