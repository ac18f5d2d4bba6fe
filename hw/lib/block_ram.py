"""Block RAM with a registered read: one byte-writable write port, one read port of latency 2.

:class:`BlockRAM` is a simple dual-port memory whose read runs through two registers, the way
block RAMs with an output register work::

    r_addr --[array register, enable r_en]--> [output register, enable r_oe] --> r_data

A read issued with ``r_en`` in cycle *t* reaches the output register when ``r_oe`` is high in a
later cycle; each register holds while its enable is low, so a consumer stalls the pipe by
dropping both enables. A read of the word written in the same cycle returns the old or the new
value (either).

Why: on the ECP5 a block RAM's data leaves the array 5.6 ns after the clock edge when its output
register is off (REGMODE NOREG) and 1.0 ns after it when it is on (nextpnr-ecp5's timing model,
measured on a one-RAM design; docs/synthesis.md). Yosys never turns the output register on, so
on an ECP5 platform this module instantiates the ``DP16KD`` primitives itself with
``REGMODE_A="OUTREG"``; everywhere else (simulation, Verilator, other families) it is an
``amaranth.lib.memory.Memory`` followed by a register, with the same cycle behaviour.

``primitive``: ``None`` chooses from the platform (``"dp16kd"`` on ECP5, else ``"generic"``);
``"dp16kd-model"`` builds the DP16KD wiring around :class:`DP16KDModel`, a pin-level Amaranth
model of the primitive, so the wiring is simulated (tests/hw/test_block_ram.py). A memory with
initial contents is always ``"generic"`` (the DP16KD INITVAL layout is not generated here).

DP16KD layout: port A reads, port B writes, both in one data width chosen from the depth (x9 for
up to 2048 words, x4 up to 4096, x2 up to 8192, x1 up to 16384, more words in banks of 16384),
so no tile holds bits of two bytes and each tile's write enable is one byte strobe (no byte-enable
pins are needed). A word of ``width`` bits is ``width/8`` bytes of ``ceil(8/w)`` tiles each.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, C, ClockSignal, Instance
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

__all__ = ["BlockRAM", "DP16KDModel", "dp16kd_layout"]

# Words per DP16KD at each port width that holds at most one byte.
_DP16KD_DEPTH = {9: 2048, 4: 4096, 2: 8192, 1: 16384}
PRIMITIVES = ("generic", "dp16kd", "dp16kd-model")


def dp16kd_layout(width: int, depth: int) -> dict:
    """Tile port width, tiles per byte, banks and tile count of a ``width`` x ``depth`` memory."""
    for w in (9, 4, 2, 1):
        if _DP16KD_DEPTH[w] >= depth:
            break
    per_byte = 1 if w == 9 else 8 // w
    banks = -(-depth // _DP16KD_DEPTH[w])
    return {"port_width": w, "tiles_per_byte": per_byte, "banks": banks,
            "tiles": banks * (width // 8) * per_byte, "tile_depth": _DP16KD_DEPTH[w]}


class DP16KDModel(wiring.Component):
    """Pin-level model of the ECP5 DP16KD as :class:`BlockRAM` uses it: port A reads (address
    register enabled by ``CEA``, output register enabled by ``OCEA`` when ``regmode`` is
    ``"OUTREG"``), port B writes (``WEB``), both at ``width`` bits (1, 2, 4 or 9), the word
    address in the upper address pins ``AD[13:14-abits]`` and the data in the low data pins, as
    in yosys' ``brams_map_16kd.v``. Chip selects, resets and port A writes are not modelled
    (BlockRAM ties them off)."""

    def __init__(self, width: int, regmode: str = "OUTREG"):
        if width not in _DP16KD_DEPTH:
            raise ValueError(f"DP16KDModel width {width} must be 1, 2, 4 or 9")
        if regmode not in ("NOREG", "OUTREG"):
            raise ValueError(f"DP16KDModel regmode {regmode!r} must be NOREG or OUTREG")
        self.width, self.regmode = width, regmode
        super().__init__({"ADA": In(14), "CEA": In(1), "OCEA": In(1), "DOA": Out(18),
                          "ADB": In(14), "DIB": In(18), "WEB": In(1)})

    def elaborate(self, platform):
        m = Module()
        depth = _DP16KD_DEPTH[self.width]
        abits = ceil_log2(depth)
        m.submodules.array = array = Memory(shape=self.width, depth=depth, init=[])
        wp = array.write_port()
        rp = array.read_port(domain="comb")
        m.d.comb += [wp.addr.eq(self.ADB[14 - abits:]), wp.data.eq(self.DIB[:self.width]),
                     wp.en.eq(self.WEB), rp.addr.eq(self.ADA[14 - abits:])]
        q = Signal(self.width, reset_less=True)
        with m.If(self.CEA):
            m.d.sync += q.eq(rp.data)
        if self.regmode == "OUTREG":
            out = Signal(self.width, reset_less=True)
            with m.If(self.OCEA):
                m.d.sync += out.eq(q)
            q = out
        m.d.comb += self.DOA.eq(q)
        return m


class BlockRAM(wiring.Component):
    """``width`` x ``depth`` simple dual-port RAM, byte write enables, read latency 2.

    Ports: ``w_addr``, ``w_data``, ``w_en`` (one bit per byte); ``r_addr``, ``r_en`` (load the
    array register), ``r_oe`` (load the output register), ``r_data``. ``init``: list of words.
    """

    def __init__(self, *, width: int, depth: int, init=None, primitive: str | None = None):
        if width <= 0 or width % 8:
            raise ValueError(f"BlockRAM width {width} must be a positive multiple of 8")
        if depth < 1:
            raise ValueError(f"BlockRAM depth {depth} must be at least 1")
        if primitive is not None and primitive not in PRIMITIVES:
            raise ValueError(f"BlockRAM primitive {primitive!r} must be one of {PRIMITIVES}")
        self.width, self.depth = width, depth
        self.init = list(init or [])
        self.primitive = primitive
        abits = max(ceil_log2(depth), 1)
        super().__init__({"w_addr": In(abits), "w_data": In(width), "w_en": In(width // 8),
                          "r_addr": In(abits), "r_en": In(1), "r_oe": In(1), "r_data": Out(width)})

    def resolved_primitive(self, platform) -> str:
        if any(self.init):
            return "generic"
        if self.primitive is not None:
            return self.primitive
        return "dp16kd" if getattr(platform, "family", None) == "ecp5" else "generic"

    def elaborate(self, platform):
        m = Module()
        if self.resolved_primitive(platform) == "generic":
            self._generic(m)
        else:
            self._dp16kd(m, model=self.resolved_primitive(platform) == "dp16kd-model")
        return m

    def _generic(self, m):
        # An asynchronous read port and the array register with its enable: yosys merges the
        # register into the block RAM's read port and honours `no_rw_check` (no collision-bypass
        # logic around the RAM); the output register follows in fabric.
        m.submodules.mem = mem = Memory(shape=self.width, depth=self.depth, init=self.init,
                                        attrs={"no_rw_check": 1})
        wp = mem.write_port(granularity=8)
        rp = mem.read_port(domain="comb")
        m.d.comb += [wp.addr.eq(self.w_addr), wp.data.eq(self.w_data), wp.en.eq(self.w_en),
                     rp.addr.eq(self.r_addr)]
        q = Signal(self.width, reset_less=True)
        out = Signal(self.width, reset_less=True)
        with m.If(self.r_en):
            m.d.sync += q.eq(rp.data)
        with m.If(self.r_oe):
            m.d.sync += out.eq(q)
        m.d.comb += self.r_data.eq(out)

    def _dp16kd(self, m, *, model: bool):
        lay = dp16kd_layout(self.width, self.depth)
        w, per_byte, banks = lay["port_width"], lay["tiles_per_byte"], lay["banks"]
        tile_abits = ceil_log2(lay["tile_depth"])
        lo = 14 - tile_abits
        bits_per_tile = 8 if w == 9 else w

        def pins(addr):
            # The word address in AD[13:lo], the low pins zero (and the pins above a memory
            # shallower than the tile).
            word = addr[:tile_abits]
            if len(word) < tile_abits:
                word = Cat(word, C(0, tile_abits - len(word)))
            return Cat(C(0, lo), word) if lo else word

        bank_bits = max(ceil_log2(banks), 1)
        wbank = self.w_addr[tile_abits:] if banks > 1 else C(0, 1)
        sel_q = Signal(bank_bits, reset_less=True)     # bank of the read in the array register
        sel_out = Signal(bank_bits, reset_less=True)   # bank of the read in the output register
        if banks > 1:
            with m.If(self.r_en):
                m.d.sync += sel_q.eq(self.r_addr[tile_abits:])
            with m.If(self.r_oe):
                m.d.sync += sel_out.eq(sel_q)

        bank_data = []
        for b in range(banks):
            data = []
            for byte in range(self.width // 8):
                for t in range(per_byte):
                    lsb = byte * 8 + t * bits_per_tile
                    din = self.w_data[lsb:lsb + bits_per_tile]
                    web = self.w_en[byte] & (wbank == b)
                    dout = Signal(18, name=f"b{b}_byte{byte}_t{t}_do")
                    name = f"ram_b{b}_byte{byte}_t{t}"
                    if model:
                        tile = m.submodules[name] = DP16KDModel(w, "OUTREG")
                        m.d.comb += [tile.ADA.eq(pins(self.r_addr)), tile.CEA.eq(self.r_en),
                                     tile.OCEA.eq(self.r_oe), tile.ADB.eq(pins(self.w_addr)),
                                     tile.DIB.eq(din), tile.WEB.eq(web), dout.eq(tile.DOA)]
                    else:
                        m.submodules[name] = self._instance(w, pins(self.r_addr), pins(self.w_addr),
                                                            din, web, dout)
                    data.append(dout[:bits_per_tile])
            bank_data.append(Cat(*data))
        if banks == 1:
            m.d.comb += self.r_data.eq(bank_data[0])
        else:
            with m.Switch(sel_out):
                for b in range(banks):
                    with m.Case(b):
                        m.d.comb += self.r_data.eq(bank_data[b])

    def _instance(self, w, ada, adb, din, web, dout):
        ports = {
            "p_DATA_WIDTH_A": w, "p_DATA_WIDTH_B": w,
            "p_REGMODE_A": "OUTREG", "p_REGMODE_B": "NOREG",
            "p_RESETMODE": "SYNC", "p_ASYNC_RESET_RELEASE": "SYNC",
            "p_CSDECODE_A": "0b000", "p_CSDECODE_B": "0b000",
            "p_WRITEMODE_A": "NORMAL", "p_WRITEMODE_B": "NORMAL", "p_GSR": "DISABLED",
            "i_CLKA": ClockSignal("sync"), "i_CEA": self.r_en, "i_OCEA": self.r_oe,
            "i_WEA": C(0, 1), "i_RSTA": C(0, 1),
            "i_CLKB": ClockSignal("sync"), "i_CEB": C(1, 1), "i_OCEB": C(1, 1),
            "i_WEB": web, "i_RSTB": C(0, 1),
        }
        for i in range(3):
            ports[f"i_CSA{i}"] = C(0, 1)
            ports[f"i_CSB{i}"] = C(0, 1)
        for i in range(14):
            ports[f"i_ADA{i}"] = ada[i]
            ports[f"i_ADB{i}"] = adb[i]
        for i in range(18):
            ports[f"i_DIA{i}"] = C(0, 1)
            ports[f"i_DIB{i}"] = din[i] if i < len(din) else C(0, 1)
            ports[f"o_DOA{i}"] = dout[i]
        return Instance("DP16KD", **ports)
