"""Cycle estimate of the EV-SSD for the functional model (a model, not a measurement).

It follows the RTL's structure lookup by lookup, in request order:

- the command engine issues one lookup per cycle, but only while a reorder-buffer slot is free
  (``n_slots``, as :func:`evssd.hw.regmap.default_slots` picks it); a slot frees when its row
  retires;
- reads pass the FTL demux in request order, one per cycle, into a channel only while it holds
  fewer than :func:`evssd.hw.regmap.channel_accept_depth` reads not yet accepted (its read
  queue and the intake stage): a full channel holds back the lookups behind it;
- each flash channel has ``ways`` page registers with LRU replacement. A read whose page is open
  skips tR; a miss takes the least recently used register once that register's previous data
  phase is over, then waits tR. Misses start in request order per channel;
- data phases are in request order per channel over a ``ch_data_bits`` bus: only the row's beats
  (fine-grained) or the whole page (block mode), after an AXI read latency;
- the merger retires rows in request order, one channel beat per cycle;
- results stream to the host in request order at one host beat per cycle as they retire (a
  GATHER row when its lookup retires, a pooled bag when its last good lookup does);
- a command pays a fixed cost for its fetch and index read, and a fixed tail from its last result
  beat to the completion the driver sees.

The fixed latencies below were fitted to the RTL's cycle counts (``evssd bench rtl`` reports
the model next to the RTL on the same lookups, with the RTL build's ``n_slots``; fitted on
4 x 4 and 8 x 8 builds with 64 and 256 slots, docs/benchmarks.md). Commands run back to back; channel state carries
over between commands.

The schedule of one command is a numba kernel (:func:`_schedule`, one read per
:func:`_channel_read`) over the command's lookup arrays; the state lives in three numpy arrays
(channels, page registers, clock; :class:`TimingModel` exposes views of them by name) so it
carries over from one command to the next and a whole command is one call,
:func:`run_lookups`, which the device model calls from its own kernel. ``tests/timing_reference.py``
keeps the per-row Python definition the kernel is checked against, cycle for cycle.
"""
from __future__ import annotations

import numba
import numpy as np

from evssd.hw.regmap import Params, channel_accept_depth, default_slots  # one definition for the RTL and the model

__all__ = ["TimingModel", "run_lookups", "result_schedule", "default_slots", "COMMAND_OVERHEAD", "LOOKUP_PIPELINE",
           "AXI_READ_LATENCY", "MERGER_LATENCY", "RESULT_TAIL"]

COMMAND_OVERHEAD = 60     # SQ fetch, index-list read, table probe
LOOKUP_PIPELINE = 10      # engine -> translator -> FTL -> channel queue
AXI_READ_LATENCY = 3      # AR accepted -> first R beat (cocotbext-axi AxiRam)
MERGER_LATENCY = 4        # last row beat -> retirement
RESULT_TAIL = 103         # last result beat -> completion seen by the driver (write response,
                          # CQ entry, the driver's polling)


# Per-channel state (``TimingModel._chan`` columns, then the channel's ring of accept cycles,
# ``accept_depth`` columns) and per-way state (``TimingModel._ways`` planes): one array each, so
# a kernel takes two arguments for all of it and a channel's state sits in a few cache lines.
BUS_FREE, LAST_START, ROWS, BYTES, TR_WAITS, BUSY, PROGRAMS, ACC_POS = range(8)
N_CHAN_FIELDS = 8
PAGE, READY, FREE, LAST = range(4)
# The clock (``TimingModel._clk``): the device's counters and what carries over between commands.
CYCLES, ENGINE_FREE, BUSY_CYCLES, USE, RING, ISSUED, LAST_RETIRE, OUT_T, PREV_AT = range(9)
N_CLK_FIELDS = 9


@numba.njit(cache=True, nogil=True, inline="always")
def _channel_read(chan, ways, c, page, at, beats, t_r, use):
    """One read entering channel ``c`` at cycle ``at``: returns the cycle its data phase ends.
    A page register holding the page (at most one does) skips tR; a miss takes the least
    recently used register once its last data phase is over and waits tR; reads are accepted
    in request order per channel (a hit once it is there, a miss once it takes its register:
    ``LAST_START``, the channel's last accept, also written into its ring of accept cycles);
    then the data phase of ``beats`` beats, in request order on the channel bus, after the AXI
    read latency. Updates the channel's state and counters."""
    # The register holding the page and the least recently used one, then hit or miss, all as
    # selects: branches on random pages mispredict (1.3x on the issue-15 trace).
    n_ways = ways.shape[2]
    w = -1
    lru = 0
    lru_use = ways[c, LAST, 0]
    for j in range(n_ways):
        u = ways[c, LAST, j]
        w = j if ways[c, PAGE, j] == page else w
        better = u < lru_use
        lru = j if better else lru
        lru_use = u if better else lru_use
    hit = w >= 0
    w = w if hit else lru
    old_ready = ways[c, READY, w]
    start = max(at, chan[c, LAST_START])                   # accepted in request order
    start = start if hit else max(start, ways[c, FREE, w])
    ready = max(old_ready, at) if hit else start + t_r
    chan[c, LAST_START] = start
    q = chan[c, ACC_POS]
    chan[c, N_CHAN_FIELDS + q] = start
    q += 1
    chan[c, ACC_POS] = 0 if q == chan.shape[1] - N_CHAN_FIELDS else q
    ways[c, PAGE, w] = page
    ways[c, READY, w] = old_ready if hit else ready
    chan[c, TR_WAITS] += 0 if hit else 1
    ways[c, LAST, w] = use
    bus_free = chan[c, BUS_FREE]
    end = max(ready, bus_free) + AXI_READ_LATENCY + beats
    chan[c, BUSY] += end - max(at, bus_free)
    chan[c, BUS_FREE] = end
    ways[c, FREE, w] = end
    chan[c, ROWS] += 1
    return end


@numba.njit(cache=True, nogil=True)
def _schedule(chs, pages, offsets, t0, pipeline, row_bytes, block_mode, page_size, beat_bytes, host_bytes,
              t_r, chan, ways, retire, clk, out_after):
    """Reads in request order from cycle ``t0``: lookup k issues at ``t0 + k`` once the slot of
    the lookup ``n_slots`` earlier (in this command or a previous one: slots are shared) has
    retired, and reaches the FTL demux ``pipeline`` cycles later. Reads enter their channels in
    request order, one per cycle, and a channel takes a read only while fewer than its accept
    depth (the ring of accept cycles in ``chan``, :func:`evssd.hw.regmap.channel_accept_depth`)
    wait to be accepted (:func:`_channel_read`). Rows retire in order (after the previous
    command's), one channel beat per cycle.

    Results: ``out_after[0]`` bytes are ready at ``t0``, ``out_after[k + 1]`` when lookup k
    retires; they go out in order (after the previous command's), packed, at ``host_bytes`` per
    cycle.

    ``retire`` (``n_slots`` entries) is a ring of the retirement cycles of the last ``n_slots``
    lookups; ``clk[RING]``, ``clk[ISSUED]`` (lookups so far, capped at ``n_slots``),
    ``clk[LAST_RETIRE]`` and ``clk[OUT_T]`` (last result beat) carry the slots, the merger and
    the result stream from one command to the next, ``clk[PREV_AT]`` (the last read's entry into
    its channel) the demux, ``clk[USE]`` the LRU stamp. The state
    arrays are updated in place. Returns (issue cycle of the last lookup, cycle the last read's
    data ends, cycle the last result beat goes out).
    """
    n_slots = retire.shape[0]
    row_beats = max(1, (row_bytes + beat_bytes - 1) // beat_bytes)
    page_beats = (page_size + beat_bytes - 1) // beat_bytes
    shift = 0                                    # beat_bytes is a power of two: shifts, not divisions
    while (1 << shift) < beat_bytes:
        shift += 1
    hshift = 0                                   # so is host_bytes
    while (1 << hshift) < host_bytes:
        hshift += 1
    ring, issued, use = clk[RING], clk[ISSUED], clk[USE]
    last_retire = max(t0, clk[LAST_RETIRE])
    issue = t0
    end = t0
    sent = out_after[0]                          # result bytes handed to the host so far
    sent_beats = (sent + host_bytes - 1) >> hshift
    out_t = max(t0, clk[OUT_T]) + sent_beats
    prev_at = clk[PREV_AT]
    bytes_moved = 0
    for k in range(chs.shape[0]):
        issue = t0 + k
        if issued >= n_slots:
            issue = max(issue, retire[ring] + 1)
        else:
            issued += 1
        if block_mode:
            beats = page_beats
        else:
            off = offsets[k]
            beats = ((off + row_bytes + beat_bytes - 1) >> shift) - (off >> shift)
        use += 1
        c = np.uint64(chs[k])   # unsigned: no negative-index fix-up on every access
        # in order through the demux, and only into room in the channel's accept queue
        at = max(max(issue + pipeline, prev_at + 1), chan[c, N_CHAN_FIELDS + chan[c, ACC_POS]] + 1)
        prev_at = at
        end = _channel_read(chan, ways, c, pages[k], at, beats, t_r, use)
        chan[c, BYTES] += beats << shift
        last_retire = max(last_retire + row_beats, end + MERGER_LATENCY)
        retire[ring] = last_retire
        ring += 1
        if ring == n_slots:
            ring = 0
        if out_after[k + 1]:
            sent += out_after[k + 1]
            beats = (sent + host_bytes - 1) >> hshift
            out_t = max(out_t, last_retire) + beats - sent_beats
            sent_beats = beats
    clk[RING], clk[ISSUED], clk[USE], clk[LAST_RETIRE], clk[OUT_T] = ring, issued, use, last_retire, out_t
    clk[PREV_AT] = prev_at
    if chs.shape[0]:                             # the last lookup has left for its channel
        issue = max(issue, prev_at - pipeline)
    return issue, end, out_t


@numba.njit(cache=True, nogil=True)
def run_lookups(chs, pages, offsets, out_after, row_bytes, block_mode, overlap, t_r, page_size,
                beat_bytes, host_bytes, chan, ways, retire, clk):
    """:meth:`TimingModel.lookups` on the model's state arrays (callable from other kernels, so
    a device model can run a whole command in one call): returns the command's cycles."""
    # A command submitted while the previous one is in flight starts as soon as the engine has
    # issued the previous command's lookups; otherwise when the device is idle.
    start = clk[ENGINE_FREE] if overlap else clk[CYCLES]
    t0 = start + COMMAND_OVERHEAD
    issue, _, out_t = _schedule(chs, pages, offsets, t0, LOOKUP_PIPELINE, row_bytes, block_mode, page_size,
                                beat_bytes, host_bytes, t_r, chan, ways, retire, clk, out_after)
    end = max(out_t, t0 + chs.shape[0]) + RESULT_TAIL
    clk[ENGINE_FREE] = issue + 1
    clk[BUSY_CYCLES] += end - max(start, clk[CYCLES])
    clk[CYCLES] = max(clk[CYCLES], end)
    return end - start


def result_schedule(good_positions, unit_ends, unit_bytes: int) -> np.ndarray:
    """``out_after`` for :meth:`TimingModel.lookups`: result unit j (a GATHER row, a pooled bag)
    of ``unit_bytes`` bytes is ready when the last good lookup at or before position
    ``unit_ends[j]`` retires (at the start when there is none: a bag of bad lookups, an empty
    bag before any good lookup). ``good_positions``: sorted request positions of the good lookups."""
    good_positions = np.asarray(good_positions, np.int64)
    g = np.searchsorted(good_positions, np.asarray(unit_ends, np.int64), side="right")
    return np.bincount(g, minlength=good_positions.size + 1).astype(np.int64) * int(unit_bytes)


class TimingModel:
    """The device's clock and channel state; one method per command kind advances it.

    Per-channel counters (``ch_rows``, ``ch_bytes``, ``ch_tr_waits``, ``ch_busy_cycles``,
    ``ch_programs``) are int64 arrays indexed by channel, like the RTL's counter registers (views
    of one state array, ``_chan``; the page registers likewise of ``_ways``, the clock of ``_clk``).
    """

    def __init__(self, params: Params, t_r: int = 1000, t_prog: int = 10000, n_slots: int | None = None,
                 read_queue: int | None = None):
        self.params = params
        self.t_r, self.t_prog = t_r, t_prog
        self.n_slots = default_slots(params) if n_slots is None else int(n_slots)
        if self.n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {self.n_slots}")
        if read_queue is not None and read_queue < 0:
            raise ValueError(f"read_queue must be >= 0, got {read_queue}")
        self.accept_depth = channel_accept_depth(params, self.n_slots, read_queue)
        c, w = params.n_channels, params.ways
        self._chan = np.zeros((c, N_CHAN_FIELDS + self.accept_depth), np.int64)
        self._ways = np.zeros((c, 4, w), np.int64)
        self._ways[:, PAGE] = -1
        self._ways[:, LAST] = -1
        self._clk = np.zeros(N_CLK_FIELDS, np.int64)
        self.way_page, self.way_ready = self._ways[:, PAGE], self._ways[:, READY]
        self.way_free, self.way_last = self._ways[:, FREE], self._ways[:, LAST]
        self.bus_free, self.last_start = self._chan[:, BUS_FREE], self._chan[:, LAST_START]
        self.ch_rows, self.ch_bytes = self._chan[:, ROWS], self._chan[:, BYTES]
        self.ch_tr_waits, self.ch_busy_cycles = self._chan[:, TR_WAITS], self._chan[:, BUSY]
        self.ch_programs = self._chan[:, PROGRAMS]
        self.acc_ring, self.acc_pos = self._chan[:, N_CHAN_FIELDS:], self._chan[:, ACC_POS]
        self._retire = np.zeros(self.n_slots, np.int64)
        self.overlap = False       # set by the device model: the previous command is still in flight
        # build constants, as the kernels take them
        self.page_size = params.page_size
        self.beat_bytes = params.ch_data_bits >> 3
        self.host_bytes = params.host_data_bits >> 3

    def _clock(k):
        return property(lambda self: int(self._clk[k]),
                        lambda self, v: self._clk.__setitem__(k, v))

    cycles = _clock(CYCLES)              # completion time of the latest command
    engine_free = _clock(ENGINE_FREE)    # the engine issued the previous command's last lookup
    busy_cycles = _clock(BUSY_CYCLES)
    _use = _clock(USE)                   # the LRU stamp of the last read
    del _clock

    def clear(self):
        """Zero the counters (not the clock or the channel state), like CTRL.clear_counters."""
        self._chan[:, ROWS:PROGRAMS + 1] = 0
        self.busy_cycles = 0

    def _page_beats(self) -> int:
        return -(-self.params.page_size // self.beat_bytes)

    def lookups(self, chs, pages, offsets, row_bytes: int, out_after, block_mode: bool) -> int:
        """Advance the clock by one GATHER/GATHER_POOLED command; returns its cycles.

        ``chs``, ``pages``, ``offsets``: int64 arrays, (channel, page, byte offset) of every good
        lookup in request order. ``out_after``: ``len(chs) + 1`` result byte counts, the bytes
        ready before any lookup retires, then after each lookup (:func:`result_schedule`).
        """
        if len(out_after) != len(chs) + 1:
            raise ValueError(f"out_after needs {len(chs) + 1} entries, got {len(out_after)}")
        return int(run_lookups(
            np.ascontiguousarray(chs, np.int64), np.ascontiguousarray(pages, np.int64),
            np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(out_after, np.int64),
            int(row_bytes), bool(block_mode), bool(self.overlap), int(self.t_r), self.page_size,
            self.beat_bytes, self.host_bytes, self._chan, self._ways, self._retire, self._clk))

    def program(self, c: int, page: int):
        self.way_page[c][self.way_page[c] == page] = -1
        beats = self._page_beats()
        self.ch_bytes[c] += beats * self.beat_bytes
        self.ch_programs[c] += 1
        self.ch_busy_cycles[c] += beats + self.t_prog
        self.cycles += beats + self.t_prog
        self.engine_free = self.cycles
        self.busy_cycles += beats + self.t_prog

    def read_page(self, c: int, page: int):
        t = self.cycles + COMMAND_OVERHEAD
        # one read outside the lookup path: no slot, no retirement, no result stream (a scratch
        # clock whose carried fields are thrown away; only the LRU stamp is kept)
        clk = np.zeros(N_CLK_FIELDS, np.int64)
        clk[USE], clk[LAST_RETIRE], clk[OUT_T], clk[PREV_AT] = self._use, t, t, t - 1
        _, end, _ = _schedule(np.array([c], np.int64), np.array([page], np.int64), np.zeros(1, np.int64), t, 0,
                              self.page_size, True, self.page_size, self.beat_bytes, self.host_bytes,
                              int(self.t_r), self._chan, self._ways, np.zeros(self.n_slots, np.int64), clk,
                              np.zeros(2, np.int64))
        self._use = int(clk[USE])
        self.busy_cycles += int(end) - self.cycles
        self.cycles = self.engine_free = int(end)

    def nop(self):
        self.cycles += COMMAND_OVERHEAD
        self.engine_free = self.cycles
        self.busy_cycles += COMMAND_OVERHEAD
