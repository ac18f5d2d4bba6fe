"""L1: BlockRAM (generic and the DP16KD wiring around the pin-level model) against a Python model.

Every cycle a random write (random address, data and byte enables) and random read-pipe enables
(``r_en``, ``r_oe`` independently, so the pipe is stalled and skewed at random); the Python model
keeps the memory, the array register and the output register, and ``r_data`` is compared each
cycle once the output register holds a defined word. Reads of the word written in the same cycle
may return either value, so the stimulus never reads the address it writes.
"""
import random

import pytest
from amaranth.back import rtlil
from amaranth.sim import Simulator

from evssd.hw.lib.block_ram import BlockRAM, DP16KDModel, dp16kd_layout


def _run(dut, width, depth, cycles, seed, addr_space=None):
    rng = random.Random(seed)
    space = addr_space or depth
    mem = [0] * depth
    state = {"q": None, "out": None, "checked": 0}
    nbytes = width // 8

    async def tb(ctx):
        for _ in range(cycles):
            waddr = rng.randrange(space)
            raddr = rng.randrange(space)
            while raddr == waddr and space > 1:
                raddr = rng.randrange(space)
            wen = rng.getrandbits(nbytes) if rng.random() < 0.6 else 0
            wdata = rng.getrandbits(width)
            ren, roe = rng.random() < 0.7, rng.random() < 0.7
            ctx.set(dut.w_addr, waddr); ctx.set(dut.w_data, wdata); ctx.set(dut.w_en, wen)
            ctx.set(dut.r_addr, raddr); ctx.set(dut.r_en, ren); ctx.set(dut.r_oe, roe)
            await ctx.tick()
            # registers: the output register takes the array register's old word
            if roe:
                state["out"] = state["q"]
            if ren:
                state["q"] = mem[raddr]
            for b in range(nbytes):
                if wen >> b & 1:
                    mask = 0xFF << (8 * b)
                    mem[waddr] = (mem[waddr] & ~mask) | (wdata & mask)
            if state["out"] is not None:
                got = ctx.get(dut.r_data)
                assert got == state["out"], f"r_data 0x{got:x} != 0x{state['out']:x}"
                state["checked"] += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert state["checked"] > cycles // 3
    return state


@pytest.mark.parametrize("primitive,width,depth,seed", [
    ("generic", 64, 512, 1),
    ("dp16kd-model", 64, 2048, 2),    # x9 tiles, one per byte
    ("dp16kd-model", 64, 64, 6),      # shallower than a tile (the merger's accumulator)
    ("dp16kd-model", 64, 4096, 3),    # x4 tiles, two per byte (the board's flash channel)
    ("dp16kd-model", 32, 8192, 4),    # x2 tiles
    ("dp16kd-model", 16, 24576, 5),   # x1 tiles in two banks (the second one half used)
])
def test_block_ram_random(primitive, width, depth, seed):
    dut = BlockRAM(width=width, depth=depth, primitive=primitive)
    # A narrow address window (its top bits spread over every bank) keeps the words reused, so
    # writes are read back.
    if depth > 4096:
        space = depth
    else:
        space = min(depth, 64)
    _run(dut, width, depth, 1500, seed, addr_space=space)


def test_block_ram_banks_are_distinct():
    """Words 16384 apart live in different banks: each keeps its own value."""
    dut = BlockRAM(width=8, depth=32768, primitive="dp16kd-model")
    seen = {}

    async def tb(ctx):
        for a, v in ((5, 0x11), (16384 + 5, 0x22)):
            ctx.set(dut.w_addr, a); ctx.set(dut.w_data, v); ctx.set(dut.w_en, 1)
            await ctx.tick()
        ctx.set(dut.w_en, 0)
        ctx.set(dut.r_en, 1); ctx.set(dut.r_oe, 1)
        out = []
        for a in (5, 16384 + 5, 6, 6):
            ctx.set(dut.r_addr, a)
            await ctx.tick()
            out.append(ctx.get(dut.r_data))
        # a read issued at edge k is in the output register after edge k + 1
        seen["out"] = out[1:]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    assert seen == {"out": [0x11, 0x22, 0]}


def test_dp16kd_layout():
    assert dp16kd_layout(64, 4096) == {"port_width": 4, "tiles_per_byte": 2, "banks": 1,
                                       "tiles": 16, "tile_depth": 4096}
    assert dp16kd_layout(64, 2048)["tiles"] == 8
    assert dp16kd_layout(64, 512)["port_width"] == 9
    assert dp16kd_layout(8, 40000) == {"port_width": 1, "tiles_per_byte": 8, "banks": 3,
                                       "tiles": 24, "tile_depth": 16384}


def test_dp16kd_instances_in_netlist():
    """The "dp16kd" primitive emits DP16KD cells with the output register on, one per tile."""
    dut = BlockRAM(width=64, depth=4096, primitive="dp16kd")
    text = rtlil.convert(dut)
    assert text.count("cell \\DP16KD ") == 16
    assert text.count('parameter \\REGMODE_A "OUTREG"') == 16
    assert text.count("parameter \\DATA_WIDTH_A 4") == 16
    # a memory shallower than a tile: x9 tiles, the address pins above its 6 bits tied low
    text = rtlil.convert(BlockRAM(width=64, depth=64, primitive="dp16kd"))
    assert text.count("cell \\DP16KD ") == 8
    assert text.count("parameter \\DATA_WIDTH_A 9") == 8


def test_platform_chooses_primitive():
    class Ecp5:
        family = "ecp5"
    dut = BlockRAM(width=64, depth=4096)
    assert dut.resolved_primitive(Ecp5()) == "dp16kd"
    assert dut.resolved_primitive(None) == "generic"
    # initial contents always go to the inferred memory
    assert BlockRAM(width=8, depth=16, init=[1]).resolved_primitive(Ecp5()) == "generic"


def test_block_ram_bad_params():
    with pytest.raises(ValueError, match="width 12"):
        BlockRAM(width=12, depth=16)
    with pytest.raises(ValueError, match="depth 0"):
        BlockRAM(width=8, depth=0)
    with pytest.raises(ValueError, match="primitive 'bram'"):
        BlockRAM(width=8, depth=16, primitive="bram")
    with pytest.raises(ValueError, match="width 3"):
        DP16KDModel(3)
