"""L1: AXIArbiter in amaranth.sim: several AXI4 masters, each writing and reading its own region
at the same time (random bursts, AW and W in either order, random W gaps, random R/B back-pressure,
random slave stalls from tests/hw/axi_mem.AXI4Memory). Every read must return what that master
wrote, every R and B must reach the master that asked with its own ID, and the slave's memory
must hold each master's bytes in its region and nothing elsewhere."""
import gc
import random
import warnings

import pytest
from amaranth.sim import Simulator

from evssd.hw.lib.axi_arbiter import AXIArbiter
from tests.hw.axi_mem import AXI4Memory

BB = 8          # 64-bit data
REGION = 1 << 14


def _master(dut, i, rng, log, n_bursts):
    port = dut.port(i)
    done_writes: list[tuple[int, bytes]] = []   # (offset, data) bursts whose B came back
    state = {"writes": 0, "reads": 0}

    async def writer(ctx):
        off = 0
        for _ in range(n_bursts):
            beats = rng.choice([1, 1, 2, 4, 8, 16])
            if off // 4096 != (off + beats * BB - 1) // 4096:
                off = (off // 4096 + 1) * 4096
            data = bytes(rng.getrandbits(8) for _ in range(beats * BB))
            wid = rng.getrandbits(1)
            ctx.set(port.awaddr, off)
            ctx.set(port.awlen, beats - 1)
            ctx.set(port.awsize, 3)
            ctx.set(port.awburst, 1)
            ctx.set(port.awid, wid)
            aw_left = True
            w_first = rng.random() < 0.3           # W may lead AW (AXI allows either order)
            if not w_first:
                ctx.set(port.awvalid, 1)
            beat = 0
            wv = False
            while aw_left or beat < beats:
                if beat < beats and not wv and rng.random() >= 0.25:
                    ctx.set(port.wvalid, 1)
                    ctx.set(port.wdata, int.from_bytes(data[beat * BB:(beat + 1) * BB], "little"))
                    ctx.set(port.wstrb, 0xFF)
                    ctx.set(port.wlast, beat == beats - 1)
                    wv = True
                if aw_left and (not w_first or beat > 0 or rng.random() < 0.5):
                    ctx.set(port.awvalid, 1)
                _, _, awv, awr, wvs, wr = await ctx.tick().sample(port.awvalid, port.awready, port.wvalid,
                                                                  port.wready)
                if awv and awr:
                    aw_left = False
                    ctx.set(port.awvalid, 0)
                if wvs and wr:
                    beat += 1
                    wv = False
                    ctx.set(port.wvalid, 0)
            while True:
                ready = rng.random() >= 0.3
                ctx.set(port.bready, ready)
                _, _, bv, bid, bresp = await ctx.tick().sample(port.bvalid, port.bid, port.bresp)
                if bv and ready:
                    assert bid == wid and bresp == 0, (i, bid, wid, bresp)
                    break
            ctx.set(port.bready, 0)
            done_writes.append((off, data))
            log[i].append((off, data))
            state["writes"] += 1
            off += beats * BB

    async def reader(ctx):
        while state["writes"] < n_bursts or state["reads"] < n_bursts // 2:
            if not done_writes:
                await ctx.tick()
                continue
            off, data = rng.choice(done_writes)
            beats = len(data) // BB
            rid_want = rng.getrandbits(1)
            ctx.set(port.araddr, off)
            ctx.set(port.arlen, beats - 1)
            ctx.set(port.arsize, 3)
            ctx.set(port.arburst, 1)
            ctx.set(port.arid, rid_want)
            ctx.set(port.arvalid, 1)
            while True:
                _, _, arr = await ctx.tick().sample(port.arready)
                if arr:
                    break
            ctx.set(port.arvalid, 0)
            got = bytearray()
            while len(got) < len(data):
                ready = rng.random() >= 0.3
                ctx.set(port.rready, ready)
                _, _, rv, rd, rid, rlast, rresp = await ctx.tick().sample(
                    port.rvalid, port.rdata, port.rid, port.rlast, port.rresp)
                if rv and ready:
                    assert rid == rid_want and rresp == 0, (i, rid, rid_want, rresp)
                    got += rd.to_bytes(BB, "little")
                    assert bool(rlast) == (len(got) == len(data)), (i, len(got), rlast)
            ctx.set(port.rready, 0)
            assert bytes(got) == data, f"master {i} read back other data at offset {off:#x}"
            state["reads"] += 1

    return writer, reader, state


@pytest.mark.parametrize("n,stall,seed", [(3, 0.0, 1), (4, 0.4, 2), (1, 0.3, 3)])
def test_masters_share_one_port(n, stall, seed):
    rng = random.Random(seed)
    base = REGION * 2
    dut = AXIArbiter(n, region_bytes=REGION, data_width=64, in_addr_width=14, out_addr_width=17,
                     id_width=1, base=base)
    mem = AXI4Memory(dut.m_axi, size=1 << 17, data_width=64, stall=stall, seed=seed, latency=2)
    log = {i: [] for i in range(n)}
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    mem.add_to(sim)
    states = []
    for i in range(n):
        writer, reader, state = _master(dut, i, random.Random(seed * 10 + i), log, 24)
        states.append(state)
        sim.add_testbench(writer)
        sim.add_testbench(reader)
    async def watchdog(ctx):
        # a lost grant or a misrouted response deadlocks the masters: fail, do not hang
        for _ in range(100_000):        # a plain loop: a background bench is closed mid-wait at the end
            await ctx.tick()
        raise AssertionError(f"no progress after 100,000 cycles: {states}")
    sim.add_testbench(watchdog, background=True)
    sim.run()
    expect = bytearray(1 << 17)
    for i in range(n):
        for off, data in log[i]:
            a = base + i * REGION + off
            expect[a:a + len(data)] = data
    assert mem.mem == expect
    assert all(s["reads"] >= 12 for s in states), states
    # the masters really overlapped: more AR/AW than one master alone could interleave
    assert len(mem.aw_log) == 24 * n


def test_bad_arguments_are_named():
    # a rejected component is never elaborated: its "unused" warning at collection is noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="region_bytes 1000"):
            AXIArbiter(2, region_bytes=1000)
        with pytest.raises(ValueError, match="do not fit out_addr_width 14"):
            AXIArbiter(2, region_bytes=1 << 14, out_addr_width=14)
        with pytest.raises(ValueError, match="n 0"):
            AXIArbiter(0, region_bytes=4096)
        gc.collect()
