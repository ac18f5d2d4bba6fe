"""L1: the MMIO manager against the register-file model, random accesses and random stalls."""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw import regmap
from evssd.hw.device.mmio import MMIOManager
from evssd.hw.regmap import Access, Params
from evssd.host.regfile import BusResponse, RegisterFile


def _ro_inputs(params):
    """(port name, register, field) for every RO input of the register port."""
    out = []
    for reg in regmap.REGISTERS:
        if reg.addr < 0x040:
            continue
        for fld in reg.fields:
            if fld.access is Access.RO:
                out.append((regmap.port_name(reg, fld), reg, fld))
    return out


def _pulse_ports(params):
    names = []
    for reg in regmap.REGISTERS:
        for fld in reg.fields:
            name = regmap.port_name(reg, fld)
            if fld.access is Access.W1T:
                names.append((name, name))
            elif fld.access is Access.WO:
                names.append((name + "_written", name))
    return names


class AxiLiteMaster:
    """Amaranth-sim AXI4-Lite master with random idle cycles on every channel."""

    def __init__(self, ctx, bus, rng, stall):
        self.ctx, self.bus, self.rng, self.stall = ctx, bus, rng, stall

    async def _idle(self):
        while self.rng.random() < self.stall:
            await self.ctx.tick()

    async def write(self, addr, data, strb=0xF):
        ctx, bus = self.ctx, self.bus
        # AW and W in a random order / overlap.
        aw_first = self.rng.random() < 0.5
        for phase in ("aw", "w") if aw_first else ("w", "aw"):
            await self._idle()
            if phase == "aw":
                ctx.set(bus.awaddr, addr)
                ctx.set(bus.awvalid, 1)
                await ctx.tick().until(bus.awready)
                ctx.set(bus.awvalid, 0)
            else:
                ctx.set(bus.wdata, data)
                ctx.set(bus.wstrb, strb)
                ctx.set(bus.wvalid, 1)
                await ctx.tick().until(bus.wready)
                ctx.set(bus.wvalid, 0)
        await self._idle()
        ctx.set(bus.bready, 1)
        resp, = await ctx.tick().sample(bus.bresp).until(bus.bvalid)
        ctx.set(bus.bready, 0)
        return resp

    async def read(self, addr):
        ctx, bus = self.ctx, self.bus
        await self._idle()
        ctx.set(bus.araddr, addr)
        ctx.set(bus.arvalid, 1)
        await ctx.tick().until(bus.arready)
        ctx.set(bus.arvalid, 0)
        await self._idle()
        ctx.set(bus.rready, 1)
        data, resp = await ctx.tick().sample(bus.rdata, bus.rresp).until(bus.rvalid)
        ctx.set(bus.rready, 0)
        return data, resp


@pytest.mark.parametrize("n_channels,stall,seed", [(4, 0.0, 1), (4, 0.5, 2), (1, 0.3, 3), (8, 0.3, 4)])
def test_mmio_matches_model(n_channels, stall, seed):
    params = Params(n_channels=n_channels)
    dut = MMIOManager(params)
    rng = random.Random(seed)
    events = []
    model = RegisterFile(params, on_write=lambda name, value: events.append(name))
    mapped = [addr for addr, _, _ in regmap.all_addresses(n_channels)]
    unmapped = [a for a in range(0, 0x400, 4) if a not in mapped]
    ro_inputs = _ro_inputs(params)
    seen_pulses = []
    pulse_ports = _pulse_ports(params)

    async def watch_pulses(ctx):
        # Each sample is (clock edge, reset, *values) after the edge.
        async for values in ctx.tick().sample(*(getattr(dut.regs, p) for p, _ in pulse_ports)):
            for (port, event), value in zip(pulse_ports, values[2:]):
                if value:
                    seen_pulses.append(event)

    async def bench(ctx):
        master = AxiLiteMaster(ctx, dut.s_axil, rng, stall)
        for _ in range(400):
            op = rng.random()
            if op < 0.15:
                # Device-side inputs change: the model sees the same values.
                name, reg, fld = rng.choice(ro_inputs)
                value = rng.getrandbits(fld.width)
                if reg.per_channel:
                    ch = rng.randrange(n_channels)
                    ctx.set(getattr(dut.regs, name)[ch], value)
                    model.fields[name][ch] = value
                else:
                    ctx.set(getattr(dut.regs, name), value)
                    model.fields[name] = value
                continue
            addr = rng.choice(mapped) if rng.random() < 0.85 else rng.choice(unmapped)
            if op < 0.55:
                data, strb = rng.getrandbits(32), rng.choice([0xF, 0xF, 0x1, 0x2, 0x4, 0x8, 0x3, 0xC, 0x0])
                resp = await master.write(addr, data, strb)
                assert resp == model.write(addr, data, strb), f"write 0x{addr:03x}"
            else:
                data, resp = await master.read(addr)
                exp_data, exp_resp = model.read(addr)
                assert resp == exp_resp, f"read 0x{addr:03x} resp"
                assert data == exp_data, f"read 0x{addr:03x}: 0x{data:08x} != model 0x{exp_data:08x}"
            # Register outputs equal the model's view after every access.
            for reg in regmap.REGISTERS:
                for fld in reg.fields:
                    if reg.addr >= 0x040 and fld.access in (Access.RW, Access.WO):
                        name = regmap.port_name(reg, fld)
                        assert ctx.get(getattr(dut.regs, name)) == model.fields[name], name
        for _ in range(3):
            await ctx.tick()
        assert sorted(seen_pulses) == sorted(events)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.add_process(watch_pulses)
    sim.run()


def test_id_block_reports_build():
    params = Params(n_channels=3, host_data_bits=256, page_size=2048, max_tables=8)
    dut = MMIOManager(params)
    got = {}

    async def bench(ctx):
        master = AxiLiteMaster(ctx, dut.s_axil, random.Random(0), 0.0)
        for reg in regmap.REGISTERS:
            if reg.addr < 0x040:
                data, resp = await master.read(reg.addr)
                assert resp == BusResponse.OKAY
                got[reg.name] = data
        # The ID block is read-only.
        assert await master.write(0x000, 0) == BusResponse.SLVERR
        data, _ = await master.read(0x000)
        assert data == regmap.MAGIC

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert got["ID_MAGIC"] == regmap.MAGIC
    assert got["ID_REGMAP_HASH"] == regmap.REGMAP_HASH
    assert got["ID_N_CHANNELS"] == 3
    assert got["ID_HOST_DATA_BITS"] == 256
    assert got["ID_PAGE_SIZE"] == 2048
    assert got["ID_MAX_TABLES"] == 8
    assert got["ID_VERSION"] == (regmap.REGMAP_VERSION[0] << 16) | regmap.REGMAP_VERSION[1]
