"""Helpers for tests that run a serving server in-process and speak to it below the engine
(malformed, slow or oversized frames): the servers on threads, one HELLO and one blocking frame
read."""
import json
import threading

from evssd.host.serving import protocol as P


def send_hello(sock, depth=4):
    """Send a HELLO asking for ``depth`` receive credits (the server answers HELLO_ACK)."""
    body = json.dumps({"recv_depth": depth}).encode()
    sock.sendall(P.pack_header(P.Op.HELLO, 0, len(body)) + body)


def read_exact(sock, n):
    """``n`` bytes from ``sock``; ConnectionError if the peer closes first."""
    buf = b""
    while len(buf) < n:
        k = sock.recv(n - len(buf))
        if not k:
            raise ConnectionError("closed")
        buf += k
    return buf


def read_frame(sock):
    """One frame: (header, body)."""
    hdr = P.unpack_header(read_exact(sock, P.HEADER.size))
    return hdr, read_exact(sock, hdr.length)


def servers_in_threads(build):
    """A fixture body: yields ``make(**kw)``, which builds a server with ``build(**kw)`` and runs
    its ``serve_forever`` on a daemon thread; at the end every server is stopped, joined (5 s)
    and closed."""
    made = []

    def make(**kw):
        srv = build(**kw)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        made.append((srv, t))
        return srv
    yield make
    for srv, t in made:
        srv.stop()
        t.join(5)
        srv.close()
