"""The RDMA engine's provider interface: what both ``verbs`` and ``tcp`` implement.

The vocabulary is the verbs one, so code above it reads like RDMA code:

* a :class:`Provider` is a protection domain: it registers memory regions (:meth:`reg_mr`)
  that peers may read one-sidedly by key at ``addr + offset``, and creates connected queue
  pairs;
* a :class:`QueuePair` (reliable connected) takes work requests: ``post_send`` (two-sided
  message, consumed by a receive the peer posted), ``post_recv`` (a buffer for the next
  incoming SEND) and ``post_read`` (one-sided: copies bytes of a remote registered region into
  a local buffer; the remote application is not involved);
* completions come out of the queue pair's completion queue (:meth:`QueuePair.poll_cq`) as
  :class:`WorkCompletion` records; a failed connection yields one ``FATAL`` completion.

Progress is manual, as with a completion channel: the queue pair has a file descriptor that is
readable when :meth:`QueuePair.progress` may produce completions, so one I/O thread can wait on
many connections with ``selectors``. Posting never blocks: work requests queue on the queue
pair, and the owner calls :meth:`QueuePair.flush` once per loop turn (one send for a burst) and
again whenever the descriptor is writable while ``wants_write``.

Providers are created by name through :mod:`.providers` (the registry), which imports this
module and the implementations; this module imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Opcode", "WorkCompletion", "MemoryRegion", "QueuePair", "Listener", "Provider",
           "RdmaUnavailable", "HandshakeTimeout", "recv_exact_by"]


class RdmaUnavailable(RuntimeError):
    """The verbs provider cannot run here (no pyverbs, no RDMA device)."""


class Opcode(IntEnum):
    SEND = 1
    RECV = 2
    READ = 3
    FATAL = 4


@dataclass(slots=True)
class WorkCompletion:
    wr_id: int
    opcode: Opcode
    ok: bool = True
    byte_len: int = 0
    imm: int = 0              # RECV: the sender's request id (immediate data)
    error: str | None = None


class MemoryRegion:
    """A registered buffer: peers read it by ``rkey`` at byte offsets ``[0, length)``."""

    def __init__(self, buf, rkey: int, addr: int = 0):
        self.buf = memoryview(buf).cast("B")
        self.rkey = rkey
        self.addr = addr          # what a peer adds to byte offsets in READs (0 for tcp)
        self.length = self.buf.nbytes


class QueuePair:
    peer: str = "?"
    peer_credits: int = 0       # receives the peer keeps posted: our in-flight SEND limit
    bytes_sent: int = 0
    bytes_recv: int = 0

    def fileno(self) -> int: raise NotImplementedError
    def post_send(self, wr_id: int, data) -> None: raise NotImplementedError
    def post_recv(self, wr_id: int, buf) -> None: raise NotImplementedError
    def post_read(self, wr_id: int, local, rkey: int, offset: int, length: int) -> None: raise NotImplementedError
    def progress(self) -> None: raise NotImplementedError
    def poll_cq(self) -> list[WorkCompletion]: raise NotImplementedError
    def flush(self) -> None: raise NotImplementedError

    def send_now(self, wr_id: int, data) -> None:
        """``post_send`` then ``flush`` (a provider may do both in one step)."""
        self.post_send(wr_id, data)
        self.flush()

    def wants_write(self) -> bool: return False
    def close(self) -> None: raise NotImplementedError


class Listener:
    """Accepting is split in two so a server keeps slow peers off its accept loop:
    :meth:`accept_socket` only takes the next TCP connection (cheap, never waits on the peer);
    :meth:`handshake` sets the queue pair up within a total ``deadline`` (time.monotonic), on
    the connection's own thread; :meth:`refuse` turns a peer away with a reason it can read."""
    address: tuple[str, int]

    def accept_socket(self, timeout: float | None = None): raise NotImplementedError
    def handshake(self, sock, addr, deadline: float) -> QueuePair: raise NotImplementedError
    def refuse(self, sock, reason: str) -> None: raise NotImplementedError
    def close(self) -> None: raise NotImplementedError

    def accept(self, timeout: float | None = None, handshake_timeout: float = 5.0) -> QueuePair:
        """Both steps in the caller's thread (clients and tests; servers split them)."""
        import time
        sock, addr = self.accept_socket(timeout)
        return self.handshake(sock, addr, time.monotonic() + handshake_timeout)


class HandshakeTimeout(TimeoutError):
    """A peer did not complete connection set-up within its total deadline."""


def recv_exact_by(sock, n: int, deadline: float, what: str = "handshake") -> bytearray:
    """``n`` bytes from a blocking socket, all of them before ``deadline`` (time.monotonic):
    a peer trickling one byte at a time cannot stretch the wait (the timeout is the time
    left, not a per-byte timeout)."""
    import time
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeTimeout(f"{what} not completed in time ({got} of {n} bytes received)")
        sock.settimeout(left)
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise HandshakeTimeout(f"{what} not completed in time ({got} of {n} bytes received)") from None
        if k == 0:
            raise ConnectionError(f"peer closed the connection during the {what}")
        got += k
    return buf


class Provider:
    name: str

    def reg_mr(self, buf) -> MemoryRegion: raise NotImplementedError
    def connect(self, host: str, port: int, *, recv_depth: int = 32, timeout: float = 5.0,
                blocking: bool = False) -> QueuePair: raise NotImplementedError
    def listen(self, host: str, port: int, *, recv_depth: int = 32) -> Listener: raise NotImplementedError
