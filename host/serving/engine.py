"""The multi-threaded RDMA engine (FlexEMR): I/O threads over provider queue pairs.

Above a :class:`~.rdma.Provider` the engine gives the ranker three operations on a named
connection, each returning a :class:`concurrent.futures.Future`:

* :meth:`Engine.request` -- SEND a request, complete with the decoded reply (the server answers
  with a SEND carrying the same request id);
* :meth:`Engine.read` / :meth:`Engine.read_rows` -- one-sided READs of a server's registered
  memory (``read_rows`` issues one READ per row with a bounded window: the row-by-row baseline).

:meth:`Engine.call` is the synchronous form of :meth:`Engine.request`: the caller's thread
sends and, when nobody else is reading the connection, reads its reply itself ("busy caller
polls"), which saves the hand-off of the reply from an I/O thread to the caller. On a queue pair
with ``exchange`` (tcp) that is one send and one read with no operation record and no future:
the round trip of a lone caller costs about what a blocking socket client's does.

Threads and connections:

* ``n_threads`` I/O threads; each owns a set of connections and drives their queue pairs
  (posting, progress, completions). ``n_threads=1`` is the single-threaded baseline.
* One reader per queue pair: whoever progresses a queue pair's receive side and takes its
  completions holds the connection's ``rx_lock`` -- its I/O thread, or a caller inside
  :meth:`Engine.call` that took the lock without waiting. An I/O thread that finds the lock
  taken stops watching that socket ("parks" it) instead of spinning on it; whoever frees the
  lock while requests are still pending wakes the I/O thread to watch it again. Completions a
  caller cannot handle itself (READs, errors, a failed connection) go to the I/O thread, so
  READ state and connection teardown stay on one thread. Callers also post and flush their
  own SENDs when the provider's send side is locked (``thread_safe_post``).
* Placement is mapping-aware: each connection carries a weight (its expected share of a batch's
  traffic, from the shard map) and goes to the thread with the least weight so far, so the
  fan-out of one batch spreads over the threads.
* :meth:`Engine.migrate` moves a live connection between threads: the old thread gets a release
  marker behind every request already queued to it, hands the queue pair over, and the new
  thread holds requests submitted meanwhile until it adopts the connection. In-flight requests
  stay in the connection's table and complete on the new thread: nothing is lost or reordered.
  :meth:`Engine.rebalance` migrates when measured per-thread traffic skews.
* Credits bound in-flight requests per connection (min of ours and the peer's posted receives).
  A caller without a credit waits up to ``credit_timeout`` and then gets :class:`Backpressure`
  (or at once with ``block=False``); nothing is dropped.
* Every request has a deadline; a dead or stalled peer fails its requests with
  :class:`ConnectionLost` or :class:`RequestTimeout` within bounded time. Late replies to
  requests that timed out are recognised by id and discarded, never delivered to a newer request.
"""
from __future__ import annotations

import itertools
import queue
import select
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError

import numpy as np

from . import protocol as P
from .rdma import Opcode, Provider

__all__ = ["Engine", "Connection", "EngineError", "Backpressure", "ConnectionLost",
           "RequestTimeout"]


class EngineError(RuntimeError):
    pass


class Backpressure(EngineError):
    """No credit became free in time: the connection has its limit of requests in flight."""


class ConnectionLost(EngineError):
    pass


class RequestTimeout(EngineError, TimeoutError):
    pass


_SUB_BITS = 20      # read_rows: wr_id = op id << 20 | row position
# completion opcodes as module constants (an enum attribute lookup per completion adds up)
_RECV, _READ, _SEND, _FATAL = Opcode.RECV, Opcode.READ, Opcode.SEND, Opcode.FATAL
_MAX_PAYLOAD = P.MAX_PAYLOAD
_monotonic = time.monotonic
_decode_reply = P.decode_reply
_FALLBACK = object()    # _call_direct: the fast path does not apply, take the general one


class _Credits:
    """A counting semaphore on a C-level queue of tokens. Taken and given back once per
    request: ~0.2 us each, where ``threading.Semaphore`` (a Python ``Condition``) costs ~1.2."""
    __slots__ = ("_q", "take", "give")

    def __init__(self, n: int):
        self._q = queue.SimpleQueue()
        for _ in range(n):
            self._q.put(None)
        # the fast path's pair, C calls with no Python frame: take() raises queue.Empty
        # when no credit is free, give(None) returns one
        self.take, self.give = self._q.get_nowait, self._q.put

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        try:
            self._q.get(blocking, timeout)
        except queue.Empty:
            return False
        return True

    def release(self) -> None:
        self._q.put(None)


class _SyncResult:
    """The completion of a request its caller waits for in :meth:`Engine.call`: the part of
    the ``Future`` interface the engine uses, on two bare locks (a ``Future`` costs ~3 us of
    ``Condition`` work per request). Never handed to user code."""
    __slots__ = ("_gate", "_wait", "_done", "_result", "_exc")

    def __init__(self):
        self._gate = threading.Lock()      # taken by the one completion
        self._wait = threading.Lock()      # held until completed
        self._wait.acquire()
        self._done = False
        self._result = self._exc = None

    def done(self) -> bool:
        return self._done

    def set_result(self, result):
        self._set(result, None)

    def set_exception(self, exc):
        self._set(None, exc)

    def _set(self, result, exc):
        if not self._gate.acquire(blocking=False):
            raise InvalidStateError("request completed already")
        self._result, self._exc = result, exc
        self._done = True
        self._wait.release()

    def result(self, timeout: float | None = None):
        if not self._done:
            if not self._wait.acquire(True, -1 if timeout is None else timeout):
                raise TimeoutError("request not completed in time")
            self._wait.release()           # stays open for any later look
        if self._exc is not None:
            raise self._exc
        return self._result


class _Op:
    __slots__ = ("kind", "req_id", "payload", "future", "deadline", "t0", "rkey", "offsets",
                 "length", "out", "next", "done", "n", "base", "credit")

    def __init__(self, kind, req_id, deadline, sync=False):
        self.kind = kind
        self.req_id = req_id
        self.future = _SyncResult() if sync else Future()
        self.deadline = deadline
        self.t0 = time.perf_counter()
        self.credit = True


class Connection:
    """A queue pair to one server plus the engine's bookkeeping for it."""

    def __init__(self, engine, name, qp, weight, credits):
        self.engine = engine
        self.name = name
        self.qp = qp
        self.weight = weight
        self.owner = -1          # the thread requests are routed to
        self.driver = None       # the thread whose loop holds the queue pair now
        self.lock = threading.Lock()
        self.credits_total = credits
        self.credits = _Credits(credits)
        self.pending: dict[int, _Op] = {}
        self.recv_bufs: dict[int, np.ndarray] = {}
        self.dead: str | None = None
        # queue pairs whose send side callers may drive (posting is locked inside the provider)
        self.direct_ok = bool(getattr(qp, "thread_safe_post", False))
        # the one-reader lock (module docstring); callers may read replies on queue pairs with
        # a pollable descriptor whose send side they may drive
        self.rx_lock = threading.Lock()
        self.caller_reads = self.direct_ok and not getattr(qp, "needs_polling", False)
        # Engine.call's fast path: the queue pair can send and await one answer on the caller's thread
        self.exchange_ok = engine.direct_send and self.caller_reads and hasattr(qp, "exchange")
        self.parked = False          # its I/O thread stopped watching it: a caller reads it
        self.deferred: deque = deque()   # completions a caller took but leaves to the I/O thread
        self._poller = None
        # set while one I/O thread has adopted the queue pair and no migration is under way;
        # clear until the first adoption, so a migration right after connect() waits for it
        # (the first adoption setting it under a migration would let two threads adopt)
        self.migrated = threading.Event()
        self._mark = 0
        self.completed = 0

    @property
    def bytes_moved(self) -> int:
        return self.qp.bytes_sent + self.qp.bytes_recv

    def __repr__(self):
        return f"Connection({self.name!r}, {self.qp.peer}, thread={self.owner})"


def _finish(conn, op, result=None, exc=None):
    """Complete ``op`` once (its credit back, its future set); any thread may call it."""
    if op.credit:
        op.credit = False
        conn.credits.release()
    conn.completed += 1
    try:
        if exc is not None:
            op.future.set_exception(exc)
        else:
            op.future.set_result(result)
    except InvalidStateError:
        pass                      # completed already (e.g. failed by a closing engine)


def _owned(res):
    """A decoded reply that owns its memory: arrays (alone or in a MULTI reply's list) are
    views of the receive buffer, which the next message overwrites."""
    if type(res) is np.ndarray:
        return res.copy()
    if type(res) is list:
        return [r.copy() if type(r) is np.ndarray else r for r in res]
    return res


def _recv_completion(conn, wc):
    """A reply arrived: complete its request and repost the receive buffer. Run by whoever
    holds ``conn.rx_lock`` (the I/O thread or a caller reading its own reply)."""
    buf = conn.recv_bufs[wc.wr_id]
    op = conn.pending.pop(wc.imm, None)
    if op is not None:
        if not wc.ok:
            _finish(conn, op, exc=P.ProtocolError(wc.error))
        else:
            try:
                _finish(conn, op, _owned(P.decode_reply(buf[:wc.byte_len])))
            except (P.RemoteError, P.ProtocolError) as exc:
                _finish(conn, op, exc=exc)
    if not conn.dead:
        conn.qp.post_recv(wc.wr_id, buf)


def _drain_completions(conn, qp) -> bool:
    """Take every completion of ``qp``: replies complete their requests here; anything else is
    deferred to the connection's I/O thread. True when something was deferred (a hand-off)."""
    wcs = qp.poll_cq()
    return bool(wcs) and _defer_completions(conn, wcs)


def _defer_completions(conn, wcs) -> bool:
    """:func:`_drain_completions` of completions already taken from the queue pair."""
    handoff = False
    for wc in wcs:
        if wc.opcode == _RECV:
            _recv_completion(conn, wc)
        else:
            conn.deferred.append(wc)
            handoff = True
    return handoff


class _IoThread(threading.Thread):
    def __init__(self, engine, idx):
        super().__init__(name=f"evssd-io-{idx}", daemon=True)
        self.engine = engine
        self.idx = idx
        self.inbox: deque = deque()
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self._ww.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self._wr, selectors.EVENT_READ, None)
        self.conns: dict[Connection, int] = {}     # adopted connection -> selector mask
        self.polled: list[Connection] = []         # providers without an fd (verbs)
        self.parked: set[Connection] = set()       # adopted, unwatched: a caller holds rx_lock
        self.held: dict[Connection, list] = {}
        self.stop = False
        self.sleeping = True
        self.crashed: str | None = None
        self.ops = 0

    def post(self, item):
        self.inbox.append(item)
        # Wake the thread only if it is (about to be) blocked in select: a needless wake-up
        # write costs a GIL hand-off. The thread raises `sleeping` before it looks at the
        # inbox, and we append before we look at `sleeping`, so one of us sees the other.
        if self.sleeping:
            try:
                self._ww.send(b"\0")
            except (BlockingIOError, OSError):
                pass        # a wake-up is already pending

    # -------------------------------------------------------------- loop
    def run(self):
        try:
            self._loop()
        except BaseException as exc:
            # a bug here must not leave callers waiting: fail what this thread holds, loudly
            self.crashed = f"{type(exc).__name__}: {exc}"
            for conn in list(self.conns):
                try:
                    self._fatal(conn, f"I/O thread {self.idx} crashed: {self.crashed}")
                except Exception:
                    pass
            raise

    def _loop(self):
        next_expire = 0.0
        while not self.stop:
            self.sleeping = True
            timeout = 0 if self.inbox else (0.001 if self.polled else (0.005 if self.parked else 0.02))
            events = self.sel.select(timeout)
            self.sleeping = False
            for key, mask in events:
                conn = key.data
                if conn is None:
                    try:
                        while self._wr.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                if mask & selectors.EVENT_WRITE:
                    conn.qp.flush()
                if not conn.rx_lock.acquire(blocking=False):
                    self._park(conn)          # a caller is reading it: do not spin on its socket
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        conn.qp.progress()
                    self._completions(conn)
                finally:
                    conn.rx_lock.release()
            while self.inbox:
                self._handle(self.inbox.popleft())
            for conn in self.polled:
                conn.qp.progress()
                self._completions(conn)
            for conn, mask in list(self.conns.items()):
                if conn.dead:
                    continue
                while conn.deferred:
                    if not self._completion(conn, conn.deferred.popleft()):
                        break
                if conn.dead:
                    continue
                if conn.qp.wants_write():
                    conn.qp.flush()        # what this turn posted, in one send
                if conn in self.parked:
                    # watch it again once no caller reads it and something still needs a reader
                    if not conn.rx_lock.locked() and (conn.pending or conn.deferred or conn.qp.wants_write()):
                        self._unpark(conn)
                    continue
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.qp.wants_write() else 0)
                if want != mask and conn.qp.fileno() >= 0:
                    self.sel.modify(conn.qp, want, conn)
                    self.conns[conn] = want
            now = time.monotonic()
            if now >= next_expire:
                next_expire = now + 0.01
                self._expire(now)
        for conn in list(self.conns):
            self._drop(conn, "engine closed")
        err = ConnectionLost("engine closed")
        while self.inbox:                       # requests that never started fail, not hang
            item = self.inbox.popleft()
            if item[0] == "op":
                _finish(item[1], item[2], exc=err)
            elif item[0] == "close":
                item[2].set()
        for conn, ops in self.held.items():
            for op in ops:
                _finish(conn, op, exc=err)
        self.held.clear()
        self.sel.close()
        self._wr.close()
        self._ww.close()

    def _handle(self, item):
        kind, conn = item[0], item[1]
        if kind == "op":
            if conn in self.conns:
                self._start(conn, item[2])
            else:
                self.held.setdefault(conn, []).append(item[2])
        elif kind == "adopt":
            self._adopt(conn)
            for op in self.held.pop(conn, []):
                self._start(conn, op)
            conn.migrated.set()
        elif kind == "release":
            new = item[2]
            self._unregister(conn)
            new.post(("adopt", conn))
        elif kind == "close":
            self._drop(conn, "closed by the application")
            item[2].set()
        # "rearm" and "noop" only wake the loop: its end of turn looks at parked connections

    def _adopt(self, conn):
        # the one-driver invariant: a queue pair is in at most one thread's loop at a time
        if conn.driver is not None:
            raise AssertionError(f"{conn!r} adopted by thread {self.idx} while thread {conn.driver} drives it")
        conn.driver = self.idx
        if getattr(conn.qp, "needs_polling", False):
            self.polled.append(conn)
            self.conns[conn] = 0
        else:
            mask = selectors.EVENT_READ
            if not conn.dead:
                self.sel.register(conn.qp, mask, conn)
            self.conns[conn] = mask

    def _park(self, conn):
        if conn in self.parked or conn.dead or conn not in self.conns:
            return
        try:
            self.sel.unregister(conn.qp)
        except (KeyError, ValueError):
            pass
        self.parked.add(conn)
        self.conns[conn] = 0
        conn.parked = True

    def _unpark(self, conn):
        self.parked.discard(conn)
        conn.parked = False
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.qp.wants_write() else 0)
        self.sel.register(conn.qp, want, conn)
        self.conns[conn] = want

    def _unregister(self, conn):
        if conn.driver == self.idx:
            conn.driver = None
        mask = self.conns.pop(conn, None)
        if conn in self.parked:
            self.parked.discard(conn)
            conn.parked = False
        elif conn in self.polled:
            self.polled.remove(conn)
        elif mask is not None and not conn.dead:
            try:
                self.sel.unregister(conn.qp)
            except (KeyError, ValueError):
                pass

    # -------------------------------------------------------------- data path
    def _start(self, conn, op):
        if conn.dead:
            _finish(conn, op, exc=ConnectionLost(f"server {conn.name} ({conn.qp.peer}): {conn.dead}"))
            return
        self.ops += 1
        conn.pending[op.req_id] = op
        try:
            if op.kind == "req":
                payload, op.payload = op.payload, None
                conn.qp.post_send(op.req_id, payload)
            else:
                self._issue_reads(conn, op)
        except (ConnectionError, OSError) as exc:
            self._fatal(conn, str(exc))

    def _issue_reads(self, conn, op):
        window = self.engine.read_window
        qp = conn.qp
        base = op.req_id << _SUB_BITS
        while op.next < op.n and op.next - op.done < window:
            i = op.next
            qp.post_read(base | i, op.out[i], op.rkey, int(op.offsets[i]), op.length)
            op.next += 1

    def _completions(self, conn):
        for wc in conn.qp.poll_cq():
            if not self._completion(conn, wc):
                return

    def _completion(self, conn, wc) -> bool:
        """Handle one work completion; False when the connection failed (stop handling)."""
        opcode = wc.opcode
        if opcode == _RECV:
            _recv_completion(conn, wc)
        elif opcode == _READ:
            op = conn.pending.get(wc.wr_id >> _SUB_BITS)
            if op is None:
                return True
            if not wc.ok:
                conn.pending.pop(op.req_id, None)
                _finish(conn, op, exc=P.RemoteError(f"server {conn.name}: {wc.error}"))
                return True
            op.done += 1
            if op.done == op.n:
                conn.pending.pop(op.req_id, None)
                _finish(conn, op, op.out)
            else:
                try:
                    self._issue_reads(conn, op)
                except (ConnectionError, OSError) as exc:
                    self._fatal(conn, str(exc))
                    return False
        elif opcode == _SEND:
            op = conn.pending.pop(wc.wr_id, None)
            if op is not None:
                _finish(conn, op, exc=P.RemoteError(f"server {conn.name}: {wc.error}"))
        elif opcode == _FATAL:
            self._fatal(conn, wc.error)
            return False
        return True

    def _fatal(self, conn, reason):
        if conn.dead:
            return
        self._unregister(conn)
        conn.dead = reason or "connection failed"
        self.conns[conn] = 0          # keep ownership so later ops fail fast here
        conn.driver = self.idx
        err = ConnectionLost(f"server {conn.name} ({conn.qp.peer}): {conn.dead}")
        self._fail_pending(conn, err)
        conn.qp.close()

    @staticmethod
    def _fail_pending(conn, err):
        # popitem is atomic: an op a caller inserts meanwhile is failed by exactly one thread
        # (here, or by the caller, which checks ``dead`` after inserting)
        while conn.pending:
            try:
                _, op = conn.pending.popitem()
            except KeyError:
                break
            _finish(conn, op, exc=err)

    def _expire(self, now):
        for conn in list(self.conns):
            if not conn.pending:
                continue
            late = [op for op in list(conn.pending.values()) if op.deadline < now]
            for op in late:
                if conn.pending.pop(op.req_id, None) is None:
                    continue
                if op.kind == "rows":
                    base = op.req_id << _SUB_BITS
                    for i in range(op.done, op.next):
                        conn.qp.forget_read(base | i)
                waited = time.perf_counter() - op.t0
                _finish(conn, op, exc=RequestTimeout(
                    f"server {conn.name} ({conn.qp.peer}) did not answer request {op.req_id} "
                    f"within {waited:.2f} s"))

    def _drop(self, conn, reason):
        self._unregister(conn)
        err = ConnectionLost(f"server {conn.name}: {reason}")
        self._fail_pending(conn, err)
        for op in self.held.pop(conn, []):
            _finish(conn, op, exc=err)
        if not conn.dead:
            conn.dead = reason
        conn.qp.close()


class Engine:
    """See the module docstring. ``provider`` is a :class:`~.rdma.Provider`."""

    def __init__(self, provider: Provider, n_threads: int = 1, *, credits: int = 16,
                 request_timeout: float = 5.0, credit_timeout: float | None = None,
                 max_message: int = 4 << 20, read_window: int = 64, direct_send: bool = True):
        if n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {n_threads}")
        if credits < 1:
            raise ValueError(f"credits must be >= 1, got {credits}")
        self.provider = provider
        self.credits = credits
        self.request_timeout = request_timeout
        self.credit_timeout = request_timeout if credit_timeout is None else credit_timeout
        self.max_message = max_message
        self.read_window = read_window
        self.direct_send = direct_send
        self._ids = itertools.count(1)
        self.connections: dict[str, Connection] = {}
        self.threads = [_IoThread(self, i) for i in range(n_threads)]
        for t in self.threads:
            t.start()
        self.migrations = 0
        self._rebalance_lock = threading.Lock()

    # -------------------------------------------------------------- connections
    def connect(self, name: str, host: str, port: int, *, weight: float = 1.0,
                timeout: float = 5.0, thread: int | None = None) -> Connection:
        if name in self.connections:
            raise ValueError(f"connection {name!r} exists already")
        qp = self.provider.connect(host, port, recv_depth=self.credits, timeout=timeout, name=name)
        credits = max(1, min(self.credits, qp.peer_credits))
        conn = Connection(self, name, qp, weight, credits)
        for i in range(self.credits):
            buf = np.empty(self.max_message, dtype=np.uint8)
            conn.recv_bufs[i] = buf
            qp.post_recv(i, buf)
        if thread is None:
            thread = self._least_loaded()
        conn.owner = thread
        self.connections[name] = conn
        self.threads[thread].post(("adopt", conn))
        return conn

    def _least_loaded(self) -> int:
        loads = [0.0] * len(self.threads)
        for c in self.connections.values():
            loads[c.owner] += c.weight
        return int(np.argmin(loads))

    def placement(self) -> dict[str, int]:
        return {name: c.owner for name, c in self.connections.items()}

    def close_connection(self, conn: Connection, timeout: float = 5.0):
        done = threading.Event()
        conn.migrated.wait(timeout)
        with conn.lock:
            self.threads[conn.owner].post(("close", conn, done))
        done.wait(timeout)
        self.connections.pop(conn.name, None)

    # -------------------------------------------------------------- operations
    def _acquire(self, conn, block):
        if conn.dead:
            raise ConnectionLost(f"server {conn.name} ({conn.qp.peer}): {conn.dead}")
        ok = conn.credits.acquire(blocking=block, timeout=self.credit_timeout if block else None)
        if not ok:
            raise Backpressure(
                f"connection {conn.name}: {conn.credits_total} requests in flight"
                + (f" and none completed within {self.credit_timeout:.2f} s" if block else ""))

    def _submit(self, conn, op, sync=False):
        with conn.lock:
            thread = self.threads[conn.owner]
            if thread.crashed or not thread.is_alive():
                conn.credits.release()
                raise EngineError(f"I/O thread {thread.idx} is not running: {thread.crashed or 'engine closed'}")
            if (op.kind == "req" and self.direct_send and conn.direct_ok and conn.migrated.is_set()
                    and conn.driver == conn.owner and not conn.dead):
                self._send_direct(conn, thread, op)
                if conn.parked and not sync:
                    thread.post(("rearm", conn))   # nobody may read this reply: watch the socket again
            else:
                thread.post(("op", conn, op))
        return op.future

    def _send_direct(self, conn, thread, op):
        """The caller's thread posts and flushes the SEND itself (the queue pair's send side is
        locked); only the reply crosses to the I/O thread, which owns the receive side. This
        saves a thread hand-off per request. The op is in ``pending`` before its bytes leave,
        so the reply always finds it."""
        thread.ops += 1
        conn.pending[op.req_id] = op
        payload, op.payload = op.payload, None
        try:
            conn.qp.send_now(op.req_id, payload)
        except (ConnectionError, OSError):
            pass          # the queue pair failed: its FATAL completion fails the op on the I/O thread
        if conn.dead and conn.pending.pop(op.req_id, None) is op:
            _finish(conn, op, exc=ConnectionLost(f"server {conn.name} ({conn.qp.peer}): {conn.dead}"))
        elif conn.qp.wants_write():
            thread.post(("noop", None))   # the socket is full: the I/O thread waits for writability

    def _read_own_reply(self, conn, op):
        """Busy caller polls: read the connection until ``op`` completes, on the caller's
        thread, if no other thread reads it now (``rx_lock`` taken without waiting; otherwise
        the reader that holds it completes ``op``). Replies to other requests that arrive
        meanwhile are completed here too; any other completion (READ, error, failure) is left
        to the I/O thread. Gives up at the request's deadline (the I/O thread expires it)."""
        if not conn.rx_lock.acquire(blocking=False):
            return
        handoff = False
        qp = conn.qp
        try:
            poller = conn._poller
            if poller is None:
                poller = conn._poller = select.poll()
                poller.register(qp.fileno(), select.POLLIN)
            # ``op`` leaves ``pending`` when a reader takes its reply (or the I/O thread fails
            # it): a dict lookup per turn, not the future's lock
            pending, rid = conn.pending, op.req_id
            ready = True     # try a read first: on a loaded host the reply is often there already
            while rid in pending and not conn.dead and not getattr(qp, "failed", None):
                if qp.wants_write():
                    qp.flush()
                if not ready:
                    if not poller.poll(1 if qp.wants_write() else 10):
                        if time.monotonic() > op.deadline:
                            break
                        continue
                ready = False
                qp.progress()
                handoff = _drain_completions(conn, qp)
                if handoff:
                    break
        finally:
            conn.rx_lock.release()
        # after the release: a parked connection with work left needs its I/O thread again
        if handoff or qp.wants_write() or (conn.parked and (conn.pending or conn.deferred)):
            self.threads[conn.owner].post(("rearm", conn))

    def _new_op(self, kind, timeout, sync=False):
        t = self.request_timeout if timeout is None else timeout
        return _Op(kind, next(self._ids), time.monotonic() + t, sync)

    def request(self, conn: Connection, payload: bytes, *, timeout: float | None = None,
                block: bool = True) -> Future:
        """SEND ``payload``; the future completes with the decoded reply."""
        if len(payload) > P.MAX_PAYLOAD:
            raise ValueError(f"request of {len(payload)} bytes exceeds {P.MAX_PAYLOAD}")
        self._acquire(conn, block)
        op = self._new_op("req", timeout)
        op.payload = payload
        return self._submit(conn, op)

    def call(self, conn: Connection, payload: bytes, *, timeout: float | None = None,
             block: bool = True):
        """SEND ``payload`` and return the decoded reply (or raise what :meth:`request`'s
        future would). When no other thread reads the connection, the caller's thread sends
        and reads its own reply (:meth:`_call_direct`); otherwise it waits like
        :meth:`request`."""
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"request of {len(payload)} bytes exceeds {P.MAX_PAYLOAD}")
        if conn.exchange_ok and conn.rx_lock.acquire(False):
            res = self._call_direct(conn, payload, timeout)
            if res is not _FALLBACK:
                return res
        self._acquire(conn, block)
        op = self._new_op("req", timeout, sync=True)
        op.payload = payload
        fut = self._submit(conn, op, sync=True)
        if conn.caller_reads and op.req_id in conn.pending:
            self._read_own_reply(conn, op)
        try:
            # the I/O thread fails the request at its deadline; the grace covers its tick
            return fut.result(max(0.0, op.deadline - time.monotonic()) + 1.0)
        except TimeoutError as exc:
            if isinstance(exc, EngineError):
                raise
            raise RequestTimeout(f"server {conn.name} ({conn.qp.peer}): no answer to request "
                                 f"{op.req_id} and no timeout from the engine") from None

    def _call_direct(self, conn, payload, timeout):
        """The fast path of :meth:`call`, entered holding ``conn.rx_lock`` (released here): one
        :meth:`~.tcp_provider.TcpQueuePair.exchange` on the caller's thread -- send, then read
        until the answer -- with no operation record, no future and no other thread involved.
        The request holds a credit while in flight, like any other. Replies to other requests
        read meanwhile are completed here; other completions (READs, errors, a failed
        connection) go to the I/O thread, as in :meth:`_read_own_reply`. Returns
        ``_FALLBACK`` (nothing sent) when the connection is not in a state for it: failed,
        being migrated, completions waiting for its I/O thread, or no credit free now."""
        qp = conn.qp
        got = None
        handoff = False
        try:
            if conn.dead or conn.deferred or conn.driver != conn.owner or not conn.migrated.is_set():
                return _FALLBACK
            credits = conn.credits
            try:
                credits.take()
            except queue.Empty:
                return _FALLBACK
            rid = next(self._ids)
            wait = self.request_timeout if timeout is None else timeout
            try:
                got = qp.exchange(rid, payload, _monotonic() + wait)
            except (ConnectionError, OSError):
                pass                      # the queue pair failed: reported below
            finally:
                credits.give(None)
                conn.completed += 1
                wcs = qp.poll_cq()        # taken while we are the reader (rx_lock)
                if wcs:
                    handoff = _defer_completions(conn, wcs)
            if got is not None and type(got) is not str:
                res = _decode_reply(got)      # decoded while the buffer is ours
                return res if type(res) is bytes else _owned(res)
        finally:
            conn.rx_lock.release()
            # after the release: a parked connection with work left needs its I/O thread again
            if handoff or (conn.parked and (conn.pending or conn.deferred)) or qp.wants_write():
                self.threads[conn.owner].post(("rearm", conn))
        if got is not None:
            raise P.RemoteError(f"server {conn.name}: {got}")
        if conn.dead or qp.failed:
            raise ConnectionLost(f"server {conn.name} ({qp.peer}): {conn.dead or qp.failed}")
        raise RequestTimeout(f"server {conn.name} ({qp.peer}) did not answer request {rid} "
                             f"within {wait:.2f} s")

    def read_rows(self, conn: Connection, rkey: int, offsets: np.ndarray, length: int, *,
                  out: np.ndarray | None = None, timeout: float | None = None,
                  block: bool = True) -> Future:
        """One READ of ``length`` bytes per entry of ``offsets`` (addresses in region ``rkey``:
        the region's ``addr`` from META plus the byte offset; ``addr`` is 0 on tcp).

        The future completes with a ``[n, length]`` uint8 array. Counts as one credit; at most
        ``read_window`` READs of it are outstanding on the wire at once.
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        n = offsets.size
        if n >= 1 << _SUB_BITS:
            raise ValueError(f"read_rows takes < {1 << _SUB_BITS} rows per call, got {n}")
        if out is None:
            out = np.empty((n, length), dtype=np.uint8)
        self._acquire(conn, block)
        op = self._new_op("rows", timeout)
        op.rkey, op.offsets, op.length, op.out = rkey, offsets, length, out
        op.n, op.next, op.done = n, 0, 0
        if n == 0:
            conn.credits.release()
            op.credit = False
            op.future.set_result(out)
            return op.future
        return self._submit(conn, op)

    def read(self, conn, rkey, offset, length, **kw) -> Future:
        fut = self.read_rows(conn, rkey, np.array([offset]), length, **kw)
        out = Future()

        def done(f):
            if f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(bytes(f.result()[0]))
        fut.add_done_callback(done)
        return out

    # -------------------------------------------------------------- migration
    def migrate(self, conn: Connection, thread: int, timeout: float = 5.0) -> None:
        """Move ``conn`` to I/O thread ``thread``; returns when the new thread owns it."""
        if not 0 <= thread < len(self.threads):
            raise ValueError(f"thread {thread} out of range 0..{len(self.threads) - 1}")
        deadline = time.monotonic() + timeout
        while True:
            if not conn.migrated.wait(max(0.0, deadline - time.monotonic())):
                raise EngineError(f"connection {conn.name}: previous migration did not finish")
            with conn.lock:
                if not conn.migrated.is_set():
                    continue                  # another migration won the race: wait for it
                old = conn.owner
                if old == thread:
                    return
                conn.migrated.clear()
                conn.owner = thread
                self.threads[old].post(("release", conn, self.threads[thread]))
                break
        self.migrations += 1
        if not conn.migrated.wait(timeout):
            raise EngineError(f"connection {conn.name}: migration {old}->{thread} did not finish in {timeout} s")

    def thread_loads(self) -> list[int]:
        """Bytes moved per thread since the last :meth:`rebalance`."""
        loads = [0] * len(self.threads)
        for c in self.connections.values():
            loads[c.owner] += c.bytes_moved - c._mark
        return loads

    def rebalance(self, ratio: float = 1.5, min_gain: float = 0.15) -> list[tuple[str, int, int]]:
        """Migrate one connection from the busiest to the idlest thread if their traffic since
        the last call differs by more than ``ratio`` and the move lowers the busiest thread's
        traffic by at least ``min_gain`` (hysteresis: no ping-pong between equal placements,
        e.g. 5 equal connections on 4 threads); returns the moves made."""
        with self._rebalance_lock:
            return self._rebalance(ratio, min_gain)

    def _rebalance(self, ratio, min_gain):
        moves = []
        if len(self.threads) > 1:
            loads = self.thread_loads()
            hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
            if loads[hi] > ratio * max(loads[lo], 1):
                best, best_peak = None, loads[hi] * (1.0 - min_gain)
                for c in self.connections.values():
                    if c.owner != hi or c.dead:
                        continue
                    d = c.bytes_moved - c._mark
                    peak = max(loads[hi] - d, loads[lo] + d)
                    if d > 0 and peak < best_peak:
                        best, best_peak = c, peak
                if best is not None:
                    self.migrate(best, lo)
                    moves.append((best.name, hi, lo))
        for c in self.connections.values():
            c._mark = c.bytes_moved
        return moves

    # -------------------------------------------------------------- shutdown
    def close(self):
        for t in self.threads:
            t.stop = True
            t.post(("noop", None))
        for t in self.threads:
            t.join(5)
        self.connections.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
