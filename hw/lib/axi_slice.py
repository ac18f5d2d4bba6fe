"""AXIRegisterSlice: a register slice on every channel of an AXI4 or AXI4-Lite link.

``AXIRegisterSlice(signature)`` has a slave port ``s`` (``In(signature)``) and a master port
``m`` (``Out(signature)``). Each of the five channels (AW, W, B, AR, R) passes through a
two-entry :class:`~evssd.hw.lib.skid_buffer.SkidBuffer` (``ready``/``valid`` are flip-flops and the
entry enables do not depend on ``valid``), so no valid, ready or payload path crosses it in the
same cycle: a master's handshake logic and a slave's (e.g. a block RAM's read enable) are timed
separately. Payloads are meaningful only while their ``valid`` is high. Every channel keeps full
rate (one beat per cycle) and gains one cycle of latency; the order of beats on each channel is
kept, so the link behaves as the same AXI link with a longer wire.
"""
from __future__ import annotations

from amaranth import Module, Cat
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, AXI4Signature
from .skid_buffer import SkidBuffer

__all__ = ["AXIRegisterSlice", "CHANNELS"]

# channel prefix -> does the master drive its payload (forward) or the slave (backward)?
CHANNELS = {"aw": True, "w": True, "b": False, "ar": True, "r": False}


class AXIRegisterSlice(wiring.Component):
    """``s`` -> ``m``: the same AXI link with one register stage on each channel."""

    def __init__(self, signature: AXI4Signature | AXI4LiteSignature):
        if not isinstance(signature, (AXI4Signature, AXI4LiteSignature)):
            raise TypeError(f"signature must be an AXI4Signature or AXI4LiteSignature, not "
                            f"{type(signature).__name__}")
        self.link = signature
        super().__init__({"s": In(signature), "m": Out(signature)})

    def _payload_names(self, prefix: str) -> list[str]:
        return [name for name in self.link.members
                if name.startswith(prefix) and name[len(prefix):] not in ("valid", "ready")]

    def elaborate(self, platform):
        m = Module()
        for prefix, forward in CHANNELS.items():
            names = self._payload_names(prefix)
            src, dst = (self.s, self.m) if forward else (self.m, self.s)
            width = sum(len(getattr(src, n)) for n in names)
            reg = m.submodules[f"{prefix}_reg"] = SkidBuffer(width)
            m.d.comb += [
                reg.i.valid.eq(getattr(src, f"{prefix}valid")),
                getattr(src, f"{prefix}ready").eq(reg.i.ready),
                reg.i.payload.eq(Cat(*[getattr(src, n) for n in names])),
                getattr(dst, f"{prefix}valid").eq(reg.o.valid),
                reg.o.ready.eq(getattr(dst, f"{prefix}ready")),
                Cat(*[getattr(dst, n) for n in names]).eq(reg.o.payload),
            ]
        return m
