"""Int32ToFp32 against numpy's int32 -> float32 (RNE) on edge values and random stimulus."""
import numpy as np
from amaranth.sim import Simulator

from evssd.hw.lib.int_to_fp import Int32ToFp32


def run(xs, stall_seed=None):
    dut = Int32ToFp32()
    out = []
    rng = np.random.default_rng(stall_seed)

    async def tb(ctx):
        hist, i = [], 0
        while len(out) < len(xs):
            if i < len(xs) and (stall_seed is None or rng.random() < 0.6):
                ctx.set(dut.i_x, int(xs[i]) & 0xFFFF_FFFF); ctx.set(dut.i_valid, 1)
                hist.append(True); i += 1
            else:
                ctx.set(dut.i_x, 0x1234_5678); ctx.set(dut.i_valid, 0)
                hist.append(False)
            await ctx.tick()
            if len(hist) >= Int32ToFp32.LATENCY:
                assert ctx.get(dut.o_valid) == hist[-Int32ToFp32.LATENCY]
                if hist[-Int32ToFp32.LATENCY]:
                    out.append(ctx.get(dut.o_f))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(out, np.uint32)


def test_int32_to_fp32():
    rng = np.random.default_rng(8)
    edges = [0, 1, -1, 2**24, 2**24 + 1, 2**24 + 2, 2**24 + 3, 2**25 + 2, 2**25 + 6, 2**31 - 1,
             -2**31, -2**31 + 1, -(2**24 + 1), 16777217, 127, -128, 2**30 + 64, 2**30 + 192]
    rand = rng.integers(-2**31, 2**31, 6000, dtype=np.int64)
    short = rng.integers(-2**31, 2**31, 2000, dtype=np.int64) >> rng.integers(0, 31, 2000)  # every width
    ties = (rng.integers(1 << 23, 1 << 24, 1000) << rng.integers(1, 8, 1000)) + \
        (1 << (rng.integers(1, 8, 1000) - 1))                                     # exact halves
    xs = np.concatenate([edges, rand, short, np.clip(ties, -2**31, 2**31 - 1),
                         np.arange(-128, 128)]).astype(np.int32)
    got = run(xs)
    ref = xs.astype(np.float32).view(np.uint32)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(int(xs[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]
    xs = rand[:500].astype(np.int32)
    assert np.array_equal(run(xs, stall_seed=2), xs.astype(np.float32).view(np.uint32))
