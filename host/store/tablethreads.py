"""Per-table work of one batch on a few threads: the store's tables are independent (each has its
own cache and lock) and its kernels release the GIL, so with ``parallel=True`` the tables of a
cached batch run side by side -- dedupe, cache lookup and pooling all scale, where prange over
one table's bags leaves the (serial) cache lookups on one core.

The calling thread takes the first share of the tables itself and hands each other share to one
persistent worker: one hand-off per worker per phase, not one per table.

A hand-off is not free: waking the worker, and the two threads taking turns at the GIL for the
Python between kernels, added ~100 us to a batch on the 2-vCPU benchmark machine (dram store,
four tables: 41 -> 136 us at 32 bags; 1 -> 2 threads paid only from ~250 us of work: Meta trace
512 bags 288 -> 294 us, uniform 128 bags 232 -> 218 us, 4,096 bags 5,968 -> 3,416 us). So
:meth:`TableThreads.map` spreads a phase only while the phases it ran took, on average, at least
:data:`SPREAD_MIN_WORK_S` of work (the sum of the items' own times, whichever thread ran them);
smaller ones run on the caller, where threads would only make them slower.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

__all__ = ["TableThreads", "SPREAD_MIN_WORK_S"]

#: a phase is spread over threads while the phases' average work (seconds, summed over items) is
#: at least this: about twice the ~100 us a hand-off cost on the benchmark machine
SPREAD_MIN_WORK_S = 200e-6
#: weight of the newest phase in the average (an exponential moving average)
_WORK_WEIGHT = 0.25


class TableThreads:
    """Runs ``fn`` over a list of items on up to ``threads`` threads (the caller is one of them).

    :meth:`map` returns the results in item order; if any call raised, every share is still
    waited for and the first exception (in item order) is raised. It spreads the items only
    while :attr:`work_s` (the average work of the phases so far; None before the first) is at
    least ``min_work_s`` (default :data:`SPREAD_MIN_WORK_S`; 0 always spreads). :attr:`on_worker` tells code
    running inside a share that the tables are already spread over the threads (so its own
    kernels should not fan out over bags as well). :meth:`close` stops the workers (idempotent);
    a closed instance runs everything on the caller.
    """

    def __init__(self, min_work_s: float | None = None):
        self.min_work_s = SPREAD_MIN_WORK_S if min_work_s is None else float(min_work_s)
        self.work_s: float | None = None
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

    def _share(self, fn, items, idx, spent):
        self._local.active = True
        t0 = time.perf_counter()
        try:
            out = []
            for i in idx:
                try:
                    out.append((i, fn(items[i]), None))
                except BaseException as exc:  # reported in item order by map
                    out.append((i, None, exc))
            return out
        finally:
            spent.append(time.perf_counter() - t0)
            self._local.active = False

    def _note(self, w: float) -> None:
        """One more phase of ``w`` seconds of work into the average."""
        self.work_s = w if self.work_s is None else self.work_s + _WORK_WEIGHT * (w - self.work_s)

    def map(self, fn: Callable, items: Sequence, threads: int) -> list:
        """``[fn(x) for x in items]``, the items dealt round-robin over ``min(threads,
        len(items))`` threads."""
        n = len(items)
        k = min(int(threads), n)
        if self.on_worker:                 # already a share of a spread phase
            return [fn(x) for x in items]
        small = self.work_s is not None and self.work_s < self.min_work_s
        pool = self._executor() if k > 1 and not small else None
        if pool is None:
            t0 = time.perf_counter()
            try:
                return [fn(x) for x in items]
            finally:
                if k > 1:                  # a phase that could have been spread: its work counts
                    self._note(time.perf_counter() - t0)
        spent: list[float] = []            # each share's own time, from whichever thread ran it
        shares = [range(t, n, k) for t in range(k)]
        futures, done = [], []
        for s in shares[1:]:
            try:
                futures.append(pool.submit(self._share, fn, items, s, spent))
            except RuntimeError:           # closed meanwhile: the caller runs that share too
                done.extend(self._share(fn, items, s, spent))
        done.extend(self._share(fn, items, shares[0], spent))
        for f in futures:
            done.extend(f.result())        # _share catches everything: result() does not raise
        self._note(sum(spent))
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
