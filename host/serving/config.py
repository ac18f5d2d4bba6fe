"""Cluster configuration: which rows of which table live on which embedding server.

JSON (or TOML, by file extension)::

    {
      "dim": 16,
      "tables":  {"t0": {"rows": 100000, "seed": 0}, "t1": {"rows": 5000, "npy": "t1.npy"}},
      "servers": {"s0": {"host": "127.0.0.1", "port": 7001}, "s1": {"host": "127.0.0.1", "port": 0}},
      "shards":  [{"table": "t0", "rows": [0, 50000], "servers": ["s0", "s1"]},
                  {"table": "t0", "rows": [50000, 100000], "servers": ["s1"]},
                  {"table": "t1", "rows": [0, 5000], "servers": ["s0"]}]
    }

A shard is a row range ``[lo, hi)``; its ``servers`` list is primary first, then replicas. The
shards of a table must tile ``[0, rows)`` exactly. A server may hold several ranges of a table
(primary of one, replica of another).
Table contents come from an ``.npy`` file, a TorchRec EBC checkpoint (``"torchrec": "ebc.pt"``, see
:mod:`.torchrec_checkpoint`) or, for tests and demos, from a seeded generator that can produce any row
range without producing the rest (so a server makes only its shards).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

__all__ = ["ConfigError", "load_config", "validate_config", "make_config", "table_rows",
           "server_shards", "save_config", "assign_ports", "unassigned_servers"]

_CHUNK = 4096


class ConfigError(ValueError):
    pass


def load_config(path) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        cfg = tomllib.loads(text)
    else:
        cfg = json.loads(text)
    cfg.setdefault("_base", str(path.parent))
    return validate_config(cfg)


def save_config(cfg: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=1))
    return path


def validate_config(cfg: dict) -> dict:
    for key in ("dim", "tables", "servers", "shards"):
        if key not in cfg:
            raise ConfigError(f"config lacks {key!r}")
    dim = cfg["dim"]
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim must be a positive integer, got {dim!r}")
    for name, t in cfg["tables"].items():
        if not isinstance(t.get("rows"), int) or t["rows"] < 1:
            raise ConfigError(f"table {name!r}: rows must be a positive integer, got {t.get('rows')!r}")
    for name, s in cfg["servers"].items():
        if "host" not in s or "port" not in s:
            raise ConfigError(f"server {name!r} needs host and port")
    ranges: dict[str, list] = {t: [] for t in cfg["tables"]}
    for i, sh in enumerate(cfg["shards"]):
        t = sh.get("table")
        if t not in cfg["tables"]:
            raise ConfigError(f"shard {i}: unknown table {t!r}")
        lo, hi = sh.get("rows", [None, None])
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= cfg["tables"][t]["rows"]):
            raise ConfigError(f"shard {i}: rows {sh.get('rows')!r} not a range inside table {t!r}")
        if not sh.get("servers"):
            raise ConfigError(f"shard {i}: no servers")
        for s in sh["servers"]:
            if s not in cfg["servers"]:
                raise ConfigError(f"shard {i}: unknown server {s!r}")
        ranges[t].append((lo, hi))
    for t, rs in ranges.items():
        rs.sort()
        end = 0
        for lo, hi in rs:
            if lo != end:
                raise ConfigError(f"table {t!r}: shards leave a gap or overlap at row {min(lo, end)}")
            end = hi
        if end != cfg["tables"][t]["rows"]:
            raise ConfigError(f"table {t!r}: shards end at row {end}, table has {cfg['tables'][t]['rows']}")
    return cfg


def table_rows(cfg: dict, table: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``table`` as float32 ``[hi-lo, dim]``."""
    t = cfg["tables"][table]
    hi = t["rows"] if hi is None else hi
    if "torchrec" in t:   # a TorchRec EBC checkpoint (the torch extra)
        from .torchrec_checkpoint import checkpoint_rows
        return checkpoint_rows(cfg, table, lo, hi)
    if "npy" in t:
        p = Path(t["npy"])
        if not p.is_absolute():
            p = Path(cfg.get("_base", ".")) / p
        arr = np.load(p, mmap_mode="r")
        return np.ascontiguousarray(arr[lo:hi], dtype=np.float32)
    dim = cfg["dim"]
    seed = int(t.get("seed", 0))
    out = np.empty((hi - lo, dim), dtype=np.float32)
    c0, c1 = lo // _CHUNK, (hi - 1) // _CHUNK
    for c in range(c0, c1 + 1):
        rng = np.random.default_rng([seed, c])
        n = min(_CHUNK, t["rows"] - c * _CHUNK)
        block = (rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.1))
        a, b = max(lo, c * _CHUNK), min(hi, c * _CHUNK + n)
        out[a - lo:b - lo] = block[a - c * _CHUNK:b - c * _CHUNK]
    return out


def server_shards(cfg: dict, server: str) -> dict[str, list[tuple[int, int]]]:
    """Table -> sorted (lo, hi) ranges held by ``server`` (as primary or replica)."""
    out: dict[str, list] = {}
    for sh in cfg["shards"]:
        if server in sh["servers"]:
            out.setdefault(sh["table"], []).append(tuple(sh["rows"]))
    for rs in out.values():
        rs.sort()
    return out


def make_config(n_tables: int = 4, rows: int = 20000, dim: int = 16, n_servers: int = 2, *,
                replicas: int = 0, skew: list[float] | None = None, host: str = "127.0.0.1") -> dict:
    """Every table split into ``n_servers`` row ranges (sizes proportional to ``skew``), range i
    of every table on server i, plus ``replicas`` copies on the next servers."""
    if replicas >= n_servers and replicas:
        raise ConfigError(f"{replicas} replicas need more than {n_servers} servers")
    w = np.asarray(skew if skew is not None else [1.0] * n_servers, dtype=np.float64)
    if w.size != n_servers or (w <= 0).any():
        raise ConfigError(f"skew needs {n_servers} positive weights, got {skew!r}")
    cuts = np.round(np.concatenate([[0], np.cumsum(w) / w.sum()]) * rows).astype(int)
    cfg = {"dim": dim, "tables": {}, "servers": {}, "shards": []}
    for s in range(n_servers):
        cfg["servers"][f"s{s}"] = {"host": host, "port": 0}
    for t in range(n_tables):
        name = f"t{t}"
        cfg["tables"][name] = {"rows": rows, "seed": 1000 + t}
        for i in range(n_servers):
            lo, hi = int(cuts[i]), int(cuts[i + 1])
            if hi <= lo:
                continue
            # skewed weights map to the same server for every table, so one server gets more rows
            owners = [f"s{(i + k) % n_servers}" for k in range(replicas + 1)]
            cfg["shards"].append({"table": name, "rows": [lo, hi], "servers": owners})
    return validate_config(copy.deepcopy(cfg))


def assign_ports(cfg: dict, base: int | None = None) -> dict:
    """Give every server a usable port, in place: ``base``, ``base + 1``, ... or, without
    ``base``, ports the kernel reports free on each server's host right now (all held open
    together while choosing, so they are distinct). A port found free can be taken by another
    program before the server starts; it then fails to bind with an error naming the port."""
    import socket

    names = list(cfg["servers"])
    if base is not None:
        if not 1 <= base <= 65535 - len(names) + 1:
            raise ConfigError(f"base port {base} leaves no room for {len(names)} servers below 65536")
        for i, s in enumerate(names):
            cfg["servers"][s]["port"] = base + i
        return cfg
    held = []
    try:
        for s in names:
            host = cfg["servers"][s]["host"]
            try:
                sock = socket.create_server((host, 0))
            except OSError as exc:
                raise ConfigError(f"server {s!r}: cannot find a free port on {host}: {exc}") from exc
            held.append(sock)
            cfg["servers"][s]["port"] = sock.getsockname()[1]
    finally:
        for sock in held:
            sock.close()
    return cfg


def unassigned_servers(cfg: dict) -> list[str]:
    """Servers whose port is 0 (bind anywhere): a ranker cannot find them from the config."""
    return [s for s, info in cfg["servers"].items() if int(info["port"]) == 0]
