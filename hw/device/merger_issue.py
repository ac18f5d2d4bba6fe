"""Merger issue stage: walks the lookups in request order and sends one op per cycle.

``IssueStage(geometry)`` takes the head row (``i_row``, ``merger_layouts.entry_layout``, with
``i_done`` / ``i_err``: its row has arrived / had an error) and sends, one per cycle on ``o_op``
(``issue_op_layout``): a ROB beat read (GATHER), zeros (a bad or err GATHER row), an accumulate
(a pooled row's elements into accumulator word ``j``) or, for an INT8_ROWWISE row, first a header
op that reads the row's scale and bias. With the op it drives the block RAM read addresses
(``o_rob_addr``, ``o_acc_addr``). A row retires with its last op (or at once when it has no ops:
a bad pooled row, an err row, an empty-bag token): ``i_row.ready``, and ``o_free`` one cycle later
(registered: the engine's credit logic never sees ``o_data.ready`` combinationally). At a bag's
end it hands the bag to the emitter on ``o_bag`` (the bag's facts are valid every cycle; the
emitter registers them).

The rules it keeps, so that nothing behind it ever stalls:

- a pooled row starts at least ``ACCUM_HAZARD_CYCLES`` (``FMA_HAZARD_CYCLES`` on the FMA path)
  after the previous row of its bag started (``o_cooldown``: the emitter waits as long after the
  bag's last row), so no op reads an accumulator word whose sum is still in the adders;
- an adder-path row starts only when no FMA-path op was issued in the last
  ``FMA_PATH_LATENCY - Fp32Adder.LATENCY`` cycles (the two paths share the accumulator's write
  port; rows of a bag share a path, and an FMA row after an adder row writes later than all of
  it);
- a bag-ending row starts only when the emitter is free to take the bag over at its last op
  (``i_emit_busy`` low), and GATHER output never overtakes a bag the emitter is still sending;
  a started pooled row then never stalls, which the cooldown arithmetic relies on;
- output ops need a credit (``i_out_ok``, a register of the output queue); accumulate ops
  need none.

Why registers everywhere: the facts about the op at ``j`` (first op, last op, first row of the
bag, cooldown over) are kept in registers equal to what they stand for (checked by simulation
``Assert`` s); computed from comparators in the cycle of use they made the retire decision,
which fans out widely, too late.
"""
from amaranth import Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.fpu import Fp32Adder
from .merger_layouts import (ACCUM_HAZARD_CYCLES, FMA_HAZARD_CYCLES, FMA_PATH_LATENCY,
                             MergerGeometry, bag_layout, entry_layout, issue_op_layout)

__all__ = ["IssueStage"]

# op kinds
_OP_READ, _OP_ZERO, _OP_ACCUM = 0, 1, 2


class IssueStage(wiring.Component):
    """Descriptors -> one op per cycle, in request order (see the module docstring)."""

    def __init__(self, geometry: MergerGeometry):
        self._g = geometry
        super().__init__({
            "i_row": In(stream.Signature(entry_layout(geometry))),
            "i_done": In(1),
            "i_err": In(1),
            "i_emit_busy": In(1),
            "i_out_ok": In(1),
            "o_op": Out(stream.Signature(issue_op_layout(geometry), always_ready=True)),
            "o_bag": Out(stream.Signature(bag_layout(geometry), always_ready=True)),
            "o_cooldown": Out(range(FMA_HAZARD_CYCLES)),
            "o_free": Out(stream.Signature(unsigned(geometry.tb), always_ready=True)),
            "o_rob_addr": Out(geometry.tb + geometry.beat_bits),
            "o_acc_addr": Out(geometry.acc_jbits + 1),
            # for the accumulator's hazard check only: the read at o_acc_addr is one whose
            # data an accumulate op uses (not the bag's first row, not a header op)
            "o_acc_used": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        K, max_ops, beat_bits, hoff = g.K, g.max_ops, g.beat_bits, g.hoff
        L = Fp32Adder.LATENCY
        LF = FMA_PATH_LATENCY
        ops_shape = range(max_ops + 1)
        j = Signal(ops_shape)
        first_op = Signal(init=1)
        later_last = Signal()            # j == n_ops - 1 after the first op
        bag_first = Signal(init=1)       # no good row in the current bag yet
        row_first = Signal()
        acc_bank = Signal()              # accumulator bank of the bag being summed
        cooldown = self.o_cooldown
        cooldown_next = Signal(range(FMA_HAZARD_CYCLES))
        sticky_err = Signal()
        em_blocked = self.i_emit_busy    # the emitter has (or is taking) a bag
        out_ok = self.i_out_ok

        have = self.i_row.valid
        cur_x = self.i_row.payload
        cur = cur_x.desc
        n_ops, last_cnt, sub_shift = cur_x.n_ops, cur_x.last_cnt, cur_x.sub_shift
        slot_done = self.i_done
        slot_err = self.i_err
        last_op = Mux(first_op, cur_x.one_op, later_last)
        c_gather, c_accum, c_bad = cur_x.gather, cur_x.accum, cur.bad
        c_bad_or_empty, c_pooled_or_empty = cur_x.bad_or_empty, cur_x.pooled_or_empty
        cd_ok = Signal(init=1)           # == (cooldown == 0) | bag_first
        row_ok = c_bad_or_empty | slot_done
        row_has_ops = c_gather | (c_accum & ~slot_err)
        goes_emit = cur_x.goes_emit

        # the op this cycle's head would send
        op_valid = Signal()
        op_kind = Signal(2)
        with m.If(have & c_gather):
            m.d.comb += [op_valid.eq((~first_op | c_bad | slot_done) & ~em_blocked),
                         op_kind.eq(Mux(c_bad | slot_err, _OP_ZERO, _OP_READ))]
        plain_ok = Signal(init=1)        # == (fma_recent == 0)
        with m.Elif(have & c_accum & ~slot_err):
            m.d.comb += [op_valid.eq(~first_op | (slot_done & cd_ok & (~goes_emit | ~em_blocked) &
                                                  (cur_x.fma | plain_ok))),
                         op_kind.eq(_OP_ACCUM)]
        op_cmd_last = cur.cmd_end & last_op & ~cur.pooled
        noop_step = (have & c_pooled_or_empty & ~(c_accum & ~slot_err) & row_ok &
                     (~goes_emit | ~em_blocked))

        fire = op_valid & (cur.pooled | out_ok)
        row_err_now = Signal()           # a row with err retires now
        m.d.comb += row_err_now.eq(have & ~cur.bad & ~cur.empty_bag & slot_err &
                                   Mux(row_has_ops, fire & first_op, noop_step))
        free_now = have & ~cur.empty_bag & Mux(row_has_ops, fire & last_op, noop_step)
        m.d.sync += [self.o_free.valid.eq(free_now), self.o_free.payload.eq(cur.slot)]
        finish = Signal()
        m.d.comb += finish.eq((fire & last_op) | noop_step)
        handover = finish & goes_emit
        m.d.comb += self.i_row.ready.eq(finish)      # (finish implies have)

        # a row ends with its last op (j back to 0, first_op set) or takes no op at all, so a
        # new head always starts at j == 0 with first_op set
        # jr == j + hoff: a row-wise row's ROB op index, a register (no adder on the RAM address)
        jr = Signal(range(max_ops + hoff + 1), init=hoff)
        with m.If(fire):
            m.d.sync += [j.eq(Mux(last_op, 0, j + 1)), first_op.eq(last_op),
                         later_last.eq(j + 2 == n_ops), jr.eq(Mux(last_op, hoff, jr + 1))]
        m.d.sync += Assert(jr == j + hoff, "merger: jr out of step")
        m.d.sync += Assert(~have | (last_op == (j == n_ops - 1)) | (n_ops == 0),
                           "merger: last_op out of step")

        is_accum = op_kind == _OP_ACCUM
        accum_start = fire & is_accum & first_op
        with m.If(accum_start):
            m.d.comb += cooldown_next.eq(Mux(cur_x.fma, FMA_HAZARD_CYCLES - 1,
                                             ACCUM_HAZARD_CYCLES - 1))
        with m.Elif(cooldown != 0):
            m.d.comb += cooldown_next.eq(cooldown - 1)
        m.d.sync += cooldown.eq(cooldown_next)
        with m.If(accum_start):
            m.d.sync += [bag_first.eq(0), row_first.eq(bag_first)]
        # cd_ok next: the cooldown restarts at ACCUM_HAZARD_CYCLES - 1 (> 0) on accum_start;
        # a handover starts a new bag (bag_first)
        m.d.sync += cd_ok.eq(handover | (~accum_start & ((cooldown <= 1) | bag_first)))
        m.d.sync += Assert(cd_ok == ((cooldown == 0) | bag_first), "merger: cd_ok out of step")
        with m.If(handover):
            m.d.sync += [bag_first.eq(1), acc_bank.eq(~acc_bank)]
        # the accumulator's one write port: see the module docstring
        fma_recent = Signal(range(LF - L + 1))
        fma_fire = fire & is_accum & cur_x.fma
        with m.If(fma_fire):
            m.d.sync += fma_recent.eq(LF - L)
        with m.Elif(fma_recent != 0):
            m.d.sync += fma_recent.eq(fma_recent - 1)
        m.d.sync += plain_ok.eq(~fma_fire & (fma_recent <= 1))
        m.d.sync += Assert(plain_ok == (fma_recent == 0), "merger: plain_ok out of step")
        with m.If((fire & op_cmd_last) | (handover & cur.cmd_end)):
            m.d.sync += sticky_err.eq(0)
        with m.Elif(row_err_now):
            m.d.sync += sticky_err.eq(1)

        # memory reads for the op: the data reach stage R two cycles later
        rob_beat = Signal(max(beat_bits, 1))
        rj = Mux(cur_x.hdr, jr, j)       # the op's index into the ROB row
        m.d.comb += rob_beat.eq(rj >> sub_shift)
        m.d.comb += [
            self.o_rob_addr.eq(g.rob_addr(rob_beat, cur.slot)),
            self.o_acc_addr.eq(g.acc_addr(j, acc_bank)),
        ]
        hdr_op = cur_x.hdr & first_op
        m.d.comb += self.o_acc_used.eq(fire & is_accum & ~hdr_op &
                                       ~Mux(first_op, bag_first, row_first))

        # the op, to the read stages
        op = self.o_op.payload
        m.d.comb += [
            self.o_op.valid.eq(fire),
            op.accum.eq(cur.pooled & ~hdr_op), op.out.eq(~cur.pooled), op.hdr.eq(hdr_op),
            op.first.eq(Mux(first_op, bag_first, row_first)),
            op.addr.eq(g.acc_addr(j, acc_bank)),
            op.sub.eq(rj & ((1 << sub_shift) - 1)),
            op.elem.eq(cur.elem),
            op.fma.eq(cur_x.fma), op.rowwise.eq(cur_x.hdr),
            op.weighted.eq(cur.weighted), op.weight.eq(cur.weight),
            op.zero.eq(op_kind == _OP_ZERO),
            op.count.eq(Mux(last_op, last_cnt, K)),
            op.last.eq(op_cmd_last),
            op.err.eq(sticky_err | row_err_now),
        ]

        # the bag, to the emitter (which takes it over one cycle after the handover)
        bag = self.o_bag.payload
        m.d.comb += [
            self.o_bag.valid.eq(handover),
            bag.hdr.eq(cur_x.hdr), bag.bank.eq(acc_bank), bag.n.eq(n_ops),
            bag.last_cnt.eq(last_cnt), bag.zero.eq(bag_first & ~accum_start),
            bag.cmd_last.eq(cur.cmd_end), bag.err.eq(sticky_err | row_err_now),
        ]
        return m
