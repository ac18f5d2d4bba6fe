"""cocotb bench: the real driver opens the MMIO manager (RTL) and reads/writes registers."""
import random

import cocotb

from evssd.hw import regmap
from evssd.host import device as device_mod
from evssd.host.device import AsyncDevice, DeviceMismatchError
from evssd.host.regfile import BusResponse, MMIOError
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, start_clock_and_reset


@cocotb.test()
async def driver_opens_and_configures(dut):
    meta = load_meta()
    params = meta["params"]
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_ram=False)
    dev = await AsyncDevice.open(transport, expect=params)
    assert dev.params == params

    # Queue registers hold what the driver programmed.
    assert await transport.read32(regmap.register("SQ_SIZE").addr) == dev.sq_entries
    assert await transport.read32(regmap.register("CQ_BASE_LO").addr) == dev._cq_addr & 0xFFFF_FFFF
    assert await transport.read32(regmap.register("CQ_BASE_HI").addr) == dev._cq_addr >> 32
    ctrl = await transport.read32(regmap.register("CTRL").addr)
    assert ctrl & 1, f"CTRL=0x{ctrl:x}: enable not set"

    # Timing registers: reset values, then written values read back.
    assert await transport.read32(regmap.register("T_R").addr) == 1000
    await dev.set_timing(t_r=1234, t_prog=5678)
    assert await transport.read32(regmap.register("T_R").addr) == 1234
    assert await transport.read32(regmap.register("T_PROG").addr) == 5678

    # configure_table leaves the last staged values in the staging registers.
    await dev.configure_table(2, row_bytes=40, elem="int8", extents=[(0, 100, 7)])
    assert await transport.read32(regmap.register("TBL_ROWS_PER_PAGE").addr) == params.page_size // 40
    cfg = await transport.read32(regmap.register("TBL_CFG").addr)
    assert cfg == 40 | (regmap.ElemType.INT8 << 16) | (1 << 31), hex(cfg)
    magic = regmap.div_magic(params.page_size // 40)
    assert await transport.read32(regmap.register("TBL_DIV_MAGIC").addr) == magic.magic & 0xFFFF_FFFF

    # Random RW registers round-trip through the RTL.
    rng = random.Random(7)
    for name in ("SQ_BASE_LO", "EXT_FIRST", "EXT_ROWS", "EXT_LBA"):
        value = rng.getrandbits(32)
        await transport.write32(regmap.register(name).addr, value)
        assert await transport.read32(regmap.register(name).addr) == value, name

    # Errors: unmapped address -> DECERR; write to the ID block -> SLVERR.
    try:
        await transport.read32(0xFFC)
    except MMIOError as exc:
        assert exc.resp == BusResponse.DECERR
    else:
        raise AssertionError("read of unmapped 0xFFC did not fail")
    try:
        await transport.write32(regmap.register("ID_MAGIC").addr, 0)
    except MMIOError as exc:
        assert exc.resp == BusResponse.SLVERR
    else:
        raise AssertionError("write to ID_MAGIC did not fail")
    # Per-channel counters exist for present channels only.
    last = regmap.channel_addr("CH_ROWS", params.n_channels - 1)
    assert await transport.read32(last) == 0
    if params.n_channels < regmap.MAX_CHANNELS:
        try:
            await transport.read32(regmap.channel_addr("CH_ROWS", params.n_channels))
        except MMIOError as exc:
            assert exc.resp == BusResponse.DECERR
        else:
            raise AssertionError("counter of a missing channel answered")


@cocotb.test()
async def driver_refuses_wrong_regmap_hash(dut):
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_ram=False)
    real = regmap.REGMAP_HASH
    device_mod.regmap.REGMAP_HASH = real ^ 0x1
    try:
        await AsyncDevice.open(transport)
    except DeviceMismatchError as exc:
        assert "register map hash" in str(exc) and f"{real:08x}" in str(exc)
    else:
        raise AssertionError("driver opened a device with a different register map hash")
    finally:
        device_mod.regmap.REGMAP_HASH = real
