"""ChannelProgrammer: a flash channel's page programs, over the AXI4 write channels.

A program (``i_prog``: ``{page}``) is taken only while no read is in flight (``reads_idle``);
its page's register is invalidated as it starts (``invalidate``/``invalidate_page``, one cycle).
Then the page's ``page_size / beat_bytes`` beats from ``i_prog_data`` go out as INCR bursts of
``chunk_beats`` (never crossing 4 KiB nor exceeding 256 beats); after the last B response the
program waits ``t_prog`` cycles and reports ``o_prog_done`` (``err``: some B response was
SLVERR/DECERR). ``idle`` (a register) is low from the start of a program to its report; reads
are not accepted meanwhile. Only the AW, W and B members of ``m_axi`` are driven (the rest stay
0); IDs are 0.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Const
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4Signature, Burst
from ..regmap import Params
from .channel_plan import ChannelGeometry

__all__ = ["ChannelProgrammer", "prog_request_layout", "prog_data_layout", "prog_done_layout"]


def prog_request_layout() -> data.StructLayout:
    return data.StructLayout({"page": 32})


def prog_data_layout(params: Params) -> data.StructLayout:
    return data.StructLayout({"data": params.ch_data_bits})


def prog_done_layout() -> data.StructLayout:
    return data.StructLayout({"err": 1})


class ChannelProgrammer(wiring.Component):
    """Page program FSM: AW/W bursts of a page, B responses, then tPROG."""

    def __init__(self, geometry: ChannelGeometry, *, checks: bool = True):
        self.geometry = g = geometry
        self.checks = checks
        super().__init__({
            "t_prog": In(24), "reads_idle": In(1),
            "i_prog": In(stream.Signature(prog_request_layout())),
            "i_prog_data": In(stream.Signature(prog_data_layout(g.params))),
            "o_prog_done": Out(stream.Signature(prog_done_layout())),
            "m_axi": Out(AXI4Signature(addr_width=g.addr_width, data_width=8 * g.beat_bytes,
                                       id_width=1)),
            "idle": Out(1, init=1),
            "invalidate": Out(1), "invalidate_page": Out(g.page_bits),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        B, chunk_beats, page_beats = g.beat_bytes, g.chunk_beats, g.page_beats
        cw = g.count_width
        axi = self.m_axi
        PIDLE, PRUN, PWAIT, PDONE = range(4)
        pstate = Signal(2)
        prog_idle = Signal(init=1)         # pstate == PIDLE, as its own register
        m.d.comb += self.idle.eq(prog_idle)
        if self.checks:
            m.d.sync += Assert(prog_idle == (pstate == PIDLE), "channel: prog_idle out of step")

        n_chunks = page_beats // chunk_beats
        ccw = max(1, n_chunks.bit_length())
        p_page = Signal(g.page_bits)
        aw_idx = Signal(ccw)
        w_cnt = Signal(cw)
        b_cnt = Signal(ccw)
        p_err = Signal()
        p_timer = Signal(24)
        m.d.comb += [
            axi.awid.eq(0), axi.awlen.eq(chunk_beats - 1), axi.awsize.eq(g.log_beat),
            axi.awburst.eq(Burst.INCR), axi.awprot.eq(0),
            axi.awaddr.eq(Cat(Const(0, g.log_page), p_page)
                          | (aw_idx << (chunk_beats * B).bit_length() - 1)),
            axi.wdata.eq(self.i_prog_data.payload.data),
            axi.wstrb.eq((1 << B) - 1),
            axi.wlast.eq((w_cnt & (chunk_beats - 1)) == chunk_beats - 1),
            self.o_prog_done.payload.err.eq(p_err),
            self.invalidate_page.eq(self.i_prog.payload.page[:g.page_bits]),
        ]
        with m.Switch(pstate):
            with m.Case(PIDLE):
                m.d.comb += [self.i_prog.ready.eq(self.reads_idle),
                             self.invalidate.eq(self.i_prog.valid & self.i_prog.ready)]
                with m.If(self.i_prog.valid & self.i_prog.ready):
                    m.d.sync += [p_page.eq(self.invalidate_page), aw_idx.eq(0), w_cnt.eq(0),
                                 b_cnt.eq(0), p_err.eq(0), pstate.eq(PRUN), prog_idle.eq(0)]
            with m.Case(PRUN):
                m.d.comb += [
                    axi.awvalid.eq(aw_idx < n_chunks),
                    axi.wvalid.eq(self.i_prog_data.valid & (w_cnt < page_beats)),
                    self.i_prog_data.ready.eq(axi.wready & (w_cnt < page_beats)),
                    axi.bready.eq(1),
                ]
                with m.If(axi.awvalid & axi.awready):
                    m.d.sync += aw_idx.eq(aw_idx + 1)
                with m.If(axi.wvalid & axi.wready):
                    m.d.sync += w_cnt.eq(w_cnt + 1)
                with m.If(axi.bvalid):
                    m.d.sync += [b_cnt.eq(b_cnt + 1), p_err.eq(p_err | axi.bresp[1])]
                    with m.If(b_cnt == n_chunks - 1):
                        m.d.sync += [pstate.eq(PWAIT), p_timer.eq(self.t_prog)]
            with m.Case(PWAIT):
                with m.If(p_timer == 0):
                    m.d.sync += pstate.eq(PDONE)
                with m.Else():
                    m.d.sync += p_timer.eq(p_timer - 1)
            with m.Case(PDONE):
                m.d.comb += self.o_prog_done.valid.eq(1)
                with m.If(self.o_prog_done.ready):
                    m.d.sync += [pstate.eq(PIDLE), prog_idle.eq(1)]
        return m
