"""ChunkReader: a list of 32-bit words from host memory, read by a DMA client in chunks.

Used by the command engine for index lists and offsets: two readers share one DMA read port
without deadlock, because a reader requests a chunk only when its beat FIFO can take all of it.
"""
from amaranth import Module, Signal, Mux, Cat
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.hdl import Assert
from amaranth.lib.wiring import In, Out

from .dma_stream import DMA_CMD_LAYOUT, dma_read_layout
from .skid_buffer import SkidBuffer

__all__ = ["ChunkReader", "WORD_LAYOUT"]

WORD_LAYOUT = data.StructLayout({"data": 32, "err": 1, "last": 1})   # last: of the list


class ChunkReader(wiring.Component):
    """Reads ``words`` 32-bit words from a 64-byte aligned ``addr`` (``start`` pulse, only while
    ``idle``; ``addr`` and ``words`` are taken in the cycle after the pulse, which is registered,
    so they must hold for that cycle) as DMA transfers of at most ``chunk_bytes``; a chunk is
    requested only when the beat FIFO has room for all of it, so the DMA port never stalls on
    this reader."""

    def __init__(self, data_bits: int, chunk_bytes: int):
        self.data_bits = data_bits
        self.chunk_bytes = chunk_bytes
        super().__init__({
            "start": In(1), "addr": In(64), "words": In(32), "idle": Out(1),
            "o_rd_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_rd_data": In(stream.Signature(dma_read_layout(data_bits))),
            "o_word": Out(stream.Signature(WORD_LAYOUT)),
        })

    def elaborate(self, platform):
        m = Module()
        w = self.data_bits
        bb = w // 8
        wpb = bb // 4
        chunk_beats = max(1, self.chunk_bytes // bb)
        depth = 2 * chunk_beats
        m.submodules.fifo = fifo = SyncFIFO(width=w + 1, depth=depth)

        c_addr = Signal(64)
        c_left = Signal(34)              # bytes still to request
        outstanding = Signal(range(depth + 1))
        words_left = Signal(32)
        took = Signal()                  # a word was taken in the previous cycle (see below)
        k = Signal(range(max(wpb, 2)))

        # o_word leaves through a register slice: the consumers' decisions (offset compares,
        # bag ends) then start from flip-flops, not from the beat FIFO's LUT RAM (63 MHz)
        m.submodules.out_reg = out_reg = SkidBuffer(WORD_LAYOUT)
        m.d.comb += self.idle.eq((c_left == 0) & (outstanding == 0) & (words_left == took) &
                                 ~fifo.r_rdy & ~out_reg.o.valid)
        # the start pulse is registered (its decoding fanned out into every counter's enable)
        start = Signal()
        m.d.sync += start.eq(self.start)
        with m.If(start):
            m.d.sync += [c_addr.eq(self.addr), c_left.eq(self.words << 2),
                         words_left.eq(self.words), k.eq(0)]

        # The request is planned from registers: the next chunk's size, whether any is left and
        # whether the beat FIFO has room for a whole chunk are computed each cycle from the state
        # one cycle old (the compares and sums in front of o_rd_cmd and the 64-bit address add
        # were the engine's critical path). That state lags a request or a start by a cycle, so
        # none is made in the cycle after one; chunks are many beats long, so the rate is kept.
        n = Signal(range(self.chunk_bytes + 1))
        beats = Signal(range(chunk_beats + 2))
        more = Signal()
        room = Signal()
        hold = Signal()
        next_n = Mux(c_left < self.chunk_bytes, c_left, self.chunk_bytes)
        m.d.sync += [
            n.eq(next_n),
            beats.eq((next_n + bb - 1) >> (bb.bit_length() - 1)),
            more.eq(c_left != 0),
            room.eq(fifo.level + outstanding + chunk_beats <= depth),
        ]
        m.d.comb += [
            self.o_rd_cmd.valid.eq(more & room & ~hold),
            self.o_rd_cmd.payload.addr.eq(c_addr),
            self.o_rd_cmd.payload.bytes.eq(n),
        ]
        issued = self.o_rd_cmd.valid & self.o_rd_cmd.ready
        got = self.i_rd_data.valid & self.i_rd_data.ready
        m.d.sync += hold.eq(issued | start)
        with m.If(issued):
            m.d.sync += [c_addr.eq(c_addr + n), c_left.eq(c_left - n)]
        m.d.sync += outstanding.eq(outstanding + Mux(issued, beats, 0) - got)
        m.d.comb += [
            self.i_rd_data.ready.eq(fifo.w_rdy),
            fifo.w_en.eq(self.i_rd_data.valid),
            fifo.w_data.eq(Cat(self.i_rd_data.payload.data, self.i_rd_data.payload.err)),
        ]

        # `w_more`/`w_last` are words_left != 0 / == 1 kept as registers (the compares sat in
        # front of the out slice's push and the FIFO's read enable); after a start they follow
        # `words_left` one cycle late, while no beat can be there yet (requests begin two cycles
        # after the start)
        w_more = Signal()
        w_last = Signal()
        started = Signal()
        m.d.sync += started.eq(start)
        with m.If(started):
            m.d.sync += [w_more.eq(words_left != 0), w_last.eq(words_left == 1)]
        beat = fifo.r_data[:w]
        o_word = out_reg.i
        m.d.comb += [
            o_word.valid.eq(fifo.r_rdy & w_more),
            o_word.payload.data.eq(beat.word_select(k, 32) if wpb > 1 else beat[:32]),
            o_word.payload.err.eq(fifo.r_data[w]),
            o_word.payload.last.eq(w_last),
        ]
        wiring.connect(m, out_reg.o, wiring.flipped(self.o_word))
        # `words_left` follows the words taken one cycle late (`took`: a word was taken in the
        # previous cycle), so the take only drives a few flip-flops: the words really left are
        # words_left - took.
        m.d.sync += took.eq(o_word.valid & o_word.ready)
        with m.If(took & ~start):
            m.d.sync += words_left.eq(words_left - 1)
        with m.If(o_word.valid & o_word.ready):
            m.d.sync += [w_more.eq(~w_last),
                         w_last.eq(Mux(took, words_left == 3, words_left == 2))]
            with m.If((k == wpb - 1) | w_last):
                m.d.comb += fifo.r_en.eq(1)
                m.d.sync += k.eq(0)
            with m.Else():
                m.d.sync += k.eq(k + 1)
        m.d.sync += [
            Assert(started | (w_more == (words_left - took != 0)), "ChunkReader: w_more stale"),
            Assert(started | (w_last == (words_left - took == 1)), "ChunkReader: w_last stale"),
            Assert(~started | ~fifo.r_rdy, "ChunkReader: a beat right after the start"),
        ]
        return m
