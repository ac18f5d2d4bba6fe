"""The store's per-table threads (``parallel=True`` with caches): TableThreads' contract, and a
threaded store giving the serial store's results and cache state bit for bit."""
from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

from evssd.host import pooling as P
from evssd.host.store import EmbeddingStore
from evssd.host.store.tablethreads import TableThreads


def test_map_keeps_order_and_spreads_the_items():
    tt = TableThreads()
    seen = {}
    barrier = threading.Barrier(2, timeout=10)

    def fn(x):
        if x < 2:                      # the first item of each share meets the other share
            barrier.wait()
        seen[x] = (threading.get_ident(), tt.on_worker)
        return x * x

    try:
        assert tt.map(fn, list(range(7)), 2) == [x * x for x in range(7)]
        assert len({seen[x][0] for x in seen}) == 2           # two threads ran
        assert {seen[x][0] for x in (0, 2, 4, 6)} == {threading.get_ident()}  # the caller: share 0
        assert all(w for _, w in seen.values()) and not tt.on_worker
        assert tt.map(fn, [5], 2) == [25] and seen[5][0] == threading.get_ident()  # one item: inline
    finally:
        tt.close()


def test_map_raises_the_first_error_after_every_share_finished():
    tt = TableThreads()
    done = []

    def fn(x):
        if x in (1, 4):
            raise ValueError(f"item {x}")
        done.append(x)
        return x

    try:
        with pytest.raises(ValueError, match="item 1"):
            tt.map(fn, list(range(6)), 3)
        assert sorted(done) == [0, 2, 3, 5]
    finally:
        tt.close()
    assert tt.map(lambda x: x + 1, [1, 2, 3], 2) == [2, 3, 4]   # closed: runs on the caller
    tt.close()                                                    # idempotent


def test_map_spreads_only_phases_worth_a_hand_off():
    """The first phase spreads; phases averaging less work than ``min_work_s`` then run on the
    caller, and spread again once their work grows past it."""
    import time
    tt = TableThreads(min_work_s=0.004)
    me = threading.get_ident()
    ran = []

    def fn(x):
        ran.append(threading.get_ident())
        if x >= 100:
            time.sleep(0.002)           # 2 ms of "work" per item
        return x

    try:
        assert tt.map(fn, [0, 1, 2, 3], 2) == [0, 1, 2, 3]
        assert len(set(ran)) == 2 and tt.work_s is not None and tt.work_s < 0.004
        for _ in range(3):              # small phases: on the caller only
            ran.clear()
            assert tt.map(fn, [0, 1, 2, 3], 2) == [0, 1, 2, 3]
            assert set(ran) == {me}
        spread = False
        for _ in range(20):             # 8 ms phases: the average passes 4 ms, then they spread
            ran.clear()
            assert tt.map(fn, [100, 101, 102, 103], 2) == [100, 101, 102, 103]
            if len(set(ran)) == 2:
                spread = True
                break
        assert spread and tt.work_s >= 0.004
        always = TableThreads(min_work_s=0)
        for _ in range(3):
            ran.clear()
            assert always.map(fn, [0, 1], 2) == [0, 1] and len(set(ran)) == 2
        always.close()
    finally:
        tt.close()


def _state(store):
    return {n: (c.stats, c._ref.tobytes(), c._slot_key.tobytes(), c._counters.tobytes(),
                c._sketch.tobytes(), c._st.tolist()) for n, c in store.caches.items()}


@pytest.mark.parametrize("backend", ["file", "dram"])
def test_threaded_store_equals_serial_store(tmp_path, backend):
    """Hits, misses, admissions and evictions on 3 tables, fp32/fp16/int8_rowwise: a parallel
    store (tables on 2 threads) returns the definition's bits and ends in the serial store's
    cache state."""
    rng = np.random.default_rng(5)
    n = 500
    tables = {"a": rng.standard_normal((n, 16)).astype(np.float32),
              "b": rng.standard_normal((n, 8)).astype(np.float16),
              "c": rng.standard_normal((n, 4)).astype(np.float32)}
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread on this machine: nothing to spread")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with EmbeddingStore.from_arrays(tables, backend, parallel=True, cache_fraction=0.2,
                                        **({"path": tmp_path / "p"} if backend == "file" else {})) as par, \
                EmbeddingStore.from_arrays(tables, backend, parallel=False, cache_fraction=0.2,
                                           **({"path": tmp_path / "s"} if backend == "file" else {})) as ser:
            assert par._table_threads(3) == 2 and ser._table_threads(3) == 1
            par._threads.min_work_s = 0        # spread every phase, however small (see below)
            ran_on = set()
            plan_fn, finish_fn = par._plan, par._finish
            par._plan = lambda *a: (ran_on.add(("plan", threading.get_ident())), plan_fn(*a))[1]
            par._finish = lambda p: (ran_on.add(("finish", threading.get_ident())), finish_fn(p))[1]
            for step in range(12):
                req = {}
                for name in tables:
                    bags = int(rng.integers(1, 40))
                    offs = np.concatenate([[0], np.cumsum(rng.integers(0, 9, bags))]).astype(np.int64)
                    idx = (rng.zipf(1.2, int(offs[-1])) % (60 if step < 8 else n)).astype(np.int64)
                    req[name] = (idx, offs)
                mode = "mean" if step % 5 == 4 else "sum"
                got = par.lookup_many(req, mode)
                want = ser.lookup_many(req, mode)
                for name, (idx, offs) in req.items():
                    ref = P.pool(tables[name], "fp16" if name == "b" else "fp32", idx, offs, mode=mode)
                    assert got[name].tobytes() == ref.tobytes() == want[name].tobytes(), (step, name)
                assert _state(par) == _state(ser)
            assert len({t for ph, t in ran_on if ph == "plan"}) == 2   # both phases on 2 threads
            assert len({t for ph, t in ran_on if ph == "finish"}) == 2
            assert par.stats()["caches"]["a"]["evictions"] > 0       # the miss path ran too
            assert par.stats()["cache_hit_rate"] == ser.stats()["cache_hit_rate"] > 0.3
            with pytest.raises(Exception, match=r"table 'c'.*out of range"):   # validated first
                par.lookup_many({"a": req["a"], "c": (np.array([n]), np.array([0, 1]))})
            assert _state(par) == _state(ser)
    finally:
        numba.set_num_threads(before)
