"""``evssd bench device``: what the thread-safe synchronous facade costs per call.

On the model backend (wall clock, this machine), side by side in one run:

- ``bare loop``: ``loop.run_until_complete(coro)`` on the driver's own loop, the facade's code
  path before it became thread-safe (no lock, no checks) -- the peer;
- ``Device.run``: the facade (lock, closed check, loop-in-thread detection);
- ``N threads``: N threads sharing one ``Device``, calls serialised by its lock (total calls/s).

Per-call numbers are the minimum over alternating blocks of calls of the peer and the facade
(``--repeats`` x 20 blocks, ``--calls`` x ``--repeats`` calls in all), so both see the same machine
load and the least disturbed block counts. Results: ``results/device/device.json`` and ``device.png``.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

from evssd.host import cli_types as ct
from evssd.host.bench.common import write_results

NAME = "device"


def add_arguments(parser):
    parser.add_argument("--calls", type=ct.positive_int, default=3000, help="calls per timed run (default 3000)")
    parser.add_argument("--repeats", type=ct.positive_int, default=10, help="x 20 alternating timed blocks, best kept (default 10)")
    parser.add_argument("--threads", type=ct.int_range(2, 64, "a thread count"), default=4,
                        help="threads sharing one device in the shared run (default 4)")
    parser.add_argument("--rows", type=ct.positive_int, default=8, help="rows per gather (default 8)")
    parser.add_argument("--results", default=None, help="results root (default $EVSSD_RESULTS or ./results)")
    parser.add_argument("--no-plot", action="store_true", help="JSON only")


def _paired_best_us(a, b, calls, blocks):
    """Minimum per-call time of ``a`` and of ``b`` over ``blocks`` alternating blocks of
    ``calls // blocks`` calls each: both see the same machine load, and the minimum is the
    least disturbed block."""
    n = max(1, calls // blocks)
    best = [float("inf"), float("inf")]
    for _ in range(blocks):
        for k, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / n)
    return best[0] * 1e6, best[1] * 1e6


def run(args) -> int:
    from evssd.host.device import Device
    dev = Device.open("model", pages_per_channel=64)
    try:
        dev.configure_table(0, 64, "fp32", [(0, 1000, 0)])
        idx = np.arange(args.rows, dtype=np.uint32)
        loop, aio = dev._loop, dev.aio
        ops = {
            "nop": (lambda: loop.run_until_complete(aio.nop()), lambda: dev.nop()),
            f"gather({args.rows})": (lambda: loop.run_until_complete(aio.gather(0, idx)),
                                     lambda: dev.gather(0, idx)),
            "read32": (lambda: loop.run_until_complete(aio.read32(0)), lambda: dev.read32(0)),
        }
        rows = []
        for name, (bare, facade) in ops.items():
            b, f = _paired_best_us(bare, facade, args.calls * args.repeats, 20 * args.repeats)
            rows.append({"op": name, "bare_loop_us": b, "device_run_us": f, "overhead_us": f - b,
                         "ratio": f / b})
        # threads sharing one device: total calls/s and correctness of every result
        want = dev.gather(0, idx)
        errors = []

        def worker(n):
            for _ in range(n):
                if not np.array_equal(dev.gather(0, idx), want):
                    errors.append("wrong rows")
        shared = {}
        for n_threads in (1, args.threads):
            per = max(1, args.calls // n_threads)
            best = 0.0
            for _ in range(args.repeats):
                threads = [threading.Thread(target=worker, args=(per,)) for _ in range(n_threads)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                best = max(best, per * n_threads / (time.perf_counter() - t0))
            shared[str(n_threads)] = best
        if errors:
            print(f"evssd bench device: {len(errors)} wrong results from shared threads", file=sys.stderr)
            return 1
    finally:
        dev.close()
    data = {"kind": "wall clock, model backend, this machine", "calls": args.calls,
            "repeats": args.repeats, "per_call": rows,
            "shared_device_calls_per_s": shared, "threads": args.threads}
    fig = None
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["bare_loop_us"] for r in rows], 0.4, label="bare loop (peer)")
        ax.bar(x + 0.2, [r["device_run_us"] for r in rows], 0.4, label="Device.run (thread-safe)")
        ax.set_xticks(x, [r["op"] for r in rows])
        ax.set_ylabel("us per call (min of repeats)")
        ax.set_title("Device facade per-call cost, model backend [wall clock]")
        ax.legend()
    command = "evssd bench device " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "device"] else None
    path = write_results(NAME, data, fig, command=command, root=args.results)
    for r in rows:
        print(f"  {r['op']:12s} bare loop {r['bare_loop_us']:7.1f} us   Device.run {r['device_run_us']:7.1f} us"
              f"   overhead {r['overhead_us']:+.1f} us ({r['ratio']:.3f}x)")
    print(f"  one device shared: 1 thread {shared['1']:,.0f} gathers/s, {args.threads} threads "
          f"{shared[str(args.threads)]:,.0f} gathers/s (serialised, every result checked)")
    print(f"  wrote {path}")
    return 0
