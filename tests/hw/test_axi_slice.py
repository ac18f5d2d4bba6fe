"""AXIRegisterSlice: every channel carries each beat once, in order, with random stalls on both
sides; no channel's ready or valid depends on the other side in the same cycle; full rate."""
import random

import pytest
from amaranth import Cat
from amaranth.sim import Simulator

from evssd.hw.lib.axi import AXI4LiteSignature, AXI4Signature
from evssd.hw.lib.axi_slice import CHANNELS, AXIRegisterSlice


def _run(sig, p_valid, p_ready, n=120, seed=1):
    dut = AXIRegisterSlice(sig)
    rng = random.Random(seed)
    sent, got = {}, {}
    cycles = {}
    for prefix, forward in CHANNELS.items():
        names = dut._payload_names(prefix)
        width = sum(len(getattr(dut.s, nm)) for nm in names)
        sent[prefix] = [rng.getrandbits(width) for _ in range(n)]
        got[prefix] = []

    def make(prefix, forward):
        names = dut._payload_names(prefix)
        src, dst = (dut.s, dut.m) if forward else (dut.m, dut.s)
        src_payload = Cat(*[getattr(src, nm) for nm in names])
        dst_payload = Cat(*[getattr(dst, nm) for nm in names])
        src_valid, src_ready = getattr(src, f"{prefix}valid"), getattr(src, f"{prefix}ready")
        dst_valid, dst_ready = getattr(dst, f"{prefix}valid"), getattr(dst, f"{prefix}ready")
        r = random.Random(f"{seed}-{prefix}")

        async def source(ctx):
            for v in sent[prefix]:
                ctx.set(src_payload, v)
                ctx.set(src_valid, 1)
                await ctx.tick().until(src_ready)
                ctx.set(src_valid, 0)
                while r.random() > p_valid:
                    await ctx.tick()

        async def sink(ctx):
            k = 0
            while len(got[prefix]) < n:
                ready = r.random() < p_ready
                ctx.set(dst_ready, ready)
                if ready and ctx.get(dst_valid):
                    got[prefix].append(ctx.get(dst_payload))
                await ctx.tick()
                k += 1
            ctx.set(dst_ready, 0)
            cycles[prefix] = k
        return source, sink

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for prefix, forward in CHANNELS.items():
        source, sink = make(prefix, forward)
        sim.add_testbench(source, background=True)
        sim.add_testbench(sink)
    sim.run()
    return dut, sent, got, cycles


SIGS = [AXI4Signature(addr_width=15, data_width=64, id_width=1),
        AXI4Signature(addr_width=64, data_width=128, id_width=4),
        AXI4LiteSignature(addr_width=12, data_width=32)]


@pytest.mark.parametrize("sig", SIGS, ids=repr)
@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.4), (0.6, 0.6)])
def test_axi_slice_order(sig, p_valid, p_ready):
    dut, sent, got, cycles = _run(sig, p_valid, p_ready)
    for prefix in CHANNELS:
        assert got[prefix] == sent[prefix], prefix


def test_axi_slice_covers_every_member():
    for sig in SIGS:
        dut = AXIRegisterSlice(sig)
        covered = set()
        for prefix in CHANNELS:
            covered |= set(dut._payload_names(prefix)) | {f"{prefix}valid", f"{prefix}ready"}
        assert covered == set(sig.members)


def test_axi_slice_full_rate():
    dut, sent, got, cycles = _run(SIGS[0], 1.0, 1.0)
    for prefix in CHANNELS:
        assert got[prefix] == sent[prefix]
        assert cycles[prefix] <= len(sent[prefix]) + 3, prefix


def test_axi_slice_cuts_combinational_paths():
    """Each channel's outputs (both sides) are functions of registers only: toggling the inputs
    of a channel with no clock edge changes none of its outputs."""
    dut = AXIRegisterSlice(SIGS[0])

    async def bench(ctx):
        for prefix, forward in CHANNELS.items():
            names = dut._payload_names(prefix)
            src, dst = (dut.s, dut.m) if forward else (dut.m, dut.s)
            outs = [getattr(src, f"{prefix}ready"), getattr(dst, f"{prefix}valid")] + \
                   [getattr(dst, nm) for nm in names]
            before = [ctx.get(o) for o in outs]
            ctx.set(getattr(src, f"{prefix}valid"), 1)
            ctx.set(Cat(*[getattr(src, nm) for nm in names]), -1)
            ctx.set(getattr(dst, f"{prefix}ready"), 1)
            assert [ctx.get(o) for o in outs] == before, prefix

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_axi_slice_rejects_other_signatures():
    with pytest.raises(TypeError):
        AXIRegisterSlice(object())
