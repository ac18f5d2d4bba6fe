"""RowRealigner: a flash channel's R beats to row beats, realigned to byte lane 0.

The second stage of the two-stage fine-grained read. For each read, in order, ``i_req``
(``ChannelGeometry.req_layout``, from :class:`~.burst_issuer.BurstIssuer`) says which of the
beats crossing the bus are relevant (``skip`` .. ``skip_end``; the others, in block mode, are
dropped), by how many 32-bit words to shift them (``shift``) and how long the row is; ``i_r`` are
the AXI R beats (``{data, resp}``). ``o_row`` (:func:`row_beat_layout`) carries
``ceil(length / beat_bytes)`` beats with bytes past the row zeroed, ``last`` on the final beat,
the tag on every beat and ``err`` sticky within the read (any R beat with SLVERR/DECERR). A row
whose first byte is not in lane 0 and whose beats on the bus equal its beats out needs one
extra beat at its end (the flush beat, from the previous bus beat alone).

``done`` / ``done_way``: a read has finished (its page register may be released); ``r_beat``:
an R beat was taken (for the byte counter).

R beats first enter a register slice next to the bus, and descriptors a slice with look-ahead:
the R handshake, the pop and the next beat's flags are decided from registers (``f``, the flags
of the current beat, computed when the beat before was taken or brought along with the
descriptor), and the word shift has a register of its own. One cycle of latency from the R
slice to ``o_row``.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Mux
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.skid_buffer import SkidBuffer
from ..regmap import Params
from .channel_plan import ChannelGeometry, flags_at

__all__ = ["RowRealigner", "row_beat_layout", "r_beat_layout"]


def row_beat_layout(params: Params, tag_width: int) -> data.StructLayout:
    """A beat of a row out of a channel: ``data`` (lane 0 aligned), ``last``, ``err``, ``tag``."""
    return data.StructLayout({"data": params.ch_data_bits, "last": 1, "err": 1, "tag": tag_width})


def r_beat_layout(params: Params) -> data.StructLayout:
    """An AXI R beat as the realigner takes it: ``data`` and ``resp``."""
    return data.StructLayout({"data": params.ch_data_bits, "resp": 2})


class RowRealigner(wiring.Component):
    """R beats + read descriptors in request order -> lane-0 aligned row beats."""

    def __init__(self, geometry: ChannelGeometry, *, checks: bool = True):
        self.geometry = g = geometry
        self.checks = checks
        super().__init__({
            "i_req": In(stream.Signature(g.req_layout)),
            "i_r": In(stream.Signature(r_beat_layout(g.params))),
            "o_row": Out(stream.Signature(row_beat_layout(g.params, g.tag_width))),
            "done": Out(1), "done_way": Out(g.way_bits), "r_beat": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        B, W, cw = g.beat_bytes, g.words, g.count_width
        rq_layout, flag_layout = g.rq_layout, g.flag_layout

        def check(cond, msg):
            if self.checks:
                m.d.sync += Assert(cond, msg)

        m.submodules.r_in = r_in = SkidBuffer(r_beat_layout(g.params))
        wiring.connect(m, wiring.flipped(self.i_r), r_in.i)
        m.submodules.rq_head = hd = SkidBuffer(g.req_layout, lookahead=True)
        wiring.connect(m, wiring.flipped(self.i_req), hd.i)
        hv = hd.o.valid                    # the R side has a request (a register)
        ent = hd.o.payload.rq
        other_first = hd.o_other.first
        new_first = self.i_req.payload.first
        rnext = Signal(cw, init=1)        # the beat after the head's current one (from 0)
        prev = Signal(8 * B)
        err_r = Signal()
        flush = Signal()                   # the final beat comes from `prev` alone
        # `f`: the tests on the beat count for the head request's current beat, computed when
        # the beat before was taken, or, for a request's first beat, the flags it brought along,
        # loaded when it becomes the head.
        f = Signal(flag_layout)
        relevant = f.relevant
        # the word shift drives every data mux: its own register, not the slice's payload mux
        shift = hd.head_register(m, lambda e: e.rq.shift, "r_shift", check=self.checks)
        s0 = shift == 0
        emit = f.emit
        last_emit = f.last_emit
        need_flush = f.need_flush

        hi = Signal(8 * B)
        m.d.comb += hi.eq(Mux(flush, 0, r_in.o.payload.data))
        shifted = Signal(8 * B)
        if W > 1:
            m.d.comb += shifted.eq(Cat(prev, hi) >> (shift * 32))
        else:
            m.d.comb += shifted.eq(prev)
        row_data = Signal(8 * B)
        m.d.comb += row_data.eq(Mux(flush | ~s0, shifted, r_in.o.payload.data))
        out_last = Signal()
        m.d.comb += out_last.eq(flush | last_emit)
        masked = Signal(8 * B)
        for k in range(W):
            keep = ~out_last | (ent.lmod == 0) | (k < ent.lmod)
            m.d.comb += masked.word_select(k, 32).eq(Mux(keep, row_data.word_select(k, 32), 0))
        row_err = r_in.o.payload.resp[1]             # SLVERR and DECERR both have bit 1 set

        o = self.o_row
        m.d.comb += [o.payload.data.eq(masked), o.payload.last.eq(out_last),
                     o.payload.tag.eq(ent.tag)]
        # `rd_ok` = hv & ~flush as a register of its own: `flush` also selects every data mux
        rd_ok = Signal()
        m.d.comb += [
            o.valid.eq(flush | (rd_ok & r_in.o.valid & emit)),
            o.payload.err.eq(err_r | (~flush & row_err)),
            r_in.o.ready.eq(rd_ok & (~emit | o.ready)),
        ]
        r_hs = Signal(attrs={"keep": 1})
        m.d.comb += [r_hs.eq(r_in.o.valid & r_in.o.ready), self.r_beat.eq(r_hs)]
        done = self.done                   # the head request has finished
        # what follows a beat taken on R is chosen from registers (`f.ends`) ahead of the
        # handshake, which then only selects: the next beat's flags, or the next request's first
        nfirst = Signal(flag_layout, attrs={"keep": 1})  # the next head's first-beat flags:
        m.d.comb += nfirst.eq(             # the slice's other entry, or the one entering it
            Mux(hd.o_other_valid, other_first, new_first))
        # (`keep`: the handshake stays the last select, not merged into the compares)
        f_adv = Signal(flag_layout, attrs={"keep": 1})
        m.d.comb += f_adv.eq(Mux(f.ends, nfirst, flags_at(rnext, ent)))
        flush_end = Signal()               # the flush beat is taken and finishes the request
        m.d.comb += flush_end.eq(flush & o.ready & f.at_total)
        with m.If(r_hs):
            m.d.sync += [rnext.eq(Mux(f.ends, 1, rnext + 1)),
                         err_r.eq(~f.ends & (err_r | row_err)), f.eq(f_adv)]
            with m.If(relevant):
                m.d.sync += prev.eq(r_in.o.payload.data)
            with m.If(need_flush):
                m.d.sync += flush.eq(1)
        with m.Elif(flush_end | ~hv):
            m.d.sync += [rnext.eq(1), err_r.eq(0), f.eq(nfirst)]
        with m.If(flush & o.ready):
            m.d.sync += flush.eq(0)
        m.d.sync += rd_ok.eq(hd.o_valid_next & ~((r_hs & need_flush) | (flush & ~o.ready)))
        check(rd_ok == (hv & ~flush), "channel: rd_ok out of step")
        m.d.comb += [done.eq((r_hs & f.ends) | flush_end), self.done_way.eq(ent.way)]
        m.d.comb += hd.o.ready.eq(done)
        check(~hv | (f.as_value() == flags_at((rnext - 1)[:cw], ent)),
              "channel: R-side flags out of step")
        return m
