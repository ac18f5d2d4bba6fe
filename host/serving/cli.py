"""``evssd serve``: embedding servers, rankers and a local cluster (FlexEMR serving).

    evssd serve config --servers 4 --tables 8 --rows 100000 -o cluster.json
    evssd serve embeddings --config cluster.json --server s0 [--port 7001]
    evssd serve ranker --config cluster.json --batches 20 --batch-size 256 --threads 2
    evssd serve local --servers 4 --batches 20        # launch, rank, check against numpy, stop
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

__all__ = ["add_arguments", "run"]


def _common_ranker(p):
    p.add_argument("--provider", default="tcp", choices=["tcp", "verbs"], help="RDMA provider")
    p.add_argument("--threads", type=int, default=2, help="engine I/O threads (1 = single-threaded baseline)")
    p.add_argument("--credits", type=int, default=16, help="in-flight requests per connection")
    p.add_argument("--fetch", default="pooled", choices=["pooled", "rows"],
                   help="pooled: servers pool their rows per bag; rows: one one-sided READ per row")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pooling", type=int, default=20, help="rows per bag")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--budget-mb", type=float, default=None, help="ranker memory budget (enables the adaptive cache)")
    p.add_argument("--static-cache", action="store_true", help="static cache instead of adaptive")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (s)")
    p.add_argument("--criteo", default=None,
                   help="Criteo CSV: dense features and categorical C1.. hashed into the tables (one row per bag)")
    p.add_argument("--seed", type=int, default=0)


def add_arguments(parser):
    sub = parser.add_subparsers(dest="serve_cmd", metavar="ROLE", required=True)

    p = sub.add_parser("config", help="write a generated cluster config (row-range shards)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--skew", type=str, default=None, help="comma-separated server weights, e.g. 4,1,1,1")
    p.add_argument("--torchrec", default=None, metavar="CKPT",
                   help="serve the tables of a TorchRec EBC state_dict file (torch extra); --dim only for INT8")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("embeddings", help="run one embedding server of a config")
    p.add_argument("--config", required=True)
    p.add_argument("--server", required=True, help="server name in the config")
    p.add_argument("--host", default=None, help="bind address (default: the config's)")
    p.add_argument("--port", type=int, default=None, help="port (default: the config's; 0 = any)")
    p.add_argument("--provider", default="tcp", choices=["tcp", "verbs"])
    p.add_argument("--backend", default="dram", help="EmbeddingStore backend: dram, file, ...")
    p.add_argument("--credits", type=int, default=32, help="receives kept posted per connection")

    p = sub.add_parser("ranker", help="rank synthetic batches against running servers")
    p.add_argument("--config", required=True)
    _common_ranker(p)

    p = sub.add_parser("local", help="launch a local cluster, rank batches, check against numpy, stop")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--replicas", type=int, default=0)
    p.add_argument("--backend", default="dram")
    _common_ranker(p)


def _rank(cfg, args, check: bool) -> int:
    from .engine import EngineError
    from .ranker import DLRM, ServingError, criteo_batches
    from .rdma import RdmaUnavailable, get_provider

    try:
        provider = get_provider(args.provider)
    except RdmaUnavailable as exc:
        print(f"evssd serve: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    criteo = criteo_batches(cfg, args.criteo, args.batch_size) if args.criteo else None
    model = DLRM(13, cfg["dim"], len(cfg["tables"]), seed=args.seed)
    budget = int(args.budget_mb * (1 << 20)) if args.budget_mb else None
    try:
        return _rank_loop(cfg, args, check, provider, model, budget, criteo, rng)
    except (ServingError, EngineError) as exc:
        print(f"evssd serve ranker: {exc}", file=sys.stderr)
        return 1


def _rank_loop(cfg, args, check, provider, model, budget, criteo, rng):
    from .engine import Engine
    from .ranker import Ranker, local_pooled, synthetic_batch
    lat = []
    with Engine(provider, args.threads, credits=args.credits, request_timeout=args.timeout) as eng:
        ranker = Ranker(cfg, eng, model, fetch=args.fetch, budget_bytes=budget,
                        adaptive=not args.static_cache, timeout=args.timeout)
        worst = 0.0
        for b in range(args.batches):
            if criteo is not None:
                dense, sparse = next(criteo)
            else:
                dense, sparse = synthetic_batch(cfg, args.batch_size, args.pooling, rng, alpha=0.2)
            t0 = time.perf_counter()
            top, top_s, scores = ranker.rank(dense, sparse, args.top_k)
            lat.append(time.perf_counter() - t0)
            if check:
                ref = model.forward(dense, local_pooled(cfg, sparse))
                worst = max(worst, float(np.max(np.abs(ref - scores))))
            if b == 0:
                print(f"batch 0 top-{args.top_k}: " + ", ".join(f"#{i}={s:.4f}" for i, s in zip(top, top_s)))
        lat_ms = np.array(lat) * 1e3
        print(f"{args.batches} batches of {args.batch_size}: p50 {np.percentile(lat_ms, 50):.2f} ms, "
              f"p99 {np.percentile(lat_ms, 99):.2f} ms, {args.batches * args.batch_size / sum(lat):.0f} samples/s; "
              f"threads {args.threads}, placement {eng.placement()}, retries {ranker.retries}")
        if ranker.cache is not None:
            c = ranker.cache
            print(f"cache: capacity {c.capacity} rows, hits {c.hits}, misses {c.misses}, admitted {c.admitted}")
        if check:
            print(f"max |score - numpy golden| = {worst:.2e}")
            if worst > 1e-4:
                print("MISMATCH against the all-in-memory computation", file=sys.stderr)
                return 1
    return 0


def run(args) -> int:
    from .config import ConfigError, load_config, make_config, save_config

    try:
        if args.serve_cmd == "config":
            skew = [float(x) for x in args.skew.split(",")] if args.skew else None
            if args.torchrec:
                from .torchrec_checkpoint import CheckpointError
                from .torchrec_model import config_from_checkpoint
                try:
                    cfg = config_from_checkpoint(args.torchrec, args.servers, replicas=args.replicas, dim=args.dim)
                except CheckpointError as exc:
                    raise ConfigError(str(exc)) from None
            else:
                cfg = make_config(args.tables, args.rows, args.dim, args.servers, replicas=args.replicas, skew=skew)
            save_config(cfg, args.output)
            print(f"wrote {args.output}")
            return 0
        if args.serve_cmd == "embeddings":
            from .rdma import RdmaUnavailable
            from .server import run_server
            cfg = load_config(args.config)
            try:
                return run_server(cfg, args.server, provider=args.provider, backend=args.backend,
                                  host=args.host, port=args.port, credits=args.credits)
            except RdmaUnavailable as exc:
                print(f"evssd serve embeddings: {exc}", file=sys.stderr)
                return 2
        if args.serve_cmd == "ranker":
            return _rank(load_config(args.config), args, check=False)
        if args.serve_cmd == "local":
            from .launcher import LocalCluster
            cfg = make_config(args.tables, args.rows, args.dim, args.servers, replicas=args.replicas)
            with LocalCluster(cfg, backend=args.backend) as cluster:
                print("servers: " + json.dumps({n: list(cluster.address(n)) for n in cfg["servers"]}))
                return _rank(cluster.config, args, check=True)
    except ConfigError as exc:
        print(f"evssd serve: bad config: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.serve_cmd)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m evssd.host.serving.cli")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
