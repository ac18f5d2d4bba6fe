"""AXI4-Lite slave -> Wishbone (classic, 32-bit) master: the host's path to LiteDRAM's
control/status registers (its ``wb_ctrl`` port) on the ECPIX-5.

One transaction at a time (a write when AW and W are both there, else a read), held on the
Wishbone bus until ``ack`` (OKAY) or ``err`` (SLVERR); a target that answers neither within
``timeout`` cycles ends the cycle with SLVERR, so a wedged core cannot hang the host link.
"""
from __future__ import annotations

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, Resp

__all__ = ["WishboneSignature", "AXILiteToWishbone"]


class WishboneSignature(wiring.Signature):
    """Classic Wishbone master, 32-bit data, word addresses (``adr`` = byte address >> 2)."""

    def __init__(self, addr_width: int = 30):
        self.addr_width = addr_width
        super().__init__({
            "adr": Out(addr_width), "dat_w": Out(32), "dat_r": In(32), "sel": Out(4),
            "cyc": Out(1), "stb": Out(1), "we": Out(1), "ack": In(1), "err": In(1),
        })


class AXILiteToWishbone(wiring.Component):
    """Ports: ``s_axil: In(AXI4LiteSignature(addr_width, 32))``, ``m_wb: Out(WishboneSignature(addr_width - 2))``."""

    def __init__(self, *, addr_width: int = 16, timeout: int = 1024):
        if not isinstance(timeout, int) or timeout < 4:
            raise ValueError(f"timeout {timeout!r} must be an integer >= 4 cycles")
        self.timeout = timeout
        super().__init__({
            "s_axil": In(AXI4LiteSignature(addr_width=addr_width, data_width=32)),
            "m_wb": Out(WishboneSignature(addr_width - 2)),
        })

    def elaborate(self, platform):
        m = Module()
        s, wb = self.s_axil, self.m_wb
        resp = Signal(2)
        rdata = Signal(32, reset_less=True)
        left = Signal(range(self.timeout + 1))
        m.d.comb += [s.bresp.eq(resp), s.rresp.eq(resp), s.rdata.eq(rdata)]

        def bus_cycle(done_state):
            m.d.comb += [wb.cyc.eq(1), wb.stb.eq(1)]
            m.d.sync += left.eq(left - 1)
            with m.If(wb.ack | wb.err | (left == 0)):
                # an err, or no answer in time: SLVERR
                m.d.sync += [resp.eq(Mux(wb.ack & ~wb.err, Resp.OKAY, Resp.SLVERR)), rdata.eq(wb.dat_r)]
                m.next = done_state

        with m.FSM():
            with m.State("IDLE"):
                with m.If(s.awvalid & s.wvalid):
                    m.d.comb += [s.awready.eq(1), s.wready.eq(1)]
                    m.d.sync += [wb.adr.eq(s.awaddr[2:]), wb.dat_w.eq(s.wdata), wb.sel.eq(s.wstrb),
                                 wb.we.eq(1), left.eq(self.timeout)]
                    m.next = "WRITE"
                with m.Elif(s.arvalid):
                    m.d.comb += s.arready.eq(1)
                    m.d.sync += [wb.adr.eq(s.araddr[2:]), wb.sel.eq(0xF), wb.we.eq(0), left.eq(self.timeout)]
                    m.next = "READ"
            with m.State("WRITE"):
                bus_cycle("B")
            with m.State("READ"):
                bus_cycle("R")
            with m.State("B"):
                m.d.comb += s.bvalid.eq(1)
                with m.If(s.bready):
                    m.next = "IDLE"
            with m.State("R"):
                m.d.comb += s.rvalid.eq(1)
                with m.If(s.rready):
                    m.next = "IDLE"
        return m
