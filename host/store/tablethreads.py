"""Per-table work of one batch on a few threads: the store's tables are independent (each has its
own cache and lock) and its kernels release the GIL, so with ``parallel=True`` the tables of a
cached batch run side by side -- dedupe, cache lookup and pooling all scale, where prange over
one table's bags leaves the (serial) cache lookups on one core.

The calling thread takes the first share of the tables itself and hands each other share to one
persistent worker: one hand-off per worker per phase, not one per table.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

__all__ = ["TableThreads"]


class TableThreads:
    """Runs ``fn`` over a list of items on up to ``threads`` threads (the caller is one of them).

    :meth:`map` returns the results in item order; if any call raised, every share is still
    waited for and the first exception (in item order) is raised. :attr:`on_worker` tells code
    running inside a share that the tables are already spread over the threads (so its own
    kernels should not fan out over bags as well). :meth:`close` stops the workers (idempotent);
    a closed instance runs everything on the caller.
    """

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def on_worker(self) -> bool:
        """True inside a share that :meth:`map` spread over threads."""
        return getattr(self._local, "active", False)

    def _executor(self) -> ThreadPoolExecutor | None:
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:  # threads start on demand, up to one per other core
                self._pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                                thread_name_prefix="evssd-table")
            return self._pool

    def _share(self, fn, items, idx):
        self._local.active = True
        try:
            out = []
            for i in idx:
                try:
                    out.append((i, fn(items[i]), None))
                except BaseException as exc:  # reported in item order by map
                    out.append((i, None, exc))
            return out
        finally:
            self._local.active = False

    def map(self, fn: Callable, items: Sequence, threads: int) -> list:
        """``[fn(x) for x in items]``, the items dealt round-robin over ``min(threads,
        len(items))`` threads."""
        n = len(items)
        k = min(int(threads), n)
        pool = self._executor() if k > 1 and not self.on_worker else None
        if pool is None:
            return [fn(x) for x in items]
        shares = [range(t, n, k) for t in range(k)]
        futures, done = [], []
        for s in shares[1:]:
            try:
                futures.append(pool.submit(self._share, fn, items, s))
            except RuntimeError:           # closed meanwhile: the caller runs that share too
                done.extend(self._share(fn, items, s))
        done.extend(self._share(fn, items, shares[0]))
        for f in futures:
            done.extend(f.result())        # _share catches everything: result() does not raise
        done.sort(key=lambda r: r[0])
        for _, _, exc in done:
            if exc is not None:
                raise exc
        return [r for _, r, _ in done]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
