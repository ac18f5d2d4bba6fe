"""The timing model's definition, row by row in plain Python (slow): the golden model the numba
kernel of :mod:`evssd.host.timing` is checked against, cycle for cycle, in tests/test_timing.py.

Same semantics, same constants (imported from the fast model so that a change of a latency
applies to both); only the loop is written for reading, not for speed.
"""
from __future__ import annotations

from dataclasses import dataclass

from evssd.hw.regmap import Params, channel_accept_depth
from evssd.host.timing import (AXI_READ_LATENCY, COMMAND_OVERHEAD, LOOKUP_PIPELINE, MERGER_LATENCY,
                               RESULT_TAIL, default_slots)


@dataclass
class _Way:
    page: int = -1
    ready: int = 0       # cycle the page is in the register
    free_at: int = 0     # cycle its last data phase ends
    last_use: int = -1


@dataclass
class ChannelState:
    ways: list
    bus_free: int = 0
    last_start: int = 0  # the last read's accept (a hit: when it arrives; a miss: its tR start)
    accepts: list = None  # accept cycle of every read so far (in request order)
    rows: int = 0
    bytes: int = 0
    tr_waits: int = 0
    busy_cycles: int = 0
    programs: int = 0


class ReferenceTimingModel:
    def __init__(self, params: Params, t_r: int = 1000, t_prog: int = 10000, n_slots: int | None = None,
                 read_queue: int | None = None):
        self.params = params
        self.t_r, self.t_prog = t_r, t_prog
        self.n_slots = n_slots or default_slots(params)
        # reads a channel holds waiting for its page-register decision (its read queue and the
        # intake's request stage): a read enters only when the one this many earlier was accepted
        self.accept_depth = channel_accept_depth(params, self.n_slots, read_queue)
        self.channels = [ChannelState([_Way() for _ in range(params.ways)], accepts=[])
                         for _ in range(params.n_channels)]
        self._prev_at = 0          # the last lookup's arrival at its channel (the demux is in order)
        self.cycles = 0            # completion time of the latest command
        self.engine_free = 0       # the engine issued the previous command's last lookup
        self.overlap = False       # set by the device model: the previous command is still in flight
        self.busy_cycles = 0
        self._use = 0
        self._retired = []         # retirement cycle of every lookup so far (slots are shared)
        self._last_retire = 0      # the merger's last retirement
        self._out_t = 0            # the result stream's last beat

    def clear(self):
        for ch in self.channels:
            ch.rows = ch.bytes = ch.tr_waits = ch.busy_cycles = ch.programs = 0
        self.busy_cycles = 0

    @property
    def beat_bytes(self) -> int:
        return self.params.ch_data_bits // 8

    def _beats(self, offset: int, length: int) -> int:
        bb = self.beat_bytes
        return (offset + length + bb - 1) // bb - offset // bb

    def _arrival(self, c: int, at: int) -> int:
        """When a read for channel ``c`` that could arrive at ``at`` gets into the channel: once
        the read ``accept_depth`` earlier on the channel has been accepted."""
        accepts = self.channels[c].accepts
        if len(accepts) >= self.accept_depth:
            at = max(at, accepts[-self.accept_depth] + 1)
        return at

    def _read(self, c: int, page: int, issue: int, beats: int) -> int:
        """Schedule one read on channel ``c`` that arrives at ``issue``; returns the cycle its
        last beat arrives. Reads are accepted in request order per channel."""
        ch = self.channels[c]
        self._use += 1
        way = next((w for w in ch.ways if w.page == page), None)
        if way is not None:
            accept = max(issue, ch.last_start)
            ready = max(way.ready, issue)
        else:
            way = min(ch.ways, key=lambda w: w.last_use)
            accept = max(issue, way.free_at, ch.last_start)
            ready = accept + self.t_r
            way.page, way.ready = page, ready
            ch.tr_waits += 1
        ch.last_start = accept
        ch.accepts.append(accept)
        way.last_use = self._use
        data_start = max(ready, ch.bus_free) + AXI_READ_LATENCY
        end = data_start + beats
        ch.busy_cycles += end - max(issue, ch.bus_free)
        ch.bus_free = end
        way.free_at = end
        ch.rows += 1
        ch.bytes += beats * self.beat_bytes
        return end

    def lookups(self, locations, row_bytes: int, units, block_mode: bool) -> int:
        """Advance the clock by one GATHER/GATHER_POOLED command; returns its cycles.

        ``locations``: (channel, page, offset, request position) of every good lookup in request
        order; ``units``: (last request position, bytes) of every result unit (GATHER row, pooled
        bag) in order. A unit is ready when the last good lookup at or before its last position
        retires (at the start without one); results go out in order at one host beat per cycle.
        """
        # A command submitted while the previous one is in flight starts as soon as the engine has
        # issued the previous command's lookups; otherwise when the device is idle.
        start = self.engine_free if self.overlap else self.cycles
        t0 = start + COMMAND_OVERHEAD
        ps = self.params.page_size
        row_beats = max(1, -(-row_bytes // self.beat_bytes))
        retire = [0] * len(locations)
        last_retire = max(t0, self._last_retire)
        issue = t0
        for k, (c, page, offset, _) in enumerate(locations):
            issue = t0 + k
            if len(self._retired) >= self.n_slots:   # the slot of the lookup n_slots earlier
                issue = max(issue, self._retired[-self.n_slots] + 1)
            beats = self._beats(0, ps) if block_mode else self._beats(offset, row_bytes)
            # in request order through the demux, one a cycle, into room in the channel
            at = self._arrival(c, max(issue + LOOKUP_PIPELINE, self._prev_at + 1))
            self._prev_at = at
            end = self._read(c, page, at, beats)
            last_retire = max(last_retire + row_beats, end + MERGER_LATENCY)
            retire[k] = last_retire
            self._retired.append(last_retire)
        self._last_retire = last_retire
        hb = self.params.host_data_bits // 8
        sent, out_t = 0, max(t0, self._out_t)
        for last_pos, nbytes in units:
            ready = t0
            for k, loc in enumerate(locations):
                if loc[3] <= last_pos:
                    ready = retire[k]
            before = -(-sent // hb)
            sent += nbytes
            out_t = max(out_t, ready) + (-(-sent // hb) - before)
        self._out_t = out_t
        end = max(out_t, t0 + len(locations)) + RESULT_TAIL
        # the engine has issued the last lookup once it has left for its channel
        if locations:
            issue = max(issue, self._prev_at - LOOKUP_PIPELINE)
        self.engine_free = issue + 1
        self.busy_cycles += end - max(start, self.cycles)
        self.cycles = max(self.cycles, end)
        return end - start

    def program(self, c: int, page: int):
        ch = self.channels[c]
        for w in ch.ways:
            if w.page == page:
                w.page = -1
        beats = self._beats(0, self.params.page_size)
        ch.bytes += beats * self.beat_bytes
        ch.programs += 1
        ch.busy_cycles += beats + self.t_prog
        self.cycles += beats + self.t_prog
        self.engine_free = self.cycles
        self.busy_cycles += beats + self.t_prog

    def read_page(self, c: int, page: int):
        beats = self._beats(0, self.params.page_size)
        t = self.cycles + COMMAND_OVERHEAD
        end = self._read(c, page, self._arrival(c, t), beats)
        self.busy_cycles += end - self.cycles
        self.cycles = self.engine_free = end

    def nop(self):
        self.cycles += COMMAND_OVERHEAD
        self.engine_free = self.cycles
        self.busy_cycles += COMMAND_OVERHEAD
