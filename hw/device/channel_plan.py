"""The flash channel controller's internal contract: its geometry and the descriptors its stages
pass to each other.

A read is planned once, when it is accepted (:class:`~.read_intake.ReadIntake`), into the
beat arithmetic that the later stages only compare against: the AR side
(:class:`~.burst_issuer.BurstIssuer`) needs its beat range, the R side
(:class:`~.row_realigner.RowRealigner`) its landmarks within the beats that cross the bus.
Both stages and their tests take the layouts from :class:`ChannelGeometry`, the one definition.
"""
from __future__ import annotations

from amaranth import Cat
from amaranth.lib import data

from ..regmap import Params, require_tag_width

__all__ = ["ChannelGeometry", "flags_at", "FLAG_LAYOUT", "channel_addr_width"]


def channel_addr_width(params: Params) -> int:
    """Byte-address width of one channel's bank (at least 12: one 4 KiB AXI region)."""
    return max(12, (params.pages_per_channel * params.page_size - 1).bit_length())


# Where the R side stands within its head request, as flags for one beat (see flags_at).
FLAG_LAYOUT = data.StructLayout({"relevant": 1, "at_skip": 1, "last_emit": 1, "at_flush": 1,
                                 "at_total_m1": 1, "at_total": 1, "emit": 1, "need_flush": 1,
                                 "ends": 1})


class ChannelGeometry:
    """Bus and page arithmetic of one channel, and the layouts of its stage descriptors.

    - ``beat_bytes`` (``B``), ``words`` per beat (``W``, 32-bit), ``page_beats``;
    - ``chunk_beats``: bursts split at aligned chunks of this many beats never cross 4 KiB nor
      exceed 256 beats (AXI's two limits);
    - ``page_bits``: page-number bits that address the bank;
    - ``pend_depth``: accepted reads waiting for AR, enough for ``ways`` overlapping tR waits
      plus hits; ``rq_depth``: reads with their AR issued ahead of their R data (covers ~8
      cycles of memory latency); ``ref_width``: a page register's reference count;
    - ``rq_layout``: what the R side needs of a read (all beat landmarks, so it compares its
      beat counter for equality instead of subtracting); ``pend_layout``: an accepted read
      (page, first beat and beat count on the bus, and ``rq``); ``req_layout``: the AR side's
      descriptor for the R side (``rq`` and its first beat's flags).
    """

    def __init__(self, params: Params, tag_width: int):
        Params.require(params)
        require_tag_width(tag_width)
        self.params = params
        self.tag_width = tag_width
        B = self.beat_bytes = params.ch_data_bits // 8
        self.log_beat = B.bit_length() - 1
        W = self.words = B // 4
        self.page_beats = params.page_size // B
        self.log_page_beats = self.page_beats.bit_length() - 1
        self.log_page = params.page_size.bit_length() - 1
        self.chunk_beats = min(4096 // B, 256, self.page_beats)
        self.page_bits = max(1, (params.pages_per_channel - 1).bit_length())
        self.ways = params.ways
        self.way_bits = max(1, (self.ways - 1).bit_length())
        self.pend_depth = max(4, 2 * self.ways)
        self.rq_depth = 8
        cw = self.count_width = self.page_beats.bit_length() + 1
        self.ref_width = (self.pend_depth + self.rq_depth + 2).bit_length()
        self.addr_width = channel_addr_width(params)
        wb = max(1, (W - 1).bit_length())
        self.rq_layout = data.StructLayout({
            "way": self.way_bits, "tag": tag_width,
            "skip": cw, "n_in": cw, "n_out": cw, "total": cw, "shift": wb, "lmod": wb,
            "skip_end": cw, "last_at": cw, "flush_at": cw, "total_m1": cw,
            # the request needs a flush beat (realigned, as many beats in as out), and whether
            # it can end on an R beat (else it ends on its flush beat)
            "flushes": 1, "ends_r": 1,
        })
        self.flag_layout = FLAG_LAYOUT
        self.pend_layout = data.StructLayout({"page": self.page_bits, "start_b": cw,
                                              "nb_fine": cw, "rq": self.rq_layout})
        self.req_layout = data.StructLayout({"rq": self.rq_layout, "first": FLAG_LAYOUT})


def flags_at(cnt, e):
    """The R side's tests for beat number ``cnt`` of request ``e`` (an ``rq_layout`` view), and
    what follows from them for that beat (whether it emits a row beat, needs a flush beat after
    it, ends the request), as a ``FLAG_LAYOUT`` value: registered with the tests, so the R
    handshake and the request queue's pop decide from flip-flops."""
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
