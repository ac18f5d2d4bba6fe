"""Ray as the control plane of a deployment; the evssd engine stays the data plane.

Ray places, finds and restarts processes; it never carries a lookup (an actor call costs about
0.6 ms here, a batch's requests go over the engine's queue pairs).

* **Placement by shard**: each embedding server is a Ray actor (:class:`ServerActor`, zero
  CPUs: it is I/O and memory bound). It goes to the node that offers the custom resource
  ``evssd_<server>`` (``ray start --resources '{"evssd_s0": 1}'``) if any does; else, with
  node affinity, to the node whose IP is the server's ``host`` in the config; else wherever
  Ray spreads it. The placement used is reported per server.
* **Publishing**: every server actor is named ``evssd-<server>`` in the Ray namespace; its
  :meth:`ServerActor.info` gives the address it listens on (the node's IP, a free port) and
  its META (tables, row ranges, memory keys for one-sided READs). Rankers inside or outside
  Ray resolve servers through it; :meth:`RayDeployment.config` writes a plain config file
  with the published addresses for rankers started by hand.
* **Restarts**: server actors have ``max_restarts``; when a server process dies Ray starts a
  new one (new port, new memory keys). Rankers find it again with the resolver
  (:func:`resolver`): their reconnect with backoff asks the actor where the server is now.
* **Rankers**: :meth:`RayDeployment.start_rankers` starts :class:`RankerActor` s, each with
  its own engine and ranker, resolving servers through the named actors.

Ray is optional: this module imports it only when used (``pip install 'evssd[ray]'``).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

__all__ = ["RayDeployment", "ServerActor", "RankerActor", "resolver", "require_ray", "RESOURCE_PREFIX"]

RESOURCE_PREFIX = "evssd_"
ACTOR_PREFIX = "evssd-"


def require_ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(f"`evssd serve ray` needs Ray (pip install 'evssd[ray]'): {exc}") from None
    return ray


class ServerActor:
    """One embedding server in a Ray worker process; serves on its own threads."""

    def __init__(self, cfg: dict, name: str, backend: str = "dram", provider: str = "tcp",
                 port: int = 0, credits: int = 32):
        ray = require_ray()
        from .server import EmbeddingServer, limit_heap_retention
        limit_heap_retention()
        self.ip = ray.util.get_node_ip_address()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.server = EmbeddingServer(cfg, name, provider=provider, backend=backend, host=self.ip,
                                      port=port, credits=credits)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="evssd-server-accept")
        self.thread.start()
        self.started = time.time()

    def info(self) -> dict:
        host, port = self.server.address
        return {"server": self.server.name, "host": host, "port": port, "node_id": self.node_id,
                "pid": os.getpid(), "started": self.started, "meta": self.server.meta()}

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.server.close()


def resolver(ray, handles: dict, timeout: float = 5.0):
    """``name -> (host, port)`` through the server actors: where a server is *now* (after a
    restart Ray blocks the call until the new process is up, bounded by ``timeout``)."""
    def resolve(name):
        info = ray.get(handles[name].info.remote(), timeout=timeout)
        return info["host"], info["port"]
    return resolve


class RankerActor:
    """A ranker with its own engine; finds servers through the named server actors."""

    def __init__(self, cfg: dict, server_names: list, threads: int = 1, timeout: float = 5.0,
                 fetch: str = "pooled", seed: int = 0):
        ray = require_ray()
        from .engine import Engine
        from .providers import get_provider
        from .ranker import DLRM, Ranker
        handles = {s: ray.get_actor(ACTOR_PREFIX + s) for s in server_names}
        self.cfg = cfg
        self.model = DLRM(13, cfg["dim"], len(cfg["tables"]), seed=seed)
        self.engine = Engine(get_provider("tcp"), threads, request_timeout=timeout)
        self.ranker = Ranker(cfg, self.engine, self.model, fetch=fetch, timeout=timeout,
                             resolve=resolver(ray, handles, timeout), reconnect_backoff=(0.05, 1.0))
        self.seed = seed

    def run(self, batches: int, batch_size: int = 32, pooling: int = 8, check: bool = True) -> dict:
        """Rank ``batches`` synthetic batches; per batch its latency, or the error it failed with."""
        from .ranker import ServingError, local_pooled, synthetic_batch
        rng = np.random.default_rng(self.seed)
        lat, errors, worst = [], [], 0.0
        for _ in range(batches):
            dense, sparse = synthetic_batch(self.cfg, batch_size, pooling, rng)
            t0 = time.perf_counter()
            try:
                scores = self.ranker.score(dense, sparse)
            except ServingError as exc:
                errors.append(str(exc))
                continue
            lat.append(time.perf_counter() - t0)
            if check:
                ref = self.model.forward(dense, local_pooled(self.cfg, sparse))
                worst = max(worst, float(np.max(np.abs(ref - scores))))
        return {"ok": len(lat), "errors": errors, "latency_s": lat, "max_abs_err": worst,
                "reconnects": self.ranker.reconnects, "retries": self.ranker.retries,
                "node_id": require_ray().get_runtime_context().get_node_id()}

    def close(self) -> None:
        self.engine.close()


class RayDeployment:
    """Embedding servers of ``cfg`` as Ray actors, placed by shard; see the module docstring."""

    def __init__(self, cfg: dict, *, backend: str = "dram", max_restarts: int = 10,
                 startup_timeout: float = 60.0, credits: int = 32):
        if max_restarts < -1:
            raise ValueError(f"max_restarts must be >= -1 (-1: unlimited), got {max_restarts}")
        self.ray = require_ray()
        if not self.ray.is_initialized():
            raise RuntimeError("connect to a Ray cluster first (ray.init(address=...))")
        self.cfg = cfg
        self.backend = backend
        self.max_restarts = max_restarts
        self.startup_timeout = startup_timeout
        self.credits = credits
        self.handles: dict = {}
        self.placement: dict[str, str] = {}
        self.rankers: list = []

    def _options(self, name: str) -> dict:
        ray = self.ray
        opts = {"name": ACTOR_PREFIX + name, "num_cpus": 0, "max_restarts": self.max_restarts,
                "max_task_retries": 0}
        res = RESOURCE_PREFIX + name
        if ray.cluster_resources().get(res, 0) > 0:
            opts["resources"] = {res: 0.001}
            self.placement[name] = f"resource {res}"
            return opts
        host = self.cfg["servers"][name]["host"]
        nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == host]
        if len(nodes) == 1:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[0]["NodeID"], soft=False)
            self.placement[name] = f"node {host}"
            return opts
        opts["scheduling_strategy"] = "SPREAD"
        self.placement[name] = "spread (no evssd_<server> resource, no node with the config's host)"
        return opts

    def start(self) -> "RayDeployment":
        ray = self.ray
        actor = ray.remote(ServerActor)
        try:
            for name in self.cfg["servers"]:
                self.handles[name] = actor.options(**self._options(name)).remote(
                    self.cfg, name, self.backend, "tcp", 0, self.credits)
            self.infos()
        except BaseException:
            self.shutdown()
            raise
        return self

    def infos(self) -> dict:
        """Published per server: address, node, pid, META with memory keys."""
        ray = self.ray
        refs = {s: h.info.remote() for s, h in self.handles.items()}
        return {s: ray.get(r, timeout=self.startup_timeout) for s, r in refs.items()}

    def config(self) -> dict:
        """The config with the published addresses (for rankers started outside Ray)."""
        import copy
        cfg = copy.deepcopy(self.cfg)
        for s, info in self.infos().items():
            cfg["servers"][s]["host"], cfg["servers"][s]["port"] = info["host"], info["port"]
        return cfg

    def resolver(self, timeout: float = 5.0):
        return resolver(self.ray, self.handles, timeout)

    def kill_server(self, name: str) -> None:
        """Kill server ``name``'s process (as a crash would); Ray restarts it."""
        self.ray.kill(self.handles[name], no_restart=False)

    def start_rankers(self, n: int, **kw) -> list:
        actor = self.ray.remote(RankerActor)
        new = [actor.options(num_cpus=0).remote(self.cfg, list(self.cfg["servers"]), seed=i, **kw)
               for i in range(n)]
        self.rankers += new
        return new

    def shutdown(self) -> None:
        ray = self.ray
        for h in self.rankers:
            try:
                ray.get(h.close.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(h, no_restart=True)
        for h in self.handles.values():
            try:
                ray.get(h.stop.remote(), timeout=10)
            except Exception:
                pass           # already dead: kill below
            ray.kill(h, no_restart=True)
        self.rankers, self.handles = [], {}
