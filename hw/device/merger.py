"""EV Merger: the reorder buffer (ROB) and the in-order retirement of rows and pooled bags.

Interface note for the integrator (hw/device/engine.py, hw/device/top.py). Widths: ``Wc = ch_data_bits``,
``Wh = host_data_bits``, ``T = log2(n_slots)``.

``ResultMerger(params: Params, n_slots: int)``; ``n_slots`` is a power of two, 2..256.

Ports (all ``lib.stream`` unless noted; payloads are ``lib.data.StructLayout``):

``i_row``: ``In(stream.Signature(row_layout(params, n_slots))).array(params.n_channels)``
    ``i_row[c]`` carries channel ``c``'s row beats: ``{data: Wc, last: 1, err: 1, tag: T}``.
    ``tag`` is the ROB slot the engine gave the lookup; ``data`` holds the row's bytes realigned
    to byte 0 (little-endian: byte 0 in bits 7:0), ``ceil(row_bytes*8/Wc)`` beats, the last one
    padded (the padding's content is ignored), ``last`` on the final beat. ``err`` on any beat
    marks the row as failed (AXI error): its data is treated like a bad lookup and the command
    reports ``err``; such a row must still end with its ``last`` beat. Beats of one row are
    contiguous *within its channel*; channels interleave freely and may return rows in any
    order relative to each other. The merger takes one beat per cycle in total: round-robin over
    the channels, staying on a channel until its row's ``last`` beat while that channel keeps
    ``valid`` up (so rows complete, and retire, early).

``i_desc``: ``In(stream.Signature(desc_layout(n_slots)))``, one per lookup **in request order**,
    plus one token per empty bag: ``{slot: T, row_bytes: 16, elem: 3, pooled: 1, weighted: 1,
    weight: 32, bad: 1, bag_end: 1, empty_bag: 1, cmd_end: 1}``.
    - ``row_bytes``: the table's row size, a multiple of 4, 4..max_row_bytes (also on tokens).
      Out of range values never hang the merger but give wrong data (larger rows wrap inside
      their slot; a 0-byte row adds no bytes, so a command of only such rows has no ``last``).
    - ``elem``: ``regmap.ElemType`` (only used when ``pooled``). INT8_ROWWISE needs
      ``ResultMerger.supports_rowwise(params)`` (``ch_data_bits <= 128``).
    - ``pooled``: 0 = GATHER (row bytes copied), 1 = GATHER_POOLED (summed per bag).
    - ``weighted``/``weight``: GATHER_POOLED_WEIGHTED, the lookup's fp32 weight (bits); the
      same for every lookup of a bag in ``weighted`` (one command).
    - ``bad``: the lookup has a slot but no data will ever arrive for it (bad index).
    - ``bag_end``: last lookup of a bag (pooled only): the bag's sum is emitted after it.
    - ``empty_bag``: a token for a bag with no lookups (``slot`` ignored, no slot is freed;
      send it with ``pooled=1``): emits a zero row of ``pooled_row_bytes(row_bytes, elem)``
      bytes.
    - ``cmd_end``: the last descriptor of the command; it must be one that emits output (a
      GATHER lookup, a pooled ``bag_end`` lookup or an ``empty_bag`` token).
    ``i_desc`` enters an internal FIFO of ``max(4, 2*n_slots)`` descriptors
    (``ResultMerger.desc_depth``; plus a two-entry register slice in front of it and two row
    entries behind it):
    ``i_desc.ready`` comes from a register and does not wait for rows, so a fork that
    sends each lookup both to the channels and here is not held up by the merger waiting for
    an older row (only the slot credits limit the lookups in flight).

``o_data``: ``Out(stream.Signature(out_layout(params)))``: ``{data: Wh, last: 1, err: 1}``.
    The packed result bytes of each command, in request order, contiguous from byte 0 of the
    first beat (32-bit words packed little-endian). ``last`` marks the command's final beat,
    which is zero-padded past the end of the results; ``err`` (valid on the ``last`` beat) says a
    row of this command had ``err`` set. Result size per command: GATHER ``sum(row_bytes)``;
    POOLED ``n_bags * pooled_row_bytes`` (every element widens to 4 bytes).

``o_free``: ``Out(stream.Signature(unsigned(T), always_ready=True))``: one pulse per retired
    lookup (good or bad, never for ``empty_bag`` tokens) carrying the freed slot, from a
    register (no combinational path from any input). The slot may be reused (new ``i_row``
    beats with that tag) from the cycle ``o_free.valid`` is high on.

Retirement semantics (bit-exact with ``evssd.host.pooling.pool_rows``):
    GATHER: good row -> its ``row_bytes`` bytes; bad or err row -> ``row_bytes`` zero bytes.
    POOLED: per bag, good rows summed element-wise in bag order. fp32: IEEE-754 binary32 RNE,
    acc = ((-0.0 + r0) + r1) + ... (so a one-row bag returns r0, -0.0 included), subnormals
    kept, every NaN result is the canonical quiet NaN 0x7FC00000 (a NaN in a one-row bag too).
    fp16: each element widened exactly to fp32, then summed as fp32. int8: sign-extended, int32
    wrapping sums. int32: wrapping sums. INT8_ROWWISE (fp16 scale, fp16 bias, uint8 codes):
    ``acc = fma(scale, float32(q), acc + bias)`` per element from -0.0. Weighted: ``acc =
    fma(w, float32(x), acc)`` from -0.0, fp32 for every type (int8/int32 rounded to fp32 first);
    weighted INT8_ROWWISE uses ``scale*w`` and ``bias*w``, each rounded to fp32. Bad/err rows are
    skipped; a bag with no good rows (or an empty bag) is +0 zeros.

Throughput (measured in tests/hw/test_merger.py and with the same harness, no back-pressure,
one channel, rows already arriving at one beat per cycle; "beats" are ROB beats of Wc bits):
    - GATHER, ch64/host64, 64 B rows: 0.981 beats/cycle (768 beats in 783 cycles).
    - POOLED fp32/int32, 64 B rows (8 beats), bags of 8 rows: 0.965; bags of 1 row: 0.41
      (a bag's sums go out while the next bag accumulates, but the emitter holds one bag at a
      time: a bag-ending row starts only once the previous bag's emission is done).
    - POOLED fp16: 0.49, int8: 0.25 (each beat widens into 2 or 4 groups of K 32-bit lanes).
    - Rows shorter than ``ACCUM_HAZARD_CYCLES`` (8) beats: one pooled row per 8 cycles within a
      bag (the adder latency; sums stay strictly sequential, so no reassociation is possible).
    - Wc > Wh: output-bound at one host beat per cycle (ch256/host64 gather: 0.996 host beats/cycle).
    - Weighted and INT8_ROWWISE bags: one op per cycle like int8 (a row-wise row takes one more
      op, its header), but a bag's rows start at most every ``FMA_HAZARD_CYCLES`` (29) cycles,
      and a row of the adder path starts only ``FMA_PATH_LATENCY - Fp32Adder.LATENCY`` (20)
      cycles after the last FMA-path op (the two paths share the accumulator's write port).
    One ROB write per cycle is shared by all channels.

Resources: ``K = Wc/32`` Fp32Adders (+K int32 adders, K fp16 converters); for the FMA path
K RowwiseLanes (an Fp32Adder + an Fp32Fma each), K Int32ToFp32 and two shared Fp32Fma for the
per-op products; ROB memory
``n_slots * 2**ceil(log2(ceil(max_row_bytes*8/Wc)))`` words of Wc bits (1 write, 1 read port);
accumulator memory 2 banks of ``2**ceil(log2(ceil(max_row_bytes/K)))`` words of Wc bits (1 write
port, two copies for the two readers); a packer of ``Wh + Wc`` bits. Measured numbers and the
timing rounds that shaped the pipeline: docs/synthesis.md.

Pipeline (every decision starts from registers, so the merger closes 100 MHz on the board):
each channel's beats wait in a two-entry buffer; the round-robin grant is a register decided a
cycle ahead from the buffers' next levels, and the granted beat is registered before it is
written to the ROB and marks its slot. The ROB and the two accumulator copies are
:class:`~evssd.hw.lib.block_ram.BlockRAM` s (DP16KD with the output register, read latency 2): an
op's facts wait one cycle in stage Q; stage R2 registers the accumulator read data and forwards
the last three writes (the reads are not write-transparent), the emitter waits two cycles more,
and simulation ``Assert``s check both hazard rules. Output ops (the issue stage's GATHER reads
and zeros, the emitter's sums, never in the same cycle) enter an output FIFO of
``OUT_FIFO_DEPTH`` entries, credit-limited by a registered ``out_ok``: stage R never stalls and
no handshake behind the issue stage reaches its decision. Descriptors get their op counts and
per-row flags before the descriptor FIFO (behind a register slice); behind it, two row entries
are read through a head pointer, so retiring a row flips the pointer, and each entry tracks its
slot's done/err flags; a retired slot's flags clear from the registered ``o_free``. The packer
places input words at ``fill`` for both outcomes of the cycle's output and lets ``out_fire``
pick one last; a register slice sits on ``o_data``.
"""
from amaranth import C, Cat, Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..lib.fma import Fp32Fma
from ..lib.fpu import Fp16ToFp32, Fp32Adder
from ..lib.int_to_fp import Int32ToFp32
from ..regmap import ELEM_BITS, ROWWISE_HEADER_BYTES, ElemType, Params
from .rowwise_lane import RowwiseLane
from .merger_intake import RowIntake
from .merger_packer import WordPacker
from ..lib.block_ram import BlockRAM
from ..lib.skid_buffer import SkidBuffer

__all__ = ["ResultMerger", "WordPacker", "row_layout", "desc_layout", "out_layout",
           "ACCUM_HAZARD_CYCLES", "FMA_PATH_LATENCY", "FMA_HAZARD_CYCLES"]

# Cycles from issuing an accumulate op on acc[j] to the first cycle a new op on acc[j] may issue:
# issue -> Q -> R (memory data) -> R2 -> W (operands) -> adder (LATENCY) -> write, which stage
# R2 forwards to an op issued up to two cycles before it.
ACCUM_HAZARD_CYCLES = Fp32Adder.LATENCY + 2
# Weighted and row-wise INT8 bags take the FMA path from stage W to the accumulator write: the
# per-op products scale*w and bias*w (Fp32Fma, the element's int->fp conversion alongside),
# then a RowwiseLane. Its rows are one op longer (the header op, see ResultMerger), hence + 1.
FMA_PATH_LATENCY = Fp32Fma.LATENCY + RowwiseLane.LATENCY
FMA_HAZARD_CYCLES = FMA_PATH_LATENCY + 3


def _slot_bits(n_slots: int) -> int:
    if not (isinstance(n_slots, int) and 2 <= n_slots <= 256 and n_slots & (n_slots - 1) == 0):
        raise ValueError(f"n_slots={n_slots!r}: must be a power of two 2..256")
    return n_slots.bit_length() - 1


def _log2_ceil(n: int) -> int:
    return (n - 1).bit_length()


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


# op kinds of the retirement pipeline
_OP_READ, _OP_ZERO, _OP_ACCUM = 0, 1, 2


class ResultMerger(wiring.Component):
    """Reorder buffer + in-order retirement (GATHER rows, GATHER_POOLED bag sums); see the module
    docstring for the ports and the semantics.

    Structure: channel beats -> arbiter -> ROB memory (``n_slots`` x ``max_row_bytes``,
    ``ch_data_bits`` wide) with a done/err bit per slot. The issue stage walks the descriptors
    in order and sends one op per cycle: a ROB beat read (GATHER), zeros (bad/err GATHER rows)
    or an accumulate (pooled row: ``K = ch_data_bits/32`` elements widened to 32-bit lanes and
    summed into the accumulator memory by ``K`` Fp32Adders or int32 adders, or for weighted and
    INT8_ROWWISE bags by the FMA path: ``K`` RowwiseLanes behind two shared Fp32Fma that form
    ``scale*w`` and ``bias*w`` per op). An INT8_ROWWISE row starts with a header op that reads
    beat 0 (stage R2 keeps its scale and bias for the row's ops); its element op ``j >= 1``
    sums codes ``K(j-1)..`` (from byte 4) into accumulator word ``j``. At a bag's end it
    hands the bag to the emitter, which reads the sums (or sends zeros for a bag without good
    rows) from one accumulator bank while the next bag sums into the other. Output ops go
    through a :class:`WordPacker` to ``host_data_bits``. A pooled row starts at least
    :data:`ACCUM_HAZARD_CYCLES` cycles after the previous row of its bag started, and the
    emitter waits as long after the bag's last row, so nobody reads an accumulator word whose
    sum is still in the adders.
    """

    OUT_FIFO_DEPTH = 10  # output ops between the issue stage and the packer (credit-limited)

    def __init__(self, params: Params, n_slots: int, *, ram_primitive: str | None = None):
        try:
            if not isinstance(params, Params):
                raise ValueError(f"params={params!r}: must be a regmap.Params")
            self._tb = _slot_bits(n_slots)
        except ValueError:
            self._MustUse__silence = True   # a rejected object is not an unused elaboratable
            raise
        self._p = params
        self._n_slots = n_slots
        self._ram_primitive = ram_primitive   # BlockRAM's: None = from the platform
        self.desc_depth = max(4, 2 * n_slots)
        super().__init__({
            "i_row": In(stream.Signature(row_layout(params, n_slots))).array(params.n_channels),
            "i_desc": In(stream.Signature(desc_layout(n_slots))),
            "o_data": Out(stream.Signature(out_layout(params))),
            "o_free": Out(stream.Signature(unsigned(self._tb), always_ready=True)),
        })

    @property
    def n_slots(self) -> int:
        return self._n_slots

    @staticmethod
    def supports_rowwise(params: Params) -> bool:
        """INT8_ROWWISE bags need the 4 header bytes to be whole ops of K bytes (K <= 4, i.e.
        ``ch_data_bits <= 128``); wider channels leave the type to the host (CAPS bit 0)."""
        return params.ch_data_bits // 32 <= ROWWISE_HEADER_BYTES

    def elaborate(self, platform):
        m = Module()
        p = self._p
        Wc = p.ch_data_bits
        K = Wc // 32
        log2K = _log2_ceil(K)
        H = p.host_data_bits // 32
        n_slots = self._n_slots
        beat_bits = _log2_ceil(-(-p.max_row_bytes * 8 // Wc))
        max_ops = -(-p.max_row_bytes // K)     # int8 rows: one element per byte
        L = Fp32Adder.LATENCY
        LF = FMA_PATH_LATENCY
        # an INT8_ROWWISE row's element op j >= 1 reads the int8 op at j - 1 + 4/K (its codes
        # start at byte 4); its header op (j = 0) reads beat 0
        hoff = ROWWISE_HEADER_BYTES // K - 1 if K <= ROWWISE_HEADER_BYTES else 0

        # Block RAMs with the output register on (read latency 2; on the ECP5 the data leave the
        # RAM 1.0 ns after the clock instead of 5.8 ns). The read enables are always on: nothing
        # behind the issue stage stalls. ROB: a slot's beats are read only after its last beat was
        # written (its done flag) and rewritten only after it is freed, so a read never meets a
        # write of its word. Accumulator: two banks (one sums the current bag while the emitter
        # sends the previous one), one copy per reader (the accumulate ops' read-modify-write
        # and the emitter); the reads are not write-transparent: stage R2 forwards the sums
        # written since the read, the emitter waits for them.
        acc_jbits = _log2_ceil(max_ops)
        m.submodules.rob = rob = BlockRAM(width=Wc, depth=n_slots << beat_bits,
                                          primitive=self._ram_primitive)
        m.submodules.acc_r = acc_r = BlockRAM(width=Wc, depth=2 << acc_jbits,
                                              primitive=self._ram_primitive)
        m.submodules.acc_e = acc_e = BlockRAM(width=Wc, depth=2 << acc_jbits,
                                              primitive=self._ram_primitive)
        for ram in (rob, acc_r, acc_e):
            m.d.comb += [ram.r_en.eq(1), ram.r_oe.eq(1)]
        acc_w_addr = Signal(acc_jbits + 1)
        acc_w_data = Signal(Wc)
        acc_w_en = Signal()
        for ram in (acc_r, acc_e):
            m.d.comb += [ram.w_addr.eq(acc_w_addr), ram.w_data.eq(acc_w_data),
                         ram.w_en.eq(acc_w_en.replicate(Wc // 8))]

        done = Signal(n_slots)
        errf = Signal(n_slots)

        # ---------------- channel beats -> ROB ----------------
        # RowIntake: one registered beat per cycle from the channels (round-robin, rows kept
        # whole); the beat is written to the ROB and marks its slot's flags in the same cycle
        m.submodules.intake = intake = RowIntake(p, n_slots, row_layout(p, n_slots))
        for c in range(p.n_channels):
            wiring.connect(m, wiring.flipped(self.i_row[c]), intake.i_row[c])
        in_beat = intake.o_beat.payload.beat
        in_valid = intake.o_beat.valid
        in_idx = intake.o_beat.payload.idx
        m.d.comb += [
            rob.w_addr.eq(Cat(in_idx[:beat_bits], in_beat.tag) if beat_bits else in_beat.tag),
            rob.w_data.eq(in_beat.data),
            rob.w_en.eq(in_valid.replicate(Wc // 8)),
        ]

        # ---------------- issue stage: descriptors -> ops, in order ----------------
        dl = desc_layout(n_slots)
        ops_shape = range(max_ops + 1)
        j = Signal(ops_shape)
        # Registered facts about the op at j, kept equal to what they stand for (j == 0,
        # j == n_ops - 1 after the first op). Computed in the cycle of use (comparators on j and
        # n_ops) they made the decision to retire the row, which fans out widely.
        first_op = Signal(init=1)
        later_last = Signal()
        bag_first = Signal(init=1)       # no good row in the current bag yet
        row_first = Signal()
        acc_bank = Signal()              # accumulator bank of the bag being summed
        cooldown = Signal(range(FMA_HAZARD_CYCLES))
        cooldown_next = Signal(range(FMA_HAZARD_CYCLES))
        sticky_err = Signal()
        em_busy = Signal()               # the emitter still has ops of a finished bag to send
        handed = Signal()                # a bag was handed over last cycle (emitter loads now)
        em_blocked = em_busy | handed    # the emitter has (or is taking) a bag

        # Descriptors wait in a FIFO: the engine forks each lookup to the channels and to here,
        # and must not be held up while the merger waits for an older row (that would leave at
        # most two lookups in flight). Lookups are credit-limited to n_slots; the rest of the
        # depth absorbs empty-bag tokens. A register slice in front of it keeps the engine's
        # fork off the FIFO's state, and each descriptor's op count and shape are computed
        # before it enters the FIFO, so the issue stage loads them without arithmetic. They are
        # worked out in two steps, one on each side of the
        # `desc_in` register slice, so that each side has at most one carry chain: in front of
        # it the flags and narrow fields, and the constant the op count adds to `row_bytes`;
        # behind it the op count, `(row_bytes + addend) >> (ish + log2K)`, one addition.
        # (The op count is ceil(n_elems / K) with n_elems = row_bytes >> ish, plus the
        # row-wise header op: for ish = 0 that is (row_bytes - 4 + K - 1 + K*hdr) >> log2K, and
        # for ish > 0 (row_bytes >> ish) + K - 1 >> log2K = (row_bytes + ((K - 1) << ish)) >>
        # (ish + log2K), since the bits shifted out cannot carry past a multiple of K.)
        sum_bits = dl.members["row_bytes"].width + 1
        pl = data.StructLayout({
            "desc": dl,
            "ish": unsigned(2),          # log2(itemsize); GATHER moves 32-bit words
            "hdr": unsigned(1),          # a pooled INT8_ROWWISE row: op 0 reads scale and bias
            "zero": unsigned(1),         # no elements (a 0-byte row: a broken table config)
            "one_op": unsigned(1),
            "last_cnt": range(K + 1),
            "addend": unsigned(sum_bits),
        })
        m.submodules.desc_in = desc_in = SkidBuffer(pl)
        d_in = self.i_desc.payload
        pre = desc_in.i.payload
        m.d.comb += [
            desc_in.i.valid.eq(self.i_desc.valid),
            self.i_desc.ready.eq(desc_in.i.ready),
            pre.desc.eq(d_in),
        ]
        with m.If(~d_in.pooled):
            m.d.comb += pre.ish.eq(2)
        with m.Else():
            with m.Switch(d_in.elem):
                with m.Case(ElemType.FP16):
                    m.d.comb += pre.ish.eq(1)
                with m.Case(ElemType.INT8, ElemType.INT8_ROWWISE):
                    m.d.comb += pre.ish.eq(0)
                with m.Default():
                    m.d.comb += pre.ish.eq(2)
        rb = d_in.row_bytes
        assert ROWWISE_HEADER_BYTES == 4
        rb_over_4 = (rb[3:] != 0) | (rb[2] & (rb[1] | rb[0]))     # row_bytes > 4, no carry chain
        hdr_in = d_in.pooled & (d_in.elem == ElemType.INT8_ROWWISE) & rb_over_4
        m.d.comb += pre.hdr.eq(hdr_in)
        with m.Switch(pre.ish):
            for sh in range(3):
                with m.Case(sh):
                    n_low = rb >> sh                      # elements of the row (before the header)
                    zero = n_low == 0                     # with a header the row has > 4 bytes
                    # the last op's element count, ((n_elems - 1) mod K) + 1, from the low bits
                    first = ROWWISE_HEADER_BYTES + 1 if sh == 0 else 1
                    low = (n_low[:log2K] - Mux(hdr_in, first, 1))[:log2K] if log2K else C(0, 1)
                    at_most_k = ((n_low >> log2K) == 0) | (n_low == K)   # n_elems <= K
                    if sh == 0:
                        addend = Mux(hdr_in, (2 * K - ROWWISE_HEADER_BYTES - 1) % (1 << sum_bits),
                                     K - 1)
                    else:
                        addend = C((K - 1) << sh, sum_bits)
                    m.d.comb += [
                        pre.zero.eq(zero),
                        pre.last_cnt.eq(Mux(zero, 0, low + 1)),
                        pre.one_op.eq(at_most_k & ~hdr_in),
                        pre.addend.eq(addend),
                    ]
        # a descriptor with its op count, shape and the issue stage's per-row flags
        xl = data.StructLayout({
            "desc": dl, "n_ops": ops_shape, "last_cnt": range(K + 1),
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
        q = desc_in.o.payload
        d_new = q.desc
        x_new = Signal(xl)
        m.d.comb += [
            x_new.desc.eq(d_new), x_new.sub_shift.eq(2 - q.ish),
            x_new.hdr.eq(q.hdr),
            x_new.fma.eq(d_new.pooled & (d_new.weighted | (d_new.elem == ElemType.INT8_ROWWISE))),
            x_new.last_cnt.eq(q.last_cnt),
            x_new.one_op.eq(q.one_op),
            x_new.gather.eq(~d_new.pooled & ~d_new.empty_bag),
            x_new.accum.eq(d_new.pooled & ~d_new.empty_bag & ~d_new.bad),
            x_new.bad_or_empty.eq(d_new.bad | d_new.empty_bag),
            x_new.pooled_or_empty.eq(d_new.pooled | d_new.empty_bag),
            x_new.goes_emit.eq(d_new.empty_bag | (d_new.pooled & d_new.bag_end)),
        ]
        ops_sum = Signal(sum_bits)
        m.d.comb += ops_sum.eq(d_new.row_bytes + q.addend)
        # a 0-byte row still takes one op of no words, so the issue stage cannot wait forever
        # for an op count of zero
        with m.Switch(q.ish):
            for sh in range(3):
                with m.Case(sh):
                    m.d.comb += x_new.n_ops.eq(Mux(q.zero, 1, ops_sum >> (sh + log2K)))
        m.submodules.desc_fifo = dfifo = SyncFIFOBuffered(width=xl.size, depth=self.desc_depth)
        m.d.comb += [
            dfifo.w_data.eq(x_new),
            dfifo.w_en.eq(desc_in.o.valid),
            desc_in.o.ready.eq(dfifo.w_rdy),
        ]
        # Behind the FIFO, two row entries: the head (at `hp`) is the current row, the other
        # one the next. Retiring a row flips `hp` and a few flags; the row's fields are read
        # through the head mux (registers, early), so the late retire decision loads nothing
        # wide. Entries load from the FIFO whenever free (eagerly), and each entry tracks its
        # slot's done/err flags, so the head's flags never wait on the retire decision either.
        ent = [Signal(xl, name=f"row{k}") for k in range(2)]
        ent_full = Signal(2)
        ent_done = Signal(2)
        ent_err = Signal(2)
        hp = Signal()
        wp = Signal()
        have = Signal()                  # == ent_full[hp]
        # The FIFO's read data is block RAM output (5.6 ns clock-to-out on ECP5, no output
        # register): a register slice behind it lets the entries' slot-flag lookup (a
        # `n_slots`:1 mux by the incoming slot) start from flip-flops.
        m.submodules.desc_out = desc_out = SkidBuffer(xl)
        m.d.comb += [
            desc_out.i.payload.eq(dfifo.r_data),
            desc_out.i.valid.eq(dfifo.r_rdy),
            dfifo.r_en.eq(desc_out.i.ready),
        ]
        x_in = desc_out.o.payload
        w_free = ~ent_full.bit_select(wp, 1)
        push = desc_out.o.valid & w_free
        m.d.comb += desc_out.o.ready.eq(w_free)
        cur_x = Signal(xl)
        m.d.comb += cur_x.eq(Mux(hp, ent[1], ent[0]))
        cur = cur_x.desc
        n_ops, last_cnt, sub_shift = cur_x.n_ops, cur_x.last_cnt, cur_x.sub_shift
        slot_done = Mux(hp, ent_done[1], ent_done[0])
        slot_err = Mux(hp, ent_err[1], ent_err[0])
        last_op = Mux(first_op, cur_x.one_op, later_last)
        c_gather, c_accum, c_bad = cur_x.gather, cur_x.accum, cur.bad
        c_bad_or_empty, c_pooled_or_empty = cur_x.bad_or_empty, cur_x.pooled_or_empty
        cd_ok = Signal(init=1)           # == (cooldown == 0) | bag_first
        row_ok = c_bad_or_empty | slot_done
        row_has_ops = c_gather | (c_accum & ~slot_err)
        goes_emit = cur_x.goes_emit

        # The op the issue stage would send this cycle. A pooled row starts only when the
        # previous row of its bag has left the adders far enough (cooldown) and, if it ends the
        # bag, when the emitter is free to take the bag over at the row's last op: a started
        # pooled row then never stalls, which the cooldown arithmetic relies on.
        op_valid = Signal()
        op_kind = Signal(2)
        with m.If(have & c_gather):
            # GATHER output must not overtake a bag the emitter is still sending
            m.d.comb += [op_valid.eq((~first_op | c_bad | slot_done) & ~em_blocked),
                         op_kind.eq(Mux(c_bad | slot_err, _OP_ZERO, _OP_READ))]
        plain_ok = Signal(init=1)        # == (fma_recent == 0): see the accumulator write port
        with m.Elif(have & c_accum & ~slot_err):
            m.d.comb += [op_valid.eq(~first_op | (slot_done & cd_ok & (~goes_emit | ~em_blocked) &
                                                  (cur_x.fma | plain_ok))),
                         op_kind.eq(_OP_ACCUM)]
        op_cmd_last = cur.cmd_end & last_op & ~cur.pooled
        noop_step = (have & c_pooled_or_empty & ~(c_accum & ~slot_err) & row_ok &
                     (~goes_emit | ~em_blocked))

        # Output ops (GATHER reads and zeros, the emitter's sums) are credit-limited so that the
        # stages behind the issue stage never stall: `out_ok` (a register) says the output FIFO
        # has room for one more op on top of those in flight. Accumulate ops need no credit, and
        # a started pooled row must never stall (the cooldown arithmetic relies on it).
        out_ok = Signal(init=1)
        fire = op_valid & (cur.pooled | out_ok)
        row_err_now = Signal()           # a row with err retires now
        m.d.comb += row_err_now.eq(have & ~cur.bad & ~cur.empty_bag & slot_err &
                                   Mux(row_has_ops, fire & first_op, noop_step))
        free_now = have & ~cur.empty_bag & Mux(row_has_ops, fire & last_op, noop_step)
        # registered: the engine's credit logic then never sees o_data.ready combinationally
        m.d.sync += [self.o_free.valid.eq(free_now), self.o_free.payload.eq(cur.slot)]
        finish = Signal()
        m.d.comb += finish.eq((fire & last_op) | noop_step)
        handover = finish & goes_emit
        pop = finish                     # (finish implies have)
        m.d.sync += [wp.eq(wp ^ push), hp.eq(hp ^ pop)]
        for k in range(2):
            with m.If(push & (wp == k)):
                m.d.sync += ent_full[k].eq(1)
            with m.Elif(pop & (hp == k)):
                m.d.sync += ent_full[k].eq(0)
        other_full = Mux(hp, ent_full[0], ent_full[1])
        m.d.sync += have.eq(Mux(pop, other_full | (push & (wp != hp)), have | (push & (wp == hp))))
        m.d.sync += Assert(have == ent_full.bit_select(hp, 1), "merger: have out of step")

        # The slot's flags are cleared one cycle after it retires, from the registered o_free
        # (free_now -> decode was on the critical path); the engine reuses a slot only after
        # o_free, so no beat or descriptor of the slot's next use can see the stale flags.
        done_set = in_valid & in_beat.last
        errf_set = in_valid & in_beat.err
        with m.If(self.o_free.valid):
            m.d.sync += [done.bit_select(self.o_free.payload, 1).eq(0),
                         errf.bit_select(self.o_free.payload, 1).eq(0)]
        # a slot is freed before the engine can reuse it, so set and clear never meet
        with m.If(done_set):
            m.d.sync += done.bit_select(in_beat.tag, 1).eq(1)
        with m.If(errf_set):
            m.d.sync += errf.bit_select(in_beat.tag, 1).eq(1)

        def flag_next(flags, set_now, slot):
            """The value ``flags[slot]`` has next cycle (the updates above, for one slot)."""
            cleared = self.o_free.valid & (self.o_free.payload == slot)
            return (flags.bit_select(slot, 1) & ~cleared) | (set_now & (in_beat.tag == slot))

        # each entry's slot flags follow its slot; a free entry at `wp` loads the incoming one
        for k in range(2):
            load = ~ent_full[k] & (wp == k)
            with m.If(load):
                m.d.sync += ent[k].eq(x_in)
            slot = Mux(load, x_in.desc.slot, ent[k].desc.slot)
            m.d.sync += [ent_done[k].eq(flag_next(done, done_set, slot)),
                         ent_err[k].eq(flag_next(errf, errf_set, slot))]
        m.d.sync += [
            Assert(~have | (slot_done == done.bit_select(cur.slot, 1)), "merger: slot_done"),
            Assert(~have | (slot_err == errf.bit_select(cur.slot, 1)), "merger: slot_err"),
        ]

        # a row ends with its last op (j back to 0, first_op set) or takes no op at all, so a
        # new head always starts at j == 0 with first_op set
        # jr == j + hoff: a row-wise row's ROB op index, a register (no adder on the RAM address)
        jr = Signal(range(max_ops + hoff + 1), init=hoff)
        with m.If(fire):
            m.d.sync += [j.eq(Mux(last_op, 0, j + 1)), first_op.eq(last_op),
                         later_last.eq(j + 2 == n_ops), jr.eq(Mux(last_op, hoff, jr + 1))]
        m.d.sync += Assert(jr == j + hoff, "merger: jr out of step")
        m.d.sync += Assert(~have | (last_op == (j == n_ops - 1)) | (n_ops == 0),
                           "merger: last_op out of step")

        is_accum = op_kind == _OP_ACCUM
        accum_start = fire & is_accum & first_op
        with m.If(accum_start):
            m.d.comb += cooldown_next.eq(Mux(cur_x.fma, FMA_HAZARD_CYCLES - 1,
                                             ACCUM_HAZARD_CYCLES - 1))
        with m.Elif(cooldown != 0):
            m.d.comb += cooldown_next.eq(cooldown - 1)
        m.d.sync += cooldown.eq(cooldown_next)
        with m.If(accum_start):
            m.d.sync += [bag_first.eq(0), row_first.eq(bag_first)]
        # cd_ok next: the cooldown restarts at ACCUM_HAZARD_CYCLES - 1 (> 0) on accum_start;
        # a handover starts a new bag (bag_first)
        m.d.sync += cd_ok.eq(handover | (~accum_start & ((cooldown <= 1) | bag_first)))
        m.d.sync += Assert(cd_ok == ((cooldown == 0) | bag_first), "merger: cd_ok out of step")
        with m.If(handover):
            m.d.sync += [bag_first.eq(1), acc_bank.eq(~acc_bank)]
        # The accumulator has one write port for both paths: an adder-path op issued
        # LF - L cycles after an FMA-path op would write in the same cycle, so an adder-path row
        # starts only when no FMA-path op was issued in the last LF - L cycles (rows of a bag
        # share a path; an FMA row after an adder row writes later than all of it).
        fma_recent = Signal(range(LF - L + 1))
        fma_fire = fire & is_accum & cur_x.fma
        with m.If(fma_fire):
            m.d.sync += fma_recent.eq(LF - L)
        with m.Elif(fma_recent != 0):
            m.d.sync += fma_recent.eq(fma_recent - 1)
        m.d.sync += plain_ok.eq(~fma_fire & (fma_recent <= 1))
        m.d.sync += Assert(plain_ok == (fma_recent == 0), "merger: plain_ok out of step")
        with m.If((fire & op_cmd_last) | (handover & cur.cmd_end)):
            m.d.sync += sticky_err.eq(0)
        with m.Elif(row_err_now):
            m.d.sync += sticky_err.eq(1)

        # memory reads for the op: the data reach stage R two cycles later
        def acc_addr(jj, bank):
            return Cat(jj[:acc_jbits], bank) if acc_jbits else bank
        rob_beat = Signal(max(beat_bits, 1))
        rj = Mux(cur_x.hdr, jr, j)       # the op's index into the ROB row
        m.d.comb += rob_beat.eq(rj >> sub_shift)
        m.d.comb += [
            rob.r_addr.eq(Cat(rob_beat[:beat_bits], cur.slot) if beat_bits else cur.slot),
            acc_r.r_addr.eq(acc_addr(j, acc_bank)),
        ]

        # ---------------- emitter: sends a finished bag's sums (or zeros) ----------------
        # It reads the other accumulator bank than the one the next bag sums into, so a bag's
        # emission overlaps the next bag's rows. It waits out the bag's last row in the adders
        # (em_wait follows what the cooldown would have been) and never overtakes an output op
        # already in stage R.
        em_bank = Signal()
        em_j = Signal(range(max_ops + 1))
        em_n = Signal(range(max_ops + 1))
        em_last_cnt = Signal(range(K + 1))
        em_zero = Signal()
        em_cmd_last = Signal()
        em_err = Signal()
        em_wait = Signal(range(FMA_HAZARD_CYCLES + 2))
        em_last = em_j == em_n - 1
        # the issue stage sends no output op while the emitter is busy (GATHER waits for
        # ~em_busy), so at most one output op enters stage R per cycle, in order
        em_fire = em_busy & (em_zero | (em_wait == 0)) & out_ok
        # The emitter takes a bag over one cycle after the handover, from copies of the bag's
        # facts taken every cycle (no clock enable from the late handover decision); the issue
        # stage treats it as busy from the handover on (em_blocked).
        h_bank = Signal()
        h_n = Signal(range(max_ops + 1))
        h_last_cnt = Signal(range(K + 1))
        h_zero = Signal()
        h_cmd_last = Signal()
        h_err = Signal()
        h_hdr = Signal()
        m.d.sync += [
            h_hdr.eq(cur_x.hdr),
            handed.eq(handover), h_bank.eq(acc_bank), h_n.eq(n_ops), h_last_cnt.eq(last_cnt),
            h_zero.eq(bag_first & ~accum_start), h_cmd_last.eq(cur.cmd_end),
            h_err.eq(sticky_err | row_err_now),
        ]
        with m.If(handed):
            m.d.sync += [
                # a row-wise bag's sums start at word 1 (op 0 is the header op)
                em_busy.eq(1), em_bank.eq(h_bank), em_j.eq(h_hdr), em_n.eq(h_n),
                em_last_cnt.eq(h_last_cnt), em_zero.eq(h_zero),
                em_cmd_last.eq(h_cmd_last), em_err.eq(h_err),
                # the cooldown the handover cycle set, one cycle on, + 2: stage R2 puts each
                # sum one cycle after the issue-to-write distance the cooldown covers (the
                # accumulate reads forward it, the emitter waits), stage Q one more, and the
                # emitter's read does not see a write in its own cycle
                em_wait.eq(cooldown + 2),
            ]
        with m.Else():
            with m.If(em_wait != 0):
                m.d.sync += em_wait.eq(em_wait - 1)
            with m.If(em_fire):
                m.d.sync += em_j.eq(em_j + 1)
                with m.If(em_last):
                    m.d.sync += em_busy.eq(0)
        m.d.comb += acc_e.r_addr.eq(acc_addr(em_j, em_bank))

        # ---------------- stages Q and R: the block RAMs' two read cycles ----------------
        # The op's facts wait in stage Q while the RAMs' array registers load, and reach stage
        # R with the RAMs' output registers (the read data).
        # Stage R never stalls: accumulate ops go on to stage R2, output ops (the issue stage's
        # or the emitter's, never both in one cycle) into the output FIFO, which the credits
        # keep from overflowing. Nothing behind the issue stage reaches its decision in the same
        # cycle (a stall of stage R by the output made `fire` wait on the packer's ready, and
        # fanned out to every register of stage R and the RAM read enables).
        out_fire = (fire & ~cur.pooled) | em_fire
        m.d.sync += Assert(~(fire & ~cur.pooled & em_fire), "merger: two output ops in one cycle")
        q_accum = Signal()
        q_out = Signal()
        q_is_sum = Signal()
        q_zero = Signal()
        q_count = Signal(range(K + 1))
        q_last = Signal()
        q_err = Signal()
        q_first = Signal()
        q_addr = Signal(acc_jbits + 1)
        q_sub = Signal(2)
        q_elem = Signal(ELEM_BITS)
        q_hdr = Signal()                 # a header op: stage R2 takes the row's scale and bias
        q_fma = Signal()
        q_rowwise = Signal()
        q_weighted = Signal()
        q_weight = Signal(32)
        hdr_op = cur_x.hdr & first_op
        m.d.sync += [
            q_accum.eq(fire & cur.pooled & ~hdr_op), q_out.eq(out_fire), q_is_sum.eq(em_fire),
            q_first.eq(Mux(first_op, bag_first, row_first)),
            q_addr.eq(acc_addr(j, acc_bank)),
            q_sub.eq(rj & ((1 << sub_shift) - 1)),
            q_elem.eq(cur.elem),
            q_hdr.eq(fire & hdr_op), q_fma.eq(cur_x.fma), q_rowwise.eq(cur_x.hdr),
            q_weighted.eq(cur.weighted), q_weight.eq(cur.weight),
        ]
        with m.If(em_fire):
            m.d.sync += [
                q_zero.eq(em_zero),
                q_count.eq(Mux(em_last, em_last_cnt, K)),
                q_last.eq(em_cmd_last & em_last),
                q_err.eq(em_err & em_last),
            ]
        with m.Else():
            m.d.sync += [
                q_zero.eq(op_kind == _OP_ZERO),
                q_count.eq(Mux(last_op, last_cnt, K)),
                q_last.eq(op_cmd_last),
                q_err.eq(sticky_err | row_err_now),
            ]

        def stage_r(q):
            r = Signal.like(q, name="r" + q.name[1:])
            m.d.sync += r.eq(q)
            return r
        (r_accum, r_out, r_is_sum, r_zero, r_count, r_last, r_err, r_first, r_addr, r_sub,
         r_elem, r_hdr, r_fma, r_rowwise, r_weighted, r_weight) = map(
            stage_r, (q_accum, q_out, q_is_sum, q_zero, q_count, q_last, q_err, q_first, q_addr,
                      q_sub, q_elem, q_hdr, q_fma, q_rowwise, q_weighted, q_weight))

        # output FIFO: the block RAM read data go straight into it (zeroing and the choice
        # between the two RAMs come after it; each RAM has a field of its own)
        ob_layout = data.StructLayout({"rob_data": unsigned(Wc), "acc_data": unsigned(Wc),
                                       "is_sum": unsigned(1), "zero": unsigned(1),
                                       "count": range(K + 1), "last": unsigned(1),
                                       "err": unsigned(1)})
        m.submodules.out_fifo = ofifo = SyncFIFOBuffered(width=ob_layout.size,
                                                         depth=self.OUT_FIFO_DEPTH)
        ob_in = Signal(ob_layout)
        m.d.comb += [
            ob_in.rob_data.eq(rob.r_data), ob_in.acc_data.eq(acc_e.r_data),
            ob_in.is_sum.eq(r_is_sum), ob_in.zero.eq(r_zero), ob_in.count.eq(r_count),
            ob_in.last.eq(r_last), ob_in.err.eq(r_err),
        ]
        # stage O: the op is registered before the FIFO's LUT RAM (a plain register the placer
        # can put by the block RAMs: their 5.8 ns clock-to-out plus the wire to the LUT RAM was
        # over 10 ns on the board). The credits below count it as pending.
        ob_o = Signal(ob_layout, reset_less=True)
        ob_o_valid = Signal()
        m.d.sync += [ob_o.eq(ob_in), ob_o_valid.eq(r_out)]
        m.d.comb += [ofifo.w_data.eq(ob_o), ofifo.w_en.eq(ob_o_valid)]
        m.d.sync += Assert(~ob_o_valid | ofifo.w_rdy, "merger output FIFO overflow")
        # credits: output ops fired and not yet taken by the packer; out_ok allows a fire in
        # the next cycle when, with one more fired now, there is still room for it
        out_pending = Signal(range(self.OUT_FIFO_DEPTH + 1))
        out_pop = ofifo.r_rdy & ofifo.r_en
        m.d.sync += [
            out_pending.eq(out_pending + out_fire - out_pop),
            out_ok.eq(out_pending <= self.OUT_FIFO_DEPTH - 2),
        ]
        ob_out = ob_layout(ofifo.r_data)
        m.submodules.packer = packer = WordPacker(K, H)
        m.d.comb += [
            packer.i_words.valid.eq(ofifo.r_rdy),
            packer.i_words.payload.data.eq(
                Mux(ob_out.zero, 0, Mux(ob_out.is_sum, ob_out.acc_data, ob_out.rob_data))),
            packer.i_words.payload.count.eq(ob_out.count),
            packer.i_words.payload.last.eq(ob_out.last),
            packer.i_words.payload.err.eq(ob_out.err),
            ofifo.r_en.eq(packer.i_words.ready),
        ]
        # a register slice on the output: the DMA's ready (from the engine's result state)
        # reaches no further than it
        m.submodules.out_slice = out_slice = SkidBuffer(packer.o_beat.payload.shape())
        wiring.connect(m, packer.o_beat, out_slice.i)
        wiring.connect(m, wiring.flipped(self.o_data), out_slice.o)

        # ---------------- stage R2: register the RAM read data of accumulate ops ----------------
        # Block RAM clock-to-out leaves no time for the widening in the same cycle. The read
        # data show the accumulator as it was when the op was issued, without a write in that
        # same cycle: the sums written since (in the issue cycle, in stage Q's and now, in stage
        # R's) are forwarded, the latest first, so the issue-to-write distance the cooldown
        # covers (ACCUM_HAZARD_CYCLES) needs no more cycles. The matches with the older two
        # writes are found a cycle ahead, in stage Q.
        r2_valid = Signal()
        r2_int = Signal()
        r2_first = Signal()
        r2_addr = Signal(acc_jbits + 1)
        r2_sub = Signal(2)
        r2_elem = Signal(ELEM_BITS)
        r2_hdr = Signal()
        r2_fma = Signal()
        r2_rowwise = Signal()
        r2_weighted = Signal()
        r2_weight = Signal(32)
        r2_rd = Signal(Wc)
        r2_acc = Signal(Wc)
        w1_addr = Signal.like(acc_w_addr)
        w1_en = Signal()
        w1_data = Signal(Wc, reset_less=True)
        w2_data = Signal(Wc, reset_less=True)
        fwd1 = Signal()
        fwd2 = Signal()
        m.d.sync += [
            w1_addr.eq(acc_w_addr), w1_en.eq(acc_w_en), w1_data.eq(acc_w_data),
            w2_data.eq(w1_data),
            fwd1.eq(acc_w_en & (acc_w_addr == q_addr)),
            fwd2.eq(w1_en & (w1_addr == q_addr)),
        ]
        fwd0 = acc_w_en & (acc_w_addr == r_addr)
        m.d.sync += [
            r2_valid.eq(r_accum), r2_first.eq(r_first), r2_addr.eq(r_addr), r2_sub.eq(r_sub),
            r2_elem.eq(r_elem), r2_hdr.eq(r_hdr), r2_fma.eq(r_fma), r2_rowwise.eq(r_rowwise),
            r2_weighted.eq(r_weighted), r2_weight.eq(r_weight),
            r2_int.eq((r_elem == ElemType.INT8) | (r_elem == ElemType.INT32)),
            r2_rd.eq(rob.r_data),
            r2_acc.eq(Mux(fwd0, acc_w_data, Mux(fwd1, w1_data, Mux(fwd2, w2_data, acc_r.r_data)))),
        ]

        # ---------------- stage W: widen the row's elements into K 32-bit lanes ----------------
        w_valid = Signal()
        w_int = Signal()
        w_j = Signal(acc_jbits + 1)
        w_a = [Signal(32, name=f"w_a{i}") for i in range(K)]
        w_b = [Signal(32, name=f"w_b{i}") for i in range(K)]
        m.d.sync += [w_valid.eq(r2_valid), w_j.eq(r2_addr), w_int.eq(r2_int)]
        # -0.0 is the fp identity: -0 + x == x, +-0 included (FMA-path sums are fp32 for every type)
        ident = Mux(r2_int & ~r2_fma, 0, 0x8000_0000)
        # a row-wise row's scale and bias, from its header op (bytes 0..3 of the row)
        row_scale = Signal(32)
        row_bias = Signal(32)
        m.submodules.h2f_scale = h2f_scale = Fp16ToFp32()
        m.submodules.h2f_bias = h2f_bias = Fp16ToFp32()
        m.d.comb += [h2f_scale.i_h.eq(r2_rd[0:16]), h2f_bias.i_h.eq(r2_rd[16:32])]
        with m.If(r2_hdr):
            m.d.sync += [row_scale.eq(h2f_scale.o_f), row_bias.eq(h2f_bias.o_f)]
        # the FMA path's per-op operands: (scale, bias, w) = (row scale, row bias, weight or
        # 1.0) for row-wise rows, (1.0, -, w) for weighted ones
        w_fma = Signal()
        w_conv = Signal()                # the element is an integer (int8, int32, uint8 code)
        w_rowwise = Signal()
        w_scale = Signal(32)
        w_bias = Signal(32)
        w_w = Signal(32)
        m.d.sync += [
            w_fma.eq(r2_fma), w_rowwise.eq(r2_rowwise),
            w_conv.eq(r2_int | (r2_elem == ElemType.INT8_ROWWISE)),
            w_scale.eq(Mux(r2_rowwise, row_scale, 0x3F80_0000)),
            w_bias.eq(row_bias),
            w_w.eq(Mux(r2_weighted, r2_weight, 0x3F80_0000)),
        ]
        rd = r2_rd
        for i in range(K):
            h2f = Fp16ToFp32()
            m.submodules[f"h2f{i}"] = h2f
            half_sel = Signal(16, name=f"half{i}")
            byte_sel = Signal(8, name=f"byte{i}")
            with m.Switch(r2_sub):
                for s in range(2):
                    with m.Case(s):
                        m.d.comb += half_sel.eq(rd[(Wc // 2) * s + 16 * i:][:16])
            with m.Switch(r2_sub):
                for s in range(4):
                    with m.Case(s):
                        m.d.comb += byte_sel.eq(rd[(Wc // 4) * s + 8 * i:][:8])
            m.d.comb += h2f.i_h.eq(half_sel)
            lane = Signal(32, name=f"lane{i}")
            with m.Switch(r2_elem):
                with m.Case(ElemType.FP16):
                    m.d.comb += lane.eq(h2f.o_f)
                with m.Case(ElemType.INT8):
                    m.d.comb += lane.eq(byte_sel.as_signed())
                with m.Case(ElemType.INT8_ROWWISE):
                    m.d.comb += lane.eq(byte_sel)
                with m.Default():
                    m.d.comb += lane.eq(rd[32 * i:32 * (i + 1)])
            m.d.sync += [w_b[i].eq(lane),
                         w_a[i].eq(Mux(r2_first, ident, r2_acc[32 * i:32 * (i + 1)]))]

        # ---------------- adders: K lanes, fp32 or int32, fixed latency L ----------------
        a_valid = Signal()
        m.d.comb += a_valid.eq(w_valid & ~w_fma)
        pipe_valid = [a_valid]
        pipe_j = [w_j]
        pipe_int = [w_int]
        for s in range(L):
            v, jj, ii = Signal(name=f"p_valid{s}"), Signal(acc_jbits + 1, name=f"p_j{s}"), \
                Signal(name=f"p_int{s}")
            m.d.sync += [v.eq(pipe_valid[-1]), jj.eq(pipe_j[-1]), ii.eq(pipe_int[-1])]
            pipe_valid.append(v); pipe_j.append(jj); pipe_int.append(ii)
        sums = []
        for i in range(K):
            add = Fp32Adder()
            m.submodules[f"add{i}"] = add
            m.d.comb += [add.i_a.eq(w_a[i]), add.i_b.eq(w_b[i]), add.i_valid.eq(a_valid)]
            isum = [Signal(32, name=f"isum{i}_0")]
            m.d.sync += isum[0].eq(w_a[i] + w_b[i])    # wraps at 32 bits
            for s in range(1, L):
                nxt = Signal(32, name=f"isum{i}_{s}")
                m.d.sync += nxt.eq(isum[-1])
                isum.append(nxt)
            sums.append(Mux(pipe_int[L], isum[-1], add.o_sum))

        # ---------------- FMA path: weighted and row-wise bags, LF cycles ----------------
        # Stage W -> the products scale*w and bias*w (two Fp32Fma shared by the lanes; each
        # rounded once, as the definition says) while each lane's element converts to fp32
        # (Int32ToFp32 for integers) and waits with the accumulator -> per lane a RowwiseLane:
        # fma(scale*w, x, acc + bias*w). A weighted row of another type uses bias -0.0
        # (acc + -0.0 == acc), so the lane computes fma(w, x, acc).
        PM = Fp32Fma.LATENCY
        f_valid = [Signal(name="f_valid0")]
        f_j = [Signal(acc_jbits + 1, name="f_j0")]
        m.d.comb += [f_valid[0].eq(w_valid & w_fma), f_j[0].eq(w_j)]
        for s in range(1, LF + 1):
            v, jj = Signal(name=f"f_valid{s}"), Signal(acc_jbits + 1, name=f"f_j{s}")
            m.d.sync += [v.eq(f_valid[-1]), jj.eq(f_j[-1])]
            f_valid.append(v); f_j.append(jj)

        def delay(value, n, name):
            for k in range(n):
                nxt = Signal.like(value, name=f"{name}_d{k + 1}")
                m.d.sync += nxt.eq(value)
                value = nxt
            return value
        m.submodules.pm_scale = pm_scale = Fp32Fma()
        m.submodules.pm_bias = pm_bias = Fp32Fma()
        for pm, x in ((pm_scale, w_scale), (pm_bias, w_bias)):
            m.d.comb += [pm.i_a.eq(x), pm.i_b.eq(w_w), pm.i_c.eq(0x8000_0000),
                         pm.i_valid.eq(f_valid[0])]
        f_rowwise = delay(w_rowwise, PM, "f_rowwise")
        lane_bias = Mux(f_rowwise, pm_bias.o_res, 0x8000_0000)
        conv_d = delay(w_conv, Int32ToFp32.LATENCY, "f_conv")
        lanes_out = []
        for i in range(K):
            i2f = Int32ToFp32()
            m.submodules[f"i2f{i}"] = i2f
            m.d.comb += [i2f.i_x.eq(w_b[i]), i2f.i_valid.eq(f_valid[0])]
            raw = delay(w_b[i], Int32ToFp32.LATENCY, f"f_raw{i}")
            xf = Signal(32, name=f"f_x{i}")
            m.d.sync += xf.eq(Mux(conv_d, i2f.o_f, raw))
            x_in = delay(xf, PM - Int32ToFp32.LATENCY - 1, f"f_x{i}")
            acc_in = delay(w_a[i], PM, f"f_acc{i}")
            lane = RowwiseLane()
            m.submodules[f"lane{i}"] = lane
            m.d.comb += [lane.i_acc.eq(acc_in), lane.i_x.eq(x_in), lane.i_scale.eq(pm_scale.o_res),
                         lane.i_bias.eq(lane_bias), lane.i_valid.eq(f_valid[PM])]
            lanes_out.append(lane.o_acc)
        m.d.sync += Assert(~(pipe_valid[L] & f_valid[LF]), "merger: two accumulator writes")
        m.d.comb += [
            acc_w_addr.eq(Mux(f_valid[LF], f_j[LF], pipe_j[L])),
            acc_w_data.eq(Mux(f_valid[LF], Cat(*lanes_out), Cat(*sums))),
            acc_w_en.eq(pipe_valid[L] | f_valid[LF]),
        ]

        # The hazard rules, checked in simulation: no accumulator read meets a sum still to be
        # written that it does not get (the emitter: none at all; an accumulate op: none later
        # than stage R's cycle, the forwarding covers the rest). The ops in flight and the cycles
        # to their writes: stage Q 3 + L, R 2 + L, R2 1 + L, W and adder stage s: L - s.
        in_flight = [(q_accum, q_addr, 3 + L), (r_accum, r_addr, 2 + L), (r2_valid, r2_addr, 1 + L)]
        in_flight += [(pipe_valid[s], pipe_j[s], L - s) for s in range(L + 1)]
        in_flight += [(f_valid[s], f_j[s], LF - s) for s in range(LF + 1)]
        em_read = acc_addr(em_j, em_bank)
        acc_read = acc_addr(j, acc_bank)
        uses_acc = fire & is_accum & ~hdr_op & ~Mux(first_op, bag_first, row_first)
        for v, a, to_write in in_flight:
            m.d.sync += Assert(~(em_fire & ~em_zero & v & (a == em_read)),
                               "merger: the emitter reads a sum still to be written")
            if to_write > 2:
                m.d.sync += Assert(~(uses_acc & v & (a == acc_read)),
                                   "merger: an accumulate reads a sum written too late to forward")
        return m
