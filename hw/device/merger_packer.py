"""Merger output packer: result words of varying count packed into host-width beats.

The last stage of :class:`~.merger.ResultMerger`: each output op of the merger yields 1..K
32-bit words (a GATHER row's beat or a bag's sums), the DMA write engine takes H-word beats.
"""
from amaranth import Module, Mux, Signal, unsigned
from amaranth.hdl import Assert
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["WordPacker", "words_layout"]


def words_layout(words: int) -> data.StructLayout:
    """A group of ``count`` (0..``words``) 32-bit words from word 0 of ``data``."""
    return data.StructLayout({"data": unsigned(32 * words), "count": range(words + 1),
                              "last": unsigned(1), "err": unsigned(1)})


class WordPacker(wiring.Component):
    """Packs groups of 1..``in_words`` 32-bit words into ``out_words``-word beats.

    ``i_words``: ``{data: 32*in_words, count: 1..in_words valid words from word 0, last, err}``;
    ``o_beat``: ``{data: 32*out_words, last, err}``. Words are contiguous across inputs; the beat
    holding the word of an input with ``last`` is emitted with ``last`` (zero-padded past it).
    The buffer holds ``out_words + in_words`` words, so input flows every cycle when the output
    does (one input per cycle when in_words <= out_words, one beat per cycle otherwise).
    """

    def __init__(self, in_words: int, out_words: int):
        self._k = in_words
        self._h = out_words
        super().__init__({
            "i_words": In(stream.Signature(words_layout(in_words))),
            "o_beat": Out(stream.Signature(data.StructLayout({
                "data": unsigned(32 * out_words), "last": unsigned(1), "err": unsigned(1)}))),
        })

    def elaborate(self, platform):
        m = Module()
        K, H = self._k, self._h
        C = K + H
        buf = Signal(32 * C)            # words at index >= fill are always zero
        fill = Signal(range(C + 1))
        end_pending = Signal()          # the command's last word is in buf
        end_err = Signal()
        o, i = self.o_beat, self.i_words

        m.d.comb += [
            o.valid.eq((fill >= H) | (end_pending & (fill != 0))),
            o.payload.data.eq(buf[:32 * H]),
            o.payload.last.eq(end_pending & (fill <= H)),
            o.payload.err.eq(end_err & end_pending & (fill <= H)),
        ]
        out_fire = o.valid & o.ready
        # The input's words are placed at `fill` (a register) in both outcomes of this cycle's
        # output, and `out_fire` only picks one of them at the end: with a beat out, the words
        # move down by H. The input is taken when fill <= H whether or not a beat goes out, so
        # `i.ready` comes from registers (a beat only leaves with fewer than H words at the
        # command's end, which stops input until it is sent).
        # the words to add, zero unless taken (`placed` is zero for fill > H, the other
        # condition of `take`): the gating is in the first LUT level, not after the placement
        masked = Signal(32 * K)
        offered = i.valid & ~end_pending
        for w in range(K):
            m.d.comb += masked[32 * w:32 * (w + 1)].eq(
                Mux(offered & (i.payload.count > w), i.payload.data[32 * w:32 * (w + 1)], 0))
        placed = Signal(32 * (H + K))
        with m.Switch(fill):
            for f in range(H + 1):
                with m.Case(f):
                    m.d.comb += placed.eq(masked << (32 * f))
        take = Signal()
        in_ok = Signal(init=1)           # == ~end_pending & (fill <= H), a register of its own
        m.d.comb += [
            i.ready.eq(in_ok),
            take.eq(i.valid & in_ok),
        ]
        m.d.sync += Assert(in_ok == (~end_pending & (fill <= H)), "packer: in_ok out of step")
        both = buf | placed                         # H + K == C words
        count = i.payload.count
        stay_fill = fill + Mux(take, count, 0)
        out_fill = Mux(fill > H, fill - H, 0) + Mux(take, count, 0)
        # an end with no words at all has no beat to carry `last`: dropping it keeps the
        # packer from waiting forever for a beat it cannot send
        # (both outcomes again: out_fire picks one last)
        ends_stay = take & i.payload.last & ((count != 0) | (fill != 0))
        ends_out = take & i.payload.last & ((count != 0) | (fill > H))
        pend_stay = end_pending | ends_stay
        pend_out = (end_pending & ~o.payload.last) | ends_out
        err_stay = Mux(ends_stay, i.payload.err, end_err)
        err_out = Mux(ends_out, i.payload.err, end_err & ~o.payload.last)
        with m.If(out_fire):
            m.d.sync += [buf.eq(both >> (32 * H)), fill.eq(out_fill),
                         end_pending.eq(pend_out), end_err.eq(err_out),
                         in_ok.eq(~pend_out & (out_fill <= H))]
        with m.Else():
            m.d.sync += [buf.eq(both), fill.eq(stay_fill),
                         end_pending.eq(pend_stay), end_err.eq(err_stay),
                         in_ok.eq(~pend_stay & (stay_fill <= H))]
        return m
