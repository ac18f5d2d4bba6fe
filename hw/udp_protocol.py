"""The board's UDP host-link protocol: datagram layout, opcodes, statuses. The one definition
that the gateware (:mod:`evssd.hw.boards.udp_bridge`) and the host (:mod:`evssd.host.udp`) both import.

Pure Python, no Amaranth: the host library imports it at run time. The specification with the
reasoning is ``docs/udp-protocol.md``; the address map behind the bridge is the UART bridge's
(:mod:`evssd.hw.bridge_protocol`), so both boards answer the same addresses.

Every field is little-endian. A request and its response each fit one UDP datagram:

request (``REQ_HEADER`` = 16 bytes, then ``4 * count`` data bytes for WRITE)::

    0  MAGIC (u16 = 0x5645, "EV")   2  OP (u8)   3  STRB (u8, low 4 bits)
    4  SEQ (u32)                    8  ADDR (u32, 4-byte aligned)
    12 COUNT (u16, words 1..MAX_WORDS; 0 for PING)   14 reserved (u16, 0)

response (``RSP_HEADER`` = 16 bytes, then ``4 * count`` data bytes for READ with status OK)::

    0  MAGIC (u16)   2  OP (u8)   3  STATUS (u8)
    4  SEQ (u32, the request's)    8  RESP (u8: first non-OKAY AXI response, 0 = all OKAY)
    9  FLAGS (u8: bit 0 REPLAYED)  10 COUNT (u16, data words that follow)   12 reserved (u32, 0)
"""
from __future__ import annotations

import enum
import struct

from .bridge_protocol import Op  # the UART bridge's opcodes: PING, READ, WRITE

__all__ = ["MAGIC", "DEFAULT_PORT", "MAX_WORDS", "REQ_HEADER", "RSP_HEADER", "FLAG_REPLAYED", "Op",
           "UdpStatus", "seq_newer", "Request", "Reply", "encode_request", "decode_request", "encode_reply",
           "decode_reply", "ProtocolError"]

MAGIC = 0x5645            # "EV" as a little-endian u16: datagrams without it are not ours (dropped)
DEFAULT_PORT = 7788       # the board's UDP port
MAX_WORDS = 256           # words per datagram: 16 + 1024 bytes, well under a 1500-byte MTU
REQ_HEADER = 16
RSP_HEADER = 16
FLAG_REPLAYED = 0x01      # the answer to a resent WRITE the board had already executed

_REQ = struct.Struct("<HBBIIHH")
_RSP = struct.Struct("<HBBIBBHI")


class UdpStatus(enum.IntEnum):
    OK = 0x00
    BAD_OPCODE = 0x02    # unknown opcode: nothing was executed
    BAD_LENGTH = 0x04    # COUNT out of range, or the datagram's length does not match it: nothing executed
    STALE = 0x05         # a WRITE older than the board's last PING/WRITE (a delayed duplicate): not executed


def seq_newer(seq: int, last: int) -> bool:
    """``seq`` comes after ``last`` in serial-number arithmetic (RFC 1982 style, 32 bits): the
    distance ``seq - last`` mod 2**32 is in 1 .. 2**31 - 1. The gateware computes the same."""
    return 0 < ((seq - last) & 0xFFFF_FFFF) < (1 << 31)


class ProtocolError(ValueError):
    """A datagram that does not follow the format (names the bad field)."""


class Request:
    __slots__ = ("op", "strb", "seq", "addr", "count", "data")

    def __init__(self, op, strb, seq, addr, count, data=b""):
        self.op, self.strb, self.seq, self.addr, self.count, self.data = op, strb, seq, addr, count, data


class Reply:
    __slots__ = ("op", "status", "seq", "resp", "flags", "data")

    def __init__(self, op, status, seq, resp=0, flags=0, data=b""):
        self.op, self.status, self.seq, self.resp, self.flags, self.data = op, status, seq, resp, flags, data

    def __repr__(self):
        return (f"Reply(op={self.op}, status={self.status}, seq={self.seq}, resp={self.resp}, "
                f"flags={self.flags}, {len(self.data)} data bytes)")


def encode_request(op: int, seq: int, addr: int = 0, count: int = 0, strb: int = 0xF,
                   data: bytes = b"") -> bytes:
    """One request datagram (validated: a bad argument raises ValueError naming it)."""
    if op not in tuple(Op):
        raise ValueError(f"op {op!r} is not one of {[o.name for o in Op]}")
    if not 0 <= seq < (1 << 32):
        raise ValueError(f"seq {seq} must be a 32-bit unsigned number")
    if not 0 <= addr < (1 << 32) or addr % 4:
        raise ValueError(f"bridge address 0x{addr:x} must be a 4-byte aligned 32-bit address")
    if op != Op.PING and not 1 <= count <= MAX_WORDS:
        raise ValueError(f"word count {count} out of range 1..{MAX_WORDS}")
    if op == Op.PING:
        count = 0
    if op == Op.WRITE:
        if len(data) != 4 * count:
            raise ValueError(f"WRITE of {count} words needs {4 * count} data bytes, got {len(data)}")
    elif data:
        raise ValueError(f"{Op(op).name} carries no data ({len(data)} bytes given)")
    return _REQ.pack(MAGIC, op, strb & 0xF, seq, addr, count, 0) + bytes(data)


def decode_request(datagram: bytes) -> Request:
    """Parse a request without judging it (the bridge decides what is executed)."""
    if len(datagram) < REQ_HEADER:
        raise ProtocolError(f"request of {len(datagram)} bytes is shorter than the {REQ_HEADER}-byte header")
    magic, op, strb, seq, addr, count, _ = _REQ.unpack_from(datagram)
    if magic != MAGIC:
        raise ProtocolError(f"request magic 0x{magic:04x}, expected 0x{MAGIC:04x}")
    return Request(op, strb & 0xF, seq, addr, count, bytes(datagram[REQ_HEADER:]))


def encode_reply(r: Reply) -> bytes:
    return _RSP.pack(MAGIC, r.op, r.status, r.seq, r.resp, r.flags, len(r.data) // 4, 0) + bytes(r.data)


def decode_reply(datagram: bytes) -> Reply:
    """Parse a response; a datagram that is not one (short, wrong magic, length not matching
    COUNT) raises :class:`ProtocolError`."""
    if len(datagram) < RSP_HEADER:
        raise ProtocolError(f"response of {len(datagram)} bytes is shorter than the {RSP_HEADER}-byte header")
    magic, op, status, seq, resp, flags, count, _ = _RSP.unpack_from(datagram)
    if magic != MAGIC:
        raise ProtocolError(f"response magic 0x{magic:04x}, expected 0x{MAGIC:04x}")
    if len(datagram) != RSP_HEADER + 4 * count:
        raise ProtocolError(f"response of {len(datagram)} bytes does not match COUNT {count}")
    return Reply(op, status, seq, resp, flags, bytes(datagram[RSP_HEADER:]))
