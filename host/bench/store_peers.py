"""The store's pooled lookups against the standard CPU embedding kernels, side by side in one
process on the same tables and the same batches: part of ``evssd bench store``.

Peers: ``torch.nn.EmbeddingBag`` (one per table, sharing the numpy arrays' memory) and FBGEMM's
CPU TBE (``SplitTableBatchedEmbeddingBagsCodegen``, HOST placement, all tables in one module,
fp32 output, run under ``torch.no_grad``). Ours: :meth:`EmbeddingStore.lookup_many` on the
``dram`` backend (the fused gather+pool kernel), and the EV-Cache hit path (the ``file`` backend
behind an EV-Cache that holds the working set) and the ``evssd`` backend's host stack at a 1%
EV-Cache on the Meta-calibrated trace (wall time minus the modelled device's time: the device
model's MMIO calls, in which it runs the commands; the driver's and the backend's own work count
as host stack), with its floor on the same batches (:func:`_cache_floor`: the EV-Cache's own calls
alone, and the two passes any cached lookup makes).

Cells: element type (fp32, fp16) x trace (uniform, Meta-calibrated) x threads (1, 2, both sides:
``torch.set_num_threads`` and ``numba.set_num_threads``) x bags per batch (the sweep). In a cell
the peers run the same batches round-robin, ``reps`` rounds; the reported time per batch is the
minimum over rounds (the machine is shared: the minimum is the least disturbed run; the median is
kept in the JSON), converted to lookups/s (wall clock). Outputs are compared with ours (bit
identity and max |diff|). RSS: the process's RSS before and after the measured rounds of each cell
(growth means per-batch leaks) and its peak.

``evssd bench store`` runs this module in its own process with ``OMP_WAIT_POLICY=PASSIVE``:
numba's parallel kernels and torch share one OpenMP runtime, whose idle threads otherwise spin
after each parallel region and, on two cores, starve the other side's threads (2-thread cells
then measured 0.3 M lookups/s for whichever peer ran next).
"""
from __future__ import annotations

import resource
import time

import numpy as np

__all__ = ["run_peers", "DEFAULT_CELLS", "figure"]


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory in transparent huge pages (Linux; None
    elsewhere). numpy asks for huge pages for large arrays (``madvise``), torch's CPU allocator
    does not, so random row reads from our tables and from FBGEMM's copy of them can see
    different TLB costs: the run records how much of the memory got them."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _batches(trace: str, n_tables: int, rows: int, bags: int, pf: int, n: int, seed: int):
    """n batches: per table (indices int64, offsets int64)."""
    offs = (np.arange(bags + 1, dtype=np.int64) * pf)
    if trace == "uniform":
        rng = np.random.default_rng(seed)
        return [[(rng.integers(0, rows, bags * pf), offs) for _ in range(n_tables)] for _ in range(n)]
    from evssd.host.workload import meta_calibrated
    streams = [list(meta_calibrated(rows, batch_size=bags, pooling_factor=pf, seed=seed * 1000 + 17 * t + 1,
                                    n_batches=n)) for t in range(n_tables)]
    return [[(streams[t][b].indices.astype(np.int64), streams[t][b].offsets.astype(np.int64))
             for t in range(n_tables)] for b in range(n)]


class _Fbgemm:
    def __init__(self, tables, elem):
        import torch
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
        self.torch = torch
        arrs = list(tables.values())
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            [(a.shape[0], a.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU) for a in arrs],
            weights_precision=SparseType.FP32 if elem == "fp32" else SparseType.FP16,
            pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
        with torch.no_grad():
            for w, a in zip(self.tbe.split_embedding_weights(), arrs):
                w.copy_(torch.from_numpy(a))
        self.dims = [a.shape[1] for a in arrs]

    def prepare(self, batch):
        torch = self.torch
        idx = torch.from_numpy(np.concatenate([i for i, _ in batch]))
        lens = [len(i) for i, _ in batch]
        base = np.concatenate([[0], np.cumsum(lens)[:-1]])
        offs = np.concatenate([o[:-1] + b for (_, o), b in zip(batch, base)] + [[sum(lens)]])
        return idx, torch.from_numpy(offs.astype(np.int64))

    def __call__(self, prepared):
        with self.torch.no_grad():
            return self.tbe(*prepared)

    def split(self, out):
        return np.split(out.numpy(), np.cumsum(self.dims)[:-1], axis=1)


class _TorchBags:
    def __init__(self, tables):
        import torch
        self.torch = torch
        self.bags = [torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(a), freeze=True, mode="sum",
                                                           include_last_offset=True) for a in tables.values()]

    def prepare(self, batch):
        t = self.torch
        return [(t.from_numpy(i), t.from_numpy(o)) for i, o in batch]

    def __call__(self, prepared):
        with self.torch.no_grad():
            return [m(i, o) for m, (i, o) in zip(self.bags, prepared)]

    def split(self, out):
        return [o.float().numpy() for o in out]


class _Ours:
    """``lookup_many`` writing into output buffers the caller keeps (``out=``), as a serving loop
    does: one set per batch shape, allocated once, so no batch allocates its results."""

    def __init__(self, store):
        self.store = store
        self.names = list(store.tables)
        self._outs = {}

    def prepare(self, batch):
        req = {n: b for n, b in zip(self.names, batch)}
        key = tuple(len(o) - 1 for _, o in batch)
        if key not in self._outs:
            self._outs[key] = {n: np.empty((len(o) - 1, self.store.tables[n].dim), np.float32)
                               for n, (_, o) in req.items()}
        return req, self._outs[key]

    def __call__(self, prepared):
        req, out = prepared
        return self.store.lookup_many(req, out=out)

    def split(self, out):
        return [out[n] for n in self.names]


def _time(fn, prepared) -> tuple[float, float]:
    """(wall, CPU) seconds per batch; CPU is the process's (every thread's) time, which a loaded
    machine disturbs less than the wall clock."""
    t0, c0 = time.perf_counter(), time.process_time()
    for p in prepared:
        fn(p)
    return (time.perf_counter() - t0) / len(prepared), (time.process_time() - c0) / len(prepared)


def _compare(ours, peer):
    same = all(a.shape == b.shape and np.array_equal(a.view(np.uint32), b.astype(np.float32).view(np.uint32))
               for a, b in zip(ours, peer))
    diff = max(float(np.max(np.abs(a - b.astype(np.float32)), initial=0.0)) for a, b in zip(ours, peer))
    return same, diff


def _cell(runners, batches, reps, threads):
    import numba
    import torch
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    for r in runners.values():
        if isinstance(r, _Ours):
            r.store.parallel = threads > 1
    prepared = {k: [r.prepare(b) for b in batches] for k, r in runners.items()}
    outs = {k: [np.array(a) for a in r.split(r(prepared[k][0]))] for k, r in runners.items()}  # warm-up
    for k, r in runners.items():
        _time(r, prepared[k][:2])
    rss0 = _rss()
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for _ in range(reps):
        for k, r in runners.items():
            t, c = _time(r, prepared[k])
            times[k].append(t)
            cpu[k].append(c)
    rss1 = _rss()
    lookups = sum(len(i) for i, _ in batches[0])
    res = {"lookups_per_batch": lookups, "rss_growth_bytes": rss1 - rss0, "peers": {}}
    for k in runners:
        t = float(np.min(times[k]))
        c = max(float(np.min(cpu[k])), 1e-9)
        res["peers"][k] = {"us_per_batch": t * 1e6, "us_per_batch_median": float(np.median(times[k])) * 1e6,
                           "lookups_per_s": lookups / t, "ns_per_lookup": t / lookups * 1e9,
                           "cpu_us_per_batch": c * 1e6, "lookups_per_cpu_s": lookups / c}
        if k != "ours":
            same, diff = _compare(outs["ours"], outs[k])
            res["peers"][k].update(outputs_bit_identical=same, max_abs_diff=diff)
    ours = res["peers"]["ours"]["lookups_per_s"]
    res["ratios"] = {k: ours / v["lookups_per_s"] for k, v in res["peers"].items() if k != "ours"}
    ours_cpu = res["peers"]["ours"]["lookups_per_cpu_s"]
    res["ratios_cpu"] = {k: ours_cpu / v["lookups_per_cpu_s"] for k, v in res["peers"].items() if k != "ours"}
    return res


#: (elem, trace, threads, bags) cells of the default run: the full element/trace/thread matrix
#: at 128 bags, plus the batch-size sweep for fp32 on both traces at one thread
DEFAULT_CELLS = ([(e, t, th, 128) for e in ("fp32", "fp16") for t in ("uniform", "meta") for th in (1, 2)]
                 + [("fp32", t, 1, b) for t in ("uniform", "meta") for b in (16, 1024, 4096)])


#: (elem, trace, threads) cells of the EV-Cache hit path: every element type, trace and thread count
HIT_PATH_CELLS = [(e, t, th) for e in ("fp32", "fp16") for t in ("uniform", "meta") for th in (1, 2)]


def run_peers(cfg: dict, cells=DEFAULT_CELLS, log=print, hit_cells=HIT_PATH_CELLS) -> dict:
    """Kernel peers (dram vs nn.EmbeddingBag vs FBGEMM) on ``cells``, then the cache-hit
    (``hit_cells``) and evssd host-stack comparisons. ``cfg``: tables, rows, dim, pooling_factor,
    seed, reps, lookups_per_cell (batches per cell = lookups_per_cell // lookups per batch, at
    least 2)."""
    from evssd.host.store import EmbeddingStore
    out = {"cells": [], "peak_rss_bytes": None, "huge_page_bytes": {}}
    tables_by_elem = {elem: _tables(cfg, elem) for elem in sorted({c[0] for c in cells})}
    for elem, tables in tables_by_elem.items():
        store = EmbeddingStore.from_arrays(tables, "dram")
        runners = {"ours": _Ours(store), "fbgemm_tbe": _Fbgemm(tables, elem), "nn_embeddingbag": _TorchBags(tables)}
        huge = _huge_page_bytes()
        out["huge_page_bytes"][elem] = huge
        if huge is not None:
            log(f"  {elem}: {huge / 2**20:.0f} MiB of the process in transparent huge pages with the tables "
                f"({sum(a.nbytes for a in tables.values()) / 2**20:.0f} MiB ours, the same again in FBGEMM's copy)")
        for (e, trace, threads, bags) in cells:
            if e != elem:
                continue
            per_batch = cfg["tables"] * bags * cfg["pooling_factor"]
            n = max(2, cfg["lookups_per_cell"] // per_batch)
            batches = _batches(trace, cfg["tables"], cfg["rows"], bags, cfg["pooling_factor"], n, cfg["seed"])
            r = _cell(runners, batches, cfg["reps"], threads)
            r.update(elem=elem, trace=trace, threads=threads, bags=bags, batches=n)
            out["cells"].append(r)
            p = r["peers"]
            log(f"  {elem} {trace:7s} {threads}T {bags:5d} bags: ours {p['ours']['lookups_per_s'] / 1e6:7.1f} M/s "
                f"({p['ours']['ns_per_lookup']:5.1f} ns/lookup) | FBGEMM TBE {p['fbgemm_tbe']['lookups_per_s'] / 1e6:6.1f} M/s "
                f"-> {r['ratios']['fbgemm_tbe']:.2f}x | nn.EmbeddingBag {p['nn_embeddingbag']['lookups_per_s'] / 1e6:6.1f} M/s "
                f"-> {r['ratios']['nn_embeddingbag']:.2f}x | bit-identical to FBGEMM "
                f"{p['fbgemm_tbe']['outputs_bit_identical']} | RSS growth {r['rss_growth_bytes'] / 2**20:.1f} MiB")
        del runners, store
    out["cache_paths"] = _cache_paths(cfg, tables_by_elem, log, hit_cells)
    out["peak_rss_bytes"] = _peak_rss()
    return out


def _tables(cfg, elem):
    rng = np.random.default_rng(cfg["seed"])
    dt = np.float32 if elem == "fp32" else np.float16
    return {f"t{k}": rng.standard_normal((cfg["rows"], cfg["dim"]), dtype=np.float32).astype(dt)
            for k in range(cfg["tables"])}


def _hit_batches(trace, cfg, n):
    """The hit path's batches and the working set to warm the cache with, per table: uniform
    indices over 25% of the rows, or the Meta-calibrated batches themselves."""
    bags, pf, T = 128, cfg["pooling_factor"], cfg["tables"]
    if trace == "uniform":
        hot = max(1, cfg["rows"] // 4)
        rng = np.random.default_rng(cfg["seed"] + 5)
        offs = np.arange(bags + 1, dtype=np.int64) * pf
        batches = [[(rng.integers(0, hot, bags * pf), offs) for _ in range(T)] for _ in range(n)]
        return batches, [np.arange(hot)] * T
    batches = _batches("meta", T, cfg["rows"], bags, pf, n, cfg["seed"] + 5)
    return batches, [np.unique(np.concatenate([b[t][0] for b in batches])) for t in range(T)]


def _cache_paths(cfg, tables_by_elem, log, cells=HIT_PATH_CELLS) -> dict:
    """The EV-Cache hit path (file backend, a cache holding the working set) on ``cells``
    (elem, trace, threads), each side by side with the dram store and FBGEMM, and the evssd
    backend's host stack at 1% on the Meta trace (fp32, 1 thread). ``tables_by_elem``: the
    kernel peers' tables, reused (others are made)."""
    import numba
    import torch
    import tempfile
    from evssd.host.store import EmbeddingStore
    res = {"hit_path": []}
    bags, pf, T = 128, cfg["pooling_factor"], cfg["tables"]
    n = max(4, cfg["lookups_per_cell"] // (T * bags * pf))
    for elem in sorted({c[0] for c in cells}, reverse=True):
        tabs = tables_by_elem.get(elem) or _tables(cfg, elem)
        names = list(tabs)
        with tempfile.TemporaryDirectory(prefix="evssd-bench-hit-") as d:
            fstore = EmbeddingStore.from_arrays(tabs, "file", path=d, cache_fraction=1.0)
            dstore = EmbeddingStore.from_arrays(tabs, "dram")
            runners = {"ours": _Ours(fstore), "dram": _Ours(dstore), "fbgemm_tbe": _Fbgemm(tabs, elem)}
            for (e, trace, threads) in cells:
                if e != elem:
                    continue
                batches, working = _hit_batches(trace, cfg, n)
                for _ in range(2):  # the admission filter lets a row in on its second touch
                    fstore.lookup_many({k: (w, np.array([0, w.size])) for k, w in zip(names, working)})
                s0 = fstore.stats()
                r = _cell(runners, batches, cfg["reps"], threads)
                s1 = fstore.stats()
                hits = sum(c["hits"] for c in s1["caches"].values()) - sum(c["hits"] for c in s0["caches"].values())
                miss = sum(c["misses"] for c in s1["caches"].values()) - sum(c["misses"] for c in s0["caches"].values())
                r.update(elem=elem, trace=trace, threads=threads, bags=bags, batches=n,
                         hit_rate=hits / max(1, hits + miss))
                res["hit_path"].append(r)
                log(f"  EV-Cache hit path {elem} {trace:7s} {threads}T (file + EV-Cache holding the working set, "
                    f"hit rate {r['hit_rate']:.3f}): {r['peers']['ours']['lookups_per_s'] / 1e6:.1f} M/s -> "
                    f"{r['ratios']['fbgemm_tbe']:.2f}x FBGEMM, {r['ratios']['dram']:.2f}x dram (wall); per CPU-second "
                    f"{r['peers']['ours']['lookups_per_cpu_s'] / 1e6:.1f} M/s -> {r['ratios_cpu']['fbgemm_tbe']:.2f}x "
                    f"FBGEMM, {r['ratios_cpu']['dram']:.2f}x dram; bit-identical to FBGEMM "
                    f"{r['peers']['fbgemm_tbe']['outputs_bit_identical']}")
            fstore.close()
            dstore.close()
            del runners
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    first = [r for r in res["hit_path"] if (r["elem"], r["trace"], r["threads"]) == ("fp32", "uniform", 1)]
    if first:  # the cell earlier runs reported under this name
        res["evcache_hit_path"] = first[0]
    res["evssd_host_stack"] = _evssd_host_stack(cfg, tables_by_elem.get("fp32") or _tables(cfg, "fp32"), log)
    return res


class _DeviceClock:
    """Wall time inside the model transport's MMIO calls (``read32``/``write32``): a doorbell
    write runs the device model's commands (``DeviceModel.run``), so this is exactly the
    modelled device's time; the driver's own work (staging buffers, packing and reaping ring
    entries, result copies) and the backend's stay outside it. Wraps the two methods of one
    transport instance until :meth:`close`."""

    def __init__(self, transport):
        self.transport, self.seconds, self.cpu_seconds = transport, 0.0, 0.0
        for name in ("read32", "write32"):
            setattr(transport, name, self._timed(getattr(transport, name)))

    def _timed(self, call):
        async def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return await call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.thread_time() - c0
        return timed

    def close(self):
        for name in ("read32", "write32"):
            self.transport.__dict__.pop(name, None)


def _evssd_host_stack(cfg, tables, log) -> dict:
    """evssd + EV-Cache 1% on the Meta trace: wall time per batch minus the modelled device's
    time (:class:`_DeviceClock`; the pipeline overlaps it), against the dram path. Also the
    earlier, looser figure: wall time minus all the time in the backend's reads (which hides
    the driver's and the backend's own work). The same in CPU time of the calling thread
    (``time.thread_time``: less sensitive to other processes on a loaded machine)."""
    from evssd.host.store import EmbeddingStore
    bags, pf, T = 128, cfg["pooling_factor"], cfg["tables"]
    n = max(20, 2 * cfg["lookups_per_cell"] // (T * bags * pf))
    batches = _batches("meta", T, cfg["rows"], bags, pf, n + 10, cfg["seed"] + 9)
    estore = EmbeddingStore.from_arrays(tables, "evssd", cache_fraction=0.01)
    dstore = EmbeddingStore.from_arrays(tables, "dram")
    names = list(tables)
    reqs = [{k: b for k, b in zip(names, batch)} for batch in batches]
    for q in reqs[:10]:  # warm the caches
        estore.lookup_many(q)
    clock = _DeviceClock(estore.backend.device.transport)
    rss0 = _rss()
    best_host = best_total = best_dram = best_io_host = best_host_cpu = best_dram_cpu = float("inf")
    for _ in range(max(2, cfg["reps"] // 2)):
        io0, dev0, dev_cpu0 = estore.stats()["io_s"], clock.seconds, clock.cpu_seconds
        t0, c0 = time.perf_counter(), time.thread_time()
        for q in reqs[10:]:
            estore.lookup_many(q)
        total, cpu = time.perf_counter() - t0, time.thread_time() - c0
        io, device = estore.stats()["io_s"] - io0, clock.seconds - dev0
        best_total = min(best_total, total / n)
        best_host = min(best_host, (total - device) / n)
        best_io_host = min(best_io_host, (total - io) / n)
        best_host_cpu = min(best_host_cpu, (cpu - (clock.cpu_seconds - dev_cpu0)) / n)
        t0, c0 = time.perf_counter(), time.thread_time()
        for q in reqs[10:]:
            dstore.lookup_many(q)
        best_dram = min(best_dram, (time.perf_counter() - t0) / n)
        best_dram_cpu = min(best_dram_cpu, (time.thread_time() - c0) / n)
    rss1 = _rss()
    clock.close()
    st = estore.stats()
    hr = st["cache_hit_rate"]
    floor = _cache_floor(estore, dstore, tables, reqs[10:], max(2, cfg["reps"] // 2))
    estore.close()
    dstore.close()
    lookups = T * bags * pf
    r = {"us_per_batch_total": best_total * 1e6, "us_per_batch_host_stack": best_host * 1e6,
         "us_per_batch_dram": best_dram * 1e6, "host_stack_vs_dram": best_host / best_dram,
         "us_per_batch_outside_backend_reads": best_io_host * 1e6,
         "outside_backend_reads_vs_dram": best_io_host / best_dram,
         "us_cpu_per_batch_host_stack": best_host_cpu * 1e6, "us_cpu_per_batch_dram": best_dram_cpu * 1e6,
         "host_stack_vs_dram_cpu": best_host_cpu / best_dram_cpu,
         "rss_growth_bytes": rss1 - rss0, "peak_rss_bytes": _peak_rss(),
         "hit_rate": hr, "lookups_per_batch": lookups, "batches": n, "floor": floor}
    log(f"  evssd + EV-Cache 1% (Meta): host stack {best_host * 1e6:.0f} us/batch (total with the model "
        f"{best_total * 1e6:.0f} us), dram {best_dram * 1e6:.0f} us -> host stack {r['host_stack_vs_dram']:.2f}x "
        f"dram's time (CPU time {r['host_stack_vs_dram_cpu']:.2f}x; outside the backend's reads "
        f"{r['outside_backend_reads_vs_dram']:.2f}x), hit rate {hr:.3f}, "
        f"RSS growth {r['rss_growth_bytes'] / 2**20:.1f} MiB")
    log(f"    its floor, same batches: the EV-Cache's own two calls per table alone "
        f"{floor['us_per_batch_cache_calls']:.0f} us = {floor['cache_calls_vs_dram']:.2f}x dram "
        f"({floor['us_per_batch_dram']:.0f} us); the two passes any cache makes (dedupe "
        f"{floor['us_per_batch_dedupe']:.0f} + pooling over cache rows "
        f"{floor['us_per_batch_pool_cache_rows']:.0f} us) = {floor['two_passes_vs_dram']:.2f}x dram")
    return r


def _cache_floor(estore, dstore, tables, reqs, rounds: int) -> dict:
    """What the 1% host stack cannot go below, on the batches ``reqs`` of
    :func:`_evssd_host_stack` and against ``dstore``'s dram path in the same rounds (each round
    one pass of each, alternating; the minimum per batch over ``rounds``):

    - ``cache_calls``: only the EV-Cache's own two calls per table, as the store makes them
      (:meth:`~evssd.host.cache.EVCache.lookup_pool` and
      :meth:`~evssd.host.cache.EVCache.pool_admit`, ``checked=True``): dedupe, probe,
      frequency counting, miss list, pooling from two sources and admission. The missed rows
      come from the table arrays outside the timer: no store, no validation, no driver, no
      device.
    - ``dedupe`` and ``pool_cache_rows``: the two passes every cached lookup makes whatever its
      bookkeeping: each lookup's row resolved through a hash of the batch
      (:func:`evssd.host.dedupe.dedupe`), and the bags pooled from the cache's rows by each
      lookup's slot (:func:`evssd.host.pooling.pool_into`; a missed lookup reads slot 0 here).
      The pooling must follow the misses, which arrive from the device between the two: the
      definition sums a bag's rows in order, so partial sums cannot be merged later.

    The calls change the caches as the store's would (this runs after the host stack's
    measurement)."""
    from evssd.host import pooling
    from evssd.host.dedupe import dedupe
    names = list(tables)
    caches = [estore.caches[k] for k in names]
    infos = [estore.tables[k] for k in names]
    arrays = [np.ascontiguousarray(tables[k]) for k in names]
    outs = [np.empty((reqs[0][k][1].size - 1, i.dim), i.acc_dtype) for k, i in zip(names, infos)]
    sources = [pooling.kernel_source(c.values, i.el) for c, i in zip(caches, infos)]
    slot_of = [[None] * len(names) for _ in reqs]
    n = len(reqs)
    refs = [dstore.lookup_many(q) for q in reqs]   # the cache's pooled bags must equal these
    identical = True
    best = dict.fromkeys(("cache_calls", "dedupe", "pool_cache_rows", "dram"), float("inf"))
    for r in range(rounds):
        spent = 0.0
        for b, q in enumerate(reqs):
            for t, (cache, info, arr, out) in enumerate(zip(caches, infos, arrays, outs)):
                idx, offs = q[names[t]][0], q[names[t]][1]
                t0 = time.perf_counter()
                inserts = cache.inserts
                pooled, uniq, inv, slots, so, miss = cache.lookup_pool(idx, offs, out, info.el, None,
                                                                       checked=True)
                spent += time.perf_counter() - t0
                if pooled:
                    slot_of[b][t] = None
                else:
                    slot_of[b][t] = np.maximum(so, 0)
                    fetched = arr[uniq[miss]]
                    t0 = time.perf_counter()
                    cache.pool_admit(fetched, info.el, uniq, inv, slots, miss, offs, out, None, inserts,
                                     checked=True)
                    spent += time.perf_counter() - t0
                if r == 0:
                    ref = refs[b][names[t]]
                    identical &= ref.dtype == out.dtype and ref.tobytes() == out.tobytes()
        best["cache_calls"] = min(best["cache_calls"], spent / n)
        t0 = time.perf_counter()
        for q in reqs:
            for k in names:
                dedupe(q[k][0])
        best["dedupe"] = min(best["dedupe"], (time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for b, q in enumerate(reqs):
            for t, k in enumerate(names):
                if slot_of[b][t] is not None:
                    pooling.pool_into(sources[t], infos[t].el, slot_of[b][t], q[k][1], outs[t])
        best["pool_cache_rows"] = min(best["pool_cache_rows"], (time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for q in reqs:
            dstore.lookup_many(q)
        best["dram"] = min(best["dram"], (time.perf_counter() - t0) / n)
    two = best["dedupe"] + best["pool_cache_rows"]
    return {**{f"us_per_batch_{k}": v * 1e6 for k, v in best.items()},
            "cache_calls_vs_dram": best["cache_calls"] / best["dram"],
            "two_passes_vs_dram": two / best["dram"], "rounds": rounds, "batches": n,
            "cache_calls_bit_identical_to_dram": identical,
            "pooled_from_cache_only": sum(s is None for row in slot_of for s in row)}


def figure(peers: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = peers["cells"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    ax = axes[0]
    main = [c for c in cells if c["bags"] == 128]
    labels = [f"{c['elem']}\n{c['trace']}\n{c['threads']}T" for c in main]
    x = np.arange(len(main))
    for k, (name, off) in enumerate((("ours", -0.27), ("fbgemm_tbe", 0), ("nn_embeddingbag", 0.27))):
        ax.bar(x + off, [c["peers"][name]["lookups_per_s"] / 1e6 for c in main], 0.27, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("M lookups/s (wall clock, min of rounds)")
    ax.set_title("128 bags x 20 lookups x 4 tables")
    ax.legend(fontsize=8)
    ax = axes[1]
    for trace, style in (("uniform", "-"), ("meta", "--")):
        sweep = sorted([c for c in cells if c["elem"] == "fp32" and c["threads"] == 1 and c["trace"] == trace],
                       key=lambda c: c["bags"])
        if len(sweep) < 2:
            continue
        for name in ("ours", "fbgemm_tbe", "nn_embeddingbag"):
            ax.plot([c["bags"] for c in sweep], [c["peers"][name]["ns_per_lookup"] for c in sweep], style,
                    marker="o", label=f"{name} ({trace})")
    ax.set_xscale("log")
    ax.set_xlabel("bags per table per batch")
    ax.set_ylabel("ns per lookup")
    ax.set_title("cost per lookup across batch sizes (fp32, 1 thread)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    """``python -m evssd.host.bench.store_peers CONFIG.json OUT.json``: run :func:`run_peers`
    with the config's ``cells`` (a list of [elem, trace, threads, bags]) and ``hit_cells`` (a list
    of [elem, trace, threads]; default :data:`HIT_PATH_CELLS`) and write the results."""
    import json
    import sys
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        cfg = json.load(f)
    cells = [tuple(c) for c in cfg.pop("cells")]
    hit_cells = [tuple(c) for c in cfg.pop("hit_cells", HIT_PATH_CELLS)]
    res = run_peers(cfg, cells, log=lambda m: print(m, flush=True), hit_cells=hit_cells)
    with open(argv[1], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
