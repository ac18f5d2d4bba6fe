"""The embedding server: holds table shards and answers requests over an RDMA provider.

Per table a server holds one or more row ranges ``[lo, hi)`` (see :mod:`.config`), stacked
into one array per table, in an :class:`evssd.host.store.EmbeddingStore` (any backend) and, for
the one-sided path, registers the same array as a memory region so rankers can READ rows
without the server's threads doing work beyond the provider's.

Requests (indices are global row ids of the table):

* META -> JSON: the server's name, and per table ``ranges`` (``[lo, hi, first local row]``),
  ``dim``, ``rkey``, ``addr``, ``row_bytes`` (row ``i`` of range k is READ at
  ``addr + (i - lo + first) * row_bytes``);
* GATHER(table, indices) -> float32 ``[n, dim]``;
* POOLED(table, indices, offsets[B+1]) -> float32 ``[B, dim]``: hierarchical pooling, the sum of
  this server's rows of each bag (the ranker adds the partial sums of all shards);
* ECHO(payload) -> payload (engine overhead measurements);
* MULTI(requests) -> one reply holding each sub-request's reply (OK or ERR each): a ranker sends
  one message per server per batch instead of one per table.

A bad request (unknown table, index outside the server's range, malformed offsets, malformed
message) gets an ERR reply naming the problem and the connection stays up. A bad frame (magic,
version, length) gets an ERROR frame and the connection is closed: the stream cannot be trusted.
"""
from __future__ import annotations

import ctypes
import tempfile
import threading

import numpy as np

from . import protocol as P
from .config import server_shards, table_rows
from .message_server import READY_PREFIX, MessageServer, serve_until_signalled
from .providers import get_provider

__all__ = ["EmbeddingServer", "READY_PREFIX"]

# message types as module constants: an enum attribute lookup costs as much as a request's parsing
_MULTI, _ECHO, _META, _GATHER, _POOLED = (P.MsgType.MULTI, P.MsgType.ECHO, P.MsgType.META,
                                          P.MsgType.GATHER, P.MsgType.POOLED)
_ECHO_INT = int(_ECHO)


class EmbeddingServer(MessageServer):
    def __init__(self, cfg: dict, name: str, *, provider: str = "tcp", backend: str = "dram",
                 host: str | None = None, port: int | None = None, credits: int = 32,
                 max_message: int = 4 << 20, store_path: str | None = None,
                 max_connections: int = 64, handshake_timeout: float = 5.0):
        from evssd.host.store import EmbeddingStore

        if name not in cfg["servers"]:
            raise ValueError(f"server {name!r} is not in the config (servers: {sorted(cfg['servers'])})")
        self.name = name
        self.cfg = cfg
        self.ranges = server_shards(cfg, name)
        if not self.ranges:
            raise ValueError(f"server {name!r} holds no shard")
        self.arrays, self._los, self._his, self._starts = {}, {}, {}, {}
        for t, rs in self.ranges.items():
            parts = [table_rows(cfg, t, lo, hi) for lo, hi in rs]
            self.arrays[t] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self._los[t] = np.array([lo for lo, _ in rs], dtype=np.int64)
            self._his[t] = np.array([hi for _, hi in rs], dtype=np.int64)
            self._starts[t] = np.concatenate([[0], np.cumsum(self._his[t] - self._los[t])[:-1]])
        self._tmp = None
        kw = {}
        if backend in ("file", "rocksdb"):
            if store_path is None:
                self._tmp = tempfile.TemporaryDirectory(prefix=f"evssd-{name}-")
                store_path = self._tmp.name
            kw["path"] = store_path
        self.store = EmbeddingStore.from_arrays(self.arrays, backend=backend, **kw)
        for t in self.arrays:     # compile the store's jitted kernels before we say we are ready
            self.store.gather(t, np.zeros(1, dtype=np.int64))
            self.store.pooled(t, np.zeros(2, dtype=np.int64), np.array([0, 0, 2]), mode="sum")
        self._store_lock = threading.Lock()
        provider = get_provider(provider)
        self.mrs = {t: provider.reg_mr(a) for t, a in self.arrays.items()}
        scfg = cfg["servers"][name]
        super().__init__(provider, host or scfg["host"], scfg["port"] if port is None else port, name=name,
                         credits=credits, max_message=max_message, max_connections=max_connections,
                         handshake_timeout=handshake_timeout)
        self.requests = 0

    # -------------------------------------------------------------- request handling
    def meta(self) -> dict:
        return {"server": self.name, "tables": {
            t: {"ranges": [[int(lo), int(hi), int(st)] for lo, hi, st in
                           zip(self._los[t], self._his[t], self._starts[t])],
                "dim": int(self.arrays[t].shape[1]), "rkey": self.mrs[t].rkey, "addr": int(self.mrs[t].addr),
                "row_bytes": int(self.arrays[t].shape[1] * 4)}
            for t in self.ranges}}

    def _local(self, req: P.Request) -> np.ndarray:
        if req.table not in self.ranges:
            raise LookupError(f"server {self.name} holds no shard of table {req.table!r} "
                              f"(it holds {sorted(self.ranges)})")
        t = req.table
        los, his = self._los[t], self._his[t]
        idx = req.indices
        k = np.searchsorted(los, idx, side="right") - 1
        bad = (k < 0) | (idx >= his[np.maximum(k, 0)])
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            held = ", ".join(f"[{lo}, {hi})" for lo, hi in self.ranges[t])
            raise IndexError(f"table {t!r}: index {int(idx[pos])} at position {pos} is "
                             f"outside the rows {held} held by server {self.name}")
        return idx - los[k] + self._starts[t][k]

    def handle(self, data) -> bytes:
        """The encoded reply to one encoded request (``data``: any bytes-like object)."""
        self.requests += 1
        try:
            data = memoryview(data).cast("B")     # its items are ints: cheap type checks below
            if len(data) and data[0] == _ECHO_INT:
                return P.echo_reply(data)
            if len(data) and data[0] == _MULTI:
                return P.encode_ok_multi([self.handle(sub) for sub in P.decode_multi(data)])
            req = P.decode_request(data)
            typ = req.type
            if typ is _META:
                return P.encode_ok_json(self.meta())
            local = self._local(req)
            if typ is _GATHER:
                with self._store_lock:
                    rows = self.store.gather(req.table, local)
                return P.encode_ok_array(rows)
            if typ is _POOLED:
                off = req.offsets
                if off.size < 1 or off[0] != 0 or off[-1] != local.size or (np.diff(off) < 0).any():
                    raise ValueError(f"table {req.table!r}: offsets must rise from 0 to {local.size} "
                                     f"(got {off.size} offsets)")
                with self._store_lock:
                    pooled = self.store.pooled(req.table, local, off, mode="sum")
                return P.encode_ok_array(pooled)
            raise P.ProtocolError(f"request type {req.type.name} not served here")
        except (P.ProtocolError, LookupError, ValueError) as exc:
            return P.encode_err(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a server bug must not kill the connection silently
            return P.encode_err(f"internal error: {type(exc).__name__}: {exc}")

    def close(self):
        super().close()
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def limit_heap_retention() -> None:
    """glibc keeps freed large blocks in the heap once its adaptive mmap threshold has grown
    (it grows after the first multi-MiB free), so RSS never returns after 4 MiB messages.
    Pinning the threshold makes every block >= 1 MiB its own mapping, unmapped on free (not
    lower: the 256 KiB receive chunk of every message would then cost an mmap and a munmap).
    No-op off glibc."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 20)


def run_server(cfg: dict, name: str, **kw) -> int:
    """Process entry: build, announce readiness on stdout, serve until SIGTERM/SIGINT."""
    limit_heap_retention()
    server = EmbeddingServer(cfg, name, **kw)
    return serve_until_signalled(server, {"server": name, "tables": server.ranges})
