"""The board's UART-to-AXI-Lite bridge protocol and address map: the one definition that the
gateware (:mod:`evssd.hw.boards.uart`, :mod:`evssd.hw.boards.board`) and the host (:mod:`evssd.host.uart`)
both import.

Pure Python, no Amaranth: the host library imports it at run time. The frame format is in
``docs/uart-protocol.md``.
"""
from __future__ import annotations

import enum

__all__ = ["SOF_REQUEST", "SOF_RESPONSE", "MAX_WORDS", "CRC8_POLY", "Op", "FrameStatus", "crc8_byte",
           "crc8", "MMIO_BASE", "BOARD_INFO_BASE", "BOARD_INFO_BYTES", "WINDOW_BASE", "BOARD_MAGIC",
           "BOARD_VERSION", "BOARD_INFO", "DRAM_CTRL_BASE", "DRAM_CTRL_BYTES"]

SOF_REQUEST = 0xA5
SOF_RESPONSE = 0x5A
MAX_WORDS = 256          # words per frame: COUNT holds words - 1 in one byte
CRC8_POLY = 0x07         # CRC-8 (x^8 + x^2 + x + 1), init 0, no reflection, no final xor (CRC-8/SMBUS)


class Op(enum.IntEnum):
    PING = 0x00
    READ = 0x01
    WRITE = 0x02


class FrameStatus(enum.IntEnum):
    OK = 0x00
    CRC_ERROR = 0x01     # checksum mismatch: nothing was executed
    BAD_OPCODE = 0x02    # unknown opcode: nothing was executed
    TIMEOUT = 0x03       # the line went idle in the middle of a frame: nothing was executed


def crc8_byte(crc: int, byte: int) -> int:
    """One byte of the CRC-8 update, bit-serial (the definition the gateware's XOR network is
    derived from at elaboration time)."""
    crc ^= byte
    for _ in range(8):
        crc = ((crc << 1) ^ CRC8_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


_CRC_TABLE = [crc8_byte(0, b) for b in range(256)]


def crc8(data: bytes, crc: int = 0) -> int:
    """CRC-8 of ``data`` (table-driven; equal to :func:`crc8_byte` byte by byte)."""
    for b in data:
        crc = _CRC_TABLE[crc ^ b]
    return crc


# The bridge's 32-bit address map on the board (hw/boards/board.py decodes it).
MMIO_BASE = 0x0000_0000        # the EV-SSD registers (4 KiB)
BOARD_INFO_BASE = 0x0F00_0000  # read-only board description (BOARD_INFO words below)
BOARD_INFO_BYTES = 0x100
WINDOW_BASE = 0x1000_0000      # the host-memory BRAM window; the device's DMA uses the same addresses
DRAM_CTRL_BASE = 0x0E00_0000   # ECPIX-5 only: LiteDRAM's control/status registers (DDR3 init, levelling)
DRAM_CTRL_BYTES = 0x1_0000
BOARD_MAGIC = 0x44425645       # "EVBD" read as a little-endian word
BOARD_VERSION = 1
BOARD_INFO = ("magic", "window_base", "window_bytes", "clock_hz", "divisor", "version")
