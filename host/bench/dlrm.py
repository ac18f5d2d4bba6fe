"""`evssd bench dlrm`: TorchRec's DLRM end to end, embeddings in DRAM vs on the EV-SSD.

Peers, one model (``torchrec.models.dlrm.DLRM``) and one input stream:

================ ==================================================================================
torchrec-dram    TorchRec as is: its EmbeddingBagCollection in DRAM (``nn.EmbeddingBag``)
evssd-dram       :class:`evssd.torch.EmbeddingBagCollection` on the ``dram`` store backend
                 (the cost of evssd's host path alone)
evssd            the EBC on the EV-SSD device model: fine-grained reads (only the row's bytes
                 leave the flash page), 1% EV-Cache per table, :class:`evssd.host.pipeline.Pipeline`
                 (depth 2: batch i+1's lookups overlap batch i's dense part)
evssd-block      the same device in ``block_mode`` (every row read moves its whole page over the
                 channel, as a block-interface SSD): FlashEmbedding's baseline on the same stack
================ ==================================================================================

Inputs: dense features from the Criteo sample rows (``host/data/criteo_sample.txt``, cycled);
sparse features from the Meta-calibrated trace (:func:`evssd.host.workload.meta_calibrated`, one
stream per table, ``--pooling-factor`` lookups per bag), so the tables are far larger than the
cache and the reuse is production-like. Every peer's scores are compared with torchrec-dram's,
batch by batch (they must be equal bit for bit).

Two kinds of numbers, never mixed:

* **wall clock** (all peers): batch latency from the start of a batch's lookup to its scores, and
  samples/s over the run, on this machine. For ``evssd*`` on the model this includes the Python
  device model's own run time, which says nothing about hardware.
* **projected** (every peer): the host CPU time per batch (the CPU time of the thread that runs
  it: lookup preparation, cache, pooling, the dense part; the device model's own run time
  excluded; other processes on this shared machine do not count) plus the device time the
  timing model estimates for that batch's commands, converted to seconds at the build clock of
  the ULX3S-85F bitstream (``--clock-mhz``, default the released ULX3S-85F clock, 100 MHz). Latency = host + device; pipelined
  throughput = one batch per max(host, device) (depth 2 overlaps them). A model estimate; for
  the dram peers simply their CPU time per batch.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from evssd.host import cli_types as ct

PEERS = ["torchrec-dram", "evssd-dram", "evssd", "evssd-block"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tables", type=ct.positive_int, default=8, help="embedding tables, one feature each (default 8)")
    parser.add_argument("--rows", type=ct.positive_int, default=100_000, help="rows per table (default 100000)")
    parser.add_argument("--dim", type=ct.positive_int, default=32, help="embedding dimension (default 32)")
    parser.add_argument("--batch-size", type=ct.positive_int, default=256, help="samples per batch (default 256)")
    parser.add_argument("--pooling-factor", type=ct.positive_int, default=20, help="lookups per bag (default 20)")
    parser.add_argument("--batches", type=ct.positive_int, default=100, help="measured batches (default 100)")
    parser.add_argument("--warmup", type=ct.nonneg_int, default=30, help="unmeasured warm-up batches (default 30)")
    parser.add_argument("--cache-fraction", type=ct.fraction, default=0.01,
                        help="EV-Cache budget per table as a fraction of the table (default 0.01)")
    parser.add_argument("--depth", type=ct.positive_int, default=2, help="pipeline depth (default 2)")
    parser.add_argument("--dense-arch", default="128,32", help="DLRM dense arch layer sizes; the last is --dim")
    parser.add_argument("--over-arch", default="128,64,1", help="DLRM over arch layer sizes (default 128,64,1)")
    parser.add_argument("--clock-mhz", type=ct.positive_float, default=None,
                        help="device clock converting modelled cycles to seconds (default: the ULX3S-85F "
                             "release clock from hw/build_plan.py, 100 MHz)")
    parser.add_argument("--peers", default=",".join(PEERS), type=ct.choice_list(PEERS), help=f"comma list (default {','.join(PEERS)})")
    parser.add_argument("--threads", type=ct.positive_int, default=1,
                        help="host compute threads: torch intra-op and numba (the store's pooling) (default 1)")
    parser.add_argument("--seed", type=ct.nonneg_int, default=0)
    parser.add_argument("--results", default=None, help="results root (default $EVSSD_RESULTS or ./results)")
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds: 4 tables x 20000 rows, batches of 64, 10 + 5 batches")


def _config(args) -> dict:
    cfg = {k: getattr(args, k) for k in ("tables", "rows", "dim", "batch_size", "pooling_factor", "batches",
                                         "warmup", "cache_fraction", "depth", "seed", "threads")}
    cfg["dense_arch"] = [int(x) for x in args.dense_arch.split(",")]
    cfg["over_arch"] = [int(x) for x in args.over_arch.split(",")]
    if args.quick:
        cfg.update(tables=4, rows=20_000, batch_size=64, batches=10, warmup=5, dense_arch=[32, args.dim])
    if cfg["dense_arch"][-1] != cfg["dim"]:
        cfg["dense_arch"][-1] = cfg["dim"]
    if args.clock_mhz is None:
        from evssd.hw.synth import BOARDS
        cfg["clock_mhz"] = BOARDS["ulx3s-85f"].clock_mhz
    else:
        cfg["clock_mhz"] = args.clock_mhz
    return cfg


def _check(cfg) -> None:
    for k in ("tables", "rows", "dim", "batch_size", "pooling_factor", "batches", "depth", "threads"):
        if cfg[k] < 1:
            raise SystemExit(f"evssd bench dlrm: --{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if cfg["warmup"] < 0:
        raise SystemExit(f"evssd bench dlrm: --warmup must be >= 0, got {cfg['warmup']}")
    if not 0 < cfg["cache_fraction"] <= 1:
        raise SystemExit(f"evssd bench dlrm: --cache-fraction must be in (0, 1], got {cfg['cache_fraction']}")


def make_model(cfg):
    """The TorchRec DLRM of the run (seeded)."""
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM
    torch.manual_seed(cfg["seed"])
    configs = [EmbeddingBagConfig(num_embeddings=cfg["rows"], embedding_dim=cfg["dim"], name=f"t{k}",
                                  feature_names=[f"f{k}"]) for k in range(cfg["tables"])]
    model = DLRM(EmbeddingBagCollection(tables=configs), dense_in_features=13,
                 dense_arch_layer_sizes=cfg["dense_arch"], over_arch_layer_sizes=cfg["over_arch"])
    return model.eval()


def make_inputs(cfg):
    """[(dense [B, 13] tensor, KJT)] for warm-up + measured batches."""
    import torch
    from torchrec import KeyedJaggedTensor

    from evssd.host.workload import load_criteo, meta_calibrated
    n = cfg["warmup"] + cfg["batches"]
    B = cfg["batch_size"]
    dense_rows = load_criteo(n_tables=1).dense
    streams = [meta_calibrated(cfg["rows"], batch_size=B, pooling_factor=cfg["pooling_factor"],
                               seed=cfg["seed"] * 1000 + 17 * k + 1, n_batches=n) for k in range(cfg["tables"])]
    keys = [f"f{k}" for k in range(cfg["tables"])]
    out = []
    for i, per_table in enumerate(zip(*streams)):
        sel = (i * B + np.arange(B)) % len(dense_rows)
        values = np.concatenate([b.indices for b in per_table])
        lengths = np.concatenate([np.diff(b.offsets) for b in per_table]).astype(np.int32)
        out.append((torch.from_numpy(np.ascontiguousarray(dense_rows[sel])),
                    KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))))
    return out


def _summary(lat_s, samples, wall_s) -> dict:
    a = np.asarray(lat_s, dtype=np.float64)
    return {"batches": int(a.size), "mean_ms": float(a.mean() * 1e3), "p50_ms": float(np.percentile(a, 50) * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3), "samples_per_s": samples / wall_s if wall_s else None}


def _run_torchrec(model, inputs, cfg):
    import torch
    warm, meas = inputs[:cfg["warmup"]], inputs[cfg["warmup"]:]
    scores, lat, cpu = [], [], []
    with torch.no_grad():
        for d, k in warm:
            model(d, k)
        t0 = time.perf_counter()
        for d, k in meas:
            t, c = time.perf_counter(), time.thread_time()
            s = torch.sigmoid(model(d, k))
            cpu.append(time.thread_time() - c)
            lat.append(time.perf_counter() - t)
            scores.append(s)
        wall = time.perf_counter() - t0
    return {"wall": _summary(lat, len(meas) * cfg["batch_size"], wall),
            "projected": _projection(cpu, [0.0] * len(cpu), len(meas) * cfg["batch_size"])}, scores


def _pipelined(model, ebc, inputs, depth):
    """Scores and wall-clock latencies of ``inputs`` through the store pipeline (depth ``depth``)."""
    import torch

    from evssd.host.pipeline import Pipeline
    from evssd.torch import dlrm_logits
    plans, starts = {}, {}

    def requests():
        for i, (_, kjt) in enumerate(inputs):
            starts[i] = time.perf_counter()
            plan = ebc.plan(kjt)
            plans[i] = plan
            yield plan.groups[plan.single_mode]

    scores, lat = [], []
    mode = None
    if inputs:
        mode = ebc.plan(inputs[0][1]).single_mode
    with Pipeline(ebc.store, mode=mode, depth=depth) as pipe, torch.no_grad():
        for r in pipe.run(requests()):
            plan = plans.pop(r.index)
            pooled = ebc.keyed_tensor(plan, r.results)
            scores.append(torch.sigmoid(dlrm_logits(model, inputs[r.index][0], pooled)))
            lat.append(time.perf_counter() - starts.pop(r.index))
    return scores, lat


def _device_cycles(dev) -> tuple[int, int, int]:
    c = dev.counters()
    ch = c.get("channels", [])
    return int(c["cycles"]), sum(int(x.get("bytes", 0)) for x in ch), sum(int(x.get("rows", 0)) for x in ch)


def _projected(model, ebc, dev, inputs, cfg) -> dict:
    """Host CPU time per batch (device model excluded) and modelled device time per batch.

    Host time is the CPU time of this thread (``time.thread_time``: what other processes on the
    machine do does not count) for the whole batch -- KJT split, cache, pooling, the dense part --
    minus the CPU time spent inside the store backend's reads, which is the Python device model
    running (for ``dram`` it is the row copy, which stays host time). Device time comes from the
    device's cycle counter (timing model) at ``clock_mhz``.
    """
    import torch

    from evssd.host.pipeline import run_unpipelined
    from evssd.torch import dlrm_logits
    plans = {}

    def requests():
        for i, (_, kjt) in enumerate(inputs):
            plan = ebc.plan(kjt)
            plans[i] = plan
            yield plan.groups[plan.single_mode]

    backend = ebc.store.backend
    inside = [0.0]
    if dev is not None:
        read_many = backend.read_many

        def timed_read_many(jobs):
            t = time.thread_time()
            try:
                return read_many(jobs)
            finally:
                inside[0] += time.thread_time() - t
        backend.read_many = timed_read_many      # this run only; removed below
    mode = ebc.plan(inputs[0][1]).single_mode
    host, device = [], []
    c0, b0, r0 = _device_cycles(dev) if dev is not None else (0, 0, 0)
    flash_bytes = flash_rows = 0
    it = run_unpipelined(ebc.store, requests(), mode=mode)
    try:
        with torch.no_grad():
            while True:
                t0, in0 = time.thread_time(), inside[0]
                r = next(it, None)
                if r is None:
                    break
                plan = plans.pop(r.index)
                pooled = ebc.keyed_tensor(plan, r.results)
                torch.sigmoid(dlrm_logits(model, inputs[r.index][0], pooled))
                host.append(time.thread_time() - t0 - (inside[0] - in0))
                if dev is not None:
                    c1, b1, r1 = _device_cycles(dev)
                    device.append((c1 - c0) / (cfg["clock_mhz"] * 1e6))
                    flash_bytes += b1 - b0
                    flash_rows += r1 - r0
                    c0, b0, r0 = c1, b1, r1
                else:
                    device.append(0.0)
    finally:
        if dev is not None:
            del backend.read_many
    return _projection(host, device, len(inputs) * cfg["batch_size"],
                       flash_channel_bytes=int(flash_bytes), flash_rows_read=int(flash_rows))


def _projection(host, device, samples, **extra) -> dict:
    host_a, dev_a = np.asarray(host, dtype=np.float64), np.asarray(device, dtype=np.float64)
    lat = host_a + dev_a
    per_batch = np.maximum(host_a, dev_a)     # depth-2 pipeline: host and device overlap
    return {"host_ms_mean": float(host_a.mean() * 1e3), "device_ms_mean": float(dev_a.mean() * 1e3),
            "latency_p50_ms": float(np.percentile(lat, 50) * 1e3), "latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "latency_mean_ms": float(lat.mean() * 1e3), "samples_per_s": samples / float(per_batch.sum()),
            "device_bound_batches": int((dev_a > host_a).sum()), **extra}


def _open_device(cfg):
    from evssd.host.device import Device
    row_bytes = -(-cfg["dim"] * 4 // 4) * 4
    pages = cfg["tables"] * -(-cfg["rows"] // max(1, 4096 // row_bytes))
    ppc = 1024
    while ppc * 4 < pages * 1.1:
        ppc *= 2
    return Device.open("model", pages_per_channel=ppc)


def _run_evssd(model, inputs, cfg, peer) -> tuple[dict, list]:
    from evssd.torch import EmbeddingBagCollection
    src = model.sparse_arch.embedding_bag_collection
    dev = None
    res: dict = {}
    t0 = time.perf_counter()
    if peer == "evssd-dram":
        ebc = EmbeddingBagCollection.from_torchrec(src, backend="dram")
    else:
        dev = _open_device(cfg)
        try:
            ebc = EmbeddingBagCollection.from_torchrec(src, backend="evssd", device=dev,
                                                       cache_fraction=cfg["cache_fraction"],
                                                       block_mode=peer == "evssd-block")
        except BaseException:
            dev.close()
            raise
    res["build_s"] = time.perf_counter() - t0
    warm, meas = inputs[:cfg["warmup"]], inputs[cfg["warmup"]:]
    try:
        _pipelined(model, ebc, warm, cfg["depth"])
        s0 = ebc.store.stats()
        t0 = time.perf_counter()
        scores, lat = _pipelined(model, ebc, meas, cfg["depth"])
        res["wall"] = _summary(lat, len(meas) * cfg["batch_size"], time.perf_counter() - t0)
        s1 = ebc.store.stats()
        hits = sum(c1.get("hits", 0) - s0["caches"][n].get("hits", 0) for n, c1 in s1["caches"].items())
        miss = sum(c1.get("misses", 0) - s0["caches"][n].get("misses", 0) for n, c1 in s1["caches"].items())
        res["cache_hit_rate"] = hits / (hits + miss) if hits + miss else None
        # a second pass over the same batches, unpipelined, to split host and device time
        res["projected"] = _projected(model, ebc, dev, meas, cfg)
    finally:
        ebc.close()
        if dev is not None:
            dev.close()
    return res, scores


def _figure(rows, cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names, thr, host, dev, colors = [], [], [], [], []
    for r in rows:
        names.append(f"{r['peer']}\n(wall)")
        thr.append(r["wall"]["samples_per_s"] / 1e3)
        host.append(r["wall"]["p50_ms"])
        dev.append(0.0)
        colors.append("tab:gray")
        if "projected" in r:
            p = r["projected"]
            names.append(f"{r['peer']}\n(projected)")
            thr.append(p["samples_per_s"] / 1e3)
            host.append(p["host_ms_mean"])
            dev.append(p["device_ms_mean"])
            colors.append("tab:blue")
    x = range(len(names))
    axes[0].bar(x, thr, color=colors)
    axes[0].set_title("throughput (k samples/s)", fontsize=10)
    axes[1].bar(x, host, color=colors, label="host (wall p50 / projected CPU mean)")
    axes[1].bar(x, dev, bottom=host, color="tab:orange", label="device (modelled, mean)")
    axes[1].set_title("batch latency (ms)", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
    fig.suptitle(f"evssd bench dlrm: TorchRec DLRM, {cfg['tables']} x {cfg['rows']:,} x {cfg['dim']} tables, "
                 f"batch {cfg['batch_size']} x {cfg['pooling_factor']} lookups (gray: wall clock; blue: host CPU "
                 f"measured + device modelled at {cfg['clock_mhz']:.0f} MHz)", fontsize=9)
    fig.tight_layout()
    return fig


def run(args) -> int:
    try:
        import torch
        import torchrec  # noqa: F401
    except ImportError as exc:
        print(f"evssd bench dlrm: needs the torch extra and TorchRec ({exc}); see README, PyTorch / TorchRec",
              file=sys.stderr)
        return 2
    cfg = _config(args)
    _check(cfg)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            print(f"evssd bench dlrm: unknown peer {p!r} (known: {', '.join(PEERS)})", file=sys.stderr)
            return 2
    torch.set_num_threads(cfg["threads"])
    import numba
    # one host thread for every peer (TorchRec's kernels and the store's), so they compare on one core;
    # on these shared 2-core machines numba's parallel pooling waits for descheduled threads
    numba.set_num_threads(min(cfg["threads"], numba.config.NUMBA_NUM_THREADS))
    t_all = time.perf_counter()
    model = make_model(cfg)
    inputs = make_inputs(cfg)
    print(f"evssd bench dlrm: TorchRec DLRM, {cfg['tables']} tables x {cfg['rows']:,} rows x {cfg['dim']} fp32, "
          f"dense arch {cfg['dense_arch']}, over arch {cfg['over_arch']}; batches of {cfg['batch_size']} samples "
          f"x {cfg['pooling_factor']} lookups per table (Criteo dense rows, Meta-calibrated sparse trace), "
          f"{cfg['warmup']} warm-up + {cfg['batches']} measured; EV-Cache {cfg['cache_fraction']:.0%} per table, "
          f"pipeline depth {cfg['depth']}, device clock {cfg['clock_mhz']:.0f} MHz, host threads {cfg['threads']}")
    rows, ref_scores = [], None
    ref, ref_scores = _run_torchrec(model, inputs, cfg)
    rows.append({"peer": "torchrec-dram", **ref})
    identical = True
    for peer in peers:
        if peer == "torchrec-dram":
            continue
        res, scores = _run_evssd(model, inputs, cfg, peer)
        res["scores_identical"] = len(scores) == len(ref_scores) and \
            all(torch.equal(a, b) for a, b in zip(scores, ref_scores))
        identical &= res["scores_identical"]
        rows.append({"peer": peer, **res})
    if "torchrec-dram" not in peers:
        rows = rows[1:]
    print(f"  {'peer':14s} {'wall samples/s':>14s} {'wall p50 ms':>11s} {'proj samples/s':>14s} "
          f"{'proj p50 ms':>11s} {'host ms':>8s} {'device ms':>9s} {'hit rate':>8s} {'flash MiB':>9s}")
    for r in rows:
        p = r.get("projected")
        hr = r.get("cache_hit_rate")
        print(f"  {r['peer']:14s} {r['wall']['samples_per_s']:14,.0f} {r['wall']['p50_ms']:11.2f} "
              + (f"{p['samples_per_s']:14,.0f} {p['latency_p50_ms']:11.2f} {p['host_ms_mean']:8.2f} "
                 f"{p['device_ms_mean']:9.2f} " if p else f"{'-':>14s} {'-':>11s} {'-':>8s} {'-':>9s} ")
              + (f"{hr:8.3f} " if hr is not None else f"{'-':>8s} ")
              + (f"{p['flash_channel_bytes'] / 2**20:9.1f}" if p and "flash_channel_bytes" in p else f"{'-':>9s}"))
    by = {r["peer"]: r for r in rows}
    ratios = {}
    if "evssd" in by and "evssd-block" in by:
        a, b = by["evssd"]["projected"], by["evssd-block"]["projected"]
        ratios["evssd_over_block_throughput"] = a["samples_per_s"] / b["samples_per_s"]
        ratios["block_over_evssd_latency_p50"] = b["latency_p50_ms"] / a["latency_p50_ms"]
        ratios["block_over_evssd_flash_bytes"] = b["flash_channel_bytes"] / max(a["flash_channel_bytes"], 1)
    for peer in ("evssd-dram", "evssd", "evssd-block"):
        if peer in by and "torchrec-dram" in by:
            ratios[f"torchrec_dram_over_{peer.replace('-', '_')}_throughput"] = \
                by["torchrec-dram"]["projected"]["samples_per_s"] / by[peer]["projected"]["samples_per_s"]
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    print(f"  scores identical to torchrec-dram, batch by batch: {identical}")
    notes = [
        "wall: wall clock on this machine (evssd/evssd-block include the Python device model's run time)",
        "projected: host CPU time per batch (this thread's CPU time, so other processes on the machine "
        "do not count; the device model's own run time excluded) + the timing model's device time for "
        f"the batch's commands at {cfg['clock_mhz']:.0f} MHz; latency = host + device, throughput = one "
        "batch per max(host, device) (pipeline depth 2): a model estimate, not a measurement; for the "
        "dram peers it is their CPU time alone",
        "FlashEmbedding reports 2.89x end to end over a block SSD; evssd_over_block_throughput is that "
        "comparison on this stack (same device model, cache and pipeline; block_mode moves whole pages)",
    ]
    for n in notes:
        print(f"  note: {n}")
    data = {"config": cfg, "peers": rows, "ratios": ratios, "scores_identical": identical, "notes": notes,
            "total_s": time.perf_counter() - t_all}
    fig = None
    try:
        fig = _figure(rows, cfg)
    except Exception as exc:   # a plot must never lose the numbers
        print(f"  (no figure: {exc})")
    from evssd.host.bench.common import write_results
    command = "evssd bench dlrm " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "dlrm"] else [])
    path = write_results("dlrm", data, fig, command=command.strip(), root=args.results)
    print(f"  wrote {path} ({time.perf_counter() - t_all:.1f} s)")
    return 0 if identical else 1


if __name__ == "__main__":
    _p = argparse.ArgumentParser()
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))
