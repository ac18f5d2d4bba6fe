"""The ``rtl`` backend: the whole device's RTL in a Verilator child process behind an ordinary
transport (sim/rtl_transport.py). The store and the TorchRec face run on it unchanged and must
return what the dram backend and TorchRec return, bit for bit; a dead simulator or a failed build
is a clear TransportError, never a hang, and close() leaves no process and no file behind.

The device is DEFAULT_PARAMS, the 4-channel build of tests/test_rtl_device.py: no extra
Verilator build when both run.
"""
import os
import signal

import numpy as np
import pytest

from evssd.host.device import Device
from evssd.host.store import EmbeddingStore
from evssd.host.transport import TransportError


@pytest.fixture(scope="module")
def rtl_device():
    dev = Device.open("rtl", timeout=600)
    # Fast flash timing: these tests check results, not time (the default tPROG is 10k cycles).
    dev.set_timing(t_r=50, t_prog=100)
    yield dev
    dev.close()


def _child_gone(transport):
    return transport._child.proc.poll() is not None and not os.path.exists(transport._child.tmp)


@pytest.mark.rtl
def test_store_on_rtl_equals_dram(rtl_device):
    from evssd.sim.rtl_transport import DEFAULT_PARAMS
    assert rtl_device.params == DEFAULT_PARAMS and rtl_device.transport.name == "rtl"
    rng = np.random.default_rng(11)
    tables = {"a": rng.standard_normal((64, 16)).astype(np.float32),
              "b": rng.standard_normal((64, 8)).astype(np.float16)}
    # no cache: every lookup goes to the device (pooled bags: GATHER_POOLED; gathers and
    # weighted bags: GATHER, pooled on the host)
    rtl = EmbeddingStore.from_arrays(tables, "evssd", device=rtl_device, cache_fraction=None)
    ref = EmbeddingStore.from_arrays(tables, "dram")
    try:
        before = rtl_device.counters()["lookups"]
        lookups = 0
        for batch in range(3):
            reqs = {}
            for n in tables:
                sizes = rng.integers(0, 6, 5)
                sizes[batch] = 0                  # an empty bag in every batch
                offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
                reqs[n] = (rng.integers(0, 64, int(offsets[-1])), offsets)
                lookups += int(offsets[-1])
            got, want = rtl.lookup_many(reqs), ref.lookup_many(reqs)
            for n in tables:
                assert got[n].dtype == want[n].dtype and np.array_equal(got[n], want[n]), (batch, n)
        # every pooled lookup went through the RTL
        after_pooled = rtl_device.counters()["lookups"]
        assert after_pooled - before == lookups
        for n in tables:
            idx = rng.integers(0, 64, 9)
            assert np.array_equal(rtl.gather(n, idx), tables[n][idx])
            offsets = np.array([0, 4, 9])
            w = rng.random(9, dtype=np.float32)
            assert np.array_equal(rtl.pooled(n, idx, offsets, per_sample_weights=w),
                                  ref.pooled(n, idx, offsets, per_sample_weights=w))
        # and the gathers (the store may deduplicate the rows of a weighted request)
        assert rtl_device.counters()["lookups"] - after_pooled >= 2 * len(set(idx))
    finally:
        rtl.close()
        ref.close()


@pytest.mark.rtl
def test_torch_ebc_on_rtl_equals_torchrec(rtl_device):
    torch = pytest.importorskip("torch")
    torchrec = pytest.importorskip("torchrec")
    import evssd.torch as et
    configs = [
        torchrec.EmbeddingBagConfig(num_embeddings=50, embedding_dim=8, name="t0", feature_names=["f0", "f1"]),
        torchrec.EmbeddingBagConfig(num_embeddings=40, embedding_dim=4, name="t1", feature_names=["f2"],
                                    pooling=torchrec.PoolingType.MEAN),
    ]
    torch.manual_seed(3)
    ref = torchrec.EmbeddingBagCollection(tables=configs)
    ebc = et.EmbeddingBagCollection.from_torchrec(ref, backend="evssd", device=rtl_device, cache_fraction=None)
    try:
        rng = np.random.default_rng(4)
        keys, B = ["f2", "f0", "f1"], 4
        lens = rng.integers(0, 5, len(keys) * B)
        lens[1] = 0
        rows = {"f0": 50, "f1": 50, "f2": 40}
        vals = np.concatenate([rng.integers(0, rows[k], lens[i * B:(i + 1) * B].sum()) for i, k in enumerate(keys)])
        kjt = torchrec.KeyedJaggedTensor(keys=keys, values=torch.from_numpy(vals),
                                         lengths=torch.from_numpy(lens).to(torch.int32))
        with torch.no_grad():
            want = ref(kjt)
        got = ebc(kjt)
        assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
        assert torch.equal(got.values(), want.values()), (got.values() - want.values()).abs().max()
    finally:
        ebc.close()


@pytest.mark.rtl
def test_killed_simulator_is_a_clear_error_and_close_cleans_up():
    dev = Device.open("rtl", timeout=600)
    t = dev.transport
    assert dev.read32(0) != 0                    # the ID magic: the link works
    os.kill(t.sim_pid, signal.SIGKILL)
    with pytest.raises(TransportError, match=r"rtl: the link failed during \w+ .*simulator process "
                                             r"(exited|killed).*end of the simulator log") as exc_info:
        dev.counters()
    print(exc_info.value)
    with pytest.raises(TransportError, match="the link failed earlier"):   # at once, no second wait
        dev.read32(0)
    with pytest.raises(TransportError, match="the link failed earlier"):
        dev.close()                              # the driver's last register write fails; no hang
    assert dev.closed
    assert _child_gone(t)


@pytest.mark.rtl
def test_silent_simulator_times_out_and_is_stopped():
    """A simulator that stops answering (SIGSTOP) costs link_timeout, not a hang."""
    dev = Device.open("rtl", link_timeout=10)
    t = dev.transport
    try:
        os.kill(t.sim_pid, signal.SIGSTOP)
        with pytest.raises(TransportError, match=r"no answer to READ32 within link_timeout=10 s; "
                                                 r"simulator process still running: stopped it"):
            dev.read32(0)
        assert t._child.proc.poll() is not None    # the child was ended and reaped
    finally:
        with pytest.raises(TransportError):
            dev.close()
    assert _child_gone(t)


@pytest.mark.rtl
def test_info_cli_on_rtl(capsys):
    import json

    from evssd.host.cli import main
    from evssd.sim.rtl_transport import DEFAULT_PARAMS
    assert main(["info", "--backend", "rtl", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "rtl" and info["params"] == DEFAULT_PARAMS.as_dict()
    assert info["build_id"] == f"0x{DEFAULT_PARAMS.build_id:08x}" and info["counters"]["cycles"] > 0


def test_failed_build_is_a_clear_error(monkeypatch):
    """The child cannot build (its build directory cannot be created): a TransportError that
    quotes the child's log, and nothing left behind. Needs no Verilator run."""
    import tempfile
    before = set(os.listdir(tempfile.gettempdir()))
    monkeypatch.setenv("EVSSD_BUILD", "/proc/evssd-no-such-dir")
    with pytest.raises(TransportError, match=r"(?s)rtl: the simulator exited with status 2 before it "
                                             r"connected.*the build or the simulator failed.*evssd-no-such-dir"):
        Device.open("rtl", start_timeout=300)
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("evssd-rtl-")}
    assert not left


@pytest.mark.parametrize("kwargs,match", [
    (dict(poll_cycles=0), "poll_cycles=0"),
    (dict(stall=1.5), "stall=1.5"),
    (dict(link_timeout=-1), "link_timeout=-1"),
    (dict(start_timeout=float("nan")), "start_timeout=nan"),
    (dict(host_memory_bytes=100), "host_memory_bytes=100"),
    (dict(params={"n_channels": 99}), "n_channels=99"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Device.open("rtl", **kwargs)
