"""RegisterStage: a one-entry stream register whose output valid and payload are flip-flops.

For a consumer whose ``ready`` is itself a register (a :class:`~.skid_buffer.SkidBuffer`'s
``i.ready``, for one): ``i.ready`` = ``~o.valid | o.ready`` is then one LUT of registers, and
the logic after the stage starts from the payload's flip-flops, not from a read pointer's mux
(which a :class:`~.skid_buffer.SkidBuffer` puts on its output). One beat per cycle while ``o``
is ready, one cycle of latency. Unlike a SkidBuffer it does not cut the ready path: put it only
where ``o.ready`` arrives early in the cycle.
"""
from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["RegisterStage"]


class RegisterStage(wiring.Component):
    """``i`` -> ``o`` through one register: registered ``o.valid``/``o.payload``,
    combinational ``i.ready`` (see the module docstring)."""

    def __init__(self, payload_shape):
        super().__init__({
            "i": In(stream.Signature(payload_shape)),
            "o": Out(stream.Signature(payload_shape)),
        })

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        payload = Signal.like(i.payload, name="payload")
        valid = Signal()
        m.d.comb += [i.ready.eq(~valid | o.ready), o.valid.eq(valid), o.payload.eq(payload)]
        with m.If(i.ready):
            m.d.sync += [valid.eq(i.valid), payload.eq(i.payload)]
        return m
