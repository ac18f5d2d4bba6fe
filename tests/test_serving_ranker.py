"""Ranker over a real local cluster: pooled embeddings equal numpy, scores equal an
all-in-memory computation, the adaptive cache and the shared memory budget."""
import numpy as np
import pytest

from evssd.host.serving.config import make_config, table_rows
from evssd.host.serving.engine import Engine
from evssd.host.serving.launcher import LocalCluster
from evssd.host.serving.ranker import (DLRM, BudgetExceeded, EmbeddingCache, Ranker, ServingError,
                                       dense_from_criteo, local_pooled, pool_bags, synthetic_batch)
from evssd.host.serving.providers import get_provider

from evssd.host.workload import shared_data_dir
CRITEO = str(shared_data_dir() / "criteo_sample.txt")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(make_config(3, 6000, 8, 3, skew=[3, 2, 1])) as c:
        yield c


@pytest.fixture(scope="module")
def tables(cluster):
    return {t: table_rows(cluster.config, t) for t in cluster.config["tables"]}


def test_pool_bags_matches_loop():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((10, 3)).astype(np.float32)
    off = np.array([0, 0, 3, 3, 7, 10])
    want = np.stack([rows[a:b].sum(0) if b > a else np.zeros(3, np.float32) for a, b in zip(off[:-1], off[1:])])
    np.testing.assert_allclose(pool_bags(rows, off), want, rtol=1e-6)


@pytest.mark.parametrize("fetch,threads,multi", [("pooled", 1, True), ("pooled", 3, False),
                                                ("pooled", 2, True), ("rows", 2, True)])
def test_pooled_embeddings_equal_numpy(cluster, tables, fetch, threads, multi):
    cfg = cluster.config
    rng = np.random.default_rng(7)
    with Engine(get_provider("tcp"), threads, request_timeout=20) as eng:
        r = Ranker(cfg, eng, fetch=fetch, timeout=20, batch_messages=multi)
        for _ in range(3):
            _, sparse = synthetic_batch(cfg, 64, 12, rng)
            # variable bag lengths, with empty bags
            for t, (idx, _) in list(sparse.items()):
                lens = rng.integers(0, 20, 64)
                off = np.concatenate([[0], np.cumsum(lens)])
                sparse[t] = (rng.integers(0, cfg["tables"][t]["rows"], off[-1]), off)
            got = r.embeddings(sparse)
            want = local_pooled(cfg, sparse, tables)
            for g, w in zip(got, want):
                # partial sums per shard add in a different order than one numpy sum
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_scores_equal_all_in_memory_model(cluster, tables):
    cfg = cluster.config
    model = DLRM(13, cfg["dim"], len(cfg["tables"]), seed=3)
    dense_all = dense_from_criteo(CRITEO, limit=256)
    rng = np.random.default_rng(11)
    with Engine(get_provider("tcp"), 2, request_timeout=20) as eng:
        r = Ranker(cfg, eng, model, timeout=20, budget_bytes=4 << 20)
        for b in range(4):
            _, sparse = synthetic_batch(cfg, 64, 10, rng, alpha=1.0)   # skewed: the cache gets hits
            dense = dense_all[(b * 64 + np.arange(64)) % len(dense_all)]
            top, top_s, scores = r.rank(dense, sparse, k=5)
            want = model.forward(dense, local_pooled(cfg, sparse, tables))
            np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
            assert list(top) == list(np.argsort(-want, kind="stable")[:5]) or \
                np.allclose(np.sort(want)[::-1][:5], top_s, rtol=1e-5)
        assert r.cache.hits > 0 and r.cache.admitted > 0


def test_bad_batches_are_rejected_with_clear_errors(cluster):
    cfg = cluster.config
    with Engine(get_provider("tcp"), 1, request_timeout=20) as eng:
        r = Ranker(cfg, eng, timeout=20)
        _, sparse = synthetic_batch(cfg, 4, 2, np.random.default_rng(0))
        bad = dict(sparse)
        bad["t0"] = (np.array([0, 1, 6000, 2, 3, 4, 5, 6]), sparse["t0"][1])
        with pytest.raises(ServingError, match="index 6000 at position 2 outside"):
            r.embeddings(bad)
        with pytest.raises(ServingError, match="unknown tables"):
            r.embeddings({**sparse, "zz": sparse["t0"]})
        bad = dict(sparse)
        bad["t1"] = (sparse["t1"][0], np.array([0, 3, 2, 8, 8]))
        with pytest.raises(ServingError, match="offsets"):
            r.embeddings(bad)
        # the ranker (and its connections) still work
        assert r.embeddings(sparse)[0].shape == (4, 8)


def test_cache_resize_keeps_recent_rows():
    c = EmbeddingCache({"a": 100, "b": 50}, 2, capacity=4)
    c.new_batch()
    idx = np.array([1, 2, 3, 4])
    c.lookup("a", idx)
    c.lookup("a", idx)           # second access: admissible
    cand = c.candidates("a", idx, np.full(4, -1))
    assert list(cand) == [1, 2, 3, 4]
    c.admit("a", cand, np.arange(8, dtype=np.float32).reshape(4, 2))
    c.new_batch()
    s = c.lookup("a", np.array([3, 4]))    # 3 and 4 are now the most recent
    assert (s >= 0).all()
    c.resize(2)
    s = c.lookup("a", np.array([1, 2, 3, 4]))
    assert list(s >= 0) == [False, False, True, True]
    np.testing.assert_array_equal(c.rows[s[2:]], [[4, 5], [6, 7]])
    c.resize(8)
    assert c.capacity == 8 and c.used == 2


def test_adaptive_cache_serves_larger_batches_than_static(cluster):
    cfg = cluster.config
    budget = 4 << 20
    rng = np.random.default_rng(5)
    with Engine(get_provider("tcp"), 1, request_timeout=20) as eng:
        ad = Ranker(cfg, eng, budget_bytes=budget, adaptive=True, timeout=20)
        per_row = EmbeddingCache.bytes_per_row(cfg["dim"])
        static_rows = (budget * 3 // 4) // per_row
        st = Ranker(cfg, _second_engine(eng), budget_bytes=budget, adaptive=False,
                    static_cache_rows=static_rows, timeout=20)
        try:
            small = synthetic_batch(cfg, 64, 10, rng, alpha=1.0)[1]
            ad.embeddings(small)
            cap_small = ad.cache.capacity
            big_b = 1024
            big = synthetic_batch(cfg, big_b, 10, rng, alpha=1.0)[1]
            assert ad.batch_bytes(big_b, 3 * big_b * 10) + ad.cache.index_bytes > budget - st.cache.nbytes
            ad.embeddings(big)                          # the adaptive cache shrinks to make room
            assert ad.cache.capacity < cap_small
            with pytest.raises(BudgetExceeded, match="static cache"):
                st.embeddings(big)
            ad.embeddings(small)
            assert ad.cache.capacity == cap_small        # and grows back when load drops
            huge = synthetic_batch(cfg, 8192, 10, rng)[1]
            with pytest.raises(BudgetExceeded, match="budget is"):
                ad.embeddings(huge)
        finally:
            st.engine.close()


def _second_engine(eng):
    return Engine(get_provider("tcp"), 1, request_timeout=20)


def test_connections_migrate_while_batches_run(cluster, tables):
    """A second thread migrates connections at random during ranker batches: results stay exact."""
    import threading
    cfg = cluster.config
    rng = np.random.default_rng(21)
    with Engine(get_provider("tcp"), 3, request_timeout=20) as eng:
        r = Ranker(cfg, eng, timeout=20, rebalance_every=2)
        stop = threading.Event()
        moves = []

        def mover():
            mrng = np.random.default_rng(0)
            while not stop.is_set():
                conn = list(eng.connections.values())[mrng.integers(len(eng.connections))]
                eng.migrate(conn, int(mrng.integers(3)), timeout=20)
                moves.append(conn.name)
        th = threading.Thread(target=mover)
        th.start()
        try:
            for _ in range(12):
                _, sparse = synthetic_batch(cfg, 32, 8, rng)
                for g, w in zip(r.embeddings(sparse), local_pooled(cfg, sparse, tables)):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        finally:
            stop.set()
            th.join(30)
        assert len(moves) > 0 and eng.migrations >= len(set(moves))


@pytest.mark.parametrize("backend", ["file", "evssd"])
def test_servers_on_other_store_backends(backend):
    """Servers keep their shards on the file backend or the EV-SSD (model) through EmbeddingStore."""
    cfg = make_config(2, 1500, 8, 2)
    with LocalCluster(cfg, backend=backend, startup_timeout=120) as c:  # numba compiles at start: slow under load
        model = DLRM(13, 8, 2, seed=1)
        rng = np.random.default_rng(2)
        with Engine(get_provider("tcp"), 2, request_timeout=30) as eng:
            r = Ranker(c.config, eng, model, timeout=30)
            dense, sparse = synthetic_batch(c.config, 32, 6, rng)
            np.testing.assert_allclose(r.score(dense, sparse), model.forward(dense, local_pooled(c.config, sparse)),
                                       rtol=1e-5, atol=1e-6)
