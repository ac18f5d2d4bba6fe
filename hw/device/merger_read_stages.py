"""Merger read stages Q and R: the ops' facts alongside the block RAMs' two read cycles.

``ReadStages(geometry)`` merges the issue stage's op (``i_issue``) and the emitter's output op
(``i_emit``; never both an output op in one cycle, a simulation ``Assert`` checks it) into stage
Q's registers (``o_q``, ``stage_op_layout``) while the block RAMs' array registers load, and
passes them to stage R's registers (``o_r``) with the RAMs' output registers, where the read
data are. ``o_out_fire`` is high in the cycle an output op enters (it takes an output credit).

Why no handshake: every stage from here on is credit-limited or hazard-free, so nothing stalls
and nothing behind the issue stage reaches its decision in the same cycle (a stall here would
make the issue decision wait on the packer's ready and fan out to every register of stage R and
to the RAM read enables). The facts of an emitter op come from the emitter, the rest (and the
accumulate facts, which an output op ignores) from the issue stage's op.
"""
from amaranth import Module, Mux
from amaranth.hdl import Assert
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .merger_layouts import MergerGeometry, emit_op_layout, issue_op_layout, stage_op_layout

__all__ = ["ReadStages"]


class ReadStages(wiring.Component):
    """Issue and emitter ops -> stage Q -> stage R, one cycle each (see the module docstring)."""

    def __init__(self, geometry: MergerGeometry):
        super().__init__({
            "i_issue": In(stream.Signature(issue_op_layout(geometry), always_ready=True)),
            "i_emit": In(stream.Signature(emit_op_layout(geometry), always_ready=True)),
            "o_out_fire": Out(1),
            "o_q": Out(stage_op_layout(geometry)),
            "o_r": Out(stage_op_layout(geometry)),
        })

    def elaborate(self, platform):
        m = Module()
        iss, em = self.i_issue, self.i_emit
        q, r = self.o_q, self.o_r
        m.d.comb += self.o_out_fire.eq((iss.valid & iss.payload.out) | em.valid)
        m.d.sync += Assert(~(iss.valid & iss.payload.out & em.valid),
                           "merger: two output ops in one cycle")
        op = iss.payload
        m.d.sync += [
            q.accum.eq(iss.valid & op.accum), q.out.eq(self.o_out_fire), q.is_sum.eq(em.valid),
            q.hdr.eq(iss.valid & op.hdr),
            q.first.eq(op.first), q.addr.eq(op.addr), q.sub.eq(op.sub), q.elem.eq(op.elem),
            q.fma.eq(op.fma), q.rowwise.eq(op.rowwise), q.weighted.eq(op.weighted),
            q.weight.eq(op.weight),
        ]
        for name in ("zero", "count", "last", "err"):
            m.d.sync += q[name].eq(Mux(em.valid, em.payload[name], op[name]))
        m.d.sync += r.eq(q)
        return m
