"""cocotb bench: the real driver runs the board core over the UART framing, bit by bit.

:class:`CocotbUartLink` is a bit-level 8N1 UART model on the ``uart_rx``/``uart_tx`` pins (the
same :class:`~evssd.host.uart.ByteLink` interface pyserial gets), so the host's
:class:`~evssd.host.uart.UartTransport` and the driver run unchanged. Timeouts are in simulated
bit times, so a board that does not answer fails fast in simulation too.
"""
from __future__ import annotations

import collections

import cocotb
from cocotb.triggers import ClockCycles, FallingEdge, Timer

from evssd.hw import regmap
from evssd.host.uart import (BOARD_MAGIC, FrameStatus, LinkTimeoutError, Op, ByteLink, UartTransport,
                             crc8, encode_request)
from evssd.sim.board_scenarios import BOARD_SCENARIOS, Board
from evssd.sim.runner import load_meta
from evssd.sim.transport import start_clock_and_reset

PERIOD_NS = 10


class CocotbUartLink(ByteLink):
    """Drives ``dut.uart_rx`` and decodes ``dut.uart_tx`` at ``divisor`` clocks per bit."""

    def __init__(self, dut, divisor: int, *, timeout_bytes: int = 400, poll_cycles: int = 200):
        self.dut = dut
        self.bit_ns = divisor * PERIOD_NS
        self.timeout_ns = timeout_bytes * 10 * self.bit_ns
        self.poll_ns = poll_cycles * PERIOD_NS
        self.name = f"cocotb-uart(div={divisor})"
        self.rxq: collections.deque[int] = collections.deque()
        self.sent = 0
        dut.uart_rx.value = 1
        self._task = cocotb.start_soon(self._receiver())

    async def _receiver(self):
        line = self.dut.uart_tx
        while True:
            await FallingEdge(line)
            await Timer(self.bit_ns // 2, unit="ns")
            if int(line.value):
                continue  # glitch
            byte = 0
            for i in range(8):
                await Timer(self.bit_ns, unit="ns")
                byte |= int(line.value) << i
            await Timer(self.bit_ns, unit="ns")
            assert int(line.value) == 1, "board sent a byte without a stop bit"
            self.rxq.append(byte)

    async def send(self, data: bytes) -> None:
        pin = self.dut.uart_rx
        for byte in data:
            for bit in [0] + [(byte >> i) & 1 for i in range(8)] + [1]:
                pin.value = bit
                await Timer(self.bit_ns, unit="ns")
            self.sent += 1

    async def recv(self, n: int) -> bytes:
        # The timeout restarts with every byte: a long response is slow, not silent.
        waited, have = 0, len(self.rxq)
        step = 10 * self.bit_ns
        while len(self.rxq) < n:
            if waited >= self.timeout_ns:
                got = bytes(self.rxq)
                self.rxq.clear()
                raise LinkTimeoutError(f"{self.name}: no answer within {self.timeout_ns} ns of "
                                       f"simulated time ({len(got)} of {n} bytes)")
            await Timer(step, unit="ns")
            if len(self.rxq) != have:
                waited, have = 0, len(self.rxq)
            else:
                waited += step
        return bytes(self.rxq.popleft() for _ in range(n))

    async def drain(self) -> None:
        quiet, waited = 0, 0
        while quiet < 3:
            if waited >= self.timeout_ns:  # a line that never goes quiet must not hang the bench
                self.rxq.clear()
                raise LinkTimeoutError(f"{self.name}: the line did not go quiet within "
                                       f"{self.timeout_ns} ns of simulated time")
            before = len(self.rxq)
            await Timer(20 * self.bit_ns, unit="ns")
            waited += 20 * self.bit_ns
            quiet = quiet + 1 if len(self.rxq) == before else 0
        self.rxq.clear()

    async def pause(self) -> None:
        await Timer(self.poll_ns, unit="ns")


async def _setup(dut):
    meta = load_meta()
    divisor = meta["top_args"].get("divisor", 4)
    await start_clock_and_reset(dut, period_ns=PERIOD_NS)
    link = CocotbUartLink(dut, divisor)
    return meta, link


async def _raw_exchange(link: CocotbUartLink, frame: bytes, n_reply: int) -> bytes:
    await link.send(frame)
    return await link.recv(n_reply)


def _shared(name, scenario):
    """The shared board scenario ``name`` as a cocotb test of this bench."""
    async def run(dut):
        meta, link = await _setup(dut)
        t = await UartTransport.create(link=link)
        await scenario.body(Board("UART", t, meta["params"],
                                  meta["top_args"].get("window_bytes", 16384),
                                  meta["top_args"].get("device", False)))
    run.__name__ = run.__qualname__ = name
    run.__doc__ = scenario.body.__doc__
    return cocotb.test(run)


# every shared scenario (sim/board_scenarios.py) is a test of this bench, under its own name
for _name, _scenario in BOARD_SCENARIOS.items():
    globals()[_name] = _shared(_name, _scenario)


@cocotb.test()
async def bad_checksum_then_usable(dut):
    """A frame with a bad CRC gets a CRC_ERROR answer, nothing executes, the bridge still works."""
    meta, link = await _setup(dut)
    t = await UartTransport.create(link=link)
    addr = regmap.register("EXT_FIRST").addr
    await t.write32(addr, 0x1111_1111)
    good = encode_request(Op.WRITE, 0x42, addr, 1, 0xF, (0x2222_2222).to_bytes(4, "little"))
    bad = good[:-1] + bytes([good[-1] ^ 0x5A])
    reply = await _raw_exchange(link, bad, 5)
    assert reply[0] == 0x5A and reply[1] == Op.WRITE and reply[2] == 0x42, reply.hex()
    assert reply[3] == FrameStatus.CRC_ERROR and reply[4] == crc8(reply[1:4]), reply.hex()
    assert await t.read32(addr) == 0x1111_1111, "a frame with a bad CRC was executed"
    # A truncated frame: the board answers TIMEOUT after its idle timeout, then works again.
    reply = await _raw_exchange(link, good[:6], 5)
    assert reply[3] == FrameStatus.TIMEOUT, reply.hex()
    await t.write32(addr, 0x3333_3333)
    assert await t.read32(addr) == 0x3333_3333
    # A bad opcode with a good CRC.
    body = bytes([0x37, 9]) + bytes(6)
    reply = await _raw_exchange(link, bytes([0xA5]) + body + bytes([crc8(body)]), 5)
    assert reply[3] == FrameStatus.BAD_OPCODE, reply.hex()
    assert (await t.read32(regmap.register("ID_MAGIC").addr)) == regmap.MAGIC
    # Retries: the protocol resends a frame the board rejected; count it.
    assert t.proto.stats["retries"] == 0


@cocotb.test()
async def no_answer_times_out(dut):
    """A board held in reset never answers: the transport raises a timeout, it does not hang."""
    meta, link = await _setup(dut)
    link.timeout_ns = 50 * 10 * link.bit_ns
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    start = cocotb.utils.get_sim_time("ns")
    try:
        await UartTransport.create(link=link, retries=0)
    except LinkTimeoutError as exc:
        assert "no answer" in str(exc)
    else:
        raise AssertionError("a board in reset answered")
    elapsed = cocotb.utils.get_sim_time("ns") - start
    assert elapsed < 2 * (link.timeout_ns + 200 * link.bit_ns), elapsed
    dut.rst.value = 0
    await ClockCycles(dut.clk, 2)
    link.timeout_ns = 400 * 10 * link.bit_ns
    t = await UartTransport.create(link=link)
    assert t.info["magic"] == BOARD_MAGIC
