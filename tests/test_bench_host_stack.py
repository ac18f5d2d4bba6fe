"""The evssd host-stack measure of ``evssd bench store`` excludes exactly the modelled device:
``_DeviceClock`` counts the model transport's MMIO calls (where the model runs the commands)
and nothing else, and leaves the transport as it found it."""
import numpy as np

from evssd.host.bench.store_peers import _DeviceClock
from evssd.host.store import EmbeddingStore


def test_device_clock_counts_only_the_mmio_calls_and_unwraps():
    rng = np.random.default_rng(2)
    tables = {"a": rng.standard_normal((500, 8)).astype(np.float32),
              "b": rng.standard_normal((700, 8)).astype(np.float32)}
    store = EmbeddingStore.from_arrays(tables, "evssd", cache_fraction=1.0)
    transport = store.backend.device.transport
    calls = []
    model_run = transport.device.run
    transport.device.run = lambda: calls.append(1) or model_run()
    clock = _DeviceClock(transport)
    offs = np.array([0, 2, 3])
    req = {"a": (np.array([1, 499, 7]), offs), "b": (np.array([0, 699, 5]), offs)}
    for _ in range(2):  # the second touch admits the rows (the admission filter)
        got = store.lookup_many(req)
    assert calls and clock.seconds > 0 and clock.cpu_seconds > 0
    for name, (idx, o) in req.items():  # rows the device returned, pooled by the store
        want = np.stack([tables[name][idx[s:e]].sum(0, dtype=np.float32) for s, e in zip(o[:-1], o[1:])])
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
    # every row is cached now: a batch that needs no device command costs no device time
    before, n_calls = (clock.seconds, clock.cpu_seconds), len(calls)
    store.lookup_many(req)
    assert len(calls) == n_calls and (clock.seconds, clock.cpu_seconds) == before
    clock.close()
    assert "write32" not in transport.__dict__ and "read32" not in transport.__dict__
    store.backend.device.nop()  # the transport's own methods again
    assert (clock.seconds, clock.cpu_seconds) == before
    store.close()
