"""`evssd bench cache`: EV-Cache vs a plain LRU (cachetools.LRUCache), same keys, same memory.

Three caches see the same batches through the store's protocol (look a batch up, fetch the
misses, offer them for admission):

* ``evcache``: EV-Cache, admission threshold 2 (admit on the second access).
* ``evcache_nofilter``: EV-Cache with threshold 1 (every looked-up miss is admitted: plain LRU).
* ``cachetools``: ``cachetools.LRUCache`` driven one key at a time from Python; it is given the
  same number of rows as the EV-Cache holds in the budget (its real footprint per row is far
  larger: a dict entry, a link and a numpy row object). Same policy as ``evcache_nofilter``, so
  their hit rates must agree exactly; the benchmark checks that.

Parts:

1. Hit rate vs budget (0.5/1/2/5% of the table's bytes) on the Meta-calibrated trace and a Zipf
   trace, measured after ``--warmup`` batches.
2. Throughput (keys/s, lookup + admission of the misses, one thread) on the Meta-calibrated
   trace at 1%, and in a >= 90% hit-rate regime: a warm cache and a hot set of half the cache's
   capacity drawn uniformly for 95% of the keys, the other 5% uniform over the whole table. The
   hit rate reached is reported next to the rate. EV-Cache is timed over all measured batches,
   best of ``--repeats``; cachetools over the first ``--lru-keys`` keys of the same batches (it is
   ~100x slower), also best of repeats. The row fetch for misses is not timed (a zero row buffer
   stands in for the device).
"""
from __future__ import annotations

import os
import shlex
import sys
import time

import numpy as np

from evssd.host.bench.common import write_results
from evssd.host.cache import EVCache
from evssd.host import workload as wl
from evssd.host import cli_types as ct

NAME = "cache"


def add_arguments(parser):
    parser.add_argument("--rows", type=ct.positive_int, default=1_000_000, help="rows in the table (default 1M)")
    parser.add_argument("--dim", type=ct.positive_int, default=64, help="row length (default 64)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "int8", "int32"), help="fp32, fp16, int8, int32 (default fp32)")
    parser.add_argument("--batch-size", type=ct.positive_int, default=512, help="bags per batch (default 512)")
    parser.add_argument("--pooling", type=ct.positive_int, default=20, help="lookups per bag (default 20)")
    parser.add_argument("--batches", type=ct.positive_int, default=None,
                        help="measured batches per trace (default 60; 20 with --quick)")
    parser.add_argument("--warmup", type=ct.nonneg_int, default=None,
                        help="batches before measuring (default 40; 10 with --quick)")
    parser.add_argument("--budgets", default="0.5,1,2,5", type=ct.float_list(ct.percent),
                        help="cache budgets in %% of the table's bytes (default 0.5,1,2,5)")
    parser.add_argument("--alpha", type=ct.positive_float, default=1.05, help="Zipf exponent of the zipf trace (default 1.05)")
    parser.add_argument("--repeats", type=ct.positive_int, default=3, help="timing repeats, best kept (default 3)")
    parser.add_argument("--lru-keys", type=ct.positive_int, default=None,
                        help="keys timed through cachetools (default 200k; 50k with --quick)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run: a few seconds")
    parser.add_argument("--results-root", default=None, help="results root (default $EVSSD_RESULTS or ./results)")
    parser.add_argument("--no-plot", action="store_true", help="JSON only")


# ----------------------------------------------------------------------------------------------


class _LRUPeer:
    """cachetools.LRUCache behind the batched protocol, one Python call per key."""

    def __init__(self, capacity):
        import cachetools
        self.lru = cachetools.LRUCache(maxsize=capacity)
        self.hits = self.lookups = 0

    def serve(self, keys, out, fetched):
        get = self.lru.get
        hit = np.zeros(len(keys), dtype=bool)
        klist = keys.tolist()
        for j, k in enumerate(klist):
            row = get(k)
            if row is not None:
                out[j] = row
                hit[j] = True
        miss = np.flatnonzero(~hit)
        lru = self.lru
        for j in miss.tolist():
            k = klist[j]
            if k not in lru:
                lru[k] = fetched[j]
        n_hit = len(keys) - len(miss)
        self.hits += n_hit
        self.lookups += len(keys)
        return n_hit


def _serve_ev(cache, keys, out, fetched):
    hit = cache.lookup(keys, out)
    miss = ~hit
    cache.admit(keys[miss], fetched[: int(miss.sum())])


def _hit_rates(batches, warmup, n_rows, dim, dtype, fraction):
    cap_rows = {}
    res = {}
    big = max(len(b) for b in batches)
    out = np.zeros((big, dim), dtype)
    fetched = np.zeros((big, dim), dtype)
    for label, thr in (("evcache", 2), ("evcache_nofilter", 1)):
        c = EVCache(n_rows, dim, dtype, budget_fraction=fraction, admit_threshold=thr, name=label)
        for i, k in enumerate(batches):
            if i == warmup:
                c.reset_stats()
            _serve_ev(c, k, out[: len(k)], fetched)
        s = c.stats
        res[label] = {"hit_rate": s["hit_rate"], "rejected_by_filter": s["rejected_by_filter"],
                      "admissions": s["admissions"], "evictions": s["evictions"]}
        cap_rows[label] = c.capacity
        memory = s["memory_bytes"]
    peer = _LRUPeer(cap_rows["evcache"])
    for i, k in enumerate(batches):
        if i == warmup:
            peer.hits = peer.lookups = 0
        peer.serve(k, out[: len(k)], fetched)
    res["cachetools"] = {"hit_rate": peer.hits / peer.lookups}
    res["capacity_rows"] = cap_rows["evcache"]
    res["evcache_memory_bytes"] = memory
    res["peer_agrees_with_nofilter"] = res["cachetools"]["hit_rate"] == res["evcache_nofilter"]["hit_rate"]
    return res


def _time_ev(make, warm, measured, dim, dtype, repeats):
    big = max(len(b) for b in measured)
    out = np.zeros((big, dim), dtype)
    fetched = np.zeros((big, dim), dtype)
    n_keys = sum(len(b) for b in measured)
    best = best_cpu = float("inf")
    hit_rate = None
    for _ in range(repeats):
        c = make()
        for k in warm:
            _serve_ev(c, k, out[: len(k)], fetched)
        c.reset_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        for k in measured:
            _serve_ev(c, k, out[: len(k)], fetched)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        hit_rate = c.stats["hit_rate"]
    # lookup only (the hit path, no admission), on the warm cache of the last repeat
    lbest = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in measured:
            c.lookup(k, out[: len(k)])
        lbest = min(lbest, time.perf_counter() - t0)
    return {"keys_per_s": n_keys / best, "keys_per_cpu_s": n_keys / max(best_cpu, 1e-9),
            "lookup_only_keys_per_s": n_keys / lbest, "hit_rate": hit_rate, "keys": n_keys}


def _time_lru(capacity, warm, measured, dim, dtype, repeats, max_keys):
    sub, n = [], 0
    for k in measured:
        if n >= max_keys:
            break
        sub.append(k[: max_keys - n])
        n += len(sub[-1])
    big = max(len(b) for b in measured)
    out = np.zeros((big, dim), dtype)
    fetched = np.zeros((big, dim), dtype)
    best = best_cpu = float("inf")
    hit_rate = None
    for _ in range(repeats):
        peer = _LRUPeer(capacity)
        for k in warm:
            peer.serve(k, out[: len(k)], fetched)
        peer.hits = peer.lookups = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for k in sub:
            peer.serve(k, out[: len(k)], fetched)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        hit_rate = peer.hits / peer.lookups
    return {"keys_per_s": n / best, "keys_per_cpu_s": n / max(best_cpu, 1e-9),
            "hit_rate": hit_rate, "keys": n}


def _hot_set_trace(n_rows, hot_rows, batch_keys, n_batches, seed):
    rng = np.random.default_rng(seed)
    hot = rng.choice(n_rows, size=hot_rows, replace=False).astype(np.int64)
    out = []
    for _ in range(n_batches):
        k = hot[rng.integers(0, hot_rows, batch_keys)]
        cold = rng.random(batch_keys) < 0.05
        k[cold] = rng.integers(0, n_rows, int(cold.sum()))
        out.append(k)
    return out


def _figure(data, budgets):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"evcache": ("EV-Cache (filter, thr 2)", "o-"),
              "evcache_nofilter": ("EV-Cache, no filter (thr 1)", "s--"),
              "cachetools": ("cachetools.LRUCache", "x:")}
    for ax, trace in zip(axes[:2], ("meta_calibrated", "zipf")):
        rows = data["hit_rate"][trace]
        for key, (label, style) in styles.items():
            ax.plot(budgets, [rows[f"{b}"][key]["hit_rate"] for b in budgets], style, label=label)
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b}%" for b in budgets])
        ax.set_xlabel("cache budget (% of table bytes)")
        ax.set_ylabel("hit rate")
        ax.set_title(f"hit rate, {trace} trace")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    tp = data["throughput"]
    groups = [("meta_calibrated", "Meta trace, 1%"), ("hot_set", ">=90% hit regime")]
    width = 0.25
    for i, (key, (label, _)) in enumerate(styles.items()):
        vals = [tp[g][key]["keys_per_s"] / 1e6 for g, _ in groups]
        ax.bar(np.arange(len(groups)) + (i - 1) * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([g[1] for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("M keys/s (lookup + admit, 1 thread)")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def run(args) -> int:
    quick = args.quick
    n_batches = args.batches if args.batches is not None else (20 if quick else 60)
    warmup = args.warmup if args.warmup is not None else (10 if quick else 40)
    lru_keys = args.lru_keys if args.lru_keys is not None else (50_000 if quick else 200_000)
    repeats = max(1, args.repeats if not quick else min(args.repeats, 2))
    n_rows = args.rows if not (quick and args.rows == 1_000_000) else 200_000
    dim, seed = args.dim, args.seed
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        print(f"evssd bench cache: --budgets must be comma-separated numbers, got {args.budgets!r}", file=sys.stderr)
        return 2
    for name, v in (("--rows", n_rows), ("--dim", dim), ("--batch-size", args.batch_size),
                    ("--pooling", args.pooling), ("--batches", n_batches)):
        if v < 1:
            print(f"evssd bench cache: {name} must be >= 1, got {v}", file=sys.stderr)
            return 2
    if not budgets or any(not 0 < b <= 100 for b in budgets):
        print(f"evssd bench cache: budgets must be in (0, 100] %, got {args.budgets!r}", file=sys.stderr)
        return 2
    try:
        dtype = EVCache(16, dim, args.dtype, capacity=1).dtype
    except ValueError as exc:
        print(f"evssd bench cache: --dtype: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    total = n_batches + warmup
    print(f"evssd bench cache: table {n_rows} rows x {dim} {dtype}, batches of {args.batch_size} bags "
          f"x {args.pooling} lookups, {warmup} warm-up + {n_batches} measured batches per trace")

    traces = {
        "meta_calibrated": [b.indices for b in wl.meta_calibrated(
            n_rows, args.batch_size, args.pooling, seed=seed, n_batches=total)],
        "zipf": [b.indices for b in wl.zipf(
            n_rows, args.alpha, args.batch_size, args.pooling, seed=seed, n_batches=total)],
    }
    data = {"config": {"rows": n_rows, "dim": dim, "dtype": str(dtype), "batch_size": args.batch_size,
                       "pooling": args.pooling, "batches": n_batches, "warmup": warmup,
                       "budgets_percent": budgets, "zipf_alpha": args.alpha, "seed": seed,
                       "repeats": repeats, "lru_keys": lru_keys, "quick": quick},
            "hit_rate": {}, "throughput": {}}

    print("\nhit rate after warm-up (same keys, same rows for cachetools as EV-Cache holds)")
    print(f"{'trace':16} {'budget':>7} {'rows':>8} {'EV-Cache':>9} {'no filter':>9} {'cachetools':>10} {'rejected':>9}")
    for trace, batches in traces.items():
        data["hit_rate"][trace] = {}
        for b in budgets:
            r = _hit_rates(batches, warmup, n_rows, dim, dtype, b / 100)
            data["hit_rate"][trace][f"{b}"] = r
            print(f"{trace:16} {b:6g}% {r['capacity_rows']:8d} {r['evcache']['hit_rate']:9.4f} "
                  f"{r['evcache_nofilter']['hit_rate']:9.4f} {r['cachetools']['hit_rate']:10.4f} "
                  f"{r['evcache']['rejected_by_filter']:9d}"
                  + ("" if r["peer_agrees_with_nofilter"] else "  (cachetools != no-filter EV-Cache!)"))

    # throughput: the Meta trace at 1%, and the hot-set regime
    frac = 0.01
    probe = EVCache(n_rows, dim, dtype, budget_fraction=frac)
    cap = probe.capacity
    batch_keys = args.batch_size * args.pooling
    hot = _hot_set_trace(n_rows, max(1, cap // 2), batch_keys, total, seed + 1)
    regimes = {"meta_calibrated": traces["meta_calibrated"], "hot_set": hot}
    print(f"\nthroughput, one thread, lookup + admission, budget 1% ({cap} rows); "
          f"hot_set = 95% of keys uniform over {max(1, cap // 2)} rows, 5% uniform over the table, warm cache")
    print(f"{'regime':16} {'cache':18} {'M keys/s':>9} {'per CPU-s':>9} {'hit rate':>9} {'lookup-only M keys/s':>21}")
    for regime, batches in regimes.items():
        warm, measured = batches[:warmup], batches[warmup:]
        row = {}
        for label, thr in (("evcache", 2), ("evcache_nofilter", 1)):
            row[label] = _time_ev(lambda thr=thr: EVCache(n_rows, dim, dtype, budget_fraction=frac,
                                                          admit_threshold=thr),
                                  warm, measured, dim, dtype, repeats)
        row["cachetools"] = _time_lru(cap, warm, measured, dim, dtype, repeats, lru_keys)
        row["speedup_vs_cachetools"] = row["evcache"]["keys_per_s"] / row["cachetools"]["keys_per_s"]
        data["throughput"][regime] = row
        for label in ("evcache", "evcache_nofilter", "cachetools"):
            r = row[label]
            lo = f"{r['lookup_only_keys_per_s'] / 1e6:21.2f}" if "lookup_only_keys_per_s" in r else f"{'-':>21}"
            print(f"{regime:16} {label:18} {r['keys_per_s'] / 1e6:9.2f} {r['keys_per_cpu_s'] / 1e6:9.2f} "
                  f"{r['hit_rate']:9.4f} {lo}")
        print(f"{regime:16} EV-Cache / cachetools: {row['speedup_vs_cachetools']:.1f}x")

    # the targets, stated as measured
    hs = data["throughput"]["hot_set"]
    m1 = data["hit_rate"]["meta_calibrated"].get("1.0")
    targets = {
        "evcache_keys_per_s_at_90pct_hit": hs["evcache"]["keys_per_s"],
        "evcache_keys_per_cpu_s_at_90pct_hit": hs["evcache"]["keys_per_cpu_s"],
        "hit_rate_in_that_regime": hs["evcache"]["hit_rate"],
        "target_10M_keys_per_s_met": hs["evcache"]["keys_per_s"] >= 10e6 and hs["evcache"]["hit_rate"] >= 0.9,
        "speedup_vs_cachetools": hs["speedup_vs_cachetools"],
        "speedup_vs_cachetools_cpu": hs["evcache"]["keys_per_cpu_s"] / hs["cachetools"]["keys_per_cpu_s"],
        "target_5x_met": hs["speedup_vs_cachetools"] >= 5,
    }
    if m1 is not None:
        targets["meta_1pct_hit_rate_evcache"] = m1["evcache"]["hit_rate"]
        targets["meta_1pct_hit_rate_plain_lru"] = m1["cachetools"]["hit_rate"]
        targets["target_hit_rate_ge_plain_lru_met"] = m1["evcache"]["hit_rate"] >= m1["cachetools"]["hit_rate"]
    data["targets"] = targets
    data["seconds"] = time.perf_counter() - t_start
    # the machine is shared: wall-clock rates fall when others run; the load says how much
    data["loadavg_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    print("\ntargets: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in targets.items()))
    fig = None if args.no_plot else _figure(data, budgets)
    command = "evssd bench cache " + " ".join(shlex.quote(a) for a in sys.argv[3:]) \
        if sys.argv[1:3] == ["bench", "cache"] else None
    path = write_results(NAME, data, fig, command=command, root=args.results_root)
    print(f"wrote {path} ({data['seconds']:.1f} s; 1-min load average {load_before[0]:.2f} before, "
          f"{data['loadavg_1min']['after']:.2f} after)")
    return 0
