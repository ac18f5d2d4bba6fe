"""The driver's multi-command submission (``AsyncDevice.gather_many``): every command of a batch
is staged first and handed over with one doorbell write, batches larger than the ring go in
turns, results land in the caller's ``out`` arrays on both result paths (mapped and copied), and
every failure leaves nothing allocated and nothing in flight."""
import asyncio

import numpy as np
import pytest

from evssd.host.device import Device
from evssd.host.regfile import MMIOError
from evssd.host.transport import TransportError
from tests.test_driver_failures import PARAMS, SQ_TAIL, FaultyModel, _ordinary_requests_work, _state


class CountingModel(FaultyModel):
    """Counts doorbell writes and the commands the device took with each."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.doorbells = []

    async def write32(self, addr, value, strb=0xF):
        if addr == SQ_TAIL and not self.doorbell_fault:
            before = self.device.sq_head
            await super().write32(addr, value, strb)
            self.doorbells.append((value - before) % self.device.regs.fields["sq_size_entries"])
            return
        await super().write32(addr, value, strb)


def _device(sq_entries=8, map_results=True, n_tables=3):
    transport = CountingModel(PARAMS, host_memory_bytes=64 << 10, map_results=map_results)
    dev = Device.open(transport, sq_entries=sq_entries, cq_entries=sq_entries)
    rng = np.random.default_rng(11)
    data = rng.standard_normal((300, 16)).astype(np.float32)  # 64-byte rows, 16 a page
    pages = np.zeros((-(-300 // 16), 1024), np.uint8)
    pages.reshape(-1)[:data.nbytes] = data.view(np.uint8).reshape(-1)
    dev.program_pages(0, pages)
    for t in range(n_tables):  # the same rows under several table slots
        dev.configure_table(t, 64, "fp32", [(0, 300, 0)])
    transport.doorbells.clear()
    return dev, transport, data


def _requests(rng, n, n_tables):
    reqs, want = [], []
    for k in range(n):
        idx = rng.integers(0, 300, int(rng.integers(1, 40)))
        if k % 3 == 2:  # a pooled request among the gathers
            offs = np.concatenate([[0], np.sort(rng.integers(0, idx.size + 1, 3)), [idx.size]])
            reqs.append((k % n_tables, idx, offs))
            want.append(("pooled", idx, offs))
        else:
            reqs.append((k % n_tables, idx.astype(np.uint32)))
            want.append(("rows", idx, None))
    return reqs, want


@pytest.mark.parametrize("map_results", [True, False], ids=["mapped", "copied"])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 20])
def test_batch_is_one_doorbell_per_ring_load_and_matches_single_commands(map_results, n):
    dev, transport, data = _device(sq_entries=8, map_results=map_results)
    rng = np.random.default_rng(n)
    start = _state(dev)
    for _ in range(3):
        reqs, want = _requests(rng, n, 3)
        outs = [np.full((r[1].size, 64), 0xAB, np.uint8) if len(r) == 2 and k % 2 else None
                for k, r in enumerate(reqs)]
        transport.doorbells.clear()
        got = dev.run(dev.aio.gather_many(reqs, out=outs))
        # at most sq_entries - 1 = 7 commands a doorbell, in order
        assert transport.doorbells == [min(7, n - s) for s in range(0, n, 7)]
        for k, ((kind, idx, offs), res) in enumerate(zip(want, got)):
            if kind == "rows":
                np.testing.assert_array_equal(res.view(np.float32), data[idx])
                if outs[k] is not None:
                    assert res is outs[k]
            else:
                sums = np.stack([data[idx[a:b]].sum(0, dtype=np.float32) for a, b in zip(offs[:-1], offs[1:])])
                np.testing.assert_allclose(res.view(np.float32), sums, rtol=1e-5, atol=1e-5)
                # the device's sums follow the pooling definition: bit for bit as single commands
                np.testing.assert_array_equal(res, dev.gather_pooled(reqs[k][0], idx, offs))
        assert _state(dev) == start


@pytest.mark.parametrize("fault", ["refuse", "link", "mem_write", "memory"])
def test_failed_batch_leaves_nothing_behind(fault):
    dev, transport, data = _device(map_results=False)
    start = _state(dev)
    tail = dev.aio._sq_tail
    reqs = [(0, [1, 2]), (1, [3]), (2, [4, 5, 6], [0, 1, 3])]
    for _ in range(10):  # more than the ring holds: a leaked slot would fill it
        if fault == "refuse":
            transport.doorbell_fault = "refuse"
            with pytest.raises(MMIOError):
                dev.run(dev.aio.gather_many(reqs))
        elif fault == "mem_write":
            transport.mem_write_fault = True
            with pytest.raises(TransportError):
                dev.run(dev.aio.gather_many(reqs))
        elif fault == "memory":  # the last request's result does not fit host memory
            with pytest.raises(MemoryError, match="cannot fit"):
                dev.run(dev.aio.gather_many(reqs[:2] + [(0, np.zeros(1500, np.uint32))]))
        else:
            transport.doorbell_fault = "link"
            with pytest.raises(TransportError, match="link dropped"):
                dev.run(dev.aio.gather_many(reqs))
            # the device may have seen them: in flight, abandoned, freed by the next doorbell
            assert len(dev.aio._inflight) == 3 and all(h.abandoned for h in dev.aio._inflight.values())
            _ordinary_requests_work(dev, data)
        assert _state(dev) == start
        if fault != "link":
            assert dev.aio._sq_tail == tail
    got = dev.run(dev.aio.gather_many(reqs[:2]))
    np.testing.assert_array_equal(got[0].view(np.float32), data[[1, 2]])
    assert _state(dev) == start


@pytest.mark.parametrize("bad, match", [
    ("not a list", "out must be None or a list of 2 entries"),
    ([None], "out must be None or a list of 2 entries"),
    ([np.zeros((2, 64), np.float32), None], r"out\[0\] must be a writeable C-contiguous uint8 array of shape \(2, 64\)"),
    ([np.zeros((3, 64), np.uint8), None], r"out\[0\] must be .* shape \(2, 64\), got uint8 \(3, 64\)"),
    ([np.zeros((2, 128), np.uint8)[:, :64], None], r"out\[0\] must be a writeable C-contiguous"),
    ([None, np.zeros((1, 64), np.uint8)], r"out\[1\]: a GATHER_POOLED request takes no out array"),
])
def test_bad_out_is_refused_before_anything_is_submitted(bad, match):
    dev, transport, data = _device()
    start = _state(dev)
    before = dev.counters()["commands"]
    with pytest.raises(ValueError, match=match):
        dev.run(dev.aio.gather_many([(0, [1, 2]), (1, [3], [0, 1])], out=bad))
    assert dev.counters()["commands"] == before and _state(dev) == start


def test_submit_gather_out_receives_the_rows():
    dev, transport, data = _device(map_results=False)
    out = np.zeros((3, 64), np.uint8)

    async def main():
        h = await dev.aio.submit_gather(0, [7, 0, 299], out=out)
        return await dev.aio.finish(h)
    res = dev.run(main())
    assert res is out
    np.testing.assert_array_equal(out.view(np.float32), data[[7, 0, 299]])
    with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous uint8 array of shape \(1, 64\)"):
        dev.run(dev.aio.submit_gather(0, [1], out=out))


class SuspendingModel(FaultyModel):
    """The model whose host-memory reads suspend on a future of the running loop first (like a
    link that waits for its answer), and may fail after the suspension."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.fail_reads = False

    async def mem_read(self, addr, nbytes):
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_result, None)
        await fut
        await asyncio.sleep(0)
        if self.fail_reads:
            raise TransportError("read timed out")
        return await super().mem_read(addr, nbytes)


def test_inline_runs_finish_in_place_over_the_model_and_continue_on_the_loop_when_they_suspend():
    import asyncio as aio_mod
    model = Device.open("model")
    assert model._inline  # the model opened by name: no task per call
    model.close()
    transport = SuspendingModel(PARAMS, host_memory_bytes=64 << 10, map_results=False)
    dev = Device.open(transport, sq_entries=8, cq_entries=8)
    assert not dev._inline
    dev._inline = True  # the inline path over a transport that does suspend
    rng = np.random.default_rng(3)
    data = rng.standard_normal((300, 16)).astype(np.float32)
    pages = np.zeros((-(-300 // 16), 1024), np.uint8)
    pages.reshape(-1)[:data.nbytes] = data.view(np.uint8).reshape(-1)
    dev.program_pages(0, pages)
    dev.configure_table(0, 64, "fp32", [(0, 300, 0)])
    start = _state(dev)
    for _ in range(3):
        got = dev.run(dev.aio.gather_many([(0, [4, 5]), (0, [299])]))
        np.testing.assert_array_equal(got[0].view(np.float32), data[[4, 5]])
        np.testing.assert_array_equal(got[1].view(np.float32), data[[299]])
        assert _state(dev) == start
    # an error after the suspension reaches the caller; nothing is left on the loop
    transport.fail_reads = True
    with pytest.raises(TransportError, match="read timed out"):
        dev.gather(0, [1])
    assert not [t for t in aio_mod.all_tasks(dev._loop) if not t.done()]
    transport.fail_reads = False
    _ordinary_requests_work(dev, data)
    # refused from inside a coroutine running on the device, on either path
    async def nested():
        return dev.run(dev.aio.nop())
    with pytest.raises(RuntimeError, match="await the coroutine instead"):
        dev.run(nested())
    dev.close()


def test_failure_in_a_later_ring_load_finishes_the_earlier_ones_and_frees_everything():
    dev, transport, data = _device(sq_entries=4, map_results=False)  # 3 commands a doorbell
    start = _state(dev)
    before = dev.counters()["commands"]
    reqs = [(k % 3, [k, k + 1]) for k in range(5)] + [(0, np.zeros(1500, np.uint32)), (1, [9])]
    with pytest.raises(MemoryError, match="cannot fit"):  # the 6th result does not fit
        dev.run(dev.aio.gather_many(reqs))
    # the first ring load ran and was finished; nothing of the second reached the device
    assert dev.counters()["commands"] == before + 3
    assert transport.doorbells == [3]
    assert _state(dev) == start
    got = dev.run(dev.aio.gather_many(reqs[:5] + reqs[6:]))
    for (t, idx), res in zip(reqs[:5] + reqs[6:], got):
        np.testing.assert_array_equal(res.view(np.float32), data[idx])
    assert _state(dev) == start


@pytest.mark.parametrize("map_results", [True, False], ids=["mapped", "copied"])
def test_a_batch_shares_two_buffers_held_until_its_last_late_completion(map_results):
    """A batch's index arrays go to the device in one host buffer and its driver-made results in
    one array (or one host buffer): staged, a batch of three holds two allocations (or one
    allocation and one mapping), not six. When its doorbell is lost, every command times out and
    is abandoned: both buffers stay while the device may still write them, and go with the late
    completions the next doorbell brings."""
    from evssd.host.device import DeviceTimeoutError
    dev, transport, data = _device(map_results=map_results)
    dev.aio.timeout = 0.2
    start = _state(dev)
    reqs = [(0, [1, 2]), (1, [3]), (2, [4, 5, 6], [0, 1, 3])]
    transport.doorbell_fault = "lose"
    with pytest.raises(DeviceTimeoutError, match="not completed after 0.2 s"):
        dev.run(dev.aio.gather_many(reqs))
    held = _state(dev)
    assert len(dev.aio._inflight) == 3 and all(h.abandoned for h in dev.aio._inflight.values())
    assert (held[1] - start[1], held[4] - start[4]) == ((1, 1) if map_results else (2, 0))
    _ordinary_requests_work(dev, data)   # the next doorbell carries the lost batch too
    assert _state(dev) == start
    got = dev.run(dev.aio.gather_many(reqs))
    np.testing.assert_array_equal(got[0].view(np.float32), data[[1, 2]])
    np.testing.assert_array_equal(got[1].view(np.float32), data[[3]])
    assert _state(dev) == start
