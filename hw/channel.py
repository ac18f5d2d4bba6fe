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
  reads from being accepted, waits until every accepted read has finished, then runs alone;
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
baseline) and ``o_row`` still carries only the row. AR for the next request is issued while R of
the previous one streams.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Const, Mux, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from .axi import AXI4Signature, Burst
from .regmap import Params

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
        if not isinstance(params, Params):
            raise TypeError(f"params must be regmap.Params, not {type(params).__name__}")
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
        raise NotImplementedError("in progress")
