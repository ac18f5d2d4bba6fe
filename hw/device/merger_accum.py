"""Merger accumulator path: the accumulator memory and the arithmetic that sums pooled rows.

``AccumulatorPath(geometry)`` holds the accumulator: two banks of ``2**acc_jbits`` words of
``K = Wc/32`` 32-bit lanes (one bank sums the current bag while the emitter sends the previous
one), in two block RAM copies, one per reader: ``acc_r`` for the accumulate ops'
read-modify-write (read address ``i_read_addr`` from the issue stage) and ``acc_e`` for the
emitter (``i_emit_addr``; data on ``o_emit_data`` two cycles later). Each accumulate op in stage
R (``i_r``, with the ROB's read data on ``i_rob_data``) goes through:

- stage R2: registers the RAM read data (block RAM clock-to-out leaves no time for the widening
  in the same cycle) and forwards the sums written since the accumulator read was issued (the
  reads are not write-transparent): the one written now, in stage Q's cycle and in stage R's,
  the latest first; the matches with the older two are found a cycle ahead, from stage Q's
  address (``i_q``). An INT8_ROWWISE header op only loads the row's scale and bias here.
- stage W: widens the op's elements into K 32-bit lanes (fp16 -> fp32 exactly, int8
  sign-extended, row-wise codes zero-extended, fp32/int32 as they are) and picks the
  accumulator operand (the identity for a bag's first row: -0.0, or 0 for integer sums);
- the adder path: K Fp32Adders (or int32 wrapping adders) of ``Fp32Adder.LATENCY`` cycles, or
  the FMA path for weighted and INT8_ROWWISE bags (``FMA_PATH_LATENCY`` cycles): two shared
  Fp32Fma form ``scale*w`` and ``bias*w`` (each rounded once, as the definition says) while each
  lane's element converts to fp32 (Int32ToFp32 for integers), then per lane a RowwiseLane:
  ``fma(scale*w, x, acc + bias*w)``; a weighted row of another type feeds the bias FMA -0.0 and
  1.0, so its bias is -0.0 (``acc + -0.0 == acc``) and the lane computes ``fma(w, x, acc)``;
- the write of the sums back into the word (one write port for both paths: the issue stage
  keeps them from writing in the same cycle).

The arithmetic is ``evssd.host.pooling``'s, bit for bit. The hazard rules are checked in
simulation: no accumulator read meets a sum still to be written that it does not get (the
emitter, ``i_emit_used``: none at all; an accumulate op, ``i_read_used``: none later than stage
R's cycle, the forwarding covers the rest).
"""
from amaranth import Cat, Module, Mux, Signal
from amaranth.hdl import Assert
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..lib.block_ram import BlockRAM
from ..lib.fma import Fp32Fma
from ..lib.fpu import Fp16ToFp32, Fp32Adder
from ..lib.int_to_fp import Int32ToFp32
from ..regmap import ELEM_BITS, ElemType
from .merger_layouts import FMA_PATH_LATENCY, MergerGeometry, stage_op_layout
from .rowwise_lane import RowwiseLane

__all__ = ["AccumulatorPath"]


class AccumulatorPath(wiring.Component):
    """Accumulate ops in stage R -> sums in the accumulator memory (see the module docstring)."""

    def __init__(self, geometry: MergerGeometry, *, ram_primitive: str | None = None):
        self._g = geometry
        self._ram_primitive = ram_primitive
        abits = geometry.acc_jbits + 1
        super().__init__({
            "i_q": In(stage_op_layout(geometry)),
            "i_r": In(stage_op_layout(geometry)),
            "i_rob_data": In(geometry.Wc),
            "i_read_addr": In(abits),
            "i_emit_addr": In(abits),
            "o_emit_data": Out(geometry.Wc),
            # for the hazard checks only: the reads at i_read_addr / i_emit_addr are used
            "i_read_used": In(1),
            "i_emit_used": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._g
        Wc, K, acc_jbits = g.Wc, g.K, g.acc_jbits
        L = Fp32Adder.LATENCY
        LF = FMA_PATH_LATENCY
        q, r = self.i_q, self.i_r

        # Block RAMs with the output register on (read latency 2), read enables always on:
        # nothing behind the issue stage stalls.
        m.submodules.acc_r = acc_r = BlockRAM(width=Wc, depth=2 << acc_jbits,
                                              primitive=self._ram_primitive)
        m.submodules.acc_e = acc_e = BlockRAM(width=Wc, depth=2 << acc_jbits,
                                              primitive=self._ram_primitive)
        acc_w_addr = Signal(acc_jbits + 1)
        acc_w_data = Signal(Wc)
        acc_w_en = Signal()
        for ram in (acc_r, acc_e):
            m.d.comb += [ram.r_en.eq(1), ram.r_oe.eq(1),
                         ram.w_addr.eq(acc_w_addr), ram.w_data.eq(acc_w_data),
                         ram.w_en.eq(acc_w_en.replicate(Wc // 8))]
        m.d.comb += [acc_r.r_addr.eq(self.i_read_addr), acc_e.r_addr.eq(self.i_emit_addr),
                     self.o_emit_data.eq(acc_e.r_data)]

        # ---------------- stage R2: the read data, with the recent sums forwarded ----------------
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
            fwd1.eq(acc_w_en & (acc_w_addr == q.addr)),
            fwd2.eq(w1_en & (w1_addr == q.addr)),
        ]
        # the write of the next cycle is known a cycle early (both pipelines advance every
        # cycle), so the forward to stage R is a register too: the select of the wide r2_acc
        # mux does not wait on a compare behind the write-address mux
        fwd0 = Signal()
        w_next_en = Signal()
        w_next_addr = Signal.like(acc_w_addr)
        m.d.sync += fwd0.eq(w_next_en & (w_next_addr == q.addr))
        m.d.sync += [
            r2_valid.eq(r.accum), r2_first.eq(r.first), r2_addr.eq(r.addr), r2_sub.eq(r.sub),
            r2_elem.eq(r.elem), r2_hdr.eq(r.hdr), r2_fma.eq(r.fma), r2_rowwise.eq(r.rowwise),
            r2_weighted.eq(r.weighted), r2_weight.eq(r.weight),
            r2_int.eq((r.elem == ElemType.INT8) | (r.elem == ElemType.INT32)),
            r2_rd.eq(self.i_rob_data),
            r2_acc.eq(Mux(fwd0, acc_w_data, Mux(fwd1, w1_data, Mux(fwd2, w2_data, acc_r.r_data)))),
        ]

        # ---------------- stage W: widen the row's elements into K 32-bit lanes ----------------
        w_valid = Signal()
        w_int = Signal()
        w_j = Signal(acc_jbits + 1)
        w_a = [Signal(32, name=f"w_a{i}") for i in range(K)]
        w_b = [Signal(32, name=f"w_b{i}") for i in range(K)]
        # Each consumer of the operands has its own copy (the fp adder: w_a/w_b; the int32
        # adder: wi_a/wi_b; the FMA path: wf_a, wf_b for the int-to-float converters and w_b
        # for the other types), so no operand register drives all of them. Each copy is what
        # its consumer needs, from the fewest inputs (the integer copies skip the fp16
        # widening), and differs from the others where the others' rows do not matter to it
        # (else the synthesizer would merge equal registers back).
        wi_a = [Signal(32, name=f"wi_a{i}") for i in range(K)]
        wi_b = [Signal(32, name=f"wi_b{i}") for i in range(K)]
        wf_a = [Signal(32, name=f"wf_a{i}") for i in range(K)]
        wf_b = [Signal(32, name=f"wf_b{i}") for i in range(K)]
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
        w_scale = Signal(32)
        w_bias = Signal(32)
        w_w = Signal(32)
        w_bw = Signal(32)                # the bias product's weight: 1.0 unless row-wise
        m.d.sync += [
            w_fma.eq(r2_fma),
            w_conv.eq(r2_int | (r2_elem == ElemType.INT8_ROWWISE)),
            w_scale.eq(Mux(r2_rowwise, row_scale, 0x3F80_0000)),
            # not row-wise, the bias product is fma(-0.0, 1.0, -0.0) = -0.0, the adder's identity:
            # the lanes take it with no select behind the FMA
            w_bias.eq(Mux(r2_rowwise, row_bias, 0x8000_0000)),
            w_w.eq(Mux(r2_weighted, r2_weight, 0x3F80_0000)),
            w_bw.eq(Mux(r2_rowwise & r2_weighted, r2_weight, 0x3F80_0000)),
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
            word = rd[32 * i:32 * (i + 1)]
            lane_int = Mux(r2_elem == ElemType.INT8, byte_sel.as_signed(), word)
            lane_conv = Mux(r2_elem == ElemType.INT8, byte_sel.as_signed(),
                            Mux(r2_elem == ElemType.INT8_ROWWISE, byte_sel, word))
            with m.Switch(r2_elem):
                with m.Case(ElemType.FP16):
                    m.d.comb += lane.eq(h2f.o_f)
                with m.Case(ElemType.INT8):
                    m.d.comb += lane.eq(byte_sel.as_signed())
                with m.Case(ElemType.INT8_ROWWISE):
                    m.d.comb += lane.eq(byte_sel)
                with m.Default():
                    m.d.comb += lane.eq(word)
            acc_i = r2_acc[32 * i:32 * (i + 1)]
            m.d.sync += [w_b[i].eq(lane), w_a[i].eq(Mux(r2_first, ident, acc_i)),
                         wi_a[i].eq(Mux(r2_first, 0, acc_i)), wi_b[i].eq(lane_int),
                         wf_a[i].eq(Mux(r2_first, 0x8000_0000, acc_i)),
                         wf_b[i].eq(lane_conv)]

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
            m.d.sync += isum[0].eq(wi_a[i] + wi_b[i])    # wraps at 32 bits
            for s in range(1, L):
                nxt = Signal(32, name=f"isum{i}_{s}")
                m.d.sync += nxt.eq(isum[-1])
                isum.append(nxt)
            sums.append(Mux(pipe_int[L], isum[-1], add.o_sum))

        # ---------------- FMA path: weighted and row-wise bags, LF cycles ----------------
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
        for pm, x, w in ((pm_scale, w_scale, w_w), (pm_bias, w_bias, w_bw)):
            m.d.comb += [pm.i_a.eq(x), pm.i_b.eq(w), pm.i_c.eq(0x8000_0000),
                         pm.i_valid.eq(f_valid[0])]
        conv_d = delay(w_conv, Int32ToFp32.LATENCY, "f_conv")
        lanes_out = []
        for i in range(K):
            i2f = Int32ToFp32()
            m.submodules[f"i2f{i}"] = i2f
            m.d.comb += [i2f.i_x.eq(wf_b[i]), i2f.i_valid.eq(f_valid[0])]
            raw = delay(w_b[i], Int32ToFp32.LATENCY, f"f_raw{i}")
            xf = Signal(32, name=f"f_x{i}")
            m.d.sync += xf.eq(Mux(conv_d, i2f.o_f, raw))
            x_in = delay(xf, PM - Int32ToFp32.LATENCY - 1, f"f_x{i}")
            acc_in = delay(wf_a[i], PM, f"f_acc{i}")
            lane = RowwiseLane()
            m.submodules[f"lane{i}"] = lane
            m.d.comb += [lane.i_acc.eq(acc_in), lane.i_x.eq(x_in), lane.i_scale.eq(pm_scale.o_res),
                         lane.i_bias.eq(pm_bias.o_res), lane.i_valid.eq(f_valid[PM])]
            lanes_out.append(lane.o_acc)
        m.d.sync += Assert(~(pipe_valid[L] & f_valid[LF]), "merger: two accumulator writes")
        m.d.comb += [
            w_next_addr.eq(Mux(f_valid[LF - 1], f_j[LF - 1], pipe_j[L - 1])),
            w_next_en.eq(pipe_valid[L - 1] | f_valid[LF - 1]),
            acc_w_data.eq(Mux(f_valid[LF], Cat(*lanes_out), Cat(*sums))),
        ]
        m.d.sync += [acc_w_addr.eq(w_next_addr), acc_w_en.eq(w_next_en)]

        # The hazard rules. The ops in flight and the cycles to their writes: stage Q 3 + L,
        # R 2 + L, R2 1 + L, W and adder stage s: L - s.
        in_flight = [(q.accum, q.addr, 3 + L), (r.accum, r.addr, 2 + L), (r2_valid, r2_addr, 1 + L)]
        in_flight += [(pipe_valid[s], pipe_j[s], L - s) for s in range(L + 1)]
        in_flight += [(f_valid[s], f_j[s], LF - s) for s in range(LF + 1)]
        for v, a, to_write in in_flight:
            m.d.sync += Assert(~(self.i_emit_used & v & (a == self.i_emit_addr)),
                               "merger: the emitter reads a sum still to be written")
            if to_write > 2:
                m.d.sync += Assert(~(self.i_read_used & v & (a == self.i_read_addr)),
                                   "merger: an accumulate reads a sum written too late to forward")
        return m
