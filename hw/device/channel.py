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

Two-stage fine-grained read: only the beats covering ``[offset, offset + length)`` cross the
channel bus; with ``block_mode = 1`` each read moves the whole page (the block-interface
baseline) and ``o_row`` still carries only the row.

Throughput and latency (64-bit bus, memory latency 4, no stalls; tests/hw/test_channel.py):
the accept queue holds ``max(4, 2 * ways)`` reads and up to 8 requests have their AR issued
ahead of their R data, so R streams back to back across requests (64 reads of 64-byte rows: 512
beats in 517 cycles; 8-byte rows: 64 beats in 69). ``o_row`` is combinational from a register stage on
the R channel (one cycle of latency); a row whose first byte is not in lane 0 and whose beats on the bus equal its
beats on ``o_row`` costs one extra cycle at its end. The pending and AR->R queues have registered
outputs, and the pending head passes a planning register stage (its first burst and its first
beat's R-side flags): two cycles from accept to AR. The AR->R queue's head passes a two-entry
register slice: two cycles from AR to the R side knowing the request (hidden behind the memory
latency). A request first passes a register stage of its own (its queue entries' beat
arithmetic, computed from ``offset`` and ``length`` before the way lookup, and its page-register
hits): one more cycle from ``i_read``. A tR timer is loaded the cycle after its page register is
claimed (with ``t_r - 1``: tR ends on the same cycle as if loaded at once).

Timing (alone at the board parameters, ``evssd.hw.synth.estimate(..., fmax=True)``: yosys
synth_ecp5 + nextpnr-ecp5 --85k --out-of-context): 126 MHz (nextpnr varies by +-10 MHz with
placement); critical path: the R
side's beat flags for the next beat (head slice mux -> beat-count compares -> flags register).
About 1210 FFs, 920 LUT4, 195 carry cells, 42 LUT-RAM blocks. Every decision starts at most two
LUT levels from registers: the accept decision (and which page register a miss claims) from the
request stage's registered page-register hits, the LRU bits and registered "no reference left"
flags; the AR handshake from registered burst plans, the head's way and ``way_ready`` (tR
over); the R handshake and the request end from registered beat flags (computed for the next
beat when a beat is taken), registered slice-valid flags and ``o_row.ready``. A finished read
drops its page-register reference one cycle late. ``checks`` (on by default) adds simulation
assertions that every registered copy of a decision stays equal to what it stands for (the
synthesis flow removes assertions: ``synth.YOSYS_AFTER_READ``).
"""
from __future__ import annotations

from amaranth import Array, Module, Signal, Cat, Const, Mux
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4Signature, Burst
from ..regmap import Params

__all__ = [
    "FlashChannelController", "read_request_layout", "row_beat_layout", "prog_request_layout",
    "prog_data_layout", "prog_done_layout", "channel_addr_width", "WayModel",
]


def read_request_layout(tag_width: int) -> data.StructLayout:
    return data.StructLayout({"page": 32, "offset": 16, "length": 16, "tag": tag_width})


def row_beat_layout(params: Params, tag_width: int) -> data.StructLayout:
    return data.StructLayout({"data": params.ch_data_bits, "last": 1, "err": 1, "tag": tag_width})


def prog_request_layout() -> data.StructLayout:
    return data.StructLayout({"page": 32})


def prog_data_layout(params: Params) -> data.StructLayout:
    return data.StructLayout({"data": params.ch_data_bits})


def prog_done_layout() -> data.StructLayout:
    return data.StructLayout({"err": 1})


def channel_addr_width(params: Params) -> int:
    return max(12, (params.pages_per_channel * params.page_size - 1).bit_length())


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


class _Slice:
    """A two-entry register slice like :class:`.skid_buffer.SkidBuffer`, inline, with
    ``o.valid`` a register of its own (not ``full[rp]``: the read pointer drives the whole
    payload mux, a high fan-out in front of every decision on ``o.valid``) and, on request,
    fields of the head kept in registers too (:meth:`head_reg`)."""

    def __init__(self, m, shape, name, checks=True):
        self.m, self.shape, self.checks = m, shape, checks
        self.i = stream.Signature(shape).create(path=(name, "i"))
        self.o = stream.Signature(shape).create(path=(name, "o"))
        ent = [Signal(shape, name=f"{name}_ent{k}") for k in range(2)]
        full = Signal(2, name=f"{name}_full")
        wp = Signal(name=f"{name}_wp")
        rp = Signal(name=f"{name}_rp")
        self.push = push = Signal(name=f"{name}_push")
        self.pop = pop = Signal(name=f"{name}_pop")
        m.d.comb += [
            self.i.ready.eq(~full.bit_select(wp, 1)),
            self.o.payload.eq(Mux(rp, ent[1], ent[0])),
            push.eq(self.i.valid & self.i.ready),
            pop.eq(self.o.valid & self.o.ready),
        ]
        with m.If(push):
            m.d.sync += wp.eq(~wp)
            with m.If(wp):
                m.d.sync += ent[1].eq(self.i.payload)
            with m.Else():
                m.d.sync += ent[0].eq(self.i.payload)
        with m.If(pop):
            m.d.sync += rp.eq(~rp)
        # a push and a pop in the same cycle touch different entries (one is empty, one full)
        for k in range(2):
            with m.If(push & (wp == k)):
                m.d.sync += full[k].eq(1)
            with m.Elif(pop & (rp == k)):
                m.d.sync += full[k].eq(0)
        self.other_full = full.bit_select(~rp, 1)     # the entry after the head
        other = Signal(shape, name=f"{name}_other")
        m.d.comb += other.eq(Mux(rp, ent[0], ent[1]))
        self.other = other
        self.valid_next = Signal(name=f"{name}_valid_next")
        m.d.comb += self.valid_next.eq(self.next_head(Const(1), Const(1), push))
        m.d.sync += self.o.valid.eq(self.valid_next)
        if checks:
            m.d.sync += Assert(self.o.valid == full.bit_select(rp, 1),
                               f"{name}: o.valid out of step")

    def next_head(self, cur, other, incoming):
        """The next cycle's value of something about the head, from its values for the current
        head, the entry after it, and the incoming entry."""
        return Mux(self.pop, Mux(self.other_full, other, incoming),
                   Mux(self.o.valid, cur, incoming))

    def head_reg(self, fn, name):
        """A register holding ``fn(head payload)`` (valid while ``o.valid``)."""
        r = Signal.like(fn(self.o.payload), name=name)
        self.m.d.sync += r.eq(self.next_head(r, fn(self.other), fn(self.i.payload)))
        if self.checks:
            self.m.d.sync += Assert(~self.o.valid | (r == fn(self.o.payload)),
                                    f"{name} out of step")
        return r


class FlashChannelController(wiring.Component):
    """EV-FC: NAND timing emulation and fine-grained reads over one AXI4 channel."""

    def __init__(self, params: Params, tag_width: int, *, checks: bool = True):
        Params.require(params)
        if not 1 <= tag_width <= 32:
            raise ValueError(f"tag_width {tag_width} must be 1..32")
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

    def elaborate(self, platform):
        m = Module()
        p = self.params

        def check(cond, msg):
            if self.checks:
                m.d.sync += Assert(cond, msg)
        B = self.beat_bytes
        lb = B.bit_length() - 1
        W = B // 4                                    # 32-bit words per beat
        page_beats = p.page_size // B
        lpb = page_beats.bit_length() - 1
        lps = p.page_size.bit_length() - 1
        # AXI: a burst may neither cross 4 KiB nor exceed 256 beats; bursts split at aligned
        # chunks of this size never do either.
        chunk_beats = min(4096 // B, 256, page_beats)
        pb = max(1, (p.pages_per_channel - 1).bit_length())   # page bits that address the bank
        ways = p.ways
        pend_depth = max(4, 2 * ways)     # enough for `ways` overlapping tR waits plus hits
        rq_depth = 8                      # ARs ahead of the R data: covers ~8 cycles of DDR latency
        cw = page_beats.bit_length() + 1  # beat counters
        refw = (pend_depth + rq_depth + 2).bit_length()
        axi = self.m_axi

        def page_addr(page):
            return Cat(Const(0, lps), page[:pb])

        # ------------------------------------------------------------------ state
        way_valid = [Signal(name=f"way{w}_valid") for w in range(ways)]
        way_page = [Signal(pb, name=f"way{w}_page") for w in range(ways)]
        way_timer = [Signal(24, name=f"way{w}_timer") for w in range(ways)]
        way_ready = [Signal(init=1, name=f"way{w}_ready") for w in range(ways)]  # timer == 0
        way_ref = [Signal(refw, name=f"way{w}_ref") for w in range(ways)]
        way_ref_zero = [Signal(init=1, name=f"way{w}_ref_zero") for w in range(ways)]  # ref == 0
        # more_recent[i][j]: way i was used after way j (exact LRU order as a bit matrix).
        # Reset order: way 0 least recent, as WayModel.
        more_recent = [[Signal(init=int(i > j), name=f"lru_{i}_{j}") if i != j else None
                        for j in range(ways)] for i in range(ways)]
        n_reads = Signal(refw)            # reads accepted and not yet finished

        rq_layout = data.StructLayout({
            "way": max(1, (ways - 1).bit_length()), "tag": self.tag_width,
            "skip": cw, "n_in": cw, "n_out": cw, "total": cw,
            "shift": max(1, (W - 1).bit_length()), "lmod": max(1, (W - 1).bit_length()),
            # beat-count landmarks precomputed at AR time, so the R side compares its counter
            # for equality instead of subtracting first (R -> rready was the critical path)
            "skip_end": cw, "last_at": cw, "flush_at": cw, "total_m1": cw,
            # the request needs a flush beat (realigned, as many beats in as out), and whether it
            # can end on an R beat (else it ends on its flush beat)
            "flushes": 1, "ends_r": 1,
        })
        # The R side's whole descriptor is computed at accept time and waits in `pend` with the
        # AR side's beat range (offset/length arithmetic at the pending-FIFO head was the
        # critical path: LUT RAM -> three carry chains -> pend.r_en).
        pend_layout = data.StructLayout({"page": pb, "start_b": cw, "nb_fine": cw,
                                         "rq": rq_layout})
        m.submodules.pend = pend = SyncFIFOBuffered(width=pend_layout.size, depth=pend_depth)
        # registered read data: the R side's decisions start from flip-flops, not LUT RAM
        # Where the R side stands within the head request, as flags (see `flags_at` below)
        flag_layout = data.StructLayout({"relevant": 1, "at_skip": 1, "last_emit": 1,
                                         "at_flush": 1, "at_total_m1": 1, "at_total": 1,
                                         "emit": 1, "need_flush": 1, "ends": 1})
        m.submodules.rq = rq = SyncFIFOBuffered(width=rq_layout.size + flag_layout.size,
                                                depth=rq_depth)

        def flags_at(cnt, e):
            """The R side's tests for beat number ``cnt`` of request ``e``, and what follows
            from them for that beat (whether it emits a row beat, needs a flush beat after it,
            ends the request): registered with the tests, so the R handshake and the request
            queue's pop decide from flip-flops."""
            s0 = e.shift == 0
            relevant = (cnt >= e.skip) & (cnt < e.skip_end)
            at_skip = cnt == e.skip
            at_flush = cnt == e.flush_at                 # (the last relevant beat)
            at_total_m1 = cnt == e.total_m1
            need_flush = e.flushes & at_flush
            return Cat(
                relevant, at_skip,
                cnt == e.last_at,                                        # last_emit
                at_flush, at_total_m1, cnt == e.total,
                relevant & (s0 | ~at_skip),                              # emit
                need_flush,
                e.ends_r & at_total_m1)                                  # ends

        # ------------------------------------------------------------------ program FSM state
        PIDLE, PRUN, PWAIT, PDONE = range(4)
        pstate = Signal(2)
        prog_idle = Signal(init=1)         # pstate == PIDLE, as its own register
        check(prog_idle == (pstate == PIDLE), "channel: prog_idle out of step")

        # ------------------------------------------------------------------ request stage
        # What the request's queue entries need from its offset and length is computed into a
        # register stage before the way lookup (offset/length -> four chained carry chains ->
        # the pending FIFO's LUT RAM was the device's critical path, 75 MHz); the beat
        # landmarks that add to those results are computed from the stage's head (`pend_in`).
        # block_mode is constant while reads are in flight, so it may be applied here.
        req = self.i_read.payload
        pre = Signal(pend_layout)
        pre_rq = pre.rq
        req_start_b = Signal(cw)
        req_end_b = Signal(cw)
        req_nb = Signal(cw)
        m.d.comb += [
            req_start_b.eq(req.offset >> lb),
            req_end_b.eq((req.offset + req.length - 1) >> lb),
            req_nb.eq(req_end_b - req_start_b + 1),
            pre.page.eq(req.page[:pb]), pre.start_b.eq(req_start_b), pre.nb_fine.eq(req_nb),
            pre_rq.tag.eq(req.tag),
            pre_rq.skip.eq(Mux(self.block_mode, req_start_b, 0)),
            pre_rq.n_in.eq(req_nb),
            pre_rq.n_out.eq((req.length + B - 1) >> lb),
            pre_rq.total.eq(Mux(self.block_mode, page_beats, req_nb)),
            pre_rq.shift.eq((req.offset >> 2) if W > 1 else 0),
            pre_rq.lmod.eq((req.length >> 2) if W > 1 else 0),
            # n_in == n_out with a word shift s != 0: the row's last partial beat (r bytes)
            # still fits after the shift, r != 0 and 4 s + r <= B (from the low bits alone)
            pre_rq.flushes.eq((pre_rq.shift != 0) & (req.length[:lb] != 0)
                              & ((pre_rq.shift << 2) + req.length[:lb] <= B)),
            # skip_end != total: only in block mode, when the row's last beat is not the page's
            pre_rq.ends_r.eq(~pre_rq.flushes
                             | (self.block_mode & (req_end_b[:lpb] != page_beats - 1))),
        ]
        # The stage holds two requests, a head (the one the accept decision looks at, in fixed
        # registers: no read-pointer mux in front of the decision) and a spare (``i_read.ready``
        # is ``~spare_valid``, a register), and, with each, which page registers hold its page,
        # so the accept decision starts from registers: the page compares are made when a
        # request enters the stage and corrected when the head claims a page register while the
        # spare moves up (the compares in front of the accept decision made the board's critical
        # path, 13.3 ns). Page registers change only on such a claim and when a program starts
        # (which needs the stage empty).
        # The entries' data sit in two registers written only on a push (by a write pointer) and
        # read through 2:1 muxes by a read pointer that flips on accept: the accept decision
        # then drives no wide clock enable.
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
        m.d.comb += self.i_read.ready.eq(~spare_valid & ~self.i_prog.valid)

        # ------------------------------------------------------------------ accept (way lookup)
        # Everything here is one or two LUT levels from registers: the head's hit bits, the LRU
        # matrix and the reference-count zero flags. A way is claimed (takes the head's page,
        # starting a tR wait) by a flat AND of those, not through the accept decision.
        lru_vec = Cat(*[Cat(*[~more_recent[i][j] for j in range(ways) if j != i]).all()
                        if ways > 1 else Const(1) for i in range(ways)])
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
        m.d.comb += lru_free.eq((lru_vec & Cat(*way_ref_zero)).any())
        use_way = Signal(range(ways))
        m.d.comb += use_way.eq(Mux(hit, hit_way, lru_way))

        # (`keep`: the decision stays two LUT levels deep instead of being re-balanced)
        can = Signal(attrs={"keep": 1})    # the head could go if it has a page register
        m.d.comb += can.eq(staged_valid & pend.w_rdy & prog_idle)
        free = Signal(attrs={"keep": 1})   # ... and it has one
        m.d.comb += free.eq(hit | lru_free)
        accept = Signal()
        m.d.comb += accept.eq(can & free)
        claim = [Signal(name=f"way{w}_claim") for w in range(ways)]  # way w takes staged.page
        for w in range(ways):
            m.d.comb += claim[w].eq(can & ~hit & lru_vec[w] & way_ref_zero[w])
        pend_in = Signal(pend_layout)
        st_rq = staged.rq
        m.d.comb += [
            pend_in.eq(staged),
            pend_in.rq.way.eq(use_way),
            # the beat landmarks: one adder after the head's registers (computed at the
            # request stage's input they chained after offset + length, 13.4 ns on the board)
            pend_in.rq.skip_end.eq(st_rq.skip + st_rq.n_in),
            # the last row beat leaves with bus beat n_out - 1 (lane 0 aligned) or n_out
            pend_in.rq.last_at.eq(st_rq.skip + st_rq.n_out - (st_rq.shift == 0)),
            pend_in.rq.flush_at.eq(st_rq.skip + st_rq.n_in - 1),
            pend_in.rq.total_m1.eq(st_rq.total - 1),
            pend.w_data.eq(pend_in.as_value()), pend.w_en.eq(accept),
        ]
        tr_wait = Signal()
        m.d.comb += tr_wait.eq(Cat(*claim).any())

        # the stage's entries and their page-register hits
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

        # A claim loads the way's tR timer a cycle later (with t_r - 1, so it ends on the same
        # cycle): the claim's fan-out then stays small. No read of the way can be at the AR stage
        # before then (a claim needs the way unreferenced, and accept -> AR takes 2+ cycles).
        claim_d = [Signal(name=f"way{w}_claim_d") for w in range(ways)]
        t_r_m1 = Signal(24)
        m.d.comb += t_r_m1.eq(Mux(self.t_r == 0, 0, self.t_r - 1))
        for w in range(ways):
            m.d.sync += claim_d[w].eq(claim[w])
            with m.If(claim_d[w]):
                m.d.sync += [way_timer[w].eq(t_r_m1), way_ready[w].eq(self.t_r <= 1)]
            with m.Elif(~way_ready[w]):
                m.d.sync += way_timer[w].eq(way_timer[w] - 1)
                with m.If(way_timer[w] == 1):
                    m.d.sync += way_ready[w].eq(1)
            with m.If(claim[w]):
                m.d.sync += [way_valid[w].eq(1), way_page[w].eq(staged.page)]
            check(way_ready[w] == (way_timer[w] == 0), "channel: way_ready out of step")
        with m.If(accept):
            for i in range(ways):
                for j in range(ways):
                    if i == j:
                        continue
                    with m.If(use_way == i):
                        m.d.sync += more_recent[i][j].eq(1)
                    with m.Elif(use_way == j):
                        m.d.sync += more_recent[i][j].eq(0)

        # ------------------------------------------------------------------ AR issue
        def burst(cur, rem):
            """(length, is the request's last burst) of the burst starting at beat ``cur``
            with ``rem`` beats to go: up to the next chunk boundary."""
            to_bound = Signal(cw)
            m.d.comb += to_bound.eq(chunk_beats - (cur & (chunk_beats - 1)))
            return Mux(rem < to_bound, rem, to_bound), rem <= to_bound

        # The pending FIFO's head is planned into a register stage: its first burst (start,
        # length, last) and its first beat's R-side flags, so the AR handshake and the pop decide
        # from registers (the burst arithmetic in front of arvalid and pend.r_en was the
        # critical path). One cycle from accept to AR more; the rate stays one request a cycle.
        ar_layout = data.StructLayout({"page": pb, "cur": cw, "rem": cw, "blen": cw, "last": 1,
                                       "rq": rq_layout, "first": flag_layout})
        ar_stage = _Slice(m, ar_layout, "ar_stage", self.checks)
        pend_head = data.View(pend_layout, pend.r_data)
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
            ar_stage.i.valid.eq(pend.r_rdy), pend.r_en.eq(ar_stage.i.ready),
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
        # arvalid decides from registers: the head's way is kept in a register of its own (not
        # through the stage's payload mux)
        head_way = ar_stage.head_reg(lambda e: e.rq.way, "ar_head_way")
        last = Const(1) if chunk_beats == page_beats else Mux(ar_cont, last_r, head.last)
        head_ready = Array(way_ready)[head_way]
        check(~(ar_stage.o.valid & Array(claim_d)[head.rq.way]),
              "channel: a read reached AR before its way's tR timer was loaded")
        m.d.comb += [
            axi.arvalid.eq(ar_stage.o.valid & head_ready & (ar_cont | rq.w_rdy)),
            axi.araddr.eq(Cat(Const(0, lb), cur[:lpb], head.page)),
            axi.arlen.eq(blen - 1),
            axi.arsize.eq(lb),
            axi.arburst.eq(Burst.INCR),
            axi.arid.eq(0),
            axi.arprot.eq(0),
        ]
        ar_hs = axi.arvalid & axi.arready
        m.d.comb += [
            rq.w_data.eq(Cat(head.rq.as_value(), head.first.as_value())),
            # The R side learns of a request at its first AR, so its data is never held up
            # waiting for the request's later bursts.
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

        # ------------------------------------------------------------------ R: realign to lane 0
        # R beats enter a register stage next to the bus first: the R side's handshake is a
        # clock enable of every realignment register, and on a board the bus's last register
        # (by the block RAM) and those registers sat far apart (a 13.7 ns path, mostly wire).
        r_in = _Slice(m, data.StructLayout({"data": 8 * B, "resp": 2}), "r_in", self.checks)
        m.d.comb += [
            r_in.i.valid.eq(axi.rvalid), r_in.i.payload.data.eq(axi.rdata),
            r_in.i.payload.resp.eq(axi.rresp), axi.rready.eq(r_in.i.ready),
        ]
        # The request queue's head passes a two-entry slice whose entries are written only from
        # the queue (clock enables from registers): finishing a request only flips the slice's
        # read pointer, where popping the queue itself enabled its whole read register (the R
        # side's done -> a 73-bit clock enable was the critical path). One more cycle from AR to
        # the R side knowing the request, hidden behind the memory latency.
        rq_w = rq_layout.size + flag_layout.size
        hd = _Slice(m, rq_w, "rq_head", self.checks)
        m.d.comb += [hd.i.valid.eq(rq.r_rdy), hd.i.payload.eq(rq.r_data),
                     rq.r_en.eq(hd.i.ready)]
        hv = hd.o.valid                    # the R side has a request (a register)
        ent = data.View(rq_layout, hd.o.payload[:rq_layout.size])
        other_first = data.View(flag_layout, hd.other[rq_layout.size:])
        new_first = data.View(flag_layout, rq.r_data[rq_layout.size:])
        rnext = Signal(cw, init=1)        # the beat after the head's current one (from 0)
        prev = Signal(8 * B)
        err_r = Signal()
        flush = Signal()                   # the final beat comes from `prev` alone
        # The tests on the beat count come from a register: `f` holds them for the head request's
        # current beat, computed when the beat before was taken, or, for a request's first beat,
        # the flags it brought along, loaded when it becomes the head (compares and carry chains,
        # and a mux between the two, in front of rready and the pop were the critical path).
        f = Signal(flag_layout)
        relevant = f.relevant
        # the realignment's word shift drives every data mux: its own register, not the slice's
        # payload mux (which would add a LUT with a fan-out of a hundred in front of the flags)
        shift = hd.head_reg(lambda e: data.View(rq_layout, e[:rq_layout.size]).shift, "r_shift")
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
        # (a fan-out of a hundred in front of the handshake)
        rd_ok = Signal()
        m.d.comb += [
            o.valid.eq(flush | (rd_ok & r_in.o.valid & emit)),
            o.payload.err.eq(err_r | (~flush & row_err)),
            r_in.o.ready.eq(rd_ok & (~emit | o.ready)),
        ]
        r_hs = Signal(attrs={"keep": 1})
        m.d.comb += r_hs.eq(r_in.o.valid & r_in.o.ready)
        done = Signal()                    # the head request has finished
        # what follows a beat taken on R is chosen from registers (`f.ends`) ahead of the
        # handshake, which then only selects: the next beat's flags, or the next request's first
        nfirst = Signal(flag_layout, attrs={"keep": 1})  # the next head's first-beat flags:
        m.d.comb += nfirst.eq(             # the slice's other entry, or the one entering it
            Mux(hd.other_full, other_first, new_first))
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
        m.d.sync += rd_ok.eq(hd.valid_next & ~((r_hs & need_flush) | (flush & ~o.ready)))
        check(rd_ok == (hv & ~flush), "channel: rd_ok out of step")
        m.d.comb += done.eq((r_hs & f.ends) | flush_end)
        m.d.comb += hd.o.ready.eq(done)
        check(~hv | (f.as_value() == flags_at((rnext - 1)[:cw], ent)),
              "channel: R-side flags out of step")

        # Page-register references: taken at accept, dropped the cycle after the data has crossed
        # the bus (from registers: R handshake -> done -> counters was the critical path; a late
        # drop only delays an LRU replacement by a cycle).
        done_d = Signal()
        done_way = Signal.like(ent.way)
        m.d.sync += [done_d.eq(done), done_way.eq(ent.way)]
        for w in range(ways):
            inc = accept & (use_way == w)
            dec = done_d & (done_way == w)
            with m.If(inc & ~dec):
                m.d.sync += [way_ref[w].eq(way_ref[w] + 1), way_ref_zero[w].eq(0)]
            with m.Elif(dec & ~inc):
                m.d.sync += [way_ref[w].eq(way_ref[w] - 1), way_ref_zero[w].eq(way_ref[w] == 1)]
        with m.If(accept & ~done):
            m.d.sync += n_reads.eq(n_reads + 1)
        with m.Elif(done & ~accept):
            m.d.sync += n_reads.eq(n_reads - 1)

        # ------------------------------------------------------------------ program path
        n_chunks = page_beats // chunk_beats
        ccw = max(1, n_chunks.bit_length())
        p_page = Signal(pb)
        aw_idx = Signal(ccw)
        w_cnt = Signal(cw)
        b_cnt = Signal(ccw)
        p_err = Signal()
        p_timer = Signal(24)
        m.d.comb += [
            axi.awid.eq(0), axi.awlen.eq(chunk_beats - 1), axi.awsize.eq(lb),
            axi.awburst.eq(Burst.INCR), axi.awprot.eq(0),
            axi.awaddr.eq(page_addr(p_page) | (aw_idx << (chunk_beats * B).bit_length() - 1)),
            axi.wdata.eq(self.i_prog_data.payload.data),
            axi.wstrb.eq((1 << B) - 1),
            axi.wlast.eq((w_cnt & (chunk_beats - 1)) == chunk_beats - 1),
            self.o_prog_done.payload.err.eq(p_err),
        ]
        with m.Switch(pstate):
            with m.Case(PIDLE):
                m.d.comb += self.i_prog.ready.eq((n_reads == 0) & ~staged_valid)
                with m.If(self.i_prog.valid & self.i_prog.ready):
                    pp = self.i_prog.payload.page[:pb]
                    m.d.sync += [p_page.eq(pp), aw_idx.eq(0), w_cnt.eq(0), b_cnt.eq(0),
                                 p_err.eq(0), pstate.eq(PRUN), prog_idle.eq(0)]
                    for w in range(ways):
                        with m.If(way_page[w] == pp):
                            m.d.sync += way_valid[w].eq(0)
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

        # ------------------------------------------------------------------ counters
        # The counters count events registered one cycle earlier: the handshakes (which cross
        # the chip to the memories on a board) then end at flip-flops, not at 32-bit adders.
        w_hs = axi.wvalid & axi.wready
        busy = (n_reads != 0) | staged_valid | ~prog_idle   # a staged read is outstanding
        ev_row, ev_r, ev_w, ev_tr, ev_busy, ev_prog = (Signal(name=f"ev_{k}") for k in
                                                       ("row", "r", "w", "tr", "busy", "prog"))
        m.d.sync += [
            ev_row.eq(o.valid & o.ready & o.payload.last), ev_r.eq(r_hs), ev_w.eq(w_hs),
            ev_tr.eq(tr_wait), ev_busy.eq(busy),
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
