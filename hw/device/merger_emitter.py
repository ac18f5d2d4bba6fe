"""Merger bag emitter: sends a finished bag's sums (or its zeros) as output ops.

``BagEmitter(geometry)`` takes a bag over from the issue stage (``i_bag``, one cycle after the
handover: it registers the bag's facts every cycle, so the late handover decision loads no
clock enable) and sends one output op per accumulator word on ``o_op`` (``emit_op_layout``),
reading the word at ``o_read_addr`` (the data reach the read stages' stage R two cycles later),
as the output credits (``i_ok``) allow. ``o_busy`` is high from the handover until the bag's last
op: the issue stage starts no bag-ending row and no GATHER output meanwhile, so the emitter and
the issue stage never send an output op in the same cycle, and output stays in order.

Why a separate emitter: it reads the other accumulator bank than the one the next bag sums into,
so a bag's emission overlaps the next bag's rows. It waits out the bag's last row in the adders:
``i_cooldown`` (the issue stage's cooldown, the cycle after the handover) + 2, because stage R2
puts each sum one cycle after the issue-to-write distance the cooldown covers (accumulate reads
forward it, the emitter waits), stage Q one more, and the emitter's read does not see a write in
its own cycle. A bag without good rows sends zeros at once.
"""
from amaranth import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .merger_layouts import FMA_HAZARD_CYCLES, MergerGeometry, bag_layout, emit_op_layout

__all__ = ["BagEmitter"]


class BagEmitter(wiring.Component):
    """A finished bag -> its accumulator words as output ops (see the module docstring)."""

    def __init__(self, geometry: MergerGeometry):
        self._g = geometry
        super().__init__({
            "i_bag": In(stream.Signature(bag_layout(geometry), always_ready=True)),
            "i_cooldown": In(range(FMA_HAZARD_CYCLES)),
            "i_ok": In(1),
            "o_op": Out(stream.Signature(emit_op_layout(geometry), always_ready=True)),
            "o_read_addr": Out(geometry.acc_jbits + 1),
            "o_busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        K, max_ops = g.K, g.max_ops
        em_busy = Signal()               # still has ops of a finished bag to send
        handed = Signal()                # a bag was handed over last cycle (loads now)
        em_bank = Signal()
        em_j = Signal(range(max_ops + 1))
        em_n = Signal(range(max_ops + 1))
        em_last_cnt = Signal(range(K + 1))
        em_zero = Signal()
        em_cmd_last = Signal()
        em_err = Signal()
        em_wait = Signal(range(FMA_HAZARD_CYCLES + 2))
        em_last = em_j == em_n - 1
        em_fire = em_busy & (em_zero | (em_wait == 0)) & self.i_ok
        h = Signal(bag_layout(g))        # the bag's facts, one cycle on
        m.d.sync += [handed.eq(self.i_bag.valid), h.eq(self.i_bag.payload)]
        with m.If(handed):
            m.d.sync += [
                # a row-wise bag's sums start at word 1 (op 0 is the header op)
                em_busy.eq(1), em_bank.eq(h.bank), em_j.eq(h.hdr), em_n.eq(h.n),
                em_last_cnt.eq(h.last_cnt), em_zero.eq(h.zero),
                em_cmd_last.eq(h.cmd_last), em_err.eq(h.err),
                em_wait.eq(self.i_cooldown + 2),
            ]
        with m.Else():
            with m.If(em_wait != 0):
                m.d.sync += em_wait.eq(em_wait - 1)
            with m.If(em_fire):
                m.d.sync += em_j.eq(em_j + 1)
                with m.If(em_last):
                    m.d.sync += em_busy.eq(0)
        op = self.o_op.payload
        m.d.comb += [
            self.o_busy.eq(em_busy | handed),
            self.o_read_addr.eq(g.acc_addr(em_j, em_bank)),
            self.o_op.valid.eq(em_fire),
            op.zero.eq(em_zero),
            op.count.eq(Mux(em_last, em_last_cnt, K)),
            op.last.eq(em_cmd_last & em_last),
            op.err.eq(em_err & em_last),
        ]
        return m
