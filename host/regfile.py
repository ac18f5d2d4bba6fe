"""Behavioural model of the MMIO manager's register file (the golden model of hw/device/mmio.py).

Same decode, access kinds, byte strobes and responses as the gateware, in plain Python; the
functional device model builds on it and the MMIO unit test compares the RTL against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from evssd.hw import regmap
from evssd.hw.regmap import Access, Params

__all__ = ["RegisterFile", "BusResponse", "MMIOError"]


class BusResponse:
    OKAY = 0
    SLVERR = 2
    DECERR = 3


class MMIOError(IOError):
    """An MMIO access answered with SLVERR or DECERR."""

    def __init__(self, op: str, addr: int, resp: int):
        kind = {BusResponse.SLVERR: "SLVERR (register not writable)",
                BusResponse.DECERR: "DECERR (no register at this address)"}.get(resp, f"resp={resp}")
        super().__init__(f"MMIO {op} at 0x{addr:03x}: {kind}")
        self.addr, self.resp = addr, resp


@dataclass
class _Slot:
    reg: regmap.Register
    channel: int | None


class RegisterFile:
    """Register values plus the hooks a device model needs.

    ``fields[name]`` holds RW/WO field values and RO inputs (per-channel RO fields are lists),
    keyed by the same port names the gateware uses (:func:`evssd.hw.device.mmio.port_name` rule).
    ``on_write(name, value)`` is called for W1T bits written as 1 and for WO doorbells;
    ``before_read()``, if given, before every read (a model can bring its RO inputs up to date
    only when someone looks).
    """

    def __init__(self, params: Params, on_write=None, before_read=None):
        self.params = params
        self.on_write = on_write or (lambda name, value: None)
        self.before_read = before_read
        self._decode = {addr: _Slot(reg, ch) for addr, reg, ch in regmap.all_addresses(params.n_channels)}
        self.fields: dict[str, object] = {}
        # per register address: its writable fields as (port name, lsb, all-ones, access)
        self._writes = {reg.addr: [(self.port_name(reg, f), f.lsb, (1 << f.width) - 1, f.access)
                                   for f in reg.fields if f.access is not Access.RO]
                        for reg in regmap.REGISTERS}
        for reg in regmap.REGISTERS:
            if reg.addr < 0x040:
                continue
            for fld in reg.fields:
                name = self.port_name(reg, fld)
                if reg.per_channel:
                    self.fields[name] = [0] * params.n_channels
                elif fld.access is not Access.W1T:
                    self.fields[name] = fld.reset

    port_name = staticmethod(regmap.port_name)

    def read(self, addr: int) -> tuple[int, int]:
        """(data, response) of a 32-bit read."""
        if self.before_read is not None:
            self.before_read()
        slot = self._decode.get(addr & ~3 & 0xFFF) if addr < 0x1000 else None
        if slot is None:
            return 0, BusResponse.DECERR
        reg = slot.reg
        if reg.addr < 0x040:
            return self.params.id_value(reg), BusResponse.OKAY
        word = 0
        for fld in reg.fields:
            if fld.access is Access.W1T:
                continue
            value = self.fields[self.port_name(reg, fld)]
            if reg.per_channel:
                value = value[slot.channel]
            word |= (value & ((1 << fld.width) - 1)) << fld.lsb
        return word & 0xFFFF_FFFF, BusResponse.OKAY

    def write(self, addr: int, data: int, strb: int = 0xF) -> int:
        """Response of a 32-bit write with byte strobes."""
        slot = self._decode.get(addr & ~3 & 0xFFF) if addr < 0x1000 else None
        if slot is None:
            return BusResponse.DECERR
        plan = self._writes[slot.reg.addr]
        if not plan:
            return BusResponse.SLVERR
        byte_mask = _BYTE_MASKS[strb & 0xF]
        fields = self.fields
        events = []
        for name, lsb, ones, access in plan:
            keep = (byte_mask >> lsb) & ones
            new = (data >> lsb) & ones
            if access is Access.W1T:
                if new & keep:
                    events.append((name, 1))
                continue
            fields[name] = (new & keep) | (fields[name] & ~keep & ones)
            if access is Access.WO and keep:
                events.append((name, fields[name]))
        for name, value in events:
            self.on_write(name, value)
        return BusResponse.OKAY


#: the bits each of the 16 byte-strobe patterns lets through
_BYTE_MASKS = tuple(sum(0xFF << (8 * lane) for lane in range(4) if strb >> lane & 1) for strb in range(16))
