"""L1: the host's path to the DRAM controller's registers on the ECPIX-5: AXILiteSplit (a window
in front of the board decoder) and AXILiteToWishbone (LiteDRAM's wb_ctrl), together, in
amaranth.sim. Random reads and writes with strobes, some in the window and some outside it,
random AXI-Lite and Wishbone stalls, Wishbone errors and a target that never answers; every
answer and both memories must equal a dictionary model."""
import gc
import random
import warnings

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from evssd.hw.lib.axil_split import AXILiteSplit
from evssd.hw.lib.axi import AXI4LiteSignature
from evssd.hw.lib.axil_wishbone import AXILiteToWishbone, WishboneSignature
from .axil_models import LiteMemory, handshake

BASE, SIZE = 0x0E00_0000, 0x1_0000
ERR_WORD = 0x3000 >> 2       # Wishbone answers err here
DEAD_WORD = 0x3004 >> 2      # and nothing at all here (the converter's timeout answers)


class Path(wiring.Component):
    def __init__(self):
        self.split = AXILiteSplit(base=BASE, size=SIZE)
        self.conv = AXILiteToWishbone(addr_width=16, timeout=40)
        super().__init__({"s_axil": wiring.In(AXI4LiteSignature(addr_width=32, data_width=32)),
                          "m_rest": wiring.Out(AXI4LiteSignature(addr_width=32, data_width=32)),
                          "m_wb": wiring.Out(WishboneSignature(14))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.split, m.submodules.conv = self.split, self.conv
        wiring.connect(m, wiring.flipped(self.s_axil), self.split.s_axil)
        wiring.connect(m, self.split.m_rest, wiring.flipped(self.m_rest))
        wiring.connect(m, self.split.m_window, self.conv.s_axil)
        wiring.connect(m, self.conv.m_wb, wiring.flipped(self.m_wb))
        return m


def _merge(old, value, strb):
    for i in range(4):
        if strb >> i & 1:
            old = (old & ~(0xFF << 8 * i)) | (value & (0xFF << 8 * i))
    return old


@pytest.mark.parametrize("seed,stall", [(31, 0.0), (32, 0.5)])
def test_window_reaches_wishbone_the_rest_passes(seed, stall):
    rng = random.Random(seed)
    dut = Path()
    s, wb, rest = dut.s_axil, dut.m_wb, dut.m_rest
    wb_words: dict[int, int] = {}
    rest_mem = LiteMemory()
    model_wb: dict[int, int] = {}
    model_rest = LiteMemory()
    seen = set()

    async def master(ctx):
        for _ in range(120):
            inside = rng.random() < 0.6
            if inside:
                word = rng.choice([ERR_WORD, DEAD_WORD] + [rng.randrange(0, 0x40)] * 8)
                addr = BASE + 4 * word
            else:
                addr = rng.choice([0, 0x4000_0000, 0x8000_0000]) + 4 * rng.randrange(0, 0x40)
            if rng.random() < 0.5:
                value, strb = rng.getrandbits(32), rng.choice([0xF, 0x1, 0x6, 0x8])
                if inside:
                    word = (addr - BASE) >> 2
                    want = 2 if word in (ERR_WORD, DEAD_WORD) else 0
                    if not want:
                        model_wb[word] = _merge(model_wb.get(word, 0), value, strb)
                else:
                    want = model_rest.write(addr, value, strb)
                ctx.set(s.awaddr, addr)
                ctx.set(s.wdata, value)
                ctx.set(s.wstrb, strb)
                ctx.set(s.awvalid, 1)
                ctx.set(s.wvalid, 1)
                aw, w = False, False
                while not (aw and w):
                    _, _, awr, wr = await ctx.tick().sample(s.awready, s.wready)
                    if awr and not aw:
                        aw = True
                        ctx.set(s.awvalid, 0)
                    if wr and not w:
                        w = True
                        ctx.set(s.wvalid, 0)
                ctx.set(s.bready, 1)
                resp, = await handshake(ctx, s.bvalid, s.bresp)
                ctx.set(s.bready, 0)
                assert resp == want, (hex(addr), resp, want)
                seen.add(("w", inside, want))
            else:
                if inside:
                    word = (addr - BASE) >> 2
                    want = (0, 2) if word in (ERR_WORD, DEAD_WORD) else (model_wb.get(word, 0), 0)
                else:
                    want = model_rest.read(addr)
                ctx.set(s.araddr, addr)
                ctx.set(s.arvalid, 1)
                await handshake(ctx, s.arready)
                ctx.set(s.arvalid, 0)
                ctx.set(s.rready, 1)
                data, resp = await handshake(ctx, s.rvalid, s.rdata, s.rresp)
                ctx.set(s.rready, 0)
                assert resp == want[1] and (resp or data == want[0]), (hex(addr), data, resp, want)
                seen.add(("r", inside, want[1]))

    async def wishbone(ctx):
        while True:
            _, _, cyc, stb, adr, we, dat_w, sel = await ctx.tick().sample(
                wb.cyc, wb.stb, wb.adr, wb.we, wb.dat_w, wb.sel)
            if not (cyc and stb) or adr == DEAD_WORD:
                continue
            for _ in range(rng.choice([0, 0, 1, 3]) if stall else 0):
                await ctx.tick()
            if adr == ERR_WORD:
                ctx.set(wb.err, 1)
            else:
                if we:
                    wb_words[adr] = _merge(wb_words.get(adr, 0), dat_w, sel)
                ctx.set(wb.dat_r, wb_words.get(adr, 0))
                ctx.set(wb.ack, 1)
            await ctx.tick()
            ctx.set(wb.ack, 0)
            ctx.set(wb.err, 0)

    async def rest_slave(ctx):
        while True:
            if stall:
                for _ in range(rng.choice([0, 1, 4])):
                    await ctx.tick()
            ctx.set(rest.arready, 1)
            ctx.set(rest.awready, 1)
            ctx.set(rest.wready, 1)
            _, _, arv, araddr, awv, awaddr, wv, wdata, wstrb = await ctx.tick().sample(
                rest.arvalid, rest.araddr, rest.awvalid, rest.awaddr, rest.wvalid, rest.wdata, rest.wstrb)
            ctx.set(rest.arready, 0)
            ctx.set(rest.awready, 0)
            ctx.set(rest.wready, 0)
            if arv:
                data, resp = rest_mem.read(araddr)
                ctx.set(rest.rdata, data)
                ctx.set(rest.rresp, resp)
                ctx.set(rest.rvalid, 1)
                await handshake(ctx, rest.rready)
                ctx.set(rest.rvalid, 0)
            elif awv:
                assert wv, "the split forwards AW and W together"
                ctx.set(rest.bresp, rest_mem.write(awaddr, wdata, wstrb))
                ctx.set(rest.bvalid, 1)
                await handshake(ctx, rest.bready)
                ctx.set(rest.bvalid, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(master)
    sim.add_testbench(wishbone, background=True)
    sim.add_testbench(rest_slave, background=True)
    sim.run()
    assert wb_words == model_wb and rest_mem.words == model_rest.words
    assert {("w", True, 0), ("w", True, 2), ("r", True, 0), ("r", True, 2), ("w", False, 0),
            ("r", False, 0), ("r", False, 3)} <= seen, seen


def test_bad_arguments_are_named():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="power of two aligned"):
            AXILiteSplit(base=0x100, size=0x1000)
        with pytest.raises(ValueError, match="timeout 2"):
            AXILiteToWishbone(timeout=2)
        gc.collect()
