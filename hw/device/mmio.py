"""MMIO manager: the AXI4-Lite slave that owns every register of :mod:`evssd.hw.regmap`.

The decoder is generated from the register map, so adding a register there adds it here, in the
driver and in the docs at once. The rest of the device sees registers as plain signals on the
``regs`` port (see :class:`RegisterSignature` for the naming rule), never as addresses.

Bus behaviour:
- AW and W are accepted independently; a write happens when both have arrived, then B is held
  until the master takes it. AR is accepted when no read is in flight; R follows three cycles
  later (the address register, then two register stages of read mux) and is held until taken. Reads and writes proceed in
  parallel.
- Byte strobes apply per byte lane: a RW field keeps the bytes whose strobe is low; a W1T bit
  fires only if its byte was strobed; a WO doorbell pulses ``<name>_written`` when any of its
  bytes was strobed.
- Unmapped address (including per-channel registers of channels the build lacks): DECERR, write
  ignored, read data 0. A write to a register with no writable field (ID block, counters):
  SLVERR, nothing changes.
"""
from __future__ import annotations

import functools
import operator

from amaranth import Module, Signal, Cat, Const, Mux
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .. import regmap
from ..lib.axi import AXI4LiteSignature, Resp
from ..regmap import Access, Params, port_name

__all__ = ["MMIOManager", "RegisterSignature", "port_name", "ADDR_WIDTH"]

ADDR_WIDTH = 12  # 4 KiB register window


def _device_registers():
    """Registers that reach the rest of the device (the ID block is constant inside the manager)."""
    return [r for r in regmap.REGISTERS if r.addr >= 0x040]


class RegisterSignature(wiring.Signature):
    """The register port, from the MMIO manager's point of view (Out = driven by the manager).

    - RW field: ``Out(width)``, holds the value (reset from the map).
    - W1T field: ``Out(1)``, a one-cycle pulse per written 1.
    - WO field: ``Out(width)`` (last written value) and ``Out(1)`` ``<name>_written`` pulse.
    - RO field: ``In(width)``; per-channel RO registers are ``In(width).array(n_channels)``.
    """

    def __init__(self, params: Params):
        self.params = params
        members = {}
        for reg in _device_registers():
            for fld in reg.fields:
                name = port_name(reg, fld)
                if fld.access is Access.RO:
                    if reg.per_channel:
                        members[name] = In(fld.width).array(params.n_channels)
                    else:
                        members[name] = In(fld.width)
                elif fld.access is Access.RW:
                    members[name] = Out(fld.width, init=fld.reset)
                elif fld.access is Access.W1T:
                    members[name] = Out(1)
                elif fld.access is Access.WO:
                    members[name] = Out(fld.width, init=fld.reset)
                    members[name + "_written"] = Out(1)
        super().__init__(members)

    def __eq__(self, other):
        return type(other) is type(self) and other.params == self.params

    def __repr__(self):
        return f"RegisterSignature({self.params!r})"


class MMIOManager(wiring.Component):
    """AXI4-Lite register file generated from :mod:`evssd.hw.regmap`."""

    def __init__(self, params: Params):
        Params.require(params)
        self.params = params
        super().__init__({
            "s_axil": In(AXI4LiteSignature(addr_width=ADDR_WIDTH, data_width=32)),
            "regs": Out(RegisterSignature(params)),
        })

    def elaborate(self, platform):
        m = Module()
        bus, regs, p = self.s_axil, self.regs, self.params

        # ---------------- write channel ----------------
        aw_full = Signal()
        aw_addr = Signal(ADDR_WIDTH)
        w_full = Signal()
        w_data = Signal(32)
        w_strb = Signal(4)
        b_valid = Signal()
        b_resp = Signal(2)

        m.d.comb += [
            bus.awready.eq(~aw_full & ~b_valid),
            bus.wready.eq(~w_full & ~b_valid),
            bus.bvalid.eq(b_valid),
            bus.bresp.eq(b_resp),
        ]
        with m.If(bus.awvalid & bus.awready):
            m.d.sync += [aw_full.eq(1), aw_addr.eq(bus.awaddr)]
        with m.If(bus.wvalid & bus.wready):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        with m.If(b_valid & bus.bready):
            m.d.sync += b_valid.eq(0)

        # The address decode is a register loaded every cycle from aw_addr (one bit per register
        # address and the response), valid the cycle after the address arrived: the write and
        # its response then wait on no compare (the decode behind do_write was a long path).
        addresses = list(regmap.all_addresses(p.n_channels))
        aw_hit = Signal(len(addresses))
        aw_resp = Signal(2)
        dec_valid = Signal()
        m.d.sync += [dec_valid.eq(aw_full), aw_resp.eq(Resp.DECERR)]
        for i, (addr, reg, ch) in enumerate(addresses):
            writable = any(f.access is not Access.RO for f in reg.fields)
            with m.If(aw_addr[2:] == addr >> 2):
                m.d.sync += aw_resp.eq(Resp.OKAY if writable else Resp.SLVERR)
            m.d.sync += aw_hit[i].eq(aw_addr[2:] == addr >> 2)
        do_write = Signal()
        m.d.comb += do_write.eq(aw_full & dec_valid & w_full & ~b_valid)

        # Pulses default low every cycle.
        for reg in _device_registers():
            for fld in reg.fields:
                if fld.access is Access.W1T:
                    m.d.sync += getattr(regs, port_name(reg, fld)).eq(0)
                elif fld.access is Access.WO:
                    m.d.sync += getattr(regs, port_name(reg, fld) + "_written").eq(0)

        with m.If(do_write):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), b_valid.eq(1), b_resp.eq(aw_resp)]
            for i, (addr, reg, ch) in enumerate(addresses):
                with m.If(aw_hit[i]):
                    for fld in reg.fields:
                        if fld.access is not Access.RO:
                            self._write_field(m, reg, fld, w_data, w_strb)

        # ---------------- read channel ----------------
        # Three register stages (the one-stage read mux over every register was the board's
        # critical path): the AR cycle registers the address; the next cycle picks each group
        # of eight registers' addressed word; the next one picks the group. R follows three
        # cycles after AR.
        groups = {}
        for addr, reg, ch in regmap.all_addresses(p.n_channels):
            groups.setdefault(addr >> 5, []).append((addr >> 2 & 7, reg, ch))
        group_word = {g: Signal(32, name=f"rd_group{g:02x}") for g in groups}
        rd_addr = Signal(ADDR_WIDTH)     # the address offered, registered every cycle
        rd_taken = Signal()              # stage 0: rd_addr holds the read's address
        rd_pending = Signal()            # stage 1: the group words hold its words
        rd_mapped = Signal()
        r_valid = Signal()
        r_data = Signal(32)
        r_resp = Signal(2)
        m.d.comb += [
            bus.arready.eq(~r_valid & ~rd_taken & ~rd_pending),
            bus.rvalid.eq(r_valid),
            bus.rdata.eq(r_data),
            bus.rresp.eq(r_resp),
        ]
        with m.If(r_valid & bus.rready):
            m.d.sync += r_valid.eq(0)
        m.d.sync += [rd_addr.eq(bus.araddr), rd_taken.eq(bus.arvalid & bus.arready),
                     rd_pending.eq(rd_taken)]
        # The address decode and the group words load every cycle from rd_addr (no clock
        # enable: the AR handshake drove ~270 of them, and the address comes from a register of
        # its own rather than the bus slice's mux); stage 1 uses those loaded in stage 0.
        # stage 1 picks the group by a one-hot of registers (an AND-OR over the group words,
        # no decode of the group number in front of the 32-bit select)
        rd_pick = {g: Signal(name=f"rd_pick{g:02x}") for g in groups}
        m.d.sync += rd_mapped.eq(0)
        for g in groups:
            m.d.sync += rd_pick[g].eq(rd_addr[5:ADDR_WIDTH] == g)
        with m.Switch(rd_addr[2:ADDR_WIDTH]):
            for addr, reg, ch in regmap.all_addresses(p.n_channels):
                with m.Case(addr >> 2):
                    m.d.sync += rd_mapped.eq(1)
        # The word within a group is selected by copies of the address's low bits (one
        # register feeding every group's 32-bit select spread over the chip missed 10 ns).
        # Copy k holds the bits XOR k and group g reads copy g % 8, undoing the XOR in its
        # case labels. Synthesis merges flip-flops with equal inputs, and a bit and its
        # inverse are the only two functions of one bit, so what is built is two flip-flops
        # per bit (the plain one shared with rd_addr): each drives about half of the groups.
        rd_low = [Signal(3, name=f"rd_low{k}") for k in range(8)]
        m.d.sync += [rd_low[k].eq(bus.araddr[2:5] ^ k) for k in range(8)]
        for g, members in groups.items():
            k = g % 8
            m.d.sync += group_word[g].eq(0)
            with m.Switch(rd_low[k]):
                for low, reg, ch in members:
                    with m.Case(low ^ k):
                        m.d.sync += group_word[g].eq(self._read_value(reg, ch))
        with m.If(rd_pending):
            m.d.sync += [r_valid.eq(1),
                         r_resp.eq(Mux(rd_mapped, Resp.OKAY, Resp.DECERR))]
            # an unmapped address's group words are all 0 (no case of their switch matched)
            m.d.sync += r_data.eq(functools.reduce(
                operator.or_, [group_word[g] & rd_pick[g].replicate(32) for g in groups]))
        return m

    def _write_field(self, m, reg, fld, data, strb):
        target = getattr(self.regs, port_name(reg, fld))
        byte_mask = Cat(*(strb[lane].replicate(8) for lane in range(4)))
        new = data[fld.lsb:fld.lsb + fld.width]
        keep = byte_mask[fld.lsb:fld.lsb + fld.width]
        if fld.access is Access.W1T:
            m.d.sync += target.eq(new & keep)
        else:
            m.d.sync += target.eq((new & keep) | (target & ~keep))
        if fld.access is Access.WO:
            written = getattr(self.regs, port_name(reg, fld) + "_written")
            m.d.sync += written.eq(keep.any())

    def _read_value(self, reg, ch):
        regs, p = self.regs, self.params
        if reg.addr < 0x040:  # ID block: constants of this build
            return Const(p.id_value(reg), 32)
        word = Const(0, 32)
        for fld in reg.fields:
            if fld.access is Access.W1T:
                continue
            sig = getattr(regs, port_name(reg, fld))
            if reg.per_channel:
                sig = sig[ch]
            word = word | (sig.as_unsigned() << fld.lsb)
        return word[:32]
