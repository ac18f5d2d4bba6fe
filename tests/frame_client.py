"""A raw-socket client of the serving frame protocol for tests that must speak to a server
below the engine (malformed, slow or oversized frames): one HELLO and one blocking frame read."""
import json

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
