"""The EV-SSD register map and descriptor layouts: the one source of truth.

Plain Python data, no Amaranth import: the gateware builds its MMIO decoder from it, the host
driver and the functional model import it as is, and ``docs/registers.md`` is generated from it
(``evssd regmap --write``). :data:`REGMAP_HASH` is a content hash of everything here that the
hardware and the host must agree on; the device reports it in the ID block and the driver refuses
a device whose hash differs.

All registers are 32 bits wide and 32-bit aligned. Descriptors (commands, completions) are
little-endian structures in host memory.
"""
from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass, fields
from typing import Iterator

__all__ = [
    "MAGIC", "REGMAP_VERSION", "REGMAP_HASH", "Access", "Field", "Register", "REGISTERS",
    "register", "port_name", "channel_addr", "all_addresses", "Params", "Opcode", "Status", "ElemType", "Command", "Completion",
    "COMMAND_BYTES", "COMPLETION_BYTES", "CHANNEL_BLOCK", "CHANNEL_STRIDE", "DivMagic",
    "div_magic", "pooled_row_bytes", "NO_BAD_POSITION", "default_slots", "default_read_queue",
    "channel_accept_depth", "READ_INTAKE_ENTRIES", "ELEM_BITS",
    "ROWWISE_HEADER_BYTES", "require_tag_width",
]

MAGIC = 0x45565344  # "EVSD" read as a little-endian word
REGMAP_VERSION = (1, 0)  # major changes break the driver; minor ones add registers


class Access(enum.Enum):
    RO = "ro"     # read-only: the device drives it
    RW = "rw"     # read/write: the host drives it, the device reads it
    W1T = "w1t"   # write-1-to-trigger: a one-cycle pulse per written 1; reads 0
    WO = "wo"     # write-only doorbell: the write itself is the event; reads back the last value


@dataclass(frozen=True)
class Field:
    name: str
    lsb: int
    width: int
    access: Access
    doc: str
    reset: int = 0

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb

    def extract(self, word: int) -> int:
        return (word >> self.lsb) & ((1 << self.width) - 1)

    def insert(self, word: int, value: int) -> int:
        if not 0 <= value < (1 << self.width):
            raise ValueError(f"field {self.name}: value {value} does not fit {self.width} bits")
        return (word & ~self.mask) | (value << self.lsb)


@dataclass(frozen=True)
class Register:
    name: str
    addr: int
    doc: str
    fields: tuple[Field, ...]
    # Build-parameter registers of the ID block: value comes from Params.<param>.
    param: str | None = None
    # Registers repeated per flash channel carry the channel number in their address.
    per_channel: bool = False

    @property
    def access(self) -> Access:
        kinds = {f.access for f in self.fields}
        return kinds.pop() if len(kinds) == 1 else Access.RW

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"register {self.name} has no field {name!r}")

    @property
    def reset(self) -> int:
        word = 0
        for f in self.fields:
            word |= f.reset << f.lsb
        return word


def _reg(name, addr, doc, *flds, param=None, per_channel=False):
    if not flds:
        flds = (Field("value", 0, 32, Access.RO, doc),)
    return Register(name, addr, doc, tuple(flds), param=param, per_channel=per_channel)


def _ro(name, addr, doc, param=None):
    return _reg(name, addr, doc, Field("value", 0, 32, Access.RO, doc), param=param)


def _rw(name, addr, doc, reset=0):
    return _reg(name, addr, doc, Field("value", 0, 32, Access.RW, doc, reset))


# Per-channel counter block: channel c's registers are at CHANNEL_BLOCK + c * CHANNEL_STRIDE.
CHANNEL_BLOCK = 0x200
CHANNEL_STRIDE = 0x20
MAX_CHANNELS = 8

REGISTERS: tuple[Register, ...] = (
    # ---- 0x000 ID block: the driver discovers the device here ----
    _reg("ID_MAGIC", 0x000, "Magic number 0x45565344 ('EVSD').",
         Field("value", 0, 32, Access.RO, "Magic number.", MAGIC)),
    _reg("ID_VERSION", 0x004, "Register map version.",
         Field("minor", 0, 16, Access.RO, "Minor version: compatible additions.", REGMAP_VERSION[1]),
         Field("major", 16, 16, Access.RO, "Major version: incompatible changes.", REGMAP_VERSION[0])),
    _ro("ID_REGMAP_HASH", 0x008, "First 32 bits of the SHA-256 of the register map and descriptor layouts.",
        param="regmap_hash"),
    _ro("ID_N_CHANNELS", 0x00C, "Number of flash channels (1..8).", param="n_channels"),
    _ro("ID_HOST_DATA_BITS", 0x010, "Data width of the host-memory AXI4 master (64..512).", param="host_data_bits"),
    _ro("ID_CH_DATA_BITS", 0x014, "Data width of each flash-channel AXI4 master (32..512).", param="ch_data_bits"),
    _ro("ID_PAGE_SIZE", 0x018, "Flash page size in bytes.", param="page_size"),
    _ro("ID_WAYS", 0x01C, "Outstanding page reads per channel (page registers per channel).", param="ways"),
    _ro("ID_MAX_TABLES", 0x020, "Number of table slots.", param="max_tables"),
    _ro("ID_MAX_EXTENTS", 0x024, "Extents per table.", param="max_extents"),
    _ro("ID_PAGES_PER_CHANNEL", 0x028, "Flash pages per channel (channel capacity / page size).", param="pages_per_channel"),
    _ro("ID_MAX_INFLIGHT", 0x02C, "Commands the device works on at once.", param="max_inflight"),
    _ro("ID_CLOCK_HZ", 0x030, "Design clock frequency in Hz (0 when unknown, e.g. in simulation).", param="clock_hz"),
    _ro("ID_BUILD", 0x034, "Build identifier: first 32 bits of the hash of the build parameters.", param="build_id"),
    _ro("ID_MAX_ROW_BYTES", 0x038, "Largest row_bytes a table may use (reorder-buffer slot size).", param="max_row_bytes"),

    # ---- 0x040 control and status ----
    _reg("CTRL", 0x040, "Device control.",
         Field("enable", 0, 1, Access.RW, "Process submission queue entries when 1."),
         Field("block_mode", 1, 1, Access.RW,
               "Block-interface baseline: every lookup moves the whole page over the channel bus."),
         Field("irq_enable", 2, 1, Access.RW, "Drive `irq` while the completion queue holds unread entries.")),
    _reg("CTRL_TRIGGER", 0x044, "One-shot actions.",
         Field("clear_counters", 0, 1, Access.W1T, "Zero every counter."),
         Field("reset_queues", 1, 1, Access.W1T,
               "Zero SQ head/tail, CQ head/tail and the phase; only while the device is idle.")),
    _reg("STATUS", 0x048, "Device status.",
         Field("busy", 0, 1, Access.RO, "A command is in flight."),
         Field("inflight", 8, 8, Access.RO, "Commands in flight."),
         Field("fatal", 31, 1, Access.RO,
               "A completion or command fetch got an AXI error; the device stopped fetching.")),
    _reg("CAPS", 0x04C, "Pooling capabilities of this implementation (0: the command or element type is "
         "refused, with BAD_OPCODE / TABLE_DISABLED).",
         Field("int8_rowwise", 0, 1, Access.RO, "GATHER* on INT8_ROWWISE tables."),
         Field("weighted", 1, 1, Access.RO, "GATHER_POOLED_WEIGHTED.")),

    # ---- 0x080 queues ----
    _rw("SQ_BASE_LO", 0x080, "Submission queue base address, bits 31:0 (64-byte aligned)."),
    _rw("SQ_BASE_HI", 0x084, "Submission queue base address, bits 63:32."),
    _reg("SQ_SIZE", 0x088, "Submission queue entries.",
         Field("entries", 0, 16, Access.RW, "Entries in the ring, a power of two, 2..32768.", 2)),
    _reg("SQ_TAIL", 0x08C, "Submission queue tail doorbell: the host writes the index after its last new command.",
         Field("tail", 0, 16, Access.WO, "New tail index.")),
    _reg("SQ_HEAD", 0x090, "Submission queue head: the next entry the device will fetch.",
         Field("head", 0, 16, Access.RO, "Head index.")),
    _rw("CQ_BASE_LO", 0x0A0, "Completion queue base address, bits 31:0 (16-byte aligned)."),
    _rw("CQ_BASE_HI", 0x0A4, "Completion queue base address, bits 63:32."),
    _reg("CQ_SIZE", 0x0A8, "Completion queue entries.",
         Field("entries", 0, 16, Access.RW, "Entries in the ring, a power of two, 2..32768.", 2)),
    _reg("CQ_HEAD", 0x0AC, "Completion queue head doorbell: the host writes the index after the last entry it consumed.",
         Field("head", 0, 16, Access.WO, "New head index.")),
    _reg("CQ_TAIL", 0x0B0, "Completion queue tail: the next entry the device will write.",
         Field("tail", 0, 16, Access.RO, "Tail index."),
         Field("phase", 16, 1, Access.RO, "Phase bit the device writes into entries now.")),

    # ---- 0x0C0 flash timing ----
    _reg("T_R", 0x0C0, "NAND page read time in cycles (array to page register).",
         Field("cycles", 0, 24, Access.RW, "Cycles.", 1000)),
    _reg("T_PROG", 0x0C4, "NAND page program time in cycles.",
         Field("cycles", 0, 24, Access.RW, "Cycles.", 10000)),

    # ---- 0x100 table configuration (staged, committed with TBL_COMMIT) ----
    _reg("TBL_SEL", 0x100, "Selects the table and extent that TBL_COMMIT writes.",
         Field("table", 0, 8, Access.RW, "Table slot."),
         Field("extent", 8, 8, Access.RW, "Extent slot.")),
    _reg("TBL_CFG", 0x104, "Staged table configuration.",
         Field("row_bytes", 0, 16, Access.RW, "Bytes per row, a multiple of 4, at most the page size."),
         Field("elem", 16, 3, Access.RW, "Element type (ElemType)."),
         Field("enable", 31, 1, Access.RW, "Table accepts lookups.")),
    _reg("TBL_ROWS_PER_PAGE", 0x108, "Staged rows per page (page_size // row_bytes).",
         Field("rows", 0, 16, Access.RW, "Rows per page.")),
    _reg("TBL_DIV_MAGIC", 0x10C, "Staged reciprocal of rows_per_page (see regmap.div_magic).",
         Field("magic", 0, 32, Access.RW, "Bits 31:0 of the 33-bit multiplier.")),
    _reg("TBL_DIV_SHIFT", 0x110, "Staged shift and top multiplier bit for the division by rows_per_page.",
         Field("shift", 0, 6, Access.RW, "Right shift after the multiply."),
         Field("magic_hi", 8, 1, Access.RW, "Bit 32 of the multiplier.")),
    _rw("EXT_FIRST", 0x114, "Staged extent: first table index it holds."),
    _rw("EXT_ROWS", 0x118, "Staged extent: rows it holds (0 = unused extent)."),
    _rw("EXT_LBA", 0x11C, "Staged extent: LBA of its first page."),
    _reg("TBL_COMMIT", 0x120, "Writes the staged values into the table memory.",
         Field("table", 0, 1, Access.W1T, "Write TBL_CFG, TBL_ROWS_PER_PAGE, TBL_DIV_* into table TBL_SEL.table."),
         Field("extent", 1, 1, Access.W1T, "Write EXT_* into extent TBL_SEL.extent of table TBL_SEL.table.")),

    # ---- 0x180 device counters ----
    _ro("CNT_COMMANDS", 0x180, "Commands completed."),
    _ro("CNT_LOOKUPS", 0x184, "Indices translated."),
    _ro("CNT_ERRORS", 0x188, "Commands completed with a non-zero status."),
    _ro("CNT_CYCLES_LO", 0x18C, "Free-running cycle counter, bits 31:0."),
    _ro("CNT_CYCLES_HI", 0x190, "Free-running cycle counter, bits 63:32 (read HI, LO, HI and retry if HI changed)."),
    _ro("CNT_BUSY_CYCLES", 0x194, "Cycles with at least one command in flight."),

    # ---- 0x200 per-channel counters: CHANNEL_BLOCK + channel * CHANNEL_STRIDE + offset ----
    _reg("CH_ROWS", CHANNEL_BLOCK + 0x00, "Rows read by this channel.",
         Field("value", 0, 32, Access.RO, "Rows."), per_channel=True),
    _reg("CH_BYTES", CHANNEL_BLOCK + 0x04, "Bytes moved over this channel's bus (reads and programs).",
         Field("value", 0, 32, Access.RO, "Bytes."), per_channel=True),
    _reg("CH_TR_WAITS", CHANNEL_BLOCK + 0x08, "Page reads that paid tR (page-register misses).",
         Field("value", 0, 32, Access.RO, "Page reads."), per_channel=True),
    _reg("CH_BUSY_CYCLES", CHANNEL_BLOCK + 0x0C, "Cycles with a read or program outstanding in this channel.",
         Field("value", 0, 32, Access.RO, "Cycles."), per_channel=True),
    _reg("CH_PROGRAMS", CHANNEL_BLOCK + 0x10, "Pages programmed in this channel.",
         Field("value", 0, 32, Access.RO, "Pages."), per_channel=True),
)

_BY_NAME = {r.name: r for r in REGISTERS}


def register(name: str) -> Register:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no register named {name!r}") from None


def port_name(reg: Register, fld: Field) -> str:
    """Name of a field on the gateware's register port and in models: ``<reg>_<field>`` in lower
    case, or just ``<reg>`` when the register's only field is ``value``."""
    if fld.name == "value" and len(reg.fields) == 1:
        return reg.name.lower()
    return f"{reg.name.lower()}_{fld.name}"


def channel_addr(name: str, channel: int) -> int:
    reg = register(name)
    if not reg.per_channel:
        raise ValueError(f"{name} is not a per-channel register")
    if not 0 <= channel < MAX_CHANNELS:
        raise ValueError(f"channel {channel} out of range 0..{MAX_CHANNELS - 1}")
    return reg.addr + channel * CHANNEL_STRIDE


def all_addresses(n_channels: int) -> Iterator[tuple[int, Register, int | None]]:
    """(address, register, channel or None) for every mapped address of a device."""
    for reg in REGISTERS:
        if reg.per_channel:
            for c in range(n_channels):
                yield reg.addr + c * CHANNEL_STRIDE, reg, c
        else:
            yield reg.addr, reg, None


# ----------------------------------------------------------------------------------------------
# Enumerations that cross the hardware/host line (widths are the field widths below)


class Opcode(enum.IntEnum):
    """Command opcodes (8 bits)."""
    NOP = 0x00
    GATHER = 0x01          # one row per index, written in request order
    GATHER_POOLED = 0x02   # FBGEMM indices + offsets[B+1]; one summed row per bag
    GATHER_POOLED_WEIGHTED = 0x03  # GATHER_POOLED with a float32 weight per index (fp32 sums)
    PROGRAM_PAGES = 0x10   # host memory -> flash pages
    READ_PAGES = 0x11      # flash pages -> host memory


class Status(enum.IntEnum):
    """Completion status (8 bits).

    Checks happen in this order; the first that fails decides the status and nothing is read or
    written past it: opcode (BAD_OPCODE), 64-byte alignment of every address the opcode uses
    (BAD_ADDRESS), table slot < max_tables and enabled (TABLE_DISABLED; GATHER*), result size
    <= dst_bytes (RESULT_OVERFLOW; GATHER: count*row_bytes, GATHER_POOLED: n_bags*pooled row,
    READ_PAGES: count*page_size), offsets (BAD_OFFSETS; GATHER_POOLED: non-decreasing and
    offsets[n_bags] <= count), page range (BAD_LBA; PROGRAM/READ_PAGES: lba + count <= total
    pages, else nothing moves). Then the command runs: per index, no extent -> BAD_INDEX and an
    extent whose page lies outside the flash -> BAD_LBA (the row is zero in GATHER and left out
    of the sum in GATHER_POOLED; n_bad counts both, first_bad is the first such position;
    BAD_INDEX wins over BAD_LBA). An AXI error response during the command -> BUS_ERROR (wins
    over everything after the checks). A bag with no (good) rows sums to zeros (+0.0).
    """
    OK = 0x00
    BAD_INDEX = 0x01        # some indices fell in no extent: their rows are zero / left out of the sum
    TABLE_DISABLED = 0x02   # the table slot is disabled or out of range: nothing written
    BAD_OPCODE = 0x03       # unknown opcode: nothing written
    BUS_ERROR = 0x04        # an AXI read or write returned SLVERR/DECERR
    RESULT_OVERFLOW = 0x05  # the result buffer is too small for the command: nothing written
    BAD_LBA = 0x06          # a page outside the flash (PROGRAM/READ_PAGES, or an extent): nothing moved for it
    BAD_OFFSETS = 0x07      # offsets not non-decreasing or past the index count: nothing written
    BAD_ADDRESS = 0x08      # a buffer address not 64-byte aligned: nothing read or written


class ElemType(enum.IntEnum):
    """Element type of a table's rows (:data:`ELEM_BITS` bits).

    INT8_ROWWISE is FBGEMM's row-wise quantized INT8: a row is an fp16 scale, an fp16 bias (the
    :data:`ROWWISE_HEADER_BYTES` in front), then ``dim`` uint8 codes; element j is
    ``scale * q[j] + bias`` and pooled sums are fp32 (the rule: ``evssd.host.pooling``)."""
    FP32 = 0
    FP16 = 1
    INT8 = 2
    INT32 = 3
    INT8_ROWWISE = 4

    @property
    def itemsize(self) -> int:
        return {ElemType.FP32: 4, ElemType.FP16: 2, ElemType.INT8: 1, ElemType.INT32: 4,
                ElemType.INT8_ROWWISE: 1}[self]

    @property
    def numpy_dtype(self) -> str:
        """dtype of the stored row bytes (INT8_ROWWISE: the whole row, header included, as uint8)."""
        return {ElemType.FP32: "<f4", ElemType.FP16: "<f2", ElemType.INT8: "i1", ElemType.INT32: "<i4",
                ElemType.INT8_ROWWISE: "u1"}[self]

    @property
    def header_bytes(self) -> int:
        """Bytes in front of a row's elements (INT8_ROWWISE: scale and bias)."""
        return ROWWISE_HEADER_BYTES if self is ElemType.INT8_ROWWISE else 0

    @property
    def pooled_dtype(self) -> str:
        """Sums of fp16/fp32/int8_rowwise rows are fp32; sums of int8/int32 rows are int32."""
        return "<i4" if self in (ElemType.INT8, ElemType.INT32) else "<f4"


#: width of TBL_CFG.elem and of every element-type signal in the gateware
ELEM_BITS = 3
#: bytes in front of the codes of an INT8_ROWWISE row: fp16 scale, fp16 bias (FBGEMM's layout)
ROWWISE_HEADER_BYTES = 4
assert max(ElemType) < (1 << ELEM_BITS)


def pooled_row_bytes(row_bytes: int, elem: ElemType) -> int:
    """Bytes of one pooled output row: every element widens to 4 bytes (header bytes give none;
    weighted sums are fp32, also 4 bytes an element)."""
    elem = ElemType(elem)
    return ((row_bytes - elem.header_bytes) // elem.itemsize) * 4


NO_BAD_POSITION = 0xFFFF_FFFF


# ----------------------------------------------------------------------------------------------
# Descriptors

@dataclass
class Command:
    """A 64-byte submission queue entry (16 little-endian 32-bit words).

    | dword | bits  | field        | meaning |
    |-------|-------|--------------|---------|
    | 0     | 7:0   | opcode       | Opcode |
    | 0     | 15:8  | table        | table slot (GATHER, GATHER_POOLED) |
    | 0     | 31:16 | cid          | command id, echoed in the completion |
    | 1     | 31:0  | count        | indices (GATHER*), pages (PROGRAM/READ_PAGES) |
    | 2     | 31:0  | n_bags       | bags B (GATHER_POOLED); offsets has B+1 entries |
    | 3     | 31:0  | lba          | first page (PROGRAM/READ_PAGES) |
    | 4-5   |       | src_addr     | indices (uint32[count]) or page data (PROGRAM_PAGES) |
    | 6-7   |       | offsets_addr | offsets (uint32[B+1]) (GATHER_POOLED) |
    | 8-9   |       | dst_addr     | result buffer |
    | 10    | 31:0  | dst_bytes    | result buffer size; the device never writes past it |
    | 11-12 |       | weights_addr | per-index weights (float32[count]) (GATHER_POOLED_WEIGHTED) |
    | 13-15 |       | reserved     | zero |
    """
    opcode: int
    table: int = 0
    cid: int = 0
    count: int = 0
    n_bags: int = 0
    lba: int = 0
    src_addr: int = 0
    offsets_addr: int = 0
    dst_addr: int = 0
    dst_bytes: int = 0
    weights_addr: int = 0

    _FMT = "<BBHIIIQQQIQ12x"

    def pack(self) -> bytes:
        return struct.pack(self._FMT, self.opcode, self.table, self.cid, self.count, self.n_bags,
                           self.lba, self.src_addr, self.offsets_addr, self.dst_addr, self.dst_bytes,
                           self.weights_addr)

    @classmethod
    def unpack(cls, data: bytes) -> "Command":
        if len(data) != COMMAND_BYTES:
            raise ValueError(f"a command is {COMMAND_BYTES} bytes, got {len(data)}")
        vals = struct.unpack(cls._FMT, data)
        return cls(*vals)


@dataclass
class Completion:
    """A 16-byte completion queue entry (4 little-endian 32-bit words).

    | dword | bits  | field      | meaning |
    |-------|-------|------------|---------|
    | 0     | 31:0  | n_bad      | indices that fell in no extent (or pages outside the flash) |
    | 1     | 31:0  | first_bad  | position of the first bad index, 0xFFFFFFFF when none |
    | 2     | 15:0  | sq_head    | SQ head after this command was fetched |
    | 2     | 31:16 | reserved   | zero |
    | 3     | 15:0  | cid        | command id |
    | 3     | 16    | phase      | flips each time the device wraps the CQ |
    | 3     | 23:17 | reserved   | zero |
    | 3     | 31:24 | status     | Status |
    """
    n_bad: int = 0
    first_bad: int = NO_BAD_POSITION
    sq_head: int = 0
    cid: int = 0
    phase: int = 0
    status: int = 0

    def pack(self) -> bytes:
        dw3 = self.cid | (self.phase << 16) | (self.status << 24)
        return struct.pack("<IIII", self.n_bad, self.first_bad, self.sq_head, dw3)

    @classmethod
    def unpack(cls, data: bytes) -> "Completion":
        if len(data) != COMPLETION_BYTES:
            raise ValueError(f"a completion is {COMPLETION_BYTES} bytes, got {len(data)}")
        n_bad, first_bad, dw2, dw3 = struct.unpack("<IIII", data)
        return cls(n_bad, first_bad, dw2 & 0xFFFF, dw3 & 0xFFFF, (dw3 >> 16) & 1, dw3 >> 24)


COMMAND_BYTES = 64
COMPLETION_BYTES = 16
#: every host buffer address a command names (src, offsets, weights, dst) is a multiple of this
#: (else BAD_ADDRESS); the driver's allocations and the model's mapped buffers keep to it
BUFFER_ALIGN = 64
#: its low address bits, which must be zero
BUFFER_ALIGN_BITS = BUFFER_ALIGN.bit_length() - 1
assert struct.calcsize(Command._FMT) == COMMAND_BYTES


# ----------------------------------------------------------------------------------------------
# Division by rows_per_page without a divider: floor(x / d) == (x * magic) >> shift for every
# 32-bit x. The host computes the constants once per table (off the hot path); the translator
# multiplies. Using shift = 32 + ceil(log2 d) and magic = ceil(2**shift / d) (33 bits) is exact
# for all x < 2**32 (Granlund-Montgomery).

def require_tag_width(tag_width) -> int:
    """The one check of a stream tag width (the translator's, the FTL's and the channel's
    requests carry a tag of 1..32 bits); returns it, raises ValueError naming the bad value."""
    if isinstance(tag_width, bool) or not isinstance(tag_width, int) or not 1 <= tag_width <= 32:
        raise ValueError(f"tag_width {tag_width!r} must be 1..32")
    return tag_width


@dataclass(frozen=True)
class DivMagic:
    magic: int   # up to 33 bits
    shift: int

    def divide(self, x: int) -> int:
        return (x * self.magic) >> self.shift


def div_magic(d: int) -> DivMagic:
    """Constants for dividing by rows per page with a multiply.

    `floor(x / d) == (x * magic) >> shift` for every 32-bit x, with `shift = 32 + ceil(log2 d)` and
    `magic = ceil(2**shift / d)` (33 bits). The driver writes them to TBL_DIV_MAGIC and
    TBL_DIV_SHIFT; the translator multiplies instead of dividing.
    """
    if not 1 <= d < (1 << 16):
        raise ValueError(f"rows_per_page {d} out of range 1..65535")
    log2 = (d - 1).bit_length()
    shift = 32 + log2
    magic = -(-(1 << shift) // d)
    assert magic < (1 << 33)
    return DivMagic(magic, shift)


# ----------------------------------------------------------------------------------------------
# Build parameters reported by the ID block

@dataclass(frozen=True)
class Params:
    """Device build parameters. Validated here so gateware, model and driver agree."""
    n_channels: int = 4
    host_data_bits: int = 64
    ch_data_bits: int = 64
    page_size: int = 4096
    ways: int = 4
    max_tables: int = 16
    max_extents: int = 8
    pages_per_channel: int = 4096
    max_inflight: int = 4
    max_row_bytes: int = 512
    clock_hz: int = 0

    def __post_init__(self):
        def check(name, ok, what):
            if not ok:
                raise ValueError(f"Params.{name}={getattr(self, name)!r}: {what}")
        check("n_channels", 1 <= self.n_channels <= MAX_CHANNELS, f"must be 1..{MAX_CHANNELS}")
        check("host_data_bits", self.host_data_bits in (64, 128, 256, 512), "must be 64, 128, 256 or 512")
        check("ch_data_bits", self.ch_data_bits in (32, 64, 128, 256, 512), "must be 32, 64, 128, 256 or 512")
        check("page_size", self.page_size in (512, 1024, 2048, 4096, 8192, 16384), "must be a power of two 512..16384")
        check("ways", 1 <= self.ways <= 16, "must be 1..16")
        check("max_tables", 1 <= self.max_tables <= 256, "must be 1..256")
        check("max_extents", 1 <= self.max_extents <= 64, "must be 1..64")
        check("pages_per_channel", self.pages_per_channel >= 1 and
              self.pages_per_channel & (self.pages_per_channel - 1) == 0, "must be a power of two")
        check("max_inflight", 1 <= self.max_inflight <= 64, "must be 1..64")
        check("max_row_bytes", self.max_row_bytes % 4 == 0 and 4 <= self.max_row_bytes <= self.page_size,
              "must be a multiple of 4 and at most page_size")

    @property
    def total_pages(self) -> int:
        return self.n_channels * self.pages_per_channel

    @property
    def channel_bytes(self) -> int:
        return self.pages_per_channel * self.page_size

    @property
    def regmap_hash(self) -> int:
        return REGMAP_HASH

    @property
    def build_id(self) -> int:
        text = repr(tuple((f.name, getattr(self, f.name)) for f in fields(self)))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")

    def id_value(self, reg: Register) -> int:
        """The value of an ID-block register for this build."""
        if reg.param is None:
            return reg.reset
        return getattr(self, reg.param) & 0xFFFF_FFFF

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def require(params) -> "Params":
        """``params`` when it is a Params; a TypeError naming what it is otherwise (the
        gateware components' constructors take nothing else)."""
        if not isinstance(params, Params):
            raise TypeError(f"params must be regmap.Params, not {type(params).__name__}")
        return params


def default_slots(params: Params) -> int:
    """Reorder-buffer slots of the default build: the next power of two of
    ``max(8, 2 * ways * n_channels, 4 * n_channels**2)``, at most 256 (the merger's limit).

    Lookups retire in request order, so the slots are a window over the request stream that
    moves at the pace of its most loaded channel. ``2 * ways * n_channels`` lets every page
    register have a read in flight and one queued; random lookups also need the window to hold
    enough per channel (``4 * n_channels``) that the busiest channel's share of it stays close
    to the mean. The rule is the smallest that reaches >= 90% of the flash bound for every 1..8
    x 1..8 build at tR 1000 and 2500 (``evssd bench rtl --sweep``, docs/benchmarks.md). Defined
    here (pure Python) because the device (``hw/device/top.py``) and the host's timing model
    (``host/timing.py``) both size by it."""
    c, w = params.n_channels, params.ways
    want = max(8, 2 * w * c, 4 * c * c)
    return min(1 << (want - 1).bit_length(), 256)


#: reads a channel holds in front of its page-register decision besides its read queue: the
#: head and the spare of :class:`~evssd.hw.device.read_intake.ReadIntake`'s request stage
READ_INTAKE_ENTRIES = 2


def default_read_queue(params: Params, n_slots: int | None = None) -> int:
    """Entries of the per-channel read queue between the FTL demux and each channel
    (``hw/device/top.py``) in the default build: ``max(2 * ways, n_slots // n_channels)``
    (``n_slots``: the build's reorder-buffer slots, :func:`default_slots` unless given).

    The demux passes lookups in request order, so a lookup for a channel with no room holds
    back every lookup behind it while the other channels run dry; a channel takes a read into
    its page-register decision only once a register is free (a way serves one tR and data
    phase at a time), so the reads of the reorder window wait in this queue. ``n_slots //
    n_channels`` holds a channel's mean share of the window (a channel never has more than
    ``n_slots`` reads outstanding); ``2 * ways`` (every register a read in flight and one
    queued) only matters for builds with fewer slots than the default. In the timing model,
    which models the queue (:func:`channel_accept_depth`), every 1..8 x 1..8 default build takes
    the cycles it takes with no limit, except 4 x 1 and 5 x 1 (0.1% more; docs/benchmarks.md).
    Defined here (pure Python) because the device and the host's timing model
    (``host/timing.py``) both size by it."""
    if n_slots is None:
        n_slots = default_slots(params)
    return max(2 * params.ways, n_slots // params.n_channels)


def channel_accept_depth(params: Params, n_slots: int | None = None,
                         read_queue: int | None = None) -> int:
    """Reads one channel holds waiting for its page-register decision: the read queue
    (:func:`default_read_queue` unless given) and :data:`READ_INTAKE_ENTRIES`. The timing model
    lets a read into its channel only while fewer than this many wait there."""
    if read_queue is None:
        read_queue = default_read_queue(params, n_slots)
    return read_queue + READ_INTAKE_ENTRIES


def _content_hash() -> int:
    parts = [repr(MAGIC), repr(REGMAP_VERSION[0])]
    for r in REGISTERS:
        parts.append(repr((r.name, r.addr, r.param, r.per_channel,
                           tuple((f.name, f.lsb, f.width, f.access.value, f.reset) for f in r.fields))))
    parts += [repr((CHANNEL_BLOCK, CHANNEL_STRIDE)), Command._FMT, repr(COMPLETION_BYTES),
              repr(sorted((e.name, e.value) for e in Opcode)),
              repr(sorted((e.name, e.value) for e in Status)),
              repr(sorted((e.name, e.value) for e in ElemType))]
    return int.from_bytes(hashlib.sha256("\n".join(parts).encode()).digest()[:4], "little")


REGMAP_HASH = _content_hash()
