"""L1: AxiBram against a bytearray golden model.

Random INCR/FIXED bursts, narrow sizes and random strobes on writes, random bursts on reads, with
random valid gaps and ready stalls on all five channels; reads and writes run at the same time
on disjoint halves (the read half starts from ``init``), the AXI4-Lite port (when present) works
a third region at the same time; at the end every byte is read back and compared.
"""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.boards.bram import AxiBram


async def _handshake(ctx, cond, *samples):
    while True:
        _, _, c, *vals = await ctx.tick().sample(cond, *samples)
        if c:
            return vals


async def _gap(ctx, rng, p):
    while rng.random() < p:
        await ctx.tick()


def _beat_addrs(addr, length, size, burst):
    step = 0 if burst == 0 else 1 << size
    return [addr + k * step for k in range(length)]


class Master:
    """Python AXI4 master (one burst at a time per direction) with random stalls."""

    def __init__(self, bus, rng, stall, bpw, size):
        self.bus, self.rng, self.stall, self.bpw, self.size = bus, rng, stall, bpw, size

    async def write(self, ctx, addr, length, size, burst, beats):
        """beats: [(data_int, strb)]"""
        bus, rng = self.bus, self.rng
        await _gap(ctx, rng, self.stall)
        wid = rng.randrange(16)
        ctx.set(bus.awaddr, addr); ctx.set(bus.awlen, length - 1); ctx.set(bus.awsize, size)
        ctx.set(bus.awburst, burst); ctx.set(bus.awid, wid); ctx.set(bus.awvalid, 1)
        await _handshake(ctx, bus.awready)
        ctx.set(bus.awvalid, 0)
        for k, (data, strb) in enumerate(beats):
            await _gap(ctx, rng, self.stall)
            ctx.set(bus.wdata, data); ctx.set(bus.wstrb, strb); ctx.set(bus.wlast, k == length - 1)
            ctx.set(bus.wvalid, 1)
            await _handshake(ctx, bus.wready)
            ctx.set(bus.wvalid, 0)
        while True:
            ready = rng.random() >= self.stall
            ctx.set(bus.bready, ready)
            _, _, valid, bid, bresp = await ctx.tick().sample(bus.bvalid, bus.bid, bus.bresp)
            if valid and ready:
                ctx.set(bus.bready, 0)
                assert bid == wid and bresp == 0
                return

    async def read(self, ctx, addr, length, size, burst):
        bus, rng = self.bus, self.rng
        await _gap(ctx, rng, self.stall)
        rid = rng.randrange(16)
        ctx.set(bus.araddr, addr); ctx.set(bus.arlen, length - 1); ctx.set(bus.arsize, size)
        ctx.set(bus.arburst, burst); ctx.set(bus.arid, rid); ctx.set(bus.arvalid, 1)
        await _handshake(ctx, bus.arready)
        ctx.set(bus.arvalid, 0)
        out = []
        while len(out) < length:
            ready = rng.random() >= self.stall
            ctx.set(bus.rready, ready)
            _, _, valid, data, last, rid_got, resp = await ctx.tick().sample(
                bus.rvalid, bus.rdata, bus.rlast, bus.rid, bus.rresp)
            if valid and ready:
                assert rid_got == rid and resp == 0
                assert bool(last) == (len(out) == length - 1), f"rlast on beat {len(out)} of {length}"
                out.append(data)
        ctx.set(bus.rready, 0)
        return out


def _lane_bytes(data, bpw):
    return data.to_bytes(bpw, "little")


@pytest.mark.parametrize("data_width,stall,lite,seed,primitive", [
    (64, 0.0, False, 1, None), (64, 0.5, True, 2, None), (32, 0.3, True, 3, None),
    (128, 0.3, False, 4, None),
    # the DP16KD wiring (BlockRAM around its pin-level model); no initial contents there
    (64, 0.3, True, 5, "dp16kd-model"),
])
def test_bram_random_bursts(data_width, stall, lite, seed, primitive):
    rng = random.Random(seed)
    size = 2048
    bpw = data_width // 8
    if primitive is None:
        init = bytes(rng.getrandbits(8) for _ in range(size))
    else:
        init = bytes(size)
    gold = bytearray(init)
    dut = AxiBram(size=size, data_width=data_width, addr_width=32, lite_port=lite,
                  init=init if primitive is None else None, primitive=primitive)
    m = Master(dut.s_axi, rng, stall, bpw, size)
    wr_rng, rd_rng = random.Random(seed + 100), random.Random(seed + 200)
    m_rd = Master(dut.s_axi, rd_rng, stall, bpw, size)
    m_wr = Master(dut.s_axi, wr_rng, stall, bpw, size)
    maxsize = bpw.bit_length() - 1
    done = {"wr": False, "rd": False, "lite": not lite}
    # Regions: writes [0, size/2), reads [size/2, 3size/4), lite [3size/4, size).
    half, q3 = size // 2, 3 * size // 4

    def burst_params(r, lo, hi):
        size_ = r.randrange(maxsize + 1)
        burst = r.choice([1, 1, 1, 0])
        length = r.randrange(1, 17)
        span = length << size_ if burst else 1 << size_
        addr = r.randrange(lo, hi - span + 1) >> size_ << size_
        return addr, length, size_, burst

    async def writer(ctx):
        for _ in range(25):
            addr, length, size_, burst = burst_params(wr_rng, 0, half)
            beats = []
            for a in _beat_addrs(addr, length, size_, burst):
                lane0 = a % bpw
                mask = ((1 << (1 << size_)) - 1) << lane0
                strb = wr_rng.getrandbits(bpw) & mask
                data = wr_rng.getrandbits(data_width)
                beats.append((data, strb))
                db = _lane_bytes(data, bpw)
                base = a - lane0
                for i in range(bpw):
                    if strb >> i & 1:
                        gold[(base + i) % size] = db[i]
            await m_wr.write(ctx, addr, length, size_, burst, beats)
        done["wr"] = True

    async def reader(ctx):
        for _ in range(25):
            addr, length, size_, burst = burst_params(rd_rng, half, q3)
            got = await m_rd.read(ctx, addr, length, size_, burst)
            for a, data in zip(_beat_addrs(addr, length, size_, burst), got):
                lane0 = a % bpw
                db = _lane_bytes(data, bpw)
                n = 1 << size_
                assert db[lane0:lane0 + n] == bytes(init[a:a + n]), f"read 0x{a:x}"
        done["rd"] = True

    async def lite_worker(ctx):
        bus = dut.s_axil
        lrng = random.Random(seed + 300)
        for _ in range(30):
            a = lrng.randrange(q3, size, 4)
            if lrng.random() < 0.5:
                data, strb = lrng.getrandbits(32), lrng.getrandbits(4)
                ctx.set(bus.awaddr, a + 0x1000_0000); ctx.set(bus.awvalid, 1)
                ctx.set(bus.wdata, data); ctx.set(bus.wstrb, strb); ctx.set(bus.wvalid, 1)
                await _handshake(ctx, bus.awready)  # this BRAM takes AW and W together
                ctx.set(bus.awvalid, 0); ctx.set(bus.wvalid, 0)
                ctx.set(bus.bready, 1)
                await _handshake(ctx, bus.bvalid)
                ctx.set(bus.bready, 0)
                for i in range(4):
                    if strb >> i & 1:
                        gold[a + i] = (data >> 8 * i) & 0xFF
            else:
                ctx.set(bus.araddr, a + 0x1000_0000); ctx.set(bus.arvalid, 1)
                await _handshake(ctx, bus.arready)
                ctx.set(bus.arvalid, 0)
                await _gap(ctx, lrng, stall)
                ctx.set(bus.rready, 1)
                data, = await _handshake(ctx, bus.rvalid, bus.rdata)
                ctx.set(bus.rready, 0)
                assert data == int.from_bytes(gold[a:a + 4], "little"), f"lite read 0x{a:x}"
        done["lite"] = True

    async def checker(ctx):
        while not all(done.values()):
            await ctx.tick()
        # Read every byte back with full-width bursts.
        chk = Master(dut.s_axi, random.Random(seed), stall, bpw, size)
        got = bytearray()
        for a in range(0, size, 16 * bpw):
            for data in await chk.read(ctx, a, 16, maxsize, 1):
                got += _lane_bytes(data, bpw)
        assert got == gold

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(writer)
    sim.add_testbench(reader)
    if lite:
        sim.add_testbench(lite_worker)
    sim.add_testbench(checker)
    sim.run()


def test_bram_full_rate_read():
    """No stalls: a 16-beat read burst streams one beat per cycle after AR."""
    dut = AxiBram(size=1024, data_width=64)
    cycles = {}

    async def tb(ctx):
        bus = dut.s_axi
        ctx.set(bus.araddr, 0); ctx.set(bus.arlen, 15); ctx.set(bus.arsize, 3)
        ctx.set(bus.arburst, 1); ctx.set(bus.arvalid, 1)
        await _handshake(ctx, bus.arready)
        ctx.set(bus.arvalid, 0)
        ctx.set(bus.rready, 1)
        n = t = 0
        while n < 16:
            _, _, valid = await ctx.tick().sample(bus.rvalid)
            t += 1
            n += valid
        cycles["r"] = t

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert cycles["r"] <= 18, cycles


def test_bram_bad_params():
    with pytest.raises(ValueError, match="size 1000"):
        AxiBram(size=1000)
    with pytest.raises(ValueError, match="data_width 48"):
        AxiBram(size=1024, data_width=48)
