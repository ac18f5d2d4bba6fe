"""The driver's transport to a board behind a bus bridge, whatever the link (UART or UDP).

Both board links carry the same three requests (PING, READ words, WRITE words with a strobe) to
the same 32-bit address map (:mod:`evssd.hw.bridge_protocol`): the EV-SSD registers at
``MMIO_BASE``, the board-info block at ``BOARD_INFO_BASE``, the host-memory window at the base and
size the info block names. :class:`BridgeTransport` is that map, written once; the links differ
only in their protocol object (:class:`evssd.host.uart.UartProtocol`,
:class:`evssd.host.udp.UdpProtocol`), which it awaits through :class:`BridgeProtocol`.

No Amaranth, no pyserial, no sockets here: the host library imports this at run time.
"""
from __future__ import annotations

import abc
import asyncio

from evssd.hw.bridge_protocol import BOARD_INFO, BOARD_INFO_BASE, BOARD_MAGIC, MMIO_BASE
from evssd.host.regfile import MMIOError
from evssd.host.transport import HostMemory, Transport, TransportError

__all__ = ["BridgeProtocol", "BridgeTransport"]


class BridgeProtocol(abc.ABC):
    """What :class:`BridgeTransport` needs from a link's protocol."""

    #: the most words one READ or WRITE request may carry
    max_words: int

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def read_words(self, addr: int, count: int) -> tuple[bytes, int]:
        """``count`` words from ``addr``; returns (data, first non-OKAY AXI response or 0)."""

    @abc.abstractmethod
    async def write_words(self, addr: int, data: bytes, strb: int = 0xF) -> int:
        """Write ``len(data) // 4`` words; returns the first non-OKAY AXI response or 0."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Let time pass (the driver's poll interval)."""

    async def close(self) -> None:
        pass


class BridgeTransport(Transport):
    """MMIO and the host-memory window of a board, over a :class:`BridgeProtocol`.

    Subclasses set ``self.proto`` and ``self.name`` and call :meth:`connect` (it pings the board
    and reads the board-info block, so a missing or foreign board fails at once).
    """

    proto: BridgeProtocol
    info: dict[str, int]

    def _attach(self, link, proto: BridgeProtocol, connect: bool) -> None:
        """Take ``link`` and the protocol over it; with ``connect``, identify the board now on a
        private event loop, closing the link when that fails (constructors answer quickly)."""
        self.link, self.name, self.proto = link, link.name, proto
        self.info = {}
        if connect:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.connect())
            except BaseException:
                loop.run_until_complete(link.close())
                raise
            finally:
                loop.close()

    @classmethod
    async def create(cls, *, link, **options) -> "BridgeTransport":
        """Construct over ``link`` inside a running event loop (a cocotb bench) and connect."""
        t = cls(link=link, connect=False, **options)
        await t.connect()
        return t

    async def connect(self) -> None:
        await self.proto.ping()
        data, resp = await self.proto.read_words(BOARD_INFO_BASE, len(BOARD_INFO))
        if resp:
            raise TransportError(f"{self.name}: board-info read answered resp={resp}: not an EV-SSD board")
        words = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
        self.info = dict(zip(BOARD_INFO, words))
        if self.info["magic"] != BOARD_MAGIC:
            raise TransportError(f"{self.name}: board magic 0x{self.info['magic']:08x}, expected "
                                 f"0x{BOARD_MAGIC:08x}: not an EV-SSD board bitstream")
        self.memory = HostMemory(self.info["window_base"], self.info["window_bytes"])

    # ---------------------------------------------------------------- MMIO
    async def read32(self, addr: int) -> int:
        data, resp = await self.proto.read_words(MMIO_BASE + addr, 1)
        if resp:
            raise MMIOError("read", addr, resp)
        return int.from_bytes(data, "little")

    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        resp = await self.proto.write_words(MMIO_BASE + addr, (value & 0xFFFF_FFFF).to_bytes(4, "little"), strb)
        if resp:
            raise MMIOError("write", addr, resp)

    # ---------------------------------------------------------------- host memory window
    def _check(self, addr: int, n: int):
        base, size = self.memory.base, self.memory.size
        if addr < base or addr + n > base + size:
            raise ValueError(f"host access 0x{addr:x}+{n} outside the board window "
                             f"[0x{base:x}, 0x{base + size:x})")

    async def mem_write(self, addr: int, data: bytes) -> None:
        data = bytes(data)
        self._check(addr, len(data))
        most = self.proto.max_words
        pos = 0
        while pos < len(data):
            a = addr + pos
            if a % 4 or len(data) - pos < 4:
                # A partial word: one request with a strobe for its bytes.
                lane = a % 4
                n = min(4 - lane, len(data) - pos)
                word = bytes(lane) + data[pos:pos + n] + bytes(4 - lane - n)
                strb = ((1 << n) - 1) << lane
                resp = await self.proto.write_words(a - lane, word, strb)
            else:
                n = min((len(data) - pos) // 4, most) * 4
                resp = await self.proto.write_words(a, data[pos:pos + n])
            if resp:
                raise TransportError(f"{self.name}: window write at 0x{a:x} answered resp={resp}")
            pos += n

    async def mem_read(self, addr: int, nbytes: int) -> bytes:
        self._check(addr, nbytes)
        start, end = addr & ~3, -(-(addr + nbytes) // 4) * 4
        out = bytearray()
        a = start
        while a < end:
            n = min((end - a) // 4, self.proto.max_words)
            data, resp = await self.proto.read_words(a, n)
            if resp:
                raise TransportError(f"{self.name}: window read at 0x{a:x} answered resp={resp}")
            out += data
            a += 4 * n
        return bytes(out[addr - start:addr - start + nbytes])

    async def wait(self) -> None:
        await self.proto.pause()

    async def close(self) -> None:
        await self.proto.close()
