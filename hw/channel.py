"""EV-FC: the flash channel controller, one per channel, over a DDR-emulated NAND channel.

Interface (for the integrator)
------------------------------
``FlashChannelController(params: Params, tag_width: int)``:

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
beat's R-side flags): two cycles from accept to AR, one from AR to the R side knowing the request.
A request first passes a register stage of its own (its queue entries' beat arithmetic,
computed from ``offset`` and ``length`` before the way lookup): one more cycle from ``i_read``.

Timing (alone at the board parameters, ``evssd.hw.synth.estimate(..., fmax=True)``: yosys
synth_ecp5 + nextpnr-ecp5 --85k --out-of-context): 116 MHz (was 88.5 before the AR plan stage
and the R-side flags); critical path: the accept decision (page compare against every page
register -> hit/LRU -> accept -> page-register reference counts). Every decision on
the AR and R sides starts from registers: burst plans, ``way_ready`` (tR over), the R side's
beat flags (computed for the next beat when a beat is taken), and a finished read drops its
page-register reference one cycle late.
"""
from __future__ import annotations

from amaranth import Array, Module, Signal, Cat, Const, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .axi import AXI4Signature, Burst
from .regmap import Params
from .skid_buffer import SkidBuffer

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


class FlashChannelController(wiring.Component):
    """EV-FC: NAND timing emulation and fine-grained reads over one AXI4 channel."""

    def __init__(self, params: Params, tag_width: int):
        Params.require(params)
        if not 1 <= tag_width <= 32:
            raise ValueError(f"tag_width {tag_width} must be 1..32")
        self.params = params
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
            "skip_end": cw, "last_s0": cw, "last_sh": cw, "flush_at": cw, "total_m1": cw,
            "io_equal": 1,
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
            at_flush = cnt == e.flush_at
            at_total_m1 = cnt == e.total_m1
            need_flush = relevant & ~s0 & at_flush & e.io_equal
            return Cat(
                relevant, at_skip,
                Mux(s0, cnt == e.last_s0, cnt == e.last_sh),             # last_emit
                at_flush, at_total_m1, cnt == e.total,
                relevant & (s0 | ~at_skip),                              # emit
                need_flush,
                ~need_flush & at_total_m1)                               # ends

        # ------------------------------------------------------------------ program FSM state
        PIDLE, PRUN, PWAIT, PDONE = range(4)
        pstate = Signal(2)
        prog_idle = pstate == PIDLE

        # ------------------------------------------------------------------ request stage
        # Everything the request's queue entries need from its offset and length is computed
        # into a register stage before the way lookup (offset/length -> four chained carry
        # chains -> the pending FIFO's LUT RAM was the device's critical path, 75 MHz).
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
            pre_rq.skip_end.eq(pre_rq.skip + pre_rq.n_in),
            pre_rq.last_s0.eq(pre_rq.skip + pre_rq.n_out - 1),
            pre_rq.last_sh.eq(pre_rq.skip + pre_rq.n_out),
            pre_rq.flush_at.eq(pre_rq.skip + pre_rq.n_in - 1),
            pre_rq.total_m1.eq(pre_rq.total - 1),
            pre_rq.io_equal.eq(pre_rq.n_in == pre_rq.n_out),
        ]
        # The stage holds two requests (a skid buffer: its ready is a register) and, with each,
        # which page registers hold its page, so the accept decision starts from registers:
        # the page compares are made when a request enters the stage and kept current when an
        # older request claims a page register (the compares in front of the accept decision
        # made the board's critical path, 13.3 ns). Page registers change only on such a claim
        # and when a program starts (which needs the stage empty).
        st_ent = [Signal(pend_layout, name=f"req_ent{k}") for k in range(2)]
        st_hit = [Signal(ways, name=f"req_hit{k}") for k in range(2)]
        st_full = Signal(2)
        st_wp = Signal()
        st_rp = Signal()
        staged_valid = Signal()
        staged = Signal(pend_layout)
        hit_vec = Signal(ways)
        m.d.comb += [
            staged_valid.eq(st_full.bit_select(st_rp, 1)),
            staged.eq(Mux(st_rp, st_ent[1], st_ent[0])),
            hit_vec.eq(Mux(st_rp, st_hit[1], st_hit[0])),
            # a waiting program goes before reads not yet taken (a staged read is taken: it
            # goes first, and the program waits for it)
            self.i_read.ready.eq(~st_full.bit_select(st_wp, 1) & ~self.i_prog.valid),
        ]

        # ------------------------------------------------------------------ accept (way lookup)
        lru_vec = Cat(*[Cat(*[~more_recent[i][j] for j in range(ways) if j != i]).all()
                        if ways > 1 else Const(1) for i in range(ways)])
        hit = hit_vec.any()
        hit_way = Signal(range(ways))
        lru_way = Signal(range(ways))
        for w in range(ways):
            with m.If(hit_vec[w]):
                m.d.comb += hit_way.eq(w)
            with m.If(lru_vec[w]):
                m.d.comb += lru_way.eq(w)
        lru_free = Signal()
        m.d.comb += lru_free.eq(Array(way_ref_zero)[lru_way])
        use_way = Signal(range(ways))
        m.d.comb += use_way.eq(Mux(hit, hit_way, lru_way))

        accept = Signal()
        m.d.comb += accept.eq(staged_valid & pend.w_rdy & (hit | lru_free) & prog_idle)
        pend_in = Signal(pend_layout)
        m.d.comb += [
            pend_in.eq(staged),
            pend_in.rq.way.eq(use_way),
            pend.w_data.eq(pend_in.as_value()), pend.w_en.eq(accept),
        ]
        tr_wait = Signal()
        m.d.comb += tr_wait.eq(accept & ~hit)

        # the stage's entries and their page-register hits
        push = self.i_read.valid & self.i_read.ready
        claim = [tr_wait & (lru_way == w) for w in range(ways)]   # way w takes staged.page
        in_hit = Cat(*[Mux(claim[w], pre.page == staged.page,
                           way_valid[w] & (way_page[w] == pre.page)) for w in range(ways)])
        with m.If(push):
            m.d.sync += st_wp.eq(~st_wp)
        with m.If(accept):
            m.d.sync += st_rp.eq(~st_rp)
        for k in range(2):
            with m.If(push & (st_wp == k)):
                m.d.sync += [st_ent[k].eq(pre), st_hit[k].eq(in_hit), st_full[k].eq(1)]
            with m.Else():
                m.d.sync += st_hit[k].eq(Cat(*[Mux(claim[w], st_ent[k].page == staged.page,
                                                   st_hit[k][w]) for w in range(ways)]))
                with m.If(accept & (st_rp == k)):
                    m.d.sync += st_full[k].eq(0)

        for w in range(ways):
            with m.If(way_timer[w] != 0):
                m.d.sync += way_timer[w].eq(way_timer[w] - 1)
                with m.If(way_timer[w] == 1):
                    m.d.sync += way_ready[w].eq(1)
            with m.If(tr_wait & (lru_way == w)):
                m.d.sync += [way_valid[w].eq(1), way_page[w].eq(staged.page),
                             way_timer[w].eq(self.t_r), way_ready[w].eq(self.t_r == 0)]
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
        m.submodules.ar_stage = ar_stage = SkidBuffer(ar_layout)
        pend_head = data.View(pend_layout, pend.r_data)
        plan = ar_stage.i.payload
        cur0 = Mux(self.block_mode, 0, pend_head.start_b)
        rem0 = Mux(self.block_mode, page_beats, pend_head.nb_fine)
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
        last = Mux(ar_cont, last_r, head.last)
        head_ready = Array(way_ready)[head.rq.way]
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
        m.submodules.r_in = r_in = SkidBuffer(data.StructLayout({"data": 8 * B, "resp": 2}))
        m.d.comb += [
            r_in.i.valid.eq(axi.rvalid), r_in.i.payload.data.eq(axi.rdata),
            r_in.i.payload.resp.eq(axi.rresp), axi.rready.eq(r_in.i.ready),
        ]
        ent = data.View(rq_layout, rq.r_data[:rq_layout.size])
        ent_first = data.View(flag_layout, rq.r_data[rq_layout.size:])
        rcnt = Signal(cw)
        prev = Signal(8 * B)
        err_r = Signal()
        flush = Signal()                   # the final beat comes from `prev` alone
        # The tests on the beat count come from registers: `flags_next` holds them for beat
        # rcnt, computed when beat rcnt - 1 was taken; a request's first beat uses the flags it
        # brought along (compares and carry chains in front of rready and the rq pop were the
        # critical path).
        first = Signal(init=1)             # rcnt == 0: the head request has not moved a beat
        flags_next = Signal(flag_layout)
        f = Signal(flag_layout)
        m.d.comb += f.eq(Mux(first, ent_first, flags_next))
        relevant = f.relevant
        s0 = ent.shift == 0
        emit = f.emit
        last_emit = f.last_emit
        need_flush = f.need_flush

        hi = Signal(8 * B)
        m.d.comb += hi.eq(Mux(flush, 0, r_in.o.payload.data))
        shifted = Signal(8 * B)
        if W > 1:
            m.d.comb += shifted.eq(Cat(prev, hi) >> (ent.shift * 32))
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
        with m.If(flush):
            m.d.comb += [o.valid.eq(1), o.payload.err.eq(err_r), r_in.o.ready.eq(0)]
        with m.Elif(rq.r_rdy):
            m.d.comb += [
                o.valid.eq(r_in.o.valid & emit),
                o.payload.err.eq(err_r | row_err),
                r_in.o.ready.eq(~emit | o.ready),
            ]
        r_hs = Signal()
        m.d.comb += r_hs.eq(r_in.o.valid & r_in.o.ready)
        done = Signal()                    # the rq head's request has finished
        with m.If(r_hs):
            m.d.sync += [rcnt.eq(rcnt + 1), err_r.eq(err_r | row_err),
                         first.eq(0), flags_next.eq(flags_at(rcnt + 1, ent))]
            with m.If(relevant):
                m.d.sync += prev.eq(r_in.o.payload.data)
            with m.If(need_flush):
                m.d.sync += flush.eq(1)
        with m.If(flush & o.ready):
            m.d.sync += flush.eq(0)
        m.d.comb += done.eq((r_hs & f.ends) | (flush & o.ready & f.at_total))
        with m.If(done):
            m.d.comb += rq.r_en.eq(1)
            m.d.sync += [rcnt.eq(0), err_r.eq(0), first.eq(1)]

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
                                 p_err.eq(0), pstate.eq(PRUN)]
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
                    m.d.sync += pstate.eq(PIDLE)

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
