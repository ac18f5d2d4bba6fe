"""Functional + timing model of the EV-SSD, behind the same registers and queues as the RTL.

:class:`ModelTransport` is the default backend of :class:`evssd.host.device.Device`: MMIO goes to
a :class:`~evssd.host.regfile.RegisterFile` (the golden model of the MMIO manager), host memory is
a bytearray, and a :class:`DeviceModel` executes commands when the SQ doorbell rings. Results
are bit-exact with the gateware (same translation, same status rules of
:class:`evssd.hw.regmap.Status`, same pooling arithmetic from :mod:`evssd.host.pooling`).

The cycle counters advance by the estimate of :mod:`evssd.host.timing`; it is a model, checked
against the RTL's cycle counts by ``evssd bench rtl``, not a measurement.

A command is executed over arrays, not index by index, in one numba call
(:func:`_lookup_command`): it translates the lookups (:func:`_plan`), copies GATHER rows from
the flash pages straight into the result buffer (or finds the flash rows a GATHER_POOLED pools
in place with ``pooling.pool_into``), and advances the timing model
(:func:`evssd.host.timing.run_lookups`), on a work array reused from command to command. The
per-command Python around it is kept small: a command costs tens of microseconds before its
first lookup (docs/benchmarks.md, "Device model"). The flash is
sparse (:class:`~evssd.host.sparse_flash.SparseFlash`): a model can advertise a large capacity
(:data:`MODEL_PAGES_PER_CHANNEL` by default) and hold only the pages programmed.
"""
from __future__ import annotations

import bisect
import functools

import numba
import numpy as np

from evssd.hw import regmap
from evssd.hw.regmap import (COMMAND_BYTES, COMPLETION_BYTES, NO_BAD_POSITION, Command, Completion,
                             ElemType, Opcode, Params, Status)
from evssd.host.elements import ELEM_OF_DEVICE
from evssd.host.pooling import describe_error, kernel_source, pool_into
from evssd.host.regfile import BusResponse, MMIOError, RegisterFile
from evssd.host.sparse_flash import SparseFlash, gather_rows, slot_of
from evssd.host.timing import TimingModel, run_lookups
from evssd.host.transport import HostMemory, Transport

__all__ = ["DeviceModel", "ModelTransport", "translate", "translate_many", "MODEL_PAGES_PER_CHANNEL"]

ALIGN = regmap.BUFFER_ALIGN

#: Flash pages per channel of a model opened without ``pages_per_channel``: 2**24 pages of 4 KiB
#: per channel (64 GiB; 256 GiB with 4 channels), allocated sparsely (:mod:`evssd.host.sparse_flash`),
#: so tables of any practical size fit at no memory cost beyond their own pages.
MODEL_PAGES_PER_CHANNEL = 1 << 24


class _Table:
    __slots__ = ("row_bytes", "elem", "enable", "rows_per_page", "extent_array")

    def __init__(self, max_extents: int):
        self.row_bytes, self.elem, self.enable, self.rows_per_page = 0, 0, False, 1
        #: the extents as an int64 ``[n, 3]`` array (first, rows, lba), slot order
        self.extent_array = np.zeros((max_extents, 3), np.int64)

    @property
    def extents(self) -> list[tuple[int, int, int]]:
        """The extents as tuples (a copy: write them with the setter or into ``extent_array``)."""
        return [tuple(int(v) for v in e) for e in self.extent_array]

    @extents.setter
    def extents(self, value) -> None:
        self.extent_array = np.array(value, np.int64).reshape(-1, 3)


def translate(index: int, table: _Table, total_pages: int):
    """(status, lba, offset) of one index, as the ExtentTranslator computes it.

    Status 0 = ok, 1 = in no extent, 3 = page outside the flash. The first matching extent (in
    slot order) wins; extents do not overlap when written by the driver.
    """
    st, lba, off = translate_many(np.array([index], np.int64), table, total_pages)
    return int(st[0]), int(lba[0]), int(off[0])


def translate_many(indices: np.ndarray, table: _Table, total_pages: int):
    """:func:`translate` over an array: (status uint8, lba int64, offset int64) arrays."""
    idx = np.ascontiguousarray(indices, np.int64)
    ext = table.extent_array
    status = np.empty(idx.size, np.uint8)
    lba = np.empty(idx.size, np.int64)
    offset = np.empty(idx.size, np.int64)
    _translate(idx, ext, max(1, table.rows_per_page), table.row_bytes, total_pages, status, lba, offset)
    return status, lba, offset


@numba.njit(cache=True, nogil=True)
def _count_bad(status):
    n, first, any_index = 0, -1, False
    for k in range(status.shape[0]):
        if status[k]:
            if n == 0:
                first = k
            n += 1
            any_index |= status[k] == 1
    return n, first, any_index


@numba.njit(cache=True, nogil=True, inline="always")
def _log2(n):
    """log2 of ``n`` when it is a power of two, else -1 (then the kernels divide)."""
    s = 0
    while (1 << s) < n:
        s += 1
    return s if (1 << s) == n else -1


@numba.njit(cache=True, nogil=True, inline="always")
def _div(a, d, shift):
    """``a // d`` for ``a >= 0``: a shift when ``d == 1 << shift`` (64-bit divisions cost tens of
    cycles; table geometries are mostly powers of two), else a division."""
    return a >> shift if shift >= 0 else a // d


@numba.njit(cache=True, nogil=True, inline="always")
def _translate_one(index, extents, rows_per_page, rpp_shift, row_bytes, total_pages):
    """The ExtentTranslator's rule for one index: (status, lba, offset), see :func:`translate`.
    ``rpp_shift``: :func:`_log2` of ``rows_per_page``."""
    for e in range(extents.shape[0]):
        first, n_rows = extents[e, 0], extents[e, 1]
        if n_rows and first <= index < first + n_rows:
            rel = index - first
            q = _div(rel, rows_per_page, rpp_shift)
            lba = extents[e, 2] + q
            return (3 if lba >= total_pages else 0), lba, (rel - q * rows_per_page) * row_bytes
    return 1, 0, 0


@numba.njit(cache=True, nogil=True, inline="always")
def _used_extents(extents):
    """``extents`` without its trailing empty slots (they match no index)."""
    n = extents.shape[0]
    while n and extents[n - 1, 1] == 0:
        n -= 1
    return extents[:n]


@numba.njit(cache=True, nogil=True)
def _translate(indices, extents, rows_per_page, row_bytes, total_pages, status, lba, offset):
    """The ExtentTranslator over an index array (see :func:`translate`)."""
    ext, rpp_shift = _used_extents(extents), _log2(rows_per_page)
    for k in range(indices.shape[0]):
        status[k], lba[k], offset[k] = _translate_one(indices[k], ext, rows_per_page, rpp_shift, row_bytes,
                                                      total_pages)


@numba.njit(cache=True, nogil=True)
def _plan(indices, lo, hi, extents, rows_per_page, row_bytes, total_pages, n_channels,
          status, pos, lba, offset, ch, page, good_before):
    """One command's lookups ``indices[lo:hi]`` translated: ``status[k - lo]`` of each, the good
    ones compacted in request order (position, lba, offset, channel, page), and
    ``good_before[k - lo]`` = good lookups before position k (``hi - lo + 1`` entries).
    Returns the number of good lookups."""
    ext, rpp_shift, ch_shift = _used_extents(extents), _log2(rows_per_page), _log2(n_channels)
    n = 0
    for k in range(lo, hi):
        st, l, o = _translate_one(np.int64(indices[k]), ext, rows_per_page, rpp_shift, row_bytes, total_pages)
        status[k - lo] = st
        good_before[k - lo] = n
        if st == 0:
            q = _div(l, n_channels, ch_shift)
            pos[n], lba[n], offset[n] = k, l, o
            ch[n], page[n] = l - q * n_channels, q
            n += 1
    good_before[hi - lo] = n
    return n


# rows of the per-command work array (``DeviceModel._work``): the good lookups compacted in
# request order, then per-lookup-position counts
_POS, _LBA, _OFF, _CH, _PAGE, _ROW, _GOOD_BEFORE, _OUT_AFTER, _BAGS = range(9)


@numba.njit(cache=True, nogil=True)
def _lookup_command(indices, lo, hi, offsets, out_row, extents, rows_per_page, row_bytes, total_pages,
                    n_channels, mode, work, status, flash_dir, flash_leaves, flash_pool, rows,
                    block_mode, overlap, t_r, page_size, beat_bytes, host_bytes, chan, ways, retire, clk):
    """One GATHER / GATHER_POOLED command's lookups ``indices[lo:hi]`` in one call: translated
    (:func:`_plan` into ``work`` and ``status``), their rows handled per ``mode``, and the timing
    model advanced (:func:`evssd.host.timing.run_lookups`).

    ``mode`` 0 (GATHER): ``rows`` [count, row_bytes] gets each lookup's row (a bad lookup's row
    zeros); a result unit per lookup. ``mode`` 1 (pooled, rows on the page grid): ``work[_ROW]``
    gets each good lookup's row number in the flash pool viewed as rows, for pooling in place.
    ``mode`` 2 (pooled, rows off the grid): nothing (the caller gathers them). Pooled: a result
    unit of ``out_row`` bytes per bag of ``offsets``, ready when its last good lookup retires
    (:func:`evssd.host.timing.result_schedule`'s rule); ``work[_BAGS]`` gets the bags' offsets
    over the good lookups. ``work`` has at least ``max(m, n_bags) + 1`` columns. Returns the
    number of good lookups."""
    m = hi - lo
    n = _plan(indices, lo, hi, extents, rows_per_page, row_bytes, total_pages, n_channels, status,
              work[_POS], work[_LBA], work[_OFF], work[_CH], work[_PAGE], work[_GOOD_BEFORE])
    good_before = work[_GOOD_BEFORE]
    out_after = work[_OUT_AFTER, :n + 1]
    out_after[:] = 0
    if mode == 0:
        # row p is ready when the last good lookup at or before p retires
        for p in range(m):
            out_after[good_before[p + 1]] += out_row
        if n < m:
            for p in range(m):
                if status[p]:
                    rows[p, :] = 0
        gather_rows(flash_dir, flash_leaves, flash_pool, work[_LBA, :n], work[_OFF, :n], row_bytes, rows,
                    work[_POS, :n])
    else:
        for b in range(offsets.shape[0] - 1):
            out_after[good_before[offsets[b + 1] - lo]] += out_row
        for b in range(offsets.shape[0]):       # the bags over the good lookups
            work[_BAGS, b] = good_before[offsets[b] - lo]
        if mode == 1:
            per_page = page_size // row_bytes
            for k in range(n):
                work[_ROW, k] = (slot_of(flash_dir, flash_leaves, work[_LBA, k]) * per_page
                                 + work[_OFF, k] // row_bytes)
    run_lookups(work[_CH, :n], work[_PAGE, :n], work[_OFF, :n], out_after, row_bytes, block_mode, overlap,
                t_r, page_size, beat_bytes, host_bytes, chan, ways, retire, clk)
    return n


@numba.njit(cache=True, nogil=True)
def _offsets_ok(offsets, count):
    """A command's offsets are non-decreasing and end at or before ``count`` (else BAD_OFFSETS)."""
    for b in range(offsets.shape[0] - 1):
        if offsets[b + 1] < offsets[b]:
            return False
    return offsets[offsets.shape[0] - 1] <= count


_NO_OFFSETS = np.zeros(1, np.uint32)        # a GATHER's (unused) offsets
_NO_ROWS = np.zeros((0, 1), np.uint8)       # a pooled command's (unused) GATHER rows

@functools.lru_cache(maxsize=256)
def _geometry(row_bytes: int, elem: int):
    """(ElemType, pooled row bytes, elements per row) of a table (per command: memoised)."""
    e = ElemType(elem)
    return e, regmap.pooled_row_bytes(row_bytes, e), (row_bytes - e.header_bytes) // e.itemsize


#: the host-memory addresses each opcode reads or writes (all must be 64-byte aligned)
_ADDRESS_FIELDS = {Opcode.GATHER: ("src_addr", "dst_addr"),
                   Opcode.GATHER_POOLED: ("src_addr", "offsets_addr", "dst_addr"),
                   Opcode.GATHER_POOLED_WEIGHTED: ("src_addr", "offsets_addr", "weights_addr", "dst_addr"),
                   Opcode.PROGRAM_PAGES: ("src_addr",),
                   Opcode.READ_PAGES: ("dst_addr",)}


class DeviceModel:
    """The device's state and command semantics."""

    def __init__(self, params: Params, host: bytearray, host_base: int, *, n_slots: int | None = None,
                 read_queue: int | None = None):
        self.params = params
        self.regs = RegisterFile(params, on_write=self._on_write, before_read=self._sync_counters)
        # the model pools every element type and weighted bags (host/pooling.py's definition)
        self.regs.fields["caps_int8_rowwise"] = self.regs.fields["caps_weighted"] = 1
        self.host, self.host_base = host, host_base
        self._host_np = np.frombuffer(host, np.uint8)   # a view: host memory as an array
        # mapped buffers: start address -> flat uint8 view; starts sorted; the next address
        self._maps: dict[int, np.ndarray] = {}
        self._map_starts: list[int] = []
        self._map_next = -(-(host_base + len(host)) // 4096) * 4096 + 4096
        self._rows = np.empty(0, np.uint8)
        self._work = np.empty((_BAGS + 1, 0), np.int64)
        self._status = np.empty(0, np.uint8)
        self.flash = SparseFlash(params.total_pages, params.page_size)
        self.tables = [_Table(params.max_extents) for _ in range(params.max_tables)]
        self.sq_head = 0
        self.cq_tail = 0
        self.phase = 1
        self.cq_head = 0
        self.pending = False
        self.fatal = False
        self.timing = TimingModel(params, n_slots=n_slots, read_queue=read_queue)
        self._counters_stale = True     # the RO registers are brought up to date on a read

    # ---------------------------------------------------------------- registers
    def _f(self, name):
        return self.regs.fields[name]

    def _sync_counters(self):
        if self._counters_stale:
            self._set_counters()

    def _set_counters(self):
        self._counters_stale = False
        f = self.regs.fields
        f["sq_head_head"] = self.sq_head
        f["cq_tail_tail"] = self.cq_tail
        f["cq_tail_phase"] = self.phase
        f["status_fatal"] = int(self.fatal)
        f["status_busy"] = int(self.pending)
        f["status_inflight"] = 0
        cyc = self.timing.cycles
        f["cnt_cycles_lo"] = cyc & 0xFFFF_FFFF
        f["cnt_cycles_hi"] = (cyc >> 32) & 0xFFFF_FFFF
        f["cnt_busy_cycles"] = self.timing.busy_cycles & 0xFFFF_FFFF
        t = self.timing
        for name, arr in (("ch_rows", t.ch_rows), ("ch_bytes", t.ch_bytes), ("ch_tr_waits", t.ch_tr_waits),
                          ("ch_busy_cycles", t.ch_busy_cycles), ("ch_programs", t.ch_programs)):
            f[name][:self.params.n_channels] = (arr & 0xFFFF_FFFF).tolist()

    def _on_write(self, name, value):
        f = self.regs.fields
        if name == "ctrl_trigger_clear_counters":
            for key in ("cnt_commands", "cnt_lookups", "cnt_errors"):
                f[key] = 0
            self.timing.clear()
        elif name == "ctrl_trigger_reset_queues":
            self.sq_head = self.cq_tail = self.cq_head = 0
            self.phase = 1
            f["sq_tail_tail"] = 0
            f["cq_head_head"] = 0
        elif name == "tbl_commit_table":
            t = f["tbl_sel_table"]
            if t < self.params.max_tables:
                tab = self.tables[t]
                tab.row_bytes = f["tbl_cfg_row_bytes"]
                tab.elem = f["tbl_cfg_elem"]
                tab.enable = bool(f["tbl_cfg_enable"])
                tab.rows_per_page = max(1, f["tbl_rows_per_page_rows"])
        elif name == "tbl_commit_extent":
            t, e = f["tbl_sel_table"], f["tbl_sel_extent"]
            if t < self.params.max_tables and e < self.params.max_extents:
                self.tables[t].extent_array[e] = (f["ext_first"], f["ext_rows"], f["ext_lba"])
        elif name == "cq_head_head":
            self.cq_head = value
        if name in ("sq_tail_tail", "cq_head_head", "ctrl_enable"):
            self.run()
        self._counters_stale = True

    # ---------------------------------------------------------------- host memory
    # The device reaches host memory through one address space: the window (``host``) and the
    # buffers mapped into it with :meth:`map_buffer` (like user pages pinned for DMA).

    def _host_view(self, addr: int, n: int) -> np.ndarray:
        """The ``n`` bytes of host memory at ``addr`` as a writable uint8 view (of the window or
        of one mapped buffer); :class:`_BusError` when they are not all inside one of them."""
        off = addr - self.host_base
        if 0 <= off and off + n <= self._host_np.size:
            return self._host_np[off:off + n]
        i = bisect.bisect_right(self._map_starts, addr) - 1
        if i >= 0 and n >= 0:
            start = self._map_starts[i]
            buf = self._maps[start]
            off = addr - start
            if off + n <= buf.size:
                return buf[off:off + n]
        raise _BusError(addr, n)

    def _read_host(self, addr, n) -> bytes:
        return self._host_view(addr, n).tobytes()

    def _write_host(self, addr, data: bytes):
        self._host_view(addr, len(data))[:] = np.frombuffer(data, np.uint8)

    def map_buffer(self, buf: np.ndarray) -> int:
        """Map ``buf`` (a C-contiguous array; its bytes, not a copy) into the device's view of
        host memory and return its address: 64-byte aligned, above the window, never given out
        twice (a stale address is a bus error, not another buffer)."""
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError(f"map_buffer: buf must be a writable C-contiguous numpy array, got "
                             f"{type(buf).__name__}")
        flat = buf.reshape(-1).view(np.uint8)
        addr = self._map_next
        if flat.size < 1 or addr + flat.size > 1 << 64:
            raise ValueError(f"map_buffer: cannot map {flat.size} bytes at 0x{addr:x}")
        # a gap after every buffer: no access range runs from one buffer into the next
        self._map_next = addr + -(-flat.size // ALIGN) * ALIGN + ALIGN
        self._maps[addr] = flat
        self._map_starts.append(addr)          # addresses only grow: the list stays sorted
        return addr

    def unmap_buffer(self, addr: int) -> bool:
        """Remove the mapping made at ``addr``; False when ``addr`` is none (nothing changes)."""
        if self._maps.pop(addr, None) is None:
            return False
        del self._map_starts[bisect.bisect_left(self._map_starts, addr)]
        return True

    # ---------------------------------------------------------------- queues
    def run(self):
        """Execute every submitted command the completion ring has room for."""
        f = self.regs.fields
        sq_size, cq_size = f["sq_size_entries"], f["cq_size_entries"]
        sq_base = f["sq_base_lo"] | (f["sq_base_hi"] << 32)
        cq_base = f["cq_base_lo"] | (f["cq_base_hi"] << 32)
        while f["ctrl_enable"] and not self.fatal and self.sq_head != f["sq_tail_tail"] % max(sq_size, 1):
            if (self.cq_tail + 1) % cq_size == self.cq_head:
                break  # CQ full: wait for the CQ_HEAD doorbell
            try:
                cmd = Command.unpack(self._read_host(sq_base + self.sq_head * COMMAND_BYTES, COMMAND_BYTES))
            except _BusError:
                self.fatal = True
                break
            self.sq_head = (self.sq_head + 1) % sq_size
            # Timing: a command overlaps the previous one while the host has not reaped it.
            self.timing.overlap = self.cq_tail != self.cq_head
            cpl = self.execute(cmd)
            cpl.sq_head = self.sq_head
            cpl.phase = self.phase
            try:
                self._write_host(cq_base + self.cq_tail * COMPLETION_BYTES, cpl.pack())
            except _BusError:
                self.fatal = True
                break
            self.cq_tail += 1
            if self.cq_tail == cq_size:
                self.cq_tail = 0
                self.phase ^= 1
            f["cnt_commands"] = (f["cnt_commands"] + 1) & 0xFFFF_FFFF
            if cpl.status != Status.OK:
                f["cnt_errors"] = (f["cnt_errors"] + 1) & 0xFFFF_FFFF
        self._counters_stale = True

    @property
    def irq(self) -> bool:
        return bool(self.regs.fields["ctrl_irq_enable"]) and self.cq_tail != self.cq_head

    # ---------------------------------------------------------------- commands
    def execute(self, cmd: Command) -> Completion:
        try:
            return self._execute(cmd)
        except _BusError:
            return Completion(cid=cmd.cid, status=Status.BUS_ERROR)

    def _execute(self, cmd: Command) -> Completion:
        p = self.params
        f = self.regs.fields
        self.timing.t_r = f["t_r_cycles"]        # (lookups take the register value directly)
        self.timing.t_prog = f["t_prog_cycles"]
        op = cmd.opcode
        fields = _ADDRESS_FIELDS.get(op)
        if fields is None:
            if op == Opcode.NOP:
                self.timing.nop()
                return Completion(cid=cmd.cid, status=Status.OK)
            return Completion(cid=cmd.cid, status=Status.BAD_OPCODE)
        for name in fields:
            if getattr(cmd, name) % ALIGN:
                return Completion(cid=cmd.cid, status=Status.BAD_ADDRESS)
        if op == Opcode.PROGRAM_PAGES or op == Opcode.READ_PAGES:
            return self._pages(cmd)
        table = self.tables[cmd.table] if cmd.table < p.max_tables else None
        if table is None or not table.enable or table.elem not in ElemType._value2member_map_:
            return Completion(cid=cmd.cid, status=Status.TABLE_DISABLED)
        weighted = op == Opcode.GATHER_POOLED_WEIGHTED
        pooled = weighted or op == Opcode.GATHER_POOLED
        rb = table.row_bytes
        elem, pooled_row, dim = _geometry(rb, table.elem)
        out_row = pooled_row if pooled else rb
        out_bytes = out_row * (cmd.n_bags if pooled else cmd.count)
        if out_bytes > cmd.dst_bytes:
            return Completion(cid=cmd.cid, status=Status.RESULT_OVERFLOW)
        if pooled:
            offsets = self._host_view(cmd.offsets_addr, 4 * (cmd.n_bags + 1)).view("<u4")
            if not _offsets_ok(offsets, cmd.count):
                return Completion(cid=cmd.cid, status=Status.BAD_OFFSETS)
        else:
            offsets = _NO_OFFSETS
        indices = self._host_view(cmd.src_addr, 4 * cmd.count).view("<u4")
        # Bags are contiguous slices of the index list, so the lookups a command makes are one
        # range: all of them (GATHER) or offsets[0]..offsets[n_bags] (GATHER_POOLED).
        lo, hi = (int(offsets[0]), int(offsets[-1])) if pooled else (0, cmd.count)
        m = hi - lo
        work = self._work_for(max(m, cmd.n_bags) + 1)
        status = self._status[:m]
        # The result goes straight into host memory (a bus error still lets the lookups run and
        # is reported after them, like the RTL's result DMA failing).
        dst_error = None
        try:
            result = self._host_view(cmd.dst_addr, out_bytes)
        except _BusError as exc:
            dst_error = exc
            result = np.empty(out_bytes, np.uint8)
        ps = p.page_size
        if not pooled:    # one row per lookup; a bad lookup's row is zeros
            mode, rows = 0, result.reshape(cmd.count, rb)
        else:             # pool straight from the flash pages when rows sit on the page grid
            mode, rows = (1 if ps % rb == 0 and table.rows_per_page * rb <= ps else 2), _NO_ROWS
        t = self.timing
        n_good = _lookup_command(indices, lo, hi, offsets, out_row, table.extent_array,
                                 max(1, table.rows_per_page), rb, p.total_pages, p.n_channels, mode, work,
                                 status, self.flash._dir, self.flash._leaves, self.flash._pool, rows,
                                 bool(f["ctrl_block_mode"]), t.overlap, f["t_r_cycles"], ps, t.beat_bytes,
                                 t.host_bytes, t._chan, t._ways, t._retire, t._clk)
        if pooled:
            el = ELEM_OF_DEVICE[elem]
            sums = result.view("<f4" if weighted else el.pooled).reshape(cmd.n_bags, dim)
            weights = None
            if weighted:  # one float32 per index; the good lookups' ones, in order
                weights = np.ascontiguousarray(
                    self._host_view(cmd.weights_addr, 4 * cmd.count).view("<f4")[work[_POS, :n_good]])
            good_offsets = work[_BAGS, :cmd.n_bags + 1]     # the bags over the good lookups only
            if mode == 1:   # the flash pages viewed as a matrix of rows
                src, row_numbers = self.flash.row_matrix(rb), work[_ROW, :n_good]
            else:           # rows not aligned to the page grid: gather them first
                src = self._scratch(n_good, rb)
                row_numbers = np.arange(n_good, dtype=np.int64)
                self.flash.gather(work[_LBA, :n_good], work[_OFF, :n_good], rb, src, row_numbers)
            src = src.view(el.storage)
            code = pool_into(kernel_source(src, el), el, row_numbers, good_offsets, sums, weights)
            if code != -1:  # cannot happen: every row number and offset is built above
                raise AssertionError(describe_error(code, row_numbers, good_offsets, src.shape[0]))
        f["cnt_lookups"] = (f["cnt_lookups"] + m) & 0xFFFF_FFFF
        if dst_error is not None:
            raise dst_error
        n_bad = m - n_good
        if not n_bad:
            return Completion(n_bad=0, first_bad=NO_BAD_POSITION, cid=cmd.cid, status=Status.OK)
        _, first, any_index = _count_bad(status)
        return Completion(n_bad=n_bad, first_bad=int(first) + lo, cid=cmd.cid,
                          status=Status.BAD_INDEX if any_index else Status.BAD_LBA)

    def _work_for(self, n: int) -> np.ndarray:
        """The reused per-command work array of :func:`_lookup_command` with at least ``n``
        columns, and the status array beside it (grown by doubling: no per-command allocation)."""
        if self._work.shape[1] < n:
            cap = max(n, 2 * self._work.shape[1])
            self._work = np.empty((_BAGS + 1, cap), np.int64)
            self._status = np.empty(cap, np.uint8)
        return self._work

    def _scratch(self, n: int, row_bytes: int) -> np.ndarray:
        """A reused ``[n, row_bytes]`` uint8 buffer for a pooled command's gathered rows (no
        per-command allocation); its content is overwritten before use."""
        size = n * row_bytes
        if self._rows.size < size:
            self._rows = np.empty(max(size, 2 * self._rows.size), np.uint8)
        return self._rows[:size].reshape(n, row_bytes)

    def _pages(self, cmd: Command) -> Completion:
        p = self.params
        ps = p.page_size
        if cmd.opcode == Opcode.READ_PAGES and cmd.count * ps > cmd.dst_bytes:
            return Completion(cid=cmd.cid, status=Status.RESULT_OVERFLOW)
        if cmd.lba + cmd.count > p.total_pages:
            return Completion(cid=cmd.cid, status=Status.BAD_LBA)
        # Page by page like the RTL (a bus error on page k leaves pages before k done), in one
        # vectorised step for the pages whose host memory is inside the window.
        host_addr = cmd.src_addr if cmd.opcode == Opcode.PROGRAM_PAGES else cmd.dst_addr
        n_ok = cmd.count
        for k in range(cmd.count):
            try:
                self._host_view(host_addr + k * ps, ps)
            except _BusError:
                n_ok = k
                break
        if n_ok:
            lbas = range(cmd.lba, cmd.lba + n_ok)
            if cmd.opcode == Opcode.PROGRAM_PAGES:
                data = self._read_host(cmd.src_addr, n_ok * ps)
                self.flash.program(cmd.lba, np.frombuffer(data, np.uint8).reshape(n_ok, ps))
                for lba in lbas:
                    self.timing.program(lba % p.n_channels, lba // p.n_channels)
            else:
                self._write_host(cmd.dst_addr, self.flash.read(cmd.lba, n_ok).tobytes())
                for lba in lbas:
                    self.timing.read_page(lba % p.n_channels, lba // p.n_channels)
        if n_ok < cmd.count:
            raise _BusError(host_addr + n_ok * ps, ps)
        return Completion(cid=cmd.cid, status=Status.OK)


class _BusError(Exception):
    def __init__(self, addr, n):
        super().__init__(f"host access 0x{addr:x}+{n} outside the host memory window")


class ModelTransport(Transport):
    """The functional model as a transport. ``params`` (or keyword overrides) picks the build;
    without ``pages_per_channel`` the flash is :data:`MODEL_PAGES_PER_CHANNEL` pages per channel
    (sparse: memory follows the pages programmed). ``n_slots``: the reorder-buffer slots of the
    build being modelled (default: :func:`evssd.host.timing.default_slots`), e.g. the RTL's
    ``n_slots`` top argument when the model runs next to a non-default build; ``read_queue``
    likewise (default: :func:`evssd.hw.regmap.default_read_queue`)."""

    name = "model"

    def __init__(self, params: Params | None = None, *, host_memory_bytes: int = 64 << 20,
                 host_base: int = 0x1_0000_0000, n_slots: int | None = None,
                 read_queue: int | None = None, **overrides):
        if params is None:
            overrides.setdefault("pages_per_channel", MODEL_PAGES_PER_CHANNEL)
            params = Params(**overrides)
        elif overrides:
            raise TypeError("give either params or keyword overrides, not both")
        self.params = params
        self.host = bytearray(host_memory_bytes)
        self.memory = HostMemory(host_base, host_memory_bytes)
        self.device = DeviceModel(params, self.host, host_base, n_slots=n_slots, read_queue=read_queue)

    async def read32(self, addr: int) -> int:
        data, resp = self.device.regs.read(addr)
        if resp != BusResponse.OKAY:
            raise MMIOError("read", addr, resp)
        return data

    async def write32(self, addr: int, value: int, strb: int = 0xF) -> None:
        resp = self.device.regs.write(addr, value & 0xFFFF_FFFF, strb)
        if resp != BusResponse.OKAY:
            raise MMIOError("write", addr, resp)

    def _view(self, addr: int, nbytes: int, what: str) -> np.ndarray:
        try:
            return self.device._host_view(addr, nbytes)
        except _BusError:
            raise ValueError(f"host {what} 0x{addr:x}+{nbytes} outside the window and the mapped "
                             f"buffers") from None

    async def mem_write(self, addr: int, data: bytes) -> None:
        src = np.frombuffer(data, np.uint8)
        self._view(addr, src.size, "write")[:] = src

    async def mem_read(self, addr: int, nbytes: int) -> bytes:
        return self._view(addr, nbytes, "read").tobytes()

    async def mem_readinto(self, addr: int, out) -> None:
        # one copy from the model's host memory into the caller's buffer (no bytes in between)
        dst = np.frombuffer(memoryview(out).cast("B"), np.uint8)
        dst[:] = self._view(addr, dst.size, "read")

    def map_buffer(self, buf: np.ndarray) -> int:
        # host memory is in this process: the device model writes into buf itself
        return self.device.map_buffer(buf)

    def free(self, addr: int) -> None:
        if not self.device.unmap_buffer(addr):
            self.memory.free(addr)

    async def wait(self) -> None:
        # Commands run when the doorbell rings; nothing happens between polls.
        self.device.run()
