"""L1: UartRx, UartTx and UartAxiBridge in amaranth.sim against Python golden models.

- UartTx: random bytes with random producer gaps; a line monitor decodes the wire.
- UartRx: random bytes with random idle time between them, random consumer stalls; overrun.
- UartAxiBridge: random frames (PING, READ, WRITE with strobes, bad CRC, bad opcode, truncated)
  with random gaps on i_rx, random ready stalls on o_tx and random stalls + error responses on
  the AXI4-Lite side; response bytes and the memory must equal evssd.host.uart.BridgeModel's.
"""
import random

import pytest
from amaranth.sim import Simulator

from evssd.hw.boards import uart as hw_uart
from evssd.hw.boards.uart import UartAxiBridge, UartRx, UartTx
from evssd.host import uart as host_uart
from evssd.host.uart import BridgeModel, Op, encode_request

from .axil_models import LiteMemory, axil_slave


def test_one_protocol_definition():
    """The gateware, the board and the host take the frame constants, the CRC and the address
    map from evssd.hw.bridge_protocol; its table-driven CRC equals the bit-serial definition the
    gateware's XOR network is built from."""
    from evssd.hw import bridge_protocol as proto
    from evssd.hw.boards import board as hw_board
    for name in ("SOF_REQUEST", "SOF_RESPONSE", "MAX_WORDS", "CRC8_POLY", "Op", "FrameStatus", "crc8"):
        assert getattr(hw_uart, name) is getattr(proto, name), name
        assert getattr(host_uart, name) is getattr(proto, name), name
    for name in ("MMIO_BASE", "BOARD_INFO_BASE", "WINDOW_BASE", "BOARD_MAGIC"):
        assert getattr(hw_board, name) == getattr(host_uart, name) == getattr(proto, name), name
    rng = random.Random(1)
    for _ in range(50):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
        serial = 0
        for byte in data:
            serial = proto.crc8_byte(serial, byte)
        assert proto.crc8(data) == serial
    # CRC-8/SMBUS check value
    assert host_uart.crc8(b"123456789") == 0xF4


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_bad_divisor():
    with pytest.raises(ValueError, match="divisor 2"):
        UartRx(2)
    with pytest.raises(ValueError, match="idle_timeout 3"):
        UartAxiBridge(idle_timeout=3)


@pytest.mark.parametrize("divisor,seed", [(4, 1), (7, 2), (16, 3)])
def test_tx_random_bytes(divisor, seed):
    rng = random.Random(seed)
    data = [rng.getrandbits(8) for _ in range(60)]
    dut = UartTx(divisor)
    got = []

    async def producer(ctx):
        for b in data:
            for _ in range(rng.choice([0, 0, 1, 3, 25])):
                await ctx.tick()
            ctx.set(dut.i_data.valid, 1)
            ctx.set(dut.i_data.payload, b)
            await ctx.tick().until(dut.i_data.ready)
            ctx.set(dut.i_data.valid, 0)

    async def monitor(ctx):
        # Golden line decoder: start edge, then the middle of each bit.
        while len(got) < len(data):
            await ctx.tick().until(dut.tx == 0)
            # The edge was seen at the tick when tx already was 0: the middle of the start bit
            # is divisor//2 - 1 ticks later.
            await ctx.tick().repeat(divisor // 2 - 1)
            assert ctx.get(dut.tx) == 0, "start bit too short"
            byte = 0
            for i in range(8):
                await ctx.tick().repeat(divisor)
                byte |= ctx.get(dut.tx) << i
            await ctx.tick().repeat(divisor)
            assert ctx.get(dut.tx) == 1, "stop bit missing"
            got.append(byte)

    async def done(ctx):
        while len(got) < len(data):
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(done)
    sim.run()
    assert got == data


async def _drive_byte(ctx, line, byte, divisor, stop=1):
    bits = [0] + [(byte >> i) & 1 for i in range(8)] + [stop]
    for b in bits:
        ctx.set(line, b)
        await ctx.tick().repeat(divisor)
    ctx.set(line, 1)


@pytest.mark.parametrize("divisor,seed", [(4, 4), (9, 5)])
def test_rx_random_bytes_and_stalls(divisor, seed):
    rng = random.Random(seed)
    data = [rng.getrandbits(8) for _ in range(60)]
    dut = UartRx(divisor)
    got, overruns, frame_errors = [], [], []

    async def line(ctx):
        await ctx.tick().repeat(3)
        for b in data:
            gap = rng.choice([0, 0, 1, 2, divisor * 3])
            if gap:
                await ctx.tick().repeat(gap)
            await _drive_byte(ctx, dut.rx, b, divisor)
        # A byte with a broken stop bit is dropped and flagged.
        await _drive_byte(ctx, dut.rx, 0x55, divisor, stop=0)
        await ctx.tick().repeat(divisor * 12)

    async def consumer(ctx):
        while True:
            # Ready stalls shorter than a byte time cannot lose data.
            ctx.set(dut.o_data.ready, rng.random() < 0.3)
            await ctx.tick()

    async def monitor(ctx):
        async for clk, rst, valid, ready, payload, ovr, ferr in ctx.tick().sample(
                dut.o_data.valid, dut.o_data.ready, dut.o_data.payload, dut.overrun, dut.frame_error):
            if valid and ready:
                got.append(payload)
            if ovr:
                overruns.append(1)
            if ferr:
                frame_errors.append(1)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(line)
    sim.add_testbench(consumer, background=True)
    sim.add_testbench(monitor, background=True)
    sim.run()
    assert got == data
    assert not overruns
    assert len(frame_errors) == 1


def test_rx_overrun_keeps_newest():
    d = 4
    dut = UartRx(d)
    got, overruns = [], []

    async def line(ctx):
        await ctx.tick().repeat(3)
        for b in (0x11, 0x22, 0x33):
            await _drive_byte(ctx, dut.rx, b, d)
        await ctx.tick().repeat(5)
        ctx.set(dut.o_data.ready, 1)
        payload, = await ctx.tick().sample(dut.o_data.payload).until(dut.o_data.valid)
        got.append(payload)
        ctx.set(dut.o_data.ready, 0)
        await ctx.tick().repeat(3)
        assert not ctx.get(dut.o_data.valid)

    async def monitor(ctx):
        async for clk, rst, ovr in ctx.tick().sample(dut.overrun):
            if ovr:
                overruns.append(1)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(line)
    sim.add_testbench(monitor, background=True)
    sim.run()
    assert got == [0x33] and len(overruns) == 2


def test_tx_rx_loopback():
    """UartTx wired to UartRx through the line: the pair the board uses."""
    from amaranth import Module
    d = 5
    m = Module()
    m.submodules.tx = tx = UartTx(d)
    m.submodules.rx = rx = UartRx(d)
    m.d.comb += rx.rx.eq(tx.tx)
    rng = random.Random(9)
    data = [rng.getrandbits(8) for _ in range(30)]
    got = []

    async def producer(ctx):
        for b in data:
            ctx.set(tx.i_data.valid, 1)
            ctx.set(tx.i_data.payload, b)
            await ctx.tick().until(tx.i_data.ready)
            ctx.set(tx.i_data.valid, 0)

    async def consumer(ctx):
        ctx.set(rx.o_data.ready, 1)
        while len(got) < len(data):
            payload, = await ctx.tick().sample(rx.o_data.payload).until(rx.o_data.valid)
            got.append(payload)

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(producer, background=True)
    sim.add_testbench(consumer)
    sim.run()
    assert got == data


# ---------------------------------------------------------------------------------------------
# Bridge

def _random_frame(rng, tag):
    """(bytes, truncated?) for one random request frame."""
    kind = rng.choices(["ping", "read", "write", "badcrc", "badop", "trunc", "err"],
                       [1, 4, 4, 1, 1, 1, 1])[0]
    count = rng.choice([1, 1, 2, 3, 8]) if rng.random() < 0.95 else rng.randrange(1, 257)
    addr = rng.randrange(0, 0x1000 // 4) * 4
    if kind == "err":
        addr = rng.choice([0x4000_0000, 0x8000_0000]) + addr
    if kind == "ping":
        return encode_request(Op.PING, tag, 0), False
    if kind in ("read", "err") and rng.random() < 0.5:
        return encode_request(Op.READ, tag, addr, count), False
    if kind in ("write", "err", "badcrc", "trunc"):
        data = bytes(rng.getrandbits(8) for _ in range(4 * count))
        frame = encode_request(Op.WRITE, tag, addr, count, rng.choice([0xF, 0xF, 0x1, 0x6, 0x8]), data)
    else:
        frame = encode_request(Op.READ, tag, addr, count)
    if kind == "badcrc":
        i = rng.randrange(1, len(frame))
        frame = frame[:i] + bytes([frame[i] ^ (1 << rng.randrange(8))]) + frame[i + 1:]
    elif kind == "badop":
        body = bytes([0x37, tag]) + frame[3:9]
        frame = bytes([0xA5]) + body + bytes([host_uart.crc8(body)])
    elif kind == "trunc":
        frame = frame[:rng.randrange(2, len(frame))]
    return frame, kind == "trunc"


@pytest.mark.parametrize("seed,stall", [(11, 0.0), (12, 0.4), (13, 0.7)])
def test_bridge_random_frames(seed, stall):
    rng = random.Random(seed)
    idle_timeout = 48
    dut = UartAxiBridge(idle_timeout=idle_timeout)
    hw_mem, model_mem = LiteMemory(), LiteMemory()
    model = BridgeModel(model_mem.read, model_mem.write)
    bus = dut.m_axil
    out = bytearray()
    expected = bytearray()
    n_frames = 40
    statuses = set()

    async def feeder(ctx):
        for i in range(n_frames):
            frame, _ = _random_frame(rng, i)
            exp = bytearray()
            for b in frame:
                for _ in range(rng.choice([0, 0, 0, 1, 4])):
                    await ctx.tick()
                ctx.set(dut.i_rx.valid, 1)
                ctx.set(dut.i_rx.payload, b)
                await ctx.tick()
                ctx.set(dut.i_rx.valid, 0)
            exp += model.feed(frame)
            if not exp:
                # Mid-frame when the line goes quiet (truncated frame or a corrupted COUNT).
                await ctx.tick().repeat(idle_timeout + 4)
                exp += model.idle()
            statuses.add(exp[3])
            expected.extend(exp)
            while len(out) < len(expected):
                await ctx.tick()
        await ctx.tick().repeat(50)

    async def collector(ctx):
        while True:
            ctx.set(dut.o_tx.ready, rng.random() >= stall)
            await ctx.tick()

    async def monitor(ctx):
        async for clk, rst, valid, ready, payload in ctx.tick().sample(
                dut.o_tx.valid, dut.o_tx.ready, dut.o_tx.payload):
            if valid and ready:
                out.append(payload)

    axi_write, axi_read = axil_slave(bus, hw_mem, rng, stall)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder)
    for p in (collector, monitor, axi_write, axi_read):
        sim.add_testbench(p, background=True)
    sim.run()
    assert bytes(out) == bytes(expected)
    assert hw_mem.words == model_mem.words
    # The stream must have exercised the interesting cases.
    assert {0, 1, 3}.issubset(statuses), statuses


# ---------------------------------------------------------------------------------------------
# The pyserial path: UartTransport over a pseudo-terminal served by the bridge model in front of
# the functional device model (no board needed).

import os
import select
import sys
import threading
import time

import numpy as np

from evssd.hw.regmap import Params
from evssd.host.transport import TransportError
from evssd.host.uart import UartTransport

from ..board_model import ModelBoardBus


class PtyBoard(ModelBoardBus):
    """A fake board on a pty: the bridge model over the board's bus and the device model. The
    model runs a command after the write's answer went out, as on the board."""

    def __init__(self, params, window_bytes=16384, answer=True):
        super().__init__(params, window_bytes, run_on_write=False)
        self.master, self.slave = os.openpty()
        import tty
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.answer = answer
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            ready, _, _ = select.select([self.master], [], [], 0.02)
            if not ready:
                out = self.bridge.idle()
                if out and self.answer:
                    os.write(self.master, out)
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            out = self.bridge.feed(data)
            if out and self.answer:
                os.write(self.master, out)
            self.run_pending()

    def close(self):
        self._stop = True
        self.thread.join(1)
        os.close(self.master)
        os.close(self.slave)


def test_uart_transport_over_pty_runs_the_driver():
    pytest.importorskip("serial")
    from evssd.host.device import Device
    params = Params(n_channels=2, page_size=1024, pages_per_channel=32, max_row_bytes=256)
    board = PtyBoard(params)
    try:
        # The board model runs each command in its serving thread right after the doorbell's
        # answer, so the first GATHER's numba compile (tens of seconds on a loaded 2-core CI
        # machine) keeps the next answer waiting: the link timeout is a hang guard, not a
        # latency bound.
        dev = Device.open("uart", port=board.port, baud=115200, timeout=180.0, link_timeout=120.0,
                          sq_entries=8, cq_entries=8)
        try:
            assert dev.params == params
            assert dev.transport.info["window_bytes"] == 16384
            rng = np.random.default_rng(3)
            data = rng.standard_normal((40, 16)).astype("<f4")      # 64-byte rows, 16 per page
            pages = np.zeros((3, 1024), np.uint8)
            flat = data.view(np.uint8).reshape(40, 64)
            for r in range(40):
                pages[r // 16, (r % 16) * 64:(r % 16 + 1) * 64] = flat[r]
            dev.program_pages(0, pages)
            dev.configure_table(0, row_bytes=64, elem="fp32", extents=[(0, 40, 0)])
            idx = rng.integers(0, 40, 25).astype(np.uint32)
            raw = dev.gather(0, idx)
            assert np.array_equal(dev.view(0, raw), data[idx])
            offsets = np.array([0, 10, 10, 25], np.uint32)
            pooled = dev.view(0, dev.gather_pooled(0, idx, offsets), pooled=True)
            assert pooled.shape == (3, 16)
            assert np.array_equal(pooled[1], np.zeros(16, np.float32))
        finally:
            dev.close()
    finally:
        board.close()


def test_uart_port_that_does_not_answer_times_out():
    pytest.importorskip("serial")
    board = PtyBoard(Params(), answer=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="no answer within 0.3 s"):
            UartTransport(port=board.port, baud=115200, link_timeout=0.3, retries=0)
        assert time.monotonic() - t0 < 30.0  # a hang guard, not a timing check
    finally:
        board.close()


def test_uart_bad_port_and_missing_pyserial(monkeypatch):
    pytest.importorskip("serial")
    with pytest.raises(TransportError, match="cannot open the serial port"):
        UartTransport(port="/dev/evssd-no-such-port", link_timeout=0.2)
    with pytest.raises(ValueError, match="needs port="):
        UartTransport()
    monkeypatch.setitem(sys.modules, "serial", None)
    with pytest.raises(TransportError, match="needs pyserial"):
        UartTransport(port="/dev/ttyUSB0")
