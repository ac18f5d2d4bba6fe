"""EV Merger: the reorder buffer (ROB) and the in-order retirement of rows and pooled bags.

Interface note for the integrator (hw/engine.py, hw/device.py). Widths: ``Wc = ch_data_bits``,
``Wh = host_data_bits``, ``T = log2(n_slots)``.

``ResultMerger(params: Params, n_slots: int)``; ``n_slots`` is a power of two, 2..256.

Ports (all ``lib.stream`` unless noted; payloads are ``lib.data.StructLayout``):

``i_row``: ``In(stream.Signature(row_layout(params, n_slots))).array(params.n_channels)``
    ``i_row[c]`` carries channel ``c``'s row beats: ``{data: Wc, last: 1, err: 1, tag: T}``.
    ``tag`` is the ROB slot the engine gave the lookup; ``data`` holds the row's bytes realigned
    to byte 0 (little-endian: byte 0 in bits 7:0), ``ceil(row_bytes*8/Wc)`` beats, the last one
    zero-padded, ``last`` on the final beat. ``err`` on any beat marks the row as failed (AXI
    error): its data is treated like a bad lookup and the command reports ``err``. Beats of one
    row must be contiguous *within its channel*; different channels interleave freely. The
    merger accepts one beat per cycle in total (round-robin over the channels).

``i_desc``: ``In(stream.Signature(desc_layout(n_slots)))``, one per lookup **in request order**,
    plus one token per empty bag: ``{slot: T, row_bytes: 16, elem: 2, pooled: 1, bad: 1,
    bag_end: 1, empty_bag: 1, cmd_end: 1}``.
    - ``row_bytes``: the table's row size, a multiple of 4, 4..max_row_bytes (also on tokens).
    - ``elem``: ``regmap.ElemType`` (only used when ``pooled``).
    - ``pooled``: 0 = GATHER (row bytes copied), 1 = GATHER_POOLED (summed per bag).
    - ``bad``: the lookup has a slot but no data will ever arrive for it (bad index).
    - ``bag_end``: last lookup of a bag (pooled only): the bag's sum is emitted after it.
    - ``empty_bag``: a token for a bag with no lookups (``slot`` ignored, no slot is freed):
      emits a zero row of ``pooled_row_bytes(row_bytes, elem)`` bytes.
    - ``cmd_end``: the last descriptor of the command; it must be one that emits output (a
      GATHER lookup, a pooled ``bag_end`` lookup or an ``empty_bag`` token).

``o_data``: ``Out(stream.Signature(out_layout(params)))``: ``{data: Wh, last: 1, err: 1}``.
    The packed result bytes of each command, in request order, contiguous from byte 0 of the
    first beat (32-bit words packed little-endian). ``last`` marks the command's final beat,
    which is zero-padded past the end of the results; ``err`` (valid on the ``last`` beat) says a
    row of this command had ``err`` set. Result size per command: GATHER ``sum(row_bytes)``;
    POOLED ``n_bags * pooled_row_bytes`` (every element widens to 4 bytes).

``o_free``: ``Out(stream.Signature(unsigned(T), always_ready=True))``: one pulse per retired
    lookup (good or bad, never for ``empty_bag`` tokens) carrying the freed slot. The slot may
    be reused (new ``i_row`` beats with that tag) from the next cycle on.

Retirement semantics (bit-exact with ``evssd.host.pooling.pool_rows``):
    GATHER: good row -> its ``row_bytes`` bytes; bad or err row -> ``row_bytes`` zero bytes.
    POOLED: per bag, good rows summed element-wise in bag order. fp32: IEEE-754 binary32 RNE,
    acc = ((-0.0 + r0) + r1) + ... (so a one-row bag returns r0, and -0.0 stays -0.0), subnormals
    kept, every NaN result is the canonical quiet NaN 0x7FC00000. fp16: each element widened
    exactly to fp32, then summed as fp32. int8: sign-extended, int32 wrapping sums. int32:
    wrapping sums. Bad/err rows are skipped; a bag with no good rows (or an empty bag) is zeros.
"""
from __future__ import annotations

from amaranth import unsigned
from amaranth.lib import data

from .regmap import Params

__all__ = ["ResultMerger", "row_layout", "desc_layout", "out_layout"]


def _slot_bits(n_slots: int) -> int:
    if not (isinstance(n_slots, int) and 2 <= n_slots <= 256 and n_slots & (n_slots - 1) == 0):
        raise ValueError(f"n_slots={n_slots!r}: must be a power of two 2..256")
    return n_slots.bit_length() - 1


def row_layout(params: Params, n_slots: int) -> data.StructLayout:
    """Payload of ``i_row[c]``: one beat of a row returned by a flash channel."""
    return data.StructLayout({
        "data": unsigned(params.ch_data_bits),
        "last": unsigned(1),
        "err": unsigned(1),
        "tag": unsigned(_slot_bits(n_slots)),
    })


def desc_layout(n_slots: int) -> data.StructLayout:
    """Payload of ``i_desc``: one lookup (or empty-bag token) in request order."""
    return data.StructLayout({
        "slot": unsigned(_slot_bits(n_slots)),
        "row_bytes": unsigned(16),
        "elem": unsigned(2),
        "pooled": unsigned(1),
        "bad": unsigned(1),
        "bag_end": unsigned(1),
        "empty_bag": unsigned(1),
        "cmd_end": unsigned(1),
    })


def out_layout(params: Params) -> data.StructLayout:
    """Payload of ``o_data``: packed result bytes for the DMA write engine."""
    return data.StructLayout({
        "data": unsigned(params.host_data_bits),
        "last": unsigned(1),
        "err": unsigned(1),
    })


class ResultMerger:  # implementation follows; the interface above is final
    pass
