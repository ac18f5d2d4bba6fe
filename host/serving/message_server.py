"""The server end of the engine's transport: accept, handshake, answer messages.

A :class:`MessageServer` listens on an RDMA provider, takes each peer on its own thread (the
handshake runs there, under a total deadline), and answers every SEND with
:meth:`MessageServer.handle` -- inline on the receive path where the queue pair supports it
(``set_responder``: no posted receive, one send per answer), else through posted receives and
completions. Its limits hold for every server built on it: at most ``max_connections`` peers
(beyond that a peer is refused with a reason, off the accept path), frames longer than
``max_message`` refused from their header before any of their body is buffered, a stalled
handshake dropped at its deadline.

Two servers are built on it: :class:`~.server.EmbeddingServer` (table shards) and
:class:`EchoServer`, which answers an ECHO request with its payload and nothing else -- the
engine's own round trip without any request handling, measured against a bare socket by
``evssd bench serve --only rtt``.
"""
from __future__ import annotations

import json
import mmap
import queue
import signal
import sys
import threading
import time

from . import protocol as P
from .rdma import Opcode, Provider

__all__ = ["MessageServer", "EchoServer", "READY_PREFIX", "run_echo_server"]

READY_PREFIX = "EVSSD-READY "
_RELEASE_BYTES = 256 << 10     # after a message this large, its buffer's pages go back to the OS
_RECV, _FATAL = Opcode.RECV, Opcode.FATAL


class MessageServer:
    """Accept loop and per-connection threads around :meth:`handle` (see the module
    docstring). ``provider`` is a :class:`~.rdma.Provider` instance."""

    def __init__(self, provider: Provider, host: str, port: int, *, name: str = "server",
                 credits: int = 32, max_message: int = 4 << 20, max_connections: int = 64,
                 handshake_timeout: float = 5.0):
        if credits < 1:
            raise ValueError(f"credits must be >= 1, got {credits}")
        if max_message < 1:
            raise ValueError(f"max_message must be >= 1, got {max_message}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if handshake_timeout <= 0:
            raise ValueError(f"handshake_timeout must be > 0, got {handshake_timeout}")
        self.name = name
        self.provider = provider
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.active = 0
        self.refused_busy = self.refused_handshakes = 0
        self._conn_lock = threading.Lock()
        # frames longer than one message are refused from their header, before buffering
        self.listener = provider.listen(host, port, recv_depth=credits, max_frame=max_message)
        self.address = self.listener.address
        self.credits = credits
        self.max_message = max_message
        self._stop = threading.Event()

    def handle(self, data) -> bytes:
        """The encoded reply to one encoded request (``data``: a bytes-like object valid only
        during the call). Must not raise: a bad request gets an ERR reply."""
        raise NotImplementedError

    # -------------------------------------------------------------- connections
    def _recv_buffer(self):
        """A receive buffer of ``max_message`` bytes in its own anonymous mapping: untouched
        pages cost no memory, and :meth:`_release` gives a large message's pages back."""
        import numpy as np
        mm = mmap.mmap(-1, self.max_message)
        return mm, np.frombuffer(mm, dtype=np.uint8)

    @staticmethod
    def _release(mm, nbytes):
        if nbytes >= _RELEASE_BYTES and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except OSError:
                pass

    def _connection(self, sock, addr):
        """One peer, on its own thread: the handshake (total deadline), then requests."""
        qp = None
        try:
            try:
                qp = self.listener.handshake(sock, addr, time.monotonic() + self.handshake_timeout)
            except (OSError, P.ProtocolError, ValueError, KeyError):
                self.refused_handshakes += 1
                return        # a peer that failed or stalled its handshake; it was told why if it listens
            set_responder = getattr(qp, "set_responder", None)
            if set_responder is not None:
                set_responder(self.handle)     # requests answered inline: no receive buffers
                qp.serve(self._stop)
                return
            maps, bufs = {}, {}
            for i in range(self.credits):
                maps[i], bufs[i] = self._recv_buffer()
                qp.post_recv(i, bufs[i])
            while not self._stop.is_set():
                qp.progress()
                for wc in qp.poll_cq():
                    if wc.opcode == _FATAL:
                        return
                    if wc.opcode != _RECV:
                        continue
                    buf = bufs[wc.wr_id]
                    if wc.ok:
                        reply = self.handle(buf[:wc.byte_len])
                    else:
                        reply = P.encode_err(wc.error or "receive failed")
                    self._release(maps[wc.wr_id], wc.byte_len)
                    qp.post_recv(wc.wr_id, buf)
                    qp.post_send(wc.imm, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            if qp is not None:
                qp.close()
            with self._conn_lock:
                self.active -= 1

    def serve_forever(self):
        """Accept loop: takes connections and hands each to its own thread at once (the
        handshake runs there); beyond ``max_connections`` a peer is refused with a reason,
        by a helper thread so a peer that does not read cannot stall accepting."""
        refuser = _Refuser(self.listener)
        try:
            while not self._stop.is_set():
                try:
                    sock, addr = self.listener.accept_socket(timeout=0.2)
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    time.sleep(0.01)      # e.g. out of file descriptors: do not spin
                    continue
                with self._conn_lock:
                    full = self.active >= self.max_connections
                    if not full:
                        self.active += 1
                if full:
                    self.refused_busy += 1
                    refuser.put(sock, f"server {self.name} busy: {self.max_connections} connections "
                                      f"(its limit); try again later")
                    continue
                t = threading.Thread(target=self._connection, args=(sock, addr), daemon=True,
                                     name="evssd-server-conn")
                t.start()
        finally:
            refuser.close()

    def stop(self):
        self._stop.set()

    def close(self):
        self.stop()
        self.listener.close()


class _Refuser:
    """Turns peers away off the accept path: one thread, a bounded queue (beyond it a peer
    is just closed), each refusal lingering at most 0.2 s."""

    def __init__(self, listener, depth: int = 64):
        self.listener = listener
        self.q: queue.Queue = queue.Queue(depth)
        self.t = threading.Thread(target=self._run, daemon=True, name="evssd-server-refuse")
        self.t.start()

    def put(self, sock, reason):
        try:
            self.q.put_nowait((sock, reason))
        except queue.Full:
            sock.close()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            self.listener.refuse(*item)

    def close(self):
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].close()
        self.q.put(None)
        self.t.join(2)


class EchoServer(MessageServer):
    """Answers an ECHO request with its payload (:func:`~.protocol.echo_reply`); anything
    else gets an ERR reply naming it. No tables, no request decoding beyond the ECHO check."""

    def handle(self, data) -> bytes:
        try:
            return P.echo_reply(data)
        except P.ProtocolError as exc:
            return P.encode_err(f"ProtocolError: {exc}")


def serve_until_signalled(server: MessageServer, info: dict) -> int:
    """Process entry of a server: announce readiness (``READY_PREFIX`` and ``info`` with the
    bound address as JSON) on stdout, serve until SIGTERM/SIGINT, then close."""
    def on_signal(signum, frame):
        server.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.address
    sys.stdout.write(READY_PREFIX + json.dumps({**info, "host": host, "port": port}) + "\n")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def run_echo_server(host: str = "127.0.0.1", port: int = 0, *, provider: str = "tcp", **kw) -> int:
    """Process entry: an :class:`EchoServer` until SIGTERM/SIGINT (``evssd serve echo``)."""
    from .providers import get_provider
    server = EchoServer(get_provider(provider), host, port, name="echo", **kw)
    return serve_until_signalled(server, {"server": "echo"})
