"""Merger descriptor queue: the lookups in request order, each with its op count and row flags.

``DescriptorQueue(geometry, depth)`` takes ``i_desc`` (``merger_layouts.desc_layout``) and sends
the same descriptors, in order, on ``o_entry`` (``merger_layouts.entry_layout``): each with its
op count, the word count of its last op, its ROB beat shape and the per-row flags the issue stage
decides on.

Why: the engine forks each lookup to the flash channels and to the merger, and must not be held
up while the merger waits for an older row (that would leave at most two lookups in flight), so
descriptors wait in a FIFO of ``depth`` entries (lookups are credit-limited to ``n_slots``; the
rest of the depth absorbs empty-bag tokens). A register slice in front of the FIFO keeps the
engine's fork off the FIFO's state (``i_desc.ready`` is a register and never waits for rows). The
op counts are computed before the FIFO, so the issue stage loads them without arithmetic, in
front of that slice (one carry chain), so that the FIFO's write data come from its registers. The
FIFO's read data is block RAM output (5.6 ns clock-to-out on ECP5, no output register): a
register stage behind it lets the row entries' slot-flag lookup start from flip-flops (a
:class:`RegisterStage`, no read-pointer mux: the entries' ready is a register's select).
"""
from amaranth import C, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..lib.register_stage import RegisterStage
from ..lib.skid_buffer import SkidBuffer
from ..regmap import ROWWISE_HEADER_BYTES, ElemType
from .merger_layouts import MergerGeometry, desc_layout, entry_layout

__all__ = ["DescriptorQueue"]


class DescriptorQueue(wiring.Component):
    """``i_desc`` -> op counts and row flags -> FIFO of ``depth`` -> ``o_entry``, in order."""

    def __init__(self, geometry: MergerGeometry, depth: int):
        self._g = geometry
        self.depth = depth
        super().__init__({
            "i_desc": In(stream.Signature(desc_layout(geometry.n_slots))),
            "o_entry": Out(stream.Signature(entry_layout(geometry))),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        K, log2K = g.K, g.log2K
        xl = entry_layout(g)
        # The op count and flags are worked out in front of the `desc_in` register slice, so
        # that behind it the FIFO's write data come straight from registers (block RAM data
        # inputs need their setup early). The op count is ceil(n_elems / K) with n_elems =
        # row_bytes >> ish, plus the row-wise header op: for ish = 0 that is
        # (row_bytes - 4 + K - 1 + K*hdr) >> log2K, and for ish > 0 (row_bytes >> ish) + K - 1
        # >> log2K = (row_bytes + ((K - 1) << ish)) >> (ish + log2K), since the bits shifted out
        # cannot carry past a multiple of K. The sums for every ish (and both header cases) are
        # formed side by side from row_bytes, and the element size only selects one: one carry
        # chain between the engine's slice and this one.
        dl = desc_layout(g.n_slots)
        sum_bits = dl.members["row_bytes"].width + 1
        pl = data.StructLayout({
            "desc": dl,
            "ish": unsigned(2),          # log2(itemsize); GATHER moves 32-bit words
            "hdr": unsigned(1),          # a pooled INT8_ROWWISE row: op 0 reads scale and bias
            "one_op": unsigned(1),
            "last_cnt": range(K + 1),
            "n_ops": xl.members["n_ops"],
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
        def ops(addend, sh):
            total = Signal(sum_bits, name=f"ops_sum{sh}_{addend}")
            m.d.comb += total.eq(rb + addend)
            return total >> (sh + log2K)
        ops_by_ish = [Mux(hdr_in, ops((2 * K - ROWWISE_HEADER_BYTES - 1) % (1 << sum_bits), 0),
                          ops(K - 1, 0)),
                      ops((K - 1) << 1, 1), ops((K - 1) << 2, 2)]
        with m.Switch(pre.ish):
            for sh in range(3):
                with m.Case(sh):
                    n_low = rb >> sh                      # elements of the row (before the header)
                    # no elements (a 0-byte row: a broken table config); a header implies > 4 bytes
                    zero = n_low == 0
                    # the last op's element count, ((n_elems - 1) mod K) + 1, from the low bits
                    first = ROWWISE_HEADER_BYTES + 1 if sh == 0 else 1
                    low = (n_low[:log2K] - Mux(hdr_in, first, 1))[:log2K] if log2K else C(0, 1)
                    at_most_k = ((n_low >> log2K) == 0) | (n_low == K)   # n_elems <= K
                    # a 0-byte row still takes one op of no words, so the issue stage cannot
                    # wait forever for an op count of zero
                    m.d.comb += [
                        pre.last_cnt.eq(Mux(zero, 0, low + 1)),
                        pre.one_op.eq(at_most_k & ~hdr_in),
                        pre.n_ops.eq(Mux(zero, 1, ops_by_ish[sh])),
                    ]
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
        m.d.comb += x_new.n_ops.eq(q.n_ops)
        m.submodules.desc_fifo = dfifo = SyncFIFOBuffered(width=xl.size, depth=self.depth)
        m.d.comb += [
            dfifo.w_data.eq(x_new),
            dfifo.w_en.eq(desc_in.o.valid),
            desc_in.o.ready.eq(dfifo.w_rdy),
        ]
        m.submodules.desc_out = desc_out = RegisterStage(xl)
        m.d.comb += [
            desc_out.i.payload.eq(dfifo.r_data),
            desc_out.i.valid.eq(dfifo.r_rdy),
            dfifo.r_en.eq(desc_out.i.ready),
        ]
        wiring.connect(m, desc_out.o, wiring.flipped(self.o_entry))
        return m
