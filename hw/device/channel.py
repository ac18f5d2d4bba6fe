"""EV-FC: the flash channel controller, one per channel, over a DDR-emulated NAND channel.

Interface (for the integrator)
------------------------------
``FlashChannelController(params: Params, tag_width: int, *, checks: bool = True)``:

- ``m_axi: Out(AXI4Signature(addr_width=channel_addr_width(params), data_width=params.ch_data_bits,
  id_width=1))`` -- this channel's DDR bank; byte address = ``page * page_size + offset``.
  ``channel_addr_width = log2(pages_per_channel * page_size)`` (at least 12). IDs are always 0;
  INCR bursts of full bus width, never crossing 4 KiB and at most 256 beats.
- ``t_r: In(24)``, ``t_prog: In(24)`` (cycles), ``block_mode: In(1)`` (change only while the
  channel is idle), ``clear_counters: In(1)`` (one-cycle pulse: zero every counter).
- ``i_read: In(stream.Signature(read_request_layout(tag_width)))``:
  ``{page: 32, offset: 16, length: 16, tag: tag_width}``. ``offset`` and ``length`` are
  multiples of 4, ``4 <= length``, ``offset + length <= page_size`` (READ_PAGES: offset 0,
  length page_size). ``page`` must be < pages_per_channel (the translator's BAD_LBA check makes
  sure); higher bits are ignored.
- ``o_row: Out(stream.Signature(row_beat_layout(params, tag_width)))``:
  ``{data: ch_data_bits, last: 1, err: 1, tag: tag_width}`` -- the row's bytes realigned to byte
  lane 0, ``ceil(length / beat_bytes)`` beats, bytes past ``length`` in the last beat are zero,
  ``last`` on the final beat, ``tag`` echoed on every beat. ``err`` is sticky within a request:
  set from the first beat whose AXI read returned SLVERR/DECERR on, so the ``last`` beat always
  carries it.
  **Rows come out in this channel's request order** (data phases are serialised in order; the
  tR waits of up to ``ways`` different pages overlap).
- ``i_prog: In(stream.Signature(prog_request_layout()))``: ``{page: 32}``, then
  ``i_prog_data: In(stream.Signature(prog_data_layout(params)))``: ``{data: ch_data_bits}``,
  exactly ``page_size / beat_bytes`` beats per program, then
  ``o_prog_done: Out(stream.Signature(prog_done_layout()))``: ``{err: 1}`` (an AXI write
  returned an error) after every B response and ``t_prog`` cycles. A pending program stops new
  reads from being accepted (``i_read.ready`` is low while ``i_prog.valid``), waits until every
  accepted read has finished, then runs alone;
  it invalidates any page register holding its page.
- Counters ``Out(32)`` each (wrap): ``cnt_rows`` (rows delivered, counted on the ``last`` beat),
  ``cnt_bytes`` (bytes moved over the channel bus: ``beat_bytes`` per R and per W beat),
  ``cnt_tr_waits`` (reads that paid tR), ``cnt_busy`` (cycles with a read accepted and not
  finished, or a program in progress), ``cnt_programs`` (programs completed).

NAND model: ``ways`` page registers, LRU replacement (:class:`WayModel` is the executable
definition). A read whose page is in a register (loaded or still loading) skips tR; otherwise it
takes the least recently used register, waiting until no accepted read still needs that
register, and its data can move ``t_r`` cycles later. Since data phases are in request order, the
LRU register is always the first to fall free, so which reads pay tR does not depend on timing.

Structure (each stage its own component with its own test, joined by streams):

- :class:`~.read_intake.ReadIntake`: request stage, page-register lookup (hit, or claim of the
  LRU register with no reference left), the FIFO of accepted reads (``pend_depth`` =
  ``max(4, 2 * ways)``);
- :class:`~.page_registers.PageRegisters`: the page registers' pages, tR timers, references and
  LRU order;
- :class:`~.burst_issuer.BurstIssuer`: AR bursts (two-stage fine-grained read: only the beats
  covering ``[offset, offset + length)`` cross the channel bus; with ``block_mode = 1`` each read
  moves the whole page, the block-interface baseline) and the FIFO of up to ``rq_depth`` = 8
  reads whose AR went ahead of their R data;
- :class:`~.row_realigner.RowRealigner`: R beats realigned to byte lane 0 (``o_row`` carries only
  the row, in either mode);
- :class:`~.channel_programmer.ChannelProgrammer`: the program path (AW/W/B, tPROG);
- here: the AXI port shared by the three bus users, the count of reads in flight and the counters.

Throughput and latency (64-bit bus, memory latency 4, no stalls; tests/hw/test_channel.py): R
streams back to back across requests (64 reads of 64-byte rows: 512 beats in 517 cycles; 8-byte
rows: 64 beats in 69). Two cycles from ``i_read`` to the intake's head, two from accept to AR,
two from AR to the R side knowing the request (hidden behind the memory latency), one from R to
``o_row``; a row whose first byte is not in lane 0 and whose beats on the bus equal its beats on
``o_row`` costs one extra cycle at its end. Every decision starts at most two LUT levels from
registers (why each register is where it is: docs/synthesis.md, "Component timing history").
``checks`` (on by default) adds simulation assertions that every registered copy of a decision
stays equal to what it stands for (the synthesis flow removes assertions:
``synth.YOSYS_AFTER_READ``).
"""
from __future__ import annotations

from amaranth import Module, Signal, Mux
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4Signature
from ..regmap import Params
from .burst_issuer import BurstIssuer
from .channel_plan import ChannelGeometry, channel_addr_width
from .channel_programmer import (ChannelProgrammer, prog_data_layout, prog_done_layout,
                                 prog_request_layout)
from .page_registers import PageRegisters
from .read_intake import ReadIntake, read_request_layout
from .row_realigner import RowRealigner, row_beat_layout

__all__ = [
    "FlashChannelController", "read_request_layout", "row_beat_layout", "prog_request_layout",
    "prog_data_layout", "prog_done_layout", "channel_addr_width", "WayModel",
]


class WayModel:
    """Page registers with LRU replacement: which reads pay tR (timing independent)."""

    def __init__(self, ways: int):
        self.pages = [None] * ways
        self.order = list(range(ways))  # least recently used first

    def read(self, page: int) -> bool:
        """Account one read; True when it pays tR."""
        if page in self.pages:
            w = self.pages.index(page)
            miss = False
        else:
            w = self.order[0]
            self.pages[w] = page
            miss = True
        self.order.remove(w)
        self.order.append(w)
        return miss

    def program(self, page: int):
        for w, p in enumerate(self.pages):
            if p == page:
                self.pages[w] = None


class FlashChannelController(wiring.Component):
    """EV-FC: NAND timing emulation and fine-grained reads over one AXI4 channel."""

    def __init__(self, params: Params, tag_width: int, *, checks: bool = True):
        self.geometry = ChannelGeometry(params, tag_width)   # validates both
        self.params = params
        # simulation assertions that the registered copies of decisions stay in step (the
        # synthesis flow removes them with chformal, so they cost no logic)
        self.checks = checks
        self.tag_width = tag_width
        self.beat_bytes = params.ch_data_bits // 8
        super().__init__({
            "m_axi": Out(AXI4Signature(addr_width=channel_addr_width(params),
                                       data_width=params.ch_data_bits, id_width=1)),
            "t_r": In(24), "t_prog": In(24), "block_mode": In(1), "clear_counters": In(1),
            "i_read": In(stream.Signature(read_request_layout(tag_width))),
            "o_row": Out(stream.Signature(row_beat_layout(params, tag_width))),
            "i_prog": In(stream.Signature(prog_request_layout())),
            "i_prog_data": In(stream.Signature(prog_data_layout(params))),
            "o_prog_done": Out(stream.Signature(prog_done_layout())),
            "cnt_rows": Out(32), "cnt_bytes": Out(32), "cnt_tr_waits": Out(32),
            "cnt_busy": Out(32), "cnt_programs": Out(32),
        })
        # the stages (made here so that checks can name their joins: hw/formal.py)
        g = self.geometry
        self.ways = PageRegisters(g, checks=checks)
        self.intake = ReadIntake(g, checks=checks)
        self.issuer = BurstIssuer(g, checks=checks)
        self.realigner = RowRealigner(g, checks=checks)
        self.programmer = ChannelProgrammer(g, checks=checks)

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        B = self.beat_bytes
        axi = self.m_axi
        m.submodules.ways = ways = self.ways
        m.submodules.intake = intake = self.intake
        m.submodules.issuer = issuer = self.issuer
        m.submodules.realigner = realigner = self.realigner
        m.submodules.programmer = prog = self.programmer

        # the AXI port: AR from the issuer, R to the realigner, AW/W/B from the programmer
        for name in axi.signature.members:
            if name.startswith("ar"):
                src = issuer.m_axi
            elif name.startswith(("aw", "w", "b")):
                src = prog.m_axi
            else:
                continue
            if axi.signature.members[name].flow == Out:
                m.d.comb += getattr(axi, name).eq(getattr(src, name))
            else:
                m.d.comb += getattr(src, name).eq(getattr(axi, name))
        r = realigner.i_r
        m.d.comb += [r.valid.eq(axi.rvalid), r.payload.data.eq(axi.rdata),
                     r.payload.resp.eq(axi.rresp), axi.rready.eq(r.ready)]

        # reads: intake -> issuer -> realigner, the page registers beside them
        wiring.connect(m, wiring.flipped(self.i_read), intake.i_read)
        wiring.connect(m, intake.o_pend, issuer.i_pend)
        wiring.connect(m, issuer.o_req, realigner.i_req)
        wiring.connect(m, realigner.o_row, wiring.flipped(self.o_row))
        m.d.comb += [
            intake.block_mode.eq(self.block_mode), issuer.block_mode.eq(self.block_mode),
            intake.hold.eq(self.i_prog.valid), intake.run.eq(prog.idle),
            intake.way_valid.eq(ways.valid), intake.way_page.eq(ways.page),
            intake.way_lru.eq(ways.lru), intake.way_ref_zero.eq(ways.ref_zero),
            issuer.way_ready.eq(ways.ready), issuer.way_loading.eq(ways.loading),
            ways.t_r.eq(self.t_r),
            ways.claim.eq(intake.claim), ways.claim_page.eq(intake.claim_page),
            ways.touch.eq(intake.use_vec & intake.accept.replicate(g.ways)),
            ways.done.eq(realigner.done), ways.done_way.eq(realigner.done_way),
            ways.invalidate.eq(prog.invalidate), ways.invalidate_page.eq(prog.invalidate_page),
        ]
        accept, done = intake.accept, realigner.done
        n_reads = Signal(g.ref_width)     # reads accepted and not yet finished
        with m.If(accept & ~done):
            m.d.sync += n_reads.eq(n_reads + 1)
        with m.Elif(done & ~accept):
            m.d.sync += n_reads.eq(n_reads - 1)

        # programs
        wiring.connect(m, wiring.flipped(self.i_prog), prog.i_prog)
        wiring.connect(m, wiring.flipped(self.i_prog_data), prog.i_prog_data)
        wiring.connect(m, prog.o_prog_done, wiring.flipped(self.o_prog_done))
        m.d.comb += [prog.t_prog.eq(self.t_prog),
                     prog.reads_idle.eq((n_reads == 0) & ~intake.busy)]

        # ------------------------------------------------------------------ counters
        # The counters count events registered one cycle earlier: the handshakes (which cross
        # the chip to the memories on a board) then end at flip-flops, not at 32-bit adders.
        o = self.o_row
        w_hs = axi.wvalid & axi.wready
        busy = (n_reads != 0) | intake.busy | ~prog.idle   # a staged read is outstanding
        ev_row, ev_r, ev_w, ev_tr, ev_busy, ev_prog = (Signal(name=f"ev_{k}") for k in
                                                       ("row", "r", "w", "tr", "busy", "prog"))
        m.d.sync += [
            ev_row.eq(o.valid & o.ready & o.payload.last), ev_r.eq(realigner.r_beat),
            ev_w.eq(w_hs), ev_tr.eq(intake.claim.any()), ev_busy.eq(busy),
            ev_prog.eq(self.o_prog_done.valid & self.o_prog_done.ready),
        ]
        with m.If(self.clear_counters):
            m.d.sync += [self.cnt_rows.eq(0), self.cnt_bytes.eq(0), self.cnt_tr_waits.eq(0),
                         self.cnt_busy.eq(0), self.cnt_programs.eq(0)]
        with m.Else():
            m.d.sync += [
                self.cnt_rows.eq(self.cnt_rows + ev_row),
                self.cnt_bytes.eq(self.cnt_bytes + Mux(ev_r, B, 0) + Mux(ev_w, B, 0)),
                self.cnt_tr_waits.eq(self.cnt_tr_waits + ev_tr),
                self.cnt_busy.eq(self.cnt_busy + ev_busy),
                self.cnt_programs.eq(self.cnt_programs + ev_prog),
            ]
        return m
