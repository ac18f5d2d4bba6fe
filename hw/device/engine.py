"""Command engine: validates commands, streams index lists in, emits lookups, writes results.

``CommandEngine(params, n_slots)`` sits between the queues (:mod:`evssd.hw.device.queues`), the host
DMA, the translator, the FTL, the flash channels (programs) and the merger:

```
i_cmd -> front (one command at a time):
   decode/validate -> probe the table through the translator (row_bytes, elem, enabled)
   -> result-size check -> (pooled) offsets pass 1: validate -> emit lookups in request order
   (index list and, pooled, offsets pass 2 stream in by DMA in 128-byte chunks, so both
   streams share the single-transfer DMA read engine without deadlock)
translator o_resp + side FIFO (what each request was) -> fork
(:class:`~evssd.hw.device.fork.LookupFork`):
   lookup  -> merger i_desc (+ FTL when the index translated), per-command bad-index stats
   token   -> merger i_desc (empty bag)
   raw     -> READ_PAGES chunk: FTL + merger i_desc (a page is read as rows of CHUNK bytes)
   probe   -> back to the front
result stage (commands in order, :class:`~evssd.hw.device.result_writer.ResultWriter`): DMA-writes
   the merger's packed output to dst_addr in RESULT_CHUNK pieces, waits for every B response,
   then posts the completion.
```

Several commands are in flight (up to ``params.max_inflight``): the front moves to the next
command as soon as the previous one's lookups are emitted, while its rows are still in the
channels and the merger. ROB slots are credits: allocated in order, returned in order by the
merger's ``o_free``. PROGRAM_PAGES waits until it is the only command in flight (so reads before
it see the old data and reads after it the new), then hands it to the page programmer
(:class:`~evssd.hw.device.page_programmer.PageProgrammer`: host DMA -> width conversion ->
``o_prog[ch]``/``o_prog_data[ch]`` -> ``i_prog_done[ch]``) and completes with its answer.

Status rules follow the functional model (:mod:`evssd.host.model`): BAD_OPCODE; BAD_ADDRESS
(src/offsets/dst not 64-byte aligned, per opcode); pages: RESULT_OVERFLOW, BAD_LBA
(``lba + count > total pages``); tables: TABLE_DISABLED (also row_bytes 0 or above
max_row_bytes, which the merger cannot hold), RESULT_OVERFLOW, BAD_OFFSETS; per lookup
BAD_INDEX (no extent; dominates) or BAD_LBA (page outside the flash) with ``n_bad`` and the
first bad position; BUS_ERROR when an index/offset/page read, a row read or a result write got
an AXI error (``n_bad`` 0, ``first_bad`` none); an error on the offsets (pass 1) is found before
anything is written, an error on the index list or a row only once the result is streaming, so
that command's result buffer may hold rows (never bytes outside it). On the validation errors
nothing is read past the check and nothing is written.

Timing: the state machines branch on registered facts, not on compares and sums made in the
same cycle. Checks get states of their own (CHECK, PROBE_CHECK, SIZE_CMP; the result size is a
radix-4 multiply, SIZE_MUL, one cycle per two bits of the row's output bytes; P_BAG_END per bag,
PLAN per result chunk); the completion-order push, slot credits,
the chunk readers' request plans and word counts (``last`` travels with each index word), the
skip counts and the probe's answer are registers (a chunk reader makes no request in the cycle
after one). Two-entry register slices (full rate, one cycle each) decouple the handshakes: the
front's emissions -> translator/credits/side FIFO, side FIFO -> fork, fork -> merger ``i_desc``
and FTL, each chunk reader's words -> front; the fork's per-command stats are taken a cycle
late.
"""
from __future__ import annotations

from amaranth import Module, Signal, Mux, Cat, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.hdl import Assert
from amaranth.lib.wiring import In, Out

from . import channel as ch_mod
from . import ftl as ftl_mod
from . import merger as merger_mod
from . import translator as xlat_mod
from ..lib.skid_buffer import SkidBuffer
from ..lib.register_stage import RegisterStage
from ..lib.chunk_reader import WORD_LAYOUT, ChunkReader
from ..lib.stream_zip import StreamZip
from ..lib.dma_stream import DMA_CMD_LAYOUT, DMA_DONE_LAYOUT, dma_read_layout, dma_write_layout
from .queues import CPL_REQUEST_LAYOUT, FETCHED_LAYOUT
from .page_programmer import PageProgrammer
from .fork import XLAT_TAG_WIDTH, Kind, LookupFork, raw_chunk_bytes, side_layout as fork_side_layout
from .result_writer import ORDER_LAYOUT, RESULT_CHUNK_BYTES, ResultWriter
from ..regmap import BUFFER_ALIGN_BITS, ELEM_BITS, ROWWISE_HEADER_BYTES, ElemType, Opcode, Params, Status

__all__ = ["CommandEngine", "READ_CHUNK_BYTES"]

READ_CHUNK_BYTES = 128      # index/offset DMA reads


class CommandEngine(wiring.Component):
    """See the module docstring. Ports:

    - ``i_cmd`` (queues ``o_cmd``), ``o_cpl`` (queues ``i_cpl``).
    - DMA: read ports ``o_idx_cmd``/``i_idx_data`` (index lists), ``o_off_cmd``/``i_off_data``
      (offsets), ``o_pg_cmd``/``i_pg_data`` (page data), ``o_wgt_cmd``/``i_wgt_data`` (the
      per-lookup weights of GATHER_POOLED_WEIGHTED); write port ``o_res_cmd``/
      ``o_res_data``/``i_res_done`` (results).
    - ``o_xlat``/``i_xlat``: translator ``i_req``/``o_resp`` (tag width :data:`XLAT_TAG_WIDTH`).
    - ``o_ftl``: FTL ``i_req`` (tag = ROB slot).
    - ``o_desc``, ``i_free``, ``i_out``: merger ``i_desc``, ``o_free``, ``o_data``.
    - ``o_prog[c]``, ``o_prog_data[c]``, ``i_prog_done[c]``: channel c's program ports.
    - ``inflight`` (commands accepted and not yet completed; an accept counts from the next
      cycle), ``ev_lookup`` (a lookup was issued this cycle), ``ev_complete``/``ev_error`` (a
      completion with any/non-OK status).
    """

    def __init__(self, params: Params, n_slots: int):
        Params.require(params)
        if n_slots < 2 or n_slots & (n_slots - 1) or n_slots > 256:
            raise ValueError(f"n_slots {n_slots} must be a power of two 2..256")
        self.params = params
        self.n_slots = n_slots
        self.slot_bits = n_slots.bit_length() - 1
        p = params
        wh = p.host_data_bits
        T = self.slot_bits
        super().__init__({
            "i_cmd": In(stream.Signature(FETCHED_LAYOUT)),
            "o_cpl": Out(stream.Signature(CPL_REQUEST_LAYOUT)),
            "o_idx_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_idx_data": In(stream.Signature(dma_read_layout(wh))),
            "o_off_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_off_data": In(stream.Signature(dma_read_layout(wh))),
            "o_pg_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_pg_data": In(stream.Signature(dma_read_layout(wh))),
            "o_wgt_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_wgt_data": In(stream.Signature(dma_read_layout(wh))),
            "o_res_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "o_res_data": Out(stream.Signature(dma_write_layout(wh))),
            "i_res_done": In(stream.Signature(DMA_DONE_LAYOUT)),
            "o_xlat": Out(stream.Signature(xlat_mod.request_layout(XLAT_TAG_WIDTH))),
            "i_xlat": In(stream.Signature(xlat_mod.response_layout(XLAT_TAG_WIDTH))),
            "o_ftl": Out(stream.Signature(ftl_mod.request_layout(T))),
            "o_desc": Out(stream.Signature(merger_mod.desc_layout(n_slots))),
            "i_free": In(stream.Signature(unsigned(T), always_ready=True)),
            "i_out": In(stream.Signature(merger_mod.out_layout(p))),
            "o_prog": Out(stream.Signature(ch_mod.prog_request_layout())).array(p.n_channels),
            "o_prog_data": Out(stream.Signature(ch_mod.prog_data_layout(p))).array(p.n_channels),
            "i_prog_done": In(stream.Signature(ch_mod.prog_done_layout())).array(p.n_channels),
            "inflight": Out(8), "ev_lookup": Out(1), "ev_complete": Out(1), "ev_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        wh, wc = p.host_data_bits, p.ch_data_bits
        T = self.slot_bits
        n_ch = p.n_channels
        ps = p.page_size
        raw_chunk = raw_chunk_bytes(p)
        chunks_per_page = ps // raw_chunk

        # ------------------------------------------------------------------ shared state
        inflight = self.inflight
        credits = Signal(range(self.n_slots + 1), init=self.n_slots)
        has_credit = Signal(init=1)      # credits != 0
        side_room = Signal()             # the side FIFO takes an entry
        alloc = Signal(max(T, 1))

        side_layout = fork_side_layout(T)
        # The entries leave the LUT RAM through a register slice: the fork's decisions start
        # from flip-flops, and its consume decision only pops the slice (the FIFO is refilled
        # from the slice's registered ready). An entry waits there at least as long as the
        # translator's 10+ cycles anyway.
        m.submodules.side = side = SyncFIFO(width=side_layout.size, depth=16)
        m.submodules.side_out = side_out = SkidBuffer(side_layout)
        m.d.comb += [
            side_out.i.valid.eq(side.r_rdy),
            side_out.i.payload.eq(side.r_data),
            side.r_en.eq(side_out.i.ready),
        ]

        m.submodules.order = order = SyncFIFO(width=ORDER_LAYOUT.size, depth=p.max_inflight)

        m.submodules.idx = idx = ChunkReader(wh, READ_CHUNK_BYTES)
        m.submodules.off = off = ChunkReader(wh, READ_CHUNK_BYTES)
        wiring.connect(m, idx.o_rd_cmd, wiring.flipped(self.o_idx_cmd))
        wiring.connect(m, wiring.flipped(self.i_idx_data), idx.i_rd_data)
        wiring.connect(m, off.o_rd_cmd, wiring.flipped(self.o_off_cmd))
        wiring.connect(m, wiring.flipped(self.i_off_data), off.i_rd_data)
        # GATHER_POOLED_WEIGHTED: the weights list (one fp32 per index) is read alongside the
        # index list, word for word; the front takes an index word only with its weight word
        m.submodules.wgt = wgt = ChunkReader(wh, READ_CHUNK_BYTES)
        wiring.connect(m, wgt.o_rd_cmd, wiring.flipped(self.o_wgt_cmd))
        wiring.connect(m, wiring.flipped(self.i_wgt_data), wgt.i_rd_data)

        # ------------------------------------------------------------------ front
        cmd = Signal(FETCHED_LAYOUT)
        c = cmd.cmd

        # Offset words pass two more register stages. The word is compared with the command's
        # index count on its way into the first, in two 16-bit halves side by side (the
        # reader's output comes through its skid buffer's read-pointer mux, then half a carry
        # chain); between the first and the second the halves' flags combine and the word is
        # clamped, so the front FSM's next state depends on registered flags, not on a 32-bit
        # compare-and-clamp chain. (The count is the current command's: its offset words are
        # read only once it is fetched.)
        offw_layout = data.StructLayout({"word": WORD_LAYOUT, "hi_gt": 1, "hi_eq": 1, "lo_gt": 1})
        m.submodules.off_word = offw = RegisterStage(offw_layout)
        rd = off.o_word.payload
        m.d.comb += [
            offw.i.valid.eq(off.o_word.valid),
            offw.i.payload.word.eq(rd),
            offw.i.payload.hi_gt.eq(rd.data[16:] > c.count[16:]),
            offw.i.payload.hi_eq.eq(rd.data[16:] == c.count[16:]),
            offw.i.payload.lo_gt.eq(rd.data[:16] > c.count[:16]),
            off.o_word.ready.eq(offw.i.ready),
        ]
        word = offw.o.payload.word
        offq_layout = data.StructLayout({"data": 32, "err": 1, "gt_count": 1, "clamp": 32})
        m.submodules.off_reg = offq = SkidBuffer(offq_layout)
        gt_count = Signal()
        m.d.comb += gt_count.eq(offw.o.payload.hi_gt | (offw.o.payload.hi_eq & offw.o.payload.lo_gt))
        m.d.comb += [
            offq.i.valid.eq(offw.o.valid),
            offq.i.payload.data.eq(word.data),
            offq.i.payload.err.eq(word.err),
            offq.i.payload.gt_count.eq(gt_count),
            offq.i.payload.clamp.eq(Mux(gt_count, c.count, word.data)),
            offw.o.ready.eq(offq.i.ready),
        ]
        off_word = offq.o
        probe_done = Signal()      # pulse from the fork (registered, with the answer)
        probe_status = Signal(2)
        probe_row_bytes = Signal(16)
        probe_elem = Signal(ELEM_BITS)
        row_bytes = Signal(16)
        elem = Signal(ELEM_BITS)
        pooled = Signal()
        weighted = Signal()
        out_row = Signal(16)
        out_bytes = Signal(48)
        mul_n = Signal(48)          # n << 2k at step k of the size multiply (n: rows or bags)
        mul_n3 = Signal(48)         # 3n << 2k
        pos = Signal(32)
        bag = Signal(32)            # bags whose end offset was read
        bag_end_pos = Signal(32)
        prev_off = Signal(32)
        off_bad = Signal()
        off_err = Signal()

        # emission request (combinational), taken by a register slice: the front's decisions
        # (next state, `pos`) depend only on the slice's registered `ready`, and the slice's
        # output meets the translator handshake, the slot credits and the side FIFO room (one
        # cycle later; the translator takes 10+ cycles anyway).
        em_valid = Signal()
        em_side = Signal(side_layout)
        em_needs_slot = Signal()
        fire = Signal()                  # the front hands an emission to the slice
        em_layout = data.StructLayout({"table": 8, "index": 32, "side": side_layout,
                                       "needs_slot": 1})
        m.submodules.em_reg = emq = SkidBuffer(em_layout)
        # The index list as the front sees it: for a weighted command an index word is there
        # only with its weight word (both leave their readers' register slices), and taking it
        # takes both. The front drives `iw_ready` where it takes index words.
        m.submodules.iw_zip = iw = StreamZip(idx.o_word.payload.shape(), wgt.o_word.payload.shape())
        wiring.connect(m, idx.o_word, iw.i_a)
        wiring.connect(m, wgt.o_word, iw.i_b)
        iw_valid = iw.o.valid
        iw_ready = iw.o.ready
        iw_err = Signal()
        m.d.comb += [iw.pair.eq(weighted),
                     iw_err.eq(iw.o.payload.a.err | (weighted & iw.o.payload.b.err))]
        m.d.sync += Assert(~(weighted & iw_valid) | (iw.o.payload.b.last == iw.o.payload.a.last),
                           "engine: weight and index lists out of step")
        m.d.comb += [
            emq.i.valid.eq(em_valid),
            emq.i.payload.table.eq(c.table),
            emq.i.payload.index.eq(iw.o.payload.a.data),
            emq.i.payload.side.eq(em_side),
            emq.i.payload.needs_slot.eq(em_needs_slot),
            fire.eq(emq.i.valid & emq.i.ready),
        ]
        eo = emq.o.payload
        em_go = Signal()
        xfire = Signal()
        side_in = Signal(side_layout)
        m.d.comb += [
            # every emission waits for a slot credit, also those that take none (probes,
            # tokens): the handshake then needs no payload bit, and credits return as the
            # rows already emitted complete, so the wait ends
            em_go.eq(side_room & has_credit),
            self.o_xlat.valid.eq(emq.o.valid & em_go),
            emq.o.ready.eq(self.o_xlat.ready & em_go),
            self.o_xlat.payload.table.eq(eo.table),
            # only a lookup carries an index (probes, tokens and raw chunks ask at index 0)
            self.o_xlat.payload.index.eq(Mux(eo.side.kind == Kind.LOOKUP, eo.index, 0)),
            self.o_xlat.payload.tag.eq(0),
            xfire.eq(self.o_xlat.valid & self.o_xlat.ready),
            side_in.eq(eo.side),
            side_in.slot.eq(alloc),
            side_in.need_desc.eq(eo.side.kind != Kind.PROBE),
            side_in.lookup.eq(eo.side.kind == Kind.LOOKUP),
            side_in.raw.eq(eo.side.kind == Kind.RAW),
            side.w_en.eq(xfire),
            side.w_data.eq(side_in.as_value()),
        ]
        take_slot = Signal()
        m.d.comb += take_slot.eq(xfire & eo.needs_slot)
        with m.If(take_slot):
            m.d.sync += alloc.eq(alloc + 1)
        m.d.sync += credits.eq(credits - take_slot + self.i_free.valid)
        # Registered: whether a slot and a side FIFO place are there this cycle. `has_credit`
        # is the next-cycle credit count's test; `side_room` uses the FIFO level a cycle old,
        # which is enough with at most one push per cycle.
        m.d.sync += [has_credit.eq(credits - take_slot + self.i_free.valid != 0),
                     side_room.eq(side.level < side.depth - 1)]
        m.d.comb += self.ev_lookup.eq(xfire & (eo.side.kind == Kind.LOOKUP))

        # order FIFO push
        push_order = Signal()
        push_has_output = Signal()
        push_status = Signal(8)
        # The push is registered: the front's status decisions then end at flip-flops, not at
        # the FIFO's LUT-RAM write enable. The FIFO never fills (it has a place for each of the
        # max_inflight commands the front admits), so the late push loses nothing.
        order_in = Signal(ORDER_LAYOUT)
        order_push = Signal()
        m.d.sync += [
            order_in.cid.eq(c.cid), order_in.sq_head.eq(cmd.sq_head),
            order_in.status.eq(push_status), order_in.has_output.eq(push_has_output),
            order_in.out_bytes.eq(out_bytes), order_in.dst_addr.eq(c.dst_addr),
            order_push.eq(push_order),
        ]
        m.d.comb += [order.w_data.eq(order_in.as_value()), order.w_en.eq(order_push)]

        # decode
        op = c.opcode
        a_src = c.src_addr[:BUFFER_ALIGN_BITS] != 0
        a_off = c.offsets_addr[:BUFFER_ALIGN_BITS] != 0
        a_dst = c.dst_addr[:BUFFER_ALIGN_BITS] != 0
        known_op = Signal()
        misaligned = Signal()
        a_wgt = c.weights_addr[:BUFFER_ALIGN_BITS] != 0
        m.d.comb += known_op.eq((op == Opcode.NOP) | (op == Opcode.GATHER) |
                                (op == Opcode.GATHER_POOLED) | (op == Opcode.PROGRAM_PAGES) |
                                (op == Opcode.READ_PAGES) | (op == Opcode.GATHER_POOLED_WEIGHTED))
        with m.Switch(op):
            with m.Case(Opcode.GATHER):
                m.d.comb += misaligned.eq(a_src | a_dst)
            with m.Case(Opcode.GATHER_POOLED):
                m.d.comb += misaligned.eq(a_src | a_off | a_dst)
            with m.Case(Opcode.GATHER_POOLED_WEIGHTED):
                m.d.comb += misaligned.eq(a_src | a_off | a_wgt | a_dst)
            with m.Case(Opcode.PROGRAM_PAGES):
                m.d.comb += misaligned.eq(a_src)
            with m.Case(Opcode.READ_PAGES):
                m.d.comb += misaligned.eq(a_dst)
        page_bytes_total = Signal(48)
        m.d.comb += page_bytes_total.eq(c.count * ps)
        lba_end = Signal(33)
        m.d.comb += lba_end.eq(c.lba + c.count)
        # The checks DECODE branches on, registered in CHECK (compares in front of the FSM's
        # next state and the completion push were the engine's critical path).
        chk = Signal(data.StructLayout({"known_op": 1, "misaligned": 1, "pages_overflow": 1,
                                        "lba_bad": 1, "count_zero": 1, "result_overflow": 1,
                                        "table_off": 1}))

        # PROGRAM_PAGES: the page programmer moves the pages; the front hands it the command
        # once it is the only one in flight and completes with its answer
        m.submodules.programmer = prog = PageProgrammer(p)
        wiring.connect(m, prog.o_pg_cmd, wiring.flipped(self.o_pg_cmd))
        wiring.connect(m, wiring.flipped(self.i_pg_data), prog.i_pg_data)
        for i in range(n_ch):
            wiring.connect(m, prog.o_prog[i], wiring.flipped(self.o_prog[i]))
            wiring.connect(m, prog.o_prog_data[i], wiring.flipped(self.o_prog_data[i]))
            wiring.connect(m, wiring.flipped(self.i_prog_done[i]), prog.i_prog_done[i])
        m.d.comb += [prog.i_job.payload.src_addr.eq(c.src_addr), prog.i_job.payload.lba.eq(c.lba),
                     prog.i_job.payload.count.eq(c.count)]

        # raw (READ_PAGES) chunk position
        raw_k = Signal(32)
        raw_j = Signal(range(chunks_per_page + 1))

        def finish(m, status):
            m.d.comb += [push_order.eq(1), push_status.eq(status), push_has_output.eq(0)]
            m.next = "IDLE"

        # Where `pos` stands. The index words' own `last` flag ends the list (G_EMIT, P_POST:
        # `idx_done`); the words skipped before the first bag are counted down with a registered
        # "done" flag (P_PRE), so the index stream's ready comes from registers only. A bag's
        # last word (P_LOOK) is a plain equality between registers (`bag_end_m1`): no adder in
        # front of a compare, and nothing depends on whether `pos` moves in this cycle (the
        # earlier registered "next-cycle" flags put the emission handshake in front of them).
        pos_inc = Signal()
        count_m1 = Signal(32)            # count - 1
        bag_end_m1 = Signal(32)          # bag_end_pos - 1
        pos_at_bag_last = Signal()       # pos + 1 == bag_end_pos
        m.d.comb += pos_at_bag_last.eq(pos == bag_end_m1)
        with m.If(pos_inc):
            m.d.sync += pos.eq(pos + 1)
        pre_left = Signal(32)            # P_PRE: words to skip (bag_end_pos - pos)
        pre_done = Signal()              # pre_left == 0
        idx_done = Signal()              # the index list's last word was taken (pos == count)
        idx_pop = iw_valid & iw_ready
        with m.If(idx.start):
            m.d.sync += idx_done.eq(chk.count_zero)
        with m.Elif(idx_pop & iw.o.payload.a.last):
            m.d.sync += idx_done.eq(1)
        m.d.sync += [
            Assert(~iw_valid | (iw.o.payload.a.last == (pos == count_m1)),
                   "engine: index word's last flag"),
        ]

        def emit_lookup(*, pooled, bag_end, cmd_end):
            """Offer the index list's next word to the translator as a lookup (at `pos`)."""
            m.d.comb += [
                em_valid.eq(iw_valid),
                em_needs_slot.eq(1),
                em_side.kind.eq(Kind.LOOKUP), em_side.pos.eq(pos), em_side.pooled.eq(pooled),
                em_side.bag_end.eq(bag_end), em_side.cmd_end.eq(cmd_end),
                em_side.err.eq(iw_err),
                em_side.weighted.eq(weighted), em_side.weight.eq(iw.o.payload.b.data),
                iw_ready.eq(emq.i.ready), pos_inc.eq(fire),
            ]

        def skip_indices_until(done, next_state):
            """Read and drop index words (no lookup) until `done` (a register)."""
            with m.If(done):
                m.next = next_state
            with m.Else():
                m.d.comb += [iw_ready.eq(1), pos_inc.eq(iw_valid)]

        # registered from `inflight` a cycle old: an accept is at least three cycles back when the
        # front is in IDLE again, and a completion in the last cycle only delays the next accept
        inflight_room = Signal()
        m.d.sync += inflight_room.eq(inflight < p.max_inflight)

        # the readers take these in the cycle after their start pulse (the command holds)
        m.d.comb += [idx.addr.eq(c.src_addr), idx.words.eq(c.count),
                     wgt.addr.eq(c.weights_addr), wgt.words.eq(c.count),
                     wgt.start.eq(idx.start & weighted),
                     off.addr.eq(c.offsets_addr), off.words.eq(c.n_bags + 1)]

        # bag == n_bags, registered: `bag` moves in P_BAG only, and P_BAG_END comes between it
        # and the states that read this (P_TOKEN, P_LOOK)
        is_last_bag = Signal()
        m.d.sync += is_last_bag.eq(bag == c.n_bags)

        with m.FSM(name="front") as front_fsm:
            with m.State("IDLE"):
                with m.If(self.i_cmd.valid & inflight_room & order.w_rdy):
                    m.d.comb += self.i_cmd.ready.eq(1)
                    m.d.sync += cmd.eq(self.i_cmd.payload)
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += [chk.known_op.eq(known_op), chk.misaligned.eq(misaligned),
                             chk.pages_overflow.eq(page_bytes_total > c.dst_bytes),
                             chk.lba_bad.eq(lba_end > p.total_pages),
                             chk.count_zero.eq(c.count == 0)]
                m.next = "DECODE"
            with m.State("DECODE"):
                m.d.sync += [pooled.eq((op == Opcode.GATHER_POOLED) |
                                       (op == Opcode.GATHER_POOLED_WEIGHTED)),
                             weighted.eq(op == Opcode.GATHER_POOLED_WEIGHTED), pos.eq(0), bag.eq(0),
                             count_m1.eq(c.count - 1),
                             off_bad.eq(0), off_err.eq(0),
                             raw_k.eq(0), raw_j.eq(0)]
                with m.If(~chk.known_op):
                    finish(m, Status.BAD_OPCODE)
                with m.Elif(op == Opcode.NOP):
                    finish(m, Status.OK)
                with m.Elif(chk.misaligned):
                    finish(m, Status.BAD_ADDRESS)
                with m.Elif(op == Opcode.READ_PAGES):
                    m.d.sync += out_bytes.eq(page_bytes_total)
                    with m.If(chk.pages_overflow):
                        finish(m, Status.RESULT_OVERFLOW)
                    with m.Elif(chk.lba_bad):
                        finish(m, Status.BAD_LBA)
                    with m.Elif(chk.count_zero):
                        finish(m, Status.OK)
                    with m.Else():
                        m.next = "RAW_START"
                with m.Elif(op == Opcode.PROGRAM_PAGES):
                    with m.If(chk.lba_bad):
                        finish(m, Status.BAD_LBA)
                    with m.Elif(chk.count_zero):
                        finish(m, Status.OK)
                    with m.Else():
                        m.next = "PG_DRAIN"
                with m.Else():
                    m.next = "PROBE"

            # ---------------- table probe
            with m.State("PROBE"):
                m.d.comb += [em_valid.eq(1), em_side.kind.eq(Kind.PROBE)]
                with m.If(fire):
                    m.next = "PROBE_WAIT"
            with m.State("PROBE_WAIT"):
                with m.If(probe_done):
                    m.d.sync += [row_bytes.eq(probe_row_bytes), elem.eq(probe_elem),
                                 chk.table_off.eq(
                                     (probe_status == xlat_mod.TranslateStatus.DISABLED) |
                                     (probe_row_bytes == 0) | (probe_row_bytes > p.max_row_bytes) |
                                     (c.table >= p.max_tables))]
                    m.next = "PROBE_CHECK"
            with m.State("PROBE_CHECK"):
                with m.If(chk.table_off):
                    finish(m, Status.TABLE_DISABLED)
                with m.Else():
                    m.next = "SIZE"
            with m.State("SIZE"):
                # the result's size is out_row * n: both operands (and 3n) registered first
                with m.Switch(elem):
                    with m.Case(ElemType.FP16):
                        m.d.sync += out_row.eq(Mux(pooled, row_bytes << 1, row_bytes))
                    with m.Case(ElemType.INT8):
                        m.d.sync += out_row.eq(Mux(pooled, row_bytes << 2, row_bytes))
                    with m.Case(ElemType.INT8_ROWWISE):
                        m.d.sync += out_row.eq(Mux(pooled, (row_bytes - ROWWISE_HEADER_BYTES) << 2,
                                                   row_bytes))
                    with m.Default():
                        m.d.sync += out_row.eq(row_bytes)
                n = Mux(pooled, c.n_bags, c.count)
                m.d.sync += [mul_n.eq(n), mul_n3.eq(n + (n << 1)), out_bytes.eq(0)]
                m.next = "SIZE_MUL"
            with m.State("SIZE_MUL"):
                # out_bytes = out_row * n, two bits of out_row a cycle (radix 4: add 0, n,
                # 2n or 3n, shifted), until the rest of out_row is zero: one 48-bit addition
                # behind a 4:1 select a cycle. (A DSP multiply between registers needed ~10.8
                # ns routed on ECP5: the slowest cell of the board at 100 MHz.)
                with m.Switch(out_row[:2]):
                    with m.Case(1):
                        m.d.sync += out_bytes.eq(out_bytes + mul_n)
                    with m.Case(2):
                        m.d.sync += out_bytes.eq(out_bytes + (mul_n << 1))
                    with m.Case(3):
                        m.d.sync += out_bytes.eq(out_bytes + mul_n3)
                m.d.sync += [out_row.eq(out_row >> 2), mul_n.eq(mul_n << 2), mul_n3.eq(mul_n3 << 2)]
                with m.If(out_row[2:] == 0):
                    m.next = "SIZE_CMP"
            with m.State("SIZE_CMP"):
                m.d.sync += chk.result_overflow.eq(out_bytes > c.dst_bytes)
                m.next = "SIZE_CHECK"
            with m.State("SIZE_CHECK"):
                with m.If(chk.result_overflow):
                    finish(m, Status.RESULT_OVERFLOW)
                with m.Elif(pooled):
                    m.d.comb += off.start.eq(1)
                    m.next = "OFF_CHECK"
                with m.Elif(chk.count_zero):
                    finish(m, Status.OK)
                with m.Else():
                    m.next = "EMIT_START"

            # ---------------- offsets pass 1: validate
            with m.State("OFF_CHECK"):
                m.d.comb += off_word.ready.eq(1)
                with m.If(off_word.valid):
                    w = off_word.payload.data
                    m.d.sync += [prev_off.eq(w), bag.eq(bag + 1),
                                 off_err.eq(off_err | off_word.payload.err)]
                    with m.If((bag != 0) & (w < prev_off)):
                        m.d.sync += off_bad.eq(1)
                    with m.If(bag == c.n_bags):
                        with m.If(off_word.payload.gt_count):
                            m.d.sync += off_bad.eq(1)
                        m.next = "OFF_DONE"
            with m.State("OFF_DONE"):
                m.d.sync += bag.eq(0)
                with m.If(off_err):
                    finish(m, Status.BUS_ERROR)
                with m.Elif(off_bad):
                    finish(m, Status.BAD_OFFSETS)
                with m.Elif(c.n_bags == 0):
                    finish(m, Status.OK)
                with m.Else():
                    m.next = "EMIT_START"

            # ---------------- lookups
            with m.State("EMIT_START"):
                m.d.comb += [push_order.eq(1), push_status.eq(Status.OK), push_has_output.eq(1),
                             idx.start.eq(1)]
                with m.If(pooled):
                    m.d.comb += off.start.eq(1)
                    m.next = "P_FIRST"
                with m.Else():
                    m.next = "G_EMIT"
            with m.State("G_EMIT"):
                last = iw.o.payload.a.last
                emit_lookup(pooled=0, bag_end=0, cmd_end=last)
                with m.If(fire & last):
                    m.next = "IDLE"
            with m.State("P_FIRST"):
                m.d.comb += off_word.ready.eq(1)
                with m.If(off_word.valid):
                    m.d.sync += [bag_end_pos.eq(off_word.payload.clamp),
                                 pre_left.eq(off_word.payload.clamp),    # pos is 0
                                 pre_done.eq(off_word.payload.clamp == 0)]
                    m.next = "P_PRE"
            with m.State("P_PRE"):
                # indices before offsets[0] belong to no bag
                skip_indices_until(pre_done, "P_BAG")
                with m.If(idx_pop):
                    m.d.sync += [pre_left.eq(pre_left - 1), pre_done.eq(pre_left == 1)]
            with m.State("P_BAG"):
                m.d.comb += off_word.ready.eq(1)
                with m.If(off_word.valid):
                    m.d.sync += [bag_end_pos.eq(off_word.payload.clamp),
                                 bag_end_m1.eq(off_word.payload.clamp - 1), bag.eq(bag + 1)]
                    m.next = "P_BAG_END"
            with m.State("P_BAG_END"):
                # an end at or before pos (a list changed since pass 1) is an empty bag, so the
                # command still ends (never hangs); a state of its own, so the compare starts
                # from registers
                with m.If(bag_end_pos <= pos):
                    m.next = "P_TOKEN"
                with m.Else():
                    m.next = "P_LOOK"
            with m.State("P_TOKEN"):
                last_bag = is_last_bag
                m.d.comb += [em_valid.eq(1), em_side.kind.eq(Kind.TOKEN),
                             em_side.pooled.eq(1), em_side.cmd_end.eq(last_bag)]
                with m.If(fire):
                    with m.If(last_bag):
                        m.next = "P_POST"
                    with m.Else():
                        m.next = "P_BAG"
            with m.State("P_LOOK"):
                last_bag = is_last_bag
                bag_last = pos_at_bag_last
                emit_lookup(pooled=1, bag_end=bag_last, cmd_end=bag_last & last_bag)
                with m.If(fire):
                    with m.If(bag_last):
                        with m.If(last_bag):
                            m.next = "P_POST"
                        with m.Else():
                            m.next = "P_BAG"
            with m.State("P_POST"):
                # indices past the last bag's end are read and dropped
                skip_indices_until(idx_done, "IDLE")

            # ---------------- READ_PAGES: each page as rows of raw_chunk bytes
            with m.State("RAW_START"):
                m.d.comb += [push_order.eq(1), push_status.eq(Status.OK), push_has_output.eq(1)]
                m.next = "RAW_EMIT"
            with m.State("RAW_EMIT"):
                last = (raw_k == count_m1) & (raw_j == chunks_per_page - 1)
                m.d.comb += [
                    em_valid.eq(1), em_needs_slot.eq(1),
                    em_side.kind.eq(Kind.RAW), em_side.pos.eq(c.lba + raw_k),
                    em_side.offset.eq(raw_j * raw_chunk), em_side.cmd_end.eq(last),
                ]
                with m.If(fire):
                    with m.If(raw_j == chunks_per_page - 1):
                        m.d.sync += [raw_j.eq(0), raw_k.eq(raw_k + 1)]
                    with m.Else():
                        m.d.sync += raw_j.eq(raw_j + 1)
                    with m.If(last):
                        m.next = "IDLE"

            # ---------------- PROGRAM_PAGES
            with m.State("PG_DRAIN"):
                # the job is handed over in the cycle the command is the only one in flight
                m.d.comb += prog.i_job.valid.eq(inflight == 1)
                with m.If(prog.i_job.valid & prog.i_job.ready):
                    m.next = "PG_WAIT"
            with m.State("PG_WAIT"):
                m.d.comb += prog.o_done.ready.eq(1)
                with m.If(prog.o_done.valid):
                    finish(m, Mux(prog.o_done.payload.err, Status.BUS_ERROR, Status.OK))

        m.d.sync += [
            Assert(~front_fsm.ongoing("P_PRE") | (pre_done == (pos == bag_end_pos)),
                   "engine: pre_done stale"),
            Assert(~front_fsm.ongoing("P_POST") | (idx_done == (pos == c.count)),
                   "engine: idx_done stale"),
            Assert(~(front_fsm.ongoing("P_TOKEN") | front_fsm.ongoing("P_LOOK")) |
                   (is_last_bag == (bag == c.n_bags)), "engine: is_last_bag stale"),
        ]

        # ------------------------------------------------------------------ fork
        m.submodules.fork = fork = LookupFork(p, self.n_slots)
        wiring.connect(m, side_out.o, fork.i_side)
        wiring.connect(m, wiring.flipped(self.i_xlat), fork.i_xlat)
        wiring.connect(m, fork.o_desc, wiring.flipped(self.o_desc))
        wiring.connect(m, fork.o_ftl, wiring.flipped(self.o_ftl))
        m.d.comb += [probe_done.eq(fork.probe_done), probe_status.eq(fork.probe_status),
                     probe_row_bytes.eq(fork.probe_row_bytes), probe_elem.eq(fork.probe_elem)]

        # ------------------------------------------------------------------ result stage
        m.submodules.result = res = ResultWriter(p, RESULT_CHUNK_BYTES)
        m.d.comb += [
            res.i_order.valid.eq(order.r_rdy), res.i_order.payload.eq(order.r_data),
            order.r_en.eq(res.i_order.ready),
            self.ev_complete.eq(res.ev_complete), self.ev_error.eq(res.ev_error),
        ]
        wiring.connect(m, fork.o_stats, res.i_stats)
        wiring.connect(m, wiring.flipped(self.i_out), res.i_out)
        wiring.connect(m, res.o_res_cmd, wiring.flipped(self.o_res_cmd))
        wiring.connect(m, res.o_res_data, wiring.flipped(self.o_res_data))
        wiring.connect(m, wiring.flipped(self.i_res_done), res.i_res_done)
        wiring.connect(m, res.o_cpl, wiring.flipped(self.o_cpl))

        # the accept is counted a cycle late (the front's IDLE decision stays out of the adder)
        accepted = Signal()
        m.d.sync += [accepted.eq(self.i_cmd.valid & self.i_cmd.ready),
                     inflight.eq(inflight + accepted - self.ev_complete)]
        return m
