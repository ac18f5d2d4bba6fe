"""Cycle estimate of the EV-SSD for the functional model (a model, not a measurement).

It follows the RTL's structure lookup by lookup, in request order:

- the command engine issues one lookup per cycle, but only while a reorder-buffer slot is free
  (``n_slots``, as :func:`evssd.hw.regmap.default_slots` picks it); a slot frees when its row
  retires;
- each flash channel has ``ways`` page registers with LRU replacement. A read whose page is open
  skips tR; a miss takes the least recently used register once that register's previous data
  phase is over, then waits tR. Misses start in request order per channel;
- data phases are in request order per channel over a ``ch_data_bits`` bus: only the row's beats
  (fine-grained) or the whole page (block mode), after an AXI read latency;
- the merger retires rows in request order, one channel beat per cycle;
- a command pays a fixed cost for its fetch, index read and completion, plus the result write at
  one host beat per cycle.

The fixed latencies below were fitted to the RTL's cycle counters (``evssd bench rtl`` reports
the model next to the RTL on the same lookups). Commands run back to back; channel state carries
over between commands.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from evssd.hw.regmap import Params, default_slots  # one definition for the RTL and the model

__all__ = ["TimingModel", "ChannelState", "default_slots", "COMMAND_OVERHEAD", "LOOKUP_PIPELINE",
           "AXI_READ_LATENCY", "MERGER_LATENCY"]

COMMAND_OVERHEAD = 60     # SQ fetch, index-list read, table probe, completion write
LOOKUP_PIPELINE = 10      # engine -> translator -> FTL -> channel queue
AXI_READ_LATENCY = 3      # AR accepted -> first R beat (cocotbext-axi AxiRam)
MERGER_LATENCY = 4        # last row beat -> retirement


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
    last_start: int = 0
    rows: int = 0
    bytes: int = 0
    tr_waits: int = 0
    busy_cycles: int = 0
    programs: int = 0


class TimingModel:
    def __init__(self, params: Params, t_r: int = 1000, t_prog: int = 10000, n_slots: int | None = None):
        self.params = params
        self.t_r, self.t_prog = t_r, t_prog
        self.n_slots = n_slots or default_slots(params)
        self.channels = [ChannelState([_Way() for _ in range(params.ways)]) for _ in range(params.n_channels)]
        self.cycles = 0            # completion time of the latest command
        self.engine_free = 0       # the engine issued the previous command's last lookup
        self.overlap = False       # set by the device model: the previous command is still in flight
        self.busy_cycles = 0
        self._use = 0

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

    def _read(self, c: int, page: int, issue: int, beats: int) -> int:
        """Schedule one read on channel ``c``; returns the cycle its last beat arrives."""
        ch = self.channels[c]
        self._use += 1
        way = next((w for w in ch.ways if w.page == page), None)
        if way is not None:
            ready = max(way.ready, issue)
        else:
            way = min(ch.ways, key=lambda w: w.last_use)
            start = max(issue, way.free_at, ch.last_start)
            ch.last_start = start
            ready = start + self.t_r
            way.page, way.ready = page, ready
            ch.tr_waits += 1
        way.last_use = self._use
        data_start = max(ready, ch.bus_free) + AXI_READ_LATENCY
        end = data_start + beats
        ch.busy_cycles += end - max(issue, ch.bus_free)
        ch.bus_free = end
        way.free_at = end
        ch.rows += 1
        ch.bytes += beats * self.beat_bytes
        return end

    def lookups(self, locations, row_bytes: int, out_bytes: int, block_mode: bool) -> int:
        """Advance the clock by one GATHER/GATHER_POOLED command; returns its cycles.

        ``locations``: (channel, page, offset) of every good lookup in request order.
        """
        # A command submitted while the previous one is in flight starts as soon as the engine has
        # issued the previous command's lookups; otherwise when the device is idle.
        start = self.engine_free if self.overlap else self.cycles
        t0 = start + COMMAND_OVERHEAD
        ps = self.params.page_size
        row_beats = max(1, -(-row_bytes // self.beat_bytes))
        retire = [0] * len(locations)
        last_retire = t0
        issue = t0
        for k, (c, page, offset) in enumerate(locations):
            issue = t0 + k
            if k >= self.n_slots:
                issue = max(issue, retire[k - self.n_slots] + 1)
            beats = self._beats(0, ps) if block_mode else self._beats(offset, row_bytes)
            end = self._read(c, page, issue + LOOKUP_PIPELINE, beats)
            last_retire = max(last_retire + row_beats, end + MERGER_LATENCY)
            retire[k] = last_retire
        host_beats = -(-out_bytes // (self.params.host_data_bits // 8))
        end = max(last_retire, t0 + len(locations)) + host_beats + AXI_READ_LATENCY
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
        end = self._read(c, page, t, beats)
        self.busy_cycles += end - self.cycles
        self.cycles = self.engine_free = end

    def nop(self):
        self.cycles += COMMAND_OVERHEAD
        self.engine_free = self.cycles
        self.busy_cycles += COMMAND_OVERHEAD
