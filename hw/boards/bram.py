"""Block-RAM AXI4 slave: the board's flash channels and its host-memory window.

:class:`AxiBram` serves one AXI4 slave port ``s_axi`` from a :class:`~evssd.hw.lib.block_ram.BlockRAM`
(one write port, one read port through the array and output registers: ECP5 DP16KD with the
output register on, Xilinx RAMB in simple dual-port mode; a write and a read each cycle). Bursts: INCR and FIXED (WRAP is treated as INCR), narrow
transfers (``size`` below the bus width) with strobes, one beat per cycle on W and on R (with
back-pressure on R), reads and writes in parallel, one burst at a time per direction. Addresses
wrap modulo the memory size (like cocotbext-axi's AxiRam), so the upper address bits a master
sends (e.g. the host window base) are ignored; every access answers OKAY. A read of a word
that is written in the same cycle returns the old or the new value (either).

With ``lite_port=True`` a second, 32-bit AXI4-Lite slave ``s_axil`` reaches the same memory (the
UART bridge's view of the host window). Each direction arbitrates per transaction between the
two ports, alternating priority so neither starves.
"""
from __future__ import annotations

from amaranth import Module, Signal, C
from amaranth.lib import wiring
from amaranth.lib.wiring import In
from amaranth.utils import exact_log2

from ..lib.axi import AXI4Signature, AXI4LiteSignature, Burst, Resp
from ..lib.block_ram import BlockRAM

__all__ = ["AxiBram"]


class AxiBram(wiring.Component):
    """AXI4 slave on block RAM.

    Ports: ``s_axi: In(AXI4Signature(addr_width, data_width, id_width))`` and, with
    ``lite_port``, ``s_axil: In(AXI4LiteSignature(addr_width=lite_addr_width, data_width=32))``.
    ``init``: optional initial contents as bytes (little-endian words). ``primitive``: the
    :class:`~evssd.hw.lib.block_ram.BlockRAM` implementation (``None``: chosen from the platform).
    """

    def __init__(self, *, size: int, data_width: int = 64, addr_width: int = 32, id_width: int = 4,
                 lite_port: bool = False, lite_addr_width: int = 32, init: bytes | None = None,
                 primitive: str | None = None):
        if data_width not in (32, 64, 128, 256, 512):
            raise ValueError(f"AxiBram data_width {data_width} must be a power of two 32..512")
        bpw = data_width // 8
        if not isinstance(size, int) or size < bpw or size & (size - 1):
            raise ValueError(f"AxiBram size {size!r} must be a power of two >= {bpw} bytes")
        if (1 << addr_width) < size:
            raise ValueError(f"AxiBram addr_width {addr_width} cannot address {size} bytes")
        if init is not None and len(init) > size:
            raise ValueError(f"AxiBram init of {len(init)} bytes does not fit {size} bytes")
        self.size, self.data_width, self.bpw = size, data_width, bpw
        self.depth = size // bpw
        self.lite_port = lite_port
        self._init = init
        self.primitive = primitive
        members = {"s_axi": In(AXI4Signature(addr_width=addr_width, data_width=data_width,
                                             id_width=id_width))}
        if lite_port:
            members["s_axil"] = In(AXI4LiteSignature(addr_width=lite_addr_width, data_width=32))
        super().__init__(members)

    def _words(self):
        if not self._init:
            return []
        raw = bytes(self._init) + bytes(-len(self._init) % self.bpw)
        return [int.from_bytes(raw[i:i + self.bpw], "little") for i in range(0, len(raw), self.bpw)]

    def elaborate(self, platform):
        m = Module()
        bpw, depth = self.bpw, self.depth
        lsb = exact_log2(bpw)
        idx_bits = exact_log2(depth)
        axi = self.s_axi

        # The memory's read runs through two registers (the array's and the output register,
        # which on ECP5 is the DP16KD's own; hw/lib/block_ram.py), each advancing with its enable.
        m.submodules.mem = mem = BlockRAM(width=self.data_width, depth=depth, init=self._words(),
                                          primitive=self.primitive)
        rd_addr = mem.r_addr
        rd_data = mem.r_data

        def index(a):
            return a[lsb:lsb + idx_bits] if idx_bits else C(0, 1)

        lite = self.s_axil if self.lite_port else None
        lanes = self.data_width // 32

        # ------------------------------------------------------------------ writes
        waddr = Signal(axi.awaddr.shape())
        wsize = Signal(3)
        wburst = Signal(2)
        wid = Signal(axi.awid.shape())
        wprio_lite = Signal()
        m.d.comb += [axi.bid.eq(wid), axi.bresp.eq(Resp.OKAY)]
        # The write address is the address register in every state (only the enables are
        # decided per cycle): on a board it fans out to every block RAM of the memory, so no
        # logic sits in front of it. A lite write goes through the same register.
        m.d.comb += [mem.w_addr.eq(index(waddr)), mem.w_data.eq(axi.wdata)]
        if lite is not None:
            m.d.comb += lite.bresp.eq(Resp.OKAY)
            lite_w_req = lite.awvalid & lite.wvalid
            lite_wdata = Signal(self.data_width, reset_less=True)
            lite_wen = Signal(self.bpw)

        with m.FSM(name="wr"):
            with m.State("IDLE"):
                axi_go = axi.awvalid
                if lite is not None:
                    lite_go = lite_w_req & (wprio_lite | ~axi.awvalid)
                    axi_go = axi.awvalid & ~lite_go
                    with m.If(lite_go):
                        # A 32-bit word into its lane of the wide memory word, written from
                        # registers in LITE_W.
                        lane = lite.awaddr[2:lsb] if lanes > 1 else C(0, 1)
                        m.d.comb += [lite.awready.eq(1), lite.wready.eq(1)]
                        m.d.sync += [waddr.eq(lite.awaddr), lite_wdata.eq(lite.wdata.replicate(lanes)),
                                     lite_wen.eq(lite.wstrb << (lane * 4)), wprio_lite.eq(0)]
                        m.next = "LITE_W"
                with m.If(axi_go):
                    m.d.comb += axi.awready.eq(1)
                    m.d.sync += [waddr.eq(axi.awaddr), wsize.eq(axi.awsize),
                                 wburst.eq(axi.awburst), wid.eq(axi.awid), wprio_lite.eq(1)]
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += axi.wready.eq(1)
                with m.If(axi.wvalid):
                    m.d.comb += mem.w_en.eq(axi.wstrb)
                    with m.If(wburst != Burst.FIXED):
                        m.d.sync += waddr.eq(waddr + (C(1, 8) << wsize))
                    with m.If(axi.wlast):
                        m.next = "RESP"
            with m.State("RESP"):
                m.d.comb += axi.bvalid.eq(1)
                with m.If(axi.bready):
                    m.next = "IDLE"
            if lite is not None:
                with m.State("LITE_W"):
                    m.d.comb += [mem.w_data.eq(lite_wdata), mem.w_en.eq(lite_wen)]
                    m.next = "LITE_B"
                with m.State("LITE_B"):
                    m.d.comb += lite.bvalid.eq(1)
                    with m.If(lite.bready):
                        m.next = "IDLE"

        # ------------------------------------------------------------------ reads
        # The read pipe is the memory's two registers: the array register (beat valid q_valid)
        # and the output register, which is the R channel's data (beat valid rvalid). Both
        # advance together whenever the R beat is taken or absent, so back-pressure costs no
        # extra buffer and a burst streams one beat per cycle.
        raddr = Signal(axi.araddr.shape())
        rsize = Signal(3)
        rburst = Signal(2)
        rleft = Signal(9)
        rid_next = Signal(axi.arid.shape())
        q_valid = Signal()
        q_last = Signal()
        q_id = Signal(axi.arid.shape())
        rvalid = Signal()
        rlast = Signal()
        rid = Signal(axi.arid.shape())
        rprio_lite = Signal()
        advance = ~rvalid | axi.rready
        issue = Signal()
        # The read address is the burst's address register whenever the AXI side reads (only
        # the enable is decided per cycle): on a board its fan-out to every block RAM of the
        # memory is the long wire, so no logic sits in front of it.
        m.d.comb += [axi.rvalid.eq(rvalid), axi.rlast.eq(rlast), axi.rid.eq(rid),
                     axi.rdata.eq(rd_data), axi.rresp.eq(Resp.OKAY),
                     rd_addr.eq(index(raddr)), mem.r_en.eq(advance), mem.r_oe.eq(advance)]
        with m.If(advance):
            m.d.sync += [q_valid.eq(issue), rvalid.eq(q_valid), rlast.eq(q_last), rid.eq(q_id)]
        if lite is not None:
            # A lite read goes through the address register too, and its word is registered
            # before it leaves (the block RAM's output feeds a register, not logic).
            lite_lane = Signal(range(max(lanes, 2)))
            lite_rdata = Signal(32, reset_less=True)
            m.d.comb += [lite.rresp.eq(Resp.OKAY), lite.rdata.eq(lite_rdata)]

        with m.FSM(name="rd"):
            with m.State("IDLE"):
                axi_go = axi.arvalid
                if lite is not None:
                    # The lite read shares the read pipe: only with the pipe empty.
                    lite_go = lite.arvalid & ~q_valid & ~rvalid & (rprio_lite | ~axi.arvalid)
                    axi_go = axi.arvalid & ~lite_go
                    with m.If(lite_go):
                        m.d.comb += lite.arready.eq(1)
                        if lanes > 1:
                            m.d.sync += lite_lane.eq(lite.araddr[2:lsb])
                        m.d.sync += [raddr.eq(lite.araddr), rprio_lite.eq(0)]
                        m.next = "LITE_RD"
                with m.If(axi_go):
                    m.d.comb += axi.arready.eq(1)
                    m.d.sync += [raddr.eq(axi.araddr), rsize.eq(axi.arsize), rburst.eq(axi.arburst),
                                 rleft.eq(axi.arlen + 1), rid_next.eq(axi.arid), rprio_lite.eq(1)]
                    m.next = "BURST"
            with m.State("BURST"):
                with m.If(advance):
                    m.d.comb += issue.eq(1)
                    m.d.sync += [q_last.eq(rleft == 1), q_id.eq(rid_next), rleft.eq(rleft - 1)]
                    with m.If(rburst != Burst.FIXED):
                        m.d.sync += raddr.eq(raddr + (C(1, 8) << rsize))
                    with m.If(rleft == 1):
                        m.next = "IDLE"
            if lite is not None:
                # The pipe is empty (so `advance` is high) from LITE_RD to LITE_CAP: the word is
                # read into the array register, then into the output register, then captured.
                with m.State("LITE_RD"):
                    m.next = "LITE_OUT"
                with m.State("LITE_OUT"):
                    m.next = "LITE_CAP"
                with m.State("LITE_CAP"):
                    m.d.sync += lite_rdata.eq(rd_data.word_select(lite_lane, 32) if lanes > 1 else rd_data)
                    m.next = "LITE_R"
                with m.State("LITE_R"):
                    m.d.comb += lite.rvalid.eq(1)
                    with m.If(lite.rready):
                        m.next = "IDLE"
        return m
