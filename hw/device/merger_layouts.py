"""What the parts of :class:`~.merger.ResultMerger` share: its sizes, hazard distances and the
payload layouts of the streams between them.

One definition of each: the ports of the merger (``row_layout``, ``desc_layout``,
``out_layout``), the geometry derived from ``Params`` and ``n_slots`` (:class:`MergerGeometry`),
and the facts that travel between the components (a descriptor with its precomputed op counts,
an op on its way through the block RAM read stages, a finished bag handed to the emitter).
"""
from amaranth import Cat, unsigned
from amaranth.lib import data

from ..lib.fma import Fp32Fma
from ..lib.fpu import Fp32Adder
from ..regmap import ELEM_BITS, ROWWISE_HEADER_BYTES, Params
from .rowwise_lane import RowwiseLane

__all__ = ["MergerGeometry", "row_layout", "desc_layout", "out_layout", "entry_layout",
           "issue_op_layout", "emit_op_layout", "stage_op_layout", "bag_layout",
           "ACCUM_HAZARD_CYCLES", "FMA_PATH_LATENCY", "FMA_HAZARD_CYCLES"]

# Cycles from issuing an accumulate op on acc[j] to the first cycle a new op on acc[j] may issue:
# issue -> Q -> R (memory data) -> R2 -> W (operands) -> adder (LATENCY) -> write, which stage
# R2 forwards to an op issued up to two cycles before it.
ACCUM_HAZARD_CYCLES = Fp32Adder.LATENCY + 2
# Weighted and row-wise INT8 bags take the FMA path from stage W to the accumulator write: the
# per-op products scale*w and bias*w (Fp32Fma, the element's int->fp conversion alongside),
# then a RowwiseLane. Its rows are one op longer (the header op), hence + 1.
FMA_PATH_LATENCY = Fp32Fma.LATENCY + RowwiseLane.LATENCY
FMA_HAZARD_CYCLES = FMA_PATH_LATENCY + 3


def slot_bits(n_slots: int) -> int:
    """Bits of a ROB slot number; ``n_slots`` must be a power of two 2..256."""
    if not (isinstance(n_slots, int) and 2 <= n_slots <= 256 and n_slots & (n_slots - 1) == 0):
        raise ValueError(f"n_slots={n_slots!r}: must be a power of two 2..256")
    return n_slots.bit_length() - 1


def log2_ceil(n: int) -> int:
    return (n - 1).bit_length()


class MergerGeometry:
    """Sizes derived from ``params`` and ``n_slots`` that every part of the merger uses.

    ``K`` 32-bit lanes per ROB beat (``Wc`` bits), ``H`` words per host beat, ``beat_bits`` for a
    beat within a ROB slot, ``max_ops`` ops per row at most (int8 rows: one element per byte),
    ``acc_jbits`` for an accumulator word within a bank, ``hoff``: an INT8_ROWWISE row's element
    op ``j >= 1`` reads the int8 op at ``j - 1 + 4/K`` (its codes start at byte 4).
    """

    def __init__(self, params: Params, n_slots: int):
        if not isinstance(params, Params):
            raise ValueError(f"params={params!r}: must be a regmap.Params")
        self.params = params
        self.n_slots = n_slots
        self.tb = slot_bits(n_slots)
        self.Wc = params.ch_data_bits
        self.K = self.Wc // 32
        self.log2K = log2_ceil(self.K)
        self.H = params.host_data_bits // 32
        self.beat_bits = log2_ceil(-(-params.max_row_bytes * 8 // self.Wc))
        self.max_ops = -(-params.max_row_bytes // self.K)
        self.acc_jbits = log2_ceil(self.max_ops)
        self.hoff = ROWWISE_HEADER_BYTES // self.K - 1 if self.K <= ROWWISE_HEADER_BYTES else 0

    def acc_addr(self, j, bank):
        """Accumulator RAM address of word ``j`` in ``bank`` (two banks: one sums, one emits)."""
        return Cat(j[:self.acc_jbits], bank) if self.acc_jbits else bank

    def rob_addr(self, beat, slot):
        """ROB RAM address of ``beat`` of ``slot``'s row."""
        return Cat(beat[:self.beat_bits], slot) if self.beat_bits else slot


def row_layout(params: Params, n_slots: int) -> data.StructLayout:
    """Payload of ``i_row[c]``: one beat of a row returned by a flash channel."""
    return data.StructLayout({
        "data": unsigned(params.ch_data_bits),
        "last": unsigned(1),
        "err": unsigned(1),
        "tag": unsigned(slot_bits(n_slots)),
    })


def desc_layout(n_slots: int) -> data.StructLayout:
    """Payload of ``i_desc``: one lookup (or empty-bag token) in request order."""
    return data.StructLayout({
        "slot": unsigned(slot_bits(n_slots)),
        "row_bytes": unsigned(16),
        "elem": unsigned(ELEM_BITS),
        "pooled": unsigned(1),
        "weighted": unsigned(1),
        "weight": unsigned(32),
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


def entry_layout(g: MergerGeometry) -> data.StructLayout:
    """A descriptor with its op count, shape and the issue stage's per-row flags, computed
    before the descriptor FIFO so that the issue stage loads them without arithmetic."""
    return data.StructLayout({
        "desc": desc_layout(g.n_slots), "n_ops": range(g.max_ops + 1), "last_cnt": range(g.K + 1),
        "sub_shift": unsigned(2),    # log2(elements of one ROB beat / K)
        "one_op": unsigned(1),
        "gather": unsigned(1),       # a GATHER lookup (not an empty-bag token)
        "accum": unsigned(1),        # a good pooled lookup (unless its row has err)
        "bad_or_empty": unsigned(1),
        "pooled_or_empty": unsigned(1),   # no ops when bad or err (with gather = 0)
        "goes_emit": unsigned(1),    # the bag ends with it: the emitter takes it over
        "hdr": unsigned(1),          # a pooled INT8_ROWWISE row: op 0 reads scale and bias
        "fma": unsigned(1),          # pooled through the FMA path (weighted or row-wise)
    })


def _output_fields(g: MergerGeometry) -> dict:
    # what an output op tells the packer: zeros or data, words, command end and its err
    return {"zero": unsigned(1), "count": range(g.K + 1), "last": unsigned(1), "err": unsigned(1)}


def _accum_fields(g: MergerGeometry) -> dict:
    # what an accumulate op tells the accumulator path
    return {
        "first": unsigned(1),        # the bag's first good row: sum from the identity
        "addr": unsigned(g.acc_jbits + 1),   # accumulator word (bank bit on top)
        "sub": unsigned(2),          # which part of the ROB beat holds the op's elements
        "elem": unsigned(ELEM_BITS),
        "fma": unsigned(1), "rowwise": unsigned(1), "weighted": unsigned(1),
        "weight": unsigned(32),
    }


def issue_op_layout(g: MergerGeometry) -> data.StructLayout:
    """An op of the issue stage (``valid`` = it fires): an accumulate, an INT8_ROWWISE header
    read (``hdr``) or an output op (``out``: a GATHER beat or zeros)."""
    return data.StructLayout({"accum": unsigned(1), "out": unsigned(1), "hdr": unsigned(1),
                              **_accum_fields(g), **_output_fields(g)})


def emit_op_layout(g: MergerGeometry) -> data.StructLayout:
    """An output op of the bag emitter: one accumulator word of sums (or zeros)."""
    return data.StructLayout(_output_fields(g))


def stage_op_layout(g: MergerGeometry) -> data.StructLayout:
    """The facts of the op in one block RAM read stage (Q or R). ``accum``, ``out`` and ``hdr``
    say what it is (none: no op); ``is_sum``: an output op of the emitter (accumulator data)."""
    return data.StructLayout({"accum": unsigned(1), "out": unsigned(1), "hdr": unsigned(1),
                              "is_sum": unsigned(1), **_accum_fields(g), **_output_fields(g)})


def bag_layout(g: MergerGeometry) -> data.StructLayout:
    """A finished bag handed from the issue stage to the emitter."""
    return data.StructLayout({
        "bank": unsigned(1), "n": range(g.max_ops + 1), "last_cnt": range(g.K + 1),
        "zero": unsigned(1),         # no good row: the bag's result is zeros
        "cmd_last": unsigned(1), "err": unsigned(1),
        "hdr": unsigned(1),          # a row-wise bag: its sums start at word 1
    })
