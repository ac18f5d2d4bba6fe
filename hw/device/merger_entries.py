"""Merger row entries: the current and the next lookup, and whether each one's row has arrived.

``RowEntries(geometry)`` keeps a done flag and an err flag per ROB slot and the two oldest
descriptors (``merger_layouts.entry_layout``) from ``i_entry``. ``o_head`` is the oldest one;
``o_done`` / ``o_err`` say whether its slot's row has fully arrived / had an error. ``i_beat``
(the row intake's registered beats) sets a slot's flags (``last`` sets done, ``err`` sets err);
``i_free`` (the merger's registered ``o_free``) clears them. ``o_head.ready`` retires the head:
it must be high only while ``o_head.valid`` is (the issue stage retires the row it works on).

Why two entries read through a head pointer: retiring a row only flips the pointer and a few
flags, so the late retire decision loads nothing wide, and the head's fields come from registers
early in the cycle. Entries load from ``i_entry`` whenever free, and each entry follows its own
slot's flags (the flags' next values, computed for the slot it holds or is loading). The head's
one-bit fields that the issue stage decides on first, and its slot's done/err flags, are
registers of their own besides, loaded with what the pointer selects next: those decisions start
from flip-flops, and the retire decision only picks between two values for a dozen of them.
The flags clear one cycle after the slot
retires, from the registered ``o_free`` (decoding the retire decision itself was on the critical
path); the engine reuses a slot only after ``o_free``, so no beat or descriptor of the slot's
next use sees stale flags, and a set never meets a clear.
"""
from amaranth import Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .merger_intake import beat_index_bits
from .merger_layouts import MergerGeometry, entry_layout, row_layout

__all__ = ["RowEntries"]

# the head's one-bit fields the issue stage decides on first (see RowEntries.elaborate)
_HEAD_FLAGS = (("one_op",), ("gather",), ("accum",), ("bad_or_empty",), ("pooled_or_empty",),
               ("goes_emit",), ("hdr",), ("fma",), ("desc", "bad"), ("desc", "pooled"),
               ("desc", "cmd_end"), ("desc", "empty_bag"))


def _offset(layout, path) -> int:
    """Bit offset of a nested one-bit field of a StructLayout."""
    offset = 0
    for name in path:
        f = layout[name]
        offset += f.offset
        layout = f.shape
    return offset


class RowEntries(wiring.Component):
    """The head descriptor and the next one, with their slots' done/err flags (see the module
    docstring)."""

    def __init__(self, geometry: MergerGeometry):
        self._g = geometry
        p = geometry.params
        xl = entry_layout(geometry)
        beat = data.StructLayout({"beat": row_layout(p, geometry.n_slots),
                                  "idx": unsigned(max(beat_index_bits(p), 1))})
        super().__init__({
            "i_entry": In(stream.Signature(xl)),
            "i_beat": In(stream.Signature(beat, always_ready=True)),
            "i_free": In(stream.Signature(unsigned(geometry.tb), always_ready=True)),
            "o_head": Out(stream.Signature(xl)),
            "o_done": Out(1),
            "o_err": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        xl = entry_layout(g)
        done = Signal(g.n_slots)
        errf = Signal(g.n_slots)
        ent = [Signal(xl, name=f"row{k}") for k in range(2)]
        ent_full = Signal(2)
        hp = Signal()
        wp = Signal()
        have = Signal()                  # == ent_full[hp]
        x_in = self.i_entry.payload
        w_free = ~ent_full.bit_select(wp, 1)
        push = self.i_entry.valid & w_free
        pop = self.o_head.ready          # (only with o_head.valid)
        m.d.comb += [
            self.i_entry.ready.eq(w_free),
            self.o_head.valid.eq(have),
            self.o_head.payload.eq(Mux(hp, ent[1], ent[0])),
        ]
        m.d.sync += Assert(~pop | have, "merger: a row retired with no head")
        m.d.sync += [wp.eq(wp ^ push), hp.eq(hp ^ pop)]
        for k in range(2):
            with m.If(push & (wp == k)):
                m.d.sync += ent_full[k].eq(1)
            with m.Elif(pop & (hp == k)):
                m.d.sync += ent_full[k].eq(0)
        other_full = Mux(hp, ent_full[0], ent_full[1])
        m.d.sync += have.eq(Mux(pop, other_full | (push & (wp != hp)), have | (push & (wp == hp))))
        m.d.sync += Assert(have == ent_full.bit_select(hp, 1), "merger: have out of step")

        in_beat = self.i_beat.payload.beat
        free = self.i_free
        done_set = self.i_beat.valid & in_beat.last
        errf_set = self.i_beat.valid & in_beat.err
        with m.If(free.valid):
            m.d.sync += [done.bit_select(free.payload, 1).eq(0),
                         errf.bit_select(free.payload, 1).eq(0)]
        with m.If(done_set):
            m.d.sync += done.bit_select(in_beat.tag, 1).eq(1)
        with m.If(errf_set):
            m.d.sync += errf.bit_select(in_beat.tag, 1).eq(1)

        def flag_next(flags, set_now, slot):
            """The value ``flags[slot]`` has next cycle (the updates above, for one slot)."""
            cleared = free.valid & (free.payload == slot)
            return (flags.bit_select(slot, 1) & ~cleared) | (set_now & (in_beat.tag == slot))

        # each entry's slot flags follow its slot; a free entry at `wp` loads the incoming one
        ent_next = []
        done_next, err_next = [Signal(name=f"done_next{k}") for k in range(2)], \
            [Signal(name=f"err_next{k}") for k in range(2)]
        for k in range(2):
            load = ~ent_full[k] & (wp == k)
            with m.If(load):
                m.d.sync += ent[k].eq(x_in)
            ent_next.append(Mux(load, x_in.as_value(), ent[k].as_value()))
            # both slots' flags are looked up in parallel and `load` (late: it waits on the
            # descriptor queue's valid) only picks one of the two
            held, incoming = ent[k].desc.slot, x_in.desc.slot
            m.d.comb += [done_next[k].eq(Mux(load, flag_next(done, done_set, incoming),
                                             flag_next(done, done_set, held))),
                         err_next[k].eq(Mux(load, flag_next(errf, errf_set, incoming),
                                            flag_next(errf, errf_set, held)))]

        # The head's one-bit flags (the issue stage's first decisions) and its slot flags are
        # registers of their own, loaded with what the pointer will select next: the decisions
        # then start from flip-flops, not from the head pointer's select over both entries.
        hp_next = hp ^ pop
        head_done, head_err = Signal(), Signal()
        m.d.sync += [head_done.eq(Mux(hp_next, done_next[1], done_next[0])),
                     head_err.eq(Mux(hp_next, err_next[1], err_next[0]))]
        m.d.comb += [self.o_done.eq(head_done), self.o_err.eq(head_err)]
        for path in _HEAD_FLAGS:
            field = self.o_head.payload
            for name in path:
                field = field[name]
            offset = _offset(xl, path)
            flag = Signal(name="head_" + "_".join(path))
            m.d.sync += flag.eq(Mux(hp_next, ent_next[1][offset], ent_next[0][offset]))
            m.d.comb += field.eq(flag)
            m.d.sync += Assert(flag == Mux(hp, ent[1].as_value()[offset], ent[0].as_value()[offset]),
                               "merger: a head flag out of step")
        head_slot = self.o_head.payload.desc.slot
        m.d.sync += [
            Assert(~have | (self.o_done == done.bit_select(head_slot, 1)), "merger: slot_done"),
            Assert(~have | (self.o_err == errf.bit_select(head_slot, 1)), "merger: slot_err"),
        ]
        return m
