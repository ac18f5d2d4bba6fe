"""Wire formats of the serving layer.

Two levels, both little-endian:

* **Frames** (transport level, what the TCP provider puts on a socket): a fixed 20-byte header
  ``magic u32 | version u8 | op u8 | flags u16 | request id u64 | length u32`` and ``length``
  payload bytes. Ops mirror RDMA verbs: HELLO/HELLO_ACK (connection set-up, carries the credit
  count), SEND (two-sided message), READ_REQ/READ_RESP (one-sided read of a registered region),
  ERROR (the peer rejected a frame; ``request id`` names which one).
* **Application messages** (carried inside SEND): requests to an embedding server (META, GATHER,
  POOLED, ECHO) and their replies (OK with a float32 matrix or JSON, or ERR with a message).

Everything that can be malformed raises :class:`ProtocolError` with a message naming the bad
field, so a server can answer with ERR and keep the connection.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

__all__ = [
    "MAGIC", "VERSION", "HEADER", "MAX_PAYLOAD", "Op", "MsgType", "Status", "ProtocolError",
    "VersionMismatch", "Header", "pack_header", "unpack_header", "unpack_header_from", "pack_read_req",
    "unpack_read_req", "Request", "encode_request", "decode_request", "encode_ok_array",
    "encode_ok_json", "encode_err", "decode_reply", "RemoteError", "encode_multi", "decode_multi",
    "encode_ok_multi", "echo_reply",
]

MAGIC = 0x44535645          # b"EVSD" read as a little-endian u32
VERSION = 1
HEADER = struct.Struct("<IBBHQI")
assert HEADER.size == 20
MAX_PAYLOAD = 64 << 20      # a frame longer than this is malformed, not a big request
READ_REQ = struct.Struct("<IQI")   # rkey, offset, length


class Op(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    SEND = 3
    READ_REQ = 4
    READ_RESP = 5
    ERROR = 6


class Status(IntEnum):
    OK = 0
    ERR = 1


class MsgType(IntEnum):
    META = 1
    GATHER = 2
    POOLED = 3
    ECHO = 4
    MULTI = 5      # several requests in one message (one per table for a server): one reply


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol."""


class VersionMismatch(ProtocolError):
    pass


class RemoteError(RuntimeError):
    """The peer answered a request with an error message."""


class Header(NamedTuple):
    """A checked frame header (a tuple: built once per frame on the data path)."""
    op: int
    flags: int
    req_id: int
    length: int


_OPS = frozenset(int(o) for o in Op)
_new_header = Header._make


def pack_header(op: int, req_id: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, flags, req_id, length)


def unpack_header(buf) -> Header:
    return unpack_header_from(buf, 0)


def unpack_header_from(buf, offset: int) -> Header:
    """The header at ``offset`` of ``buf`` (no slice needed), checked field by field."""
    magic, version, op, flags, req_id, length = HEADER.unpack_from(buf, offset)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not an evssd peer")
    if version != VERSION:
        raise VersionMismatch(f"protocol version mismatch: peer speaks v{version}, we speak v{VERSION}")
    if op not in _OPS:
        raise ProtocolError(f"unknown op {op}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_PAYLOAD}-byte limit")
    return _new_header((op, flags, req_id, length))


def pack_read_req(rkey: int, offset: int, length: int) -> bytes:
    return READ_REQ.pack(rkey, offset, length)


def unpack_read_req(buf) -> tuple[int, int, int]:
    if len(buf) != READ_REQ.size:
        raise ProtocolError(f"READ_REQ payload is {len(buf)} bytes, expected {READ_REQ.size}")
    return READ_REQ.unpack(buf)


# ---------------------------------------------------------------- application messages
# request: type u8 | name_len u8 | n_indices u32 | n_offsets u32 | name | i64 indices | i64 offsets
_REQ = struct.Struct("<BBII")
# reply: status u8 | kind u8 (0 array, 1 json, 2 text) | rows u32 | cols u32 | body
_REP = struct.Struct("<BBII")


@dataclass
class Request:
    type: MsgType
    table: str = ""
    indices: np.ndarray | None = None
    offsets: np.ndarray | None = None
    payload: bytes = b""          # ECHO only


def encode_request(req: Request) -> bytes:
    name = req.table.encode()
    if len(name) > 255:
        raise ProtocolError(f"table name {req.table!r} longer than 255 bytes")
    if req.type == MsgType.ECHO:
        return _REQ.pack(req.type, 0, len(req.payload), 0) + req.payload
    idx = np.ascontiguousarray(req.indices if req.indices is not None else [], dtype="<i8")
    off = np.ascontiguousarray(req.offsets if req.offsets is not None else [], dtype="<i8")
    return b"".join((_REQ.pack(req.type, len(name), idx.size, off.size), name,
                     idx.tobytes(), off.tobytes()))


_MSG_TYPES = {int(m): m for m in MsgType}
_ECHO = MsgType.ECHO


def decode_request(buf) -> Request:
    buf = memoryview(buf)
    if len(buf) < _REQ.size:
        raise ProtocolError(f"request of {len(buf)} bytes is shorter than its {_REQ.size}-byte header")
    typ, name_len, n_idx, n_off = _REQ.unpack_from(buf)
    typ = _MSG_TYPES.get(typ, typ)
    if type(typ) is int:
        raise ProtocolError(f"unknown request type {typ}")
    if typ is _ECHO:
        if len(buf) != _REQ.size + n_idx:
            raise ProtocolError("ECHO length field does not match the message")
        return Request(typ, payload=bytes(buf[_REQ.size:]))
    want = _REQ.size + name_len + 8 * (n_idx + n_off)
    if len(buf) != want:
        raise ProtocolError(f"request length {len(buf)} does not match its header ({want})")
    p = _REQ.size
    try:
        table = bytes(buf[p:p + name_len]).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"table name is not UTF-8: {exc}") from None
    p += name_len
    idx = np.frombuffer(buf, dtype="<i8", count=n_idx, offset=p)
    off = np.frombuffer(buf, dtype="<i8", count=n_off, offset=p + 8 * n_idx)
    return Request(typ, table, idx, off)


_LEN = struct.Struct("<I")


def _pack_list(parts) -> bytes:
    return b"".join([_LEN.pack(len(parts))] + [_LEN.pack(len(p)) + p for p in parts])


def _unpack_list(buf) -> list:
    buf = memoryview(buf)
    if len(buf) < 4:
        raise ProtocolError("list of messages shorter than its count")
    n = _LEN.unpack_from(buf)[0]
    p, out = 4, []
    for i in range(n):
        if p + 4 > len(buf):
            raise ProtocolError(f"list of {n} messages truncated at entry {i}")
        k = _LEN.unpack_from(buf, p)[0]
        if p + 4 + k > len(buf):
            raise ProtocolError(f"entry {i} of {k} bytes runs past the message")
        out.append(buf[p + 4:p + 4 + k])
        p += 4 + k
    if p != len(buf):
        raise ProtocolError(f"{len(buf) - p} stray bytes after {n} messages")
    return out


def encode_multi(requests: list[bytes]) -> bytes:
    """Several encoded requests as one MULTI request."""
    return _REQ.pack(MsgType.MULTI, 0, 0, 0) + _pack_list(requests)


def decode_multi(buf) -> list:
    """The encoded sub-requests of a MULTI request (as memoryviews)."""
    buf = memoryview(buf)
    typ = buf[0] if len(buf) else None
    if typ != MsgType.MULTI:
        raise ProtocolError(f"not a MULTI request (type {typ})")
    subs = _unpack_list(buf[_REQ.size:])
    for i, sub in enumerate(subs):
        if len(sub) and sub[0] == MsgType.MULTI:
            raise ProtocolError(f"MULTI entry {i} is itself a MULTI")
    return subs


def encode_ok_multi(replies: list[bytes]) -> bytes:
    return _REP.pack(Status.OK, 3, len(replies), 0) + _pack_list(replies)


def encode_ok_array(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    if arr.ndim != 2:
        raise ValueError(f"reply arrays are 2-D, got shape {arr.shape}")
    return _REP.pack(Status.OK, 0, arr.shape[0], arr.shape[1]) + arr.tobytes()


def encode_ok_json(obj) -> bytes:
    return _REP.pack(Status.OK, 1, 0, 0) + json.dumps(obj).encode()


def encode_ok_bytes(data: bytes) -> bytes:
    return _REP.pack(Status.OK, 2, 0, 0) + data


def encode_err(message: str) -> bytes:
    return _REP.pack(Status.ERR, 2, 0, 0) + message.encode()


_OK_BYTES = encode_ok_bytes(b"")
_ECHO_INT = int(MsgType.ECHO)
_REQ_SIZE, _REQ_UNPACK = _REQ.size, _REQ.unpack_from


def echo_reply(buf) -> bytes:
    """The encoded reply to an encoded ECHO request: its payload back, as
    ``encode_ok_bytes(decode_request(buf).payload)`` would make it, with no request object and
    one copy (an echo server's whole work per request)."""
    n = len(buf)
    if n >= _REQ_SIZE:
        typ, _, length, _ = _REQ_UNPACK(buf)
        if typ == _ECHO_INT and n == _REQ_SIZE + length:
            return b"".join((_OK_BYTES, buf[_REQ_SIZE:]))
        if typ != _ECHO_INT:
            raise ProtocolError(f"not an ECHO request (type {typ})")
        raise ProtocolError("ECHO length field does not match the message")
    raise ProtocolError(f"request of {n} bytes is shorter than its {_REQ_SIZE}-byte header")


_OK, _ERR, _REP_SIZE, _REP_UNPACK = int(Status.OK), int(Status.ERR), _REP.size, _REP.unpack_from


def decode_reply(buf):
    """Return a float32 array, a JSON object or bytes; raise :class:`RemoteError` on ERR."""
    if len(buf) < _REP_SIZE:
        raise ProtocolError(f"reply of {len(buf)} bytes is shorter than its header")
    status, kind, rows, cols = _REP_UNPACK(buf)
    if kind == 2 and status == _OK:
        body = buf[_REP_SIZE:]             # bytes (ECHO): no view needed
        return body.tobytes() if type(body) is memoryview else bytes(body)
    buf = memoryview(buf)
    body = buf[_REP_SIZE:]
    if status != _OK:
        if status == _ERR:
            raise RemoteError(bytes(body).decode(errors="replace"))
        raise ProtocolError(f"unknown reply status {status}")
    if kind == 2:
        return bytes(body)
    if kind == 0:
        if len(body) != rows * cols * 4:
            raise ProtocolError(f"array reply of {len(body)} bytes does not hold {rows}x{cols} float32")
        return np.frombuffer(body, dtype="<f4").reshape(rows, cols)
    if kind == 1:
        return json.loads(bytes(body))
    if kind == 3:
        # one result per sub-request; a failed sub-request is its RemoteError, not raised
        out = []
        for sub in _unpack_list(body):
            try:
                out.append(decode_reply(sub))
            except RemoteError as exc:
                out.append(exc)
        return out
    raise ProtocolError(f"unknown reply kind {kind}")
