"""EV Translator: embedding index -> (LBA, byte offset in the page) through per-table extents.

Interface (for the integrator)
------------------------------
``ExtentTranslator(params: Params, tag_width: int)``, a ``wiring.Component``:

- ``cfg: In(TableConfigSignature())`` -- the MMIO manager's staged table registers (the manager
  drives every member; ``Out`` in :class:`TableConfigSignature` = driven by the manager):

  ===================  =====  ==============================================================
  member               width  meaning
  ===================  =====  ==============================================================
  ``table``              8    TBL_SEL.table: slot the commits write
  ``extent``             8    TBL_SEL.extent: extent slot ``commit_extent`` writes
  ``row_bytes``         16    TBL_CFG.row_bytes
  ``elem``               3    TBL_CFG.elem (ElemType)
  ``enable``             1    TBL_CFG.enable
  ``rows_per_page``     16    TBL_ROWS_PER_PAGE.rows
  ``magic``             33    Cat(TBL_DIV_MAGIC.magic, TBL_DIV_SHIFT.magic_hi)
  ``shift``              6    TBL_DIV_SHIFT.shift
  ``ext_first``         32    EXT_FIRST
  ``ext_rows``          32    EXT_ROWS (0 = unused extent)
  ``ext_lba``           32    EXT_LBA
  ``commit_table``       1    TBL_COMMIT.table pulse: write the table word of slot ``table``
  ``commit_extent``      1    TBL_COMMIT.extent pulse: write extent ``extent`` of slot ``table``
  ===================  =====  ==============================================================

  A commit to ``table >= max_tables`` or ``extent >= max_extents`` is ignored. A lookup
  accepted on any clock edge after the commit's edge sees it; reconfigure a table only while no
  lookup for it is in flight. After reset every table is disabled and every extent unused.

- ``i_req: In(stream.Signature(request_layout(tag_width)))``:
  ``{table: 8, index: 32, tag: tag_width}``.
- ``o_resp: Out(stream.Signature(response_layout(tag_width)))``:
  ``{lba: 32, offset: 16, row_bytes: 16, elem: 3, status: 2, tag: tag_width}``.
  Responses come out in request order, one per request, ``tag`` echoed.

``status`` (:class:`TranslateStatus`): 0 OK; 1 NO_EXTENT (index in no extent: ``lba = offset =
0``, ``row_bytes``/``elem`` of the table); 2 DISABLED (slot >= max_tables: everything 0; slot
disabled: ``lba = offset = 0``, ``row_bytes``/``elem`` of the table); 3 BAD_LBA (the page is
outside the flash, ``lba >= n_channels * pages_per_channel``; ``lba`` and ``offset`` as
computed, ``lba`` truncated to 32 bits).

Semantics (:func:`translate_model` is the executable definition): the first (lowest-numbered)
extent ``e`` with ``first_e <= index < first_e + rows_e`` (computed without 32-bit overflow) wins;
``d = index - first_e``, ``q = (d * magic) >> shift``, ``lba = start_lba_e + q``,
``offset = ((d - q * rows_per_page) * row_bytes) mod 2**16``. With the host's constants
(``regmap.div_magic(rows_per_page)``) ``q = d // rows_per_page`` exactly.

Timing: fully pipelined (request register, table read, table word register, range compare, first-hit select,
partial products, their middle sum, product, quotient shift, LBA, q * rows_per_page, remainder, offset, response),
one lookup per cycle when ``o_resp`` is always ready: a lookup accepted on clock edge t can be
taken from ``o_resp`` on edge t + :data:`LATENCY` (= 16) at the earliest, so N back-to-back
lookups take N - 1 + 16 edges. The pipeline never stalls: it writes into an output FIFO of
:data:`OUTPUT_FIFO_DEPTH` entries, and ``i_req.ready`` (a register) is low while that many
lookups are accepted and not yet taken from ``o_resp``. So it is correct under any back-pressure,
and back-pressure on ``o_resp`` reaches no pipeline register.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from amaranth import Module, Signal, Cat, Const, Mux, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..regmap import ELEM_BITS, Params, require_tag_width

__all__ = [
    "TableConfigSignature", "ExtentTranslator", "TranslateStatus", "request_layout",
    "response_layout", "TableEntry", "translate_model", "LATENCY", "OUTPUT_FIFO_DEPTH",
]

LATENCY = 16
# Entries of the output FIFO: the credit limit on lookups in flight. It covers the round trip
# (LATENCY + 1 cycles for the registered credit check), so one lookup per cycle goes through.
OUTPUT_FIFO_DEPTH = 17


class TranslateStatus(enum.IntEnum):
    """Per-lookup status on ``o_resp.status`` (2 bits)."""
    OK = 0
    NO_EXTENT = 1
    DISABLED = 2
    BAD_LBA = 3


class TableConfigSignature(wiring.Signature):
    """Staged table registers and commit pulses, from the MMIO manager's side (all ``Out``)."""

    def __init__(self):
        super().__init__({
            "table": Out(8), "extent": Out(8),
            "row_bytes": Out(16), "elem": Out(ELEM_BITS), "enable": Out(1), "rows_per_page": Out(16),
            "magic": Out(33), "shift": Out(6),
            "ext_first": Out(32), "ext_rows": Out(32), "ext_lba": Out(32),
            "commit_table": Out(1), "commit_extent": Out(1),
        })


def request_layout(tag_width: int) -> data.StructLayout:
    return data.StructLayout({"table": 8, "index": 32, "tag": tag_width})


def response_layout(tag_width: int) -> data.StructLayout:
    return data.StructLayout({"lba": 32, "offset": 16, "row_bytes": 16, "elem": ELEM_BITS, "status": 2,
                              "tag": tag_width})


# One table-memory word holds the table's configuration and all its extents, each in a 96-bit
# slot, so a single read feeds the parallel range compare and a commit writes one slot through
# the write port's 96-bit granularity.
_SLOT = 96
_CFG_LAYOUT = data.StructLayout({
    "row_bytes": 16, "elem": ELEM_BITS, "enable": 1, "rows_per_page": 16, "magic": 33, "shift": 6,
})
_EXT_LAYOUT = data.StructLayout({"first": 32, "rows": 32, "lba": 32})
assert _CFG_LAYOUT.size <= _SLOT and _EXT_LAYOUT.size == _SLOT


# ----------------------------------------------------------------------------------------------
# Golden model (plain Python; the host's functional model implements the same rules)

@dataclass
class TableEntry:
    enable: bool = False
    row_bytes: int = 0
    elem: int = 0
    rows_per_page: int = 0
    magic: int = 0
    shift: int = 0
    # (first_index, n_rows, start_lba) per extent slot; n_rows == 0 is an unused slot
    extents: list = field(default_factory=list)


def translate_model(params: Params, tables, table: int, index: int):
    """(lba, offset, row_bytes, elem, status) exactly as the hardware computes them.

    ``tables``: sequence (or dict) of :class:`TableEntry` indexed by slot; missing = reset state.
    """
    if not 0 <= table < params.max_tables:
        return 0, 0, 0, 0, TranslateStatus.DISABLED
    t = tables.get(table) if isinstance(tables, dict) else (tables[table] if table < len(tables) else None)
    if t is None:
        t = TableEntry()
    if not t.enable:
        return 0, 0, t.row_bytes, t.elem, TranslateStatus.DISABLED
    for first, rows, start in list(t.extents)[:params.max_extents]:
        if first <= index and index - first < rows:
            break
    else:
        return 0, 0, t.row_bytes, t.elem, TranslateStatus.NO_EXTENT
    d = index - first
    q = (d * t.magic) >> t.shift
    lba = start + q
    rem = (d - q * t.rows_per_page) & 0xFFFF
    offset = (rem * t.row_bytes) & 0xFFFF
    status = TranslateStatus.BAD_LBA if lba >= params.total_pages else TranslateStatus.OK
    return lba & 0xFFFF_FFFF, offset, t.row_bytes, t.elem, status


# ----------------------------------------------------------------------------------------------

class ExtentTranslator(wiring.Component):
    """Index -> (LBA, offset) translation with an on-chip table memory. See the module docstring."""

    def __init__(self, params: Params, tag_width: int):
        Params.require(params)
        require_tag_width(tag_width)
        self.params = params
        self.tag_width = tag_width
        super().__init__({
            "cfg": In(TableConfigSignature()),
            "i_req": In(stream.Signature(request_layout(tag_width))),
            "o_resp": Out(stream.Signature(response_layout(tag_width))),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        n_ext = p.max_extents
        total_pages = p.total_pages

        m.submodules.mem = mem = Memory(shape=unsigned(_SLOT * (1 + n_ext)), depth=p.max_tables,
                                        init=[])
        wp = mem.write_port(granularity=_SLOT)
        rp = mem.read_port()

        # ---- configuration writes
        cfg = self.cfg
        cfg_word = Signal(_CFG_LAYOUT)
        m.d.comb += [
            cfg_word.row_bytes.eq(cfg.row_bytes), cfg_word.elem.eq(cfg.elem),
            cfg_word.enable.eq(cfg.enable), cfg_word.rows_per_page.eq(cfg.rows_per_page),
            cfg_word.magic.eq(cfg.magic), cfg_word.shift.eq(cfg.shift),
        ]
        ext_word = Cat(cfg.ext_first, cfg.ext_rows, cfg.ext_lba)
        table_in_range = cfg.table < p.max_tables
        m.d.comb += [
            wp.addr.eq(cfg.table),
            wp.data.eq(Cat(cfg_word.as_value(), Const(0, _SLOT - _CFG_LAYOUT.size),
                           *[ext_word for _ in range(n_ext)])),
        ]
        with m.If(table_in_range):
            with m.If(cfg.commit_table):
                m.d.comb += wp.en[0].eq(1)
            with m.If(cfg.commit_extent & (cfg.extent < n_ext)):
                for e in range(n_ext):
                    m.d.comb += wp.en[1 + e].eq(cfg.extent == e)

        # ---- pipeline: it never stalls. Every stage moves every cycle into an output FIFO, and
        # `i_req.ready` is a credit check: a lookup is accepted only while the lookups in the
        # pipeline and the FIFO leave a FIFO entry for it. So back-pressure on `o_resp` reaches
        # no pipeline register (a stall used to fan out to all of them from the output).
        m.submodules.out_fifo = out_fifo = SyncFIFOBuffered(
            width=response_layout(self.tag_width).size, depth=OUTPUT_FIFO_DEPTH)
        in_use = Signal(range(OUTPUT_FIFO_DEPTH + 1))
        ready = Signal(init=1)
        accept = self.i_req.valid & ready
        take = self.o_resp.valid & self.o_resp.ready
        in_use_next = Signal.like(in_use)
        m.d.comb += [
            in_use_next.eq(in_use + accept - take),
            self.i_req.ready.eq(ready),
            rp.en.eq(1),
            self.o_resp.valid.eq(out_fifo.r_rdy),
            self.o_resp.payload.eq(out_fifo.r_data),
            out_fifo.r_en.eq(self.o_resp.ready),
        ]
        m.d.sync += [in_use.eq(in_use_next), ready.eq(in_use_next < OUTPUT_FIFO_DEPTH)]
        tw = self.tag_width

        def reg(shape, name):
            return Signal(shape, name=name, reset_less=True)

        # S0: the request registered. The table memory (LUT RAM on a board: its read address
        # fans out to every cell of the word) is addressed from this register, not from the
        # request's source (a register slice's output mux: a 12.6 ns wire at 100 MHz).
        v0, idx0, tag0 = Signal(), reg(32, "idx0"), reg(tw, "tag0")
        table0 = reg(self.i_req.payload.table.shape(), "table0")
        m.d.sync += [
            v0.eq(accept),
            idx0.eq(self.i_req.payload.index),
            tag0.eq(self.i_req.payload.tag),
            table0.eq(self.i_req.payload.table),
        ]
        m.d.comb += rp.addr.eq(table0)

        # S1: table word being read; index/tag registered alongside
        v1, idx1, tag1, ok1 = Signal(), reg(32, "idx1"), reg(tw, "tag1"), reg(1, "ok1")
        m.d.sync += [
            v1.eq(v0),
            idx1.eq(idx0),
            tag1.eq(tag0),
            ok1.eq(table0 < p.max_tables),
        ]

        # S1 -> S1b: the table word is registered as it leaves the block RAM (its clock-to-out
        # leaves no time for the range compare in the same cycle)
        v1b, idx1b, tag1b, ok1b = Signal(), reg(32, "idx1b"), reg(tw, "tag1b"), reg(1, "ok1b")
        word = Signal.like(rp.data, reset_less=True)
        m.d.sync += [v1b.eq(v1), idx1b.eq(idx1), tag1b.eq(tag1), ok1b.eq(ok1), word.eq(rp.data)]
        v1, idx1, tag1, ok1 = v1b, idx1b, tag1b, ok1b
        # each extent's end (first + rows, 33 bits) is added up here, from the word as it is
        # read, so that the range compare behind it is two compares side by side instead of a
        # subtraction followed by a compare
        ends = [reg(33, f"end_r{e}") for e in range(n_ext)]
        for e in range(n_ext):
            ext_rd = data.View(_EXT_LAYOUT, rp.data[_SLOT * (1 + e):_SLOT * (2 + e)])
            m.d.sync += ends[e].eq(ext_rd.first + ext_rd.rows)

        # S1b -> S1c: parallel range compare over every extent (registered per extent)
        tcfg_w = data.View(_CFG_LAYOUT, word[:_CFG_LAYOUT.size])
        exts = [data.View(_EXT_LAYOUT, word[_SLOT * (1 + e):_SLOT * (2 + e)]) for e in range(n_ext)]
        hits = reg(n_ext, "hits")
        diffs = [reg(32, f"diff_r{e}") for e in range(n_ext)]
        lbas = [reg(32, f"lba_r{e}") for e in range(n_ext)]
        tcfg = Signal(_CFG_LAYOUT, reset_less=True)
        v1c, tag1c, ok1c = Signal(), reg(tw, "tag1c"), reg(1, "ok1c")
        m.d.sync += [v1c.eq(v1), tag1c.eq(tag1), ok1c.eq(ok1), tcfg.eq(tcfg_w)]
        for e in range(n_ext):
            diff = Signal(33, name=f"diff{e}")
            m.d.comb += diff.eq(idx1 - exts[e].first)
            # first <= index < first + rows (diff[32] is the borrow: index < first)
            m.d.sync += [hits[e].eq(~diff[32] & (idx1 < ends[e])),
                         diffs[e].eq(diff[:32]), lbas[e].eq(exts[e].lba)]
        v1, tag1, ok1 = v1c, tag1c, ok1c

        # S1c -> S2: the first (lowest-numbered) hit wins
        hit_any = hits.any()
        sel_d = Signal(32)
        sel_lba = Signal(32)
        for e in reversed(range(n_ext)):
            with m.If(hits[e]):
                m.d.comb += [sel_d.eq(diffs[e]), sel_lba.eq(lbas[e])]

        v2, tag2, st2 = Signal(), reg(tw, "tag2"), reg(2, "st2")
        d2, lba2 = reg(32, "d2"), reg(32, "lba2")
        rb2, el2, rpp2, mg2, sh2 = (reg(16, "rb2"), reg(ELEM_BITS, "el2"), reg(16, "rpp2"),
                                    reg(33, "mg2"), reg(6, "sh2"))
        m.d.sync += [
            v2.eq(v1), tag2.eq(tag1), d2.eq(sel_d), lba2.eq(sel_lba),
            rb2.eq(Mux(ok1, tcfg.row_bytes, 0)), el2.eq(Mux(ok1, tcfg.elem, 0)),
            rpp2.eq(tcfg.rows_per_page), mg2.eq(tcfg.magic), sh2.eq(tcfg.shift),
        ]
        with m.If(~ok1 | ~tcfg.enable):
            m.d.sync += st2.eq(TranslateStatus.DISABLED)
        with m.Elif(~hit_any):
            m.d.sync += st2.eq(TranslateStatus.NO_EXTENT)
        with m.Else():
            m.d.sync += st2.eq(TranslateStatus.OK)

        # S2 -> S2b: the reciprocal multiply's four 16/17-bit partial products (one DSP each;
        # the 65-bit sum of the whole product after the DSPs did not fit in one cycle)
        v2b, tag2b, st2b, d2b, lba2b = (Signal(), reg(tw, "tag2b"), reg(2, "st2b"),
                                        reg(32, "d2b"), reg(32, "lba2b"))
        rb2b, el2b, rpp2b, sh2b = reg(16, "rb2b"), reg(ELEM_BITS, "el2b"), reg(16, "rpp2b"), reg(6, "sh2b")
        pp = [reg(33, f"pp{k}") for k in range(4)]
        m.d.sync += [
            v2b.eq(v2), tag2b.eq(tag2), st2b.eq(st2), d2b.eq(d2), lba2b.eq(lba2),
            rb2b.eq(rb2), el2b.eq(el2), rpp2b.eq(rpp2), sh2b.eq(sh2),
            pp[0].eq(d2[:16] * mg2[:16]), pp[1].eq(d2[:16] * mg2[16:]),
            pp[2].eq(d2[16:] * mg2[:16]), pp[3].eq(d2[16:] * mg2[16:]),
        ]

        # S2b -> S2c: the middle partial products summed; the outer two do not overlap
        # (pp0 < 2**32), so they are one word without an adder. (The three-operand 65-bit sum
        # in one cycle was an 11.2 ns carry chain on the board.)
        v2c, tag2c, st2c, d2c, lba2c = (Signal(), reg(tw, "tag2c"), reg(2, "st2c"),
                                        reg(32, "d2c"), reg(32, "lba2c"))
        rb2c, el2c, rpp2c, sh2c = reg(16, "rb2c"), reg(ELEM_BITS, "el2c"), reg(16, "rpp2c"), reg(6, "sh2c")
        outer2c, mid2c = reg(65, "outer2c"), reg(34, "mid2c")
        m.d.sync += [
            v2c.eq(v2b), tag2c.eq(tag2b), st2c.eq(st2b), d2c.eq(d2b), lba2c.eq(lba2b),
            rb2c.eq(rb2b), el2c.eq(el2b), rpp2c.eq(rpp2b), sh2c.eq(sh2b),
            outer2c.eq(Cat(pp[0][:32], pp[3])), mid2c.eq(pp[1] + pp[2]),
        ]

        # S2c -> S3: the product
        v3, tag3, st3, d3, lba3 = (Signal(), reg(tw, "tag3"), reg(2, "st3"), reg(32, "d3"),
                                   reg(32, "lba3"))
        rb3, el3, rpp3, sh3 = reg(16, "rb3"), reg(ELEM_BITS, "el3"), reg(16, "rpp3"), reg(6, "sh3")
        prod3 = reg(65, "prod3")
        m.d.sync += [
            v3.eq(v2c), tag3.eq(tag2c), st3.eq(st2c), d3.eq(d2c), lba3.eq(lba2c),
            rb3.eq(rb2c), el3.eq(el2c), rpp3.eq(rpp2c), sh3.eq(sh2c),
            prod3.eq(outer2c + (mid2c << 16)),
        ]

        # S3 -> S3b: the quotient's shift (65-bit barrel shift and 66-bit add did not fit in
        # one cycle)
        v3b, tag3b, st3b, d3b, lba3b = (Signal(), reg(tw, "tag3b"), reg(2, "st3b"),
                                        reg(16, "d3b"), reg(32, "lba3b"))
        rb3b, el3b, rpp3b = reg(16, "rb3b"), reg(ELEM_BITS, "el3b"), reg(16, "rpp3b")
        q3 = reg(65, "q3")
        m.d.sync += [
            v3b.eq(v3), tag3b.eq(tag3), st3b.eq(st3), d3b.eq(d3[:16]), lba3b.eq(lba3),
            rb3b.eq(rb3), el3b.eq(el3), rpp3b.eq(rpp3),
            q3.eq(prod3 >> sh3),
        ]

        # S3b -> S4: quotient and LBA (kept wide so an extent past 2**32 still reads as BAD_LBA)
        v4, tag4, st4, d4 = Signal(), reg(tw, "tag4"), reg(2, "st4"), reg(16, "d4")
        rb4, el4, rpp4 = reg(16, "rb4"), reg(ELEM_BITS, "el4"), reg(16, "rpp4")
        q4, lba4 = reg(16, "q4"), reg(66, "lba4")
        m.d.sync += [
            v4.eq(v3b), tag4.eq(tag3b), st4.eq(st3b), d4.eq(d3b),
            rb4.eq(rb3b), el4.eq(el3b), rpp4.eq(rpp3b),
            q4.eq(q3[:16]), lba4.eq(lba3b + q3),
        ]

        # S4 -> S4b: q * rows_per_page (a DSP with no registers of its own; the subtraction
        # after it did not fit in the same cycle on the board)
        v4b, tag4b, st4b, d4b, rb4b, el4b = (Signal(), reg(tw, "tag4b"), reg(2, "st4b"),
                                             reg(16, "d4b"), reg(16, "rb4b"), reg(ELEM_BITS, "el4b"))
        qr4b, lba4b = reg(16, "qr4b"), reg(32, "lba4b")
        m.d.sync += [
            v4b.eq(v4), tag4b.eq(tag4), d4b.eq(d4), rb4b.eq(rb4), el4b.eq(el4),
            qr4b.eq((q4 * rpp4)[:16]), lba4b.eq(lba4[:32]), st4b.eq(st4),
        ]
        with m.If((st4 == TranslateStatus.OK) & (lba4 >= total_pages)):
            m.d.sync += st4b.eq(TranslateStatus.BAD_LBA)

        # S4b -> S5: remainder (only its low 16 bits matter: the offset is 16 bits)
        v5, tag5, st5, rb5, el5, rem5, lba5 = (Signal(), reg(tw, "tag5"), reg(2, "st5"),
                                              reg(16, "rb5"), reg(ELEM_BITS, "el5"), reg(16, "rem5"),
                                              reg(32, "lba5"))
        m.d.sync += [
            v5.eq(v4b), tag5.eq(tag4b), rb5.eq(rb4b), el5.eq(el4b), st5.eq(st4b),
            rem5.eq(d4b - qr4b), lba5.eq(lba4b),
        ]

        # S5 -> S5b: remainder * row_bytes = the byte offset in the page
        v5b, tag5b, st5b, rb5b, el5b = (Signal(), reg(tw, "tag5b"), reg(2, "st5b"),
                                        reg(16, "rb5b"), reg(ELEM_BITS, "el5b"))
        off5b, lba5b = reg(16, "off5b"), reg(32, "lba5b")
        m.d.sync += [
            v5b.eq(v5), tag5b.eq(tag5), st5b.eq(st5), rb5b.eq(rb5), el5b.eq(el5),
            off5b.eq((rem5 * rb5)[:16]), lba5b.eq(lba5),
        ]

        # S5b -> S6: the response, registered before it is written into the output FIFO
        good = (st5b == TranslateStatus.OK) | (st5b == TranslateStatus.BAD_LBA)
        v6 = Signal()
        resp6 = Signal(response_layout(self.tag_width), reset_less=True)
        m.d.sync += [
            v6.eq(v5b),
            resp6.tag.eq(tag5b), resp6.status.eq(st5b), resp6.row_bytes.eq(rb5b),
            resp6.elem.eq(el5b), resp6.lba.eq(Mux(good, lba5b, 0)),
            resp6.offset.eq(Mux(good, off5b, 0)),
        ]
        # The credit check guarantees the FIFO has room for every response in the pipeline.
        m.d.comb += [out_fifo.w_en.eq(v6), out_fifo.w_data.eq(resp6)]
        m.d.sync += Assert(~v6 | out_fifo.w_rdy, "translator output FIFO overflow")
        return m
