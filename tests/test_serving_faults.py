"""Faults: servers that die or stall mid-batch, replicas, late replies; a server in its own
network namespace behind a veth pair. Every wait is bounded by a timeout (no timing asserts)."""
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from evssd.host.serving import protocol as P
from evssd.host.serving.config import make_config
from evssd.host.serving.engine import Engine, RequestTimeout
from evssd.host.serving.launcher import LocalCluster
from evssd.host.serving.ranker import Ranker, ServingError, local_pooled, synthetic_batch
from evssd.host.serving.providers import get_provider

# Fault tests stop and kill server processes on short timeouts: keep them on one pytest-xdist
# worker so they never share the machine with another serving cluster's timing-sensitive run.
pytestmark = pytest.mark.xdist_group("serving-faults")


def _batch(cfg, seed=0, b=32):
    return synthetic_batch(cfg, b, 8, np.random.default_rng(seed))[1]


def _check(cfg, got, sparse):
    for g, w in zip(got, local_pooled(cfg, sparse)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_server_killed_mid_batch_fails_the_batch_clearly():
    with LocalCluster(make_config(2, 2000, 8, 2)) as c:
        with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
            r = Ranker(c.config, eng, timeout=10)
            sparse = _batch(c.config)
            _check(c.config, r.embeddings(sparse), sparse)
            c.stall("s1")                                # requests queue up unanswered ...
            killer = threading.Timer(0.3, c.kill, args=("s1",))
            killer.start()                               # ... and the server dies under them
            try:
                with pytest.raises(ServingError, match=r"every server failed: s1: ConnectionLost"):
                    r.embeddings(_batch(c.config, 1))
            finally:
                killer.join()
            # the next batch fails fast on the dead connection, still with a clear error
            with pytest.raises(ServingError, match="every server failed"):
                r.embeddings(_batch(c.config, 2))


def test_stalled_server_times_out_in_bounded_time():
    with LocalCluster(make_config(2, 2000, 8, 2)) as c:
        with Engine(get_provider("tcp"), 1, request_timeout=1.0) as eng:
            r = Ranker(c.config, eng, timeout=1.0)
            c.stall("s0")
            try:
                with pytest.raises(ServingError, match=r"s0: RequestTimeout: .*did not answer"):
                    r.embeddings(_batch(c.config))
            finally:
                c.resume("s0")


def test_late_reply_never_answers_a_newer_request():
    with LocalCluster(make_config(1, 500, 4, 1)) as c:
        with Engine(get_provider("tcp"), 1, credits=2, request_timeout=0.5) as eng:
            conn = eng.connect("s0", *c.address("s0"))
            echo = lambda b: P.encode_request(P.Request(P.MsgType.ECHO, payload=b))
            c.stall("s0")
            f_old = eng.request(conn, echo(b"old"))
            with pytest.raises(RequestTimeout):
                f_old.result(10)
            c.resume("s0")
            # "old" is answered late; the next requests must get their own answers
            for i in range(20):
                want = b"new%d" % i
                assert eng.request(conn, echo(want), timeout=10).result(10) == want


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_replica_takes_over(fault):
    with LocalCluster(make_config(2, 3000, 8, 3, replicas=1)) as c:
        with Engine(get_provider("tcp"), 2, request_timeout=1.0) as eng:
            r = Ranker(c.config, eng, timeout=1.0)
            sparse = _batch(c.config)
            _check(c.config, r.embeddings(sparse), sparse)
            assert r.retries == 0
            (c.kill if fault == "kill" else c.stall)("s0")
            try:
                for seed in range(1, 4):
                    sparse = _batch(c.config, seed)
                    _check(c.config, r.embeddings(sparse), sparse)
                if fault == "kill":
                    assert r.conns["s0"].dead     # skipped as soon as it was seen dead (reconnects fail)
                else:
                    assert r.retries >= 1                  # timed out, retried on the replica
                before = r.retries
                sparse = _batch(c.config, 9)
                _check(c.config, r.embeddings(sparse), sparse)
                assert r.retries == before          # s0 is avoided now (dead or suspect)
                if fault == "kill":
                    # a ranker started while s0 is down treats it as dead and uses the replicas
                    with Engine(get_provider("tcp"), 1, request_timeout=1.0) as eng2:
                        r2 = Ranker(c.config, eng2, timeout=1.0)
                        assert "unreachable at start" in r2.conns["s0"].dead
                        _check(c.config, r2.embeddings(sparse), sparse)
            finally:
                if fault == "stall":
                    c.resume("s0")


@pytest.mark.parametrize("fetch", ["pooled", "rows"])
def test_ranker_reconnects_to_a_restarted_server(fetch):
    """No replica: while s1 is down its batches fail clearly; once it is back on the same
    address the running ranker reconnects (backoff), re-reads its memory keys (new rkeys
    after a restart, used by one-sided READs) and serves from it again."""
    with LocalCluster(make_config(2, 2000, 8, 2)) as c:
        with Engine(get_provider("tcp"), 2, request_timeout=2.0) as eng:
            r = Ranker(c.config, eng, fetch=fetch, timeout=2.0, reconnect_backoff=(0.01, 0.05))
            sparse = _batch(c.config)
            _check(c.config, r.embeddings(sparse), sparse)
            old_keys = {t: m["rkey"] for t, m in r.meta["s1"].items()}
            c.kill("s1")
            with pytest.raises(ServingError, match="every server failed: s1"):
                r.embeddings(_batch(c.config, 1))
            with pytest.raises(ServingError, match="s1: ConnectionLost.*reconnect failed|every server failed: s1"):
                r.embeddings(_batch(c.config, 2))            # still down: a reconnect attempt fails
            c.restart("s1")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "s1" not in r.reconnect(force=True):
                time.sleep(0.05)
            assert not r.conns["s1"].dead and r.reconnects >= 1
            assert {t: m["rkey"] for t, m in r.meta["s1"].items()} != old_keys
            for seed in range(3, 6):
                sparse = _batch(c.config, seed)
                _check(c.config, r.embeddings(sparse), sparse)


def test_replica_set_regains_a_restarted_primary():
    with LocalCluster(make_config(2, 3000, 8, 3, replicas=1)) as c:
        with Engine(get_provider("tcp"), 2, request_timeout=2.0) as eng:
            r = Ranker(c.config, eng, timeout=2.0, reconnect_backoff=(0.01, 0.05))
            c.kill("s0")
            for seed in range(2):                          # the replica serves meanwhile
                sparse = _batch(c.config, seed)
                _check(c.config, r.embeddings(sparse), sparse)
            c.restart("s0")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and r.conns["s0"].dead:
                sparse = _batch(c.config, 7)
                _check(c.config, r.embeddings(sparse), sparse)
                time.sleep(0.02)
            assert not r.conns["s0"].dead
            served = eng.connections["s0"].completed
            sparse = _batch(c.config, 8)
            _check(c.config, r.embeddings(sparse), sparse)
            assert eng.connections["s0"].completed > served   # primary again, not just connected


# ------------------------------------------------------------------ network namespaces
def _netns_unavailable():
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    probe = f"evssd-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def test_servers_in_network_namespaces_over_veth():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 10000
    ns1, ns2 = f"evssd-{tag}-a", f"evssd-{tag}-b"
    links = [f"evs{tag}a", f"evs{tag}b"]
    net = 200 + tag % 50
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True, text=True)
    try:
        netns = {}
        for i, (ns, link) in enumerate(zip((ns1, ns2), links)):
            run("ip", "netns", "add", ns)
            run("ip", "link", "add", link, "type", "veth", "peer", "name", link + "p")
            run("ip", "link", "set", link + "p", "netns", ns)
            run("ip", "addr", "add", f"10.{net}.{i}.1/24", "dev", link)
            run("ip", "link", "set", link, "up")
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.{net}.{i}.2/24", "dev", link + "p")
            run("ip", "netns", "exec", ns, "ip", "link", "set", link + "p", "up")
            run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            netns[f"s{i + 1}"] = (ns, f"10.{net}.{i}.2")
        cfg = make_config(3, 3000, 8, 3)          # s0 on loopback, s1 and s2 in their namespaces
        with LocalCluster(cfg, netns=netns) as c:
            assert c.address("s1")[0] == f"10.{net}.0.2" and c.address("s2")[0] == f"10.{net}.1.2"
            with Engine(get_provider("tcp"), 2, request_timeout=10) as eng:
                r = Ranker(c.config, eng, timeout=10)
                for seed in range(3):
                    sparse = _batch(c.config, seed, b=64)
                    _check(c.config, r.embeddings(sparse), sparse)
                rows = Ranker(c.config, Engine(get_provider("tcp"), 1, request_timeout=10), fetch="rows", timeout=10)
                try:
                    _check(c.config, rows.embeddings(sparse), sparse)
                finally:
                    rows.engine.close()
    finally:
        for ns in (ns1, ns2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def test_soak_short_good_bad_clients_and_restarts():
    """The soak run in short: every good batch is correct or a clear ServingError (no wrong
    answer, no other exception, nothing past the retry bound), every bad-client kind was
    turned away or cut off, every restarted server was rejoined by every ranker, and server
    memory came back after the bad clients left."""
    from evssd.host.serving.soak import run_soak
    r = run_soak(phase_s=2.0, rows=3000, good=2)
    for ph, p in r["phases"].items():
        assert p["wrong"] == 0 and p["defects"] == 0, (ph, p, r["error_examples"])
    assert r["phases"]["clean"]["ok"] > 0 and r["phases"]["bad clients"]["ok"] > 0
    assert r["phases"]["chaos"]["ok"] > 0
    assert r["max_batch_s"] <= r["latency_bound_s"], r["max_batch_s"]      # nothing hung
    for kind, c in r["bad_clients"].items():
        assert c["attempts"] >= 1 and c["refused_or_closed"] >= 1, (kind, c)
    assert r["bad_clients"]["oversized"]["error_frames"] >= 1
    assert len(r["restarts"]) >= 3 and all(x["recovery_s"] is not None for x in r["restarts"]), r["restarts"]
    start, after = r["rss_kib"]["start"], r["rss_kib"]["after_bad_clients_left"]
    for s in start:
        assert after[s] <= start[s] + 32 * 1024, (s, start[s], after[s])
