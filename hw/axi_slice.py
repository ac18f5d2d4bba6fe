"""AXIRegisterSlice: a register slice on every channel of an AXI4 or AXI4-Lite link.

``AXIRegisterSlice(signature)`` has a slave port ``s`` (``In(signature)``) and a master port
``m`` (``Out(signature)``). Each of the five channels (AW, W, B, AR, R) passes through a
two-entry skid buffer (:class:`_EagerSkid`, a :class:`~evssd.hw.skid_buffer.SkidBuffer` whose
``ready``/``valid`` are flip-flops and whose entry enables do not depend on ``valid``), so no
valid, ready or payload path crosses it in the same cycle: a master's handshake logic and a
slave's (e.g. a block RAM's read enable) are timed separately. Payloads are meaningful only
while their ``valid`` is high. Every channel keeps full rate (one beat per cycle) and gains one cycle of latency;
the order of beats on each channel is kept, so the link behaves as the same AXI link with a
longer wire.
"""
from __future__ import annotations

from amaranth import Module, Cat, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, AXI4Signature
__all__ = ["AXIRegisterSlice", "CHANNELS"]

# channel prefix -> does the master drive its payload (forward) or the slave (backward)?
CHANNELS = {"aw": True, "w": True, "b": False, "ar": True, "r": False}


class _EagerSkid(wiring.Component):
    """A :class:`~evssd.hw.skid_buffer.SkidBuffer` (two entries, one cycle of latency, full rate,
    no combinational path) built for the board's long wires:

    - ``i.ready`` and ``o.valid`` are registers of their own (each next value one LUT of the
      other side's handshake), so the device's handshake logic on either side sees a flip-flop,
      not a gate shared with the payload enables;
    - an entry loads ``i.payload`` whenever it is the free entry the write pointer names, valid
      or not: its enable does not wait for the source's (deep) ``valid``. ``o.payload`` is
      meaningful only while ``o.valid`` is high.
    """

    def __init__(self, payload_shape):
        super().__init__({
            "i": In(stream.Signature(payload_shape)),
            "o": Out(stream.Signature(payload_shape)),
        })

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        ent = [Signal.like(i.payload, name=f"ent{k}") for k in range(2)]
        wp = Signal()
        rp = Signal()
        # The state is the write and read pointers and the fill level, kept as two flags:
        # ready = fewer than 2 beats held (the entry `wp` names is free), valid = at least one.
        # Each next value is one LUT of the late `i.valid` / `o.ready` and these registers.
        ready = Signal(init=1)
        valid = Signal()
        m.d.comb += [i.ready.eq(ready), o.valid.eq(valid)]
        with m.If(rp):
            m.d.comb += o.payload.eq(ent[1])
        with m.Else():
            m.d.comb += o.payload.eq(ent[0])
        for k in range(2):
            # a gate of two registers (not the `i.ready` net the device's logic loads)
            with m.If(ready & (wp == k)):
                m.d.sync += ent[k].eq(i.payload)

        push = i.valid & ready
        pop = valid & o.ready
        one = ready & valid      # exactly one beat held
        m.d.sync += [
            # full next cycle: full and nothing popped, or one held, one pushed, nothing popped
            ready.eq(~((~ready & ~o.ready) | (one & i.valid & ~o.ready))),
            # empty next cycle: empty and nothing pushed, or one held, popped, nothing pushed
            valid.eq(~((~valid & ~i.valid) | (one & o.ready & ~i.valid))),
            wp.eq(wp ^ push),
            rp.eq(rp ^ pop),
        ]
        return m


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
            reg = m.submodules[f"{prefix}_reg"] = _EagerSkid(width)
            m.d.comb += [
                reg.i.valid.eq(getattr(src, f"{prefix}valid")),
                getattr(src, f"{prefix}ready").eq(reg.i.ready),
                reg.i.payload.eq(Cat(*[getattr(src, n) for n in names])),
                getattr(dst, f"{prefix}valid").eq(reg.o.valid),
                reg.o.ready.eq(getattr(dst, f"{prefix}ready")),
                Cat(*[getattr(dst, n) for n in names]).eq(reg.o.payload),
            ]
        return m
