"""What the driver needs from a backend: MMIO, host memory, and a way to wait for the device.

The driver (:mod:`evssd.host.device`) awaits nothing but a :class:`Transport`, so the same
driver code runs against the functional model, the RTL in cocotb and a board over UART. The
driver never uses asyncio primitives itself: a cocotb test runs it on cocotb's scheduler, the
synchronous facade runs it on an asyncio loop. Backends are made by name in
:mod:`evssd.host.backends`, which imports the implementations; this module imports none of them.
"""
from __future__ import annotations

import abc
import bisect

from evssd.hw.regmap import BUFFER_ALIGN
from evssd.host.regfile import MMIOError

__all__ = ["Transport", "HostMemory", "MMIOError", "TransportError"]


class TransportError(IOError):
    """The link to the device failed (no answer, bad frame, closed)."""


class HostMemory:
    """First-fit allocator over a device-visible host-memory window ``[base, base + size)``.

    Every allocation is aligned to ``align`` (:data:`evssd.hw.regmap.BUFFER_ALIGN`: the device
    requires aligned buffers). Freed blocks merge with their neighbours.
    """

    def __init__(self, base: int, size: int, align: int = BUFFER_ALIGN):
        if size <= 0 or base % align:
            raise ValueError(f"host memory window base=0x{base:x} size={size} (align {align})")
        self.base, self.size, self.align = base, size, align
        self._free = [(base, size)]  # sorted (addr, size)
        self._used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise ValueError(f"allocation of {nbytes} bytes")
        need = -(-nbytes // self.align) * self.align
        for i, (addr, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (addr + need, size - need)
                self._used[addr] = need
                return addr
        raise MemoryError(f"host memory window of {self.size} bytes cannot fit {nbytes} more bytes "
                          f"({self.free_bytes} free in {len(self._free)} pieces)")

    def free(self, addr: int) -> None:
        size = self._used.pop(addr, None)
        if size is None:
            raise ValueError(f"free of 0x{addr:x}: not allocated")
        i = bisect.bisect(self._free, (addr, size))
        self._free.insert(i, (addr, size))
        # merge with neighbours
        merged = []
        for a, s in self._free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((a, s))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self._free)


class Transport(abc.ABC):
    """A device link. Subclasses implement MMIO, host-memory access and waiting."""

    #: host-memory allocator; subclasses create it
    memory: HostMemory

    @abc.abstractmethod
    async def read32(self, addr: int) -> int:
        """32-bit MMIO read; raises :class:`MMIOError` on SLVERR/DECERR."""

    @abc.abstractmethod
    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        """32-bit MMIO write; raises :class:`MMIOError` on SLVERR/DECERR."""

    @abc.abstractmethod
    async def mem_write(self, addr: int, data: bytes) -> None:
        """Write host memory the device can read."""

    @abc.abstractmethod
    async def mem_read(self, addr: int, nbytes: int) -> bytes:
        """Read host memory the device wrote."""

    async def mem_readinto(self, addr: int, out) -> None:
        """Read ``len(out)`` bytes of host memory at ``addr`` into ``out`` (a writable, C-contiguous
        buffer: a ``bytearray``, a ``memoryview`` or a uint8 array the caller owns).

        The driver reads results through this, so a backend whose host memory is in-process (the
        model) copies once, straight into the caller's array. This default goes through
        :meth:`mem_read`, so a link that must fetch the bytes (UART, cocotb) needs nothing more.
        """
        dst = memoryview(out).cast("B")
        dst[:] = await self.mem_read(addr, dst.nbytes)

    def map_buffer(self, buf) -> int | None:
        """Make ``buf`` (a writable, C-contiguous numpy array the driver allocated for the
        caller) device-visible host memory and return its address, so the device writes a result
        straight into it, like a driver pinning the caller's pages for DMA; :meth:`free` of the
        address ends the mapping. None (this default) when the device cannot reach the caller's
        memory (a board, a simulator in another process): the driver then gives the device a
        buffer of :attr:`memory` and copies the result out with :meth:`mem_readinto`.

        The driver maps a buffer only for one command and hands it to the caller only after the
        command completed and the mapping ended, so the device never writes memory the caller
        uses."""
        return None

    @abc.abstractmethod
    async def wait(self) -> None:
        """Let the device run until something may have changed (an interrupt or a poll interval)."""

    def alloc(self, nbytes: int) -> int:
        return self.memory.alloc(nbytes)

    def free(self, addr: int) -> None:
        """Release an :meth:`alloc` (or a :meth:`map_buffer` mapping, where a transport has them)."""
        self.memory.free(addr)

    async def close(self) -> None:
        pass

    #: a short name for messages
    name = "transport"
