"""The engine echo server (`evssd serve echo`) and the ECHO reply it makes: the same reply as
the embedding server's for every payload, clear errors for everything else, and the limits every
MessageServer keeps (connection cap, oversized frames refused from their header)."""
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evssd.host.serving import protocol as P
from tests.frame_client import read_frame, send_hello, servers_in_threads
from evssd.host.serving.engine import Engine
from evssd.host.serving.message_server import READY_PREFIX, EchoServer
from evssd.host.serving.providers import get_provider

pytestmark = pytest.mark.xdist_group("serving-faults")


def _golden_echo_reply(req: bytes) -> bytes:
    return P.encode_ok_bytes(P.decode_request(req).payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_echo_reply_matches_decode_then_encode(payload):
    req = P.encode_request(P.Request(P.MsgType.ECHO, payload=payload))
    for form in (req, memoryview(req), bytearray(req), np.frombuffer(req, dtype=np.uint8)):
        got = P.echo_reply(form)
        assert type(got) is bytes and got == _golden_echo_reply(req)
        assert P.decode_reply(got) == payload


@pytest.mark.parametrize("bad, why", [
    (b"", "shorter than its 10-byte header"),
    (b"\x04\x00\x03\x00", "shorter than its 10-byte header"),
    (P.encode_request(P.Request(P.MsgType.ECHO, payload=b"abc")) + b"x", "length field does not match"),
    (P.encode_request(P.Request(P.MsgType.ECHO, payload=b"abc"))[:-1], "length field does not match"),
    (P.encode_request(P.Request(P.MsgType.GATHER, "t0", np.arange(3))), "not an ECHO request (type 2)"),
])
def test_echo_reply_rejects_malformed_requests(bad, why):
    with pytest.raises(P.ProtocolError, match=re.escape(why)):
        P.echo_reply(bad)


@pytest.fixture
def echo_factory():
    yield from servers_in_threads(
        lambda **kw: EchoServer(get_provider("tcp"), "127.0.0.1", 0, name="echo", **kw))


def test_engine_call_and_request_through_the_echo_server(echo_factory):
    srv = echo_factory()
    rng = np.random.default_rng(7)
    sizes = [0, 1, 63, 64, 4096, 16 << 10, (16 << 10) + 1, 65536, 300_000] + list(rng.integers(0, 20000, 20))
    with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
        conn = eng.connect("echo", *srv.address)
        for n in sizes:
            payload = rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
            req = P.encode_request(P.Request(P.MsgType.ECHO, payload=payload))
            assert eng.call(conn, req, timeout=10) == payload
            assert eng.request(conn, req).result(10) == payload
        # a request of another kind: a clear remote error, and the connection stays usable
        with pytest.raises(P.RemoteError, match="not an ECHO request"):
            eng.call(conn, P.encode_request(P.Request(P.MsgType.META)), timeout=10)
        req = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"still here"))
        assert eng.call(conn, req, timeout=10) == b"still here"


def test_echo_server_answers_many_callers_at_once(echo_factory):
    srv = echo_factory()
    errors = []
    with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
        conns = [eng.connect(f"echo{i}", *srv.address) for i in range(3)]

        def loop(k):
            try:
                for i in range(150):
                    payload = f"{k}:{i}".encode() * (1 + i % 40)
                    req = P.encode_request(P.Request(P.MsgType.ECHO, payload=payload))
                    conn = conns[(k + i) % len(conns)]
                    got = eng.call(conn, req, timeout=10) if i % 2 else eng.request(conn, req).result(10)
                    if got != payload:
                        errors.append((k, i, got[:20]))
            except Exception as exc:          # reported below, not lost in the thread
                errors.append((k, repr(exc)))
        ths = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        assert not any(t.is_alive() for t in ths)
    assert errors == []


def test_echo_server_keeps_the_message_server_limits(echo_factory):
    srv = echo_factory(max_message=1000, max_connections=2)
    with socket.create_connection(srv.address, timeout=10) as s:
        send_hello(s)
        assert read_frame(s)[0].op == P.Op.HELLO_ACK
        # a SEND longer than max_message: refused from its header, the connection survives
        s.sendall(P.pack_header(P.Op.SEND, 5, 5000) + b"\0" * 5000)
        hdr, body = read_frame(s)
        assert (hdr.op, hdr.req_id) == (P.Op.ERROR, 5) and b"exceeds the receiver's 1000-byte" in body
        req = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"ok"))
        s.sendall(P.pack_header(P.Op.SEND, 6, len(req)) + req)
        hdr, body = read_frame(s)
        assert (hdr.op, hdr.req_id) == (P.Op.SEND, 6) and P.decode_reply(body) == b"ok"
        # a frame with a bad magic: an ERROR frame naming it, then the server closes
        s.sendall(b"\xff" * P.HEADER.size)
        hdr, body = read_frame(s)
        assert hdr.op == P.Op.ERROR and b"bad magic" in body
    # the connection cap: the third peer is refused with a reason
    deadline = time.monotonic() + 10
    while srv.active and time.monotonic() < deadline:       # the first peer's thread ends
        time.sleep(0.01)
    assert srv.active == 0
    with socket.create_connection(srv.address, timeout=10) as a, \
            socket.create_connection(srv.address, timeout=10) as b:
        for s in (a, b):
            send_hello(s)
            assert read_frame(s)[0].op == P.Op.HELLO_ACK
        with socket.create_connection(srv.address, timeout=10) as c:
            send_hello(c)
            hdr, body = read_frame(c)
            assert hdr.op == P.Op.ERROR and b"busy: 2 connections" in body
    assert srv.refused_busy == 1


@pytest.mark.parametrize("kw, bad", [({"credits": 0}, "credits"), ({"max_message": 0}, "max_message"),
                                     ({"max_connections": 0}, "max_connections"),
                                     ({"handshake_timeout": 0}, "handshake_timeout")])
def test_echo_server_rejects_bad_parameters(kw, bad):
    with pytest.raises(ValueError, match=bad):
        EchoServer(get_provider("tcp"), "127.0.0.1", 0, **kw)


def test_serve_echo_process_reports_ready_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "evssd.host.serving.cli", "echo"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "no READY line within 60 s"
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), line
        info = json.loads(line[len(READY_PREFIX):])
        with Engine(get_provider("tcp"), 1, request_timeout=10) as eng:
            conn = eng.connect("echo", info["host"], info["port"])
            req = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"\x01" * 100))
            assert eng.call(conn, req, timeout=10) == b"\x01" * 100
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
