"""One AXI4-Lite master, two targets: an address window and everything else.

The ECPIX-5 board answers the ULX3S board's address map (:class:`~evssd.hw.boards.board.BridgeDecoder`)
and one more window, the DRAM controller's control/status registers
(:data:`~evssd.hw.bridge_protocol.DRAM_CTRL_BASE`), through which the host initialises and
levels the DDR3. :class:`AXILiteSplit` puts that window in front of the decoder without
touching it.

Each direction runs one transaction at a time through registers (address, data, the chosen
target, the response), like the decoder: no combinational path crosses it, and the extra cycles
are nothing next to a datagram.
"""
from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature

__all__ = ["AXILiteSplit"]


class AXILiteSplit(wiring.Component):
    """``s_axil`` -> ``m_window`` for ``[base, base + size)`` (address minus ``base``,
    ``window_addr_width`` bits), else ``m_rest`` (address unchanged)."""

    def __init__(self, *, base: int, size: int, addr_width: int = 32):
        if size < 4 or size & (size - 1) or base % size:
            raise ValueError(f"window 0x{base:x}+0x{size:x} must be a power of two aligned to its size")
        if base + size > (1 << addr_width):
            raise ValueError(f"window 0x{base:x}+0x{size:x} is beyond addr_width {addr_width}")
        self.base, self.size = base, size
        self.window_addr_width = (size - 1).bit_length()
        super().__init__({
            "s_axil": In(AXI4LiteSignature(addr_width=addr_width, data_width=32)),
            "m_window": Out(AXI4LiteSignature(addr_width=self.window_addr_width, data_width=32)),
            "m_rest": Out(AXI4LiteSignature(addr_width=addr_width, data_width=32)),
        })

    def _hit(self, addr):
        return addr[self.window_addr_width:] == (self.base >> self.window_addr_width)

    def elaborate(self, platform):
        m = Module()
        s, win, rest = self.s_axil, self.m_window, self.m_rest
        targets = (win, rest)

        # ---- writes: take AW and W (either order), forward to the target, return its B
        aw_addr = Signal.like(s.awaddr, reset_less=True)
        w_data = Signal(32, reset_less=True)
        w_strb = Signal(4, reset_less=True)
        aw_have, w_have, aw_win = Signal(), Signal(), Signal()
        awv, wv = Signal(), Signal()
        b_resp = Signal(2)
        for t in targets:
            m.d.comb += [t.awaddr.eq(aw_addr), t.wdata.eq(w_data), t.wstrb.eq(w_strb)]
        m.d.comb += s.bresp.eq(b_resp)
        with m.FSM(name="wr"):
            with m.State("TAKE"):
                m.d.comb += [s.awready.eq(~aw_have), s.wready.eq(~w_have)]
                with m.If(s.awvalid & ~aw_have):
                    m.d.sync += [aw_addr.eq(s.awaddr), aw_have.eq(1), aw_win.eq(self._hit(s.awaddr))]
                with m.If(s.wvalid & ~w_have):
                    m.d.sync += [w_data.eq(s.wdata), w_strb.eq(s.wstrb), w_have.eq(1)]
                with m.If(aw_have & w_have):
                    m.d.sync += [aw_have.eq(0), w_have.eq(0), awv.eq(1), wv.eq(1)]
                    m.next = "FORWARD"
            with m.State("FORWARD"):
                for t, sel in ((win, aw_win), (rest, ~aw_win)):
                    with m.If(sel):
                        m.d.comb += [t.awvalid.eq(awv), t.wvalid.eq(wv)]
                        with m.If(t.awready):
                            m.d.sync += awv.eq(0)
                        with m.If(t.wready):
                            m.d.sync += wv.eq(0)
                        with m.If((~awv | t.awready) & (~wv | t.wready)):
                            m.next = "B"
            with m.State("B"):
                for t, sel in ((win, aw_win), (rest, ~aw_win)):
                    with m.If(sel):
                        m.d.comb += t.bready.eq(1)
                        with m.If(t.bvalid):
                            m.d.sync += b_resp.eq(t.bresp)
                            m.next = "RESP"
            with m.State("RESP"):
                m.d.comb += s.bvalid.eq(1)
                with m.If(s.bready):
                    m.next = "TAKE"

        # ---- reads
        ar_addr = Signal.like(s.araddr, reset_less=True)
        ar_win = Signal()
        r_data = Signal(32, reset_less=True)
        r_resp = Signal(2)
        for t in targets:
            m.d.comb += t.araddr.eq(ar_addr)
        m.d.comb += [s.rdata.eq(r_data), s.rresp.eq(r_resp)]
        with m.FSM(name="rd"):
            with m.State("TAKE"):
                m.d.comb += s.arready.eq(1)
                with m.If(s.arvalid):
                    m.d.sync += [ar_addr.eq(s.araddr), ar_win.eq(self._hit(s.araddr))]
                    m.next = "FORWARD"
            with m.State("FORWARD"):
                for t, sel in ((win, ar_win), (rest, ~ar_win)):
                    with m.If(sel):
                        m.d.comb += t.arvalid.eq(1)
                        with m.If(t.arready):
                            m.next = "R"
            with m.State("R"):
                for t, sel in ((win, ar_win), (rest, ~ar_win)):
                    with m.If(sel):
                        m.d.comb += t.rready.eq(1)
                        with m.If(t.rvalid):
                            m.d.sync += [r_data.eq(t.rdata), r_resp.eq(t.rresp)]
                            m.next = "RESP"
            with m.State("RESP"):
                m.d.comb += s.rvalid.eq(1)
                with m.If(s.rready):
                    m.next = "TAKE"
        return m
