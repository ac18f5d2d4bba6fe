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
      op, its header), but a bag's rows start at most every ``FMA_HAZARD_CYCLES`` (31) cycles,
      and a row of the adder path starts only ``FMA_PATH_LATENCY - Fp32Adder.LATENCY`` (22)
      cycles after the last FMA-path op (the two paths share the accumulator's write port).
    One ROB write per cycle is shared by all channels.

Resources: ``K = Wc/32`` Fp32Adders (+K int32 adders, K fp16 converters); for the FMA path
K RowwiseLanes (an Fp32Adder + an Fp32Fma each), K Int32ToFp32 and two shared Fp32Fma for the
per-op products; ROB memory
``n_slots * 2**ceil(log2(ceil(max_row_bytes*8/Wc)))`` words of Wc bits (1 write, 1 read port);
accumulator memory 2 banks of ``2**ceil(log2(ceil(max_row_bytes/K)))`` words of Wc bits (1 write
port, two copies for the two readers); a packer of ``Wh + Wc`` bits. Measured numbers and the
timing rounds that shaped the pipeline: docs/synthesis.md.

Structure: components joined by ``lib.stream`` ports (and, where nothing stalls, by registered
facts), in data-flow order; each has its own L1 test (tests/hw/test_merger_stages.py):

- :class:`~.merger_intake.RowIntake`: the channels' beats, one per cycle, registered; each is
  written to the ROB (a :class:`~evssd.hw.lib.block_ram.BlockRAM`, read latency 2) and marks its
  slot in the row entries.
- :class:`~.merger_descq.DescriptorQueue`: ``i_desc`` with op counts and row flags, in a FIFO.
- :class:`~.merger_entries.RowEntries`: the current and the next lookup, with their slots'
  done/err flags.
- :class:`~.merger_issue.IssueStage`: one op per cycle in request order (ROB reads, zeros,
  accumulates), the slot frees and the bag handover.
- :class:`~.merger_emitter.BagEmitter`: a finished bag's sums (or zeros) as output ops.
- :class:`~.merger_read_stages.ReadStages`: stages Q and R, the ops' facts alongside the block
  RAMs' two read cycles.
- :class:`~.merger_accum.AccumulatorPath`: the accumulator memory, stages R2 and W, the adders
  and the FMA path.
- :class:`~.merger_outq.OutputQueue`: output ops with their read data in a credit-limited FIFO.
- :class:`~.merger_packer.WordPacker`, then a register slice on ``o_data``.

Nothing behind the issue stage stalls (output ops are credit-limited, pooled rows keep the
hazard distances), so no handshake behind it reaches its decision, and every decision starts
from registers. Sizes and payload layouts shared by the parts: :mod:`.merger_layouts`.
"""
from amaranth import Module, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.block_ram import BlockRAM
from ..lib.skid_buffer import SkidBuffer
from ..regmap import ROWWISE_HEADER_BYTES, Params
from .merger_accum import AccumulatorPath
from .merger_descq import DescriptorQueue
from .merger_emitter import BagEmitter
from .merger_entries import RowEntries
from .merger_intake import RowIntake
from .merger_issue import IssueStage
from .merger_layouts import (ACCUM_HAZARD_CYCLES, FMA_HAZARD_CYCLES, FMA_PATH_LATENCY,
                             MergerGeometry, desc_layout, out_layout, row_layout)
from .merger_outq import OutputQueue
from .merger_packer import WordPacker
from .merger_read_stages import ReadStages

__all__ = ["ResultMerger", "WordPacker", "row_layout", "desc_layout", "out_layout",
           "ACCUM_HAZARD_CYCLES", "FMA_PATH_LATENCY", "FMA_HAZARD_CYCLES"]


class ResultMerger(wiring.Component):
    """Reorder buffer + in-order retirement (GATHER rows, GATHER_POOLED bag sums); see the module
    docstring for the ports, the semantics and the components it is made of.

    The ROB is ``n_slots`` x ``max_row_bytes``, ``ch_data_bits`` wide; a slot's beats are read
    only after its last beat was written (its done flag) and rewritten only after it is freed,
    so a read never meets a write of its word.
    """

    OUT_FIFO_DEPTH = 10  # output ops between the issue stage and the packer (credit-limited)

    def __init__(self, params: Params, n_slots: int, *, ram_primitive: str | None = None):
        try:
            self._g = MergerGeometry(params, n_slots)
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
            "o_free": Out(stream.Signature(unsigned(self._g.tb), always_ready=True)),
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
        g = self._g
        p = self._p
        m.submodules.intake = intake = RowIntake(p, g.n_slots, row_layout(p, g.n_slots))
        m.submodules.rob = rob = BlockRAM(width=g.Wc, depth=g.n_slots << g.beat_bits,
                                          primitive=self._ram_primitive)
        m.submodules.descq = descq = DescriptorQueue(g, self.desc_depth)
        m.submodules.entries = entries = RowEntries(g)
        m.submodules.issue = issue = IssueStage(g)
        m.submodules.emitter = emitter = BagEmitter(g)
        m.submodules.stages = stages = ReadStages(g)
        m.submodules.accum = accum = AccumulatorPath(g, ram_primitive=self._ram_primitive)
        m.submodules.outq = outq = OutputQueue(g, self.OUT_FIFO_DEPTH)
        m.submodules.packer = packer = WordPacker(g.K, g.H)
        # a register slice on the output: the DMA's ready reaches no further than it
        m.submodules.out_slice = out_slice = SkidBuffer(out_layout(p))

        # channel beats -> ROB, and the slot flags of the row entries
        for c in range(p.n_channels):
            wiring.connect(m, wiring.flipped(self.i_row[c]), intake.i_row[c])
        beat = intake.o_beat
        m.d.comb += [
            rob.w_addr.eq(g.rob_addr(beat.payload.idx, beat.payload.beat.tag)),
            rob.w_data.eq(beat.payload.beat.data),
            rob.w_en.eq(beat.valid.replicate(g.Wc // 8)),
            rob.r_en.eq(1), rob.r_oe.eq(1),
            entries.i_beat.valid.eq(beat.valid), entries.i_beat.payload.eq(beat.payload),
        ]
        # descriptors -> row entries -> issue stage
        wiring.connect(m, wiring.flipped(self.i_desc), descq.i_desc)
        wiring.connect(m, descq.o_entry, entries.i_entry)
        wiring.connect(m, entries.o_head, issue.i_row)
        free = issue.o_free
        m.d.comb += [
            issue.i_done.eq(entries.o_done), issue.i_err.eq(entries.o_err),
            self.o_free.valid.eq(free.valid), self.o_free.payload.eq(free.payload),
            entries.i_free.valid.eq(free.valid), entries.i_free.payload.eq(free.payload),
            rob.r_addr.eq(issue.o_rob_addr),
            accum.i_read_addr.eq(issue.o_acc_addr), accum.i_read_used.eq(issue.o_acc_used),
        ]
        # issue stage -> emitter (bag handover), and back (busy, output credits)
        wiring.connect(m, issue.o_bag, emitter.i_bag)
        m.d.comb += [
            emitter.i_cooldown.eq(issue.o_cooldown),
            issue.i_emit_busy.eq(emitter.o_busy),
            issue.i_out_ok.eq(outq.o_ok), emitter.i_ok.eq(outq.o_ok),
            accum.i_emit_addr.eq(emitter.o_read_addr),
            accum.i_emit_used.eq(emitter.o_op.valid & ~emitter.o_op.payload.zero),
        ]
        # ops -> read stages Q, R -> accumulator path and output queue
        wiring.connect(m, issue.o_op, stages.i_issue)
        wiring.connect(m, emitter.o_op, stages.i_emit)
        m.d.comb += [
            accum.i_q.eq(stages.o_q), accum.i_r.eq(stages.o_r), accum.i_rob_data.eq(rob.r_data),
            outq.i_fire.eq(stages.o_out_fire), outq.i_r.eq(stages.o_r),
            outq.i_rob_data.eq(rob.r_data), outq.i_acc_data.eq(accum.o_emit_data),
        ]
        # output queue -> packer -> register slice -> o_data
        wiring.connect(m, outq.o_words, packer.i_words)
        wiring.connect(m, packer.o_beat, out_slice.i)
        wiring.connect(m, wiring.flipped(self.o_data), out_slice.o)
        return m
