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

The schedule of one command is a numba kernel (:func:`_schedule`) over the command's lookup
arrays; the channel state lives in numpy arrays (:class:`TimingModel` attributes) so it carries
over from one command to the next. ``tests/timing_reference.py`` keeps the per-row Python
definition the kernel is checked against, cycle for cycle.
"""
from __future__ import annotations

import numba
import numpy as np

from evssd.hw.regmap import Params, channel_accept_depth, default_slots  # one definition for the RTL and the model

__all__ = ["TimingModel", "result_schedule", "default_slots", "COMMAND_OVERHEAD", "LOOKUP_PIPELINE",
           "AXI_READ_LATENCY", "MERGER_LATENCY", "RESULT_TAIL"]

COMMAND_OVERHEAD = 60     # SQ fetch, index-list read, table probe
LOOKUP_PIPELINE = 10      # engine -> translator -> FTL -> channel queue
AXI_READ_LATENCY = 3      # AR accepted -> first R beat (cocotbext-axi AxiRam)
MERGER_LATENCY = 4        # last row beat -> retirement
RESULT_TAIL = 103         # last result beat -> completion seen by the driver (write response,
                          # CQ entry, the driver's polling)


@numba.njit(cache=True, nogil=True)
def _schedule(chs, pages, offsets, t0, pipeline, row_bytes, block_mode, page_size, beat_bytes, n_slots,
              t_r, way_page, way_ready, way_free, way_last, bus_free, last_start, acc_ring, acc_pos,
              ch_rows, ch_bytes, ch_tr_waits, ch_busy, use, retire, carry, out_after, host_bytes):
    """Reads in request order from cycle ``t0``: lookup k issues at ``t0 + k`` once the slot of
    the lookup ``n_slots`` earlier (in this command or a previous one: slots are shared) has
    retired, and reaches its channel ``pipeline`` cycles later.

    Reads enter their channels in request order, one per cycle (the FTL demux), and a channel
    takes a read only while fewer than ``acc_ring.shape[1]`` of its reads wait to be accepted
    (:func:`evssd.hw.regmap.channel_accept_depth`): ``acc_ring`` is a per-channel ring of the
    accept cycles of its last reads, ``acc_pos`` its position. Reads are accepted in request
    order per channel: a hit once it is there, a miss once it takes its register.

    Each read: a page register holding the page (LRU over ``ways``) skips tR; a miss takes the
    least recently used register once its last data phase is over (``last_start``: the
    channel's last accept) and waits tR; then the data phase, in request order on the channel bus,
    after the AXI read latency. Rows retire in order (after the previous command's), one
    channel beat per cycle.

    Results: ``out_after[0]`` bytes are ready at ``t0``, ``out_after[k + 1]`` when lookup k
    retires; they go out in order (after the previous command's), packed, at ``host_bytes`` per
    cycle.

    ``retire`` (``n_slots`` entries) is a ring of the retirement cycles of the last ``n_slots``
    lookups; ``carry`` = [ring position, lookups so far (capped at ``n_slots``), last retirement,
    last result beat, the last read's arrival at its channel] carries the slots, the merger, the
    result stream and the demux from one command to the next. The state arrays are updated in place. Returns (issue cycle of the last lookup,
    LRU stamp, cycle the last read's data ends, cycle the last result beat goes out).
    """
    row_beats = max(1, (row_bytes + beat_bytes - 1) // beat_bytes)
    page_beats = (page_size + beat_bytes - 1) // beat_bytes
    n_ways = way_page.shape[1]
    depth = acc_ring.shape[1]
    shift = 0                                    # beat_bytes is a power of two: shifts, not divisions
    while (1 << shift) < beat_bytes:
        shift += 1
    hshift = 0                                   # so is host_bytes
    while (1 << hshift) < host_bytes:
        hshift += 1
    ring, issued = carry[0], carry[1]            # ring: the slot ring's position (no division)
    last_retire = max(t0, carry[2])
    issue = t0
    end = t0
    sent = out_after[0]                          # result bytes handed to the host so far
    sent_beats = (sent + host_bytes - 1) >> hshift
    out_t = max(t0, carry[3]) + sent_beats
    prev_at = carry[4]
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
        c, page = chs[k], pages[k]
        # in order through the demux, and only into room in the channel's accept queue
        q = acc_pos[c]
        at = max(max(issue + pipeline, prev_at + 1), acc_ring[c, q] + 1)
        prev_at = at
        # The register holding the page (at most one does) and the least recently used one, then
        # hit or miss, all as selects: branches on random pages mispredict (1.3x on the issue-15
        # trace).
        w = -1
        lru = 0
        lru_use = way_last[c, 0]
        for j in range(n_ways):
            u = way_last[c, j]
            w = j if way_page[c, j] == page else w
            better = u < lru_use
            lru = j if better else lru
            lru_use = u if better else lru_use
        hit = w >= 0
        w = w if hit else lru
        old_ready = way_ready[c, w]
        start = max(at, last_start[c])                       # accepted in request order
        start = start if hit else max(start, way_free[c, w])
        ready = max(old_ready, at) if hit else start + t_r
        last_start[c] = start
        acc_ring[c, q] = start
        q += 1
        acc_pos[c] = 0 if q == depth else q
        way_page[c, w] = page
        way_ready[c, w] = old_ready if hit else ready
        ch_tr_waits[c] += 0 if hit else 1
        way_last[c, w] = use
        end = max(ready, bus_free[c]) + AXI_READ_LATENCY + beats
        ch_busy[c] += end - max(at, bus_free[c])
        bus_free[c] = end
        way_free[c, w] = end
        ch_rows[c] += 1
        ch_bytes[c] += beats * beat_bytes
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
    carry[0], carry[1], carry[2], carry[3], carry[4] = ring, issued, last_retire, out_t, prev_at
    if chs.shape[0]:                             # the last lookup has left for its channel
        issue = max(issue, prev_at - pipeline)
    return issue, use, end, out_t


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
    ``ch_programs``) are int64 arrays indexed by channel, like the RTL's counter registers.
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
        self.way_page = np.full((c, w), -1, np.int64)
        self.way_ready = np.zeros((c, w), np.int64)
        self.way_free = np.zeros((c, w), np.int64)
        self.way_last = np.full((c, w), -1, np.int64)
        self.bus_free = np.zeros(c, np.int64)
        self.last_start = np.zeros(c, np.int64)
        self.acc_ring = np.zeros((c, self.accept_depth), np.int64)   # see _schedule
        self.acc_pos = np.zeros(c, np.int64)
        self.ch_rows = np.zeros(c, np.int64)
        self.ch_bytes = np.zeros(c, np.int64)
        self.ch_tr_waits = np.zeros(c, np.int64)
        self.ch_busy_cycles = np.zeros(c, np.int64)
        self.ch_programs = np.zeros(c, np.int64)
        self._retire = np.zeros(self.n_slots, np.int64)
        self._carry = np.zeros(5, np.int64)     # see _schedule
        self.cycles = 0            # completion time of the latest command
        self.engine_free = 0       # the engine issued the previous command's last lookup
        self.overlap = False       # set by the device model: the previous command is still in flight
        self.busy_cycles = 0
        self._use = 0

    def clear(self):
        """Zero the counters (not the clock or the channel state), like CTRL.clear_counters."""
        for a in (self.ch_rows, self.ch_bytes, self.ch_tr_waits, self.ch_busy_cycles, self.ch_programs):
            a[:] = 0
        self.busy_cycles = 0

    @property
    def beat_bytes(self) -> int:
        return self.params.ch_data_bits // 8

    def _page_beats(self) -> int:
        return -(-self.params.page_size // self.beat_bytes)

    def _schedule(self, chs, pages, offsets, t0: int, pipeline: int, row_bytes: int, block_mode: bool,
                  out_after, retire, carry):
        p = self.params
        issue, use, end, out_t = _schedule(
            np.ascontiguousarray(chs, np.int64), np.ascontiguousarray(pages, np.int64),
            np.ascontiguousarray(offsets, np.int64), int(t0), int(pipeline), int(row_bytes),
            bool(block_mode), p.page_size, p.ch_data_bits >> 3, self.n_slots, int(self.t_r),
            self.way_page, self.way_ready, self.way_free, self.way_last, self.bus_free,
            self.last_start, self.acc_ring, self.acc_pos, self.ch_rows, self.ch_bytes, self.ch_tr_waits, self.ch_busy_cycles,
            self._use, retire, carry, np.ascontiguousarray(out_after, np.int64), p.host_data_bits >> 3)
        return int(issue), int(use), int(end), int(out_t)

    def lookups(self, chs, pages, offsets, row_bytes: int, out_after, block_mode: bool) -> int:
        """Advance the clock by one GATHER/GATHER_POOLED command; returns its cycles.

        ``chs``, ``pages``, ``offsets``: int64 arrays, (channel, page, byte offset) of every good
        lookup in request order. ``out_after``: ``len(chs) + 1`` result byte counts, the bytes
        ready before any lookup retires, then after each lookup (:func:`result_schedule`).
        """
        if len(out_after) != len(chs) + 1:
            raise ValueError(f"out_after needs {len(chs) + 1} entries, got {len(out_after)}")
        # A command submitted while the previous one is in flight starts as soon as the engine has
        # issued the previous command's lookups; otherwise when the device is idle.
        start = self.engine_free if self.overlap else self.cycles
        t0 = start + COMMAND_OVERHEAD
        n = len(chs)
        issue, self._use, _, out_t = self._schedule(chs, pages, offsets, t0, LOOKUP_PIPELINE, row_bytes,
                                                    block_mode, out_after, self._retire, self._carry)
        end = max(out_t, t0 + n) + RESULT_TAIL
        self.engine_free = issue + 1
        self.busy_cycles += end - max(start, self.cycles)
        self.cycles = max(self.cycles, end)
        return end - start

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
        # one read outside the lookup path: no slot, no retirement, no result stream
        _, self._use, end, _ = self._schedule(np.array([c]), np.array([page]), np.zeros(1, np.int64), t, 0,
                                              self.params.page_size, True, np.zeros(2, np.int64),
                                              np.zeros(self.n_slots, np.int64), np.array([0, 0, t, t, t - 1]))
        self.busy_cycles += end - self.cycles
        self.cycles = self.engine_free = end

    def nop(self):
        self.cycles += COMMAND_OVERHEAD
        self.engine_free = self.cycles
        self.busy_cycles += COMMAND_OVERHEAD
