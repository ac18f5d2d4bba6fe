"""Host DMA: one AXI4 master into host memory shared by several read and write clients.

Clients talk streams, never AXI:

- read port ``i`` (``rd_cmd[i]`` -> ``rd_data[i]``): a command ``{addr, bytes}`` returns
  ``ceil((addr % B + bytes) / B)`` beats (``B`` = bus bytes) of ``{data, last, err}`` in address
  order; ``data`` sits in AXI byte lanes (the first beat is the beat holding ``addr``), ``err`` is
  set on beats whose R response was SLVERR/DECERR. A zero-byte command returns one beat with
  ``last`` set and no bus traffic, so a client that waits for ``last`` never hangs.
- write port ``i`` (``wr_cmd[i]`` + ``wr_data[i]`` -> ``wr_done[i]``): the client sends exactly
  ``ceil((addr % B + bytes) / B)`` data beats in AXI byte lanes; the DMA strobes only the bytes in
  ``[addr, addr + bytes)`` and reports ``{err}`` once every B response of the transfer arrived.
  A zero-byte write takes no data and completes at once.

Bursts never cross a 4 KiB boundary and have at most 256 beats. Each direction serves one
transfer at a time (round-robin between ports); within a transfer AR/AW run ahead of the data so
the bus stays busy. W beats of a burst are sent only after its AW was accepted (a slave may wait
for AW before taking W). All transactions use ID 0, so responses return in order.

Timing: the handshakes start from registers: one-hot port selects, "beats left" / "last beat"
flags kept beside the counters, the AR/AW "may go" flags (a cycle after each address beat, as
the burst length is) and the write completion (one cycle after its last B response).
"""
from __future__ import annotations

from amaranth import Module, Signal, Mux, Const, Cat
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.hdl import Assert
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4Signature, Burst
from ..regmap import Params

from ..lib.dma_stream import DMA_CMD_LAYOUT, DMA_DONE_LAYOUT, dma_read_layout, dma_write_layout

__all__ = ["HostDMA"]


def _log2(x):
    return x.bit_length() - 1


class HostDMA(wiring.Component):
    """AXI4 DMA master with ``n_read`` read ports and ``n_write`` write ports (see module doc)."""

    def __init__(self, params: Params, *, n_read: int = 1, n_write: int = 1):
        Params.require(params)
        if not 1 <= n_read <= 16:
            raise ValueError(f"n_read {n_read} must be 1..16")
        if not 1 <= n_write <= 16:
            raise ValueError(f"n_write {n_write} must be 1..16")
        self.params = params
        self.n_read = n_read
        self.n_write = n_write
        w = params.host_data_bits
        super().__init__({
            "m_axi_host": Out(AXI4Signature(addr_width=64, data_width=w)),
            "rd_cmd": In(stream.Signature(DMA_CMD_LAYOUT)).array(n_read),
            "rd_data": Out(stream.Signature(dma_read_layout(w))).array(n_read),
            "wr_cmd": In(stream.Signature(DMA_CMD_LAYOUT)).array(n_write),
            "wr_data": In(stream.Signature(dma_write_layout(w))).array(n_write),
            "wr_done": Out(stream.Signature(DMA_DONE_LAYOUT)).array(n_write),
        })

    # Beats of the next burst starting at beat-aligned `addr` with `remain` beats left.
    def _burst_cap(self, m, addr, name):
        """The longest burst from ``addr``: to the next 4 KiB boundary, at most 256 beats."""
        bb = self.params.host_data_bits // 8
        to_4k = Signal(range(4096 // bb + 1), name=f"{name}_to_4k")
        m.d.comb += to_4k.eq((4096 - addr[:12]) >> _log2(bb))
        cap = Signal(9, name=f"{name}_cap")
        m.d.comb += cap.eq(Mux(to_4k < 256, to_4k, 256))
        return cap

    def _burst_beats(self, m, addr, remain, name):
        """The next burst's length: the cap from ``addr``, at most ``remain``."""
        cap = self._burst_cap(m, addr, name)
        beats = Signal(9, name=f"{name}_beats")
        m.d.comb += beats.eq(Mux(remain < cap, remain, cap))
        return beats

    def elaborate(self, platform):
        m = Module()
        w = self.params.host_data_bits
        bb = w // 8
        lb = _log2(bb)
        axi = self.m_axi_host

        m.d.comb += [
            axi.arid.eq(0), axi.arsize.eq(lb), axi.arburst.eq(Burst.INCR), axi.arprot.eq(0),
            axi.awid.eq(0), axi.awsize.eq(lb), axi.awburst.eq(Burst.INCR), axi.awprot.eq(0),
        ]

        # ------------------------------------------------------------------ read side
        nr = self.n_read
        r_active = Signal()
        r_zero = Signal()          # zero-byte command: one local beat, no bus traffic
        ar_addr = Signal(64)
        ar_remain = Signal(32)
        r_remain = Signal(32)

        r_load, r_sel, rc_addr, rc_bytes, r_beats = self._take_command(m, self.rd_cmd, r_active, "r")
        # Registered facts instead of compares on the counters: `ar_ok` (an AR may go: beats
        # left, burst length fresh), `r_last` (r_remain == 1, also set for a zero-byte
        # command), one-hot port selects for the data beats (`r_on`) and the zero-byte beat
        # (`r_z`). The per-port handshakes then start from flip-flops.
        r_last = Signal()
        r_on = Signal(nr)
        r_z = Signal(nr)
        with m.If(r_load):
            m.d.sync += [
                r_active.eq(1),
                ar_addr.eq(rc_addr & ~Const(bb - 1, 64)),
                ar_remain.eq(r_beats), r_remain.eq(r_beats),
                r_zero.eq(rc_bytes == 0),
                r_last.eq(r_beats <= 1),
            ]
            for i in range(nr):
                with m.If(r_sel == i):
                    with m.If(rc_bytes == 0):
                        m.d.sync += r_z[i].eq(1)
                    with m.Else():
                        m.d.sync += r_on[i].eq(1)

        # The burst length is registered from the registered address and count: a new
        # burst waits one cycle for it (burst length -> address update was the critical path).
        # `ar_ok` lags `ar_remain` by that same cycle.
        ar_beats = Signal(9)
        ar_ok = Signal()
        ar_fire = Signal()
        m.d.sync += [ar_beats.eq(self._burst_beats(m, ar_addr, ar_remain, "ar")),
                     ar_ok.eq((ar_remain != 0) & ~ar_fire & ~r_load)]
        m.d.comb += [
            axi.arvalid.eq(r_active & ar_ok),
            axi.araddr.eq(ar_addr),
            axi.arlen.eq(ar_beats - 1),
            ar_fire.eq(axi.arvalid & axi.arready),
        ]
        with m.If(ar_fire):
            m.d.sync += [ar_addr.eq(ar_addr + (ar_beats << lb)), ar_remain.eq(ar_remain - ar_beats)]

        r_fire = Signal()
        r_end = Signal()
        m.d.comb += axi.rready.eq(Cat(*(r_on[i] & self.rd_data[i].ready for i in range(nr))).any())
        m.d.comb += r_fire.eq(axi.rvalid & axi.rready)
        for i in range(nr):
            out = self.rd_data[i]
            m.d.comb += [
                out.valid.eq(r_z[i] | (r_on[i] & axi.rvalid)),
                # the zero-byte beat carries zeros, held while it waits (a stream's payload is
                # stable until taken), not whatever the R channel shows
                out.payload.data.eq(Mux(r_zero, 0, axi.rdata)),
                out.payload.last.eq(r_last),
                out.payload.err.eq(axi.rresp[1] & ~r_zero),
            ]
        m.d.comb += r_end.eq((r_fire & r_last) |
                             Cat(*(r_z[i] & self.rd_data[i].ready for i in range(nr))).any())
        with m.If(r_fire):
            m.d.sync += [r_remain.eq(r_remain - 1), r_last.eq(r_remain == 2)]
        with m.If(r_end):
            m.d.sync += [r_active.eq(0), r_on.eq(0), r_z.eq(0)]
        m.d.sync += Assert(~r_active | r_zero | (r_last == (r_remain == 1)), "dma: r_last stale")

        # ------------------------------------------------------------------ write side
        nw = self.n_write
        w_active = Signal()
        aw_addr = Signal(64)
        aw_remain = Signal(32)
        aw_bursts = Signal(32)     # bursts whose AW was accepted
        w_remain = Signal(32)      # data beats still to send
        w_first = Signal()         # next beat is the transfer's first
        w_inburst = Signal(9)      # beats sent in the current W burst
        b_count = Signal(32)
        b_err = Signal()
        first_strb = Signal(bb)
        last_strb = Signal(bb)
        w_done_pending = Signal()

        # As on the read side: the command into registers, then its transfer from them (w_load),
        # and registered facts instead of compares on the counters: `aw_ok` (an AW may go),
        # `w_more`/`w_last1` (w_remain != 0 / == 1) and a one-hot port select `w_on` for the
        # handshakes (`w_sel` only steers the data and completion muxes).
        w_more = Signal()
        w_last1 = Signal()
        w_on = Signal(nw)
        w_load, w_sel, wc_addr, wc_bytes, w_beats = self._take_command(m, self.wr_cmd, w_active, "w")
        with m.If(w_load):
            start = wc_addr[:lb]
            end = Signal(lb)   # (addr + bytes) % bb
            m.d.comb += end.eq(wc_addr[:lb] + wc_bytes[:lb])
            m.d.sync += [
                w_active.eq(1),
                aw_addr.eq(wc_addr & ~Const(bb - 1, 64)),
                aw_remain.eq(w_beats), w_remain.eq(w_beats),
                w_more.eq(wc_bytes != 0), w_last1.eq(w_beats == 1),
                aw_bursts.eq(0), w_inburst.eq(0), w_first.eq(1),
                b_count.eq(0), b_err.eq(0),
                first_strb.eq(Const((1 << bb) - 1, bb) << start),
                # lanes below the end offset; end == 0 means the whole beat
                last_strb.eq(Mux(end == 0, Const((1 << bb) - 1, bb),
                                 (Const(1, bb + 1) << end) - 1)),
            ]
            for i in range(nw):
                with m.If(w_sel == i):
                    m.d.sync += w_on[i].eq(1)

        # The next burst's length in two register steps from the address and the beats left
        # (the bytes to the 4 KiB boundary, then the smaller of that and what is left), so no AW
        # is offered in the two cycles after either changes (a fire or a new command).
        aw_beats = Signal(9)
        aw_ok = Signal()
        aw_fire = Signal()
        aw_changed = Signal()
        aw_cap = Signal(9)
        m.d.sync += [aw_cap.eq(self._burst_cap(m, aw_addr, "aw")),
                     aw_beats.eq(Mux(aw_remain < aw_cap, aw_remain, aw_cap)),
                     aw_changed.eq(aw_fire | w_load),
                     aw_ok.eq((aw_remain != 0) & ~aw_fire & ~w_load & ~aw_changed)]
        # Each accepted AW's length waits here for its W burst: W takes wlast from a register
        # instead of recomputing the burst length from its start address (that chain ran into
        # wvalid/wready and the clients' handshakes).
        m.submodules.w_lens = w_lens = SyncFIFOBuffered(width=8, depth=4)
        m.d.comb += [
            w_lens.w_data.eq(aw_beats - 1),
            w_lens.w_en.eq(aw_fire),
        ]
        m.d.comb += [
            axi.awvalid.eq(w_active & aw_ok & w_lens.w_rdy),
            axi.awaddr.eq(aw_addr),
            axi.awlen.eq(aw_beats - 1),
            aw_fire.eq(axi.awvalid & axi.awready),
        ]
        with m.If(aw_fire):
            m.d.sync += [aw_addr.eq(aw_addr + (aw_beats << lb)), aw_remain.eq(aw_remain - aw_beats),
                         aw_bursts.eq(aw_bursts + 1)]

        # W: a burst goes out once its AW was accepted, with that AW's length
        w_may = Signal()
        w_fire = Signal()
        m.d.comb += w_may.eq(w_more & w_lens.r_rdy)
        strb = Signal(bb)
        m.d.comb += strb.eq(Mux(w_first, first_strb, Const((1 << bb) - 1, bb)) &
                            Mux(w_last1, last_strb, Const((1 << bb) - 1, bb)))
        m.d.comb += [axi.wstrb.eq(strb), axi.wlast.eq(w_inburst == w_lens.r_data)]
        m.d.comb += axi.wvalid.eq(w_may & Cat(*(w_on[i] & self.wr_data[i].valid
                                               for i in range(nw))).any())
        for i in range(nw):
            src = self.wr_data[i]
            m.d.comb += src.ready.eq(w_on[i] & w_may & axi.wready)
            with m.If(w_sel == i):
                m.d.comb += axi.wdata.eq(src.payload.data)
        m.d.comb += w_fire.eq(axi.wvalid & axi.wready)
        with m.If(w_fire):
            m.d.sync += [w_remain.eq(w_remain - 1), w_first.eq(0),
                         w_more.eq(~w_last1), w_last1.eq(w_remain == 2)]
            with m.If(axi.wlast):
                m.d.comb += w_lens.r_en.eq(1)
                m.d.sync += w_inburst.eq(0)
            with m.Else():
                m.d.sync += w_inburst.eq(w_inburst + 1)
        m.d.sync += [
            Assert(~w_active | (w_more == (w_remain != 0)), "dma: w_more stale"),
            Assert(~w_active | (w_last1 == (w_remain == 1)), "dma: w_last1 stale"),
        ]

        m.d.comb += axi.bready.eq(w_active)
        with m.If(axi.bvalid & axi.bready):
            m.d.sync += [b_count.eq(b_count + 1), b_err.eq(b_err | axi.bresp[1])]

        # Registered from the state a cycle old (each term stays true once true, and nothing of
        # the previous transfer is seen after a load): the completion waits one more cycle.
        m.d.sync += w_done_pending.eq((aw_remain == 0) & ~w_more & (b_count == aw_bursts) &
                                      w_active & ~w_load)
        for i in range(nw):
            done = self.wr_done[i]
            m.d.comb += [done.valid.eq(w_on[i] & w_done_pending), done.payload.err.eq(b_err)]
            with m.If(done.valid & done.ready):
                m.d.sync += [w_active.eq(0), w_on.eq(0)]
        return m

    def _take_command(self, m, cmds, busy, name):
        """Round-robin over the command streams ``cmds`` while not ``busy``: a command is taken
        into registers first (the round-robin only steers that) and its transfer is computed
        from them in the next cycle, while ``load`` is high (the round-robin, the payload mux
        and the beat arithmetic were one chain into the transfer registers). The round-robin's
        choice is registered, made from the valids as they were a cycle ago (a stream's valid
        stays high until its transfer; the cycle after a take is a `load` cycle, in which
        nothing is taken, so the choice follows the new priority in time): the take decision
        and the payload mux's select come from registers, not from the clients' handshake
        logic. A command waits one more cycle.

        Returns ``(load, sel, addr, nbytes, beats)``: ``sel`` the port taken, ``beats`` the bus
        beats of the transfer (from the registered ``addr`` and ``nbytes``)."""
        n = len(cmds)
        bb = self.params.host_data_bits // 8
        lb = _log2(bb)
        rr = Signal(range(n), name=f"{name}_rr")   # the port that gets priority next
        sel = Signal(range(n), name=f"{name}_sel")
        pick_c = Signal(range(n), name=f"{name}_pick_c")
        any_c = Signal(name=f"{name}_any_c")
        pick = Signal(range(n), name=f"{name}_pick")
        any_ = Signal(name=f"{name}_any")
        # the ports that stay valid into the next cycle (not taken in this one)
        self._round_robin(m, [c.valid & ~c.ready for c in cmds], rr, pick_c, any_c, name)
        m.d.sync += [pick.eq(pick_c), any_.eq(any_c)]
        for i, cmd in enumerate(cmds):
            m.d.sync += Assert(~any_ | (pick != i) | cmd.valid,
                               "dma: a command's valid fell before it was taken")
        load = Signal(name=f"{name}_load")
        addr = Signal(64, name=f"{name}c_addr")
        nbytes = Signal(32, name=f"{name}c_bytes")
        with m.If(~busy & ~load & any_):
            for i, cmd in enumerate(cmds):
                with m.If(pick == i):
                    m.d.comb += cmd.ready.eq(1)
                    m.d.sync += [load.eq(1), sel.eq(i), rr.eq((i + 1) % n),
                                 addr.eq(cmd.payload.addr), nbytes.eq(cmd.payload.bytes)]
        with m.If(load):
            m.d.sync += load.eq(0)
        beats = Mux(nbytes == 0, 0, (addr[:lb] + nbytes + (bb - 1)) >> lb)
        return load, sel, addr, nbytes, beats

    @staticmethod
    def _round_robin(m, valids, rr, pick, any_, name):
        """pick = first valid port at or after rr (wrapping); any_ = some port is valid."""
        n = len(valids)
        m.d.comb += any_.eq(0)
        if n == 1:
            m.d.comb += [pick.eq(0), any_.eq(valids[0])]
            return
        # Try offsets from the farthest to the nearest so the nearest (highest priority) wins.
        for start in range(n):
            with m.If(rr == start):
                for k in reversed(range(n)):
                    j = (start + k) % n
                    with m.If(valids[j]):
                        m.d.comb += [pick.eq(j), any_.eq(1)]
