"""Test models of an AXI4-Lite slave for amaranth.sim benches: a word memory with error regions
and the slave's handshakes with optional random stalls on every channel (the bridges' tests)."""


async def handshake(ctx, cond, *samples):
    """Tick until ``cond`` is high at an edge; the samples taken at that edge. (A plain loop, not
    ``until()``: background testbenches are closed mid-wait when the simulation ends.)"""
    while True:
        _, _, c, *vals = await ctx.tick().sample(cond, *samples)
        if c:
            return vals


class LiteMemory:
    """Word memory behind the bridge's AXI4-Lite master: [0, 0x1000) is RAM, 0x4000_0000.. answers
    SLVERR, 0x8000_0000.. DECERR (reads return 0)."""

    def __init__(self):
        self.words = {}

    def read(self, addr):
        if addr >= 0x8000_0000:
            return 0, 3
        if addr >= 0x4000_0000:
            return 0, 2
        return self.words.get(addr & 0xFFC, 0), 0

    def write(self, addr, value, strb):
        if addr >= 0x8000_0000:
            return 3
        if addr >= 0x4000_0000:
            return 2
        old = self.words.get(addr & 0xFFC, 0)
        for i in range(4):
            if strb >> i & 1:
                old = (old & ~(0xFF << 8 * i)) | (value & (0xFF << 8 * i))
        self.words[addr & 0xFFC] = old
        return 0


def axil_slave(bus, mem, rng, stall):
    """The two background testbenches of an AXI4-Lite slave on ``bus`` answering from ``mem``
    (``read(addr) -> (data, resp)``, ``write(addr, data, strb) -> resp``); with ``stall``, random
    waits before every ready and valid."""

    async def axi_write(ctx):
        while True:
            await ctx.tick().repeat(rng.choice([1, 1, 2, 5]) if stall else 1)
            ctx.set(bus.awready, 1)
            addr, = await handshake(ctx, bus.awvalid, bus.awaddr)
            ctx.set(bus.awready, 0)
            if stall:
                await ctx.tick().repeat(rng.choice([1, 3]))
            ctx.set(bus.wready, 1)
            data, strb = await handshake(ctx, bus.wvalid, bus.wdata, bus.wstrb)
            ctx.set(bus.wready, 0)
            resp = mem.write(addr, data, strb)
            if stall:
                await ctx.tick().repeat(rng.choice([1, 2, 4]))
            ctx.set(bus.bresp, resp)
            ctx.set(bus.bvalid, 1)
            await handshake(ctx, bus.bready)
            ctx.set(bus.bvalid, 0)

    async def axi_read(ctx):
        while True:
            await ctx.tick().repeat(rng.choice([1, 1, 2, 5]) if stall else 1)
            ctx.set(bus.arready, 1)
            addr, = await handshake(ctx, bus.arvalid, bus.araddr)
            ctx.set(bus.arready, 0)
            data, resp = mem.read(addr)
            if stall:
                await ctx.tick().repeat(rng.choice([1, 2, 6]))
            ctx.set(bus.rdata, data)
            ctx.set(bus.rresp, resp)
            ctx.set(bus.rvalid, 1)
            await handshake(ctx, bus.rready)
            ctx.set(bus.rvalid, 0)

    return axi_write, axi_read
