"""Device lifetime and concurrency: one Device shared by threads, a closed device says so,
Device.run from any thread, the backend registry keeps the interface free of implementations."""
import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from evssd.host.backends import BACKENDS, open_transport
from evssd.host.device import Device, DeviceClosedError
from evssd.host.model import ModelTransport


def _device_with_table(rows=500, dim=16, seed=0):
    dev = Device.open("model", pages_per_channel=64)
    data = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    row_bytes = dim * 4
    per_page = dev.params.page_size // row_bytes
    n_pages = -(-rows // per_page)
    pages = np.zeros((n_pages, dev.params.page_size), np.uint8)
    pages.reshape(-1)[:data.nbytes] = data.view(np.uint8).reshape(-1)
    dev.program_pages(0, pages)
    dev.configure_table(0, row_bytes, "fp32", [(0, rows, 0)])
    return dev, data


def test_one_device_shared_by_threads_serves_every_call_correctly():
    dev, data = _device_with_table()
    errors, done = [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                idx = rng.integers(0, len(data), rng.integers(1, 30)).astype(np.uint32)
                got = dev.view(0, dev.gather(0, idx))
                np.testing.assert_array_equal(got, data[idx])
                offs = np.array([0, len(idx) // 2, len(idx)], np.uint32)
                pooled = dev.view(0, dev.gather_pooled(0, idx, offs), pooled=True)
                want = np.stack([data[idx[:len(idx) // 2]].sum(0), data[idx[len(idx) // 2:]].sum(0)])
                np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-5)
            done.append(seed)
        except BaseException as exc:  # reported below with the thread's seed
            errors.append((seed, exc))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(done) == list(range(6))
    free = dev.transport.memory.free_bytes
    dev.nop()
    assert dev.transport.memory.free_bytes == free and not dev.aio._inflight
    dev.close()


def test_closed_device_says_it_is_closed_on_every_call():
    dev, data = _device_with_table()
    dev.close()
    dev.close()  # twice is harmless
    assert dev.closed
    calls = [lambda: dev.gather(0, [1]), lambda: dev.gather_pooled(0, [1], [0, 1]), dev.nop,
             dev.counters, dev.clear_counters, lambda: dev.read32(0), lambda: dev.write32(0x10, 0),
             lambda: dev.configure_table(1, 64, "fp32", [(0, 10, 0)]), lambda: dev.set_timing(t_r=5),
             lambda: dev.set_block_mode(True), lambda: dev.program_pages(0, np.zeros(4096, np.uint8)),
             lambda: dev.read_pages(0, 1), lambda: dev.run(dev.aio.nop())]
    for call in calls:
        with pytest.raises(DeviceClosedError, match="the device is closed"):
            call()


def test_async_device_refuses_after_close():
    async def main():
        dev, _ = None, None
        from evssd.host.device import AsyncDevice
        dev = await AsyncDevice.open(ModelTransport())
        await dev.close()
        with pytest.raises(DeviceClosedError, match="closed"):
            await dev.nop()
        with pytest.raises(DeviceClosedError, match="closed"):
            await dev.submit_gather(0, [1])
    asyncio.run(main())


def test_run_is_public_and_runs_several_commands_in_one_call():
    dev, data = _device_with_table()

    async def two():
        a = await dev.aio.submit_gather(0, [1, 2])
        b = await dev.aio.submit_gather(0, [3])
        return await dev.aio.finish(a), await dev.aio.finish(b)
    a, b = dev.run(two())
    np.testing.assert_array_equal(dev.view(0, a), data[[1, 2]])
    np.testing.assert_array_equal(dev.view(0, b), data[[3]])
    with pytest.raises(TypeError, match="takes a coroutine"):
        dev.run(dev.aio.nop)
    dev.close()


def test_run_from_a_thread_that_runs_its_own_event_loop():
    dev, data = _device_with_table()

    async def handler():  # e.g. an asyncio server calling the synchronous facade
        return dev.gather(0, [5])
    np.testing.assert_array_equal(dev.view(0, asyncio.run(handler())), data[[5]])
    dev.close()


def test_run_inside_a_coroutine_of_the_same_device_is_refused_clearly():
    dev, _ = _device_with_table()

    async def nested():
        return dev.nop()
    with pytest.raises(RuntimeError, match="already running on this device"):
        dev.run(nested())
    dev.nop()  # still usable
    dev.close()


def test_open_failure_closes_the_transport():
    closed = []

    class Spy(ModelTransport):
        async def read32(self, addr):
            return 0xDEADBEEF

        async def close(self):
            closed.append(True)
    with pytest.raises(Exception, match="no EV-SSD here"):
        Device.open(Spy())
    assert closed == [True]
    with pytest.raises(TypeError, match="pages_per_channel"):
        Device.open(ModelTransport(), pages_per_channel=4)


def test_transport_interface_imports_no_implementation():
    code = ("import sys, evssd.host.transport; "
            "bad = [m for m in ('evssd.host.model', 'evssd.host.uart', 'evssd.host.backends', "
            "'evssd.sim.transport', 'serial') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registry_makes_backends_by_name():
    t = open_transport("model", n_channels=2)
    assert isinstance(t, ModelTransport) and t.params.n_channels == 2
    assert set(BACKENDS) >= {"model", "uart", "cocotb"}
    with pytest.raises(ValueError, match=r"unknown backend 'ssd'.*model"):
        open_transport("ssd")
    with pytest.raises(ValueError, match="only exists inside a cocotb test"):
        open_transport("cocotb")


def test_interrupted_call_leaves_nothing_running_on_the_loop():
    dev, data = _device_with_table()

    async def interrupted():
        async def background():
            await asyncio.sleep(3600)
        asyncio.ensure_future(background())
        await asyncio.sleep(0)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        dev.run(interrupted())
    assert not [t for t in asyncio.all_tasks(dev._loop) if not t.done()]
    np.testing.assert_array_equal(dev.view(0, dev.gather(0, [7])), data[[7]])
    dev.close()


def test_concurrent_submissions_on_one_async_device_are_refused_clearly():
    from evssd.hw.regmap import Command, Opcode

    class SlowModel(ModelTransport):
        async def mem_write(self, addr, data):
            await asyncio.sleep(0)  # a real link yields here
            await super().mem_write(addr, data)

    async def main():
        from evssd.host.device import AsyncDevice
        dev = await AsyncDevice.open(SlowModel(), sq_entries=8, cq_entries=8)
        results = await asyncio.gather(dev.submit(Command(opcode=Opcode.NOP)),
                                       dev.submit(Command(opcode=Opcode.NOP)), return_exceptions=True)
        assert isinstance(results[1], RuntimeError) and "one task at a time" in str(results[1])
        await dev.wait_for(results[0])
        assert not dev._inflight and await dev.nop()
    asyncio.run(main())


@pytest.mark.parametrize("backend", ["dram", "file", "evssd"])
def test_a_closed_store_says_it_is_closed(backend):
    from evssd.host.store import EmbeddingStore, StoreClosedError
    store = EmbeddingStore.from_arrays({"a": np.ones((100, 8), np.float32)}, backend)
    assert store.gather("a", np.array([1]))[0, 0] == 1.0
    store.close()
    store.close()  # twice is harmless
    calls = [lambda: store.gather("a", np.array([1, 2])),
             lambda: store.pooled("a", np.array([1, 2]), np.array([0, 2])),
             lambda: store.lookup_many({"a": (np.array([1]), np.array([0, 1]))})]
    for call in calls:
        with pytest.raises(StoreClosedError, match=f"the store is closed \\(its {backend} backend"):
            call()
