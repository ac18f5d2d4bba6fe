"""Merger row intake: the channels' row beats, one per cycle, tagged with their beat index.

``RowIntake(params, n_slots)`` is the first stage of :class:`~.merger.ResultMerger`: it takes
the ``i_row[c]`` beats of every flash channel (``merger.row_layout``) and sends at most one beat
per cycle on ``o_beat`` (``{beat: row_layout, idx: beat index within its row}``), registered, so
that the ROB write and the slot flags behind it start from flip-flops. ``o_beat`` has no
``ready``: the ROB write never stalls, so the intake needs no back-pressure from behind.

Why the shape: each channel's beats wait in a two-entry :class:`SkidBuffer`, and the grant
(one-hot, at most one channel per cycle) is a register decided a cycle ahead from the buffers'
levels for the next cycle: a channel is granted only when its buffer will hold a beat, so the
granted beat is always there. The round-robin thus ends at the grant register instead of
steering the beat mux, the buffers' ready and the row state in the same cycle. A started row is
finished before switching channels (while its channel keeps it coming): rows then complete, and
retire, in about their arrival order instead of all late.
"""
from amaranth import Cat, Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.skid_buffer import SkidBuffer
from ..regmap import Params

__all__ = ["RowIntake", "beat_index_bits"]


def beat_index_bits(params: Params) -> int:
    """Bits of a beat's index within its row (the ROB address below the slot)."""
    return (-(-params.max_row_bytes * 8 // params.ch_data_bits) - 1).bit_length()


def _or_all(values):
    values = list(values)
    out = values[0]
    for v in values[1:]:
        out = out | v
    return out


class RowIntake(wiring.Component):
    """Round-robin intake of the channels' row beats (see the module docstring)."""

    def __init__(self, params: Params, n_slots: int, row_layout: data.StructLayout):
        self._p = params
        self._row = row_layout
        idx_bits = max(beat_index_bits(params), 1)
        super().__init__({
            "i_row": In(stream.Signature(row_layout)).array(params.n_channels),
            "o_beat": Out(stream.Signature(data.StructLayout({
                "beat": row_layout, "idx": unsigned(idx_bits)}), always_ready=True)),
        })

    def elaborate(self, platform):
        m = Module()
        p = self._p
        n_ch = p.n_channels
        idx_bits = max(beat_index_bits(p), 1)
        bufs = []
        for c in range(n_ch):
            buf = SkidBuffer(self._row)
            m.submodules[f"in_buf{c}"] = buf
            wiring.connect(m, wiring.flipped(self.i_row[c]), buf.i)
            bufs.append(buf)
        grant = Signal(n_ch)             # one-hot: the channel whose buffered beat is taken now
        last_grant = Signal(n_ch, init=1)  # the latest grant: the round-robin starts after it
        levels = [Signal(2, name=f"in_level{c}") for c in range(n_ch)]
        beat = Signal(self._row)
        beat_idx = [Signal(idx_bits, name=f"beat_idx{c}") for c in range(n_ch)]
        cur_idx = Signal(idx_bits)
        avail_next = Signal(n_ch)        # buffer c holds a beat next cycle
        for c in range(n_ch):
            buf = bufs[c]
            push = buf.i.valid & buf.i.ready
            level_next = Signal(2, name=f"in_level_next{c}")
            m.d.comb += [
                buf.o.ready.eq(grant[c]),
                level_next.eq(levels[c] + push - grant[c]),
                # == (level_next != 0), from the input's valid rather than the push: the buffer
                # takes a beat whenever it holds at most one (the push fans out to its entries)
                avail_next[c].eq((levels[c] == 2) | ((levels[c] == 1) & (~grant[c] | buf.i.valid)) |
                                 ((levels[c] == 0) & buf.i.valid)),
            ]
            m.d.sync += Assert((levels[c] == 2) | buf.i.ready, "merger: input buffer level")
            # (checked at the clock edge in simulation; combinational checks see delta cycles)
            m.d.sync += Assert(~grant[c] | buf.o.valid, "merger granted an empty channel buffer")
            m.d.sync += levels[c].eq(level_next)
            with m.If(grant[c]):
                m.d.sync += beat_idx[c].eq(Mux(buf.o.payload.last, 0, beat_idx[c] + 1))
        # the granted beat: an AND-OR over the channels (the grant is one-hot)
        m.d.comb += [
            beat.eq(_or_all(buf.o.payload.as_value() & grant[c].replicate(len(beat.as_value()))
                            for c, buf in enumerate(bufs))),
            cur_idx.eq(_or_all(beat_idx[c] & grant[c].replicate(len(cur_idx))
                               for c in range(n_ch))),
        ]
        # next grant: stay on the granted channel mid-row while it has a beat, else the first
        # channel with a beat after the latest grant
        after = Signal(n_ch)
        recent = Mux(grant.any(), grant, last_grant)
        m.d.comb += after.eq(Cat(recent[-1], recent[:-1]) if n_ch > 1 else recent)
        rr_pick = Signal(n_ch)
        for start in range(n_ch):
            with m.If(after[start]):
                for k in reversed(range(n_ch)):
                    c = (start + k) % n_ch
                    with m.If(avail_next[c]):
                        m.d.comb += rr_pick.eq(1 << c)
        stay = grant.any() & ~beat.last & (grant & avail_next).any()
        m.d.sync += grant.eq(Mux(stay, grant, rr_pick))
        with m.If(grant.any()):
            m.d.sync += last_grant.eq(grant)
        # the taken beat, registered (the tag-indexed flag updates behind it do not fit in the
        # same cycle as the beat mux)
        m.d.sync += [self.o_beat.valid.eq(grant.any()), self.o_beat.payload.beat.eq(beat),
                     self.o_beat.payload.idx.eq(cur_idx)]
        return m
