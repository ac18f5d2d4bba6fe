"""The verbs provider's code paths against a simulated NIC.

This machine has no RDMA, so a small in-process stand-in for the parts of pyverbs the provider
uses (device list, PD, MR, CQ, RC QP state changes, SEND/RECV/RDMA READ work requests) is put
in ``sys.modules``. It checks our side of the contract -- bounce buffers, framing of request ids,
completion handling, the engine's polled (fd-less) path, one-sided READs by remote address --
not pyverbs itself, which only a host with an RDMA NIC can.
"""
import itertools
import sys
import threading
import types
from collections import deque

import numpy as np
import pytest

from evssd.host.serving import protocol as P
from evssd.host.serving.config import make_config, table_rows
from evssd.host.serving.engine import Engine
from evssd.host.serving.ranker import Ranker, local_pooled, synthetic_batch
from evssd.host.serving.providers import get_provider


def _fake_pyverbs():
    e = types.SimpleNamespace(
        IBV_ACCESS_LOCAL_WRITE=1, IBV_ACCESS_REMOTE_READ=4, IBV_QPT_RC=2, IBV_QPS_INIT=1,
        IBV_WC_SUCCESS=0, IBV_WC_REM_ACCESS_ERR=10, IBV_WC_RECV=128, IBV_WC_RDMA_READ=2,
        IBV_WC_SEND=0, IBV_SEND_SIGNALED=2, IBV_WR_SEND=2, IBV_WR_RDMA_READ=4)
    lock = threading.RLock()
    memory = {}                     # base address -> bytearray
    mrs = {}                        # rkey -> MR
    qps = {}                        # qp_num -> QP
    addrs = itertools.count(1 << 20, 1 << 32)
    keys = itertools.count(100)
    qpns = itertools.count(7)

    def mem(addr, n):
        for base, buf in memory.items():
            if base <= addr and addr + n <= base + len(buf):
                return buf, addr - base
        raise RuntimeError(f"simulated NIC: bad address {addr:#x}+{n}")

    class Device:
        def __init__(self, name):
            self.name = name

    class PortAttr:
        def __init__(self, lid):
            self.lid = lid

    class GID:
        def __init__(self, val=None):
            self.gid = val

    class Context:
        def __init__(self, name):
            self.name = name

        def query_port(self, port):
            return PortAttr(1)

        def query_gid(self, port, index):
            return GID("fe80:0000:0000:0000:0000:0000:0000:0001")

    class PD:
        def __init__(self, ctx):
            self.ctx = ctx

    class MR:
        def __init__(self, pd, length, access):
            with lock:
                self.buf = next(addrs)
                memory[self.buf] = bytearray(length)
                self.lkey = self.rkey = next(keys)
                self.access = access
                mrs[self.rkey] = self

        def write(self, data, length, offset=0):
            memory[self.buf][offset:offset + length] = data[:length]

        def read(self, length, offset):
            return bytes(memory[self.buf][offset:offset + length])

    class WC:
        def __init__(self, wr_id, opcode, status=0, byte_len=0):
            self.wr_id, self.opcode, self.status, self.byte_len = wr_id, opcode, status, byte_len

    class CQ:
        def __init__(self, ctx, cqe, cq_context, channel, comp_vector):
            self.q = deque()

        def poll(self, n):
            with lock:
                out = [self.q.popleft() for _ in range(min(n, len(self.q)))]
            return len(out), out

        def close(self):
            pass

    class QPCap:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class QPInitAttr:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class QPAttr:
        def __init__(self, qp_state=None):
            self.qp_state = qp_state
            self.ah_attr = None

    class QP:
        def __init__(self, pd, init):
            self.cq = init.scq
            self.qp_num = next(qpns)
            self.recvs = deque()
            self.rnr = deque()          # SENDs that found no receive posted (RNR, retried)
            self.dest = None
            self.state = "RESET"
            qps[self.qp_num] = self

        def to_init(self, attr):
            assert self.state == "RESET"
            self.state = "INIT"

        def to_rtr(self, attr):
            assert self.state == "INIT" and attr.ah_attr is not None
            self.dest = attr.dest_qp_num
            self.state = "RTR"

        def to_rts(self, attr):
            assert self.state == "RTR"
            self.state = "RTS"

        def post_recv(self, wr):
            with lock:
                self.recvs.append(wr)
                # rnr_retry = 7 retries for ever: a SEND that met an empty receive queue lands
                # now; its sender sees the completion only then (its buffer stays owned)
                while self.rnr and self.recvs:
                    sender, swr = self.rnr.popleft()
                    sender._deliver(self, swr)

        def _deliver(self, peer, wr):
            sge = wr.sg[0]
            src, off = mem(sge.addr, sge.length)
            rwr = peer.recvs.popleft()
            dst, doff = mem(rwr.sg[0].addr, sge.length)
            dst[doff:doff + sge.length] = src[off:off + sge.length]
            peer.cq.q.append(WC(rwr.wr_id, e.IBV_WC_RECV, 0, sge.length))
            self.cq.q.append(WC(wr.wr_id, e.IBV_WC_SEND))

        def post_send(self, wr):
            assert self.state == "RTS", "post_send before RTS"
            sge = wr.sg[0]
            with lock:
                src, off = mem(sge.addr, sge.length)
                if wr.opcode == e.IBV_WR_SEND:
                    peer = qps[self.dest]
                    if peer.recvs and not peer.rnr:
                        self._deliver(peer, wr)
                    else:                                # receiver not ready: RNR NAK, retried
                        peer.rnr.append((self, wr))
                else:                                    # RDMA READ: remote addr + rkey
                    mr = mrs.get(wr.rkey)
                    try:
                        if mr is None:
                            raise RuntimeError("bad rkey")
                        rsrc, roff = mem(wr.raddr, sge.length)
                        if not (mr.buf <= wr.raddr and wr.raddr + sge.length <= mr.buf + len(memory[mr.buf])):
                            raise RuntimeError("outside the region")
                    except RuntimeError:
                        self.cq.q.append(WC(wr.wr_id, e.IBV_WC_RDMA_READ, e.IBV_WC_REM_ACCESS_ERR))
                        return
                    src[off:off + sge.length] = rsrc[roff:roff + sge.length]
                    self.cq.q.append(WC(wr.wr_id, e.IBV_WC_RDMA_READ, 0, sge.length))

        def close(self):
            pass

    class SGE:
        def __init__(self, addr, length, lkey):
            self.addr, self.length, self.lkey = addr, length, lkey

    class SendWR:
        def __init__(self, wr_id, opcode, num_sge, sg, send_flags=0):
            self.wr_id, self.opcode, self.sg = wr_id, opcode, sg

        def set_wr_rdma(self, rkey, addr):
            self.rkey, self.raddr = rkey, addr

    class RecvWR:
        def __init__(self, wr_id, num_sge, sg):
            self.wr_id, self.sg = wr_id, sg

    class AHAttr:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class GlobalRoute:
        def __init__(self, dgid=None, sgid_index=0):
            self.dgid, self.sgid_index = dgid, sgid_index
            self.hop_limit = 1

    mods = {
        "device": dict(get_device_list=lambda: [Device(b"simnic0")], Context=Context, Device=Device,
                       PortAttr=PortAttr),
        "enums": vars(e), "pd": dict(PD=PD), "mr": dict(MR=MR), "cq": dict(CQ=CQ, WC=WC),
        "qp": dict(QPCap=QPCap, QPInitAttr=QPInitAttr, QPAttr=QPAttr, QP=QP),
        "wr": dict(SGE=SGE, SendWR=SendWR, RecvWR=RecvWR),
        "addr": dict(AHAttr=AHAttr, GID=GID, GlobalRoute=GlobalRoute),
    }
    pkg = types.ModuleType("pyverbs")
    pkg.__path__ = []
    out = {"pyverbs": pkg}
    for name, attrs in mods.items():
        m = types.ModuleType(f"pyverbs.{name}")
        m.__dict__.update(attrs)
        setattr(pkg, name, m)
        out[f"pyverbs.{name}"] = m
    return out


@pytest.fixture
def simnic(monkeypatch):
    for k, v in _fake_pyverbs().items():
        monkeypatch.setitem(sys.modules, k, v)


def test_engine_and_ranker_over_verbs_provider(simnic):
    from evssd.host.serving.server import EmbeddingServer
    cfg = make_config(2, 2000, 8, 2)
    servers = [EmbeddingServer(cfg, s, provider="verbs", host="127.0.0.1", port=0, credits=16)
               for s in cfg["servers"]]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for s, t in zip(servers, threads):
        cfg["servers"][s.name]["port"] = s.address[1]
        t.start()
    try:
        with Engine(get_provider("verbs"), 2, credits=16, request_timeout=10) as eng:
            # SEND/RECV and one-sided READ at the region's virtual address
            conn = eng.connect("s0", "127.0.0.1", cfg["servers"]["s0"]["port"])
            assert type(conn.qp).__name__ == "VerbsQueuePair" and conn.qp.qp.state == "RTS"
            meta = eng.request(conn, P.encode_request(P.Request(P.MsgType.META))).result(10)["tables"]["t0"]
            assert meta["addr"] != 0
            lo, hi, first = meta["ranges"][0]
            t0 = table_rows(cfg, "t0")
            raw = eng.read_rows(conn, meta["rkey"], meta["addr"] + np.arange(3) * 32, 32).result(10)
            np.testing.assert_array_equal(raw.view(np.float32).reshape(3, 8), t0[lo:lo + 3])
            with pytest.raises(P.RemoteError, match="READ failed"):
                eng.read(conn, meta["rkey"], meta["addr"] + (hi - lo) * 32, 32).result(10)
            eng.close_connection(conn)
            for fetch in ("pooled", "rows"):
                r = Ranker(cfg, eng, fetch=fetch, timeout=10) if fetch == "pooled" else \
                    Ranker(cfg, Engine(get_provider("verbs"), 1, request_timeout=10), fetch=fetch, timeout=10)
                _, sparse = synthetic_batch(cfg, 16, 4, np.random.default_rng(1))
                for g, w in zip(r.embeddings(sparse), local_pooled(cfg, sparse)):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
                if fetch == "rows":
                    r.engine.close()
                else:
                    for c in list(eng.connections.values()):
                        eng.close_connection(c)
    finally:
        for s in servers:
            s.close()
        for t in threads:
            t.join(5)
