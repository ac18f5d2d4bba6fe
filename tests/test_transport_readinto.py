"""Reading results out of host memory: ``Transport.mem_readinto`` (the base-class default over
``mem_read`` and the model's one-copy override), results the driver hands out owning their
memory, and the sparse flash's prefetching row gather against a dense reference."""
import asyncio

import numpy as np
import pytest

from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.host.sparse_flash import PREFETCH_ROWS, SparseFlash
from evssd.host.transport import HostMemory, Transport


class _BytesOnly(Transport):
    """A transport with only the abstract methods (like the UART and cocotb links): host memory
    is a bytearray it copies out of, so ``mem_readinto`` is the base class's default."""

    name = "bytes-only"

    def __init__(self, size=1 << 16, base=0x1000):
        self.memory = HostMemory(base, size)
        self.mem = bytearray(size)
        self.reads = 0

    async def read32(self, addr):
        raise NotImplementedError

    async def write32(self, addr, value, strb=0xF):
        raise NotImplementedError

    async def mem_write(self, addr, data):
        off = addr - self.memory.base
        self.mem[off:off + len(data)] = data

    async def mem_read(self, addr, nbytes):
        self.reads += 1
        off = addr - self.memory.base
        if off < 0 or off + nbytes > len(self.mem):
            raise ValueError(f"host read 0x{addr:x}+{nbytes} outside the window")
        return bytes(self.mem[off:off + nbytes])

    async def wait(self):
        pass


@pytest.mark.parametrize("make", [_BytesOnly, lambda: ModelTransport(host_memory_bytes=1 << 16)],
                         ids=["default", "model"])
def test_mem_readinto_fills_every_kind_of_buffer(make):
    t = make()
    rng = np.random.default_rng(5)
    blob = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    addr = t.alloc(len(blob))

    async def main():
        await t.mem_write(addr, blob)
        arr = np.zeros((10, 100), np.uint8)
        await t.mem_readinto(addr, arr)
        assert arr.tobytes() == blob
        ba = bytearray(300)
        await t.mem_readinto(addr + 7, ba)
        assert bytes(ba) == blob[7:307]
        words = np.zeros(25, np.uint32)          # any C-contiguous buffer, counted in bytes
        await t.mem_readinto(addr + 100, memoryview(words))
        assert words.tobytes() == blob[100:200]
        guard = np.full(8, 0xEE, np.uint8)
        with pytest.raises(ValueError, match="outside the window"):
            await t.mem_readinto(t.memory.base + t.memory.size - 4, guard)
        assert (guard == 0xEE).all()              # a refused read writes nothing

    asyncio.run(main())


def test_finished_results_own_their_memory():
    """The result buffer in host memory is freed and reused by the next command: a returned
    result must not change when it is."""
    async def main():
        t = ModelTransport(n_channels=2, page_size=512, max_row_bytes=256, pages_per_channel=64)
        dev = await AsyncDevice.open(t)
        rng = np.random.default_rng(2)
        pages = rng.integers(0, 256, (128, 512), dtype=np.uint8)
        await dev.program_pages(0, pages)
        await dev.configure_table(0, 64, "fp32", [(0, 128 * 8, 0)])
        flat = pages.reshape(-1, 64)
        idx1, idx2 = rng.integers(0, 1024, 300), rng.integers(0, 1024, 300)
        first = await dev.gather(0, idx1)
        assert first.flags.owndata or first.base is not None and first.base.flags.owndata
        second = await dev.gather(0, idx2)       # reuses the freed result buffer
        assert np.array_equal(first, flat[idx1]) and np.array_equal(second, flat[idx2])
        assert not np.shares_memory(first, t.device._host_np)
        empty = await dev.gather(0, [])
        assert empty.shape == (0, 64)
        await dev.close()

    asyncio.run(main())


def test_prefetching_gather_matches_a_dense_reference():
    rng = np.random.default_rng(9)
    ps, n_pages = 256, 300
    flash = SparseFlash(1 << 20, ps)
    dense = rng.integers(0, 256, (n_pages, ps), dtype=np.uint8)
    flash.program(100, dense)
    for row_bytes in (4, 64, 100, 256):          # word and byte kernels, rows past a page's end
        n = 5 * PREFETCH_ROWS + 3
        lbas = rng.integers(0, n_pages + 50, n) + 100    # some never programmed: zeros
        offs = rng.integers(0, ps, n) & ~3 if row_bytes % 4 == 0 else rng.integers(0, ps, n)
        out = np.full((n + 1, row_bytes), 0xAA, np.uint8)
        pos = rng.permutation(n) + 1
        flash.gather(lbas, offs, row_bytes, out, pos)
        padded = np.zeros((n_pages + 50, ps + row_bytes), np.uint8)
        padded[:n_pages, :ps] = dense
        for k in range(n):
            want = padded[lbas[k] - 100, offs[k]:offs[k] + row_bytes]
            assert np.array_equal(out[pos[k]], want), (row_bytes, k)
        assert (out[0] == 0xAA).all()



def test_gather_without_bad_lookups_times_like_result_schedule():
    """The model skips :func:`result_schedule` for a GATHER without bad lookups (every row is
    ready when its own lookup retires); its cycles must be those of the full rule."""
    from evssd.host.model import translate_many
    from evssd.host.timing import TimingModel, result_schedule

    async def main():
        t = ModelTransport(n_channels=3, ways=2, page_size=512, max_row_bytes=256, pages_per_channel=64)
        dev = await AsyncDevice.open(t)
        await dev.configure_table(0, 64, "fp32", [(0, 3 * 64 * 8, 0)])
        idx = np.random.default_rng(4).integers(0, 3 * 64 * 8, 500)
        c0 = (await dev.counters())["cycles"]
        await dev.gather(0, idx)
        cycles = (await dev.counters())["cycles"] - c0
        st, lba, off = translate_many(idx, t.device.tables[0], t.params.total_pages)
        assert not st.any()
        ref = TimingModel(t.params, t_r=t.device.timing.t_r)
        ref.cycles = ref.engine_free = c0
        ref.lookups(lba % 3, lba // 3, off, 64, result_schedule(np.arange(500), np.arange(500), 64), False)
        assert cycles == ref.cycles - c0 > 500
        await dev.close()

    asyncio.run(main())
