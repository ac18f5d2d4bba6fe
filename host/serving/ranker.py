"""The ranker: a DLRM-style model whose embedding bags come from embedding servers.

* :class:`DLRM` -- numpy model: bottom MLP on dense features, one pooled embedding per table,
  pairwise dot interaction (upper triangle), top MLP, sigmoid.
* :class:`EmbeddingCache` -- rows cached on the ranker in one pool for all tables; LRU by batch
  stamp; admission on the second access (a saturating counter per row, as in EV-Cache).
* :class:`Ranker` -- fetches embeddings through the :class:`~.engine.Engine`:
  ``fetch="pooled"`` (hierarchical pooling: each shard's server returns partial bag sums, the
  ranker adds the partials) or ``fetch="rows"`` (the baseline: one one-sided READ per row of the
  server's registered table memory, pooled on the ranker). Rows held by the cache are pooled
  locally; rows admitted to the cache this batch are fetched with GATHER. With
  ``batch_messages`` (default) all of a batch's requests to one server travel as one MULTI
  message (one per server instead of one per table and server).

Memory budget (``budget_bytes``): batch buffers and the cache share it. ``adaptive=True`` sizes
the cache to what the current batch leaves over (it shrinks for big batches and grows back for
small ones); ``adaptive=False`` keeps a static cache of ``static_cache_rows`` rows, so a batch
larger than the rest of the budget is refused with :class:`BudgetExceeded`.

Faults: a sub-request that fails (server dead, stalled past the timeout, back-pressure) is
retried on the shard's next replica; when none is left the batch fails with
:class:`ServingError` naming the table, rows and every server's error -- never a partial score.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, TimeoutError as FutureTimeout

import numpy as np

from . import protocol as P
from .engine import Backpressure, Engine, EngineError, RequestTimeout

__all__ = ["DLRM", "EmbeddingCache", "Ranker", "ServingError", "BudgetExceeded", "pool_bags",
           "bag_ids", "local_pooled", "synthetic_batch", "dense_from_criteo", "criteo_batches"]


class ServingError(RuntimeError):
    pass


class BudgetExceeded(ServingError):
    pass


# ------------------------------------------------------------------ model
class DLRM:
    def __init__(self, n_dense: int, dim: int, n_tables: int, *, bottom=(64,), top=(64, 32), seed=0):
        rng = np.random.default_rng(seed)

        def mlp(sizes):
            return [(rng.standard_normal((a, b), dtype=np.float32) / np.float32(np.sqrt(a)),
                     rng.standard_normal(b, dtype=np.float32) * np.float32(0.01))
                    for a, b in zip(sizes[:-1], sizes[1:])]
        self.n_dense, self.dim, self.n_tables = n_dense, dim, n_tables
        self.bottom = mlp([n_dense, *bottom, dim])
        f = n_tables + 1
        self.iu = np.triu_indices(f, k=1)
        self.top = mlp([dim + f * (f - 1) // 2, *top, 1])
        self.widths = [n_dense, *bottom, dim, dim + f * (f - 1) // 2, *top, 1]

    @staticmethod
    def _run(layers, x, last_linear):
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            if i < len(layers) - 1 or not last_linear:
                np.maximum(x, 0, out=x)
        return x

    def forward(self, dense: np.ndarray, embs: list[np.ndarray]) -> np.ndarray:
        x = self._run(self.bottom, np.asarray(dense, dtype=np.float32), last_linear=False)
        z = np.stack([x, *embs], axis=1)                      # [B, F, dim]
        inter = np.einsum("bfd,bgd->bfg", z, z)[:, self.iu[0], self.iu[1]]
        logit = self._run(self.top, np.concatenate([x, inter], axis=1), last_linear=True)[:, 0]
        return 1.0 / (1.0 + np.exp(-logit))

    def activation_bytes(self, batch: int) -> int:
        return 4 * batch * (sum(self.widths) + (self.n_tables + 1) ** 2 + (self.n_tables + 1) * self.dim)


# ------------------------------------------------------------------ bags
def bag_ids(offsets: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


def pool_bags(rows: np.ndarray, offsets: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum rows per bag (FBGEMM offsets); empty bags are zero."""
    b = offsets.size - 1
    if out is None:
        out = np.zeros((b, rows.shape[1]), dtype=np.float32)
    lens = np.diff(offsets)
    nz = lens > 0
    if nz.any():
        out[nz] += np.add.reduceat(rows, offsets[:-1][nz], axis=0)
    return out


def _sub_bags(bags: np.ndarray, mask: np.ndarray, n_bags: int) -> np.ndarray:
    counts = np.bincount(bags[mask], minlength=n_bags)
    off = np.zeros(n_bags + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def local_pooled(cfg, sparse: dict, tables: dict | None = None) -> list[np.ndarray]:
    """All-in-memory golden: pooled bags per table straight from the table contents."""
    from .config import table_rows
    out = []
    for t in cfg["tables"]:
        idx, off = sparse[t]
        arr = tables[t] if tables else table_rows(cfg, t)
        out.append(pool_bags(arr[idx], off))
    return out


def synthetic_batch(cfg, batch: int, pooling: int, rng, *, n_dense=13, alpha: float = 0.0):
    """Dense features and bags of ``pooling`` rows per table; ``alpha`` > 0 draws rows Zipf-like."""
    dense = rng.standard_normal((batch, n_dense)).astype(np.float32)
    sparse = {}
    for t, info in cfg["tables"].items():
        n = info["rows"]
        if alpha > 0:
            r = rng.zipf(1.0 + alpha, batch * pooling) - 1
            idx = (r * 2654435761 % n).astype(np.int64)   # hot rows scattered over the shards
        else:
            idx = rng.integers(0, n, batch * pooling, dtype=np.int64)
        sparse[t] = (idx, np.arange(0, batch * pooling + 1, pooling, dtype=np.int64))
    return dense, sparse


def dense_from_criteo(path, limit: int | None = None) -> np.ndarray:
    """The 13 integer features of a Criteo CSV as log(1 + max(x, 0)), missing -> 0."""
    try:
        from evssd.host.workload import load_criteo
    except ImportError:
        load_criteo = None
    if load_criteo is not None:
        dense = load_criteo(path, n_tables=1).dense
        return dense[:limit] if limit else dense
    rows = []
    with open(path) as f:
        header = f.readline()
        if not header.startswith("label"):
            f.seek(0)
        for line in f:
            parts = line.rstrip("\n").split(",")
            rows.append([np.log1p(max(float(v), 0.0)) if v else 0.0 for v in parts[1:14]])
            if limit and len(rows) >= limit:
                break
    return np.asarray(rows, dtype=np.float32)


def criteo_batches(cfg, path, batch: int):
    """Yield (dense, sparse) batches from a Criteo CSV: categorical C<t+1> hashed into table t
    (one row per bag), via :func:`evssd.host.workload.load_criteo`; cycles through the file."""
    from evssd.host.workload import load_criteo
    tables = list(cfg["tables"])
    data = load_criteo(path, n_tables=len(tables),
                       rows_per_table=[cfg["tables"][t]["rows"] for t in tables])
    n = len(data)
    start = 0
    while True:
        sel = (start + np.arange(batch)) % n
        start = (start + batch) % n
        sparse = {t: (data.indices[i, sel].astype(np.int64), np.arange(batch + 1, dtype=np.int64))
                  for i, t in enumerate(tables)}
        yield data.dense[sel], sparse


# ------------------------------------------------------------------ cache
class EmbeddingCache:
    """Row cache for all tables in one pool; capacity changes with :meth:`resize`."""

    def __init__(self, table_rows: dict[str, int], dim: int, capacity: int = 0):
        self.dim = dim
        self.base = {}
        total = 0
        for t, n in table_rows.items():
            self.base[t] = total
            total += n
        self.slot_of = np.full(total, -1, dtype=np.int32)
        self.freq = np.zeros(total, dtype=np.uint8)
        self.capacity = 0
        self.keys = np.empty(0, dtype=np.int64)
        self.rows = np.empty((0, dim), dtype=np.float32)
        self.stamp = np.empty(0, dtype=np.int64)
        self.clock = 0
        self.hits = self.misses = self.admitted = self.evicted = 0
        self.resize(capacity)

    @property
    def index_bytes(self) -> int:
        return self.slot_of.nbytes + self.freq.nbytes

    @staticmethod
    def bytes_per_row(dim: int) -> int:
        return dim * 4 + 16

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.keys.nbytes + self.stamp.nbytes

    @property
    def used(self) -> int:
        return self.capacity - self._nfree

    def resize(self, capacity: int) -> None:
        capacity = max(0, int(capacity))
        if capacity == self.capacity:
            return
        valid = np.flatnonzero(self.keys >= 0)
        if valid.size > capacity:        # keep the most recently used
            order = np.argsort(self.stamp[valid], kind="stable")
            drop = valid[order[:valid.size - capacity]]
            self.slot_of[self.keys[drop]] = -1
            self.evicted += drop.size
            valid = valid[order[valid.size - capacity:]]
        keys = np.full(capacity, -1, dtype=np.int64)
        rows = np.empty((capacity, self.dim), dtype=np.float32)
        stamp = np.zeros(capacity, dtype=np.int64)
        k = valid.size
        keys[:k], rows[:k], stamp[:k] = self.keys[valid], self.rows[valid], self.stamp[valid]
        self.slot_of[keys[:k]] = np.arange(k, dtype=np.int32)
        self.keys, self.rows, self.stamp, self.capacity = keys, rows, stamp, capacity
        # free slots as a stack: the top is the lowest slot, so slots fill in order
        self._free = np.arange(capacity - 1, k - 1, -1, dtype=np.int64)
        self._free = np.concatenate([self._free, np.empty(k, dtype=np.int64)]) if k else self._free
        self._nfree = capacity - k

    def new_batch(self) -> None:
        """Rows used from here on are protected from eviction until the next batch."""
        self.clock += 1

    def lookup(self, table: str, idx: np.ndarray) -> np.ndarray:
        """Slots per index (-1: miss); marks hits used and counts accesses for admission."""
        g = idx + self.base[table]
        slots = self.slot_of[g]
        hit = slots >= 0
        self.stamp[slots[hit]] = self.clock
        nh = int(hit.sum())
        self.hits += nh
        self.misses += idx.size - nh
        f = self.freq[g]
        self.freq[g] = np.minimum(f.astype(np.int16) + 1, 3).astype(np.uint8)
        return slots

    def candidates(self, table: str, idx: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Distinct missed rows seen at least twice: worth admitting (empty if no capacity)."""
        if self.capacity == 0:
            return np.empty(0, dtype=np.int64)
        miss = np.unique(idx[slots < 0])
        hot = miss[self.freq[miss + self.base[table]] >= 2]
        return hot[:self.capacity]

    def admit(self, table: str, idx: np.ndarray, rows: np.ndarray) -> None:
        n = idx.size
        if n == 0 or self.capacity == 0:
            return
        if self._nfree < n:
            # evict in bulk (>= 1/16 of the cache) so the O(capacity) LRU scan is amortised;
            # rows used in this batch are never victims
            valid = np.flatnonzero((self.keys >= 0) & (self.stamp < self.clock))
            need = min(max(n - self._nfree, self.capacity // 16), valid.size)
            if need:
                victims = valid[np.argpartition(self.stamp[valid], need - 1)[:need]]
                self.slot_of[self.keys[victims]] = -1
                self.keys[victims] = -1
                self.evicted += need
                self._free[self._nfree:self._nfree + need] = victims
                self._nfree += need
        n = min(n, self._nfree)
        slots = self._free[self._nfree - n:self._nfree]
        self._nfree -= n
        g = idx[:n] + self.base[table]
        self.keys[slots] = g
        self.rows[slots] = rows[:n]
        self.stamp[slots] = self.clock
        self.slot_of[g] = slots.astype(np.int32)
        self.admitted += n


# ------------------------------------------------------------------ ranker
class _Shard:
    def __init__(self, table, lo, hi, servers):
        self.table, self.lo, self.hi, self.servers = table, lo, hi, servers


class _Unreachable:
    """Stands in for the connection to a server that could not be reached."""

    def __init__(self, name, peer, reason):
        self.name, self.dead = name, reason
        self.qp = type("Peer", (), {"peer": peer})()
        self.credits_total = 0


class Ranker:
    def __init__(self, cfg: dict, engine: Engine, model: DLRM | None = None, *, fetch: str = "pooled",
                 budget_bytes: int | None = None, adaptive: bool = True, static_cache_rows: int = 0,
                 timeout: float = 5.0, suspect_seconds: float = 30.0, rebalance_every: int = 0,
                 batch_messages: bool = True, pin_thread: int | None = None,
                 reconnect_backoff: tuple[float, float] = (0.05, 2.0), connect_timeout: float = 1.0,
                 resolve=None):
        if fetch not in ("pooled", "rows"):
            raise ValueError(f"fetch must be 'pooled' or 'rows', got {fetch!r}")
        self.cfg = cfg
        self.engine = engine
        self.fetch = fetch
        self.batch_messages = batch_messages
        self.pin_thread = pin_thread      # place every connection on one thread (placement-unaware)
        self.timeout = timeout
        lo, hi = reconnect_backoff
        if not 0 < lo <= hi:
            raise ValueError(f"reconnect_backoff must be (first, max) with 0 < first <= max, got {reconnect_backoff!r}")
        self.reconnect_backoff = (float(lo), float(hi))
        self.connect_timeout = connect_timeout
        # server name -> (host, port) where it is now (e.g. from a control plane); default: the config
        self.resolve = resolve or (lambda s: (cfg["servers"][s]["host"], cfg["servers"][s]["port"]))
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self.reconnects = 0
        self.dim = cfg["dim"]
        self.tables = list(cfg["tables"])
        self.model = model or DLRM(13, self.dim, len(self.tables))
        self.shards = {t: [] for t in self.tables}
        for sh in cfg["shards"]:
            self.shards[sh["table"]].append(_Shard(sh["table"], *sh["rows"], list(sh["servers"])))
        for t in self.tables:
            self.shards[t].sort(key=lambda s: s.lo)
        self._connect()
        self.suspect: dict[str, float] = {}
        self.suspect_seconds = suspect_seconds
        self.rebalance_every = rebalance_every
        self.batches = 0
        self.retries = 0
        self.budget = budget_bytes
        self.adaptive = adaptive
        self.cache = None
        if budget_bytes is not None:
            self.cache = EmbeddingCache({t: cfg["tables"][t]["rows"] for t in self.tables}, self.dim)
            if not adaptive:
                self.cache.resize(static_cache_rows)

    def _connect(self):
        # mapping-aware weights: a server's expected share of a batch's rows (primary shards)
        weight: dict[str, float] = {s: 0.0 for s in self.cfg["servers"]}
        for t in self.tables:
            rows = self.cfg["tables"][t]["rows"]
            for sh in self.shards[t]:
                weight[sh.servers[0]] += (sh.hi - sh.lo) / rows
        self.weight = {s: max(w, 1e-3) for s, w in weight.items()}
        self.conns = {}
        self.meta = {}
        for s in sorted(weight, key=lambda s: -weight[s]):
            # a server that is down at start is a dead connection: replicas take its shards,
            # a shard with no live server fails its batches with this reason, and
            # :meth:`reconnect` brings the server back once it answers
            self._open(s, self.timeout, "unreachable at start")

    def _open(self, s, timeout, context) -> bool:
        """Connect to server ``s`` and fetch its META (its memory keys: new after a restart)."""
        try:
            host, port = self.resolve(s)
        except Exception as exc:     # the control plane does not know where the server is now
            self.conns[s] = _Unreachable(s, "?", f"{context}: cannot resolve: {type(exc).__name__}: {exc}")
            return False
        try:
            conn = self.engine.connect(s, host, port, weight=self.weight[s], timeout=timeout,
                                       thread=self.pin_thread)
        except (OSError, P.ProtocolError, EngineError) as exc:
            self.conns[s] = _Unreachable(s, f"{host}:{port}", f"{context}: {type(exc).__name__}: {exc}")
            return False
        self.conns[s] = conn
        try:
            meta = self.engine.request(conn, P.encode_request(P.Request(P.MsgType.META)),
                                       timeout=timeout).result(timeout + 1)
            self.meta[s] = meta["tables"]
        except (OSError, P.ProtocolError, P.RemoteError, EngineError, FutureTimeout) as exc:
            self.engine.close_connection(conn)
            self.conns[s] = _Unreachable(s, f"{host}:{port}", f"{context}: META failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def reconnect(self, force: bool = False) -> list[str]:
        """Reconnect to servers whose connection died, each with exponential backoff (first
        and largest delay from ``reconnect_backoff``); a server that answers gets a new
        connection and its META (memory keys change when a server restarts) and rejoins its
        shards' replica lists. Called before every batch; returns the servers that came back."""
        now = time.monotonic()
        back = []
        for s, conn in list(self.conns.items()):
            if not conn.dead or (not force and self._retry_at.get(s, 0.0) > now):
                continue
            if not isinstance(conn, _Unreachable):
                self.engine.close_connection(conn)
            if self._open(s, self.connect_timeout, "reconnect failed"):
                self._retry_at.pop(s, None)
                self._backoff.pop(s, None)
                self.suspect.pop(s, None)
                self.reconnects += 1
                back.append(s)
            else:
                delay = self._backoff.get(s, self.reconnect_backoff[0])
                self._retry_at[s] = time.monotonic() + delay
                self._backoff[s] = min(2 * delay, self.reconnect_backoff[1])
        return back

    # -------------------------------------------------------------- memory budget
    def batch_bytes(self, batch: int, nnz: int) -> int:
        """Bytes the ranker holds for one batch: index lists, partial sums, pooled rows,
        fetched rows (row-by-row mode) and model activations."""
        per_table_shards = max(len(s) for s in self.shards.values())
        b = 16 * nnz                                             # indices + bag ids
        b += 4 * batch * self.dim * len(self.tables) * (1 + per_table_shards)
        if self.fetch == "rows":
            b += 4 * nnz * self.dim
        return b + self.model.activation_bytes(batch)

    def _fit_budget(self, batch, nnz):
        if self.cache is None:
            return
        need = self.batch_bytes(batch, nnz) + self.cache.index_bytes
        left = self.budget - need
        if self.adaptive:
            if left < 0:
                raise BudgetExceeded(f"batch of {batch} needs {need} bytes, budget is {self.budget}")
            self.cache.resize(left // EmbeddingCache.bytes_per_row(self.dim))
        elif left < self.cache.nbytes:
            raise BudgetExceeded(f"batch of {batch} needs {need} bytes next to a static cache of "
                                 f"{self.cache.nbytes} bytes; budget is {self.budget}")

    # -------------------------------------------------------------- fetching
    def _servers_for(self, shard):
        now = time.monotonic()
        ok = [s for s in shard.servers if not self.conns[s].dead and self.suspect.get(s, 0) < now]
        rest = [s for s in shard.servers if s not in ok and not self.conns[s].dead]
        dead = [s for s in shard.servers if self.conns[s].dead]
        return ok + rest + dead      # dead ones last: they fail at once, naming their reason

    def _issue(self, server, kind, shard, idx, off):
        conn = self.conns[server]
        if kind == "rows":
            m = self.meta[server][shard.table]
            rb = m["row_bytes"]
            # the server's range that holds this shard (it may hold a wider one)
            lo, _, first = next(r for r in m["ranges"] if r[0] <= shard.lo < r[1])
            return self.engine.read_rows(conn, m["rkey"], m.get("addr", 0) + (idx - lo + first) * rb, rb,
                                         timeout=self.timeout)
        typ = P.MsgType.POOLED if kind == "pooled" else P.MsgType.GATHER
        return self.engine.request(conn, P.encode_request(P.Request(typ, shard.table, idx, off)),
                                   timeout=self.timeout)

    def _run_jobs(self, jobs):
        """jobs: [kind, shard, idx, off, servers list] -> results, replica retry on failure."""
        futs: list = [None] * len(jobs)
        if self.batch_messages:
            # first attempt: one MULTI message per server for its pooled/gather jobs
            groups: dict[str, list[int]] = {}
            for i, j in enumerate(jobs):
                if j[0] != "rows" and j[4]:
                    groups.setdefault(j[4][0], []).append(i)
            for server, members in groups.items():
                if len(members) < 2:
                    continue
                try:
                    subs = self._issue_multi(server, [jobs[i] for i in members])
                except EngineError:
                    continue                       # fall back to one message per job below
                for i, f in zip(members, subs):
                    futs[i] = (f, [])
        for i, j in enumerate(jobs):
            if futs[i] is None:
                futs[i] = self._try_issue(j, [])
        results = []
        for j, (fut, errors) in zip(jobs, futs):
            while True:
                try:
                    if fut is None:
                        raise ServingError("no server left")
                    results.append(fut.result(self.timeout + 1.0))
                    break
                except (EngineError, FutureTimeout, P.RemoteError, P.ProtocolError, ServingError) as exc:
                    if isinstance(exc, P.RemoteError) and "outside" in str(exc) or \
                            isinstance(exc, P.RemoteError) and "holds no shard" in str(exc):
                        raise ServingError(f"table {j[1].table!r}: {exc}") from exc
                    if fut is not None:
                        server = j[4][0]
                        errors.append(f"{server}: {type(exc).__name__}: {exc}")
                        if isinstance(exc, (RequestTimeout, FutureTimeout, Backpressure)):
                            self.suspect[server] = time.monotonic() + self.suspect_seconds
                        j[4].pop(0)
                    if not j[4]:
                        raise ServingError(
                            f"table {j[1].table!r} rows [{j[1].lo}, {j[1].hi}): every server failed: "
                            + "; ".join(errors)) from exc
                    self.retries += 1
                    fut, errors = self._try_issue(j, errors)
        return results

    def _issue_multi(self, server, jobs):
        """One MULTI request for ``jobs``; returns one future per job."""
        reqs = []
        for kind, shard, idx, off, _ in jobs:
            typ = P.MsgType.POOLED if kind == "pooled" else P.MsgType.GATHER
            reqs.append(P.encode_request(P.Request(typ, shard.table, idx, off)))
        multi = self.engine.request(self.conns[server], P.encode_multi(reqs), timeout=self.timeout)
        subs = [Future() for _ in jobs]

        def split(f):
            exc = f.exception()
            res = f.result() if exc is None else None
            if exc is None and (not isinstance(res, list) or len(res) != len(subs)):
                exc = P.ProtocolError(f"MULTI reply with {len(res) if isinstance(res, list) else type(res).__name__} "
                                      f"entries for {len(subs)} requests")
            for k, sub in enumerate(subs):
                if exc is not None:
                    sub.set_exception(exc)
                elif isinstance(res[k], Exception):
                    sub.set_exception(res[k])
                else:
                    sub.set_result(res[k])
        multi.add_done_callback(split)
        return subs

    def _try_issue(self, job, errors):
        kind, shard, idx, off, servers = job
        while servers:
            try:
                return self._issue(servers[0], kind, shard, idx, off), errors
            except EngineError as exc:
                errors.append(f"{servers[0]}: {type(exc).__name__}: {exc}")
                servers.pop(0)
        return None, errors

    def embeddings(self, sparse: dict) -> list[np.ndarray]:
        """Pooled bag sums per table (in config table order)."""
        batch = None
        for t in self.tables:
            if t not in sparse:
                raise ServingError(f"batch lacks table {t!r}")
            idx, off = sparse[t]
            if batch is None:
                batch = off.size - 1
            elif off.size - 1 != batch:
                raise ServingError(f"table {t!r}: {off.size - 1} bags, other tables have {batch}")
        unknown = set(sparse) - set(self.tables)
        if unknown:
            raise ServingError(f"unknown tables {sorted(unknown)}")
        nnz = sum(np.asarray(sparse[t][0]).size for t in self.tables)
        self._fit_budget(batch, nnz)
        self.reconnect()
        if self.cache is not None:
            self.cache.new_batch()
        jobs, plan = [], []
        for t in self.tables:
            idx = np.asarray(sparse[t][0], dtype=np.int64)
            off = np.asarray(sparse[t][1], dtype=np.int64)
            n = self.cfg["tables"][t]["rows"]
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                pos = int(np.flatnonzero((idx < 0) | (idx >= n))[0])
                raise ServingError(f"table {t!r}: index {int(idx[pos])} at position {pos} outside [0, {n})")
            if off.size < 1 or off[0] != 0 or off[-1] != idx.size or (np.diff(off) < 0).any():
                raise ServingError(f"table {t!r}: offsets must rise from 0 to {idx.size}")
            bags = bag_ids(off)
            remote = np.ones(idx.size, dtype=bool)
            local_rows = None
            admit = np.empty(0, dtype=np.int64)
            if self.cache is not None and self.cache.capacity:
                slots = self.cache.lookup(t, idx)
                admit = self.cache.candidates(t, idx, slots)
                remote = slots < 0
                if admit.size:
                    remote &= ~np.isin(idx, admit)
                local_rows = slots
            entry = {"table": t, "idx": idx, "off": off, "bags": bags, "remote": remote,
                     "slots": local_rows, "admit": admit, "jobs": []}
            for sh in self.shards[t]:
                m = remote & (idx >= sh.lo) & (idx < sh.hi)
                if m.any():
                    kind = "pooled" if self.fetch == "pooled" else "rows"
                    sub_off = _sub_bags(bags, m, batch)
                    entry["jobs"].append((len(jobs), kind, m, sub_off))
                    jobs.append([kind, sh, idx[m], sub_off, self._servers_for(sh)])
                if admit.size:
                    a = admit[(admit >= sh.lo) & (admit < sh.hi)]
                    if a.size:
                        entry["jobs"].append((len(jobs), "gather", a, None))
                        jobs.append(["gather", sh, a, np.empty(0, np.int64), self._servers_for(sh)])
            plan.append(entry)
        results = self._run_jobs(jobs)
        out = []
        for e in plan:
            pooled = np.zeros((batch, self.dim), dtype=np.float32)
            fetched = {}
            for j, kind, m, sub_off in e["jobs"]:
                r = results[j]
                # a reply of the wrong shape would broadcast into a wrong score: refuse it
                n_sub = int(m.sum()) if m.dtype == bool else m.size
                want = {"pooled": (batch, self.dim), "rows": (n_sub, self.dim * 4),
                        "gather": (n_sub, self.dim)}[kind]
                if not isinstance(r, np.ndarray) or r.shape != want:
                    raise ServingError(f"table {e['table']!r}: {kind} reply of shape "
                                       f"{getattr(r, 'shape', type(r).__name__)}, expected {want}")
                if kind == "pooled":
                    pooled += r
                elif kind == "rows":
                    pool_bags(np.ascontiguousarray(r).view(np.float32).reshape(-1, self.dim), sub_off, pooled)
                else:
                    fetched[j] = (m, r)
            local = ~e["remote"]
            if local.any():
                idx = e["idx"]
                rows = np.empty((idx.size, self.dim), dtype=np.float32)
                hit = e["slots"] >= 0
                rows[hit] = self.cache.rows[e["slots"][hit]]
                if fetched:                        # admitted rows: fetched now, pooled here
                    m = np.concatenate([f[0] for f in fetched.values()])
                    r = np.concatenate([f[1] for f in fetched.values()])
                    order = np.argsort(m, kind="stable")
                    m, r = m[order], r[order]
                    sel = local & ~hit
                    pos = np.minimum(np.searchsorted(m, idx[sel]), m.size - 1)
                    if not np.array_equal(m[pos], idx[sel]):
                        raise ServingError(f"table {e['table']!r}: admitted rows missing from the GATHER replies")
                    rows[sel] = r[pos]
                    self.cache.admit(e["table"], m, r)
                pool_bags(rows[local], _sub_bags(e["bags"], local, batch), pooled)
            out.append(pooled)
        self.batches += 1
        if self.rebalance_every and self.batches % self.rebalance_every == 0:
            self.engine.rebalance()
        return out

    def score(self, dense: np.ndarray, sparse: dict) -> np.ndarray:
        bags = np.asarray(sparse[self.tables[0]][1]).size - 1 if self.tables[0] in sparse else -1
        if dense.ndim != 2 or dense.shape != (bags, self.model.n_dense):
            raise ServingError(f"dense features of shape {dense.shape} for {bags} bags "
                               f"(want [{bags}, {self.model.n_dense}])")
        embs = self.embeddings(sparse)
        return self.model.forward(dense, embs)

    def rank(self, dense, sparse, k: int = 10):
        s = self.score(dense, sparse)
        k = min(k, s.size)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top], kind="stable")]
        return top, s[top], s
