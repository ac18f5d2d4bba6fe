"""Board scenarios shared by every board bench: one body, run on each board's real transport.

The ULX3S bench (``sim/tb_board.py``: the UART framing, bit by bit) and the ECPIX-5 bench
(``sim/tb_ecpix5.py``: UDP datagrams at LiteEth's raw-port seam) each build a :class:`Board`
(their transport, already created, and what differs between the boards) and turn every entry of
:data:`BOARD_SCENARIOS` into a cocotb test of the same name; ``tests/test_rtl_board.py`` and
``tests/test_rtl_ecpix5.py`` run every entry. A scenario added here runs on both boards. Checks
only one board can make (the UART's CRC and idle timeout, the UDP link's sequence numbers, the
ECPIX-5's DRAM) stay in that board's bench, or in its ``Board.after_*`` hooks.

No cocotb import here (the pytest wrappers import the scenario list).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from evssd.hw import regmap
from evssd.hw.bridge_protocol import BOARD_INFO_BASE, BOARD_MAGIC, WINDOW_BASE

__all__ = ["Board", "BoardScenario", "BOARD_SCENARIOS", "scenario_names"]


@dataclass
class Board:
    """One board bench's side of a shared scenario.

    ``transport``: the board's transport (``UartTransport``/``UdpTransport``), created;
    ``params``: the device's build parameters; ``window_bytes``: the host-memory window's size;
    ``device``: the core was built with the EV-SSD (else only its register side);
    ``blob_bytes``: bytes the window round trip moves (the slow UART moves fewer);
    ``after_load``: awaited after the tables' pages are programmed (the ECPIX-5 checks its DRAM
    regions there).
    """
    name: str
    transport: object
    params: regmap.Params
    window_bytes: int
    device: bool
    blob_bytes: int = 201
    after_load: Callable[[], Awaitable[None]] | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(
        int(os.environ.get("EVSSD_SEED", "7"))))


@dataclass(frozen=True)
class BoardScenario:
    body: Callable[[Board], Awaitable[None]]
    device: bool            # needs the core built with the whole EV-SSD


async def identify_and_registers(board: Board):
    """Board info, the driver identifies the device, registers and the window round-trip
    (unaligned head and tail: strobed partial words), errors travel back."""
    from evssd.host.device import AsyncDevice
    from evssd.host.regfile import MMIOError
    t, params = board.transport, board.params
    assert t.info["magic"] == BOARD_MAGIC
    assert t.memory.base == WINDOW_BASE and t.memory.size == board.window_bytes
    dev = await AsyncDevice.open(t, expect=params, sq_entries=16, cq_entries=16, timeout=3600)
    assert dev.params == params
    # register round trip through bridge -> decoder -> MMIO manager
    await t.write32(regmap.register("EXT_LBA").addr, 0xDEADBEEF)
    assert await t.read32(regmap.register("EXT_LBA").addr) == 0xDEADBEEF
    base = t.alloc(board.blob_bytes + 64)
    blob = bytes(board.rng.getrandbits(8) for _ in range(board.blob_bytes))
    await t.mem_write(base + 3, blob)
    assert await t.mem_read(base + 3, len(blob)) == blob
    # errors travel back: unmapped bridge address -> DECERR, ROM write -> SLVERR
    data, resp = await t.proto.read_words(0x2000_0000, 1)
    assert resp == 3, resp
    assert await t.proto.write_words(BOARD_INFO_BASE, b"\0\0\0\0") == 2
    try:
        await t.write32(regmap.register("ID_MAGIC").addr, 0)
    except MMIOError as exc:
        assert exc.resp == 2
    else:
        raise AssertionError(f"write to ID_MAGIC over {board.name} did not fail")


async def gather_and_pooled(board: Board):
    """With the whole device: program pages, GATHER and GATHER_POOLED against numpy."""
    from evssd.host.device import AsyncDevice
    from evssd.sim.scenarios import _random_bags, _same_bits, golden_pooled, load, place_tables
    if not board.device:
        raise AssertionError("gather_and_pooled needs the core built with device=True")
    params = board.params
    rng = np.random.default_rng(int(os.environ.get("EVSSD_SEED", "5")))
    dev = await AsyncDevice.open(board.transport, expect=params, sq_entries=8, cq_entries=8,
                                 timeout=3600)
    await dev.set_timing(t_r=50, t_prog=50)
    tables, pages = place_tables(params, rng, 2, max_rows=24)
    await load(dev, tables, pages)
    if board.after_load is not None:
        await board.after_load()
    for tb in tables:
        idx = rng.integers(0, tb.rows, 12).astype(np.uint32)
        idx[6:8] = idx[0]
        raw = await dev.gather(tb.slot, idx)
        _same_bits(raw, tb.data[idx].view(np.uint8).reshape(len(idx), tb.row_bytes),
                   f"GATHER table {tb.slot}")
        offsets = _random_bags(rng, len(idx), 4)
        raw = await dev.gather_pooled(tb.slot, idx, offsets)
        _same_bits(raw, golden_pooled(tb, idx, offsets),
                   f"GATHER_POOLED table {tb.slot} ({tb.elem.name})")


BOARD_SCENARIOS: dict[str, BoardScenario] = {
    "identify_and_registers": BoardScenario(identify_and_registers, device=False),
    "gather_and_pooled": BoardScenario(gather_and_pooled, device=True),
}


def scenario_names(*, device: bool) -> list[str]:
    """The shared scenarios that need (``device=True``) or do not need the whole EV-SSD."""
    return [n for n, s in BOARD_SCENARIOS.items() if s.device == device]
