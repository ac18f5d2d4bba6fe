"""Linear FTL (LBA -> channel, channel page) and the per-channel request demultiplexer.

Interface (for the integrator)
------------------------------
``LinearFTL(params: Params, tag_width: int)``:

- ``i_req: In(stream.Signature(request_layout(tag_width)))``:
  ``{lba: 32, offset: 16, row_bytes: 16, tag: tag_width}``.
- ``o_req: Out(stream.Signature(response_layout(tag_width)))``:
  ``{channel: 3, page: 32, offset: 16, row_bytes: 16, tag: tag_width}`` with
  ``channel = lba % n_channels``, ``page = lba // n_channels`` (exact for every 32-bit lba).
  One register stage: one request per cycle, latency 1, in order.

``ChannelDemux(params: Params, tag_width: int)`` (no register, no state):

- ``i_req: In(stream.Signature(ftl.response_layout(tag_width)))`` -- connect ``LinearFTL.o_req``.
- ``o_read: Out(stream.Signature(channel.read_request_layout(tag_width))).array(n_channels)``:
  ``{page: 32, offset: 16, length: 16, tag}`` -- connect ``o_read[c]`` to
  ``FlashChannelController[c].i_read``; ``length = row_bytes``. A request for channel c waits
  only for channel c (head-of-line: a busy channel holds back the requests behind it).
"""
from __future__ import annotations

from amaranth import Const, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .channel import read_request_layout
from ..regmap import Params, div_magic, require_tag_width

__all__ = ["LinearFTL", "ChannelDemux", "request_layout", "response_layout", "ftl_model", "lba_split"]


def request_layout(tag_width: int) -> data.StructLayout:
    return data.StructLayout({"lba": 32, "offset": 16, "row_bytes": 16, "tag": tag_width})


def response_layout(tag_width: int) -> data.StructLayout:
    return data.StructLayout({"channel": 3, "page": 32, "offset": 16, "row_bytes": 16,
                              "tag": tag_width})


def ftl_model(params: Params, lba: int) -> tuple[int, int]:
    """(channel, page) of an LBA: the golden model of :func:`lba_split`."""
    return lba % params.n_channels, lba // params.n_channels


def lba_split(m, lba, n_channels: int, *, name: str = "lba"):
    """``(channel, page)`` of a 32-bit ``lba`` as Amaranth expressions: ``channel = lba %
    n_channels``, ``page = lba // n_channels``, exact for every 32-bit lba. The one definition
    of the LBA -> flash mapping in the gateware (the FTL's read path and the engine's PROGRAM
    path both use it; :func:`ftl_model` is its golden model).

    A power of two is a bit slice. 3, 5, 6, 7 multiply by the build-time reciprocal
    (:func:`~evssd.hw.regmap.div_magic`) instead of a divider or a 2**32-entry table; yosys maps
    the constant multiply to 5 MULT18X18D on ECP5 (138 cells in all for n = 3). The remainder is
    ``lba - page * n``, of which only the low 3 bits are needed."""
    n = n_channels
    if n & (n - 1) == 0:
        k = n.bit_length() - 1
        return (lba[:k] if k else Const(0, 1)), lba >> k
    dm = div_magic(n)
    page = Signal(32, name=f"{name}_page")
    m.d.comb += page.eq((lba * dm.magic) >> dm.shift)
    return (lba[:3] - (page * n)[:3])[:3], page


def _check(params, tag_width):
    Params.require(params)
    require_tag_width(tag_width)


class LinearFTL(wiring.Component):
    """channel = lba % n_channels, page = lba // n_channels; one request per cycle."""

    def __init__(self, params: Params, tag_width: int):
        _check(params, tag_width)
        self.params = params
        self.tag_width = tag_width
        super().__init__({
            "i_req": In(stream.Signature(request_layout(tag_width))),
            "o_req": Out(stream.Signature(response_layout(tag_width))),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.params.n_channels
        lba = self.i_req.payload.lba
        page = Signal(32)
        channel = Signal(3)
        ch, pg = lba_split(m, lba, n)
        m.d.comb += [page.eq(pg), channel.eq(ch)]
        # One output register; it refills in the cycle it drains, so one request per cycle.
        with m.If(~self.o_req.valid | self.o_req.ready):
            m.d.sync += [
                self.o_req.valid.eq(self.i_req.valid),
                self.o_req.payload.channel.eq(channel),
                self.o_req.payload.page.eq(page),
                self.o_req.payload.offset.eq(self.i_req.payload.offset),
                self.o_req.payload.row_bytes.eq(self.i_req.payload.row_bytes),
                self.o_req.payload.tag.eq(self.i_req.payload.tag),
            ]
        m.d.comb += self.i_req.ready.eq(~self.o_req.valid | self.o_req.ready)
        return m


class ChannelDemux(wiring.Component):
    """Steers each FTL output to its channel's read port (combinational)."""

    def __init__(self, params: Params, tag_width: int):
        _check(params, tag_width)
        self.params = params
        self.tag_width = tag_width
        super().__init__({
            "i_req": In(stream.Signature(response_layout(tag_width))),
            "o_read": Out(stream.Signature(read_request_layout(tag_width))).array(params.n_channels),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.i_req.payload
        for c, o in enumerate(self.o_read):
            m.d.comb += [
                o.valid.eq(self.i_req.valid & (p.channel == c)),
                o.payload.page.eq(p.page),
                o.payload.offset.eq(p.offset),
                o.payload.length.eq(p.row_bytes),
                o.payload.tag.eq(p.tag),
            ]
            with m.If(p.channel == c):
                m.d.comb += self.i_req.ready.eq(o.ready)
        return m
