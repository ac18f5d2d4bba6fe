"""Merger output queue: the output ops, with their read data, waiting for the packer.

``OutputQueue(geometry, depth)`` takes each output op in stage R (``i_r`` with ``out`` set; its
block RAM read data on ``i_rob_data`` and ``i_acc_data``) into a FIFO of ``depth`` ops and sends
them, in order, on ``o_words`` (``merger_packer.words_layout``): zeros, the ROB beat (a GATHER
op) or the accumulator word (``is_sum``: an emitter op), ``count`` words of it.

Why credits instead of a ready: stage R never stalls, so the FIFO must always have room for the
ops already on their way. ``o_ok`` (a register) allows an output op to fire in the next cycle
when, with one more fired now (``i_fire``: an output op enters stage Q), there is still room
for it; the ops between firing and the FIFO count as pending. The block RAM read data go
straight into the queue: the zeroing and the choice between the two RAMs come after it. Stage O
registers the op before the FIFO's LUT RAM: a plain register the placer can put by the block
RAMs, so their clock-to-out and the wire to the LUT RAM are not in one cycle.
"""
from amaranth import Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .merger_layouts import MergerGeometry, stage_op_layout
from .merger_packer import words_layout

__all__ = ["OutputQueue"]


class OutputQueue(wiring.Component):
    """Output ops in stage R -> FIFO of ``depth`` -> ``o_words`` (see the module docstring)."""

    def __init__(self, geometry: MergerGeometry, depth: int):
        self._g = geometry
        self.depth = depth
        super().__init__({
            "i_fire": In(1),
            "i_r": In(stage_op_layout(geometry)),
            "i_rob_data": In(geometry.Wc),
            "i_acc_data": In(geometry.Wc),
            "o_ok": Out(1, init=1),
            "o_words": Out(stream.Signature(words_layout(geometry.K))),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        Wc, K = g.Wc, g.K
        r = self.i_r
        ob_layout = data.StructLayout({"rob_data": unsigned(Wc), "acc_data": unsigned(Wc),
                                       "is_sum": unsigned(1), "zero": unsigned(1),
                                       "count": range(K + 1), "last": unsigned(1),
                                       "err": unsigned(1)})
        m.submodules.out_fifo = ofifo = SyncFIFOBuffered(width=ob_layout.size, depth=self.depth)
        ob_in = Signal(ob_layout)
        m.d.comb += [
            ob_in.rob_data.eq(self.i_rob_data), ob_in.acc_data.eq(self.i_acc_data),
            ob_in.is_sum.eq(r.is_sum), ob_in.zero.eq(r.zero), ob_in.count.eq(r.count),
            ob_in.last.eq(r.last), ob_in.err.eq(r.err),
        ]
        # stage O
        ob_o = Signal(ob_layout, reset_less=True)
        ob_o_valid = Signal()
        m.d.sync += [ob_o.eq(ob_in), ob_o_valid.eq(r.out)]
        m.d.comb += [ofifo.w_data.eq(ob_o), ofifo.w_en.eq(ob_o_valid)]
        m.d.sync += Assert(~ob_o_valid | ofifo.w_rdy, "merger output FIFO overflow")
        # credits: output ops fired and not yet taken from the FIFO
        out_pending = Signal(range(self.depth + 1))
        out_pop = ofifo.r_rdy & ofifo.r_en
        m.d.sync += [
            out_pending.eq(out_pending + self.i_fire - out_pop),
            self.o_ok.eq(out_pending <= self.depth - 2),
        ]
        ob_out = ob_layout(ofifo.r_data)
        w = self.o_words
        m.d.comb += [
            w.valid.eq(ofifo.r_rdy),
            w.payload.data.eq(Mux(ob_out.zero, 0, Mux(ob_out.is_sum, ob_out.acc_data, ob_out.rob_data))),
            w.payload.count.eq(ob_out.count),
            w.payload.last.eq(ob_out.last),
            w.payload.err.eq(ob_out.err),
            ofifo.r_en.eq(w.ready),
        ]
        return m
