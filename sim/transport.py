"""The cocotb transport: the real driver talks to the RTL through cocotbext-axi bus models.

MMIO goes through an ``AxiLiteMaster`` on ``s_axil``; host memory is an ``AxiRam`` on
``m_axi_host`` (the device's DMA master); :meth:`wait` returns on the ``irq`` line or after a
poll interval. Only importable inside a cocotb test (it imports cocotb).
"""
from __future__ import annotations

import logging
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, First, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam
from cocotbext.axi.constants import AxiResp

from evssd.host.regfile import BusResponse, MMIOError
from evssd.host.transport import HostMemory, Transport

__all__ = ["CocotbTransport", "random_pause", "quiet_cocotbext_axi", "start_clock_and_reset"]

HOST_BASE = 0x1_0000_0000


def quiet_cocotbext_axi():
    """cocotbext-axi logs every transaction at INFO."""
    for name in ("cocotb.evssd", "cocotbext.axi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for logger in list(logging.Logger.manager.loggerDict):
        if "axi" in logger.lower():
            logging.getLogger(logger).setLevel(logging.WARNING)


def random_pause(rng: random.Random, probability: float):
    """Pause generator for ``set_pause_generator``: True = stall this cycle."""
    while True:
        yield rng.random() < probability


async def start_clock_and_reset(dut, period_ns: int = 10, cycles: int = 5):
    cocotb.start_soon(Clock(dut.clk, period_ns, unit="ns").start())
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)


class CocotbTransport(Transport):
    """Driver transport over cocotbext-axi models of the design's buses.

    ``host_memory_bytes``: size of the AxiRam behind ``m_axi_host`` (placed at ``HOST_BASE`` so
    64-bit addresses are exercised); ``host_ram=False`` for tops without a DMA master.
    """

    name = "cocotb"

    def __init__(self, dut, *, host_memory_bytes: int = 1 << 20, host_ram: bool = True,
                 poll_cycles: int = 64, params=None):
        self.dut = dut
        self.clk, self.rst = dut.clk, dut.rst
        self.poll_cycles = poll_cycles
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil", bus_separator="__"),
                                  dut.clk, dut.rst)
        self.host_ram = None
        self._plain = None
        if not host_ram:
            # No DMA master on this top: host memory is only the driver's scratch space.
            self._plain = bytearray(host_memory_bytes)
        else:
            self.host_ram = AxiRam(AxiBus.from_prefix(dut, "m_axi_host", bus_separator="__"),
                                   dut.clk, dut.rst, size=host_memory_bytes)
            # AxiRam decodes addresses modulo its size: the window [HOST_BASE, +size) maps to it.
        self.memory = HostMemory(HOST_BASE, host_memory_bytes)
        # One AxiRam per flash channel (the DDR bank that emulates its NAND) when params are given.
        self.channel_rams = []
        if params is not None:
            self.channel_rams = [
                AxiRam(AxiBus.from_prefix(dut, f"m_axi_ch{c}", bus_separator="__"), dut.clk, dut.rst,
                       size=params.channel_bytes)
                for c in range(params.n_channels)]
        quiet_cocotbext_axi()

    def set_backpressure(self, rng: random.Random, probability: float):
        """Random stalls on every AXI channel of the host RAM and of every flash-channel RAM."""
        rams = ([self.host_ram] if self.host_ram is not None else []) + self.channel_rams
        if probability > 0:
            for ram in rams:
                for ch in (ram.read_if.ar_channel, ram.read_if.r_channel, ram.write_if.aw_channel,
                           ram.write_if.w_channel, ram.write_if.b_channel):
                    ch.set_pause_generator(random_pause(rng, probability))

    async def read32(self, addr: int) -> int:
        resp = await self.axil.read(addr, 4)
        if resp.resp != AxiResp.OKAY:
            raise MMIOError("read", addr, int(resp.resp))
        return int.from_bytes(resp.data, "little")

    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        data = (value & 0xFFFF_FFFF).to_bytes(4, "little")
        if strb == 0xF:
            resp = await self.axil.write(addr, data)
        else:
            # Byte-wise write: only strobed lanes.
            lanes = [i for i in range(4) if strb >> i & 1]
            resp = None
            for lane in lanes:
                resp = await self.axil.write(addr + lane, data[lane:lane + 1])
                if resp.resp != AxiResp.OKAY:
                    break
            if resp is None:
                return
        if resp.resp != AxiResp.OKAY:
            raise MMIOError("write", addr, int(resp.resp))

    def _offset(self, addr: int, n: int) -> int:
        off = addr - self.memory.base
        if off < 0 or off + n > self.memory.size:
            raise ValueError(f"host access 0x{addr:x}+{n} outside the window")
        return off

    async def mem_write(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data))
        if self._plain is not None:
            self._plain[off:off + len(data)] = data
        else:
            self.host_ram.write(off, bytes(data))

    async def mem_read(self, addr: int, nbytes: int) -> bytes:
        off = self._offset(addr, nbytes)
        if self._plain is not None:
            return bytes(self._plain[off:off + nbytes])
        return bytes(self.host_ram.read(off, nbytes))

    async def wait(self) -> None:
        irq = getattr(self.dut, "irq", None)
        if irq is not None:
            if int(irq.value):
                await RisingEdge(self.clk)
            else:
                await First(RisingEdge(irq), ClockCycles(self.clk, self.poll_cycles))
        else:
            await ClockCycles(self.clk, self.poll_cycles)
