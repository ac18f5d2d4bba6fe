"""LookupFork: what the translator answered, joined with what the request was, sent on.

The command engine's front emits each translator request and, in order, a side entry (``Kind``
and the request's context: slot, position in the command, bag and command ends) into a side
FIFO. The fork joins each translator response with its side entry and sends:

- a lookup: a merger descriptor (``o_desc``, bad when the index did not translate) and, when it
  translated, an FTL request (``o_ftl``); its bad-index and bus-error facts go into the
  command's statistics;
- an empty-bag token: a descriptor only;
- a READ_PAGES chunk: an FTL request for ``raw_chunk`` bytes of page ``pos`` and a descriptor;
- a table probe: nothing downstream; the answer goes back to the front (``probe_*``, registered,
  with a one-cycle ``probe_done`` pulse).

At each command's last descriptor the statistics (``n_bad``, first bad position, worst status,
bus error) are pushed into a FIFO of ``max_inflight`` entries (``o_stats``), read in command order
by the result stage. The engine admits at most ``max_inflight`` commands, so the push never
finds the FIFO full. Descriptor and FTL request leave through register slices, so the
merger's and the FTL's ready do not reach the join decision.
"""
from __future__ import annotations

from amaranth import Module, Signal, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.hdl import Assert
from amaranth.lib.wiring import In, Out

from ..lib.skid_buffer import SkidBuffer
from ..regmap import ELEM_BITS, NO_BAD_POSITION, Params, Status
from .ftl import request_layout as ftl_request_layout
from .merger import desc_layout
from .result_writer import STATS_LAYOUT
from .translator import TranslateStatus, response_layout as xlat_response_layout

__all__ = ["LookupFork", "Kind", "side_layout", "raw_chunk_bytes", "XLAT_TAG_WIDTH"]

XLAT_TAG_WIDTH = 1          # the engine keeps what each request is in its side FIFO


def raw_chunk_bytes(params: Params) -> int:
    """READ_PAGES moves a page as rows of this size (largest power of two <= max_row_bytes)."""
    return 1 << (params.max_row_bytes.bit_length() - 1)


class Kind:
    """What a translator request was (the side entry's ``kind``)."""
    LOOKUP = 0
    PROBE = 1
    TOKEN = 2
    RAW = 3


def side_layout(slot_bits: int) -> data.StructLayout:
    """A side FIFO entry: what one translator request was."""
    return data.StructLayout({
        "kind": 2, "slot": max(slot_bits, 1), "pos": 32, "offset": 16, "pooled": 1,
        "bag_end": 1, "cmd_end": 1, "err": 1,
        "weighted": 1, "weight": 32,     # GATHER_POOLED_WEIGHTED: the lookup's fp32 weight
        # the kind decoded once more for the fork's decisions (`kind` steers the payloads)
        "need_desc": 1, "lookup": 1, "raw": 1,
    })


class LookupFork(wiring.Component):
    """See the module docstring. ``i_side`` (side entries), ``i_xlat`` (translator ``o_resp``)
    -> ``o_desc`` (merger ``i_desc``), ``o_ftl`` (FTL ``i_req``, tag = ROB slot), ``o_stats``
    (result stage), ``probe_done``/``probe_status``/``probe_row_bytes``/``probe_elem`` (front)."""

    def __init__(self, params: Params, n_slots: int):
        try:
            Params.require(params)
            if n_slots < 2 or n_slots & (n_slots - 1) or n_slots > 256:
                raise ValueError(f"n_slots {n_slots} must be a power of two 2..256")
        except (TypeError, ValueError):
            self._MustUse__silence = True   # a rejected object is not an unused elaboratable
            raise
        self.params = params
        self.n_slots = n_slots
        self.slot_bits = T = n_slots.bit_length() - 1
        super().__init__({
            "i_side": In(stream.Signature(side_layout(T))),
            "i_xlat": In(stream.Signature(xlat_response_layout(XLAT_TAG_WIDTH))),
            "o_desc": Out(stream.Signature(desc_layout(n_slots))),
            "o_ftl": Out(stream.Signature(ftl_request_layout(T))),
            "o_stats": Out(stream.Signature(STATS_LAYOUT)),
            "probe_done": Out(1), "probe_status": Out(2), "probe_row_bytes": Out(16),
            "probe_elem": Out(ELEM_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        raw_chunk = raw_chunk_bytes(p)
        m.submodules.stats = stats = SyncFIFO(width=STATS_LAYOUT.size, depth=p.max_inflight)
        m.d.comb += [
            self.o_stats.valid.eq(stats.r_rdy), self.o_stats.payload.eq(stats.r_data),
            stats.r_en.eq(self.o_stats.ready),
        ]
        sd = Signal(side_layout(self.slot_bits))
        m.d.comb += sd.eq(self.i_side.payload)
        rsp = self.i_xlat.payload
        # The side FIFO's entry is normally there long before its response (the translator
        # takes 10+ cycles); waiting for it keeps any latency correct.
        valid = self.i_xlat.valid & self.i_side.valid
        desc_sent = Signal()
        ftl_sent = Signal()
        n_bad = Signal(32)
        first_bad = Signal(32, init=NO_BAD_POSITION)
        worst = Signal(8)
        cmd_err = Signal()
        is_bad = Signal()
        m.d.comb += is_bad.eq(sd.lookup & (rsp.status != 0))

        need_desc = Signal()
        need_ftl = Signal()
        m.d.comb += [
            need_desc.eq(sd.need_desc),
            need_ftl.eq((sd.lookup & (rsp.status == 0)) | sd.raw),
        ]
        # The descriptor and the FTL request leave through register slices: the merger's and
        # the FTL's ready (their FIFO states) do not reach the fork's consume decision, which
        # sees only the slices' registered ready.
        m.submodules.desc_reg = desc_reg = SkidBuffer(self.o_desc.payload.shape())
        m.submodules.ftl_reg = ftl_reg = SkidBuffer(self.o_ftl.payload.shape())
        wiring.connect(m, desc_reg.o, wiring.flipped(self.o_desc))
        wiring.connect(m, ftl_reg.o, wiring.flipped(self.o_ftl))
        o_desc, o_ftl = desc_reg.i, ftl_reg.i
        d = o_desc.payload
        m.d.comb += [
            d.slot.eq(sd.slot),
            d.row_bytes.eq(Mux(sd.kind == Kind.RAW, raw_chunk, rsp.row_bytes)),
            d.elem.eq(rsp.elem),
            d.pooled.eq(sd.pooled),
            d.weighted.eq(sd.weighted), d.weight.eq(sd.weight),
            d.bad.eq(is_bad),
            d.bag_end.eq(sd.bag_end),
            d.empty_bag.eq(sd.kind == Kind.TOKEN),
            d.cmd_end.eq(sd.cmd_end),
            o_desc.valid.eq(valid & need_desc & ~desc_sent),
        ]
        f = o_ftl.payload
        with m.If(sd.kind == Kind.RAW):
            m.d.comb += [f.lba.eq(sd.pos), f.offset.eq(sd.offset), f.row_bytes.eq(raw_chunk)]
        with m.Else():
            m.d.comb += [f.lba.eq(rsp.lba), f.offset.eq(rsp.offset), f.row_bytes.eq(rsp.row_bytes)]
        m.d.comb += [f.tag.eq(sd.slot), o_ftl.valid.eq(valid & need_ftl & ~ftl_sent)]

        desc_ok = Signal()
        ftl_ok = Signal()
        m.d.comb += [
            desc_ok.eq(~need_desc | desc_sent | o_desc.ready),
            ftl_ok.eq(~need_ftl | ftl_sent | o_ftl.ready),
        ]
        consume = Signal()
        m.d.comb += consume.eq(valid & desc_ok & ftl_ok)
        with m.If(consume):
            m.d.sync += [desc_sent.eq(0), ftl_sent.eq(0)]
        with m.Else():
            with m.If(o_desc.valid & o_desc.ready):
                m.d.sync += desc_sent.eq(1)
            with m.If(o_ftl.valid & o_ftl.ready):
                m.d.sync += ftl_sent.eq(1)
        m.d.comb += [self.i_xlat.ready.eq(consume), self.i_side.ready.eq(consume)]

        # registered: the front's PROBE_WAIT sees the probe's answer a cycle after the fork
        # takes it (the consume decision stays out of the front's next state)
        m.d.sync += [self.probe_status.eq(rsp.status), self.probe_row_bytes.eq(rsp.row_bytes),
                     self.probe_elem.eq(rsp.elem), self.probe_done.eq(0)]
        with m.If(consume & ~sd.need_desc):
            m.d.sync += self.probe_done.eq(1)

        # per-command stats, pushed at the command's last descriptor. What each taken
        # descriptor contributes is registered first (the consume decision fanned out into all
        # the counters' clock enables).
        s_v = Signal()
        s_bad = Signal()
        s_bad_lba = Signal()
        s_pos = Signal(32)
        s_err = Signal()
        s_end = Signal()
        m.d.sync += [s_v.eq(consume & need_desc), s_bad.eq(is_bad),
                     s_bad_lba.eq(rsp.status == TranslateStatus.BAD_LBA),
                     s_pos.eq(sd.pos), s_err.eq(sd.err & sd.lookup), s_end.eq(sd.cmd_end)]
        # s_bad reaches about 70 loads: at most one LUT or the increment's carry chain behind it
        # (the n_bad == 0 test is a register of its own; on the board s_bad -> a 5 ns wire ->
        # four LUT levels into the stats was a critical path, 87.2 MHz).
        none_bad = Signal(init=1)    # == (n_bad == 0)
        nb = Signal(32)
        fb = Signal(32)
        ws = Signal(8)
        ce = Signal()
        m.d.comb += [nb.eq(n_bad + s_bad), fb.eq(Mux(s_bad & none_bad, s_pos, first_bad)),
                     ws.eq(worst), ce.eq(cmd_err | s_err)]
        with m.If(s_bad):
            with m.If(s_bad_lba):
                with m.If(worst != Status.BAD_INDEX):
                    m.d.comb += ws.eq(Status.BAD_LBA)
            with m.Else():
                m.d.comb += ws.eq(Status.BAD_INDEX)
        # The push is registered (the fork's consume decision into the FIFO's LUT RAM write
        # enable was the board's critical path, 13.7 ns); the result stage waits for the entry.
        stats_in = Signal(STATS_LAYOUT)
        stats_push = Signal()
        m.d.sync += [stats_in.n_bad.eq(nb), stats_in.first_bad.eq(fb), stats_in.status.eq(ws),
                     stats_in.err.eq(ce), stats_push.eq(s_v & s_end)]
        m.d.comb += [stats.w_data.eq(stats_in.as_value()), stats.w_en.eq(stats_push)]
        m.d.sync += Assert(~stats_push | stats.w_rdy, "fork: stats FIFO full (more commands in flight than max_inflight)")
        with m.If(s_v):
            with m.If(s_end):
                m.d.sync += [n_bad.eq(0), first_bad.eq(NO_BAD_POSITION), worst.eq(0), cmd_err.eq(0),
                             none_bad.eq(1)]
            with m.Else():
                m.d.sync += [n_bad.eq(nb), first_bad.eq(fb), worst.eq(ws), cmd_err.eq(ce),
                             none_bad.eq(none_bad & ~s_bad)]
        m.d.sync += Assert(none_bad == (n_bad == 0), "engine: none_bad out of step")
        return m
