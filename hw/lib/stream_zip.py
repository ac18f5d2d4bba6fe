"""StreamZip: two streams taken in lockstep, one item of each per output item (or the first alone).

``i_a`` and ``i_b`` -> ``o`` ``{a, b}``. With ``pair`` high an output item needs an item on both
inputs and taking it takes both; with ``pair`` low ``i_a`` passes alone (``b`` is then
zero and ``i_b`` is not taken). Used by the command engine to take each index word of a
GATHER_POOLED_WEIGHTED command together with its weight word. Combinational (no register):
``o.valid`` depends on the inputs' valids only, each input's ready on ``o.ready`` and the other
input's valid, as ``lib.stream`` allows. ``pair`` may change only while ``o`` holds no item
that was offered and not taken (the engine changes it between commands).
"""
from amaranth import Module, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["StreamZip"]


class StreamZip(wiring.Component):
    """``o = {a: i_a, b: i_b}``, both taken together while ``pair``, ``i_a`` alone otherwise."""

    def __init__(self, a_shape, b_shape):
        super().__init__({
            "pair": In(1),
            "i_a": In(stream.Signature(a_shape)),
            "i_b": In(stream.Signature(b_shape)),
            "o": Out(stream.Signature(data.StructLayout({"a": a_shape, "b": b_shape}))),
        })

    def elaborate(self, platform):
        m = Module()
        a, b, o, pair = self.i_a, self.i_b, self.o, self.pair
        m.d.comb += [
            o.valid.eq(a.valid & (~pair | b.valid)),
            o.payload.a.eq(a.payload),
            o.payload.b.eq(Mux(pair, b.payload, 0)),
            a.ready.eq(o.ready & (~pair | b.valid)),
            b.ready.eq(o.ready & pair & a.valid),
        ]
        return m
