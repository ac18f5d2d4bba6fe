"""The ``verbs`` provider: RC queue pairs over an RDMA NIC through pyverbs (rdma-core).

pyverbs is imported here and only here, when a ``verbs`` provider is created, so the rest of
evssd runs on hosts without rdma-core. Without the module or without a device the constructor
raises :class:`~.rdma.RdmaUnavailable` with what to do instead.

Connection set-up uses a TCP side channel (the listener's port) to swap queue-pair numbers,
LIDs/GIDs, PSNs and receive depths, then moves both queue pairs RESET -> INIT -> RTR -> RTS.
Data moves only through the NIC: SEND/RECV for requests and replies, RDMA READ (one-sided) into
local registered buffers. A READ names the remote virtual address: the region's ``addr``
travels with its rkey in the server's META reply (the tcp provider's regions have ``addr`` 0, so
there it is a plain offset). The server side busy-polls its completion queue.

Status: written against the pyverbs API of rdma-core >= 40 but never run on an RDMA NIC (this
machine's kernel has no RDMA support). Tests cover the unavailable paths and run this module's
code against a simulated NIC (tests/test_serving_verbs_sim.py), which checks our side only.
"""
from __future__ import annotations

import json
import socket
import struct
import time

from . import protocol as P
from .rdma import (Listener, MemoryRegion, Opcode, Provider, QueuePair, RdmaUnavailable, recv_exact_by,
                   WorkCompletion)

__all__ = ["VerbsProvider", "load_pyverbs"]

_HINT = "no RDMA: install rdma-core's python3-pyverbs or use the tcp provider (--provider tcp)"


def load_pyverbs():
    """Import pyverbs and return (modules, device list); raise RdmaUnavailable otherwise."""
    try:
        import pyverbs.device as d
        import pyverbs.enums as e
        from pyverbs import cq, mr, pd, qp, wr
    except ImportError as exc:
        raise RdmaUnavailable(f"{_HINT} (import pyverbs failed: {exc})") from None
    try:
        devices = d.get_device_list()
    except Exception as exc:  # pyverbs raises PyverbsRDMAError when the kernel lacks ib_uverbs
        raise RdmaUnavailable(f"{_HINT} (no RDMA device: {exc})") from None
    if not devices:
        raise RdmaUnavailable(f"{_HINT} (pyverbs found no RDMA device)")
    return (d, e, cq, mr, pd, qp, wr), devices


class _VerbsMR(MemoryRegion):
    def __init__(self, mod, pd, buf, access):
        super().__init__(buf, 0)
        self._mr = mod.MR(pd, max(self.length, 1), access)
        self._mr.write(bytes(self.buf), self.length)
        self.rkey = self._mr.rkey
        self.lkey = self._mr.lkey
        self.addr = self._mr.buf


class VerbsProvider(Provider):
    name = "verbs"

    def __init__(self, device: str | None = None, port: int = 1, gid_index: int = 0):
        (self._d, self._e, self._cq, self._mrmod, self._pdmod, self._qp, self._wr), devices = load_pyverbs()
        names = [dev.name.decode() if isinstance(dev.name, bytes) else dev.name for dev in devices]
        if device is None:
            device = names[0]
        elif device not in names:
            raise RdmaUnavailable(f"RDMA device {device!r} not found; devices here: {names}")
        self.ctx = self._d.Context(name=device)
        self.pd = self._pdmod.PD(self.ctx)
        self.port = port
        self.gid_index = gid_index

    def reg_mr(self, buf) -> MemoryRegion:
        e = self._e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
        return _VerbsMR(self._mrmod, self.pd, buf, access)

    # --- connection set-up
    def _new_qp(self, depth):
        e = self._e
        cq = self._cq.CQ(self.ctx, 4 * depth + 16, None, None, 0)
        cap = self._qp.QPCap(max_send_wr=2 * depth + 8, max_recv_wr=depth + 8, max_send_sge=1, max_recv_sge=1)
        init = self._qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap)
        qp = self._qp.QP(self.pd, init)
        port_attr = self.ctx.query_port(self.port)
        gid = self.ctx.query_gid(self.port, self.gid_index)
        info = {"qpn": qp.qp_num, "lid": port_attr.lid, "gid": gid.gid, "psn": 0, "recv_depth": depth}
        return qp, cq, info

    def _to_rts(self, qp, remote):
        attr = self._qp.QPAttr(qp_state=self._e.IBV_QPS_INIT)
        attr.qp_access_flags = self._e.IBV_ACCESS_REMOTE_READ | self._e.IBV_ACCESS_LOCAL_WRITE
        attr.port_num = self.port
        qp.to_init(attr)
        attr = self._qp.QPAttr()
        attr.dest_qp_num = remote["qpn"]
        attr.rq_psn = remote["psn"]
        attr.max_dest_rd_atomic = 16
        attr.min_rnr_timer = 12
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        if remote["lid"] == 0:   # RoCE: route by GID
            gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index)
            gr.hop_limit = 64
            attr.ah_attr = AHAttr(port_num=self.port, is_global=1, gr=gr)
        else:                    # InfiniBand: route by LID
            attr.ah_attr = AHAttr(port_num=self.port, dlid=remote["lid"])
        qp.to_rtr(attr)
        attr.sq_psn = 0
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.max_rd_atomic = 16
        qp.to_rts(attr)

    def connect(self, host, port, *, recv_depth=32, timeout=5.0, blocking=False, name=""):
        qp, cq, info = self._new_qp(recv_depth)
        with socket.create_connection((host, port), timeout=timeout) as side:
            _send_json(side, info)
            remote = _recv_json(side)
            self._to_rts(qp, remote)
            _send_json(side, {"rts": True})
            _recv_json(side)
        return VerbsQueuePair(self, qp, cq, remote["recv_depth"], f"{host}:{port}")

    def listen(self, host, port, *, recv_depth=32, max_frame=None):
        # ``max_frame`` needs no check here: the NIC fails a SEND longer than the posted buffer
        return VerbsListener(self, host, port, recv_depth)


def _send_json(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


_MAX_SETUP = 1 << 16     # a set-up message is a few hundred bytes of JSON


def _recv_json(sock, deadline=None):
    """One length-prefixed JSON message of the set-up channel, complete before ``deadline``."""
    if deadline is None:
        deadline = time.monotonic() + (sock.gettimeout() or 5.0)
    n = struct.unpack("<I", recv_exact_by(sock, 4, deadline, "RDMA set-up"))[0]
    if n > _MAX_SETUP:
        raise P.ProtocolError(f"set-up message of {n} bytes (limit {_MAX_SETUP})")
    msg = json.loads(bytes(recv_exact_by(sock, n, deadline, "RDMA set-up")))
    if isinstance(msg, dict) and "error" in msg:
        raise P.ProtocolError(f"peer refused the connection: {msg['error']}")
    return msg


class VerbsListener(Listener):
    def __init__(self, provider, host, port, recv_depth):
        self.provider = provider
        self.recv_depth = recv_depth
        self._sock = socket.create_server((host, port))
        self.address = self._sock.getsockname()[:2]

    def accept_socket(self, timeout=None):
        self._sock.settimeout(timeout)
        return self._sock.accept()

    def handshake(self, sock, addr, deadline):
        with sock:
            remote = _recv_json(sock, deadline)
            qp, cq, info = self.provider._new_qp(self.recv_depth)
            _send_json(sock, info)
            self.provider._to_rts(qp, remote)
            _recv_json(sock, deadline)
            _send_json(sock, {"rts": True})
        return VerbsQueuePair(self.provider, qp, cq, remote["recv_depth"], f"{addr[0]}:{addr[1]}")

    def refuse(self, sock, reason):
        with sock:
            try:
                sock.settimeout(0.2)
                _send_json(sock, {"error": reason})
            except OSError:
                pass

    def close(self):
        self._sock.close()


class VerbsQueuePair(QueuePair):
    """Polls its CQ from ``progress``; sends go straight to the NIC's send queue."""

    needs_polling = True   # no completion-channel fd wiring: the engine polls it each loop

    def __init__(self, provider, qp, cq, peer_credits, peer):
        self.p = provider
        self.qp = qp
        self.cq = cq
        self.peer_credits = peer_credits
        self.peer = peer
        self._bufs = {}          # wr_id -> (registered bounce MR, user view, length, opcode)
        self._cqe = []
        self.failed = None
        self.bytes_sent = 0
        self.bytes_recv = 0

    def fileno(self):
        return -1

    def _bounce(self, n):
        e = self.p._e
        return self.p._mrmod.MR(self.p.pd, max(n, 1), e.IBV_ACCESS_LOCAL_WRITE)

    def _post(self, wr_id, opcode, mr, n, rkey=None, addr=None):
        wrmod, e = self.p._wr, self.p._e
        sge = wrmod.SGE(mr.buf, n, mr.lkey)
        w = wrmod.SendWR(wr_id=wr_id, opcode=opcode, num_sge=1, sg=[sge],
                         send_flags=e.IBV_SEND_SIGNALED)
        if rkey is not None:
            w.set_wr_rdma(rkey, addr)
        self.qp.post_send(w)

    def post_send(self, wr_id, data):
        data = bytes(P.pack_header(P.Op.SEND, wr_id, len(data))) + bytes(data)
        mr = self._bounce(len(data))
        mr.write(data, len(data))
        self._bufs[("s", wr_id)] = (mr, None, len(data))
        self._post(wr_id, self.p._e.IBV_WR_SEND, mr, len(data))
        self.bytes_sent += len(data)

    def post_recv(self, wr_id, buf):
        view = memoryview(buf).cast("B")
        mr = self._bounce(view.nbytes + P.HEADER.size)
        self._bufs[("r", wr_id)] = (mr, view, view.nbytes)
        sge = self.p._wr.SGE(mr.buf, view.nbytes + P.HEADER.size, mr.lkey)
        self.qp.post_recv(self.p._wr.RecvWR(wr_id=wr_id, num_sge=1, sg=[sge]))

    def post_read(self, wr_id, local, rkey, offset, length):
        # offset is the remote virtual address: region addr (from META) + byte offset
        view = memoryview(local).cast("B")
        mr = self._bounce(length)
        self._bufs[("d", wr_id)] = (mr, view, length)
        self._post(wr_id, self.p._e.IBV_WR_RDMA_READ, mr, length, rkey, offset)

    def progress(self):
        e = self.p._e
        n, wcs = self.cq.poll(64)
        for wc in wcs[:n]:
            ok = wc.status == e.IBV_WC_SUCCESS
            if wc.opcode == e.IBV_WC_RECV:
                mr, view, cap = self._bufs.pop(("r", wc.wr_id))
                raw = mr.read(wc.byte_len, 0)
                hdr = P.unpack_header(raw[:P.HEADER.size])
                body = raw[P.HEADER.size:]
                view[:len(body)] = body
                self.bytes_recv += wc.byte_len
                self._cqe.append(WorkCompletion(wc.wr_id, Opcode.RECV, ok, len(body), hdr.req_id))
            elif wc.opcode == e.IBV_WC_RDMA_READ:
                mr, view, length = self._bufs.pop(("d", wc.wr_id))
                if ok:
                    view[:length] = mr.read(length, 0)
                    self.bytes_recv += length
                self._cqe.append(WorkCompletion(wc.wr_id, Opcode.READ, ok, length,
                                                error=None if ok else f"READ failed: status {wc.status}"))
            else:
                self._bufs.pop(("s", wc.wr_id), None)
                if not ok:
                    self._cqe.append(WorkCompletion(wc.wr_id, Opcode.SEND, False,
                                                    error=f"SEND failed: status {wc.status}"))
            if not ok and wc.status != e.IBV_WC_SUCCESS and self.failed is None:
                self.failed = f"work completion status {wc.status}"
                self._cqe.append(WorkCompletion(0, Opcode.FATAL, False, error=self.failed))

    def poll_cq(self):
        out, self._cqe = self._cqe, []
        return out

    def flush(self):
        pass

    def forget_read(self, wr_id):
        pass   # the NIC still writes the bounce buffer; it is dropped on completion

    def close(self):
        self.failed = self.failed or "closed locally"
        self.qp.close()
        self.cq.close()
