"""cocotb bench behind the ``rtl`` backend: serves a host process's transport requests on the RTL.

The host (:class:`evssd.sim.rtl_transport.RtlTransport`) listens on a unix socket and starts
this bench through :mod:`evssd.sim.rtl_child`; the bench connects, sends its hello and then
executes the requests of :mod:`evssd.sim.rtl_protocol` through the ordinary
:class:`~evssd.sim.transport.CocotbTransport` (AXI-Lite master, host memory and flash channels
as AxiRams). Between requests it polls the socket without blocking every ``poll_cycles`` clock
cycles, so simulated time goes on while the host computes; after a long idle stretch it also
sleeps up to ``IDLE_SLEEP`` seconds per poll so that an idle simulator does not spin a core.
The bench ends when the host sends CLOSE or the connection drops.

Configuration comes as JSON in ``EVSSD_RTL_SERVER``: ``socket``, ``host_memory_bytes``,
``poll_cycles``, ``stall`` (probability of a random stall on every AXI channel), ``seed``,
``io_timeout`` (seconds to receive the rest of a frame or send a response).
"""
from __future__ import annotations

import json
import os
import random
import select
import socket

import cocotb
from cocotb.triggers import ClockCycles

from evssd.host.regfile import MMIOError
from evssd.sim.rtl_protocol import CONFIG_ENV, REQUEST, Op, Status, encode_response, recv_exact
from evssd.sim.runner import load_meta
from evssd.sim.transport import CocotbTransport, start_clock_and_reset

#: idle polls (of poll_cycles each) before the server starts sleeping between polls
IDLE_POLLS = 2000
#: the longest wall-clock sleep per poll once idle (seconds)
IDLE_SLEEP = 0.005


async def _execute(transport: CocotbTransport, op: int, addr: int, arg0: int, arg1: int,
                   payload: bytes) -> bytes:
    """One request on the RTL; returns the encoded response."""
    try:
        if op == Op.READ32:
            return encode_response(Status.OK, await transport.read32(addr))
        if op == Op.WRITE32:
            await transport.write32(addr, arg0, arg1)
            return encode_response(Status.OK)
        if op == Op.MEM_WRITE:
            await transport.mem_write(addr, payload)
            return encode_response(Status.OK)
        if op == Op.MEM_READ:
            return encode_response(Status.OK, 0, await transport.mem_read(addr, arg0))
        if op == Op.WAIT:
            await transport.wait()
            return encode_response(Status.OK)
        return encode_response(Status.ERROR, 0, f"unknown request op {op}".encode())
    except MMIOError as exc:
        return encode_response(Status.MMIO_ERROR, exc.resp)
    except Exception as exc:  # reported to the host, which raises it; the server goes on
        return encode_response(Status.ERROR, 0, f"{type(exc).__name__}: {exc}".encode())


@cocotb.test()
async def serve(dut):
    cfg = json.loads(os.environ[CONFIG_ENV])
    params = load_meta()["params"]
    poll_cycles = int(cfg["poll_cycles"])
    await start_clock_and_reset(dut)
    transport = CocotbTransport(dut, host_memory_bytes=int(cfg["host_memory_bytes"]),
                                poll_cycles=poll_cycles, params=params)
    if cfg.get("stall"):
        transport.set_backpressure(random.Random(cfg.get("seed", 0)), float(cfg["stall"]))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(float(cfg["io_timeout"]))
    sock.connect(cfg["socket"])
    try:
        hello = {"pid": os.getpid(), "host_base": transport.memory.base, "host_bytes": transport.memory.size,
                 "params": params.as_dict(), "poll_cycles": poll_cycles}
        sock.sendall(encode_response(Status.OK, 0, json.dumps(hello).encode()))
        idle = 0
        while True:
            sleep = IDLE_SLEEP if idle >= IDLE_POLLS else 0
            readable, _, _ = select.select([sock], [], [], sleep)
            if not readable:
                idle += 1
                await ClockCycles(dut.clk, poll_cycles)
                continue
            idle = 0
            try:
                op, addr, arg0, arg1, n = REQUEST.unpack(recv_exact(sock, REQUEST.size))
                payload = recv_exact(sock, n) if n else b""
            except EOFError:
                dut._log.warning("rtl server: the host closed the connection without CLOSE")
                return
            if op == Op.CLOSE:
                sock.sendall(encode_response(Status.OK))
                return
            sock.sendall(await _execute(transport, op, addr, arg0, arg1, payload))
    finally:
        sock.close()
