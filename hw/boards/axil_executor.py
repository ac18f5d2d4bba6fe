"""AxiLiteExecutor: one checked bridge request run as AXI4-Lite transactions, word by word.

Both host links of the boards (:class:`~evssd.hw.boards.uart.UartAxiBridge`, framed UART, and
:class:`~evssd.hw.boards.udp_bridge.UdpAxiBridge`, UDP datagrams) parse and check a request in
their own format, then execute the same thing: READ or WRITE of ``n_words_m1 + 1`` consecutive
32-bit words from ``addr`` on the board's AXI4-Lite map (:mod:`evssd.hw.bridge_protocol`'s
address map, decoded by :class:`~evssd.hw.boards.board.BridgeDecoder`). This component is that
execution, once:

- ``i_cmd``: ``{write, addr, n_words_m1, strb}``, taken when idle.
- WRITE: word ``k`` comes from the bridge's request buffer through ``wbuf_addr``/``wbuf_data``
  (a read port of one cycle latency, ``transparent_for=()``), so nothing reaches the bus before
  the bridge checked the whole request; one AW+W, then B, per word, ``wstrb = strb``.
- READ: one AR, then R, per word; each word leaves on ``o_rdata`` (``{data, index}``) before the
  next read starts (the UART bridge sends it byte by byte, the UDP bridge stores it at
  ``index``).
- ``o_done``: ``{resp}``, the first non-OKAY response of the request (0 when all were OKAY),
  after the last word. ``bus_error`` pulses (registered) for each non-OKAY response.

Every AXI valid and every decision is a register (``xlast`` says the current word is the last,
computed a cycle ahead: a word takes at least three cycles).
"""
from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..bridge_protocol import MAX_WORDS
from ..lib.axi import AXI4LiteSignature, Resp

__all__ = ["AxiLiteExecutor", "EXEC_CMD_LAYOUT", "RDATA_LAYOUT", "DONE_LAYOUT"]

_IDX_BITS = (MAX_WORDS - 1).bit_length()

EXEC_CMD_LAYOUT = data.StructLayout({"write": 1, "addr": 32, "n_words_m1": _IDX_BITS, "strb": 4})
RDATA_LAYOUT = data.StructLayout({"data": 32, "index": _IDX_BITS})
DONE_LAYOUT = data.StructLayout({"resp": 2})


class AxiLiteExecutor(wiring.Component):
    """See the module docstring. Ports: ``i_cmd``, ``o_rdata``, ``o_done``, ``wbuf_addr``/
    ``wbuf_data`` (the bridge's request buffer), ``m_axil`` (``AXI4LiteSignature(32, 32)``),
    ``bus_error`` (pulse)."""

    def __init__(self):
        super().__init__({
            "i_cmd": In(stream.Signature(EXEC_CMD_LAYOUT)),
            "o_rdata": Out(stream.Signature(RDATA_LAYOUT)),
            "o_done": Out(stream.Signature(DONE_LAYOUT)),
            "wbuf_addr": Out(_IDX_BITS),
            "wbuf_data": In(32),
            "m_axil": Out(AXI4LiteSignature(addr_width=32, data_width=32)),
            "bus_error": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        bus = self.m_axil
        cmd = self.i_cmd.payload

        addr = Signal(32)
        strb = Signal(4)
        n_m1 = Signal(_IDX_BITS)
        xidx = Signal(_IDX_BITS)
        xlast = Signal()         # xidx == n_m1, a cycle late
        m.d.sync += xlast.eq(xidx == n_m1)
        # data registers: no reset (only read once loaded)
        rword = Signal(32, reset_less=True)
        wdata = Signal(32, reset_less=True)
        rsp = Signal(2)          # the last AXI response, registered
        resp = Signal(2)         # first non-OKAY response of the request
        got_err = Signal()
        arv, awv, wv = Signal(), Signal(), Signal()
        bus_err_p = Signal()
        m.d.sync += bus_err_p.eq(0)
        m.d.comb += [self.bus_error.eq(bus_err_p), self.wbuf_addr.eq(xidx),
                     bus.araddr.eq(addr), bus.awaddr.eq(addr), bus.wdata.eq(wdata),
                     bus.wstrb.eq(strb), bus.arvalid.eq(arv), bus.awvalid.eq(awv),
                     bus.wvalid.eq(wv), bus.rready.eq(1), bus.bready.eq(1),
                     self.o_rdata.payload.data.eq(rword), self.o_rdata.payload.index.eq(xidx),
                     self.o_done.payload.resp.eq(resp)]

        def note_resp():
            with m.If((rsp != Resp.OKAY) & ~got_err):
                m.d.sync += [resp.eq(rsp), got_err.eq(1)]
            with m.If(rsp != Resp.OKAY):
                m.d.sync += bus_err_p.eq(1)

        with m.FSM(name="executor"):
            with m.State("IDLE"):
                m.d.comb += self.i_cmd.ready.eq(1)
                with m.If(self.i_cmd.valid):
                    m.d.sync += [addr.eq(cmd.addr), strb.eq(cmd.strb), n_m1.eq(cmd.n_words_m1),
                                 xidx.eq(0), resp.eq(Resp.OKAY), got_err.eq(0)]
                    with m.If(cmd.write):
                        m.next = "WR_FETCH"
                    with m.Else():
                        m.d.sync += arv.eq(1)
                        m.next = "RD_AR"

            # ---- READ: one AXI4-Lite read per word, each word handed on before the next
            with m.State("RD_AR"):
                with m.If(bus.arready):
                    m.d.sync += arv.eq(0)
                    m.next = "RD_R"
            with m.State("RD_R"):
                with m.If(bus.rvalid):
                    m.d.sync += [rword.eq(bus.rdata), rsp.eq(bus.rresp)]
                    m.next = "RD_OUT"
            with m.State("RD_OUT"):
                # the response is noted once, as the word is taken (the taker's ready comes
                # from its state register)
                m.d.comb += self.o_rdata.valid.eq(1)
                with m.If(self.o_rdata.ready):
                    note_resp()
                    m.d.sync += [addr.eq(addr + 4), xidx.eq(xidx + 1)]
                    with m.If(xlast):
                        m.next = "DONE"
                    with m.Else():
                        m.d.sync += arv.eq(1)
                        m.next = "RD_AR"

            # ---- WRITE: words from the request buffer, one AXI4-Lite write each
            with m.State("WR_FETCH"):
                # the buffer reads word `xidx` this cycle
                m.next = "WR_LATCH"
            with m.State("WR_LATCH"):
                m.d.sync += [wdata.eq(self.wbuf_data), awv.eq(1), wv.eq(1)]
                m.next = "WR_AW"
            with m.State("WR_AW"):
                with m.If(bus.awready):
                    m.d.sync += awv.eq(0)
                with m.If(bus.wready):
                    m.d.sync += wv.eq(0)
                with m.If((~awv | bus.awready) & (~wv | bus.wready)):
                    m.next = "WR_B"
            with m.State("WR_B"):
                with m.If(bus.bvalid):
                    m.d.sync += rsp.eq(bus.bresp)
                    m.next = "WR_NOTE"
            with m.State("WR_NOTE"):
                note_resp()
                m.d.sync += [addr.eq(addr + 4), xidx.eq(xidx + 1)]
                with m.If(xlast):
                    m.next = "DONE"
                with m.Else():
                    m.next = "WR_FETCH"

            with m.State("DONE"):
                m.d.comb += self.o_done.valid.eq(1)
                with m.If(self.o_done.ready):
                    m.next = "IDLE"
        return m
