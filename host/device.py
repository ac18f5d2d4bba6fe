"""The EV-SSD driver.

:class:`AsyncDevice` is the driver core: it awaits only its :class:`~evssd.host.transport.Transport`,
so one piece of code drives the functional model, the RTL in cocotb and a board. :class:`Device`
is a synchronous facade for scripts::

    dev = Device.open("model")
    dev.configure_table(0, row_bytes=256, elem="fp32", extents=[(0, 1000, 0)])
    rows = dev.gather(0, np.array([3, 1, 4], dtype=np.uint32))

Commands go through an NVMe-style submission ring and come back on a completion ring (phase
bit), so the hot path needs no MMIO reads: one doorbell write per batch of commands and one per
batch of reaped completions.
"""
from __future__ import annotations

import asyncio
import threading
import time
import types
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from evssd.hw import regmap
from evssd.hw.regmap import (COMMAND_BYTES, COMPLETION_BYTES, Command, Completion, ElemType, Opcode,
                             Params, Status)
from evssd.host.backends import open_transport
from evssd.host.regfile import MMIOError
from evssd.host.rowmem import empty_rows
from evssd.host.transport import Transport

__all__ = ["AsyncDevice", "Device", "DeviceError", "DeviceClosedError", "DeviceMismatchError",
           "DeviceTimeoutError", "DeviceCapabilityError", "CommandHandle", "elem_type"]


class DeviceMismatchError(RuntimeError):
    """The device is not an EV-SSD, or speaks a different register map than this driver."""


class DeviceCapabilityError(ValueError):
    """The device does not implement a pooling the caller asked for (its CAPS register)."""


class DeviceClosedError(RuntimeError):
    """The device (or the store over it) was closed; open it again to use it."""


class DeviceTimeoutError(TimeoutError):
    """The device did not complete a command in time."""


class DeviceError(RuntimeError):
    """A command completed with a non-OK status.

    ``result`` holds what the device wrote (for BAD_INDEX: the good rows, zeros for the bad ones)
    so a caller can inspect it, but the driver never returns it as if it were good.
    """

    def __init__(self, status: int, completion: Completion, command: Command, result=None):
        self.status = Status(status) if status in Status._value2member_map_ else status
        self.completion, self.command, self.result = completion, command, result
        name = self.status.name if isinstance(self.status, Status) else f"0x{status:02x}"
        op = Opcode(command.opcode).name if command.opcode in Opcode._value2member_map_ else f"0x{command.opcode:02x}"
        where = ""
        if completion.n_bad:
            where = f": {completion.n_bad} bad entries, first at position {completion.first_bad}"
        table = f" table {command.table}" if command.opcode in (Opcode.GATHER, Opcode.GATHER_POOLED,
                                                                 Opcode.GATHER_POOLED_WEIGHTED) else ""
        super().__init__(f"{op}{table} (cid {command.cid}) failed with {name}{where}")


def elem_type(elem) -> ElemType:
    if isinstance(elem, ElemType):
        return elem
    if isinstance(elem, str):
        try:
            return ElemType[elem.upper()]
        except KeyError:
            raise ValueError(f"unknown element type {elem!r}; use fp32, fp16, int8, int32 or "
                             f"int8_rowwise") from None
    dt = np.dtype(elem)
    for e in ElemType:  # INT8_ROWWISE rows are plain bytes: never inferred from a dtype
        if e is not ElemType.INT8_ROWWISE and np.dtype(e.numpy_dtype) == dt:
            return e
    raise ValueError(f"no device element type for numpy dtype {dt}")


@dataclass
class TableConfig:
    table: int
    row_bytes: int
    elem: ElemType
    extents: list[tuple[int, int, int]]
    enable: bool = True

    @property
    def pooled_row_bytes(self) -> int:
        return regmap.pooled_row_bytes(self.row_bytes, self.elem)


@dataclass
class CommandHandle:
    cid: int
    command: Command
    buffers: list[int] = field(default_factory=list)
    completion: Completion | None = None
    #: (rows, row_bytes) of a gather's result; None for other commands
    result_shape: tuple[int, int] | None = None
    #: nobody waits for it any more: its buffers are freed when its completion is reaped
    abandoned: bool = False
    #: the result array: written by the device directly when ``mapped``
    #: (``Transport.map_buffer``), else copied out of host memory by ``finish`` (None: ``finish``
    #: makes one)
    result: np.ndarray | None = None
    mapped: bool = False


class _Staged(NamedTuple):
    """A command whose buffers are allocated and filled, not yet submitted."""
    command: Command
    buffers: list
    shape: tuple[int, int]
    result: np.ndarray | None
    mapped: bool


class _SharedBuffer:
    """One host-memory buffer (or mapped array) that several commands of one submission use,
    each its own part: the batch's index arrays side by side, or its results. It is in each
    command's ``buffers`` and is freed when the last of them lets go of it (finished, failed
    before it was submitted, or its late completion reaped), so a batch of k commands costs one
    allocation and one free instead of k."""
    __slots__ = ("addr", "users")

    def __init__(self, addr: int, users: int):
        self.addr, self.users = addr, users

    def __repr__(self) -> str:
        return f"_SharedBuffer(0x{self.addr:x}, users={self.users})"


def _aligned(n: int) -> int:
    """``n`` rounded up to the alignment the device requires of every buffer address
    (:data:`evssd.hw.regmap.BUFFER_ALIGN`)."""
    return -(-n // regmap.BUFFER_ALIGN) * regmap.BUFFER_ALIGN


class _Resumed:
    """Awaitable that continues a coroutine which already yielded ``first`` outside a task:
    it passes what the coroutine yields to the task running it and what the task sends or
    throws back to the coroutine (what ``await coro`` would have done from the start)."""

    def __init__(self, coro, first):
        self.coro, self.first = coro, first

    def __await__(self):
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro, first):
    return await _Resumed(coro, first)


_COROUTINE = types.CoroutineType
_running_loop = asyncio._get_running_loop  # the loop running in this thread, or None


def _op_name(opcode: int) -> str:
    return Opcode(opcode).name if opcode in Opcode._value2member_map_ else f"opcode 0x{opcode:02x}"


def _check_int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as a Python int in ``lo..hi``, or an error naming ``name``: no float is
    truncated and no value wraps into a hardware field."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} out of range {lo}..{hi}")
    return value


def _int_array(name: str, values) -> np.ndarray:
    """A one-dimensional integer array, or an error naming ``name`` (floats, bools, objects and
    other shapes are refused rather than converted)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr


def _reg(name: str) -> int:
    return regmap.register(name).addr


class AsyncDevice:
    """The driver core. Create with :meth:`open`."""

    def __init__(self, transport: Transport, params: Params, *, sq_entries: int, cq_entries: int,
                 timeout: float):
        self.transport = transport
        self.params = params
        self.timeout = timeout
        self.sq_entries, self.cq_entries = sq_entries, cq_entries
        self.tables: dict[int, TableConfig] = {}
        self._caps: int | None = None   # the CAPS register, read on first use
        self._sq_tail = 0
        self._cq_head = 0
        self._phase = 1
        self._next_cid = 0
        self._inflight: dict[int, CommandHandle] = {}
        self._done: dict[int, CommandHandle] = {}
        self._reaping = False
        self._submitting = False
        self.closed = False

    def _live(self):
        if self.closed:
            raise DeviceClosedError(f"{self.transport.name}: the device is closed")

    # ------------------------------------------------------------------ opening
    @classmethod
    async def open(cls, transport: Transport, *, sq_entries: int = 64, cq_entries: int = 64,
                   timeout: float = 60.0, expect: Params | None = None) -> "AsyncDevice":
        """Identify the device behind ``transport``, set up the rings and enable it.

        Raises :class:`DeviceMismatchError` when the magic, the register-map major version or
        its content hash differ from this driver's, or when ``expect`` is given and the build
        parameters differ.
        """
        for n, what in ((sq_entries, "sq_entries"), (cq_entries, "cq_entries")):
            n = _check_int(what, n, 2, 32768)
            if n & (n - 1):
                raise ValueError(f"{what}={n}: must be a power of two 2..32768")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
                or timeout == float("inf"):
            raise ValueError(f"timeout={timeout!r}: must be a positive number of seconds")
        magic = await transport.read32(_reg("ID_MAGIC"))
        if magic != regmap.MAGIC:
            raise DeviceMismatchError(f"{transport.name}: no EV-SSD here (ID magic 0x{magic:08x}, "
                                      f"expected 0x{regmap.MAGIC:08x})")
        version = await transport.read32(_reg("ID_VERSION"))
        major, minor = version >> 16, version & 0xFFFF
        if major != regmap.REGMAP_VERSION[0]:
            raise DeviceMismatchError(f"{transport.name}: register map version {major}.{minor}, driver speaks "
                                      f"{regmap.REGMAP_VERSION[0]}.x")
        dev_hash = await transport.read32(_reg("ID_REGMAP_HASH"))
        if dev_hash != regmap.REGMAP_HASH:
            raise DeviceMismatchError(
                f"{transport.name}: register map hash 0x{dev_hash:08x} differs from the driver's "
                f"0x{regmap.REGMAP_HASH:08x}: the gateware and the host library come from different "
                f"sources; rebuild the bitstream or install the matching evssd")
        values = {}
        for reg in regmap.REGISTERS:
            if reg.param and reg.param not in ("regmap_hash", "build_id"):
                values[reg.param] = await transport.read32(reg.addr)
        params = Params(**values)
        if expect is not None and expect != params:
            raise DeviceMismatchError(f"{transport.name}: device built with {params}, expected {expect}")
        build = await transport.read32(_reg("ID_BUILD"))
        if build != params.build_id:
            raise DeviceMismatchError(f"{transport.name}: build id 0x{build:08x} does not match its "
                                      f"parameters (0x{params.build_id:08x})")
        dev = cls(transport, params, sq_entries=sq_entries, cq_entries=cq_entries, timeout=timeout)
        await dev._setup_queues()
        return dev

    async def _setup_queues(self):
        t = self.transport
        status = await t.read32(_reg("STATUS"))
        if status & 1:
            raise RuntimeError(f"{t.name}: device busy at open (STATUS=0x{status:08x}); reset it first")
        await t.write32(_reg("CTRL"), 0)
        self._sq_addr = t.alloc(self.sq_entries * COMMAND_BYTES)
        self._cq_addr = t.alloc(self.cq_entries * COMPLETION_BYTES)
        await t.mem_write(self._cq_addr, bytes(self.cq_entries * COMPLETION_BYTES))
        await t.write32(_reg("SQ_BASE_LO"), self._sq_addr & 0xFFFF_FFFF)
        await t.write32(_reg("SQ_BASE_HI"), self._sq_addr >> 32)
        await t.write32(_reg("SQ_SIZE"), self.sq_entries)
        await t.write32(_reg("CQ_BASE_LO"), self._cq_addr & 0xFFFF_FFFF)
        await t.write32(_reg("CQ_BASE_HI"), self._cq_addr >> 32)
        await t.write32(_reg("CQ_SIZE"), self.cq_entries)
        await t.write32(_reg("CTRL_TRIGGER"), 1 << regmap.register("CTRL_TRIGGER").field("reset_queues").lsb)
        self._ctrl = (1 << regmap.register("CTRL").field("enable").lsb) | \
                     (1 << regmap.register("CTRL").field("irq_enable").lsb)
        await t.write32(_reg("CTRL"), self._ctrl)

    async def close(self):
        """Disable the device and close the link; later calls raise :class:`DeviceClosedError`."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.transport.write32(_reg("CTRL"), 0)
        finally:
            await self.transport.close()

    async def read32(self, addr: int) -> int:
        """Raw MMIO read (expert use: registers are named in :mod:`evssd.hw.regmap`)."""
        self._live()
        addr = _check_int("addr", addr, 0, 0xFFFF_FFFF)
        if addr % 4:
            raise ValueError(f"addr=0x{addr:x} is not 32-bit aligned")
        return await self.transport.read32(addr)

    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        """Raw MMIO write (expert use)."""
        self._live()
        addr = _check_int("addr", addr, 0, 0xFFFF_FFFF)
        if addr % 4:
            raise ValueError(f"addr=0x{addr:x} is not 32-bit aligned")
        value = _check_int("value", value, 0, 0xFFFF_FFFF)
        strb = _check_int("strb", strb, 0, 0xF)
        await self.transport.write32(addr, value, strb)

    # ------------------------------------------------------------------ configuration
    async def set_timing(self, t_r: int | None = None, t_prog: int | None = None):
        self._live()
        if t_r is not None:
            t_r = _check_int("t_r (cycles)", t_r, 0, (1 << 24) - 1)
        if t_prog is not None:
            t_prog = _check_int("t_prog (cycles)", t_prog, 0, (1 << 24) - 1)
        if t_r is not None:
            await self.transport.write32(_reg("T_R"), t_r)
        if t_prog is not None:
            await self.transport.write32(_reg("T_PROG"), t_prog)

    async def set_block_mode(self, on: bool):
        self._live()
        if not isinstance(on, (bool, np.bool_, int, np.integer)) or on not in (0, 1):
            raise TypeError(f"set_block_mode: on must be True or False, got {on!r}")
        bit = 1 << regmap.register("CTRL").field("block_mode").lsb
        self._ctrl = (self._ctrl | bit) if on else (self._ctrl & ~bit)
        await self.transport.write32(_reg("CTRL"), self._ctrl)

    async def configure_table(self, table: int, row_bytes: int, elem, extents, enable: bool = True):
        """Write a table slot: row size, element type and up to ``max_extents`` extents
        ``(first_index, n_rows, start_lba)``; unused extents are cleared."""
        self._live()
        p = self.params
        elem = elem_type(elem)
        if isinstance(table, (int, np.integer)) and not isinstance(table, bool) and \
                not 0 <= table < p.max_tables:
            raise ValueError(f"table {table} out of range 0..{p.max_tables - 1}")
        table = _check_int("table", table, 0, p.max_tables - 1)
        row_bytes = _check_int(f"table {table}: row_bytes", row_bytes, 0, 1 << 32)
        if not isinstance(enable, (bool, np.bool_, int, np.integer)) or enable not in (0, 1):
            raise TypeError(f"table {table}: enable must be True or False, got {enable!r}")
        if row_bytes % 4 or not 4 <= row_bytes <= min(p.page_size, p.max_row_bytes):
            raise ValueError(f"table {table}: row_bytes={row_bytes} must be a multiple of 4 in "
                             f"4..{min(p.page_size, p.max_row_bytes)}")
        if row_bytes % elem.itemsize:
            raise ValueError(f"table {table}: row_bytes={row_bytes} is not a whole number of {elem.name} elements")
        if elem is ElemType.INT8_ROWWISE and not await self.supports("int8_rowwise"):
            raise DeviceCapabilityError(f"table {table}: {self.transport.name} does not pool INT8_ROWWISE "
                                        f"tables (CAPS.int8_rowwise = 0); pool them on the host")
        try:
            extents = list(extents)
        except TypeError:
            raise TypeError(f"table {table}: extents must be a list of (first_index, n_rows, "
                            f"start_lba), got {type(extents).__name__}") from None
        for k, e in enumerate(extents):
            if not isinstance(e, (tuple, list, np.ndarray)) or len(e) != 3:
                raise ValueError(f"table {table} extent {k}: {e!r} is not (first_index, n_rows, start_lba)")
            extents[k] = tuple(_check_int(f"table {table} extent {k} {what}", v, 0, 0xFFFF_FFFF)
                               for what, v in zip(("first_index", "n_rows", "start_lba"), e))
        if len(extents) > p.max_extents:
            raise ValueError(f"table {table}: {len(extents)} extents, the device holds {p.max_extents}")
        rows_per_page = p.page_size // row_bytes
        spans = []
        for k, (first, n_rows, lba) in enumerate(extents):
            if first < 0 or n_rows < 0 or lba < 0 or first + n_rows > 1 << 32:
                raise ValueError(f"table {table} extent {k}: ({first}, {n_rows}, {lba}) out of range")
            pages = -(-n_rows // rows_per_page)
            if lba + pages > p.total_pages:
                raise ValueError(f"table {table} extent {k}: pages {lba}..{lba + pages - 1} beyond the "
                                 f"flash ({p.total_pages} pages)")
            spans.append((first, first + n_rows))
        spans.sort()
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 < a1 and a1 > a0 and b1 > b0:
                raise ValueError(f"table {table}: extents [{a0}, {a1}) and [{b0}, {b1}) overlap")
        t = self.transport
        magic = regmap.div_magic(rows_per_page)
        sel = regmap.register("TBL_SEL")
        cfg = regmap.register("TBL_CFG")
        word = cfg.field("row_bytes").insert(0, row_bytes)
        word = cfg.field("elem").insert(word, int(elem))
        word = cfg.field("enable").insert(word, int(bool(enable)))
        shift_reg = regmap.register("TBL_DIV_SHIFT")
        shift_word = shift_reg.field("shift").insert(0, magic.shift)
        shift_word = shift_reg.field("magic_hi").insert(shift_word, magic.magic >> 32)
        commit = regmap.register("TBL_COMMIT")
        # Disable first so no lookup sees half-written extents.
        await t.write32(sel.addr, sel.field("table").insert(0, table))
        await t.write32(cfg.addr, 0)
        await t.write32(commit.addr, 1 << commit.field("table").lsb)
        for k in range(p.max_extents):
            first, n_rows, lba = extents[k] if k < len(extents) else (0, 0, 0)
            await t.write32(sel.addr, sel.field("extent").insert(sel.field("table").insert(0, table), k))
            await t.write32(_reg("EXT_FIRST"), first)
            await t.write32(_reg("EXT_ROWS"), n_rows)
            await t.write32(_reg("EXT_LBA"), lba)
            await t.write32(commit.addr, 1 << commit.field("extent").lsb)
        await t.write32(_reg("TBL_ROWS_PER_PAGE"), rows_per_page)
        await t.write32(_reg("TBL_DIV_MAGIC"), magic.magic & 0xFFFF_FFFF)
        await t.write32(shift_reg.addr, shift_word)
        await t.write32(cfg.addr, word)
        await t.write32(commit.addr, 1 << commit.field("table").lsb)
        self.tables[table] = TableConfig(table, row_bytes, elem, extents, enable)

    def _table(self, table: int) -> TableConfig:
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(f"table {table} is not configured on this device "
                           f"(configured: {sorted(self.tables)})") from None

    # ------------------------------------------------------------------ commands
    async def submit(self, command: Command, buffers=()) -> CommandHandle:
        """Place ``command`` in the submission ring and ring the doorbell; the handle owns
        ``buffers`` (host-memory addresses) from then on and frees them when it is finished.

        All or nothing: if this raises, the command is not in flight and the caller still owns
        ``buffers``, except when the doorbell write itself failed without a clear answer (a link
        error): then the device may have seen the command, so it stays in flight, abandoned, and
        its buffers are freed when its completion arrives.
        """
        return (await self._submit_entries([(command, list(buffers))]))[0]

    async def _submit_entries(self, entries: list[tuple[Command, list[int]]]) -> list[CommandHandle]:
        """:meth:`submit` for several commands at once: every entry goes into the ring, then one
        doorbell write hands them all to the device (a multi-table batch costs one MMIO write,
        not one per table). Same all-or-nothing contract as :meth:`submit`, for the whole list;
        ``len(entries)`` must be below ``sq_entries``."""
        self._live()
        if self._submitting:
            raise RuntimeError(f"{self.transport.name}: submit() entered while another submission is "
                               f"under way: drive one AsyncDevice from one task at a time (Device "
                               f"does this for threads)")
        self._submitting = True
        try:
            return await self._submit(entries)
        finally:
            self._submitting = False

    async def _submit(self, entries) -> list[CommandHandle]:
        k = len(entries)
        if not 1 <= k < self.sq_entries:
            raise ValueError(f"{k} commands at once: the submission ring takes 1..{self.sq_entries - 1}")
        deadline = time.monotonic() + self.timeout
        while len(self._inflight) + k > self.sq_entries - 1:
            if not await self._reap():
                if time.monotonic() > deadline:
                    raise DeviceTimeoutError(f"{self.transport.name}: submission ring full "
                                             f"({len(self._inflight)} commands in flight) for "
                                             f"{self.timeout} s")
                await self.transport.wait()
        handles, packed = [], []
        cid = self._next_cid
        for command, buffers in entries:
            while cid in self._inflight or cid in self._done or any(h.cid == cid for h in handles):
                cid = (cid + 1) & 0xFFFF
            command.cid = cid
            packed.append(command.pack())
            handles.append(CommandHandle(cid, command, buffers))
            cid = (cid + 1) & 0xFFFF
        slot = self._sq_tail
        # the entries, in one write per contiguous run of ring slots (two when they wrap)
        first = min(k, self.sq_entries - slot)
        await self.transport.mem_write(self._sq_addr + slot * COMMAND_BYTES, b"".join(packed[:first]))
        if first < k:
            await self.transport.mem_write(self._sq_addr, b"".join(packed[first:]))
        self._next_cid = cid
        for handle in handles:
            self._inflight[handle.cid] = handle
        self._sq_tail = (slot + k) % self.sq_entries
        try:
            await self.transport.write32(_reg("SQ_TAIL"), self._sq_tail)
        except MMIOError:  # refused: the device did not take the new tail
            for handle in handles:
                self._inflight.pop(handle.cid)
            self._sq_tail = slot
            raise
        except BaseException:
            for handle in handles:
                handle.abandoned = True
            raise
        return handles

    async def submit_raw(self, command: Command, buffers=()) -> Completion:
        """Testing/expert API: submit ``command`` exactly as given (any opcode, table, sizes,
        addresses; ``cid`` is assigned by the driver), wait for its completion and return it
        without checking its status. Fields are checked only against their encoded widths.

        ``buffers`` (host-memory addresses the command uses) stay the caller's when a
        completion comes back; if it does not (timeout, link error), the driver takes them and
        frees them when the completion arrives, so the caller must not free them then."""
        self._live()
        for name, bits in (("opcode", 8), ("table", 8), ("count", 32), ("n_bags", 32), ("lba", 32),
                           ("src_addr", 64), ("offsets_addr", 64), ("dst_addr", 64), ("dst_bytes", 32)):
            _check_int(f"command.{name}", getattr(command, name), 0, (1 << bits) - 1)
        return await self._run(command, buffers)

    async def _reap(self) -> int:
        """Move every posted completion to ``_done``; one CQ-head doorbell for the lot.
        Completions of abandoned commands free their buffers here.

        The head entry is read alone (an idle poll over a slow link reads 16 bytes); once it is
        posted, the entries that may follow (one per command still in flight, up to the ring's
        end) are read in one go."""
        if self._reaping:
            return 0
        self._reaping = True
        try:
            n = 0
            want = 1
            while want:
                raw = await self.transport.mem_read(self._cq_addr + self._cq_head * COMPLETION_BYTES,
                                                    want * COMPLETION_BYTES)
                got = 0
                for off in range(0, want * COMPLETION_BYTES, COMPLETION_BYTES):
                    cpl = Completion.unpack(raw[off:off + COMPLETION_BYTES])
                    if cpl.phase != self._phase:
                        break
                    handle = self._inflight.pop(cpl.cid, None)
                    if handle is None:
                        raise RuntimeError(f"{self.transport.name}: completion for unknown cid {cpl.cid}: {cpl}")
                    handle.completion = cpl
                    if handle.abandoned:
                        self._free(handle.buffers)
                    else:
                        self._done[cpl.cid] = handle
                    self._cq_head += 1
                    if self._cq_head == self.cq_entries:
                        self._cq_head = 0
                        self._phase ^= 1
                    got += 1
                n += got
                want = min(len(self._inflight), self.cq_entries - self._cq_head) if got == want else 0
            if n:
                await self.transport.write32(_reg("CQ_HEAD"), self._cq_head)
            return n
        finally:
            self._reaping = False

    async def _reap_or_wait(self):
        if not await self._reap():
            await self.transport.wait()

    async def wait_for(self, handle: CommandHandle) -> Completion:
        """Wait (at most ``timeout`` seconds) for ``handle``'s completion and return it."""
        self._check_handle(handle)
        return await self._wait(handle)

    async def _wait(self, handle: CommandHandle) -> Completion:
        """:meth:`wait_for` of a handle known to be this device's."""
        if handle.cid in self._done:   # reaped already (e.g. with an earlier command of its batch)
            return self._done.pop(handle.cid).completion
        deadline = time.monotonic() + self.timeout
        while handle.cid not in self._done:
            if handle.abandoned:
                raise RuntimeError(f"{self.transport.name}: command cid {handle.cid} was abandoned")
            if await self._reap():
                continue
            if time.monotonic() > deadline:
                raise DeviceTimeoutError(f"{self.transport.name}: command cid {handle.cid} "
                                         f"({_op_name(handle.command.opcode)}) not completed after "
                                         f"{self.timeout} s")
            await self.transport.wait()
        self._done.pop(handle.cid)
        return handle.completion

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, CommandHandle):
            raise TypeError(f"expected a CommandHandle from submit*, got {type(handle).__name__}")
        if self._inflight.get(handle.cid) is not handle and self._done.get(handle.cid) is not handle:
            raise ValueError(f"{self.transport.name}: command cid {handle.cid} is not in flight on this "
                             f"device (finished already, or submitted to another device)")

    def _abandon(self, handle: CommandHandle):
        """Give up waiting for ``handle``: its buffers stay allocated while the device may still
        write them, and are freed when its completion is reaped (or now, if it already was)."""
        if handle.abandoned:
            return
        if self._done.pop(handle.cid, None) is not None or (handle.completion is not None and
                                                             handle.cid not in self._inflight):
            self._free(handle.buffers)
            handle.buffers = []
        handle.abandoned = True

    def _free_one(self, addr) -> None:
        """Free one buffer of a command: an address, or its share of a :class:`_SharedBuffer`
        (the buffer itself is freed by the last)."""
        if type(addr) is _SharedBuffer:
            addr.users -= 1
            if addr.users:
                return
            addr = addr.addr
        self.transport.free(addr)

    def _free(self, buffers: list):
        for addr in buffers:
            self._free_one(addr)
        buffers.clear()

    def _release(self, buffers):
        """Free ``buffers`` after a failed submission, except those an abandoned command holds
        (the device may still use them; they are freed with its completion). A shared buffer
        only loses this command's share: it outlives every abandoned command that uses it."""
        held = {a for h in self._inflight.values() if h.abandoned for a in h.buffers}
        for addr in buffers:
            if type(addr) is _SharedBuffer or addr not in held:
                self._free_one(addr)

    async def _run(self, command: Command, buffers=()) -> Completion:
        """Submit one command and wait for it. ``buffers`` stay the caller's when it completes;
        on any failure the driver takes them (freed now, or with a late completion)."""
        try:
            handle = await self.submit(command, buffers)
        except BaseException:
            self._release(buffers)
            raise
        try:
            cpl = await self.wait_for(handle)
        except BaseException:
            self._abandon(handle)
            raise
        handle.buffers = []
        return cpl

    async def _put(self, data: bytes) -> int:
        addr = self.transport.alloc(max(len(data), 1))
        try:
            await self.transport.mem_write(addr, data)
        except BaseException:
            self.transport.free(addr)
            raise
        return addr

    # ------------------------------------------------------------------ high-level operations
    async def nop(self) -> Completion:
        self._live()
        cmd = Command(opcode=Opcode.NOP)
        cpl = await self._run(cmd)
        self._check(cpl, cmd)
        return cpl

    async def program_pages(self, lba: int, data) -> None:
        """Write whole pages starting at ``lba`` (PROGRAM_PAGES). ``data``: any array whose
        bytes are a whole number of pages."""
        self._live()
        lba = _check_int("lba", lba, 0, self.params.total_pages - 1)
        arr = np.asarray(data)
        if arr.dtype.hasobject:
            raise TypeError(f"program_pages: data must be a numeric array, got dtype {arr.dtype}")
        buf = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        ps = self.params.page_size
        if buf.size == 0 or buf.size % ps:
            raise ValueError(f"program_pages: data is {buf.size} bytes, not a whole number of "
                             f"{ps}-byte pages")
        n_pages = buf.size // ps
        if lba + n_pages > self.params.total_pages:
            raise ValueError(f"program_pages: pages {lba}..{lba + n_pages - 1} beyond the flash "
                             f"({self.params.total_pages} pages)")
        # Chunk so one buffer stays small in host memory windows (e.g. a board's BRAM).
        chunk = max(1, min(n_pages, self._chunk_pages()))
        for start in range(0, n_pages, chunk):
            n = min(chunk, n_pages - start)
            src = await self._put(buf[start * ps:(start + n) * ps].tobytes())
            cmd = Command(opcode=Opcode.PROGRAM_PAGES, count=n, lba=lba + start, src_addr=src)
            cpl = await self._run(cmd, [src])  # on failure the driver has taken src
            self.transport.free(src)
            self._check(cpl, cmd)

    def _chunk_pages(self) -> int:
        return max(1, (self.transport.memory.size // 4) // self.params.page_size)

    async def read_pages(self, lba: int, n_pages: int) -> np.ndarray:
        """Raw pages (READ_PAGES) as a uint8 array ``[n_pages, page_size]``."""
        self._live()
        total = self.params.total_pages
        lba = _check_int("lba", lba, 0, total - 1)
        n_pages = _check_int("n_pages", n_pages, 0, total - lba)
        ps = self.params.page_size
        out = np.empty((n_pages, ps), dtype=np.uint8)
        chunk = self._chunk_pages()
        for start in range(0, n_pages, chunk):
            n = min(chunk, n_pages - start)
            dst = self.transport.alloc(n * ps)
            cmd = Command(opcode=Opcode.READ_PAGES, count=n, lba=lba + start, dst_addr=dst,
                          dst_bytes=n * ps)
            cpl = await self._run(cmd, [dst])  # on failure the driver has taken dst
            try:
                self._check(cpl, cmd)
                out[start:start + n] = np.frombuffer(await self.transport.mem_read(dst, n * ps),
                                                     dtype=np.uint8).reshape(n, ps)
            finally:
                self.transport.free(dst)
        return out

    @staticmethod
    def _indices(indices, name: str = "indices") -> np.ndarray:
        arr = _int_array(name, indices)
        # every value is in 0..2**32-1 exactly when the OR of all of them is (one pass)
        if arr.size and (arr.dtype.kind == "i" or arr.dtype.itemsize > 4) \
                and int(np.bitwise_or.reduce(arr)) >> 32:
            bad = int(np.flatnonzero((arr < 0) | (arr > 0xFFFF_FFFF))[0])
            raise IndexError(f"{name}: index {arr[bad]} at position {bad} does not fit the device's "
                             f"32-bit indices (0..2**32-1)")
        return arr.astype("<u4", copy=False)  # staging copies the bytes (tobytes)

    @staticmethod
    def _offsets(offsets, n_indices: int) -> np.ndarray:
        off = _int_array("offsets", offsets)
        if off.size < 1:
            raise ValueError("offsets must have B+1 >= 1 entries (FBGEMM layout), got none")
        if off.size - 1 > 0xFFFF_FFFF:
            raise ValueError(f"offsets: {off.size - 1} bags do not fit the device's 32-bit count")
        if off[0] < 0:
            raise ValueError(f"offsets[0]={off[0]} is negative")
        down = off[1:] < off[:-1]
        if down.any():  # with offsets[0] >= 0 this also rules out negatives
            k = int(np.flatnonzero(down)[0])
            raise ValueError(f"offsets must be non-decreasing: offsets[{k + 1}]={off[k + 1]} < "
                             f"offsets[{k}]={off[k]}")
        if off[-1] > n_indices:
            raise ValueError(f"offsets[-1]={off[-1]} is past the {n_indices} indices")
        return off.astype("<u4")

    def _gather_table(self, table) -> TableConfig:
        table = _check_int("table", table, 0, self.params.max_tables - 1)
        return self._table(table)

    async def _stage(self, make_command, parts: list[bytes], shape: tuple[int, int],
                     out: np.ndarray | None = None) -> _Staged:
        """Allocate and fill one command's input buffers and give the device a destination for
        the ``shape`` (rows, row bytes) result (:meth:`_stage_batch` of one command): the
        result array itself (``out``, else a new one) where the transport can map it
        (:meth:`Transport.map_buffer`), else a host-memory buffer that :meth:`finish` copies
        into the result array (``out``, else one it makes then). On failure nothing stays
        allocated."""
        return (await self._stage_batch([(make_command, parts, shape, out)]))[0]

    async def _stage_batch(self, items) -> list[_Staged]:
        """:meth:`_stage` for the commands of one submission, ``items`` a list of
        ``(make_command, parts, shape, out)``: every input part of every command in one
        host-memory buffer, side by side on :data:`~evssd.hw.regmap.BUFFER_ALIGN` boundaries,
        and every result the driver makes in one array (each command's result a view of it,
        mapped once, else one host-memory buffer), both shared by the commands
        (:class:`_SharedBuffer`): two allocations and two frees for the batch instead of two
        per command. A command with the caller's ``out`` gets that array mapped (else a
        host-memory buffer :meth:`finish` copies into it), an empty result a one-byte
        buffer. On failure everything allocated is freed."""
        chunks, in_offs, total = [], [], 0
        for _, parts, _, _ in items:
            offs = []
            for data in parts:
                offs.append(total)
                size = _aligned(max(len(data), 1))
                chunks.append(data)
                if size > len(data):
                    chunks.append(bytes(size - len(data)))
                total += size
            in_offs.append(offs)
        res_offs, res_total = [], 0
        for _, _, shape, out in items:
            nbytes = shape[0] * shape[1]
            res_offs.append(res_total if out is None and nbytes else None)
            if out is None and nbytes:
                res_total += _aligned(nbytes)
        shared_in = shared_out = None
        results, mapped_all, own = None, False, []
        try:
            shared_in = _SharedBuffer(await self._put(b"".join(chunks)), len(items))
            if res_total:
                results = empty_rows((res_total,), np.uint8)
                addr = self.transport.map_buffer(results)
                mapped_all = addr is not None
                if not mapped_all:
                    results = None
                    addr = self.transport.alloc(res_total)
                shared_out = _SharedBuffer(addr, sum(o is not None for o in res_offs))
            staged = []
            for (make_command, _, shape, out), offs, r_off in zip(items, in_offs, res_offs):
                inputs = [shared_in.addr + o for o in offs]
                if r_off is not None:
                    view = None if results is None else \
                        results[r_off:r_off + shape[0] * shape[1]].reshape(shape)
                    command = make_command(*inputs, shared_out.addr + r_off)
                    staged.append(_Staged(command, [shared_in, shared_out], shape, view, mapped_all))
                    continue
                dst = self.transport.map_buffer(out) if out is not None and out.size else None
                addr = dst if dst is not None else self.transport.alloc(max(shape[0] * shape[1], 1))
                own.append(addr)
                staged.append(_Staged(make_command(*inputs, addr), [shared_in, addr], shape, out,
                                      dst is not None))
        except BaseException:
            for addr in own:
                self.transport.free(addr)
            for shared in (shared_in, shared_out):
                if shared is not None:
                    self.transport.free(shared.addr)
            raise
        return staged

    async def _submit_staged(self, staged: list[_Staged]) -> list[CommandHandle]:
        """Submit staged commands with one doorbell; on failure free the buffers of those that
        are not in flight (all or nothing, as :meth:`submit`)."""
        try:
            handles = await self._submit_entries([(s.command, s.buffers) for s in staged])
        except BaseException:
            for s in staged:
                self._release(s.buffers)
            raise
        for h, s in zip(handles, staged):
            h.result_shape, h.result, h.mapped = s.shape, s.result, s.mapped
        return handles

    def _gather_out(self, name: str, out, shape: tuple[int, int]) -> np.ndarray | None:
        """``out`` checked as the destination of a ``shape`` result (None: the driver makes one)."""
        if out is None:
            return None
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != shape \
                or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"{name} must be a writeable C-contiguous uint8 array of shape {shape}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        return out

    def _gather_command(self, cfg: TableConfig, idx: np.ndarray):
        n = idx.size
        out_bytes = n * cfg.row_bytes
        return (lambda src, dst: Command(opcode=Opcode.GATHER, table=cfg.table, count=n, src_addr=src,
                                         dst_addr=dst, dst_bytes=out_bytes),
                [idx.tobytes()], (n, cfg.row_bytes))

    def _pooled_command(self, cfg: TableConfig, idx: np.ndarray, off: np.ndarray):
        n_bags = off.size - 1
        out_bytes = n_bags * cfg.pooled_row_bytes
        return (lambda src, offs, dst: Command(opcode=Opcode.GATHER_POOLED, table=cfg.table, count=idx.size,
                                               n_bags=n_bags, src_addr=src, offsets_addr=offs,
                                               dst_addr=dst, dst_bytes=out_bytes),
                [idx.tobytes(), off.tobytes()], (n_bags, cfg.pooled_row_bytes))

    async def submit_gather(self, table: int, indices, out: np.ndarray | None = None) -> CommandHandle:
        """Start a GATHER (the caller must :meth:`finish` the handle). ``out``: a C-contiguous
        ``uint8[len(indices), row_bytes]`` array to receive the rows (the device writes it
        directly where the transport maps it; do not touch it before :meth:`finish` returns,
        nor after a failed finish, until the abandoned command completes)."""
        self._live()
        cfg = self._gather_table(table)
        idx = self._indices(indices)
        make, parts, shape = self._gather_command(cfg, idx)
        staged = await self._stage(make, parts, shape, self._gather_out("out", out, shape))
        return (await self._submit_staged([staged]))[0]

    async def supports(self, capability: str) -> bool:
        """Whether the device pools ``"int8_rowwise"`` tables / ``"weighted"`` bags (its CAPS
        register, read once)."""
        if self._caps is None:
            self._caps = await self.transport.read32(_reg("CAPS"))
        return bool(regmap.register("CAPS").field(capability).extract(self._caps))

    async def submit_gather_pooled(self, table: int, indices, offsets, weights=None) -> CommandHandle:
        """Start a GATHER_POOLED, or with ``weights`` (one float per index: TorchRec's weighted
        KJT, FBGEMM's ``per_sample_weights``) a GATHER_POOLED_WEIGHTED whose sums are fp32 for
        every element type (the caller must :meth:`finish` the handle)."""
        self._live()
        cfg = self._gather_table(table)
        idx = self._indices(indices)
        off = self._offsets(offsets, idx.size)
        n_bags = off.size - 1
        out_bytes = n_bags * cfg.pooled_row_bytes
        if weights is None:
            staged = await self._stage(*self._pooled_command(cfg, idx, off))
        else:
            from evssd.host.pooling import PoolingError, check_weights
            try:
                w = check_weights(weights, idx.size, "weights")
            except PoolingError as exc:
                raise ValueError(str(exc)) from None
            if not await self.supports("weighted"):
                raise DeviceCapabilityError(f"{self.transport.name} does not pool weighted bags "
                                            f"(CAPS.weighted = 0); pool them on the host")
            staged = await self._stage(
                lambda src, offs, wts, dst: Command(
                    opcode=Opcode.GATHER_POOLED_WEIGHTED, table=cfg.table, count=idx.size, n_bags=n_bags,
                    src_addr=src, offsets_addr=offs, weights_addr=wts, dst_addr=dst, dst_bytes=out_bytes),
                [idx.tobytes(), off.tobytes(), w.astype("<f4").tobytes()], (n_bags, cfg.pooled_row_bytes))
        return (await self._submit_staged([staged]))[0]

    async def finish(self, handle: CommandHandle) -> np.ndarray:
        """Wait for a gather command, return its rows (raw bytes, one row per line), free buffers.

        If waiting fails (timeout, link error, cancellation) the command is abandoned: its
        buffers are freed when the device completes it, never while it may still write them."""
        if not isinstance(handle, CommandHandle) or handle.result_shape is None:
            raise TypeError(f"finish takes the handle of submit_gather/submit_gather_pooled, got "
                            f"{handle!r}")
        self._check_handle(handle)
        cmd = handle.command
        try:
            cpl = await self._wait(handle)
        except BaseException:
            self._abandon(handle)
            raise
        try:
            result = handle.result
            if not handle.mapped:
                # One copy out of host memory (whose buffer is freed below and reused by the
                # next command), straight into the caller's array.
                if result is None:
                    result = empty_rows(handle.result_shape, np.uint8)
                if result.size:
                    await self.transport.mem_readinto(cmd.dst_addr, result)
            # else the device wrote it in place; the mapping ends below, before the caller has it
            self._check(cpl, cmd, result)
            return result
        finally:
            self._free(handle.buffers)
            handle.result = None

    async def finish_all(self, handles) -> list[np.ndarray]:
        """Finish every handle (even after one fails, so nothing stays in flight) and return
        their results in order; the first error is raised after all are finished."""
        out, error = [], None
        for h in handles:
            try:
                out.append(await self.finish(h))
            except BaseException as exc:
                error = error or exc
                out.append(None)
        if error is not None:
            raise error
        return out

    async def gather_many(self, requests, out=None) -> list[np.ndarray]:
        """Several gathers overlapped on the device: ``requests`` is a list of
        ``(table, indices)`` (GATHER) or ``(table, indices, offsets)`` (GATHER_POOLED).
        ``out``: None, or one entry per request: None or the array to receive that GATHER's
        rows (as ``submit_gather``'s ``out``).

        All or nothing: every request is validated and staged before the first is submitted;
        up to ``sq_entries - 1`` commands go to the device with one doorbell write, more in
        turns, and if a submission fails, the ones already submitted are finished (their
        buffers freed) before the error is raised."""
        self._live()
        if out is not None and (not isinstance(out, (list, tuple)) or len(out) != len(requests)):
            raise ValueError(f"out must be None or a list of {len(requests)} entries (one per request)")
        checked = []
        for k, req in enumerate(requests):
            if not isinstance(req, (tuple, list)) or len(req) not in (2, 3):
                raise ValueError(f"requests[{k}] must be (table, indices) or (table, indices, offsets)")
            cfg = self._gather_table(req[0])
            idx = self._indices(req[1], f"requests[{k}] indices")
            if len(req) == 3:
                if out is not None and out[k] is not None:
                    raise ValueError(f"out[{k}]: a GATHER_POOLED request takes no out array")
                make = self._pooled_command(cfg, idx, self._offsets(req[2], idx.size))
                checked.append((make, None))
            else:
                make = self._gather_command(cfg, idx)
                checked.append((make, self._gather_out(f"out[{k}]", None if out is None else out[k], make[2])))
        handles = []
        try:
            per_doorbell = self.sq_entries - 1
            for start in range(0, len(checked), per_doorbell):
                staged = await self._stage_batch([(*make, dst) for make, dst in
                                                  checked[start:start + per_doorbell]])
                handles += await self._submit_staged(staged)
        except BaseException:
            try:
                await self.finish_all(handles)
            except Exception:
                pass
            raise
        return await self.finish_all(handles)

    async def gather(self, table: int, indices) -> np.ndarray:
        """One row per index, in request order, as raw bytes ``uint8[n, row_bytes]``."""
        return await self.finish(await self.submit_gather(table, indices))

    async def gather_pooled(self, table: int, indices, offsets, weights=None) -> np.ndarray:
        """One summed row per bag (FBGEMM indices + offsets[B+1]) as raw bytes ``uint8[B, 4*dim]``
        (int32 sums for int8/int32 tables, fp32 sums for fp16/fp32/int8_rowwise tables and for
        every weighted bag; the arithmetic is :mod:`evssd.host.pooling`'s)."""
        return await self.finish(await self.submit_gather_pooled(table, indices, offsets, weights))

    def view(self, table: int, raw: np.ndarray, pooled: bool = False) -> np.ndarray:
        """Interpret raw result bytes as elements of the table's (pooled) type."""
        cfg = self._table(table)
        dtype = cfg.elem.pooled_dtype if pooled else cfg.elem.numpy_dtype
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
            raise TypeError(f"view: raw must be the uint8[n, row_bytes] array a gather returned, "
                            f"got {getattr(raw, 'dtype', type(raw).__name__)} "
                            f"shape {getattr(raw, 'shape', None)}")
        return np.ascontiguousarray(raw).view(np.dtype(dtype))

    @staticmethod
    def _check(cpl: Completion, cmd: Command, result=None):
        if cpl.status != Status.OK:
            raise DeviceError(cpl.status, cpl, cmd, result)

    # ------------------------------------------------------------------ counters
    async def counters(self) -> dict:
        self._live()
        t = self.transport
        out = {}
        for name in ("CNT_COMMANDS", "CNT_LOOKUPS", "CNT_ERRORS", "CNT_BUSY_CYCLES"):
            out[name[4:].lower()] = await t.read32(_reg(name))
        while True:
            hi = await t.read32(_reg("CNT_CYCLES_HI"))
            lo = await t.read32(_reg("CNT_CYCLES_LO"))
            if await t.read32(_reg("CNT_CYCLES_HI")) == hi:
                break
        out["cycles"] = (hi << 32) | lo
        channels = []
        for c in range(self.params.n_channels):
            ch = {}
            for name in ("CH_ROWS", "CH_BYTES", "CH_TR_WAITS", "CH_BUSY_CYCLES", "CH_PROGRAMS"):
                ch[name[3:].lower()] = await t.read32(regmap.channel_addr(name, c))
            channels.append(ch)
        out["channels"] = channels
        return out

    async def clear_counters(self):
        self._live()
        await self.transport.write32(_reg("CTRL_TRIGGER"),
                                     1 << regmap.register("CTRL_TRIGGER").field("clear_counters").lsb)


class Device:
    """Synchronous facade over :class:`AsyncDevice` for scripts and threaded servers.

    The facade owns a private event loop. :meth:`run` runs one coroutine of :attr:`aio` on it to
    completion; a lock serialises callers, so one ``Device`` may be shared by several threads
    (their calls take turns, each completes whole). A lock rather than a loop thread: the loop
    runs in the calling thread, so a call costs no thread hand-over (measured in
    docs/reliability.md). After :meth:`close` every call raises :class:`DeviceClosedError`.
    """

    def __init__(self, aio: AsyncDevice, loop: asyncio.AbstractEventLoop, inline: bool = False):
        self.aio, self._loop = aio, loop
        self._lock = threading.Lock()
        self._runner: int | None = None  # ident of the thread inside run_until_complete
        #: run coroutines' steps in the caller without the loop's task machinery (see
        #: :meth:`_run_inline`); for the model opened by name, whose calls never suspend
        self._inline = inline

    @classmethod
    def open(cls, backend: str | Transport = "model", *, sq_entries: int = 64, cq_entries: int = 64,
             timeout: float = 60.0, expect: Params | None = None, **transport_args) -> "Device":
        """Open a device: ``backend`` is a name (``model``, ``uart``; see
        :mod:`evssd.host.backends`) or a :class:`Transport`."""
        if isinstance(backend, Transport):
            if transport_args:
                raise TypeError(f"transport arguments {sorted(transport_args)} given with a ready "
                                f"transport; pass them to its constructor")
            transport = backend
        else:
            transport = open_transport(backend, **transport_args)
        loop = asyncio.new_event_loop()
        try:
            aio = cls._run_on(loop, AsyncDevice.open(transport, sq_entries=sq_entries,
                                                     cq_entries=cq_entries, timeout=timeout,
                                                     expect=expect))
        except BaseException:
            try:
                loop.run_until_complete(transport.close())
            finally:
                loop.close()
            raise
        return cls(aio, loop, inline=backend == "model")

    @property
    def closed(self) -> bool:
        return self.aio.closed

    def run(self, coro):
        """Run ``coro`` (a coroutine of :attr:`aio`, e.g. ``dev.aio.gather(...)`` or one that
        awaits several of them) to completion and return its result.

        Thread-safe: calls from several threads take turns. From a thread that runs an asyncio
        loop of its own, the call blocks that thread and runs on a helper thread. From inside a
        coroutine running on this device it is refused (await the coroutine instead).
        """
        if type(coro) is not _COROUTINE and not asyncio.iscoroutine(coro):
            raise TypeError(f"Device.run takes a coroutine, got {type(coro).__name__}")
        me = threading.get_ident()
        if self._runner == me:
            coro.close()
            raise RuntimeError("Device.run called from a coroutine already running on this device: "
                               "await the coroutine instead")
        if _running_loop() is not None:
            return self._run_in_helper_thread(coro)
        with self._lock:
            if self.aio.closed:
                coro.close()
                raise DeviceClosedError(f"{self.aio.transport.name}: the device is closed")
            self._runner = me
            try:
                return self._run_inline(coro) if self._inline else self._run_on(self._loop, coro)
            finally:
                self._runner = None

    # The store used this name before ``run`` was public.
    _do = run

    @staticmethod
    def _run_on(loop: asyncio.AbstractEventLoop, coro):
        """Run ``coro`` on ``loop``; if the caller is interrupted (KeyboardInterrupt), cancel what
        it left on the loop and let its clean-up run, so none of it runs during the next call."""
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise

    def _run_inline(self, coro):
        """Run ``coro`` in this thread with the device's loop marked running but without a task
        (a task, its scheduling and the loop's selector poll cost ~25 us a call, a tenth of a
        multi-table batch's driver time): over the model, whose transport calls never suspend,
        the coroutine finishes in its first step. One that suspends (on a future of this loop)
        continues as a task on the loop, exactly where it stopped."""
        asyncio._set_running_loop(self._loop)
        try:
            first = coro.send(None)
        except StopIteration as stop:
            return stop.value
        finally:
            asyncio._set_running_loop(None)
        return self._run_on(self._loop, _resume(coro, first))

    def _run_in_helper_thread(self, coro):
        box = {}

        def target():
            try:
                box["value"] = self.run(coro)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
        thread = threading.Thread(target=target, name="evssd-device-run")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    @property
    def params(self) -> Params:
        return self.aio.params

    @property
    def transport(self) -> Transport:
        return self.aio.transport

    @property
    def tables(self):
        return self.aio.tables

    def close(self):
        """Disable the device and close the link; later calls raise :class:`DeviceClosedError`.
        Closing twice is harmless."""
        with self._lock:
            if self._loop.is_closed():
                return
            try:
                if not self.aio.closed:
                    self._run_on(self._loop, self.aio.close())
            finally:
                self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def configure_table(self, table, row_bytes, elem, extents, enable=True):
        return self.run(self.aio.configure_table(table, row_bytes, elem, extents, enable))

    def set_timing(self, t_r=None, t_prog=None):
        return self.run(self.aio.set_timing(t_r, t_prog))

    def set_block_mode(self, on: bool):
        return self.run(self.aio.set_block_mode(on))

    def program_pages(self, lba, data):
        return self.run(self.aio.program_pages(lba, data))

    def read_pages(self, lba, n_pages):
        return self.run(self.aio.read_pages(lba, n_pages))

    def gather(self, table, indices):
        return self.run(self.aio.gather(table, indices))

    def gather_pooled(self, table, indices, offsets, weights=None):
        return self.run(self.aio.gather_pooled(table, indices, offsets, weights))

    def supports(self, capability):
        return self.run(self.aio.supports(capability))

    def view(self, table, raw, pooled=False):
        return self.aio.view(table, raw, pooled)

    def nop(self):
        return self.run(self.aio.nop())

    def counters(self):
        return self.run(self.aio.counters())

    def clear_counters(self):
        return self.run(self.aio.clear_counters())

    def read32(self, addr):
        return self.run(self.aio.read32(addr))

    def write32(self, addr, value, strb=0xF):
        return self.run(self.aio.write32(addr, value, strb))
