"""BurstIssuer: a flash channel's planned reads onto the AXI4 read-address channel, and each one's
descriptor to the R side in order.

A planned read (``i_pend``, ``ChannelGeometry.pend_layout``) passes a register stage that plans
its first burst (start, length, whether it is the last) and the R side's flags for its first beat,
so the AR handshake and the stage's pop decide from registers. A read is split into INCR bursts
at aligned ``chunk_beats`` boundaries (never crossing 4 KiB nor exceeding 256 beats); with
``block_mode`` it moves its whole page. AR waits for the read's page register to be ready
(``way_ready``: tR over). At a read's first AR its descriptor (``req_layout``: the R side's
``rq`` and first-beat flags) enters a FIFO of ``rq_depth`` read by ``o_req``, so the R side
learns of a read at its first burst and its data is never held up by later bursts. Only the AR
members of ``m_axi`` are driven (the rest stay 0); IDs are 0.
"""
from __future__ import annotations

from amaranth import Array, Module, Signal, Cat, Const, Mux
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4Signature, Burst
from ..lib.skid_buffer import SkidBuffer
from .channel_plan import ChannelGeometry, flags_at

__all__ = ["BurstIssuer"]


class BurstIssuer(wiring.Component):
    """AR bursts for planned reads; their R-side descriptors in request order."""

    def __init__(self, geometry: ChannelGeometry, *, checks: bool = True):
        self.geometry = g = geometry
        self.checks = checks
        super().__init__({
            "block_mode": In(1), "way_ready": In(g.ways),
            # page registers whose tR timer loads this cycle (for a simulation check only)
            "way_loading": In(g.ways),
            "i_pend": In(stream.Signature(g.pend_layout)),
            "m_axi": Out(AXI4Signature(addr_width=g.addr_width, data_width=8 * g.beat_bytes,
                                       id_width=1)),
            "o_req": Out(stream.Signature(g.req_layout)),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        cw, chunk_beats, page_beats = g.count_width, g.chunk_beats, g.page_beats
        axi = self.m_axi

        m.submodules.rq = rq = SyncFIFOBuffered(width=g.req_layout.size, depth=g.rq_depth)
        m.d.comb += [self.o_req.valid.eq(rq.r_rdy), self.o_req.payload.eq(rq.r_data),
                     rq.r_en.eq(self.o_req.ready)]

        def burst(cur, rem):
            """(length, is the request's last burst) of the burst starting at beat ``cur``
            with ``rem`` beats to go: up to the next chunk boundary."""
            to_bound = Signal(cw)
            m.d.comb += to_bound.eq(chunk_beats - (cur & (chunk_beats - 1)))
            return Mux(rem < to_bound, rem, to_bound), rem <= to_bound

        ar_layout = data.StructLayout({"page": g.page_bits, "cur": cw, "rem": cw, "blen": cw,
                                       "last": 1, "rq": g.rq_layout, "first": g.flag_layout})
        m.submodules.ar_stage = ar_stage = SkidBuffer(ar_layout, lookahead=True)
        pend_head = self.i_pend.payload
        plan = ar_stage.i.payload
        cur0 = Mux(self.block_mode, 0, pend_head.start_b)
        rem0 = Mux(self.block_mode, page_beats, pend_head.nb_fine)
        if chunk_beats == page_beats:
            # a read never leaves its page (offset + length <= page_size), so a chunk as large as
            # a page means one burst per request: no arithmetic in front of the stage
            blen0, last0 = rem0, Const(1)
        else:
            blen0, last0 = burst(cur0, rem0)
        m.d.comb += [
            plan.page.eq(pend_head.page), plan.cur.eq(cur0), plan.rem.eq(rem0),
            plan.blen.eq(blen0), plan.last.eq(last0), plan.rq.eq(pend_head.rq),
            plan.first.eq(flags_at(Const(0, cw), pend_head.rq)),
            ar_stage.i.valid.eq(self.i_pend.valid), self.i_pend.ready.eq(ar_stage.i.ready),
        ]
        head = ar_stage.o.payload
        ar_cont = Signal()                 # a request's later bursts are being issued
        cur_r = Signal(cw)
        rem_r = Signal(cw)
        blen_r = Signal(cw)
        last_r = Signal()
        cur = Mux(ar_cont, cur_r, head.cur)
        rem = Mux(ar_cont, rem_r, head.rem)
        blen = Mux(ar_cont, blen_r, head.blen)
        # arvalid decides from registers: the head's way in a register of its own (not through
        # the stage's payload mux)
        head_way = ar_stage.head_register(m, lambda e: e.rq.way, "ar_head_way",
                                          check=self.checks)
        last = Const(1) if chunk_beats == page_beats else Mux(ar_cont, last_r, head.last)
        head_ready = Array(self.way_ready)[head_way]
        if self.checks:
            m.d.sync += Assert(~(ar_stage.o.valid & Array(self.way_loading)[head.rq.way]),
                               "channel: a read reached AR before its way's tR timer was loaded")
        m.d.comb += [
            axi.arvalid.eq(ar_stage.o.valid & head_ready & (ar_cont | rq.w_rdy)),
            axi.araddr.eq(Cat(Const(0, g.log_beat), cur[:g.log_page_beats], head.page)),
            axi.arlen.eq(blen - 1),
            axi.arsize.eq(g.log_beat),
            axi.arburst.eq(Burst.INCR),
            axi.arid.eq(0),
            axi.arprot.eq(0),
        ]
        ar_hs = axi.arvalid & axi.arready
        m.d.comb += [
            rq.w_data.eq(Cat(head.rq.as_value(), head.first.as_value())),
            rq.w_en.eq(ar_hs & ~ar_cont),
        ]
        with m.If(ar_hs):
            with m.If(last):
                m.d.comb += ar_stage.o.ready.eq(1)
                m.d.sync += ar_cont.eq(0)
            with m.Else():
                # a later burst starts at a chunk boundary: up to a whole chunk
                next_cur, next_rem = cur + blen, rem - blen
                next_blen = Mux(next_rem < chunk_beats, next_rem, chunk_beats)
                next_last = next_rem <= chunk_beats
                m.d.sync += [ar_cont.eq(1), cur_r.eq(next_cur), rem_r.eq(next_rem),
                             blen_r.eq(next_blen), last_r.eq(next_last)]
        return m
