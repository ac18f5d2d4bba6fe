"""Wire protocol: frame and message round trips, and every malformed input the server rejects."""
import json
import socket
import struct

import numpy as np
import pytest

from evssd.host.serving import protocol as P
from evssd.host.serving.config import ConfigError, make_config, table_rows, validate_config
from evssd.host.serving.launcher import LocalCluster
from tests.frame_client import read_frame


def test_header_round_trip():
    raw = P.pack_header(P.Op.READ_REQ, 123456789012, 16, flags=3)
    h = P.unpack_header(raw)
    assert (h.op, h.req_id, h.length, h.flags) == (P.Op.READ_REQ, 123456789012, 16, 3)


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([P.VERSION + 1]) + b[5:], "version mismatch"),
    (lambda b: b[:5] + bytes([99]) + b[6:], "unknown op"),
    (lambda b: b[:16] + struct.pack("<I", P.MAX_PAYLOAD + 1), "exceeds"),
])
def test_header_errors(mutate, msg):
    raw = P.pack_header(P.Op.SEND, 1, 10)
    with pytest.raises(P.ProtocolError, match=msg):
        P.unpack_header(mutate(raw))


def test_headers_unpacked_in_place_from_a_stream_match_the_packed_fields():
    """unpack_header_from reads frames at their offsets in a receive buffer (no slicing), with
    the same checks as unpack_header; request types decode to their enum members."""
    rng = np.random.default_rng(7)
    fields = [(int(rng.choice([int(o) for o in P.Op])), int(rng.integers(0, 1 << 63)),
               int(rng.integers(0, P.MAX_PAYLOAD + 1)), int(rng.integers(0, 1 << 16))) for _ in range(200)]
    stream = bytearray(b"\x00" * 3)
    offsets = []
    for op, rid, n, fl in fields:
        offsets.append(len(stream))
        stream += P.pack_header(op, rid, n, fl) + bytes(int(rng.integers(0, 5)))
    view = memoryview(stream)
    for (op, rid, n, fl), at in zip(fields, offsets):
        h = P.unpack_header_from(view, at)
        assert (h.op, h.req_id, h.length, h.flags) == (op, rid, n, fl)
        assert h == P.unpack_header(bytes(view[at:at + P.HEADER.size]))
    bad = bytearray(stream)
    bad[offsets[5] + 5] = 99
    with pytest.raises(P.ProtocolError, match="unknown op 99"):
        P.unpack_header_from(bad, offsets[5])
    for t in P.MsgType:
        if t in (P.MsgType.ECHO, P.MsgType.MULTI):
            continue
        assert P.decode_request(P.encode_request(P.Request(t, "t", np.arange(2), None))).type is t
    with pytest.raises(P.ProtocolError, match="unknown request type 77"):
        P.decode_request(struct.pack("<BBII", 77, 0, 0, 0))


def test_request_round_trip():
    idx = np.array([5, 1, 99, 7], dtype=np.int64)
    off = np.array([0, 1, 4], dtype=np.int64)
    req = P.decode_request(P.encode_request(P.Request(P.MsgType.POOLED, "t3", idx, off)))
    assert req.type == P.MsgType.POOLED and req.table == "t3"
    np.testing.assert_array_equal(req.indices, idx)
    np.testing.assert_array_equal(req.offsets, off)
    echo = P.decode_request(P.encode_request(P.Request(P.MsgType.ECHO, payload=b"abc")))
    assert echo.payload == b"abc"


def test_request_errors():
    good = P.encode_request(P.Request(P.MsgType.GATHER, "t0", np.arange(3), None))
    with pytest.raises(P.ProtocolError, match="does not match"):
        P.decode_request(good[:-1])
    with pytest.raises(P.ProtocolError, match="shorter"):
        P.decode_request(b"\x02")
    with pytest.raises(P.ProtocolError, match="unknown request type"):
        P.decode_request(bytes([77]) + good[1:])


def test_reply_round_trip():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(P.decode_reply(P.encode_ok_array(a)), a)
    assert P.decode_reply(P.encode_ok_json({"x": [1, 2]})) == {"x": [1, 2]}
    with pytest.raises(P.RemoteError, match="boom"):
        P.decode_reply(P.encode_err("boom"))
    with pytest.raises(P.ProtocolError, match="does not hold"):
        P.decode_reply(P.encode_ok_array(a)[:-4])


def test_multi_round_trip_and_errors():
    subs = [P.encode_request(P.Request(P.MsgType.GATHER, "a", np.arange(2))),
            P.encode_request(P.Request(P.MsgType.ECHO, payload=b"hi"))]
    got = P.decode_multi(P.encode_multi(subs))
    assert [bytes(g) for g in got] == subs
    reply = P.encode_ok_multi([P.encode_ok_bytes(b"x"), P.encode_err("nope")])
    res = P.decode_reply(reply)
    assert res[0] == b"x" and isinstance(res[1], P.RemoteError) and "nope" in str(res[1])
    with pytest.raises(P.ProtocolError, match="itself a MULTI"):
        P.decode_multi(P.encode_multi([P.encode_multi([])]))
    with pytest.raises(P.ProtocolError, match="runs past|truncated"):
        P.decode_multi(P.encode_multi(subs)[:-3])


def test_toml_config(tmp_path):
    from evssd.host.serving.config import load_config
    p = tmp_path / "c.toml"
    p.write_text('dim = 4\n[tables.t0]\nrows = 10\nseed = 1\n[servers.s0]\nhost = "127.0.0.1"\nport = 0\n'
                 '[[shards]]\ntable = "t0"\nrows = [0, 10]\nservers = ["s0"]\n')
    cfg = load_config(p)
    assert cfg["shards"][0]["rows"] == [0, 10] and table_rows(cfg, "t0").shape == (10, 4)


def test_config_validation_and_rows():
    cfg = make_config(2, 10000, 8, 3, replicas=1, skew=[2, 1, 1])
    rows = table_rows(cfg, "t1")
    # any row range is generated identically on its own (servers make only their shards)
    np.testing.assert_array_equal(table_rows(cfg, "t1", 4000, 9000), rows[4000:9000])
    bad = json.loads(json.dumps(cfg))
    bad["shards"][0]["rows"] = [0, 10]
    with pytest.raises(ConfigError, match="gap or overlap"):
        validate_config(bad)
    bad = json.loads(json.dumps(cfg))
    bad["shards"][0]["servers"] = ["nope"]
    with pytest.raises(ConfigError, match="unknown server"):
        validate_config(bad)


# ------------------------------------------------------------------ against a real server process
def _frame(op, req_id, payload, version=P.VERSION, magic=P.MAGIC):
    return struct.pack("<IBBHQI", magic, version, op, 0, req_id, len(payload)) + payload


def _hello(sock):
    sock.sendall(_frame(P.Op.HELLO, 0, json.dumps({"recv_depth": 4}).encode()))
    h, body = read_frame(sock)
    assert h.op == P.Op.HELLO_ACK
    return json.loads(body)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(make_config(2, 1000, 8, 1)) as c:
        yield c


def test_version_mismatch_in_hello_is_refused(cluster):
    with socket.create_connection(cluster.address("s0"), timeout=10) as s:
        s.sendall(_frame(P.Op.HELLO, 0, b"{}", version=P.VERSION + 1))
        raw = b""
        while len(raw) < P.HEADER.size:
            c = s.recv(4096)
            if not c:
                break
            raw += c
        magic, version, op, _, _, n = struct.unpack("<IBBHQI", raw[:20])
        assert op == P.Op.ERROR
        assert b"version mismatch" in raw[20:] or b"version mismatch" in s.recv(4096)
        assert s.recv(4096) == b""          # and the server closed the connection cleanly


def test_bad_magic_after_handshake_closes_with_error(cluster):
    with socket.create_connection(cluster.address("s0"), timeout=10) as s:
        _hello(s)
        s.sendall(_frame(P.Op.SEND, 5, b"xx", magic=0x12345678))
        h, body = read_frame(s)
        assert h.op == P.Op.ERROR and b"bad magic" in body
        assert s.recv(4096) == b""


def test_bad_requests_get_errors_and_connection_stays_usable(cluster):
    with socket.create_connection(cluster.address("s0"), timeout=10) as s:
        _hello(s)
        cases = [
            (P.encode_request(P.Request(P.MsgType.GATHER, "nope", np.arange(2))), "holds no shard"),
            (P.encode_request(P.Request(P.MsgType.GATHER, "t0", np.array([3, 1000]))), "outside the rows"),
            (P.encode_request(P.Request(P.MsgType.POOLED, "t0", np.arange(4), np.array([0, 5]))), "offsets"),
            (b"\x02\x00garbage", "ProtocolError"),
        ]
        for i, (payload, msg) in enumerate(cases, 1):
            s.sendall(_frame(P.Op.SEND, i, payload))
            h, body = read_frame(s)
            assert h.op == P.Op.SEND and h.req_id == i
            with pytest.raises(P.RemoteError, match=msg):
                P.decode_reply(body)
        # the same connection still serves a good request, bit-exact
        s.sendall(_frame(P.Op.SEND, 9, P.encode_request(P.Request(P.MsgType.GATHER, "t1", np.array([7, 3])))))
        h, body = read_frame(s)
        np.testing.assert_array_equal(P.decode_reply(body), table_rows(cluster.config, "t1")[[7, 3]])
        # MULTI: each sub-request answered on its own, a bad one does not spoil the others
        multi = P.encode_multi([P.encode_request(P.Request(P.MsgType.GATHER, "t0", np.array([2]))),
                                P.encode_request(P.Request(P.MsgType.GATHER, "t0", np.array([-1]))),
                                P.encode_request(P.Request(P.MsgType.POOLED, "t1", np.array([1, 2, 3]), np.array([0, 1, 3])))])
        s.sendall(_frame(P.Op.SEND, 11, multi))
        h, body = read_frame(s)
        res = P.decode_reply(body)
        t0, t1 = table_rows(cluster.config, "t0"), table_rows(cluster.config, "t1")
        np.testing.assert_array_equal(res[0], t0[[2]])
        assert isinstance(res[1], P.RemoteError) and "outside" in str(res[1])
        np.testing.assert_allclose(res[2], np.stack([t1[1], t1[2] + t1[3]]), rtol=1e-6)
        # a one-sided READ outside the region is refused, the connection stays
        s.sendall(_frame(P.Op.READ_REQ, 10, P.pack_read_req(0xDEAD, 0, 4)))
        h, body = read_frame(s)
        assert h.op == P.Op.READ_RESP and h.flags == P.Status.ERR and b"unknown rkey" in body


def test_send_without_posted_receive_is_refused_not_dropped(cluster):
    with socket.create_connection(cluster.address("s0"), timeout=10) as s:
        depth = _hello(s)["recv_depth"]
        # flood in one write: more SENDs than the receives the server advertised. The tcp server
        # answers each SEND inline (no receive taken), so all are answered; a queue pair without
        # a responder refuses the excess (tests/test_serving_tcp.py). Either way: none dropped
        payload = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"x" * 16))
        n = depth * 4
        s.sendall(b"".join(_frame(P.Op.SEND, i + 1, payload) for i in range(n)))
        answered = set()
        for _ in range(n):
            h, body = read_frame(s)
            assert h.op in (P.Op.SEND, P.Op.ERROR)
            if h.op == P.Op.ERROR:
                assert b"no receive posted" in body
            answered.add(h.req_id)
        assert answered == set(range(1, n + 1))      # every request got an answer of some kind
