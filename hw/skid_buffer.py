"""SkidBuffer: a two-entry register slice for a ``lib.stream`` that cuts every combinational path.

Placed between two components whose handshakes are combinational through each other (e.g. a
flash channel whose ``o_row.valid`` comes from its R channel and the merger's round-robin
``i_row.ready``), nothing on one side reaches the other in the same cycle: ``i.ready``,
``o.valid`` and ``o.payload`` come from registers. The two entries are written only from ``i``
(clock enables, no data mux in front of them) and read through a 2:1 mux by a read pointer, so a
slow source (e.g. block RAM read data) can feed it directly. One beat per cycle when ``o`` is
always ready, one cycle of latency.
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
        full = Signal(2)
        wp = Signal()
        rp = Signal()
        m.d.comb += [
            i.ready.eq(~full.bit_select(wp, 1)),
            o.valid.eq(full.bit_select(rp, 1)),
        ]
        with m.If(rp):
            m.d.comb += o.payload.eq(ent[1])
        with m.Else():
            m.d.comb += o.payload.eq(ent[0])
        push = i.valid & i.ready
        pop = o.valid & o.ready
        with m.If(push):
            m.d.sync += wp.eq(~wp)
            with m.If(wp):
                m.d.sync += ent[1].eq(i.payload)
            with m.Else():
                m.d.sync += ent[0].eq(i.payload)
        with m.If(pop):
            m.d.sync += rp.eq(~rp)
        # a push and a pop in the same cycle touch different entries (one is empty, one full)
        for k in range(2):
            with m.If(push & (wp == k)):
                m.d.sync += full[k].eq(1)
            with m.Elif(pop & (rp == k)):
                m.d.sync += full[k].eq(0)
        return m
