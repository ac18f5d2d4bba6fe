"""The tcp queue pair's two round-trip fast paths over socket pairs (no processes, no engine):
``exchange`` (a caller sends and reads its own answer) and ``set_responder`` (a server answers
each SEND inline), each checked against the frames a peer sees and against the general path
for everything that is not the fast path's own frame."""
import socket
import threading
import time

import numpy as np
import pytest

from evssd.host.serving import protocol as P
from evssd.host.serving.rdma import Opcode
from evssd.host.serving.tcp_provider import TcpProvider, TcpQueuePair, _CORK_MAX


def _frame(op, req_id, body=b"", flags=0):
    return P.pack_header(op, req_id, len(body), flags) + body


def _read_frame(sock):
    hdr = P.unpack_header(_exact(sock, P.HEADER.size))
    return hdr, _exact(sock, hdr.length)


def _exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        k = sock.recv(n - len(buf))
        if not k:
            raise ConnectionError("closed")
        buf += k
    return bytes(buf)


@pytest.fixture
def client_pair():
    """A non-blocking (engine-side) queue pair and the raw socket of its peer."""
    a, b = socket.socketpair()
    qp = TcpQueuePair(TcpProvider(), a, 4, blocking=False, peer="pair")
    b.settimeout(10)
    yield qp, b
    qp.close()
    b.close()


def test_exchange_takes_its_answer_among_other_frames(client_pair):
    qp, peer = client_pair
    bufs = [np.zeros(64, np.uint8) for _ in range(2)]
    for i, buf in enumerate(bufs):
        qp.post_recv(i, buf)
    tail = _frame(P.Op.SEND, 6, b"third answer")
    # staged before the request leaves: an answer to another request, ours, and half of a third
    peer.sendall(_frame(P.Op.SEND, 5, b"other") + _frame(P.Op.SEND, 9, b"mine") + tail[:13])
    got = qp.exchange(9, b"request nine", time.monotonic() + 5)
    assert bytes(got) == b"mine"
    hdr, body = _read_frame(peer)                     # what went out: one SEND frame
    assert (hdr.op, hdr.req_id, body) == (P.Op.SEND, 9, b"request nine")
    wcs = qp.poll_cq()                                # the other answer: the general path
    assert [(w.opcode, w.wr_id, w.imm, w.byte_len, w.ok) for w in wcs] == [(Opcode.RECV, 0, 5, 5, True)]
    assert bytes(bufs[0][:5]) == b"other"
    peer.sendall(tail[13:])                           # the rest of the third: completes later
    deadline = time.monotonic() + 5
    while not (wcs := qp.poll_cq()) and time.monotonic() < deadline:
        qp.progress()
    assert [(w.wr_id, w.imm, w.byte_len) for w in wcs] == [(1, 6, 12)]
    assert bytes(bufs[1][:12]) == b"third answer"
    assert qp.bytes_sent == P.HEADER.size + 12


def test_exchange_assembles_an_answer_that_trickles_in(client_pair):
    qp, peer = client_pair
    answer = _frame(P.Op.SEND, 3, bytes(range(256)) * 40)

    def trickle():
        _read_frame(peer)
        for i in range(0, len(answer), 997):
            peer.sendall(answer[i:i + 997])
            time.sleep(0.001)
    t = threading.Thread(target=trickle)
    t.start()
    got = qp.exchange(3, b"q", time.monotonic() + 10)
    t.join()
    assert bytes(got) == bytes(range(256)) * 40
    assert not qp._rbuf                               # nothing left over for the next read


def test_exchange_reports_a_refusal_a_deadline_and_a_closed_peer(client_pair):
    qp, peer = client_pair
    # an ERROR frame for another request is that request's failed SEND; ours is returned
    peer.sendall(_frame(P.Op.ERROR, 4, b"not yours") + _frame(P.Op.ERROR, 8, b"too long"))
    assert qp.exchange(8, b"x", time.monotonic() + 5) == "too long"
    wcs = qp.poll_cq()
    assert [(w.opcode, w.wr_id, w.ok, w.error) for w in wcs] == [(Opcode.SEND, 4, False, "not yours")]
    # no answer: back at the deadline, the queue pair still usable
    t0 = time.monotonic()
    assert qp.exchange(10, b"y", t0 + 0.1) is None
    assert 0.1 <= time.monotonic() - t0 < 2 and not qp.failed
    peer.sendall(_frame(P.Op.SEND, 10, b"late") + _frame(P.Op.SEND, 11, b"on time"))
    qp.post_recv(0, np.zeros(16, np.uint8))
    assert bytes(qp.exchange(11, b"z", time.monotonic() + 5)) == b"on time"
    assert [w.imm for w in qp.poll_cq()] == [10]      # the late one went the general way
    # the peer goes away while we wait: None at once, with the reason, and a FATAL completion
    def close_peer():
        _read_frame(peer), _read_frame(peer), _read_frame(peer), _read_frame(peer)
        peer.close()                                  # after reading all we sent: a clean close
    threading.Timer(0.05, close_peer).start()
    t0 = time.monotonic()
    assert qp.exchange(12, b"w", t0 + 10) is None
    assert time.monotonic() - t0 < 5 and "peer closed" in qp.failed
    assert [w.opcode for w in qp.poll_cq()] == [Opcode.FATAL]


def test_fast_paths_refuse_the_wrong_mode():
    a, b = socket.socketpair()
    try:
        blocking = TcpQueuePair(TcpProvider(), a, 4, blocking=True)
        with pytest.raises(ValueError, match="exchange needs a non-blocking queue pair"):
            blocking.exchange(1, b"x", time.monotonic() + 1)
        nonblocking = TcpQueuePair(TcpProvider(), b, 4, blocking=False)
        with pytest.raises(ValueError, match="set_responder needs a blocking queue pair"):
            nonblocking.set_responder(bytes)
    finally:
        a.close()
        b.close()


@pytest.fixture
def server_pair():
    """A blocking (server-side) queue pair answering b"<" + request + b">", and its peer."""
    a, b = socket.socketpair()
    qp = TcpQueuePair(TcpProvider(), a, 4, blocking=True, peer="pair", max_frame=1 << 16)
    seen = []

    def answer(body):
        seen.append(bytes(body))
        return b"<" + bytes(body) + b">"
    qp.set_responder(answer)
    b.settimeout(10)
    yield qp, b, seen
    qp.close()
    b.close()


def test_responder_answers_single_burst_and_split_requests(server_pair):
    qp, peer, seen = server_pair
    peer.sendall(_frame(P.Op.SEND, 1, b"one"))
    qp.progress()
    assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 1, 5), b"<one>")
    burst = b"".join(_frame(P.Op.SEND, 10 + i, b"r%d" % i) for i in range(5))
    last = _frame(P.Op.SEND, 20, b"split" * 30)
    peer.sendall(burst + last[:40])
    qp.progress()
    for i in range(5):
        assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 10 + i, 4), b"<r%d>" % i)
    peer.sendall(last[40:])
    qp.progress()
    assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 20, 152), b"<" + b"split" * 30 + b">")
    assert seen == [b"one"] + [b"r%d" % i for i in range(5)] + [b"split" * 30]
    assert not qp.poll_cq()                           # inline answers make no completions


def test_responder_keeps_the_limits_and_the_other_ops(server_pair):
    qp, peer, seen = server_pair
    mr = qp.provider.reg_mr(np.arange(64, dtype=np.uint8))
    # an oversized SEND is refused from its header, its body discarded; then service goes on
    peer.sendall(P.pack_header(P.Op.SEND, 7, 1 << 17))
    qp.progress()
    hdr, body = _read_frame(peer)
    assert (hdr.op, hdr.req_id) == (P.Op.ERROR, 7) and b"exceeds the receiver's 65536-byte" in body
    # (more than a socket buffer holds: sent from a thread while the queue pair reads)
    rest = (b"\0" * (1 << 17) + _frame(P.Op.READ_REQ, 8, P.pack_read_req(mr.rkey, 10, 4))
            + _frame(P.Op.SEND, 9, b"after"))
    sender = threading.Thread(target=peer.sendall, args=(rest,))
    sender.start()
    deadline = time.monotonic() + 5
    while len(seen) < 1 and time.monotonic() < deadline:
        qp.progress()
    sender.join()
    assert _read_frame(peer) == (P.Header(P.Op.READ_RESP, 0, 8, 4), bytes([10, 11, 12, 13]))
    assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 9, 7), b"<after>")
    assert seen == [b"after"]


def test_responder_sends_a_long_burst_in_bounded_pieces(server_pair):
    """Answers to one receive wait to leave together, but never more than _CORK_MAX of them:
    a burst of requests with large answers is answered completely, in order."""
    qp, peer, _ = server_pair
    big = b"b" * 60000
    n = 2 * _CORK_MAX // len(big) + 3
    got = []

    def reader():
        for _ in range(n):
            got.append(_read_frame(peer))
    t = threading.Thread(target=reader)
    t.start()
    sizes = []
    real_send_vec = qp._send_vec
    qp._send_vec = lambda bufs: (sizes.append(sum(len(b) for b in bufs)), real_send_vec(bufs))
    sender = threading.Thread(target=peer.sendall, args=(b"".join(_frame(P.Op.SEND, i, big) for i in range(n)),))
    sender.start()
    deadline = time.monotonic() + 10
    while t.is_alive() and time.monotonic() < deadline:
        qp.progress()          # blocks in its receive until the sender's next bytes
        t.join(0.001)
    sender.join()
    assert [(h.req_id, body) for h, body in got] == [(i, b"<" + big + b">") for i in range(n)]
    assert sizes and max(sizes) <= _CORK_MAX + len(big) + 2 + 2 * P.HEADER.size


def test_without_responder_a_send_with_no_posted_receive_is_refused():
    """The RC receiver-not-ready rule of the general path (what a verbs server keeps)."""
    a, b = socket.socketpair()
    qp = TcpQueuePair(TcpProvider(), a, 4, blocking=True)
    try:
        b.settimeout(10)
        qp.post_recv(0, np.zeros(8, np.uint8))
        b.sendall(_frame(P.Op.SEND, 1, b"fits") + _frame(P.Op.SEND, 2, b"no room"))
        qp.progress()
        assert [(w.opcode, w.imm, w.byte_len) for w in qp.poll_cq()] == [(Opcode.RECV, 1, 4)]
        hdr, body = _read_frame(b)
        assert (hdr.op, hdr.req_id) == (P.Op.ERROR, 2) and b"no receive posted" in body
    finally:
        qp.close()
        b.close()


def test_serve_loop_answers_until_the_peer_leaves_or_stop(server_pair):
    """``serve``: the server's loop, fast path and general path in one stream (a lone request,
    a burst with a READ, a split request), then the peer's close ends it with the reason."""
    qp, peer, seen = server_pair
    mr = qp.provider.reg_mr(np.arange(32, dtype=np.uint8))
    stop = threading.Event()
    t = threading.Thread(target=qp.serve, args=(stop,))
    t.start()
    peer.sendall(_frame(P.Op.SEND, 1, b"alone"))
    assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 1, 7), b"<alone>")
    peer.sendall(_frame(P.Op.SEND, 2, b"a") + _frame(P.Op.READ_REQ, 3, P.pack_read_req(mr.rkey, 4, 2))
                 + _frame(P.Op.SEND, 4, b"b"))
    assert [_read_frame(peer) for _ in range(3)] == [(P.Header(P.Op.SEND, 0, 2, 3), b"<a>"),
                                                    (P.Header(P.Op.READ_RESP, 0, 3, 2), bytes([4, 5])),
                                                    (P.Header(P.Op.SEND, 0, 4, 3), b"<b>")]
    split = _frame(P.Op.SEND, 5, b"split")
    peer.sendall(split[:7])
    time.sleep(0.02)
    peer.sendall(split[7:])
    assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 5, 7), b"<split>")
    assert seen == [b"alone", b"a", b"b", b"split"]
    # stop is looked at before each receive: a loop already waiting in its receive ends after
    # the next one (answering it), otherwise at once; either way it ends, the queue pair intact
    stop.set()
    peer.sendall(_frame(P.Op.SEND, 6, b"last"))
    t.join(5)
    assert not t.is_alive() and not qp.failed
    if len(seen) == 5:
        assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 6, 6), b"<last>")
    else:
        assert seen == [b"alone", b"a", b"b", b"split"]
        qp.progress()                                 # the frame waits for the next reader
        assert _read_frame(peer) == (P.Header(P.Op.SEND, 0, 6, 6), b"<last>")
    # a second loop ends when the peer leaves
    t = threading.Thread(target=qp.serve, args=(threading.Event(),))
    t.start()
    peer.shutdown(socket.SHUT_WR)
    t.join(5)
    assert not t.is_alive() and "peer closed" in qp.failed
    with socket.socket() as s, pytest.raises(ValueError, match="serve needs a responder"):
        TcpQueuePair(TcpProvider(), s, 4, blocking=True).serve(stop)


def test_exchange_of_a_request_larger_than_the_socket_buffer(client_pair):
    """The request does not fit the socket: exchange waits for writability and flushes the
    rest itself (the peer answers only after reading all of it), the answer arrives whole."""
    qp, peer = client_pair
    payload = np.random.default_rng(3).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    seen = []

    def slow_peer():
        hdr = P.unpack_header(_exact(peer, P.HEADER.size))
        got = bytearray()
        while len(got) < hdr.length:
            got += peer.recv(min(1 << 16, hdr.length - len(got)))
            time.sleep(0.0005)
        seen.append(bytes(got) == payload)
        peer.sendall(_frame(P.Op.SEND, hdr.req_id, b"all %d" % len(got)))
    t = threading.Thread(target=slow_peer)
    t.start()
    got = qp.exchange(21, payload, time.monotonic() + 30)
    t.join(30)
    assert seen == [True] and bytes(got) == b"all %d" % len(payload)
    assert not qp.wants_write() and qp.bytes_sent == P.HEADER.size + len(payload)


def test_close_wakes_a_caller_blocked_in_exchange(client_pair):
    """A caller waits in exchange()'s blocking receive; close() from another thread ends the
    wait (None, the queue pair failed) long before the request's 30 s deadline."""
    qp, peer = client_pair
    res = []
    t = threading.Thread(target=lambda: res.append(qp.exchange(30, b"q", time.monotonic() + 30)))
    t.start()
    _read_frame(peer)                                 # the request left: the caller waits now
    time.sleep(0.05)
    qp.close()
    t.join(10)
    assert not t.is_alive() and res == [None] and qp.failed == "closed locally"
