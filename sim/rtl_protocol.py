"""The request/response protocol between :class:`evssd.sim.rtl_transport.RtlTransport` (the host
process) and the cocotb server bench (:mod:`evssd.sim.tb_rtl_server`) running the RTL.

One stream socket, strictly one request then one response. Pure Python (no cocotb), so both
ends import the same definition.

- Request: ``REQUEST`` header (op, addr, arg0, arg1, payload length) + payload.
- Response: ``RESPONSE`` header (status, value, payload length) + payload.
- Right after connecting, the server sends one unsolicited ``OK`` response whose payload is the
  JSON hello (``HELLO_KEYS``): its pid, the host-memory window and the build parameters.

=========  ====================================  ==========================================
op         request                               response
=========  ====================================  ==========================================
READ32     addr                                  value = the register
WRITE32    addr, arg0 = value, arg1 = strobe     —
MEM_WRITE  addr, payload = the bytes             —
MEM_READ   addr, arg0 = byte count               payload = the bytes
WAIT       —                                     after an interrupt or the poll interval
CLOSE      —                                     then the server ends the simulation
=========  ====================================  ==========================================

A ``MMIO_ERROR`` response carries the AXI response code in ``value``; an ``ERROR`` response
carries the server's error message (UTF-8) as payload.
"""
from __future__ import annotations

import enum
import socket
import struct

__all__ = ["CONFIG_ENV", "Op", "Status", "REQUEST", "RESPONSE", "HELLO_KEYS", "MAX_PAYLOAD", "encode_request",
           "encode_response", "recv_exact"]

REQUEST = struct.Struct("<BQIII")    # op, addr, arg0, arg1, payload bytes
RESPONSE = struct.Struct("<BII")     # status, value, payload bytes
#: the largest payload either end accepts (a corrupt length must not allocate gigabytes)
MAX_PAYLOAD = 1 << 30
#: the environment variable that carries the server bench's JSON configuration
CONFIG_ENV = "EVSSD_RTL_SERVER"
HELLO_KEYS = ("pid", "host_base", "host_bytes", "params", "poll_cycles")


class Op(enum.IntEnum):
    READ32 = 1
    WRITE32 = 2
    MEM_WRITE = 3
    MEM_READ = 4
    WAIT = 5
    CLOSE = 6


class Status(enum.IntEnum):
    OK = 0
    MMIO_ERROR = 1
    ERROR = 2


def encode_request(op: Op, addr: int = 0, arg0: int = 0, arg1: int = 0, payload: bytes = b"") -> bytes:
    return REQUEST.pack(op, addr, arg0, arg1, len(payload)) + payload


def encode_response(status: Status, value: int = 0, payload: bytes = b"") -> bytes:
    return RESPONSE.pack(status, value & 0xFFFF_FFFF, len(payload)) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock`` (its own timeout applies to each ``recv``); EOFError when the
    other end closes first."""
    if n > MAX_PAYLOAD:
        raise ValueError(f"frame of {n} bytes exceeds the protocol's {MAX_PAYLOAD}")
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)
