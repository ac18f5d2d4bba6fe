"""Lookup pipeline: CPU work for batch i+1 overlaps backend / device I/O for batch i.

A store lookup has three phases (see :class:`evssd.host.store.EmbeddingStore`):

1. *prepare* (main thread): validate, deduplicate, EV-Cache lookup, collect the misses;
2. *fetch* (one I/O worker thread): read the misses from the backend (``os.pread``, RocksDB
   multi-get or a device command through the driver; all release the GIL while they wait);
3. *finish* (main thread): merge hits and misses, admit the misses to the cache, gather or pool
   (the numba pooling kernel also runs without the GIL).

With ``depth`` batches in flight the main thread prepares batch i+1 and finishes batch i-1
while the worker does batch i's I/O. Only the main thread touches the caches and only the
worker touches the backend, so neither needs to be thread-safe, and the worker keeps the
backend's commands in submission order.

Results are identical to the unpipelined path (rows come from the cache or the backend, and
both hold the same bytes); what can differ is the cache's hit/miss split, because batch i+1's
cache lookup runs before batch i's misses are admitted.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np

__all__ = ["Pipeline", "BatchResult", "run_unpipelined", "latency_summary"]


@dataclass
class BatchResult:
    index: int                    # position of the batch in the input
    results: dict                 # table -> pooled [B, dim] (or gathered rows when mode is None)
    latency_s: float              # from the start of prepare to the end of finish
    io_s: float                   # time the worker spent in backend I/O for this batch


def latency_summary(latencies_s) -> dict:
    a = np.asarray(latencies_s, dtype=np.float64)
    if a.size == 0:
        return {"batches": 0}
    return {"batches": int(a.size), "mean_ms": float(a.mean() * 1e3),
            "p50_ms": float(np.percentile(a, 50) * 1e3), "p99_ms": float(np.percentile(a, 99) * 1e3),
            "max_ms": float(a.max() * 1e3)}


def _fetch_all(store, plans):
    t0 = time.perf_counter()
    store._fetch_many(plans)
    return time.perf_counter() - t0


class Pipeline:
    """Run batches ``{table: (indices, offsets)}`` through ``store`` with I/O overlap.

    ``mode``: "sum", "mean" or None (gather; a batch is then ``{table: indices}``).
    ``depth``: batches in flight (>= 1; 1 means no overlap, the worker still does the I/O).
    """

    def __init__(self, store, mode: str | None = "sum", depth: int = 2):
        if depth < 1:
            raise ValueError(f"pipeline depth must be >= 1, got {depth}")
        self.store = store
        self.mode = mode
        self.depth = depth
        self.latencies_s: list[float] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evssd-io")

    def run(self, batches: Iterable[Mapping[str, tuple]]) -> Iterator[BatchResult]:
        """Yield one :class:`BatchResult` per batch, in input order."""
        store = self.store
        pending: deque = deque()

        def finish(entry):
            i, t0, plans, fut = entry
            io_s = fut.result()
            out = {name: store._finish(p) for name, p in plans.items()}
            lat = time.perf_counter() - t0
            self.latencies_s.append(lat)
            return BatchResult(i, out, lat, io_s)

        try:
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                plans = store._prepare_many(batch, self.mode)
                store._count_batch()
                pending.append((i, t0, plans, self._pool.submit(_fetch_all, store, plans)))
                while len(pending) >= self.depth:
                    yield finish(pending.popleft())
            while pending:
                yield finish(pending.popleft())
        finally:
            for _, _, _, fut in pending:  # an exception or an abandoned generator: let I/O drain
                fut.cancel()
                try:
                    fut.result()
                except Exception:
                    pass

    def run_all(self, batches) -> list[BatchResult]:
        return list(self.run(batches))

    def summary(self) -> dict:
        return latency_summary(self.latencies_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_unpipelined(store, batches: Iterable[Mapping[str, tuple]], mode: str | None = "sum") -> Iterator[BatchResult]:
    """The same batches one after another on the calling thread: the reference for the pipeline."""
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        plans = store._prepare_many(batch, mode)
        store._count_batch()
        io_s = _fetch_all(store, plans)
        out = {name: store._finish(p) for name, p in plans.items()}
        yield BatchResult(i, out, time.perf_counter() - t0, io_s)
