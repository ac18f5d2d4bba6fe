"""Cycle estimate of the EV-SSD for the functional model (a model, not a measurement).

What it models, per flash channel: ``ways`` page registers with LRU replacement (a read that
finds its page open skips tR), up to ``ways`` tR waits overlapping, data phases in request order
over a channel bus of ``ch_data_bits`` (fine-grained: only the beats that hold the row; block
mode: the whole page), one translated index per cycle at the front, and a fixed pipeline and
DMA latency per command. Commands run back to back (the device overlaps them, the model only
keeps the channels' state across commands). ``evssd bench rtl`` compares this estimate with the
RTL's cycle counters on the same workload.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from evssd.hw.regmap import Params

__all__ = ["TimingModel", "ChannelState", "COMMAND_OVERHEAD", "AXI_READ_LATENCY"]

# Fixed costs in cycles (fetch of a 64-byte command + index list start, completion write).
COMMAND_OVERHEAD = 40
AXI_READ_LATENCY = 4


@dataclass
class ChannelState:
    ways: int
    open_pages: list = field(default_factory=list)   # LRU order, most recent last: (page, ready_cycle)
    bus_free: int = 0
    rows: int = 0
    bytes: int = 0
    tr_waits: int = 0
    busy_cycles: int = 0
    programs: int = 0


class TimingModel:
    def __init__(self, params: Params, t_r: int = 1000, t_prog: int = 10000):
        self.params = params
        self.t_r, self.t_prog = t_r, t_prog
        self.channels = [ChannelState(params.ways) for _ in range(params.n_channels)]
        self.cycles = 0
        self.busy_cycles = 0

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

    def _open(self, ch: ChannelState, page: int, issue: int) -> int:
        """Cycle at which ``page`` is in a page register of channel ``ch``."""
        for k, (p, ready) in enumerate(ch.open_pages):
            if p == page:
                ch.open_pages.append(ch.open_pages.pop(k))
                return max(ready, issue)
        if len(ch.open_pages) >= ch.ways:
            ch.open_pages.pop(0)
        ch.tr_waits += 1
        # A way is free once its previous data phase is done; approximated by the bus state.
        ready = issue + self.t_r
        ch.open_pages.append((page, ready))
        return ready

    def lookups(self, locations, row_bytes: int, out_bytes: int, block_mode: bool) -> int:
        """Advance the clock by one GATHER/GATHER_POOLED command; returns its cycles."""
        start = self.cycles
        t = start + COMMAND_OVERHEAD
        end = t
        ps = self.params.page_size
        for k, (c, page, offset) in enumerate(locations):
            ch = self.channels[c]
            issue = t + k
            ready = self._open(ch, page, issue)
            beats = self._beats(0, ps) if block_mode else self._beats(offset, row_bytes)
            data_start = max(ready, ch.bus_free)
            ch.bus_free = data_start + beats
            ch.busy_cycles += ch.bus_free - max(issue, data_start - self.t_r if ready > issue else data_start)
            ch.rows += 1
            ch.bytes += beats * self.beat_bytes
            end = max(end, ch.bus_free + AXI_READ_LATENCY)
        end = max(end, t + len(locations))
        host_beats = -(-out_bytes // (self.params.host_data_bits // 8))
        end += host_beats + AXI_READ_LATENCY
        self.cycles = end
        self.busy_cycles += end - start
        return end - start

    def program(self, c: int, page: int):
        ch = self.channels[c]
        ch.open_pages = [(p, r) for p, r in ch.open_pages if p != page]
        beats = self._beats(0, self.params.page_size)
        ch.bytes += beats * self.beat_bytes
        ch.programs += 1
        ch.busy_cycles += beats + self.t_prog
        self.cycles += beats + self.t_prog
        self.busy_cycles += beats + self.t_prog

    def read_page(self, c: int, page: int):
        ch = self.channels[c]
        ready = self._open(ch, page, self.cycles)
        beats = self._beats(0, self.params.page_size)
        ch.bytes += beats * self.beat_bytes
        ch.rows += 1
        ch.busy_cycles += (ready - self.cycles) + beats
        self.busy_cycles += (ready - self.cycles) + beats
        self.cycles = ready + beats

    def nop(self):
        self.cycles += COMMAND_OVERHEAD
        self.busy_cycles += COMMAND_OVERHEAD
