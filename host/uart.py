"""The ``uart`` backend: the driver talks to a board through the UART-to-AXI-Lite bridge.

Three layers, so the same framing code runs against a board (pyserial) and against the RTL in a
cocotb test (a bit-level UART model, :mod:`evssd.sim.tb_board`):

- :class:`ByteLink`: an async byte pipe with its own receive timeout (:class:`SerialLink` over
  pyserial; the cocotb bench has its own).
- :class:`UartProtocol`: request/response frames (``docs/uart-protocol.md``): CRC-8, tags,
  resynchronisation after garbage, retries of frames the board reports as not executed.
- :class:`UartTransport`: the driver's :class:`~evssd.host.transport.Transport` over the
  protocol: MMIO at bridge addresses ``0x0000_0000..0x0000_0FFF``, host memory in the board's
  BRAM window (base and size read from the board-info block at ``BOARD_INFO_BASE``).

This module must not import Amaranth (the host library runs without it); the frame constants,
the CRC and the address map come from the pure-Python :mod:`evssd.hw.bridge_protocol`, which the
gateware uses too. :class:`BridgeModel` is the
byte-level golden model of the gateware bridge.
"""
from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass

from evssd.host.bridge_transport import BridgeProtocol, BridgeTransport
from evssd.host.transport import TransportError

__all__ = ["SOF_REQUEST", "SOF_RESPONSE", "MAX_WORDS", "Op", "FrameStatus", "crc8", "encode_request",
           "Response", "ByteLink", "SerialLink", "LinkTimeoutError", "UartProtocol", "UartTransport",
           "BridgeModel", "BOARD_INFO_BASE", "BOARD_MAGIC", "WINDOW_BASE", "MMIO_BASE"]

# The frame constants, the CRC and the board's address map: one definition, shared with the
# gateware (pure Python, no Amaranth).
from evssd.hw.bridge_protocol import (BOARD_INFO, BOARD_INFO_BASE, BOARD_MAGIC, CRC8_POLY, MAX_WORDS,
                                      MMIO_BASE, SOF_REQUEST, SOF_RESPONSE, WINDOW_BASE, FrameStatus, Op,
                                      crc8)


def encode_request(op: int, tag: int, addr: int, count: int = 1, strb: int = 0xF,
                   data: bytes = b"") -> bytes:
    """One request frame: SOF OP TAG ADDR[4] COUNT STRB [DATA] CRC (COUNT = words - 1)."""
    if not 1 <= count <= MAX_WORDS:
        raise ValueError(f"word count {count} out of range 1..{MAX_WORDS}")
    if not 0 <= addr < (1 << 32) or addr % 4:
        raise ValueError(f"bridge address 0x{addr:x} must be a 4-byte aligned 32-bit address")
    body = bytes([op & 0xFF, tag & 0xFF]) + addr.to_bytes(4, "little") + bytes([count - 1, strb & 0xF])
    if op == Op.WRITE:
        if len(data) != 4 * count:
            raise ValueError(f"WRITE of {count} words needs {4 * count} data bytes, got {len(data)}")
        body += bytes(data)
    return bytes([SOF_REQUEST]) + body + bytes([crc8(body)])


@dataclass
class Response:
    op: int
    tag: int
    status: int
    data: bytes = b""
    resp: int = 0  # first non-OKAY AXI response of the frame (0 = all OKAY)

    def encode(self) -> bytes:
        body = bytes([self.op, self.tag, self.status])
        if self.status == FrameStatus.OK:
            body += self.data + bytes([self.resp])
        return bytes([SOF_RESPONSE]) + body + bytes([crc8(body)])


class LinkTimeoutError(TransportError, TimeoutError):
    """The other end did not answer in time."""


class ByteLink(abc.ABC):
    """An async byte pipe. ``recv`` raises :class:`LinkTimeoutError` when fewer than ``n``
    bytes arrive within the link's timeout."""

    name = "link"

    @abc.abstractmethod
    async def send(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def recv(self, n: int) -> bytes: ...

    @abc.abstractmethod
    async def drain(self) -> None:
        """Drop received bytes until the line has been quiet for a while (resynchronise); a line
        that never goes quiet raises :class:`LinkTimeoutError` after the link's timeout."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Let time pass (the driver's poll interval)."""

    async def close(self) -> None:
        pass


class SerialLink(ByteLink):
    """pyserial port. Calls block the event loop for at most ``timeout`` seconds: the driver is
    sequential, and a board that does not answer must not hang the caller."""

    def __init__(self, port: str, baud: int = 115200, *, timeout: float = 1.0, poll: float = 0.001):
        try:
            import serial  # optional extra: evssd[uart]
        except ImportError:
            raise TransportError("the uart backend needs pyserial: pip install 'evssd[uart]'") from None
        if baud <= 0:
            raise ValueError(f"baud {baud} must be positive")
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} must be positive seconds")
        self.name = f"uart:{port}@{baud}"
        self.timeout, self.poll = timeout, poll
        try:
            self._port = serial.serial_for_url(port, baudrate=baud, timeout=timeout, write_timeout=timeout)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise TransportError(f"{self.name}: cannot open the serial port: {exc}") from None
        self._serial = serial

    async def send(self, data: bytes) -> None:
        try:
            self._port.write(data)
            self._port.flush()
        except self._serial.SerialTimeoutException:
            raise LinkTimeoutError(f"{self.name}: write did not complete within {self.timeout} s") from None
        except (self._serial.SerialException, OSError) as exc:
            raise TransportError(f"{self.name}: write failed: {exc}") from None

    async def recv(self, n: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        out = bytearray()
        before = 0
        while len(out) < n:
            try:
                out += self._port.read(n - len(out))
            except (self._serial.SerialException, OSError) as exc:
                raise TransportError(f"{self.name}: read failed: {exc}") from None
            if len(out) > before:
                # The timeout restarts with every byte: a long response is slow, not silent.
                before, deadline = len(out), time.monotonic() + self.timeout
            elif len(out) < n and time.monotonic() >= deadline:
                raise LinkTimeoutError(f"{self.name}: no answer within {self.timeout} s "
                                       f"({len(out)} of {n} bytes): is the board configured and "
                                       f"on this port?")
        return bytes(out)

    async def drain(self) -> None:
        deadline = time.monotonic() + self.timeout
        old = self._port.timeout
        self._port.timeout = min(0.05, self.timeout)
        try:
            while self._port.read(4096):
                if time.monotonic() >= deadline:
                    raise LinkTimeoutError(f"{self.name}: the line did not go quiet within "
                                           f"{self.timeout} s (continuous noise or a stuck line?)")
        except (self._serial.SerialException, OSError) as exc:
            raise TransportError(f"{self.name}: read failed: {exc}") from None
        finally:
            self._port.timeout = old

    async def pause(self) -> None:
        await asyncio.sleep(self.poll)

    async def close(self) -> None:
        self._port.close()


class UartProtocol(BridgeProtocol):
    """Request/response frames over a :class:`ByteLink`.

    Frames the board answers with CRC_ERROR or TIMEOUT were not executed, so they are resent (up
    to ``retries`` times). A response that is garbled or missing is resent only for READ and PING
    (they have no side effects); for WRITE it raises :class:`TransportError`. Every wait is
    bounded: byte reads by the link's timeout, the search for a response start by a byte count,
    resynchronisation by the link's timeout, so a noisy or stuck line ends in an error.
    """

    max_words = MAX_WORDS

    def __init__(self, link: ByteLink, *, retries: int = 2):
        self.link = link
        self.retries = retries
        self._tag = 0
        self.stats = {"frames": 0, "retries": 0, "crc_errors": 0, "lost_responses": 0,
                      "stale_responses": 0}

    async def _exchange(self, op: int, addr: int, count: int, strb: int, data: bytes) -> Response:
        self._tag = (self._tag + 1) & 0xFF
        tag = self._tag
        await self.link.send(encode_request(op, tag, addr, count, strb, data))
        self.stats["frames"] += 1
        # Skip bytes until a response SOF (line noise, the tail of an older response) whose tag
        # and op are this request's. A whole response with another tag is stale: the answer to
        # an earlier frame the board reported late (e.g. a TIMEOUT for a frame that paused on the
        # line, after which the host had already resent it). It cannot be this request's answer,
        # so it is skipped, not taken as a failure of this request.
        budget = 4 * MAX_WORDS + 16
        while True:
            for _ in range(budget):
                budget -= 1
                b = await self.link.recv(1)
                if b[0] == SOF_RESPONSE:
                    break
            else:
                raise _Garbled(f"no response start byte in {4 * MAX_WORDS + 16} bytes (noisy line?)")
            head = await self.link.recv(3)
            r_op, r_tag, status = head
            if r_tag == tag and r_op == (op & 0xFF):
                break
            self.stats["stale_responses"] += 1
            budget -= 3
            if budget <= 0:
                raise _Garbled(f"response tag/op {r_tag}/{r_op} for request {tag}/{op}")
        if status != FrameStatus.OK:
            tail = await self.link.recv(1)
            if crc8(head) != tail[0]:
                raise _Garbled("response CRC mismatch")
            return Response(r_op, r_tag, status)
        n = 4 * count if op == Op.READ else 0
        rest = await self.link.recv(n + 2)
        body = head + rest[:-1]
        if crc8(body) != rest[-1]:
            self.stats["crc_errors"] += 1
            await self.link.drain()
            raise _Garbled("response CRC mismatch")
        return Response(r_op, r_tag, status, bytes(rest[:n]), rest[n])

    async def transact(self, op: int, addr: int, count: int = 1, strb: int = 0xF,
                       data: bytes = b"") -> Response:
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
            try:
                resp = await self._exchange(op, addr, count, strb, data)
            except (_Garbled, LinkTimeoutError) as exc:
                # A garbled or lost response: a READ/PING is simply asked again.
                last = exc
                if op == Op.WRITE:
                    raise TransportError(f"{self.link.name}: WRITE at 0x{addr:08x}: {exc}; the write "
                                         f"may or may not have happened") from None
                if isinstance(exc, LinkTimeoutError):
                    self.stats["lost_responses"] += 1
                continue
            if resp.status in (FrameStatus.CRC_ERROR, FrameStatus.TIMEOUT):
                last = resp
                continue
            if resp.status != FrameStatus.OK:
                raise TransportError(f"{self.link.name}: the bridge answered "
                                     f"{_status_name(resp.status)} to {Op(op).name} at 0x{addr:08x}")
            return resp
        what = (_status_name(last.status) if isinstance(last, Response) else str(last))
        # A link that stayed silent is still a timeout to the caller (LinkTimeoutError).
        error = LinkTimeoutError if isinstance(last, LinkTimeoutError) else TransportError
        raise error(f"{self.link.name}: {Op(op).name} at 0x{addr:08x} failed "
                    f"{self.retries + 1} times (last: {what})")

    async def ping(self) -> None:
        await self.transact(Op.PING, 0)

    async def read_words(self, addr: int, count: int) -> tuple[bytes, int]:
        resp = await self.transact(Op.READ, addr, count)
        return resp.data, resp.resp

    async def write_words(self, addr: int, data: bytes, strb: int = 0xF) -> int:
        resp = await self.transact(Op.WRITE, addr, len(data) // 4, strb, data)
        return resp.resp

    async def pause(self) -> None:
        await self.link.pause()

    async def close(self) -> None:
        await self.link.close()


class _Garbled(Exception):
    pass


def _status_name(status: int) -> str:
    try:
        return FrameStatus(status).name
    except ValueError:
        return f"status 0x{status:02x}"


class UartTransport(BridgeTransport):
    """The driver's transport to a board behind the UART bridge.

    ``UartTransport(port="/dev/ttyUSB0", baud=115200)`` opens pyserial; ``UartTransport(link=...)``
    runs over any :class:`ByteLink` (the cocotb bench). The constructor answers quickly: it pings
    the board and reads the board-info block, raising :class:`TransportError` when nothing
    answers within ``link_timeout`` seconds (the wait for each answer; named apart from
    :meth:`Device.open`'s ``timeout``, the wait for a command, so both pass through
    ``Device.open("uart", ...)``). Call :meth:`connect` yourself when constructing inside a
    running event loop (cocotb): ``await UartTransport.create(link=...)``.
    """

    name = "uart"

    def __init__(self, port: str | None = None, baud: int = 115200, *, link: ByteLink | None = None,
                 link_timeout: float = 1.0, poll: float = 0.001, retries: int = 2,
                 connect: bool = True):
        if link is None:
            if port is None:
                raise ValueError("UartTransport needs port= (e.g. /dev/ttyUSB0) or link=")
            link = SerialLink(port, baud, timeout=link_timeout, poll=poll)
        self._attach(link, UartProtocol(link, retries=retries), connect)

    # MMIO, the window and connect() are BridgeTransport's (the address map is the same on every
    # board link).


class BridgeModel:
    """Byte-level golden model of the gateware bridge (:class:`evssd.hw.boards.uart.UartAxiBridge`).

    ``feed(bytes)`` returns the response bytes the bridge sends for complete frames; ``idle()``
    models the inter-byte timeout. ``bus_read(addr) -> (data, resp)`` and
    ``bus_write(addr, data, strb) -> resp`` are the AXI4-Lite side.
    """

    def __init__(self, bus_read, bus_write):
        self.bus_read, self.bus_write = bus_read, bus_write
        self._buf: bytearray | None = None

    def _need(self) -> int | None:
        """Bytes of the frame in progress (SOF included), once the header is known."""
        b = self._buf
        if len(b) < 9:
            return None
        op, count = b[1], b[7] + 1
        return 9 + (4 * count if op == Op.WRITE else 0) + 1

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._buf is None:
                if byte == SOF_REQUEST:
                    self._buf = bytearray([byte])
                continue
            self._buf.append(byte)
            need = self._need()
            if need is not None and len(self._buf) == need:
                out += self._execute(bytes(self._buf))
                self._buf = None
        return bytes(out)

    def idle(self) -> bytes:
        """The line went quiet: a frame in progress is dropped with a TIMEOUT answer."""
        if self._buf is None:
            return b""
        b = bytes(self._buf) + bytes(3)  # OP and TAG read as 0 when they had not arrived
        self._buf = None
        return Response(b[1], b[2], FrameStatus.TIMEOUT).encode()

    def _execute(self, frame: bytes) -> bytes:
        body, crc = frame[1:-1], frame[-1]
        op, tag = body[0], body[1]
        addr = int.from_bytes(body[2:6], "little")
        count, strb = body[6] + 1, body[7] & 0xF
        if crc8(body) != crc:
            return Response(op, tag, FrameStatus.CRC_ERROR).encode()
        if op not in (Op.PING, Op.READ, Op.WRITE):
            return Response(op, tag, FrameStatus.BAD_OPCODE).encode()
        first = 0
        data = bytearray()
        if op == Op.READ:
            for i in range(count):
                word, resp = self.bus_read((addr + 4 * i) & 0xFFFF_FFFF)
                data += int(word).to_bytes(4, "little")
                first = first or resp
        elif op == Op.WRITE:
            payload = body[8:]
            for i in range(count):
                resp = self.bus_write((addr + 4 * i) & 0xFFFF_FFFF,
                                      int.from_bytes(payload[4 * i:4 * i + 4], "little"), strb)
                first = first or resp
        return Response(op, tag, FrameStatus.OK, bytes(data), first).encode()
