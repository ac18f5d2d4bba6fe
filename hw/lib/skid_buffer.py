"""SkidBuffer: a two-entry register slice for a ``lib.stream`` that cuts every combinational path.

Placed between two components whose handshakes are combinational through each other (e.g. a
flash channel whose ``o_row.valid`` comes from its R channel and the merger's round-robin
``i_row.ready``), nothing on one side reaches the other in the same cycle: ``i.ready`` and
``o.valid`` are flip-flops of their own and ``o.payload`` comes from registers through a 2:1
mux by a read pointer. Each next handshake value is one LUT of the other side's late
``i.valid`` / ``o.ready`` and the buffer's registers. An entry loads ``i.payload`` whenever it is
the free entry the write pointer names, valid or not, so its clock enable is a gate of two
registers and never waits for the source's ``valid`` (which fanned out to every payload bit);
``o.payload`` is therefore meaningful only while ``o.valid`` is high, as a stream requires. The
entries are written only from ``i`` (no data mux in front of them), so a slow source (e.g. block
RAM read data) can feed it directly. One beat per cycle when ``o`` is always ready, one cycle of
latency.

With ``lookahead=True`` the buffer also shows what a consumer needs to keep facts about the head
in registers of its own (:meth:`SkidBuffer.head_register`), so that a decision on the head starts
from flip-flops instead of the read pointer's payload mux (a fan-out of the whole payload):
``o_other`` / ``o_other_valid`` (the entry after the head) and ``o_valid_next`` (``o.valid`` of
the next cycle).
"""
from amaranth import Module, Signal, Mux
from amaranth.hdl import Assert
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """``i`` -> ``o`` with one cycle of latency, full throughput, no combinational path."""

    def __init__(self, payload_shape, *, lookahead: bool = False):
        self.lookahead = lookahead
        members = {
            "i": In(stream.Signature(payload_shape)),
            "o": Out(stream.Signature(payload_shape)),
        }
        if lookahead:
            members.update({"o_other": Out(payload_shape), "o_other_valid": Out(1),
                            "o_valid_next": Out(1)})
        super().__init__(members)

    def head_register(self, m, fn, name, *, check: bool = True):
        """A register, driven in the parent module ``m``, equal to ``fn(o.payload)`` whenever
        ``o.valid`` (loaded from the entry after the head or the incoming payload as the head
        moves on). With ``check``, a simulation assertion says so every cycle."""
        if not self.lookahead:
            raise ValueError("head_register needs SkidBuffer(..., lookahead=True)")
        i, o = self.i, self.o
        reg = Signal.like(fn(o.payload), name=name)
        pop = o.valid & o.ready
        m.d.sync += reg.eq(Mux(pop, Mux(self.o_other_valid, fn(self.o_other), fn(i.payload)),
                               Mux(o.valid, reg, fn(i.payload))))
        if check:
            m.d.sync += Assert(~o.valid | (reg == fn(o.payload)), f"{name} out of step")
        return reg

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        ent = [Signal.like(i.payload, name=f"ent{k}") for k in range(2)]
        wp = Signal()
        rp = Signal()
        # The fill level (0, 1 or 2 beats) as two flags: ready = fewer than two (the entry `wp`
        # names is free), valid = at least one.
        ready = Signal(init=1)
        valid = Signal()
        m.d.comb += [i.ready.eq(ready), o.valid.eq(valid)]
        with m.If(rp):
            m.d.comb += o.payload.eq(ent[1])
        with m.Else():
            m.d.comb += o.payload.eq(ent[0])
        for k in range(2):
            with m.If(ready & (wp == k)):
                m.d.sync += ent[k].eq(i.payload)
        push = i.valid & ready
        pop = valid & o.ready
        one = ready & valid                 # exactly one beat held
        # empty next cycle: empty and nothing pushed, or one held, popped, nothing pushed
        valid_next = Signal()
        m.d.comb += valid_next.eq(~((~valid & ~i.valid) | (one & o.ready & ~i.valid)))
        m.d.sync += [
            # full next cycle: full and nothing popped, or one held, one pushed, nothing popped
            ready.eq(~((~ready & ~o.ready) | (one & i.valid & ~o.ready))),
            valid.eq(valid_next),
            wp.eq(wp ^ push),
            rp.eq(rp ^ pop),
        ]
        if self.lookahead:
            m.d.comb += [
                self.o_other.eq(Mux(rp, ent[0], ent[1])),
                self.o_other_valid.eq(~ready),        # two held: the entry after the head is full
                self.o_valid_next.eq(valid_next),
            ]
        return m
