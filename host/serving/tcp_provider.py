"""The ``tcp`` provider: RDMA verbs semantics over TCP sockets, for hosts without an RDMA NIC.

One TCP connection is one reliable-connected queue pair. The frame format is in
:mod:`.protocol`. What a NIC would do in hardware, :meth:`TcpQueuePair.progress` does when the
socket is readable: a READ_REQ is answered from the registered memory of this provider (the
application never sees it: one-sided), a SEND lands in the oldest posted receive, a READ_RESP
lands in the local buffer of its read. A SEND that finds no posted receive is refused with an
ERROR frame (the RNR NAK of RC transport), so the sender gets an error completion rather than
silent loss.

Two modes: ``blocking=False`` (the engine: every send and receive is non-blocking, posts only
queue frames and the owning thread calls :meth:`TcpQueuePair.flush` once per loop turn -- one
``sendmsg`` for a burst -- and again on writability, so an I/O thread never blocks behind a slow
peer while it should be reading) and ``blocking=True`` (a server's per-connection thread:
``progress`` blocks in ``recv``, sends go out with ``sendall``). Both release the GIL in the
socket calls. The engine's socket itself stays in blocking mode and its non-blocking calls pass
``MSG_DONTWAIT``: so the one call that should wait -- :meth:`TcpQueuePair.exchange` reading its
answer -- is a single blocking ``recv`` (bounded by ``SO_RCVTIMEO``), as a plain blocking client's
is, with no ``poll`` before it.

Two round-trip fast paths beyond the verbs vocabulary, one per side, each taking the common case
(one whole frame in one receive) without the general frame loop and leaving everything else to
it: :meth:`TcpQueuePair.exchange` (a caller sends a SEND and reads until its answer, on its own
thread) and :meth:`TcpQueuePair.set_responder` (a server answers each SEND inline, no posted
receive taken: such a queue pair never refuses a SEND for want of a receive).
"""
from __future__ import annotations

import itertools
import json
import secrets
import select
import socket
import struct
import threading
import time
from collections import deque

from . import protocol as P
from .rdma import (Listener, MemoryRegion, Opcode, Provider, QueuePair, WorkCompletion,
                   recv_exact_by)

__all__ = ["TcpProvider", "TcpQueuePair", "TcpListener"]

_RECV_CHUNK = 1 << 18
_SMALL_FRAME = 16 << 10    # a blocking send of a frame up to this size is one joined buffer
_CORK_MAX = 1 << 20        # answers to one receive held back for one send: at most this much
# ops and statuses as plain ints: an enum attribute lookup costs ~0.15 us, several per frame
_SEND, _READ_REQ, _READ_RESP, _ERROR = (int(P.Op.SEND), int(P.Op.READ_REQ), int(P.Op.READ_RESP),
                                        int(P.Op.ERROR))
_ST_ERR = int(P.Status.ERR)
_MAX_HELLO = 4096          # a HELLO is a few bytes of JSON
_POLL_R, _POLL_RW = select.POLLIN, select.POLLIN | select.POLLOUT
_HS = P.HEADER.size
_HEADER_UNPACK = P.HEADER.unpack_from
_DONTWAIT = socket.MSG_DONTWAIT
# exchange(): a blocking receive returns at least this often (s) to look at its deadline
_RECV_SLICE = 0.05
_RCVTIMEO = struct.pack("ll", 0, int(_RECV_SLICE * 1e6))
_MAGIC, _VERSION = P.MAGIC, P.VERSION
# the header read as (magic | version | op | flags, request id, length): the fast paths check a
# SEND's first 8 bytes with one comparison and build its header from one word
_WORDS = struct.Struct("<QQI")
assert _WORDS.size == P.HEADER.size
_WORDS_UNPACK, _WORDS_PACK = _WORDS.unpack_from, _WORDS.pack
_SEND_WORD = _WORDS.unpack(P.pack_header(P.Op.SEND, 0, 0))[0]


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpProvider(Provider):
    name = "tcp"

    def __init__(self):
        self._mrs: dict[int, MemoryRegion] = {}
        self._lock = threading.Lock()

    def reg_mr(self, buf) -> MemoryRegion:
        with self._lock:
            while True:
                rkey = secrets.randbits(32) or 1
                if rkey not in self._mrs:
                    break
            mr = MemoryRegion(buf, rkey)
            self._mrs[rkey] = mr
        return mr

    def dereg_mr(self, mr: MemoryRegion) -> None:
        with self._lock:
            self._mrs.pop(mr.rkey, None)

    def lookup(self, rkey: int) -> MemoryRegion | None:
        return self._mrs.get(rkey)

    def connect(self, host, port, *, recv_depth=32, timeout=5.0, blocking=False, name=""):
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            _nodelay(sock)
            hello = json.dumps({"recv_depth": recv_depth, "name": name}).encode()
            sock.sendall(P.pack_header(P.Op.HELLO, 0, len(hello)) + hello)
            hdr, body = _read_frame_blocking(sock)
            if hdr.op == P.Op.ERROR:
                raise P.ProtocolError(f"{host}:{port} refused the connection: {body.decode(errors='replace')}")
            if hdr.op != P.Op.HELLO_ACK:
                raise P.ProtocolError(f"{host}:{port} answered HELLO with op {hdr.op}")
            peer_credits = int(json.loads(body)["recv_depth"])
        except BaseException:
            sock.close()
            raise
        return TcpQueuePair(self, sock, peer_credits, blocking=blocking, peer=f"{host}:{port}")

    def listen(self, host, port, *, recv_depth=32, max_frame=P.MAX_PAYLOAD):
        """``max_frame``: the largest frame payload accepted from a peer; a longer SEND is
        refused from its header (its body is discarded as it arrives, never buffered)."""
        return TcpListener(self, host, port, recv_depth, max_frame)


def _linger_close(sock: socket.socket, wait: float = 0.5) -> None:
    """Half-close, drain what the peer still sends (for at most ``wait`` s in total), then
    close: closing with unread data would reset the connection and could destroy the ERROR
    frame that explains why."""
    deadline = time.monotonic() + wait
    try:
        sock.shutdown(socket.SHUT_WR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass
    sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def _read_frame_blocking(sock):
    hdr = P.unpack_header(_recv_exact(sock, P.HEADER.size))
    return hdr, bytes(_recv_exact(sock, hdr.length))


class TcpListener(Listener):
    def __init__(self, provider: TcpProvider, host: str, port: int, recv_depth: int,
                 max_frame: int = P.MAX_PAYLOAD):
        self.provider = provider
        self.recv_depth = recv_depth
        self.max_frame = max_frame
        self._sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.address = self._sock.getsockname()[:2]

    def accept_socket(self, timeout=None):
        self._sock.settimeout(timeout)
        return self._sock.accept()

    def handshake(self, sock, addr, deadline):
        try:
            _nodelay(sock)
            try:
                hdr = P.unpack_header(recv_exact_by(sock, P.HEADER.size, deadline))
                if hdr.op != P.Op.HELLO:
                    raise P.ProtocolError(f"expected HELLO, got op {hdr.op}")
                if hdr.length > _MAX_HELLO:
                    raise P.ProtocolError(f"HELLO of {hdr.length} bytes (limit {_MAX_HELLO})")
                json.loads(bytes(recv_exact_by(sock, hdr.length, deadline)))
            except (P.ProtocolError, ValueError) as exc:
                self.refuse(sock, str(exc), wait=0.2)
                raise
            ack = json.dumps({"recv_depth": self.recv_depth}).encode()
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.sendall(P.pack_header(P.Op.HELLO_ACK, 0, len(ack)) + ack)
        except BaseException:
            sock.close()
            raise
        return TcpQueuePair(self.provider, sock, self.recv_depth, blocking=True,
                            peer=f"{addr[0]}:{addr[1]}", max_frame=self.max_frame)

    def refuse(self, sock, reason, wait=0.2):
        """Send an ERROR frame naming ``reason`` and close (lingering at most ``wait`` s so
        the peer's unread HELLO does not turn the close into a reset that eats the frame)."""
        msg = reason.encode()
        try:
            sock.settimeout(wait)
            sock.sendall(P.pack_header(P.Op.ERROR, 0, len(msg)) + msg)
        except OSError:
            pass
        _linger_close(sock, wait)

    def close(self):
        self._sock.close()


class TcpQueuePair(QueuePair):
    thread_safe_post = True     # posting and flushing hold the send lock: any thread may send
    def __init__(self, provider: TcpProvider, sock: socket.socket, peer_credits: int, *,
                 blocking: bool, peer: str = "?", max_frame: int = P.MAX_PAYLOAD):
        self.provider = provider
        self.max_frame = max_frame
        self._skip = 0          # bytes of a refused (oversized) SEND still to discard
        self.peer = peer
        self.peer_credits = peer_credits
        self._sock = sock
        self._blocking = blocking
        # blocking file mode in both modes; the engine's non-blocking calls pass MSG_DONTWAIT
        # (see the module docstring) and its blocking receive wakes every _RECV_SLICE
        sock.settimeout(None)
        self._nb = 0 if blocking else _DONTWAIT
        if not blocking:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
        self._fd = sock.fileno()
        self._rbuf = bytearray()
        self._scratch: bytearray | None = None
        self._scratch_view: memoryview | None = None
        self._out: deque[memoryview] = deque()
        self._send_lock = threading.Lock()
        self._cork: list | None = None
        self._cork_bytes = 0
        self._recvs: deque = deque()            # (wr_id, buffer) posted receives, FIFO
        self._reads: dict[int, tuple] = {}     # wr_id -> (local view, length)
        self._cq: deque[WorkCompletion] = deque()
        self._responder = None                  # set_responder: SENDs answered inline
        self._catch = -1                        # exchange(): the request id whose answer it takes
        self._caught = None
        self._in_rbuf = False                   # the frames being handled live in _rbuf
        self._poller = None                     # exchange(): a poll object on this socket
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.failed: str | None = None

    # ------------------------------------------------------------------ posting
    def fileno(self):
        return self._fd

    def _emit(self, op, req_id, payload=b"", flags=0):
        if self.failed:
            raise ConnectionError(f"queue pair to {self.peer} failed: {self.failed}")
        hdr = P.pack_header(op, req_id, len(payload), flags)
        with self._send_lock:
            self.bytes_sent += len(hdr) + len(payload)
            if self._blocking:
                cork = self._cork
                if cork is not None:        # inside progress(): one send at the end
                    cork.append(hdr)
                    if payload:
                        cork.append(payload)
                    self._cork_bytes += len(hdr) + len(payload)
                    if self._cork_bytes > _CORK_MAX:    # a long burst: send what it has so far
                        self._uncork()
                        self._cork = []
                    return
                if len(payload) <= _SMALL_FRAME:
                    self._send_one(b"".join((hdr, payload)) if len(payload) else hdr)
                else:
                    self._send_vec([hdr, payload])
            else:
                # queued only: the owner flushes once per loop turn, so a burst of posts
                # (a window of READs, one MULTI per server) leaves in one sendmsg
                self._out.append(memoryview(hdr))
                if payload:
                    self._out.append(memoryview(payload).cast("B"))

    def _send_one(self, buf):
        """Blocking send of one buffer (a small frame: header and payload joined)."""
        try:
            self._sock.sendall(buf)
        except OSError as exc:
            self._fail(f"send failed: {exc}")
            raise ConnectionError(f"send to {self.peer} failed: {exc}") from exc

    def _send_vec(self, bufs):
        """Blocking scatter-gather send (one syscall per up to 512 buffers)."""
        views = [memoryview(b).cast("B") for b in bufs]
        try:
            while views:
                n = self._sock.sendmsg(views[:512])
                while n and views:
                    if n >= views[0].nbytes:
                        n -= views[0].nbytes
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except OSError as exc:
            self._fail(f"send failed: {exc}")
            raise ConnectionError(f"send to {self.peer} failed: {exc}") from exc

    def post_send(self, wr_id, data):
        self._emit(_SEND, wr_id, data)

    def send_now(self, wr_id, data):
        """``post_send`` and ``flush`` in one step, for a thread sending on its own: with
        nothing queued before it, a small frame goes to the socket as one joined buffer, and
        what the socket does not take is queued for the owner's flush on writability."""
        n = len(data)
        if self._blocking or n > _SMALL_FRAME:
            self._emit(_SEND, wr_id, data)
            self.flush()
            return
        if self.failed:
            raise ConnectionError(f"queue pair to {self.peer} failed: {self.failed}")
        frame = b"".join((_WORDS_PACK(_SEND_WORD, wr_id, n), data))
        n += _HS
        with self._send_lock:
            self.bytes_sent += n
            if self._out:                      # keep the order: behind what is queued
                self._out.append(memoryview(frame))
                self._flush_locked()
                return
            try:
                k = self._sock.send(frame, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                k = 0
            except OSError as exc:
                self._fail(f"send failed: {exc}")
                return
            if k != n:                         # the socket is full: the rest waits for the owner
                self._out.append(memoryview(frame)[k:])

    def set_responder(self, fn) -> None:
        """Answer every incoming SEND inline: ``fn(body)`` (a memoryview valid only during the
        call) returns the reply, sent back as a SEND under the same request id. The SEND takes
        no posted receive and makes no completion: the server's loop skips the copy into a
        receive buffer and the completion round. Blocking mode only (a server's connection
        thread); the replies to one burst of requests leave in one send, as other answers do."""
        if not self._blocking:
            raise ValueError("set_responder needs a blocking queue pair (a server's connection)")
        self._responder = fn

    def serve(self, stop) -> None:
        """A server connection's loop once a responder is set: receive and answer until the
        peer leaves or the queue pair fails (``failed`` says why), or ``stop`` (an Event, looked
        at before each receive: a loop waiting in its receive ends after the next one) is set.
        What :meth:`progress` in a loop does, with the common case -- one whole SEND in one
        receive -- answered inline: its header checked in place in the scratch buffer, the
        responder called on a view of it, header and reply joined into one ``sendall``."""
        respond = self._responder
        if respond is None:
            raise ValueError("serve needs a responder (set_responder)")
        if self._scratch is None:
            self._alloc_scratch()
        sock, scratch, is_set = self._sock, self._scratch, stop.is_set
        recv_into, sendall, send_lock = sock.recv_into, sock.sendall, self._send_lock
        view = memoryview(scratch)
        max_frame = self.max_frame
        while not is_set() and not self.failed:
            try:
                n = recv_into(scratch)
            except InterruptedError:
                continue
            except OSError as exc:
                self._fail(f"receive failed: {exc}")
                return
            if not n:
                self._fail("peer closed the connection")
                return
            self.bytes_recv += n
            if n >= _HS and not self._rbuf and not self._skip:
                word, req_id, length = _WORDS_UNPACK(scratch, 0)
                if word == _SEND_WORD and length == n - _HS and length <= max_frame:
                    reply = respond(view[_HS:n])
                    m = len(reply)
                    if m <= _SMALL_FRAME:
                        frame = b"".join((_WORDS_PACK(_SEND_WORD, req_id, m), reply))
                        send_lock.acquire()    # not `with`: half the cost on this path
                        try:
                            self.bytes_sent += _HS + m
                            sendall(frame)
                        except OSError as exc:
                            self._fail(f"send failed: {exc}")
                            return
                        finally:
                            send_lock.release()
                    else:
                        with send_lock:
                            self.bytes_sent += _HS + m
                            try:
                                self._send_vec([_WORDS_PACK(_SEND_WORD, req_id, m), reply])
                            except ConnectionError:
                                return            # _fail() recorded why
                    continue
            self._consume(n)

    def exchange(self, wr_id, data, deadline: float):
        """SEND ``data`` and read this queue pair until the peer answers ``wr_id`` or
        ``deadline`` (``time.monotonic``) passes: a synchronous request on the caller's thread.

        Returns the body of the answering SEND (a memoryview valid until the next receive, or
        bytes; it takes no posted receive), the peer's message (a ``str``) when it refused the
        SEND with an ERROR frame, or ``None`` when the deadline passed or the queue pair failed
        (``failed`` says why). Every other frame read meanwhile is handled as :meth:`progress`
        handles it (completions in the CQ). Non-blocking mode; the caller must be the only
        reader of this queue pair while it runs.

        The common case costs what a blocking client's round trip does: one ``send`` of header
        and payload joined, one blocking ``recv_into`` the scratch buffer that holds exactly the
        answer, its header checked in place. Only while frames wait in the send queue (the
        socket was full) does it ``poll`` for writability as well."""
        n = len(data)
        if n > _SMALL_FRAME or self._blocking or self._rbuf or self._skip or self.failed:
            if self._blocking:
                raise ValueError("exchange needs a non-blocking queue pair")
            self.send_now(wr_id, data)
            return self._exchange_loop(wr_id, 0, deadline)
        # the common case, nothing half read: send_now's small-frame path inline (a frame
        # queued by another thread is looked for under the send lock)
        frame = b"".join((_WORDS_PACK(_SEND_WORD, wr_id, n), data))
        n += _HS
        sock, out, lock = self._sock, self._out, self._send_lock
        lock.acquire()                         # not `with`: half the cost on this path
        try:
            self.bytes_sent += n
            if out:                            # another thread queued: keep the order
                out.append(memoryview(frame))
                self._flush_locked()
            else:
                try:
                    k = sock.send(frame, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    k = 0
                except OSError as exc:
                    self._fail(f"send failed: {exc}")
                    return None
                if k != n:                     # the socket is full: exchange_loop flushes
                    out.append(memoryview(frame)[k:])
        finally:
            lock.release()
        if out:
            return self._exchange_loop(wr_id, 0, deadline)
        scratch = self._scratch
        if scratch is None:
            scratch = self._alloc_scratch()
        # one blocking receive (at most _RECV_SLICE) that holds exactly our whole answer
        try:
            n = sock.recv_into(scratch)
        except (BlockingIOError, InterruptedError):
            n = 0                         # the slice ended: the loop looks at the deadline
        except OSError as exc:
            self._fail(f"receive failed: {exc}")
            return None
        else:
            if not n:
                self._fail("peer closed the connection")
                return None
            self.bytes_recv += n
            if n >= _HS:
                word, req_id, length = _WORDS_UNPACK(scratch, 0)
                if req_id == wr_id and word == _SEND_WORD and length == n - _HS:
                    return self._scratch_view[_HS:n]
        return self._exchange_loop(wr_id, n, deadline)

    def _exchange_loop(self, wr_id, n, deadline):
        """The rest of :meth:`exchange`: handle the ``n`` bytes already received (any frames,
        in order) and keep reading until the answer to ``wr_id``, an ERROR for it, the
        deadline or a failure."""
        scratch = self._scratch
        if scratch is None:
            scratch = self._alloc_scratch()
        recv_into = self._sock.recv_into
        monotonic = time.monotonic
        self._catch, self._caught = wr_id, None
        try:
            if n:
                self._consume(n)
                if self._caught is not None:
                    return self._caught
            while True:
                if self.failed:           # e.g. closed by another thread while we waited
                    return None
                if monotonic() >= deadline:
                    return None
                if self._out:
                    # our frame is not all out: wait for writability too, then flush
                    if not self._wait_rw(deadline):
                        continue
                    self.flush()
                    flags = _DONTWAIT
                else:
                    flags = 0             # block (at most _RECV_SLICE, SO_RCVTIMEO)
                fresh = not self._rbuf and not self._skip
                try:
                    n = recv_into(scratch, 0, flags)
                except (BlockingIOError, InterruptedError):
                    continue              # the slice ended (or nothing yet): look at the deadline
                except OSError as exc:
                    self._fail(f"receive failed: {exc}")
                    return None
                if not n:
                    self._fail("peer closed the connection")
                    return None
                self.bytes_recv += n
                if fresh and n >= _HS:
                    # the read holds exactly our whole answer
                    magic, version, op, _, req_id, length = _HEADER_UNPACK(scratch, 0)
                    if (req_id == wr_id and op == _SEND and length == n - _HS and magic == _MAGIC
                            and version == _VERSION):
                        return memoryview(scratch)[_HS:n]
                self._consume(n)
                if self._caught is not None:
                    return self._caught
        finally:
            self._catch, self._caught = -1, None

    def _wait_rw(self, deadline) -> bool:
        """Poll this socket for readability or writability until at most ``deadline`` (or one
        ``_RECV_SLICE``); True when it is ready."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._fd, _POLL_RW)
        left = min(deadline - time.monotonic(), _RECV_SLICE)
        return left > 0 and bool(poller.poll(left * 1e3))

    def post_recv(self, wr_id, buf):
        self._recvs.append((wr_id, memoryview(buf).cast("B")))

    def post_read(self, wr_id, local, rkey, offset, length):
        view = memoryview(local).cast("B")
        if view.nbytes < length:
            raise ValueError(f"local buffer of {view.nbytes} bytes cannot hold a {length}-byte READ")
        self._reads[wr_id] = (view, length)
        self._emit(_READ_REQ, wr_id, P.pack_read_req(rkey, offset, length))

    def wants_write(self):
        return bool(self._out)

    def flush(self):
        with self._send_lock:
            self._flush_locked()

    def _flush_locked(self):
        out = self._out
        try:
            while out:
                batch = list(itertools.islice(out, 0, 512))
                n = self._sock.sendmsg(batch, (), self._nb)
                while n and out:
                    head = out[0]
                    if n >= head.nbytes:
                        n -= head.nbytes
                        out.popleft()
                    else:
                        out[0] = head[n:]
                        return          # the socket is full: wait for writability
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            out.clear()
            self._fail(f"send failed: {exc}")

    # ------------------------------------------------------------------ progress
    def progress(self):
        """Read what the socket holds (blocking mode: wait for it) and handle whole frames.

        Bytes land in a per-queue-pair scratch buffer (no allocation per receive); frames are
        handled straight from it, and only a trailing partial frame is kept in ``_rbuf``."""
        n = self._recv()
        if n:
            self._consume(n)

    def _recv(self) -> int:
        """One receive into the scratch buffer: the byte count, or 0 when nothing was there
        or the queue pair failed (``failed`` says why)."""
        if self.failed:
            return 0
        scratch = self._scratch
        if scratch is None:
            scratch = self._alloc_scratch()
        try:
            n = self._sock.recv_into(scratch, 0, self._nb)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fail(f"receive failed: {exc}")
            return 0
        if not n:
            self._fail("peer closed the connection")
            return 0
        self.bytes_recv += n
        return n

    def _alloc_scratch(self) -> bytearray:
        """The receive buffer every receive of this queue pair lands in (and a view of it)."""
        self._scratch = bytearray(_RECV_CHUNK)
        self._scratch_view = memoryview(self._scratch)
        return self._scratch

    def _consume(self, n):
        """Handle the ``n`` bytes just received into the scratch buffer."""
        scratch = self._scratch
        start = 0
        if self._skip:
            start = min(self._skip, n)
            self._skip -= start
        rbuf = self._rbuf
        if not rbuf and not start and self._responder is not None and self._answer_one(n):
            return
        if rbuf:
            rbuf += memoryview(scratch)[start:n]
            src, end, pos = memoryview(rbuf), len(rbuf), 0
        else:
            src, end, pos = memoryview(scratch), n, start
        self._in_rbuf = bool(rbuf)
        hs = P.HEADER.size
        if self._blocking:
            self._cork = []        # answers to a burst of READs go out in one send
        try:
            while end - pos >= hs:
                hdr = P.unpack_header_from(src, pos)
                if hdr.length > self.max_frame:
                    self._refuse_frame(hdr)
                    have = min(hdr.length, end - pos - hs)
                    self._skip = hdr.length - have
                    pos += hs + have
                    continue
                if end - pos - hs < hdr.length:
                    break
                self._handle(hdr, src[pos + hs:pos + hs + hdr.length])
                pos += hs + hdr.length
        except P.ProtocolError as exc:
            # The stream cannot be trusted past a bad header: say why, then close.
            src.release()
            self._uncork()
            msg = str(exc).encode()
            try:
                self._emit(P.Op.ERROR, 0, msg)
                self.flush()
            except (ConnectionError, OSError):
                pass
            self._fail(str(exc), linger=True)
            return
        finally:
            if self._cork is not None and not self.failed:
                self._uncork()
            self._cork = None
        src.release()
        # keep only the partial frame; a large frame's buffer is let go, not just shrunk
        if rbuf:
            if pos == end:
                self._rbuf = bytearray()
            elif pos:
                del rbuf[:pos]
        elif pos < end:
            self._rbuf = bytearray(memoryview(scratch)[pos:n])

    def _answer_one(self, n) -> bool:
        """The server's common case: the receive holds exactly one whole SEND. Answer it with
        one joined send, without the general frame loop; False (nothing done) otherwise."""
        if n < _HS:
            return False
        scratch = self._scratch
        magic, version, op, _, req_id, length = _HEADER_UNPACK(scratch, 0)
        if (length != n - _HS or op != _SEND or magic != P.MAGIC or version != P.VERSION
                or length > self.max_frame):
            return False
        reply = self._responder(memoryview(scratch)[_HS:n])
        hdr = P.pack_header(_SEND, req_id, len(reply))
        try:
            with self._send_lock:
                self.bytes_sent += _HS + len(reply)
                if len(reply) <= _SMALL_FRAME:
                    self._send_one(hdr + reply)
                else:
                    self._send_vec([hdr, reply])
        except ConnectionError:
            pass                  # _fail() recorded it; the FATAL completion tells the owner
        return True

    def _refuse_frame(self, hdr):
        """A frame longer than this side accepts: refused from its header, before any of its
        body is buffered. A SEND gets an error completion at the sender and the connection
        stays up (the body is discarded as it arrives); anything else is a broken peer."""
        if hdr.op != P.Op.SEND:
            raise P.ProtocolError(f"frame length {hdr.length} exceeds the {self.max_frame}-byte limit")
        self._emit(P.Op.ERROR, hdr.req_id,
                   f"message of {hdr.length} bytes exceeds the receiver's {self.max_frame}-byte "
                   f"message limit".encode())

    def _uncork(self):
        cork, self._cork = self._cork, None
        self._cork_bytes = 0
        if cork:
            try:
                if len(cork) <= 2 and sum(map(len, cork)) <= _SMALL_FRAME:
                    self._send_one(b"".join(cork))     # one answer: one joined buffer
                else:
                    self._send_vec(cork)
            except ConnectionError:
                pass               # _fail() recorded it; the FATAL completion tells the owner

    def _handle(self, hdr, body):
        op = hdr.op
        if op == _SEND:
            if self._responder is not None:
                # no view of _rbuf may outlive the call: progress() trims _rbuf afterwards
                self._emit(_SEND, hdr.req_id, self._responder(bytes(body) if self._in_rbuf else body))
                return
            if hdr.req_id == self._catch:
                # a view of the scratch buffer (valid until the next receive); a frame put
                # together in _rbuf is copied, since _rbuf is trimmed when progress() ends
                self._caught = bytes(body) if self._in_rbuf else body
                return
            if not self._recvs:
                self._emit(P.Op.ERROR, hdr.req_id,
                           b"receiver not ready: no receive posted (in-flight limit exceeded)")
                return
            wr_id, buf = self._recvs.popleft()
            n = len(body)
            if n > buf.nbytes:
                self._cq.append(WorkCompletion(wr_id, Opcode.RECV, False, n, hdr.req_id,
                                               f"message of {n} bytes exceeds the {buf.nbytes}-byte receive buffer"))
                self._emit(P.Op.ERROR, hdr.req_id, f"message of {n} bytes too long for the receive buffer".encode())
                return
            buf[:n] = body
            self._cq.append(WorkCompletion(wr_id, Opcode.RECV, True, n, hdr.req_id))
        elif op == _READ_REQ:
            rkey, off, length = P.unpack_read_req(body)
            mr = self.provider.lookup(rkey)
            if mr is None:
                err = f"READ: unknown rkey 0x{rkey:08x}"
            elif off + length > mr.length:
                err = f"READ: [{off}, {off + length}) is outside the {mr.length}-byte region 0x{rkey:08x}"
            else:
                self._emit(P.Op.READ_RESP, hdr.req_id, mr.buf[off:off + length])
                return
            self._emit(P.Op.READ_RESP, hdr.req_id, err.encode(), flags=P.Status.ERR)
        elif op == _READ_RESP:
            entry = self._reads.pop(hdr.req_id, None)
            if entry is None:
                return                      # a read we gave up on (timed out): drop the late answer
            view, length = entry
            if hdr.flags == _ST_ERR:
                self._cq.append(WorkCompletion(hdr.req_id, Opcode.READ, False, 0, 0,
                                               bytes(body).decode(errors="replace")))
            elif len(body) != length:
                self._cq.append(WorkCompletion(hdr.req_id, Opcode.READ, False, len(body), 0,
                                               f"READ returned {len(body)} bytes, asked {length}"))
            else:
                view[:length] = body
                self._cq.append(WorkCompletion(hdr.req_id, Opcode.READ, True, length))
        elif op == _ERROR:
            msg = bytes(body).decode(errors="replace")
            if hdr.req_id == self._catch:
                self._caught = msg
            elif hdr.req_id == 0:
                self._fail(f"peer reported: {msg}")
            elif self._reads.pop(hdr.req_id, None) is not None:
                self._cq.append(WorkCompletion(hdr.req_id, Opcode.READ, False, 0, 0, msg))
            else:
                self._cq.append(WorkCompletion(hdr.req_id, Opcode.SEND, False, 0, 0, msg))
        else:
            raise P.ProtocolError(f"unexpected op {P.Op(op).name} on an established connection")

    def forget_read(self, wr_id):
        self._reads.pop(wr_id, None)

    def poll_cq(self):
        cq = self._cq
        if not cq:
            return ()
        out = list(cq)
        cq.clear()
        return out

    def _fail(self, reason, linger=False):
        if self.failed:
            return
        self.failed = reason
        for wr_id in list(self._reads):
            self._cq.append(WorkCompletion(wr_id, Opcode.READ, False, 0, 0, reason))
        self._reads.clear()
        self._cq.append(WorkCompletion(0, Opcode.FATAL, False, 0, 0, reason))
        if linger:
            _linger_close(self._sock)
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        if not self.failed:
            self.failed = "closed locally"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes a thread blocked in exchange()'s receive
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
