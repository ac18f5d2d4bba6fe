"""RowwiseLane (one element of a row-wise INT8 bag step) against host/pooling.py: single steps
on random and special operands, then whole bags (weighted and not) fed sequentially through the
lane, equal bit for bit to ``pooling.pool(..., "int8_rowwise")``."""
import numpy as np
from amaranth.sim import Simulator

from evssd.host.elements import ELEMS
from evssd.host.pooling import canonicalize_nan, fma32_model, fp16_to_fp32_bits, fp32_add_bits, pool
from evssd.hw.device.rowwise_lane import RowwiseLane

L = RowwiseLane.LATENCY


def f32(q) -> int:
    """The lane's element input: a uint8 code widened to fp32 (exact)."""
    return int(np.float32(q).view(np.uint32))


def run(steps):
    """``steps``: list of (acc, q, scale, bias) uint32/int tuples, acc None = the previous
    output (a bag chain: the next step waits for it). Returns every output."""
    dut = RowwiseLane()
    outs = []

    async def tb(ctx):
        prev = None
        for acc, q, s, c in steps:
            ctx.set(dut.i_acc, prev if acc is None else int(acc))
            ctx.set(dut.i_x, f32(q)); ctx.set(dut.i_scale, int(s)); ctx.set(dut.i_bias, int(c))
            ctx.set(dut.i_valid, 1)
            await ctx.tick()
            ctx.set(dut.i_valid, 0)
            for _ in range(L - 1):
                assert not ctx.get(dut.o_valid)
                await ctx.tick()
            assert ctx.get(dut.o_valid)
            prev = ctx.get(dut.o_acc)
            outs.append(prev)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(outs, np.uint32)


def run_stream(acc, q, s, c):
    """Independent steps, one per cycle."""
    dut = RowwiseLane()
    outs = []

    async def tb(ctx):
        n = len(acc)
        for t in range(n + L):
            if t < n:
                ctx.set(dut.i_acc, int(acc[t])); ctx.set(dut.i_x, f32(q[t]))
                ctx.set(dut.i_scale, int(s[t])); ctx.set(dut.i_bias, int(c[t])); ctx.set(dut.i_valid, 1)
            else:
                ctx.set(dut.i_valid, 0)
            await ctx.tick()
            if ctx.get(dut.o_valid):
                outs.append(ctx.get(dut.o_acc))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(tb)
    sim.run()
    return np.array(outs, np.uint32)


def step_ref(acc, q, s, c):
    t = fp32_add_bits(acc, c).view("<f4")
    return canonicalize_nan(fma32_model(np.asarray(s, np.uint32).view("<f4"),
                                        np.asarray(q).astype(np.float32), t)).view("<u4")


def test_single_steps_random_and_special():
    rng = np.random.default_rng(11)
    n = 3000
    h = rng.integers(0, 1 << 16, (2, n)).astype(np.uint16)
    s, c = fp16_to_fp32_bits(h[0]), fp16_to_fp32_bits(h[1])    # any fp16: subnormal, inf, NaN
    acc = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    near = rng.random(n) < 0.5                                  # accumulators of a bag's size
    acc[near] = (rng.normal(0, 50, near.sum()).astype(np.float32)).view(np.uint32)
    acc[rng.random(n) < 0.05] = 0x8000_0000                     # the bag's -0.0 start
    q = rng.integers(0, 256, n)
    q[rng.random(n) < 0.1] = 0
    got = run_stream(acc, q, s, c)
    ref = step_ref(acc, q, s, c)
    bad = np.nonzero(got != ref)[0]
    assert bad.size == 0, [(hex(acc[i]), q[i], hex(s[i]), hex(c[i]), hex(ref[i]), hex(got[i])) for i in bad[:5]]


def test_bags_equal_the_pooling_definition():
    """Bags through the lane (element 0 of each row, the lane's job) equal pool(); weighted bags
    use scale*w and bias*w rounded to fp32 (computed here with the FMA model, as the merger's
    per-row Fp32Fma(scale, w, -0.0) does)."""
    rng = np.random.default_rng(3)
    rows = np.empty((12, 5), np.uint8)
    rows[:, 0:2] = rng.normal(0, 0.1, 12).astype(np.float16).view(np.uint8).reshape(12, 2)
    rows[:, 2:4] = rng.normal(0, 1, 12).astype(np.float16).view(np.uint8).reshape(12, 2)
    rows[:, 4] = rng.integers(0, 256, 12, dtype=np.uint8)
    idx = rng.integers(0, 12, 7)
    w = rng.normal(0, 2, 7).astype(np.float32)
    for weights in (None, w):
        ref = pool(rows, ELEMS["int8_rowwise"], idx, np.array([0, 7]), per_sample_weights=weights)[0, 0]
        steps = []
        for k, r in enumerate(idx):
            s = fp16_to_fp32_bits(rows[r, 0:2].view("<u2"))[0]
            c = fp16_to_fp32_bits(rows[r, 2:4].view("<u2"))[0]
            if weights is not None:
                m0 = np.float32(-0.0)
                s = fma32_model(s.view("<f4"), weights[k], m0).view("<u4")
                c = fma32_model(c.view("<f4"), weights[k], m0).view("<u4")
            steps.append((0x8000_0000 if k == 0 else None, rows[r, 4], s, c))
        got = run(steps)[-1]
        assert got == np.float32(ref).view(np.uint32), (weights is not None, hex(got))
