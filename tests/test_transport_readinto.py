"""Reading results out of host memory: ``Transport.mem_readinto`` (the base-class default over
``mem_read`` and the model's one-copy override), ``Transport.map_buffer`` (the model writes
results straight into the caller's array), results the driver hands out owning their memory,
and the sparse flash's prefetching row gather against a dense reference."""
import asyncio

import numpy as np
import pytest

from evssd.host.device import AsyncDevice
from evssd.host.model import ModelTransport
from evssd.host.sparse_flash import PREFETCH_ROWS, SparseFlash
from evssd.hw.regmap import Command, ElemType, Opcode, Status
from evssd.host.pooling import pool_bags
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


class _Unmapped(ModelTransport):
    """The model with results through host memory, as on every transport that cannot map."""

    def map_buffer(self, buf):
        return Transport.map_buffer(self, buf)


@pytest.mark.parametrize("make", [ModelTransport, _Unmapped], ids=["mapped", "copied"])
def test_finished_results_own_their_memory(make):
    """The result buffer in host memory is freed and reused by the next command (or the
    caller's mapped array is unmapped): a returned result must not change afterwards."""
    async def main():
        t = make(n_channels=2, page_size=512, max_row_bytes=256, pages_per_channel=64)
        dev = await AsyncDevice.open(t)
        rng = np.random.default_rng(2)
        pages = rng.integers(0, 256, (128, 512), dtype=np.uint8)
        await dev.program_pages(0, pages)
        await dev.configure_table(0, 64, "fp32", [(0, 128 * 8, 0)])
        flat = pages.reshape(-1, 64)
        idx1, idx2 = rng.integers(0, 1024, 300), rng.integers(0, 1024, 300)
        free_at_start = t.memory.free_bytes
        first = await dev.gather(0, idx1)
        assert first.flags.owndata or first.base is not None and first.base.flags.owndata
        second = await dev.gather(0, idx2)       # reuses the freed result buffer
        assert np.array_equal(first, flat[idx1]) and np.array_equal(second, flat[idx2])
        assert not np.shares_memory(first, t.device._host_np)
        empty = await dev.gather(0, [])
        assert empty.shape == (0, 64)
        offsets = np.array([0, 100, 100, 300])
        pooled = await dev.gather_pooled(0, idx1, offsets)
        want = pool_bags(flat.view(np.float32)[idx1], offsets, np.ones(300, bool), ElemType.FP32)
        assert pooled.tobytes() == np.ascontiguousarray(want).tobytes()
        again = await dev.gather(0, idx2)
        assert np.array_equal(first, flat[idx1]) and np.array_equal(second, flat[idx2])
        assert np.array_equal(again, second) and not np.shares_memory(again, second)
        assert not t.device._maps and t.memory.free_bytes == free_at_start
        await dev.close()

    asyncio.run(main())


def test_mapped_buffers_are_host_memory_for_the_device_until_freed():
    async def main():
        t = ModelTransport(n_channels=2, page_size=512, max_row_bytes=256, pages_per_channel=64,
                           host_memory_bytes=1 << 16)
        dev = await AsyncDevice.open(t)
        window_end = t.memory.base + t.memory.size
        a, b = np.zeros(100, np.uint8), np.zeros((3, 16), np.float32)
        addr_a, addr_b = t.map_buffer(a), t.map_buffer(b)
        # above the window, 64-byte aligned, apart (no range runs from one into the next)
        assert window_end < addr_a < addr_b and addr_a % 64 == 0 == addr_b % 64
        assert addr_b >= addr_a + 128
        await t.mem_write(addr_a + 10, b"\x01\x02\x03")
        assert a[10:13].tolist() == [1, 2, 3] and await t.mem_read(addr_a + 9, 5) == b"\x00\x01\x02\x03\x00"
        with pytest.raises(ValueError, match="outside the window and the mapped buffers"):
            await t.mem_read(addr_a + 90, 20)            # past a's end
        with pytest.raises(ValueError, match="outside the window"):
            await t.mem_write(addr_a + 100, b"\x00" * 28)   # the gap between a and b
        # the device reads and writes mapped memory: a GATHER whose indices live in a and whose
        # result goes to b
        pages = np.random.default_rng(3).integers(0, 256, (4, 512), dtype=np.uint8)
        await dev.program_pages(0, pages)
        await dev.configure_table(0, 64, "fp32", [(0, 32, 0)])   # row r: lba r // 8
        a[:12] = np.array([3, 0, 31], "<u4").view(np.uint8)
        cmd = Command(opcode=Opcode.GATHER, table=0, count=3, src_addr=addr_a, dst_addr=addr_b,
                      dst_bytes=b.nbytes)
        assert (await dev.submit_raw(cmd)).status == Status.OK
        want = pages.reshape(-1, 64)[[3, 0, 31]].view(np.float32)
        assert b.tobytes() == want.tobytes()
        # freed: the address is gone for good, a later mapping gets a new one
        t.free(addr_b)
        assert (await dev.submit_raw(cmd)).status == Status.BUS_ERROR
        assert b.tobytes() == want.tobytes()             # not written any more
        c = np.zeros(192, np.uint8)
        assert t.map_buffer(c) > addr_b
        with pytest.raises(ValueError, match="not allocated"):
            t.free(addr_b)                                # neither mapped nor allocated now
        with pytest.raises(ValueError, match="C-contiguous"):
            t.map_buffer(np.zeros((4, 4), np.uint8)[:, ::2])
        with pytest.raises(ValueError, match="cannot map 0 bytes"):
            t.map_buffer(np.zeros(0, np.uint8))
        await dev.close()

    asyncio.run(main())


def test_prefetching_gather_matches_a_dense_reference():
    rng = np.random.default_rng(9)
    ps, n_pages = 256, 300
    flash = SparseFlash(1 << 20, ps)
    dense = rng.integers(0, 256, (n_pages, ps), dtype=np.uint8)
    flash.program(100, dense)
    # word kernel (row size and every offset multiples of 4) and byte kernel (a row size or one
    # offset that is not), rows past a page's end
    for row_bytes, aligned in ((4, True), (64, True), (64, False), (100, False), (256, True)):
        n = 5 * PREFETCH_ROWS + 3
        lbas = rng.integers(0, n_pages + 50, n) + 100    # some never programmed: zeros
        offs = rng.integers(0, ps, n) & ~3
        if not aligned:
            offs[n // 2] += 1
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


def test_mapped_and_copied_results_are_the_same_bits_completions_and_cycles():
    """Random GATHER / GATHER_POOLED / weighted commands with bad lookups among them, several in
    flight: the model writing into the caller's array gives what the copied path gives."""
    from evssd.host.device import DeviceError

    rng = np.random.default_rng(11)
    params = dict(n_channels=3, ways=2, page_size=1024, max_row_bytes=256, pages_per_channel=64)
    pages = rng.integers(0, 256, (3 * 64, 1024), dtype=np.uint8)
    pages.view(np.float32)[~np.isfinite(pages.view(np.float32))] = 1.5   # finite sums only

    async def run(make):
        t = make(**params)
        dev = await AsyncDevice.open(t)
        await dev.program_pages(0, pages)
        await dev.configure_table(0, 128, "fp32", [(0, 500, 0), (800, 300, 70)])
        await dev.configure_table(1, 64, "int8", [(0, 1500, 90)])
        r = np.random.default_rng(12)
        out = []
        for _ in range(12):
            handles = []
            for _ in range(int(r.integers(1, 4))):
                table = int(r.integers(0, 2))
                valid = np.r_[0:500, 800:1100] if table == 0 else np.arange(1500)
                idx = r.choice(valid, int(r.integers(0, 300)))
                if idx.size and r.random() < 0.4:     # a few lookups in no extent
                    idx[r.integers(0, idx.size, 3)] = 600 if table == 0 else 1550
                kind = int(r.integers(0, 3))
                offsets = np.sort(r.integers(0, idx.size + 1, int(r.integers(1, 20))))
                if kind == 0:
                    handles.append(await dev.submit_gather(table, idx))
                else:
                    weights = r.standard_normal(idx.size).astype(np.float32) if kind == 2 else None
                    handles.append(await dev.submit_gather_pooled(table, idx, offsets, weights))
            for h in handles:
                try:
                    res = await dev.finish(h)
                    out.append(("ok", res.tobytes()))
                except DeviceError as exc:
                    out.append((int(exc.status), exc.completion.n_bad, exc.completion.first_bad,
                                exc.result.tobytes()))
        out.append((await dev.counters())["cycles"])
        await dev.close()
        return out

    mapped, copied = asyncio.run(run(ModelTransport)), asyncio.run(run(_Unmapped))
    assert mapped == copied
    assert sum(o[0] != "ok" for o in mapped[:-1]) > 3 and sum(o[0] == "ok" for o in mapped[:-1]) > 3
