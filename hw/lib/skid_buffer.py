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
"""
from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """``i`` -> ``o`` with one cycle of latency, full throughput, no combinational path."""

    def __init__(self, payload_shape):
        super().__init__({
            "i": In(stream.Signature(payload_shape)),
            "o": Out(stream.Signature(payload_shape)),
        })

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
        m.d.sync += [
            # full next cycle: full and nothing popped, or one held, one pushed, nothing popped
            ready.eq(~((~ready & ~o.ready) | (one & i.valid & ~o.ready))),
            # empty next cycle: empty and nothing pushed, or one held, popped, nothing pushed
            valid.eq(~((~valid & ~i.valid) | (one & o.ready & ~i.valid))),
            wp.eq(wp ^ push),
            rp.eq(rp ^ pop),
        ]
        return m
