"""N AXI4 masters onto one AXI4 slave, each master in its own address region.

The ECPIX-5 board puts every flash channel in DDR3 behind one user port of the LiteDRAM
controller: :class:`AXIArbiter` shares that port. Master ``i``'s byte address ``a`` becomes
``base + i * region_bytes + a`` (its region; ``a`` must be below ``region_bytes``, which the
channels guarantee: their addresses are below ``channel_bytes``).

- Reads: AR is granted round-robin among the masters with ``arvalid``, one address handshake per
  grant; the master's index goes into the top bits of ``arid``, so R beats return to their master
  by ``rid`` and several masters' reads may be outstanding at once (the slave keeps AXI's
  per-ID ordering; the channels' own ID bit is kept below the index).
- Writes: AXI4 has no write-data ID, so W must follow AW order: a grant lasts from the AW
  handshake until that master's ``wlast`` beat; B returns by ``bid`` like R.

Everything is combinational between a master and the slave except the grant registers: put an
:class:`~evssd.hw.lib.axi_slice.AXIRegisterSlice` on each side where timing needs it.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Const
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .axi import AXI4Signature

__all__ = ["AXIArbiter"]


class AXIArbiter(wiring.Component):
    """Ports: ``s_axi0`` .. ``s_axi{n-1}``: ``In(AXI4Signature(addr_width=in_addr_width,
    data_width, id_width))``; ``m_axi``: ``Out(AXI4Signature(addr_width=out_addr_width, data_width,
    id_width=id_width + ceil_log2(n)))``."""

    def __init__(self, n: int, *, region_bytes: int, data_width: int = 64, in_addr_width: int = 32,
                 out_addr_width: int = 32, id_width: int = 1, base: int = 0):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"AXIArbiter n {n!r} must be an integer >= 1 (masters)")
        if not isinstance(region_bytes, int) or region_bytes < 4096 or region_bytes & (region_bytes - 1):
            raise ValueError(f"region_bytes {region_bytes!r} must be a power of two >= 4096 "
                             f"(AXI bursts do not cross 4 KiB)")
        if base % region_bytes or base < 0:
            raise ValueError(f"base 0x{base:x} must be a multiple of region_bytes {region_bytes}")
        if base + n * region_bytes > (1 << out_addr_width):
            raise ValueError(f"{n} regions of {region_bytes} bytes from 0x{base:x} do not fit "
                             f"out_addr_width {out_addr_width}")
        self.n, self.region_bytes, self.base = n, region_bytes, base
        self.index_bits = max(ceil_log2(n), 1)
        self.id_width = id_width
        members = {f"s_axi{i}": In(AXI4Signature(addr_width=in_addr_width, data_width=data_width,
                                                 id_width=id_width)) for i in range(n)}
        members["m_axi"] = Out(AXI4Signature(addr_width=out_addr_width, data_width=data_width,
                                             id_width=id_width + self.index_bits))
        super().__init__(members)

    def port(self, i: int):
        return getattr(self, f"s_axi{i}")

    def _addr(self, i, addr):
        off_bits = (self.region_bytes - 1).bit_length()
        region = (self.base + i * self.region_bytes) >> off_bits
        out_w = len(self.m_axi.awaddr)
        return Cat(addr[:off_bits], Const(region, out_w - off_bits))

    def _round_robin(self, m, name, requests):
        """A grant index among ``requests`` (a list of signals), rotating after ``last`` (a
        register updated by the caller). Returns (any, index, last)."""
        last = Signal(range(self.n), name=f"{name}_last", init=self.n - 1)
        index = Signal(range(self.n), name=f"{name}_pick")
        anyreq = Signal(name=f"{name}_any")
        # priority starts after `last`: try last+1, last+2, ... (written as a priority chain per `last`)
        with m.Switch(last):
            for l in range(self.n):
                with m.Case(l):
                    order = [(l + 1 + k) % self.n for k in range(self.n)]
                    for j in reversed(order):
                        with m.If(requests[j]):
                            m.d.comb += index.eq(j)
        m.d.comb += anyreq.eq(Cat(*requests).any())
        return anyreq, index, last

    def elaborate(self, platform):
        m = Module()
        n, mm = self.n, self.m_axi
        ports = [self.port(i) for i in range(n)]
        ib, iw = self.index_bits, self.id_width

        # ---------------------------------------------------------------- reads
        ar_any, ar_pick, ar_last = self._round_robin(m, "ar", [p.arvalid for p in ports])
        with m.Switch(ar_pick):
            for i, p in enumerate(ports):
                with m.Case(i):
                    m.d.comb += [mm.arvalid.eq(p.arvalid), p.arready.eq(mm.arready),
                                 mm.araddr.eq(self._addr(i, p.araddr)), mm.arid.eq(Cat(p.arid, Const(i, ib))),
                                 mm.arlen.eq(p.arlen), mm.arsize.eq(p.arsize), mm.arburst.eq(p.arburst),
                                 mm.arprot.eq(p.arprot)]
        with m.If(mm.arvalid & mm.arready):
            m.d.sync += ar_last.eq(ar_pick)
        r_to = mm.rid[iw:iw + ib]
        for i, p in enumerate(ports):
            m.d.comb += [p.rdata.eq(mm.rdata), p.rresp.eq(mm.rresp), p.rlast.eq(mm.rlast),
                         p.rid.eq(mm.rid[:iw]), p.rvalid.eq(mm.rvalid & (r_to == i))]
        with m.Switch(r_to):
            for i, p in enumerate(ports):
                with m.Case(i):
                    m.d.comb += mm.rready.eq(p.rready)

        # ---------------------------------------------------------------- writes
        aw_any, aw_pick, aw_last = self._round_robin(m, "aw", [p.awvalid for p in ports])
        w_busy = Signal()            # a grant is held: AW and/or W of master `w_owner` still to pass
        w_owner = Signal(range(n))
        aw_done = Signal()           # the held grant's AW has passed
        w_done = Signal()            # the held grant's last W beat has passed
        owner = Signal(range(n))
        m.d.comb += owner.eq(w_owner)
        with m.If(~w_busy):
            m.d.comb += owner.eq(aw_pick)
        w_go = Signal()              # the grant is held or taken this cycle
        m.d.comb += w_go.eq(w_busy | aw_any)
        with m.Switch(owner):
            for i, p in enumerate(ports):
                with m.Case(i):
                    m.d.comb += [mm.awvalid.eq(p.awvalid & ~aw_done & w_go),
                                 p.awready.eq(mm.awready & ~aw_done & w_go),
                                 mm.awaddr.eq(self._addr(i, p.awaddr)), mm.awid.eq(Cat(p.awid, Const(i, ib))),
                                 mm.awlen.eq(p.awlen), mm.awsize.eq(p.awsize), mm.awburst.eq(p.awburst),
                                 mm.awprot.eq(p.awprot),
                                 mm.wvalid.eq(p.wvalid & ~w_done & w_go), p.wready.eq(mm.wready & ~w_done & w_go),
                                 mm.wdata.eq(p.wdata), mm.wstrb.eq(p.wstrb), mm.wlast.eq(p.wlast)]
        aw_has = aw_done | (mm.awvalid & mm.awready)
        w_has = w_done | (mm.wvalid & mm.wready & mm.wlast)
        with m.If(w_go):
            with m.If(aw_has & w_has):
                m.d.sync += [w_busy.eq(0), aw_done.eq(0), w_done.eq(0)]
            with m.Else():
                m.d.sync += [w_busy.eq(1), aw_done.eq(aw_has), w_done.eq(w_has)]
            with m.If(~w_busy):
                m.d.sync += [w_owner.eq(aw_pick), aw_last.eq(aw_pick)]
        b_to = mm.bid[iw:iw + ib]
        for i, p in enumerate(ports):
            m.d.comb += [p.bresp.eq(mm.bresp), p.bid.eq(mm.bid[:iw]), p.bvalid.eq(mm.bvalid & (b_to == i))]
        with m.Switch(b_to):
            for i, p in enumerate(ports):
                with m.Case(i):
                    m.d.comb += mm.bready.eq(p.bready)
        return m
