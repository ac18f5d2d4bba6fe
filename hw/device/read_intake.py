"""ReadIntake: a flash channel's read requests in, page-register decisions made, planned reads
out in request order.

- ``i_read`` (the channel's :func:`~.channel.read_request_layout`) enters a request stage of two
  entries (a head and a spare). The beat arithmetic the later stages need is computed from
  ``offset`` and ``length`` on entry, and with it which page registers hold the request's page
  (``hit`` bits, corrected when the head claims a register while the spare moves up), so the
  accept decision starts from registers.
- The head is accepted when a program is not running (``run``), the queue of planned reads has
  room and it has a page register: its own page's (a hit) or the least recently used one with no
  reference left (a miss: ``claim`` of that register, which starts its tR wait). Accepted reads
  leave through ``o_pend`` (``ChannelGeometry.pend_layout``), a FIFO of ``pend_depth``.
- ``hold``: a program is waiting; reads not yet taken wait behind it (``i_read.ready`` low).
  ``busy``: the stage holds a read (a program may not start).

The page-register state is :class:`~.page_registers.PageRegisters`'s: ``way_*`` in, ``claim``,
``accept``/``use_way`` (and ``use_vec``, the same way one-hot) out. ``block_mode`` is constant
while reads are in flight.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Mux
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .channel_plan import ChannelGeometry

__all__ = ["ReadIntake", "read_request_layout"]


def read_request_layout(tag_width: int) -> data.StructLayout:
    """A channel read: ``page``, byte ``offset`` and ``length`` within it, ``tag``."""
    return data.StructLayout({"page": 32, "offset": 16, "length": 16, "tag": tag_width})


class ReadIntake(wiring.Component):
    """Request stage and page-register lookup of one channel; accepted reads in a FIFO."""

    def __init__(self, geometry: ChannelGeometry, *, checks: bool = True):
        self.geometry = g = geometry
        self.checks = checks
        ways = g.ways
        super().__init__({
            "block_mode": In(1), "hold": In(1), "run": In(1),
            "i_read": In(stream.Signature(read_request_layout(g.tag_width))),
            "o_pend": Out(stream.Signature(g.pend_layout)),
            "way_valid": In(ways), "way_page": In(data.ArrayLayout(g.page_bits, ways)),
            "way_lru": In(ways), "way_ref_zero": In(ways),
            "claim": Out(ways), "claim_page": Out(g.page_bits),
            "accept": Out(1), "use_way": Out(range(ways)), "use_vec": Out(ways), "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        B, lb, W, ways = g.beat_bytes, g.log_beat, g.words, g.ways
        cw, pend_layout = g.count_width, g.pend_layout

        def check(cond, msg):
            if self.checks:
                m.d.sync += Assert(cond, msg)

        m.submodules.pend = pend = SyncFIFOBuffered(width=pend_layout.size, depth=g.pend_depth)
        m.d.comb += [self.o_pend.valid.eq(pend.r_rdy), self.o_pend.payload.eq(pend.r_data),
                     pend.r_en.eq(self.o_pend.ready)]

        # ------------------------------------------------------------------ request stage
        # What the request's queue entries need from its offset and length is computed into a
        # register stage before the way lookup; the beat landmarks that add to those results are
        # computed from the stage's head (`pend_in`).
        req = self.i_read.payload
        pre = Signal(pend_layout)
        pre_rq = pre.rq
        req_start_b = Signal(cw)
        req_end_b = Signal(cw)
        req_nb = Signal(cw)
        # the beats the row spans, end_b - start_b + 1, with one adder instead of two in a
        # row: ((offset mod B) + length + B - 1) >> lb (also 0 for a 0-byte row at a beat
        # boundary, 1 inside a beat, as the difference)
        m.d.comb += [
            req_start_b.eq(req.offset >> lb),
            req_end_b.eq((req.offset + req.length - 1) >> lb),
            req_nb.eq((req.length + (req.offset[:lb] + (B - 1))) >> lb),
            pre.page.eq(req.page[:g.page_bits]), pre.start_b.eq(req_start_b),
            pre.nb_fine.eq(req_nb),
            pre_rq.tag.eq(req.tag),
            pre_rq.skip.eq(Mux(self.block_mode, req_start_b, 0)),
            pre_rq.n_in.eq(req_nb),
            pre_rq.n_out.eq((req.length + B - 1) >> lb),
            pre_rq.total.eq(Mux(self.block_mode, g.page_beats, req_nb)),
            pre_rq.shift.eq((req.offset >> 2) if W > 1 else 0),
            pre_rq.lmod.eq((req.length >> 2) if W > 1 else 0),
            # n_in == n_out with a word shift s != 0: the row's last partial beat (r bytes)
            # still fits after the shift, r != 0 and 4 s + r <= B (from the low bits alone)
            pre_rq.flushes.eq((pre_rq.shift != 0) & (req.length[:lb] != 0)
                              & ((pre_rq.shift << 2) + req.length[:lb] <= B)),
            # skip_end != total: only in block mode, when the row's last beat is not the page's
            pre_rq.ends_r.eq(~pre_rq.flushes
                             | (self.block_mode & (req_end_b[:g.log_page_beats]
                                                   != g.page_beats - 1))),
        ]
        # The stage holds a head (in fixed registers: no read-pointer mux in front of the
        # decision) and a spare (``i_read.ready`` is ``~spare_valid``, a register), each with
        # which page registers hold its page. Page registers change only on a claim and when a
        # program starts (which needs the stage empty). The entries' data sit in two registers
        # written only on a push and read through 2:1 muxes by a read pointer that flips on
        # accept: the accept decision then drives no wide clock enable.
        st_ent = [Signal(pend_layout, name=f"req_ent{k}") for k in range(2)]
        st_wp = Signal()
        st_rp = Signal()
        staged = Signal(pend_layout, name="req_head")
        spare = Signal(pend_layout, name="req_spare")
        m.d.comb += [staged.eq(Mux(st_rp, st_ent[1], st_ent[0])),
                     spare.eq(Mux(st_rp, st_ent[0], st_ent[1]))]
        hit_vec = Signal(ways, name="req_head_hit")
        spare_hit = Signal(ways, name="req_spare_hit")
        staged_valid = Signal(name="req_head_valid")
        spare_valid = Signal(name="req_spare_valid")
        # a waiting program goes before reads not yet taken (a staged read is taken: it goes
        # first, and the program waits for it)
        m.d.comb += [self.i_read.ready.eq(~spare_valid & ~self.hold),
                     self.busy.eq(staged_valid)]

        # ------------------------------------------------------------------ accept
        # One or two LUT levels from registers: the head's hit bits, the LRU one-hot and the
        # reference-count zero flags. A way is claimed by a flat AND of those.
        lru_vec = self.way_lru
        hit = Signal()
        m.d.comb += hit.eq(hit_vec.any())
        hit_way = Signal(range(ways))
        lru_way = Signal(range(ways))
        for w in range(ways):
            with m.If(hit_vec[w]):
                m.d.comb += hit_way.eq(w)
            with m.If(lru_vec[w]):
                m.d.comb += lru_way.eq(w)
        lru_free = Signal()
        m.d.comb += lru_free.eq((lru_vec & self.way_ref_zero).any())
        use_way = self.use_way
        m.d.comb += use_way.eq(Mux(hit, hit_way, lru_way))
        # the same way one-hot, straight from registers (a page is in at most one register,
        # and the LRU vector is one-hot)
        m.d.comb += self.use_vec.eq(Mux(hit, hit_vec, lru_vec))

        # (`keep`: the decision stays two LUT levels deep instead of being re-balanced)
        can = Signal(attrs={"keep": 1})    # the head could go if it has a page register
        m.d.comb += can.eq(staged_valid & pend.w_rdy & self.run)
        free = Signal(attrs={"keep": 1})   # ... and it has one
        m.d.comb += free.eq(hit | lru_free)
        accept = self.accept
        m.d.comb += accept.eq(can & free)
        claim = self.claim
        for w in range(ways):
            m.d.comb += claim[w].eq(can & ~hit & lru_vec[w] & self.way_ref_zero[w])
        m.d.comb += self.claim_page.eq(staged.page)
        pend_in = Signal(pend_layout)
        st_rq = staged.rq
        m.d.comb += [
            pend_in.eq(staged),
            pend_in.rq.way.eq(use_way),
            # the beat landmarks: one adder after the head's registers
            pend_in.rq.skip_end.eq(st_rq.skip + st_rq.n_in),
            # the last row beat leaves with bus beat n_out - 1 (lane 0 aligned) or n_out
            pend_in.rq.last_at.eq(st_rq.skip + st_rq.n_out - (st_rq.shift == 0)),
            pend_in.rq.flush_at.eq(st_rq.skip + st_rq.n_in - 1),
            pend_in.rq.total_m1.eq(st_rq.total - 1),
            pend.w_data.eq(pend_in.as_value()), pend.w_en.eq(accept),
        ]

        # the stage's entries and their page-register hits
        way_valid, way_page = self.way_valid, self.way_page
        push = self.i_read.valid & self.i_read.ready
        in_hit = Cat(*[Mux(claim[w], pre.page == staged.page,
                           way_valid[w] & (way_page[w] == pre.page)) for w in range(ways)])
        spare_hit_c = Cat(*[Mux(claim[w], spare.page == staged.page, spare_hit[w])
                            for w in range(ways)])
        with m.If(accept | ~staged_valid):  # the head moves on (or is empty): refill it
            m.d.sync += [
                hit_vec.eq(Mux(spare_valid, spare_hit_c, in_hit)),
                staged_valid.eq(spare_valid | push),
            ]
        with m.If(push):
            m.d.sync += [spare_hit.eq(in_hit), st_wp.eq(~st_wp)]
            with m.If(st_wp):
                m.d.sync += st_ent[1].eq(pre)
            with m.Else():
                m.d.sync += st_ent[0].eq(pre)
        with m.If(accept):
            m.d.sync += st_rp.eq(~st_rp)
        m.d.sync += spare_valid.eq(Mux(spare_valid, ~accept, push & staged_valid & ~accept))
        for w in range(ways):
            # the hit bits are what the page compares would give
            hh = way_valid[w] & (way_page[w] == staged.page)
            hs = way_valid[w] & (way_page[w] == spare.page)
            check(~staged_valid | (hit_vec[w] == hh), "channel: head hit bit out of step")
            check(~spare_valid | (spare_hit[w] == hs), "channel: spare hit bit out of step")
        check(~spare_valid | staged_valid, "channel: spare without head")
        check(~accept | (self.use_vec == (1 << use_way)), "channel: use_vec is not use_way's bit")
        return m
