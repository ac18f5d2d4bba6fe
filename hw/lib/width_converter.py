"""WidthConverter: a ``{data, err}`` stream from one power-of-two width to another."""
from amaranth import Module, Signal, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["WidthConverter"]


class WidthConverter(wiring.Component):
    """Stream of ``{data, err}`` from ``in_bits`` to ``out_bits`` (power-of-two ratio); the
    first input beat's data comes out first (little-endian lanes)."""

    def __init__(self, in_bits: int, out_bits: int):
        self.in_bits, self.out_bits = in_bits, out_bits
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({"data": in_bits, "err": 1}))),
            "o": Out(stream.Signature(data.StructLayout({"data": out_bits, "err": 1}))),
        })

    def elaborate(self, platform):
        m = Module()
        wi, wo = self.in_bits, self.out_bits
        if wi == wo:
            wiring.connect(m, wiring.flipped(self.i), wiring.flipped(self.o))
        elif wi > wo:
            r = wi // wo
            k = Signal(range(r))
            m.d.comb += [
                self.o.valid.eq(self.i.valid),
                self.o.payload.data.eq(self.i.payload.data.word_select(k, wo)),
                self.o.payload.err.eq(self.i.payload.err),
                self.i.ready.eq(self.o.ready & (k == r - 1)),
            ]
            with m.If(self.o.valid & self.o.ready):
                m.d.sync += k.eq(Mux(k == r - 1, 0, k + 1))
        else:
            r = wo // wi
            k = Signal(range(r))
            buf = Signal(wo)
            err = Signal()
            full = Signal()
            m.d.comb += [
                self.o.valid.eq(full), self.o.payload.data.eq(buf), self.o.payload.err.eq(err),
                self.i.ready.eq(~full),
            ]
            with m.If(self.o.valid & self.o.ready):
                m.d.sync += [full.eq(0), err.eq(0)]
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += [buf.word_select(k, wi).eq(self.i.payload.data),
                             err.eq(err | self.i.payload.err),
                             k.eq(Mux(k == r - 1, 0, k + 1))]
                with m.If(k == r - 1):
                    m.d.sync += full.eq(1)
        return m
