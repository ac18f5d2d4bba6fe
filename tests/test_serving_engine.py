"""The engine on the tcp provider against real server processes: READ, SEND/RECV, credits,
live migration under load, placement; and the verbs provider's unavailable path."""
import sys
import threading
import types

import numpy as np
import pytest

from evssd.host.serving import protocol as P
from evssd.host.serving.config import make_config, table_rows
from evssd.host.serving.engine import Backpressure, Engine
from evssd.host.serving.launcher import LocalCluster
from evssd.host.serving.providers import get_provider
from evssd.host.serving.rdma import RdmaUnavailable


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(make_config(2, 5000, 8, 3)) as c:
        yield c


def _connect_all(eng, cluster):
    return {n: eng.connect(n, *cluster.address(n)) for n in cluster.config["servers"]}


def _meta(eng, conn):
    return eng.request(conn, P.encode_request(P.Request(P.MsgType.META))).result(10)["tables"]


def test_send_recv_and_one_sided_read(cluster):
    cfg = cluster.config
    with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
        conns = _connect_all(eng, cluster)
        t0 = table_rows(cfg, "t0")
        for name, conn in conns.items():
            m = _meta(eng, conn)["t0"]
            lo, hi, first = m["ranges"][0]
            idx = np.arange(lo, hi, 97)
            got = eng.request(conn, P.encode_request(P.Request(P.MsgType.GATHER, "t0", idx))).result(10)
            np.testing.assert_array_equal(got, t0[idx])
            # one-sided: the same rows read straight out of the server's registered region
            rb = m["row_bytes"]
            raw = eng.read_rows(conn, m["rkey"], (idx - lo + first) * rb, rb).result(10)
            np.testing.assert_array_equal(raw.view(np.float32).reshape(-1, 8), t0[idx])
            one = eng.read(conn, m["rkey"], 0, rb).result(10)
            assert one == t0[lo].tobytes()
            # a READ outside the region fails that request only
            with pytest.raises(P.RemoteError, match="outside"):
                eng.read(conn, m["rkey"], (hi - lo) * rb, rb).result(10)
            assert eng.read(conn, m["rkey"], rb, rb).result(10) == t0[lo + 1].tobytes()


def test_mapping_aware_placement_spreads_fanout():
    with LocalCluster(make_config(1, 4000, 4, 4, skew=[5, 1, 1, 1])) as c:
        with Engine(get_provider("tcp"), 2) as eng:
            # weights from the shard map: s0 holds 5/8 of the rows, s1..s3 1/8 each
            w = {"s0": 5, "s1": 1, "s2": 1, "s3": 1}
            for n in sorted(w, key=lambda n: -w[n]):
                eng.connect(n, *c.address(n), weight=w[n])
            place = eng.placement()
            assert place["s0"] != place["s1"]
            assert {place[n] for n in ("s1", "s2", "s3")} == {1 - place["s0"]}


def test_credits_give_backpressure_not_loss(cluster):
    with Engine(get_provider("tcp"), 1, credits=4, request_timeout=20, credit_timeout=0.3) as eng:
        conn = eng.connect("s1", *cluster.address("s1"))
        cluster.stall("s1")
        try:
            futs = [eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=bytes([i]) * 8)))
                    for i in range(4)]
            with pytest.raises(Backpressure, match="4 requests in flight"):
                eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=b"x")), block=False)
            with pytest.raises(Backpressure, match="none completed within"):
                eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=b"x")))
        finally:
            cluster.resume("s1")
        assert [f.result(20) for f in futs] == [bytes([i]) * 8 for i in range(4)]
        # credits came back: the connection takes requests again
        assert eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=b"ok"))).result(10) == b"ok"


def test_migration_under_load_loses_and_reorders_nothing(cluster):
    n_req = 1500
    with Engine(get_provider("tcp"), 3, credits=16, request_timeout=30) as eng:
        conn = eng.connect("s0", *cluster.address("s0"))
        order = []
        futs = []
        stop = threading.Event()

        def submitter():
            for i in range(n_req):
                f = eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=i.to_bytes(4, "little") * 64)))
                f.add_done_callback(lambda f, i=i: order.append(i))
                futs.append((i, f))
            stop.set()

        th = threading.Thread(target=submitter)
        th.start()
        moves = [0, 0]

        def mover(k):               # two movers race each other on the same connection
            rng = np.random.default_rng(k)
            while not stop.is_set() or moves[k] < 3:
                eng.migrate(conn, int(rng.integers(3)), timeout=30)
                moves[k] += 1
        movers = [threading.Thread(target=mover, args=(k,)) for k in range(2)]
        for m in movers:
            m.start()
        th.join(60)
        for m in movers:
            m.join(60)
        for i, f in futs:
            assert f.result(30) == i.to_bytes(4, "little") * 64
        assert len(futs) == n_req
        assert order == list(range(n_req))          # completions in submission order
        assert min(moves) >= 3 and 0 < eng.migrations <= sum(moves)


def test_rebalance_moves_a_connection_off_the_busy_thread(cluster):
    with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
        a = eng.connect("s0", *cluster.address("s0"), thread=0)
        b = eng.connect("s1", *cluster.address("s1"), thread=0)
        eng.connect("s2", *cluster.address("s2"), thread=1)
        eng.rebalance()                               # reset the window
        big = P.encode_request(P.Request(P.MsgType.ECHO, payload=b"z" * 20000))
        for _ in range(20):
            fa, fb = eng.request(a, big), eng.request(b, big)
            fa.result(10), fb.result(10)
        moves = eng.rebalance(ratio=1.5)
        assert len(moves) == 1 and moves[0][1:] == (0, 1)
        assert sorted(eng.placement().values()) == [0, 1, 1]
        assert eng.request(a, big).result(10) == b"z" * 20000


# ------------------------------------------------------------------ verbs provider error path
def test_verbs_without_pyverbs_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyverbs", None)     # import pyverbs -> ImportError
    with pytest.raises(RdmaUnavailable, match="install rdma-core's python3-pyverbs or use the tcp provider"):
        get_provider("verbs")


def _fake_pyverbs(monkeypatch, get_device_list):
    pkg = types.ModuleType("pyverbs")
    pkg.__path__ = []
    mods = {"pyverbs": pkg}
    for sub in ("device", "enums", "cq", "mr", "pd", "qp", "wr"):
        m = types.ModuleType(f"pyverbs.{sub}")
        setattr(pkg, sub, m)
        mods[f"pyverbs.{sub}"] = m
    mods["pyverbs.device"].get_device_list = get_device_list
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)


def test_verbs_without_device_gives_clear_error(monkeypatch):
    _fake_pyverbs(monkeypatch, lambda: [])
    with pytest.raises(RdmaUnavailable, match="no RDMA.*found no RDMA device"):
        get_provider("verbs")

    def raising():
        raise OSError("Failed to get devices list (errno 38)")
    _fake_pyverbs(monkeypatch, raising)
    with pytest.raises(RdmaUnavailable, match="no RDMA device: Failed to get devices list"):
        get_provider("verbs")


def test_cli_reports_missing_rdma(monkeypatch, capsys, tmp_path):
    from evssd.host.cli import main
    from evssd.host.serving.config import save_config
    monkeypatch.setitem(sys.modules, "pyverbs", None)
    from evssd.host.serving.config import assign_ports
    path = save_config(assign_ports(make_config(1, 100, 4, 1)), tmp_path / "c.json")
    assert main(["serve", "ranker", "--config", str(path), "--provider", "verbs"]) == 2
    assert "python3-pyverbs or use the tcp provider" in capsys.readouterr().err


@pytest.mark.parametrize("direct", [True, False])
def test_concurrent_callers_on_one_connection(cluster, direct):
    """Callers send on their own threads (direct) or through the I/O thread: every reply
    reaches its own request, under credits, with migrations in between."""
    with Engine(get_provider("tcp"), 2, credits=4, request_timeout=20, direct_send=direct) as eng:
        conn = eng.connect("s0", *cluster.address("s0"))
        errors = []

        def caller(k):
            try:
                for i in range(40):
                    want = b"%d-%d-" % (k, i) + b"z" * (i * 37)
                    got = eng.request(conn, P.encode_request(P.Request(P.MsgType.ECHO, payload=want))).result(20)
                    assert got == want
            except Exception as exc:     # reported below with the caller's id
                errors.append(f"caller {k}: {type(exc).__name__}: {exc}")
        ths = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
        for t in ths:
            t.start()
        for target in (1, 0, 1):
            eng.migrate(conn, target)
        for t in ths:
            t.join(60)
        assert not errors, errors
        assert conn.completed >= 240 and not conn.pending


# ------------------------------------------------------------------ busy caller polls (Engine.call)
def _echo(b):
    return P.encode_request(P.Request(P.MsgType.ECHO, payload=b))


def _credits_free(conn):
    n = 0
    while conn.credits.acquire(blocking=False):
        n += 1
    for _ in range(n):
        conn.credits.release()
    return n


def test_call_mixed_with_futures_reads_and_migration(cluster):
    """Synchronous callers (reading their own replies), future callers and one-sided READs
    share one connection while it migrates between threads: every answer is its own request's
    (checked against the table and the echoed bytes), nothing stays pending, every credit is
    back, and callers did read replies themselves (the connection got parked)."""
    cfg = cluster.config
    t0 = table_rows(cfg, "t0")
    with Engine(get_provider("tcp"), 2, credits=8, request_timeout=20) as eng:
        conn = eng.connect("s0", *cluster.address("s0"))
        m = _meta(eng, conn)["t0"]
        lo, hi, first = m["ranges"][0]
        rb = m["row_bytes"]
        errors, stop = [], threading.Event()
        parked_seen = []

        def sync_caller(k):
            rng = np.random.default_rng(k)
            try:
                for i in range(120):
                    if rng.random() < 0.3:
                        idx = rng.integers(lo, hi, int(rng.integers(1, 40)))
                        got = eng.call(conn, P.encode_request(P.Request(P.MsgType.GATHER, "t0", idx)))
                        np.testing.assert_array_equal(got, t0[idx])
                    else:
                        want = b"s%d-%d-" % (k, i) + bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8))
                        assert eng.call(conn, _echo(want)) == want
                    parked_seen.append(conn.parked)
            except Exception as exc:
                errors.append(f"sync {k}: {type(exc).__name__}: {exc}")

        def future_caller(k):
            try:
                for i in range(60):
                    want = b"f%d-%d" % (k, i)
                    futs = [eng.request(conn, _echo(want + b"a")), eng.request(conn, _echo(want + b"b"))]
                    assert [f.result(20) for f in futs] == [want + b"a", want + b"b"]
            except Exception as exc:
                errors.append(f"future {k}: {type(exc).__name__}: {exc}")

        def reader():
            rng = np.random.default_rng(99)
            try:
                for _ in range(40):
                    idx = rng.integers(lo, hi, 16)
                    raw = eng.read_rows(conn, m["rkey"], (idx - lo + first) * rb, rb).result(20)
                    np.testing.assert_array_equal(raw.view(np.float32).reshape(-1, 8), t0[idx])
            except Exception as exc:
                errors.append(f"reader: {type(exc).__name__}: {exc}")

        def mover():
            k = 0
            while not stop.is_set():
                eng.migrate(conn, k % 2, timeout=20)
                k += 1
                stop.wait(0.01)

        ths = ([threading.Thread(target=sync_caller, args=(k,)) for k in range(3)]
               + [threading.Thread(target=future_caller, args=(k,)) for k in range(2)]
               + [threading.Thread(target=reader)])
        mv = threading.Thread(target=mover)
        for t in ths + [mv]:
            t.start()
        for t in ths:
            t.join(120)
        stop.set()
        mv.join(30)
        assert not errors, errors
        assert len(parked_seen) == 360
        assert not conn.pending and not conn.deferred
        assert _credits_free(conn) == conn.credits_total
        # a lone synchronous caller afterwards: reads its own replies, the I/O thread parked
        for i in range(2000):
            assert eng.call(conn, _echo(b"%d" % i)) == b"%d" % i
            if conn.parked:
                break
        assert conn.parked
        for i in range(20):
            assert eng.call(conn, _echo(b"p%d" % i)) == b"p%d" % i
        # and a future on the parked connection is still answered (the I/O thread rearms)
        assert eng.request(conn, _echo(b"async")).result(10) == b"async"


def test_lone_caller_round_trip_skips_the_general_path(cluster, monkeypatch):
    """A caller alone on its connection: each call is one exchange on its own thread, with no
    operation record and no future (the general path is made to fail here), answers checked
    against the table; every credit comes back. With no credit free it takes the general
    path (Backpressure at once with block=False), and then the fast one again."""
    t0 = table_rows(cluster.config, "t0")
    with Engine(get_provider("tcp"), 1, credits=4, request_timeout=10) as eng:
        conn = eng.connect("s1", *cluster.address("s1"))
        lo, hi, _ = _meta(eng, conn)["t0"]["ranges"][0]

        def general(*args, **kw):
            raise AssertionError("call took the general path")
        monkeypatch.setattr(eng, "_submit", general)
        rng = np.random.default_rng(5)
        for i in range(60):
            if i % 3 == 0:
                idx = rng.integers(lo, hi, int(rng.integers(1, 50)))
                np.testing.assert_array_equal(
                    eng.call(conn, P.encode_request(P.Request(P.MsgType.GATHER, "t0", idx))), t0[idx])
            else:
                want = bytes(rng.integers(0, 256, int(rng.integers(0, 20000)), dtype=np.uint8))
                assert eng.call(conn, _echo(want)) == want
        assert _credits_free(conn) == conn.credits_total and not conn.pending
        monkeypatch.undo()
        held = [conn.credits.acquire(blocking=False) for _ in range(conn.credits_total)]
        assert all(held)
        with pytest.raises(Backpressure, match="4 requests in flight"):
            eng.call(conn, _echo(b"no credit"), block=False)
        for _ in held:
            conn.credits.release()
        assert eng.call(conn, _echo(b"back")) == b"back"
        assert _credits_free(conn) == conn.credits_total


def test_replies_own_their_arrays_after_later_messages(cluster):
    """Arrays in a reply (alone or in a MULTI's list) stay intact when later replies reuse the
    receive buffers: the caller's own read (call) and the I/O thread's (futures) alike."""
    t0 = table_rows(cluster.config, "t0")
    with Engine(get_provider("tcp"), 1, credits=2, request_timeout=10) as eng:
        conn = eng.connect("s0", *cluster.address("s0"))
        lo, hi, _ = _meta(eng, conn)["t0"]["ranges"][0]
        rng = np.random.default_rng(11)
        kept = []
        for i in range(12):
            idx = [rng.integers(lo, hi, 5) for _ in range(2)]
            msg = P.encode_multi([P.encode_request(P.Request(P.MsgType.GATHER, "t0", x)) for x in idx])
            got = eng.call(conn, msg) if i % 2 else eng.request(conn, msg).result(10)
            kept.append((idx, got))
        for idx, got in kept:                 # checked after all the later messages
            assert len(got) == 2
            for x, g in zip(idx, got):
                np.testing.assert_array_equal(g, t0[x])


def test_migrations_issued_before_the_first_adoption(cluster):
    """Migrations issued right after connect(), before any I/O thread adopted the connection,
    wait for that adoption: one thread drives the connection at a time (an I/O thread asserts
    it), none fails, and requests are answered."""
    with Engine(get_provider("tcp"), 3, request_timeout=10) as eng:
        for i in range(25):
            conn = eng.connect(f"m{i}", *cluster.address("s0"), thread=0)
            eng.migrate(conn, 1, timeout=10)
            eng.migrate(conn, 2, timeout=10)
            assert conn.migrated.is_set() and conn.driver == conn.owner == 2
            assert eng.call(conn, _echo(b"%d" % i)) == b"%d" % i
        assert [t.crashed for t in eng.threads] == [None] * 3
        assert all(t.is_alive() for t in eng.threads)


def test_call_remote_error_and_bad_argument(cluster):
    with Engine(get_provider("tcp"), 1, request_timeout=10) as eng:
        conn = eng.connect("s1", *cluster.address("s1"))
        with pytest.raises(P.RemoteError, match="holds no shard of table 'nope'"):
            eng.call(conn, P.encode_request(P.Request(P.MsgType.GATHER, "nope", np.arange(2))))
        with pytest.raises(ValueError, match="exceeds"):
            eng.call(conn, b"x" * (P.MAX_PAYLOAD + 1))
        assert eng.call(conn, _echo(b"still up")) == b"still up"
        assert _credits_free(conn) == conn.credits_total


def test_call_on_stalled_then_killed_server_fails_in_bounded_time():
    """A caller reading its own reply gives up at the deadline (RequestTimeout from the I/O
    thread, the connection stays usable), and a server that dies under a waiting caller fails
    the call with ConnectionLost; neither hangs."""
    from evssd.host.serving.engine import ConnectionLost, RequestTimeout
    with LocalCluster(make_config(1, 500, 4, 1)) as c:
        with Engine(get_provider("tcp"), 1, credits=4, request_timeout=0.5) as eng:
            conn = eng.connect("s0", *c.address("s0"))
            assert eng.call(conn, _echo(b"a")) == b"a"
            c.stall("s0")
            try:
                with pytest.raises(RequestTimeout, match="did not answer"):
                    eng.call(conn, _echo(b"late"))
            finally:
                c.resume("s0")
            for i in range(10):                  # the late answer never answers these
                assert eng.call(conn, _echo(b"n%d" % i), timeout=10) == b"n%d" % i
            c.stall("s0")
            killer = threading.Timer(0.2, c.kill, args=("s0",))
            killer.start()
            try:
                with pytest.raises(ConnectionLost):
                    eng.call(conn, _echo(b"dies"), timeout=10)
            finally:
                killer.join()
            with pytest.raises(ConnectionLost):
                eng.call(conn, _echo(b"after"))
            assert not conn.pending


def test_call_while_connection_closes(cluster):
    """close_connection while a caller waits for its own reply: the call fails with
    ConnectionLost, it does not hang."""
    from evssd.host.serving.engine import ConnectionLost
    with Engine(get_provider("tcp"), 1, request_timeout=10) as eng:
        conn = eng.connect("s2", *cluster.address("s2"))
        cluster.stall("s2")
        try:
            res = []

            def caller():
                try:
                    res.append(eng.call(conn, _echo(b"x"), timeout=10))
                except Exception as exc:
                    res.append(exc)
            t = threading.Thread(target=caller)
            t.start()
            # the caller waits: its request pending (general path) or its read under way
            while not (conn.pending or conn.rx_lock.locked()):
                threading.Event().wait(0.001)
            eng.close_connection(conn)
            t.join(10)
        finally:
            cluster.resume("s2")
        assert not t.is_alive()
        assert len(res) == 1 and isinstance(res[0], ConnectionLost), res
