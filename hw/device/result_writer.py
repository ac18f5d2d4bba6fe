"""ResultWriter: the command engine's last stage, results to host memory and completions, in order.

For each command in completion order (``i_order``, pushed by the engine's front when it accepts
a command) it DMA-writes the merger's packed output (``i_out``) to ``dst_addr`` in pieces of at
most ``chunk_bytes``, waits for each piece's write response (``i_res_done``), and posts the
completion (``o_cpl``). A command with output also takes its per-lookup statistics (``i_stats``,
pushed by the engine's fork at the command's last descriptor); its status becomes BUS_ERROR when
a write response or the merger's last beat carried an error, else the statistics' status with
``n_bad`` and ``first_bad``. A command without output (rejected by the front) completes with its
own status and takes no statistics.

A stage of its own because it shares nothing with the front or the fork but these three streams:
it runs behind them while they already work on later commands.
"""
from __future__ import annotations

from amaranth import Module, Signal, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.dma_stream import DMA_CMD_LAYOUT, DMA_DONE_LAYOUT, dma_write_layout
from ..regmap import NO_BAD_POSITION, Params, Status
from .merger import out_layout
from .queues import CPL_REQUEST_LAYOUT

__all__ = ["ResultWriter", "ORDER_LAYOUT", "STATS_LAYOUT", "RESULT_CHUNK_BYTES"]

RESULT_CHUNK_BYTES = 1024   # result DMA writes (a completion post waits at most one chunk)

# what the front knows of a command when it accepts it
ORDER_LAYOUT = data.StructLayout({
    "cid": 16, "sq_head": 16, "status": 8, "has_output": 1, "out_bytes": 32,
    "dst_addr": 64,
})
# what the fork found over a command's lookups
STATS_LAYOUT = data.StructLayout({"n_bad": 32, "first_bad": 32, "status": 8, "err": 1})


class ResultWriter(wiring.Component):
    """See the module docstring. Ports: ``i_order``, ``i_stats``, ``i_out`` (merger ``o_data``),
    DMA write port ``o_res_cmd``/``o_res_data``/``i_res_done``, ``o_cpl`` (queues ``i_cpl``);
    ``ev_complete``/``ev_error``: a completion with any/non-OK status is taken this cycle."""

    def __init__(self, params: Params, chunk_bytes: int = RESULT_CHUNK_BYTES):
        try:
            Params.require(params)
            bb = params.host_data_bits // 8
            if chunk_bytes < bb or chunk_bytes & (chunk_bytes - 1):
                raise ValueError(f"chunk_bytes {chunk_bytes} must be a power of two >= {bb} "
                                 f"(the host data width in bytes)")
        except (TypeError, ValueError):
            self._MustUse__silence = True   # a rejected object is not an unused elaboratable
            raise
        self.params = params
        self.chunk_bytes = chunk_bytes
        wh = params.host_data_bits
        super().__init__({
            "i_order": In(stream.Signature(ORDER_LAYOUT)),
            "i_stats": In(stream.Signature(STATS_LAYOUT)),
            "i_out": In(stream.Signature(out_layout(params))),
            "o_res_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "o_res_data": Out(stream.Signature(dma_write_layout(wh))),
            "i_res_done": In(stream.Signature(DMA_DONE_LAYOUT)),
            "o_cpl": Out(stream.Signature(CPL_REQUEST_LAYOUT)),
            "ev_complete": Out(1), "ev_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        wh = self.params.host_data_bits
        CH = self.chunk_bytes
        cur = Signal(ORDER_LAYOUT)
        left = Signal(32)
        waddr = Signal(64)
        chunk = Signal(range(CH + 1))
        beats_left = Signal(range(CH // (wh // 8) + 2))
        res_err = Signal()
        cpl_status = Signal(8)
        cpl_nbad = Signal(32)
        cpl_fbad = Signal(32)
        # registered, from `left` as it was a cycle ago: PLAN waits that cycle (the compare and
        # the 64-bit address add in one cycle were the engine's critical path)
        m.d.sync += chunk.eq(Mux(left < CH, left, CH))
        st = self.i_stats.payload
        lbb = (wh // 8).bit_length() - 1

        with m.FSM(name="result"):
            with m.State("IDLE"):
                m.d.comb += self.i_order.ready.eq(1)
                with m.If(self.i_order.valid):
                    ent = self.i_order.payload
                    m.d.sync += [cur.eq(ent), res_err.eq(0)]
                    m.d.sync += [left.eq(ent.out_bytes), waddr.eq(ent.dst_addr),
                                 cpl_status.eq(ent.status), cpl_nbad.eq(0),
                                 cpl_fbad.eq(NO_BAD_POSITION)]
                    with m.If(ent.has_output):
                        m.next = "PLAN"
                    with m.Else():
                        m.next = "CPL"
            with m.State("PLAN"):
                m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += [self.o_res_cmd.valid.eq(1), self.o_res_cmd.payload.addr.eq(waddr),
                             self.o_res_cmd.payload.bytes.eq(chunk)]
                with m.If(self.o_res_cmd.ready):
                    m.d.sync += beats_left.eq((chunk + (wh // 8) - 1) >> lbb)
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += [
                    self.o_res_data.valid.eq(self.i_out.valid),
                    self.o_res_data.payload.data.eq(self.i_out.payload.data),
                    self.o_res_data.payload.last.eq(beats_left == 1),
                    self.i_out.ready.eq(self.o_res_data.ready),
                ]
                with m.If(self.i_out.valid & self.i_out.ready):
                    m.d.sync += beats_left.eq(beats_left - 1)
                    with m.If(self.i_out.payload.last & self.i_out.payload.err):
                        m.d.sync += res_err.eq(1)
                    with m.If(beats_left == 1):
                        m.next = "WAIT"
            with m.State("WAIT"):
                m.d.comb += self.i_res_done.ready.eq(1)
                with m.If(self.i_res_done.valid):
                    m.d.sync += [res_err.eq(res_err | self.i_res_done.payload.err),
                                 left.eq(left - chunk), waddr.eq(waddr + chunk)]
                    with m.If(left == chunk):
                        m.next = "STATS"
                    with m.Else():
                        m.next = "PLAN"
            with m.State("STATS"):
                m.d.comb += self.i_stats.ready.eq(1)
                with m.If(self.i_stats.valid):
                    with m.If(res_err | st.err):
                        m.d.sync += cpl_status.eq(Status.BUS_ERROR)
                    with m.Else():
                        m.d.sync += [cpl_status.eq(st.status), cpl_nbad.eq(st.n_bad),
                                     cpl_fbad.eq(st.first_bad)]
                    m.next = "CPL"
            with m.State("CPL"):
                m.d.comb += [
                    self.o_cpl.valid.eq(1),
                    self.o_cpl.payload.n_bad.eq(cpl_nbad),
                    self.o_cpl.payload.first_bad.eq(cpl_fbad),
                    self.o_cpl.payload.sq_head.eq(cur.sq_head),
                    self.o_cpl.payload.cid.eq(cur.cid),
                    self.o_cpl.payload.status.eq(cpl_status),
                ]
                with m.If(self.o_cpl.ready):
                    m.d.comb += [self.ev_complete.eq(1), self.ev_error.eq(cpl_status != 0)]
                    m.next = "IDLE"
        return m
