"""The ``udp`` backend: the driver talks to a board over UDP/IP (the ECPIX-5's Gigabit Ethernet).

Three layers, as on the UART link (:mod:`evssd.host.uart`), so the same protocol code runs
against a board (real sockets) and against the RTL in a cocotb test (:mod:`evssd.sim.tb_ecpix5`):

- :class:`DatagramLink`: an async datagram pipe whose ``recv`` gives up after the link's timeout
  (:class:`UdpSocketLink` over a UDP socket; the cocotb bench drives the gateware's UDP port).
- :class:`UdpProtocol`: request/response datagrams (``docs/udp-protocol.md``): a sequence
  number per request, retransmission of the same datagram on timeout, stale and foreign
  answers skipped. The board suppresses a resent WRITE by its sequence number, so every request,
  WRITE included, is retried safely: unlike the UART link, a lost answer never leaves a write
  "may or may not have happened".
- :class:`UdpTransport`: the driver's transport (:class:`~evssd.host.bridge_transport.BridgeTransport`:
  the same address map as the UART board). Opening it brings the board's DDR3 up when the board
  says it is not calibrated yet (:mod:`evssd.host.dram_init`; ``dram_init=``).

:class:`UdpBridgeModel` is the datagram-level golden model of the gateware bridge
(:class:`evssd.hw.boards.udp_bridge.UdpAxiBridge`). No Amaranth here: the datagram format comes from
the pure-Python :mod:`evssd.hw.udp_protocol`.
"""
from __future__ import annotations

import abc
import asyncio
import secrets
import socket
import time

from evssd.hw.udp_protocol import (DEFAULT_PORT, FLAG_REPLAYED, MAX_WORDS, REQ_HEADER, Op, ProtocolError,
                                   Reply, UdpStatus, seq_newer, decode_reply, decode_request, encode_reply,
                                   encode_request)
from evssd.host.bridge_transport import BridgeProtocol, BridgeTransport
from evssd.host.transport import TransportError
from evssd.host.uart import LinkTimeoutError

__all__ = ["DatagramLink", "UdpSocketLink", "UdpProtocol", "UdpTransport", "UdpBridgeModel",
           "LinkTimeoutError", "DEFAULT_PORT"]


class DatagramLink(abc.ABC):
    """An async datagram pipe to one board. ``recv`` returns one datagram or raises
    :class:`LinkTimeoutError` after the link's timeout."""

    name = "udp"

    @abc.abstractmethod
    async def send(self, datagram: bytes) -> None: ...

    @abc.abstractmethod
    async def recv(self) -> bytes: ...

    @abc.abstractmethod
    async def pause(self) -> None:
        """Let time pass (the driver's poll interval)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` in the board's time (the DDR3 bring-up's waits)."""
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        pass


class UdpSocketLink(DatagramLink):
    """A connected UDP socket (datagrams from any other address are dropped by the kernel).
    Calls block the event loop for at most ``timeout`` seconds: the driver is sequential, and a
    board that does not answer must not hang the caller."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, *, timeout: float = 0.2, poll: float = 0.0005):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port {port!r} must be a UDP port number 1..65535")
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} must be positive seconds")
        self.name = f"udp:{host}:{port}"
        self.timeout, self.poll = timeout, poll
        try:
            addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        except (socket.gaierror, UnicodeError) as exc:
            raise TransportError(f"{self.name}: cannot resolve host {host!r}: {exc}") from None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.connect(addr)
            self._sock.settimeout(timeout)
        except OSError as exc:
            self._sock.close()
            raise TransportError(f"{self.name}: cannot open the socket: {exc}") from None

    async def send(self, datagram: bytes) -> None:
        try:
            self._sock.send(datagram)
        except OSError as exc:
            raise TransportError(f"{self.name}: send failed: {exc}") from None

    async def recv(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._sock.recv(65536)
            except socket.timeout:
                raise LinkTimeoutError(f"{self.name}: no answer within {self.timeout} s") from None
            except ConnectionRefusedError:
                # ICMP port unreachable from an earlier datagram: nothing listens there (yet);
                # keep waiting out this request's timeout, the retransmission may be answered.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LinkTimeoutError(f"{self.name}: no answer within {self.timeout} s "
                                           f"(port unreachable)") from None
                await asyncio.sleep(min(left, 0.01))
            except OSError as exc:
                raise TransportError(f"{self.name}: receive failed: {exc}") from None

    async def pause(self) -> None:
        await asyncio.sleep(self.poll)

    async def close(self) -> None:
        self._sock.close()


class UdpProtocol(BridgeProtocol):
    """Request/response datagrams over a :class:`DatagramLink`.

    Each new request takes the next sequence number (the first is random, so a restarted host
    does not reuse the number of the board's last WRITE); a request that is not answered within
    the link's timeout is sent again unchanged, up to ``retries`` times. Answers with another
    sequence number (late answers to an earlier attempt) and datagrams that are not responses
    are skipped, within a budget, so a flood cannot hold the caller.
    """

    max_words = MAX_WORDS

    def __init__(self, link: DatagramLink, *, retries: int = 4, first_seq: int | None = None):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries {retries!r} must be an integer >= 0")
        self.link = link
        self.retries = retries
        self._seq = secrets.randbits(32) if first_seq is None else first_seq & 0xFFFF_FFFF
        self.stats = {"requests": 0, "datagrams": 0, "retransmissions": 0, "stale": 0, "garbled": 0,
                      "replayed": 0}

    async def transact(self, op: int, addr: int = 0, count: int = 0, strb: int = 0xF,
                       data: bytes = b"") -> Reply:
        self._seq = (self._seq + 1) & 0xFFFF_FFFF
        seq = self._seq
        datagram = encode_request(op, seq, addr, count, strb, data)
        self.stats["requests"] += 1
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retransmissions"] += 1
            await self.link.send(datagram)
            self.stats["datagrams"] += 1
            try:
                reply = await self._answer(op, seq)
            except LinkTimeoutError:
                continue
            if reply.status == UdpStatus.STALE:
                raise TransportError(f"{self.link.name}: WRITE at 0x{addr:08x} refused as STALE: the board "
                                     f"executed a newer request (another host on this board?); not written")
            if reply.status != UdpStatus.OK:
                raise TransportError(f"{self.link.name}: the bridge answered {_status_name(reply.status)} "
                                     f"to {Op(op).name} at 0x{addr:08x}")
            if reply.flags & FLAG_REPLAYED:
                self.stats["replayed"] += 1
            want = 4 * count if op == Op.READ else 0
            if len(reply.data) != want:
                raise TransportError(f"{self.link.name}: {Op(op).name} at 0x{addr:08x} answered "
                                     f"{len(reply.data)} data bytes, expected {want}")
            return reply
        raise LinkTimeoutError(f"{self.link.name}: {Op(op).name} at 0x{addr:08x} not answered after "
                               f"{self.retries + 1} attempts: is the board configured, its link up, "
                               f"and this its address?")

    async def _answer(self, op: int, seq: int) -> Reply:
        for _ in range(64):
            datagram = await self.link.recv()
            try:
                reply = decode_reply(datagram)
            except ProtocolError:
                self.stats["garbled"] += 1
                continue
            if reply.seq == seq and reply.op == op:
                return reply
            self.stats["stale"] += 1
        raise TransportError(f"{self.link.name}: 64 datagrams without the answer to request {seq}")

    async def ping(self) -> None:
        await self.transact(Op.PING)

    async def read_words(self, addr: int, count: int) -> tuple[bytes, int]:
        reply = await self.transact(Op.READ, addr, count)
        return reply.data, reply.resp

    async def write_words(self, addr: int, data: bytes, strb: int = 0xF) -> int:
        if len(data) % 4:
            raise ValueError(f"write_words takes whole words, got {len(data)} bytes")
        reply = await self.transact(Op.WRITE, addr, len(data) // 4, strb, data)
        return reply.resp

    async def pause(self) -> None:
        await self.link.pause()

    async def close(self) -> None:
        await self.link.close()


def _status_name(status: int) -> str:
    try:
        return UdpStatus(status).name
    except ValueError:
        return f"status 0x{status:02x}"


class UdpTransport(BridgeTransport):
    """The driver's transport to a board over UDP.

    ``UdpTransport(host="192.168.1.50", port=7788)`` opens a socket; ``UdpTransport(link=...)``
    runs over any :class:`DatagramLink` (the cocotb bench: ``await UdpTransport.create(link=...)``).
    The constructor pings the board and reads its info block, raising :class:`TransportError`
    when nothing answers within ``(retries + 1) * link_timeout`` seconds.

    Then the DDR3 (the flash channels' memory): ``dram_init="auto"`` (default) reads LiteDRAM's
    ``init_done`` and, when it is 0 (a freshly configured board), runs the DDR3 initialisation and
    read levelling (:func:`evssd.host.dram_init.init_dram`, about 2,200 requests: well under a
    second on Gigabit Ethernet); ``True`` runs it whatever the board says (the DRAM's contents, i.e.
    the emulated flash, are lost: the chip is reset), ``False`` never does.
    The outcome is in :attr:`dram` (a :class:`~evssd.host.dram_init.DramInitResult`); a failure
    is a :class:`~evssd.host.dram_init.DramInitError` naming the lane, and the transport is closed.
    ``dram_data``: the LiteDRAM core's bring-up data (default: the committed copy of the build's).
    """

    name = "udp"

    def __init__(self, host: str | None = None, port: int = DEFAULT_PORT, *, link: DatagramLink | None = None,
                 link_timeout: float = 0.2, poll: float = 0.0005, retries: int = 4, connect: bool = True,
                 dram_init: bool | str = "auto", dram_data=None):
        if dram_init not in ("auto", True, False):
            raise ValueError(f"dram_init={dram_init!r}: choose 'auto' (when the board is not calibrated), "
                             f"True (always) or False (never)")
        self.dram_init, self._dram_data, self.dram = dram_init, dram_data, None
        if link is None:
            if host is None:
                raise ValueError("UdpTransport needs host= (the board's IP address) or link=")
            link = UdpSocketLink(host, port, timeout=link_timeout, poll=poll)
        self._attach(link, UdpProtocol(link, retries=retries), connect)

    async def connect(self) -> None:
        await super().connect()
        if self.dram_init is False:
            return
        from evssd.host.dram_init import (BridgeCsrBus, DramController, DramInitResult, dram_ready, init_dram,
                                          load_dram_data)
        data = self._dram_data if hasattr(self._dram_data, "registers") else load_dram_data(self._dram_data)
        ctrl = DramController(BridgeCsrBus(self.proto, self.name), data)
        if self.dram_init == "auto" and await dram_ready(ctrl):
            self.dram = DramInitResult([], ran=False)
            return
        self.dram = await init_dram(ctrl, sleep=self.link.sleep)


class UdpBridgeModel:
    """Datagram-level golden model of :class:`evssd.hw.boards.udp_bridge.UdpAxiBridge`.

    ``handle(datagram, error=False)`` returns the response datagram, or None when the bridge
    drops the datagram (not ours: short or wrong magic; or received with an Ethernet/IP error).
    ``bus_read(addr) -> (data, resp)`` and ``bus_write(addr, data, strb) -> resp`` are the
    AXI4-Lite side. The board keeps one sequence number, ``last_seq``, with ``last_resp``: a PING
    sets them (``resp`` 0), so a host starts its session with a PING; an executed WRITE sets them.
    A WRITE whose number equals ``last_seq`` is answered from ``last_resp`` (flag REPLAYED)
    without touching the bus; one older than ``last_seq`` is answered STALE, not executed.
    READs are executed whatever their number (they change nothing).
    """

    def __init__(self, bus_read, bus_write):
        self.bus_read, self.bus_write = bus_read, bus_write
        self.last_seq, self.last_resp = 0, 0    # the gateware's reset values

    def handle(self, datagram: bytes, error: bool = False) -> bytes | None:
        if error:
            return None
        try:
            req = decode_request(datagram)
        except ProtocolError:
            return None
        if req.op not in (Op.PING, Op.READ, Op.WRITE):
            return encode_reply(Reply(req.op, UdpStatus.BAD_OPCODE, req.seq))
        n_data = 4 * req.count if req.op == Op.WRITE else 0
        count_ok = req.count == 0 if req.op == Op.PING else 1 <= req.count <= MAX_WORDS
        if not count_ok or len(datagram) != REQ_HEADER + n_data:
            return encode_reply(Reply(req.op, UdpStatus.BAD_LENGTH, req.seq))
        if req.op == Op.PING:
            self.last_seq, self.last_resp = req.seq, 0
            return encode_reply(Reply(req.op, UdpStatus.OK, req.seq))
        if req.op == Op.WRITE and req.seq == self.last_seq:
            return encode_reply(Reply(req.op, UdpStatus.OK, req.seq, self.last_resp, FLAG_REPLAYED))
        if req.op == Op.WRITE and not seq_newer(req.seq, self.last_seq):
            return encode_reply(Reply(req.op, UdpStatus.STALE, req.seq))
        first = 0
        data = bytearray()
        for i in range(req.count):
            a = (req.addr + 4 * i) & 0xFFFF_FFFF
            if req.op == Op.READ:
                word, resp = self.bus_read(a)
                data += int(word).to_bytes(4, "little")
            else:
                resp = self.bus_write(a, int.from_bytes(req.data[4 * i:4 * i + 4], "little"), req.strb)
            first = first or resp
        if req.op == Op.WRITE:
            self.last_seq, self.last_resp = req.seq, first
        return encode_reply(Reply(req.op, UdpStatus.OK, req.seq, first, 0, bytes(data)))
