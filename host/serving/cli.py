"""``evssd serve``: embedding servers, rankers and a local cluster (FlexEMR serving).

    evssd serve config --servers 4 --tables 8 --rows 100000 -o cluster.json
    evssd serve embeddings --config cluster.json --server s0 [--port 7001]
    evssd serve echo [--port 7001]                    # an engine server that only echoes (rtt bench)
    evssd serve ranker --config cluster.json --batches 20 --batch-size 256 --threads 2
    evssd serve local --servers 4 --batches 20        # launch, rank, check against numpy, stop
    evssd serve ray --address auto --servers 4        # servers and rankers as Ray actors
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from evssd.host import cli_types as ct

__all__ = ["add_arguments", "run"]


def _common_ranker(p):
    p.add_argument("--provider", default="tcp", choices=["tcp", "verbs"], help="RDMA provider")
    p.add_argument("--threads", type=ct.positive_int, default=2, help="engine I/O threads (1 = single-threaded baseline)")
    p.add_argument("--credits", type=ct.positive_int, default=16, help="in-flight requests per connection")
    p.add_argument("--fetch", default="pooled", choices=["pooled", "rows"],
                   help="pooled: servers pool their rows per bag; rows: one one-sided READ per row")
    p.add_argument("--batches", type=ct.positive_int, default=10)
    p.add_argument("--batch-size", type=ct.positive_int, default=128)
    p.add_argument("--pooling", type=ct.positive_int, default=20, help="rows per bag")
    p.add_argument("--top-k", type=ct.positive_int, default=5)
    p.add_argument("--budget-mb", type=ct.positive_float, default=None, help="ranker memory budget (enables the adaptive cache)")
    p.add_argument("--static-cache", action="store_true", help="static cache instead of adaptive")
    p.add_argument("--timeout", type=ct.positive_float, default=5.0, help="per-request timeout (s)")
    p.add_argument("--criteo", default=None,
                   help="Criteo CSV: dense features and categorical C1.. hashed into the tables (one row per bag)")
    p.add_argument("--seed", type=ct.nonneg_int, default=0)
    p.add_argument("--torchrec-dlrm", default=None, metavar="FILE",
                   help="rank with a torchrec.models.dlrm.DLRM saved by torch.save(model, FILE) instead of the "
                        "numpy DLRM (torch extra; a pickle: trusted files only)")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="serve_cmd", metavar="ROLE", required=True)

    p = sub.add_parser("config", help="write a generated cluster config (row-range shards)")
    p.add_argument("--servers", type=ct.positive_int, default=2)
    p.add_argument("--tables", type=ct.positive_int, default=4)
    p.add_argument("--rows", type=ct.positive_int, default=20000)
    p.add_argument("--dim", type=ct.positive_int, default=16)
    p.add_argument("--replicas", type=ct.nonneg_int, default=0)
    p.add_argument("--skew", type=ct.float_list(), default=None, help="comma-separated server weights, e.g. 4,1,1,1")
    p.add_argument("--torchrec", default=None, metavar="CKPT",
                   help="serve the tables of a TorchRec EBC state_dict file (torch extra); --dim only for INT8")
    p.add_argument("--host", default="127.0.0.1", help="address of every server")
    p.add_argument("--base-port", type=ct.int_range(1, 65535, "a TCP port"), default=None,
                   help="ports base, base+1, ... (default: ports free on --host now)")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("embeddings", help="run one embedding server of a config")
    p.add_argument("--config", required=True)
    p.add_argument("--server", required=True, help="server name in the config")
    p.add_argument("--host", default=None, help="bind address (default: the config's)")
    p.add_argument("--port", type=ct.port, default=None, help="port (default: the config's; 0 = any)")
    p.add_argument("--provider", default="tcp", choices=["tcp", "verbs"])
    p.add_argument("--backend", default="dram", help="EmbeddingStore backend: dram, file, ...")
    p.add_argument("--credits", type=ct.positive_int, default=32, help="receives kept posted per connection")

    p = sub.add_parser("echo", help="run an engine server that answers ECHO requests only (round-trip floor)")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=ct.port, default=0, help="port (0 = any; the READY line names it)")
    p.add_argument("--provider", default="tcp", choices=["tcp", "verbs"])

    p = sub.add_parser("ranker", help="rank synthetic batches against running servers")
    p.add_argument("--config", required=True)
    _common_ranker(p)

    p = sub.add_parser("ray", help="deploy servers and rankers on a Ray cluster (Ray: control plane only)")
    p.add_argument("--address", default="local",
                   help="Ray cluster address (auto, ray://..., host:port) or `local` to start Ray here")
    p.add_argument("--config", default=None, help="cluster config (default: generated from the options below)")
    p.add_argument("--servers", type=ct.positive_int, default=2)
    p.add_argument("--tables", type=ct.positive_int, default=4)
    p.add_argument("--rows", type=ct.positive_int, default=20000)
    p.add_argument("--dim", type=ct.positive_int, default=16)
    p.add_argument("--replicas", type=ct.nonneg_int, default=0)
    p.add_argument("--backend", default="dram")
    p.add_argument("--max-restarts", type=ct.int_range(-1, None, "a restart count (-1: unlimited)"), default=10, help="Ray restarts of a failed server (-1: unlimited)")
    p.add_argument("--rankers", type=ct.positive_int, default=1, help="ranker actors to start")
    p.add_argument("--batches", type=ct.positive_int, default=10)
    p.add_argument("--batch-size", type=ct.positive_int, default=64)
    p.add_argument("--publish", default=None, help="write the config with the published addresses here")
    p.add_argument("--keep", action="store_true", help="keep serving after the rankers finish (until Ctrl-C)")

    p = sub.add_parser("local", help="launch a local cluster, rank batches, check against numpy, stop")
    p.add_argument("--servers", type=ct.positive_int, default=2)
    p.add_argument("--tables", type=ct.positive_int, default=4)
    p.add_argument("--rows", type=ct.positive_int, default=20000)
    p.add_argument("--dim", type=ct.positive_int, default=16)
    p.add_argument("--replicas", type=ct.nonneg_int, default=0)
    p.add_argument("--backend", default="dram")
    _common_ranker(p)


def _rank(cfg, args, check: bool) -> int:
    from .engine import EngineError
    from .ranker import DLRM, ServingError, criteo_batches
    from .providers import get_provider
    from .rdma import RdmaUnavailable

    try:
        provider = get_provider(args.provider)
    except RdmaUnavailable as exc:
        print(f"evssd serve: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    criteo = criteo_batches(cfg, args.criteo, args.batch_size) if args.criteo else None
    if args.torchrec_dlrm:
        from .torchrec_model import load_torchrec_dlrm
        model = load_torchrec_dlrm(args.torchrec_dlrm, cfg)
        print(f"ranker model: TorchRec DLRM from {args.torchrec_dlrm}")
    else:
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


def _ray(args) -> int:
    from .config import load_config, make_config, save_config
    from .ray_plane import RayDeployment, require_ray

    try:
        ray = require_ray()
    except RuntimeError as exc:
        print(f"evssd serve ray: {exc}", file=sys.stderr)
        return 2
    cfg = load_config(args.config) if args.config else \
        make_config(args.tables, args.rows, args.dim, args.servers, replicas=args.replicas)
    owns = not ray.is_initialized()          # a caller already connected (tests) keeps its session
    if owns:
        ray.init(address=None if args.address == "local" else args.address, logging_level="ERROR")
    try:
        dep = RayDeployment(cfg, backend=args.backend, max_restarts=args.max_restarts).start()
        try:
            for s, info in dep.infos().items():
                print(f"{s}: {info['host']}:{info['port']} pid {info['pid']} node {info['node_id'][:12]} "
                      f"({dep.placement[s]})")
            if args.publish:
                save_config(dep.config(), args.publish)
                print(f"published addresses in {args.publish}")
            rankers = dep.start_rankers(args.rankers)
            results = ray.get([r.run.remote(args.batches, args.batch_size) for r in rankers])
            bad = 0
            for i, res in enumerate(results):
                lat = np.array(res["latency_s"]) * 1e3
                p50 = f"{np.percentile(lat, 50):.2f}" if lat.size else "-"
                print(f"ranker {i}: {res['ok']}/{args.batches} batches, p50 {p50} ms, "
                      f"max |score - numpy| {res['max_abs_err']:.1e}, errors {len(res['errors'])}")
                bad += len(res["errors"]) + (res["max_abs_err"] > 1e-4)
            if args.keep:
                print("serving; Ctrl-C stops")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            return 1 if bad else 0
        finally:
            dep.shutdown()
    finally:
        if owns:
            ray.shutdown()


def run(args) -> int:
    from .config import (ConfigError, assign_ports, load_config, make_config, save_config,
                         unassigned_servers)

    try:
        if args.serve_cmd == "config":
            skew = [float(x) for x in args.skew.split(",")] if args.skew else None
            if args.torchrec:
                from .torchrec_checkpoint import CheckpointError
                from .torchrec_model import config_from_checkpoint
                try:
                    cfg = config_from_checkpoint(args.torchrec, args.servers, replicas=args.replicas, dim=args.dim,
                                                 host=args.host)
                except CheckpointError as exc:
                    raise ConfigError(str(exc)) from None
            else:
                cfg = make_config(args.tables, args.rows, args.dim, args.servers, replicas=args.replicas,
                                  skew=skew, host=args.host)
            assign_ports(cfg, args.base_port)
            save_config(cfg, args.output)
            print(f"wrote {args.output}: " + ", ".join(f"{s} {i['host']}:{i['port']}"
                                                       for s, i in cfg["servers"].items()))
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
        if args.serve_cmd == "echo":
            from .message_server import run_echo_server
            from .rdma import RdmaUnavailable
            try:
                return run_echo_server(args.host, args.port, provider=args.provider)
            except RdmaUnavailable as exc:
                print(f"evssd serve echo: {exc}", file=sys.stderr)
                return 2
        if args.serve_cmd == "ranker":
            cfg = load_config(args.config)
            missing = unassigned_servers(cfg)
            if missing:
                raise ConfigError(f"servers {missing} have port 0 (any port), so a ranker cannot reach them: "
                                  f"give them ports (`evssd serve config` does) or use the launcher's config")
            return _rank(cfg, args, check=False)
        if args.serve_cmd == "ray":
            return _ray(args)
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
