"""Driver resources and inputs on failure: every submission path is all or nothing (host memory,
queue slots), refused inputs name the argument, and the device serves ordinary requests after."""
import asyncio

import numpy as np
import pytest

from evssd.hw import regmap
from evssd.hw.regmap import Command, Opcode, Params, Status
from evssd.host.device import AsyncDevice, Device, DeviceTimeoutError
from evssd.host.model import ModelTransport
from evssd.host.regfile import MMIOError
from evssd.host.transport import TransportError

SQ_TAIL = regmap.register("SQ_TAIL").addr
PARAMS = Params(n_channels=2, page_size=1024, pages_per_channel=64)


class FaultyModel(ModelTransport):
    """The model with injectable faults on the doorbell and on host-memory writes."""

    def __init__(self, *a, map_results=True, **kw):
        super().__init__(*a, **kw)
        self.doorbell_fault = None   # None, "refuse" (MMIOError), "link" (TransportError), "lose"
        self.mem_write_fault = False
        self.map_results = map_results   # False: results go through host memory, like a board's

    def map_buffer(self, buf):
        return super().map_buffer(buf) if self.map_results else None

    async def write32(self, addr, value, strb=0xF):
        if addr == SQ_TAIL and self.doorbell_fault:
            fault, self.doorbell_fault = self.doorbell_fault, None
            if fault == "refuse":
                raise MMIOError("write", addr, 2)
            if fault == "link":
                raise TransportError("link dropped")
            return  # "lose": the write never reaches the device
        await super().write32(addr, value, strb)

    async def mem_write(self, addr, data):
        if self.mem_write_fault:
            self.mem_write_fault = False
            raise TransportError("host memory write failed")
        await super().mem_write(addr, data)


def _device(host_memory_bytes=64 << 10, map_results=True, **kw):
    transport = FaultyModel(PARAMS, host_memory_bytes=host_memory_bytes, map_results=map_results)
    dev = Device.open(transport, sq_entries=8, cq_entries=8, **kw)
    rng = np.random.default_rng(5)
    data = rng.standard_normal((300, 16)).astype(np.float32)  # 64-byte rows, 16 a page
    pages = np.zeros((-(-300 // 16), 1024), np.uint8)
    pages.reshape(-1)[:data.nbytes] = data.view(np.uint8).reshape(-1)
    dev.program_pages(0, pages)
    dev.configure_table(0, 64, "fp32", [(0, 300, 0)])
    return dev, transport, data


def _state(dev):
    aio = dev.aio
    return dev.transport.memory.free_bytes, len(dev.transport.memory._used), len(aio._inflight), \
        len(aio._done), len(dev.transport.device._maps)


def _ordinary_requests_work(dev, data):
    idx = np.array([0, 299, 17, 17], np.uint32)
    np.testing.assert_array_equal(dev.view(0, dev.gather(0, idx)), data[idx])
    pooled = dev.view(0, dev.gather_pooled(0, idx, [0, 2, 4]), pooled=True)
    np.testing.assert_allclose(pooled, [data[[0, 299]].sum(0), data[[17, 17]].sum(0)], rtol=1e-6)


@pytest.mark.parametrize("map_results", [False, True], ids=["copied", "mapped"])
def test_refused_submissions_free_everything_repeatedly(map_results):
    dev, transport, data = _device(map_results=map_results)
    start = _state(dev)
    # copied: the indices fit (4 kB), the 64 kB result does not; mapped (the result is the
    # caller's array, outside host memory): the 68 kB of indices do not
    too_many = np.zeros(17_000 if map_results else 1000, np.uint32)
    for _ in range(40):
        with pytest.raises(MemoryError, match="cannot fit"):
            dev.gather(0, too_many)
        with pytest.raises(MemoryError, match="cannot fit"):
            dev.gather_pooled(0, too_many, np.arange(too_many.size + 1, dtype=np.uint32))
        with pytest.raises(MemoryError, match="cannot fit"):
            dev.run(dev.aio.gather_many([(0, [1, 2]), (0, too_many)]))
        assert _state(dev) == start
    _ordinary_requests_work(dev, data)
    assert _state(dev) == start


@pytest.mark.parametrize("fault", ["refuse", "mem_write"])
def test_failed_submission_returns_buffers_and_slot(fault):
    dev, transport, data = _device()
    start = _state(dev)
    tail = dev.aio._sq_tail
    for _ in range(20):  # more than the ring holds: a leaked slot would fill it
        if fault == "mem_write":
            transport.mem_write_fault = True
            with pytest.raises(TransportError):
                dev.gather(0, [1, 2, 3])
        else:
            transport.doorbell_fault = "refuse"
            with pytest.raises(MMIOError):
                dev.gather(0, [1, 2, 3])
        assert _state(dev) == start and dev.aio._sq_tail == tail
    _ordinary_requests_work(dev, data)
    assert _state(dev) == start


@pytest.mark.parametrize("map_results", [False, True], ids=["copied", "mapped"])
def test_lost_doorbell_times_out_and_frees_buffers_only_with_the_late_completion(map_results):
    dev, transport, data = _device(timeout=0.2, map_results=map_results)
    start = _state(dev)
    transport.doorbell_fault = "lose"
    with pytest.raises(DeviceTimeoutError, match="not completed after 0.2 s"):
        dev.gather(0, [5, 6])
    # The device may still write the result buffer: it stays allocated (or mapped), the slot
    # stays in use.
    held = _state(dev)
    assert (held[1], held[4]) == ((start[1] + 1, start[4] + 1) if map_results else (start[1] + 2, start[4]))
    assert len(dev.aio._inflight) == 1
    _ordinary_requests_work(dev, data)  # the next doorbell also carries the lost command
    assert _state(dev) == start


def test_link_error_on_the_doorbell_abandons_the_command_until_it_completes():
    dev, transport, data = _device(timeout=0.2)
    start = _state(dev)
    transport.doorbell_fault = "link"
    with pytest.raises(TransportError, match="link dropped"):
        dev.gather(0, [5, 6])
    assert len(dev.aio._inflight) == 1 and dev.aio._inflight[next(iter(dev.aio._inflight))].abandoned
    _ordinary_requests_work(dev, data)
    assert _state(dev) == start


def test_multi_table_request_that_fails_for_one_table_leaves_nothing_in_flight():
    dev, transport, data = _device()
    dev.configure_table(1, 32, "fp32", [(0, 600, 0)])
    start = _state(dev)
    before = dev.counters()["commands"]
    # Invalid request in the middle: refused before anything is submitted.
    with pytest.raises(ValueError, match=r"offsets\[-1\]=9 is past the 2 indices"):
        dev.run(dev.aio.gather_many([(0, [1, 2]), (1, [1, 2], [0, 9]), (0, [3])]))
    assert dev.counters()["commands"] == before and _state(dev) == start
    # Second submission fails on the link: the first is finished and freed, the error is raised.
    transport.mem_write_fault = False

    async def fail_second():
        aio = dev.aio
        first = await aio.submit_gather(0, [1])
        transport.mem_write_fault = True
        try:
            await aio.submit_gather(1, [2])
        finally:
            await aio.finish(first)
    with pytest.raises(TransportError):
        dev.run(fail_second())
    assert _state(dev) == start
    # A device error for one table: the others are still finished.
    with pytest.raises(Exception, match="BAD_INDEX"):
        dev.run(dev.aio.gather_many([(0, [1]), (0, [1000]), (1, [3])]))
    assert _state(dev) == start
    out = dev.run(dev.aio.gather_many([(0, [1, 2]), (1, [4], [0, 1])]))
    np.testing.assert_array_equal(out[0].view(np.float32), data[[1, 2]])
    _ordinary_requests_work(dev, data)


def test_full_ring_wait_is_bounded_by_the_timeout():
    async def main():
        transport = FaultyModel(PARAMS, host_memory_bytes=1 << 16)
        dev = await AsyncDevice.open(transport, sq_entries=2, cq_entries=2, timeout=0.2)
        transport.doorbell_fault = "lose"
        await dev.submit(Command(opcode=Opcode.NOP))  # never reaches the device: the ring is full
        with pytest.raises(DeviceTimeoutError, match="submission ring full"):
            await dev.submit(Command(opcode=Opcode.NOP))
    asyncio.run(main())


BAD_CALLS = [
    # (call on dev, error type, message fragment naming the argument)
    (lambda d: d.gather(0, [1.5, 2.0]), TypeError, "indices must be integers"),
    (lambda d: d.gather(0, [2 ** 32]), IndexError, "indices: index 4294967296 at position 0"),
    (lambda d: d.gather(0, [-1]), IndexError, "indices: index -1"),
    (lambda d: d.gather(0, [True, False]), TypeError, "indices must be integers, got dtype bool"),
    (lambda d: d.gather(0, ["1"]), TypeError, "indices must be integers"),
    (lambda d: d.gather(0, np.zeros((2, 2), np.int64)), ValueError, "indices must be one-dimensional"),
    (lambda d: d.gather(0.0, [1]), TypeError, "table must be an integer"),
    (lambda d: d.gather(-1, [1]), ValueError, "table=-1 out of range"),
    (lambda d: d.gather(2 ** 32, [1]), ValueError, "table=4294967296 out of range"),
    (lambda d: d.gather_pooled(0, [1, 2], [0.0, 2.0]), TypeError, "offsets must be integers"),
    (lambda d: d.gather_pooled(0, [1, 2], [0, 2 ** 32]), ValueError, r"offsets\[-1\]=4294967296 is past"),
    (lambda d: d.gather_pooled(0, [1, 2], [-1, 2]), ValueError, r"offsets\[0\]=-1 is negative"),
    (lambda d: d.gather_pooled(0, [1, 2], [0, 2, 1]), ValueError, "non-decreasing"),
    (lambda d: d.gather_pooled(0, [1, 2], []), ValueError, "B\\+1 >= 1"),
    (lambda d: d.gather_pooled(0, [1, 2], [[0, 2]]), ValueError, "offsets must be one-dimensional"),
    (lambda d: d.read_pages(-1, 1), ValueError, "lba=-1 out of range"),
    (lambda d: d.read_pages(1.0, 1), TypeError, "lba must be an integer"),
    (lambda d: d.read_pages(0, -2), ValueError, "n_pages=-2 out of range"),
    (lambda d: d.read_pages(0, 2 ** 40), ValueError, "n_pages=1099511627776 out of range"),
    (lambda d: d.program_pages(-3, np.zeros(1024, np.uint8)), ValueError, "lba=-3 out of range"),
    (lambda d: d.program_pages(2.5, np.zeros(1024, np.uint8)), TypeError, "lba must be an integer"),
    (lambda d: d.program_pages(0, np.zeros(1000, np.uint8)), ValueError, "not a whole number"),
    (lambda d: d.program_pages(0, np.array([object()] * 1024)), TypeError, "numeric array"),
    (lambda d: d.set_timing(t_r=1.5), TypeError, r"t_r \(cycles\) must be an integer"),
    (lambda d: d.set_timing(t_prog=1 << 24), ValueError, r"t_prog \(cycles\)=16777216 out of range"),
    (lambda d: d.set_block_mode("yes"), TypeError, "on must be True or False"),
    (lambda d: d.configure_table(1, 64.0, "fp32", [(0, 10, 0)]), TypeError, "row_bytes must be an integer"),
    (lambda d: d.configure_table(1, 64, "fp32", [(0.5, 10, 0)]), TypeError, "extent 0 first_index"),
    (lambda d: d.configure_table(1, 64, "fp32", [(0, -1, 0)]), ValueError, "extent 0 n_rows=-1"),
    (lambda d: d.configure_table(1, 64, "fp32", [(0, 10)]), ValueError, "is not \\(first_index"),
    (lambda d: d.configure_table(1, 64, "fp32", 5), TypeError, "extents must be a list"),
    (lambda d: d.configure_table(1, 64, "fp32", [(0, 10, 0)], enable="no"), TypeError, "enable"),
    (lambda d: d.read32(2 ** 32), ValueError, "addr=4294967296 out of range"),
    (lambda d: d.read32(0x2), ValueError, "not 32-bit aligned"),
    (lambda d: d.write32(0x10, 2 ** 32), ValueError, "value=4294967296 out of range"),
    (lambda d: d.write32(0x10, -1), ValueError, "value=-1 out of range"),
    (lambda d: d.write32(0x10, 1, strb=16), ValueError, "strb=16 out of range"),
    (lambda d: d.view(0, b"\x00" * 64), TypeError, "raw must be the uint8"),
    (lambda d: d.run(d.aio.submit_raw(Command(opcode=256))), ValueError, "command.opcode=256"),
    (lambda d: d.run(d.aio.submit_raw(Command(opcode=1, count=-1))), ValueError, "command.count=-1"),
    (lambda d: d.run(d.aio.gather_many([(0,)])), ValueError, r"requests\[0\] must be"),
    (lambda d: d.run(d.aio.gather_many([(0, [1]), (0, [0.5])])), TypeError, r"requests\[1\] indices"),
]


def test_every_bad_input_is_refused_with_its_name_and_loses_nothing():
    dev, transport, data = _device()
    start = _state(dev)
    before = dev.counters()["commands"]
    for k, (call, error, fragment) in enumerate(BAD_CALLS):
        with pytest.raises(error, match=fragment):
            call(dev)
        assert _state(dev) == start, k
    assert dev.counters()["commands"] == before  # nothing reached the device
    # valid edge values still work
    assert dev.gather(0, np.array([], np.int64)).shape == (0, 64)
    np.testing.assert_array_equal(dev.view(0, dev.gather(0, np.arange(20)[::4])), data[::4][:5])
    np.testing.assert_array_equal(dev.view(0, dev.gather(np.int64(0), np.array([3], np.uint64))), data[[3]])
    assert dev.read_pages(0, 0).shape == (0, 1024)
    _ordinary_requests_work(dev, data)


def test_open_validates_its_arguments():
    for kw, error, fragment in [({"sq_entries": 6}, ValueError, "power of two"),
                                ({"sq_entries": 8.0}, TypeError, "sq_entries must be an integer"),
                                ({"cq_entries": 1}, ValueError, "cq_entries=1 out of range"),
                                ({"timeout": 0}, ValueError, "timeout=0"),
                                ({"timeout": "5"}, ValueError, "timeout='5'")]:
        with pytest.raises(error, match=fragment):
            Device.open(ModelTransport(PARAMS), **kw)


def test_device_errors_do_not_keep_buffers():
    dev, transport, data = _device()
    start = _state(dev)
    for _ in range(20):
        with pytest.raises(Exception, match="BAD_INDEX"):
            dev.gather(0, [1, 400])
        with pytest.raises(Exception, match="BAD_INDEX"):
            dev.gather_pooled(0, [1, 400], [0, 2])
        assert _state(dev) == start
    dst = dev.transport.alloc(1024)
    cpl = dev.run(dev.aio.submit_raw(Command(opcode=Opcode.READ_PAGES, count=1, lba=dev.params.total_pages,
                                             dst_addr=dst, dst_bytes=1024)))
    assert cpl.status == Status.BAD_LBA
    dev.transport.free(dst)  # a completed raw command leaves its buffers to the caller
    assert _state(dev) == start
    _ordinary_requests_work(dev, data)


def test_finishing_a_handle_twice_or_a_foreign_handle_is_refused_at_once():
    dev, transport, data = _device()
    other, _, _ = _device()
    start = _state(dev)

    async def main():
        h = await dev.aio.submit_gather(0, [1, 2])
        np.testing.assert_array_equal((await dev.aio.finish(h)).view(np.float32), data[[1, 2]])
        with pytest.raises(ValueError, match="not in flight on this device"):
            await dev.aio.finish(h)
        foreign = await other.aio.submit_gather(0, [3])
        with pytest.raises(ValueError, match="not in flight on this device"):
            await dev.aio.finish(foreign)
        await other.aio.finish(foreign)
        with pytest.raises(TypeError, match="finish takes the handle"):
            await dev.aio.finish("cid 3")
        with pytest.raises(TypeError, match="expected a CommandHandle"):
            await dev.aio.wait_for(3)
    dev.run(main())
    assert _state(dev) == start


def test_store_multi_table_batch_that_fails_for_one_table_leaves_nothing_in_flight():
    """The store's multi-table path (one command per table, overlapped) goes through
    AsyncDevice.gather_many: a table whose result does not fit leaves no other command in
    flight, and the store keeps serving."""
    from evssd.host.store import EmbeddingStore
    # results through host memory (a board's path): the one that cannot fit a large result
    transport = FaultyModel(PARAMS, host_memory_bytes=64 << 10, map_results=False)
    dev = Device.open(transport, sq_entries=8, cq_entries=8)
    rng = np.random.default_rng(1)
    tables = {"a": rng.standard_normal((200, 8)).astype(np.float32),
              "b": rng.standard_normal((3000, 8)).astype(np.float32)}
    store = EmbeddingStore.from_arrays(tables, "evssd", device=dev, cache_fraction=None)
    start = _state(dev)
    small = (np.array([1, 2, 3]), np.array([0, 1, 3]))
    many_bags = np.arange(2500)  # 2,500 bags of one row: 80 kB of sums, the window is 64 kB
    for _ in range(10):
        with pytest.raises(MemoryError, match="cannot fit"):
            store.lookup_many({"a": small, "b": (many_bags, np.arange(2501))})
        assert _state(dev) == start
    got = store.lookup_many({"a": small, "b": (np.array([5, 2999]), np.array([0, 2]))})
    np.testing.assert_allclose(got["a"], [tables["a"][1], tables["a"][[2, 3]].sum(0)], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [tables["b"][[5, 2999]].sum(0)], rtol=1e-6)
    store.close()
    dev.close()
