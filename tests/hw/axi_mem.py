"""Behavioural AXI4 slave memory for amaranth.sim (bytearray-backed).

Attach it to the master-side port of a design (``dut.m_axi_host``) and it answers with random
ready/valid stalls on all five channels, INCR bursts, byte strobes, a configurable read latency
and optional error injection. It also checks the protocol rules a master must keep (no 4 KiB
crossing, len <= 255, full-width size, wlast exactly on a burst's last beat) and records every
burst, so tests can assert on them.

    mem = AXI4Memory(dut.m_axi_host, size=1 << 16, data_width=64, stall=0.3, seed=1)
    mem.add_to(sim)            # five background testbenches
    mem.mem[0:4] = b"abcd"     # backdoor access
"""
from __future__ import annotations

import random
from collections import deque

__all__ = ["AXI4Memory", "ProtocolError"]


class ProtocolError(AssertionError):
    pass


class AXI4Memory:
    def __init__(self, bus, *, size: int, data_width: int, base: int = 0, stall: float = 0.0,
                 latency: int = 0, seed: int = 0, err_ranges=(), max_outstanding: int = 8):
        if data_width % 8 or data_width < 8:
            raise ValueError(f"data_width {data_width} must be a multiple of 8")
        if not 0.0 <= stall < 1.0:
            raise ValueError(f"stall probability {stall} must be in [0, 1)")
        self.bus = bus
        self.size = size
        self.base = base
        self.bb = data_width // 8
        self.stall = stall
        self.latency = latency
        self.rng = random.Random(seed)
        self.err_ranges = list(err_ranges)   # [(lo, hi)) byte ranges answering SLVERR
        self.max_outstanding = max_outstanding
        self.mem = bytearray(size)
        self.ar_log: list[tuple[int, int]] = []   # (addr, beats) per read burst
        self.aw_log: list[tuple[int, int]] = []
        self.write_log: list[tuple[int, bytes, int]] = []  # (beat addr, data, strb) per W beat
        self._ar = deque()
        self._aw = deque()
        self._w = deque()
        self._b = deque()
        self._cycle = 0

    # ---------------------------------------------------------------- helpers
    def _go(self):
        return self.rng.random() >= self.stall

    def _is_err(self, addr):
        if not self.base <= addr < self.base + self.size:
            return True
        return any(lo <= addr < hi for lo, hi in self.err_ranges)

    def _check_burst(self, kind, addr, length, size):
        beats = length + 1
        if size != self.bb.bit_length() - 1:
            raise ProtocolError(f"{kind} size {size} is not the full bus width ({self.bb} B)")
        if addr % self.bb:
            raise ProtocolError(f"{kind} address {addr:#x} not aligned to {self.bb} B")
        if (addr % 4096) + beats * self.bb > 4096:
            raise ProtocolError(f"{kind} burst {addr:#x}+{beats} beats crosses 4 KiB")

    def read_bytes(self, addr, n):
        return bytes(self.mem[addr - self.base:addr - self.base + n])

    def write_bytes(self, addr, data):
        self.mem[addr - self.base:addr - self.base + len(data)] = data

    def add_to(self, sim):
        for proc in (self._clock, self._ar_proc, self._r_proc, self._aw_proc, self._w_proc,
                     self._b_proc):
            sim.add_testbench(proc, background=True)

    # ---------------------------------------------------------------- processes
    async def _clock(self, ctx):
        async for _ in ctx.tick():
            self._cycle += 1

    async def _ar_proc(self, ctx):
        bus = self.bus
        while True:
            ready = self._go() and len(self._ar) < self.max_outstanding
            ctx.set(bus.arready, ready)
            _, _, valid, addr, length, size, rid = await ctx.tick().sample(
                bus.arvalid, bus.araddr, bus.arlen, bus.arsize, bus.arid)
            if ready and valid:
                self._check_burst("AR", addr, length, size)
                self.ar_log.append((addr, length + 1))
                self._ar.append([addr, length + 1, 0, self._cycle + self.latency, rid])

    async def _r_proc(self, ctx):
        bus = self.bus
        while True:
            burst = self._ar[0] if self._ar else None
            if burst is None or burst[3] > self._cycle or not self._go():
                ctx.set(bus.rvalid, 0)
                await ctx.tick()
                continue
            addr, beats, idx, _, rid = burst
            a = addr + idx * self.bb
            if self._is_err(a):
                data, resp = 0, 0b10
            else:
                data, resp = int.from_bytes(self.read_bytes(a, self.bb), "little"), 0
            ctx.set(bus.rvalid, 1)
            ctx.set(bus.rdata, data)
            ctx.set(bus.rresp, resp)
            ctx.set(bus.rlast, idx == beats - 1)
            ctx.set(bus.rid, rid)   # the burst's ID comes back (AXI4; an arbiter routes by it)
            _, _, ready = await ctx.tick().sample(bus.rready)
            if ready:
                burst[2] += 1
                if burst[2] == beats:
                    self._ar.popleft()

    async def _aw_proc(self, ctx):
        bus = self.bus
        while True:
            ready = self._go() and len(self._aw) < self.max_outstanding
            ctx.set(bus.awready, ready)
            _, _, valid, addr, length, size, wid = await ctx.tick().sample(
                bus.awvalid, bus.awaddr, bus.awlen, bus.awsize, bus.awid)
            if ready and valid:
                self._check_burst("AW", addr, length, size)
                self.aw_log.append((addr, length + 1))
                self._aw.append([addr, length + 1, 0, False, wid])

    async def _w_proc(self, ctx):
        bus = self.bus
        while True:
            # Take W only for a burst whose AW arrived (a legal slave behaviour that catches
            # masters that wait for WREADY before AW).
            burst = self._aw[0] if self._aw else None
            ready = burst is not None and self._go()
            ctx.set(bus.wready, ready)
            _, _, valid, wdata, strb, last = await ctx.tick().sample(
                bus.wvalid, bus.wdata, bus.wstrb, bus.wlast)
            if not (ready and valid):
                continue
            addr, beats, idx, err, wid = burst
            a = addr + idx * self.bb
            if (idx == beats - 1) != bool(last):
                raise ProtocolError(f"wlast={last} on beat {idx} of a {beats}-beat burst at {addr:#x}")
            self.write_log.append((a, wdata, strb))
            if self._is_err(a):
                err = True
            else:
                raw = wdata.to_bytes(self.bb, "little")
                for k in range(self.bb):
                    if strb >> k & 1:
                        self.mem[a - self.base + k] = raw[k]
            burst[2] = idx + 1
            burst[3] = err
            if burst[2] == beats:
                self._aw.popleft()
                self._b.append((0b10 if err else 0, wid))

    async def _b_proc(self, ctx):
        bus = self.bus
        while True:
            if not self._b or not self._go():
                ctx.set(bus.bvalid, 0)
                await ctx.tick()
                continue
            ctx.set(bus.bvalid, 1)
            ctx.set(bus.bresp, self._b[0][0])
            ctx.set(bus.bid, self._b[0][1])
            _, _, ready = await ctx.tick().sample(bus.bready)
            if ready:
                self._b.popleft()
