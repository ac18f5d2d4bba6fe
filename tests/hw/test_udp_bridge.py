"""L1: UdpAxiBridge in amaranth.sim against the golden model (evssd.host.udp.UdpBridgeModel).

Random datagrams (PING, READ, WRITE with strobes, resent WRITEs, WRITEs older than the board's
last, bad opcode, bad length, truncated, foreign magic or port, damaged) with random gaps and
the bridge's own back-pressure on ``i_udp``, random ready stalls on ``o_udp`` and random stalls +
error responses on the AXI4-Lite side. Every response datagram, its addressing, and the memory
must equal the model's; dropped datagrams must get no answer.
"""
import gc
import random
import warnings

import pytest
from amaranth.sim import Simulator

from evssd.hw.boards.udp_bridge import UdpAxiBridge
from evssd.hw.udp_protocol import MAX_WORDS, Op, UdpStatus, decode_reply, encode_request
from evssd.host.udp import UdpBridgeModel
from .axil_models import LiteMemory, handshake, axil_slave

PORT = 7788


def _datagrams(rng, n):
    """(datagram, error flag, dst_port, kind) for ``n`` random requests; sequence numbers mostly
    increase, some repeat (a resend) or go back (a stale duplicate), and wrap past 2**32."""
    seq = 0xFFFF_FFF0
    last_write = None
    out = []
    for _ in range(n):
        kind = rng.choices(["ping", "read", "write", "resend", "stale", "badop", "badlen", "trunc",
                            "foreign", "port", "damaged", "err"], [1, 4, 5, 2, 1, 1, 1, 1, 1, 1, 1, 1])[0]
        if kind == "resend" and last_write is None:
            kind = "write"
        seq = (seq + 1) & 0xFFFF_FFFF
        count = rng.choice([1, 1, 2, 3, 8]) if rng.random() < 0.93 else rng.randrange(1, MAX_WORDS + 1)
        addr = rng.randrange(0, 0x1000 // 4) * 4
        if kind == "err":
            addr = rng.choice([0x4000_0000, 0x8000_0000]) + addr
        strb = rng.choice([0xF, 0xF, 0x1, 0x6, 0x8])
        data = bytes(rng.getrandbits(8) for _ in range(4 * count))
        dport, error = PORT, False
        if kind == "ping":
            d = encode_request(Op.PING, seq)
        elif kind == "read" or (kind == "err" and rng.random() < 0.5):
            d = encode_request(Op.READ, seq, addr, count)
        elif kind in ("write", "err", "damaged", "port", "foreign"):
            d = encode_request(Op.WRITE, seq, addr, count, strb, data)
            if kind == "write":
                last_write = d
            if kind == "damaged":
                error = True
            elif kind == "port":
                dport = PORT + 1
            elif kind == "foreign":
                d = b"\x00\x00" + d[2:]
        elif kind == "resend":
            d = last_write
        elif kind == "stale":
            d = encode_request(Op.WRITE, (seq - rng.randrange(1, 1000)) & 0xFFFF_FFFF, addr, count, strb, data)
        elif kind == "badop":
            d = bytearray(encode_request(Op.READ, seq, addr, count))
            d[2] = rng.choice([3, 0x37, 0xFF])
            d = bytes(d)
        elif kind == "badlen":
            d = bytearray(encode_request(Op.READ, seq, addr, count))
            d[12:14] = rng.choice([0, MAX_WORDS + 1, 0xFFFF]).to_bytes(2, "little")
            d = bytes(d) + (bytes(4) if rng.random() < 0.5 else b"")
        else:  # trunc: a WRITE missing bytes, or a header cut short
            d = encode_request(Op.WRITE, seq, addr, count, strb, data)
            d = d[:rng.randrange(1, len(d))]
        out.append((d, error, dport, kind))
    return out


@pytest.mark.parametrize("seed,stall", [(21, 0.0), (22, 0.5)])
def test_bridge_random_datagrams(seed, stall):
    rng = random.Random(seed)
    dut = UdpAxiBridge(port=PORT)
    hw_mem, model_mem = LiteMemory(), LiteMemory()
    model = UdpBridgeModel(model_mem.read, model_mem.write)
    rx, tx, bus = dut.i_udp, dut.o_udp, dut.m_axil
    got: list[tuple[bytes, tuple]] = []
    expected: list[tuple[bytes, tuple]] = []
    cur = bytearray()
    statuses, kinds = set(), set()
    n = 70

    async def feeder(ctx):
        await ctx.tick().repeat(2)
        for i, (d, error, dport, kind) in enumerate(_datagrams(rng, n)):
            ip, sport = rng.getrandbits(32), rng.randrange(1024, 65536)
            ctx.set(rx.ip_address, ip)
            ctx.set(rx.src_port, sport)
            ctx.set(rx.dst_port, dport)
            ctx.set(rx.length, len(d))
            damaged_at = rng.randrange(len(d)) if error else -1
            for j, b in enumerate(d):
                while rng.random() < 0.15:
                    ctx.set(rx.valid, 0)
                    await ctx.tick()
                ctx.set(rx.valid, 1)
                ctx.set(rx.data, b)
                ctx.set(rx.last, j == len(d) - 1)
                ctx.set(rx.error, j == damaged_at)
                await handshake(ctx, rx.ready)
            ctx.set(rx.valid, 0)
            ctx.set(rx.error, 0)
            reply = model.handle(d, error) if dport == PORT else None
            if reply is not None:
                expected.append((reply, (ip, sport, PORT, len(reply))))
                statuses.add(decode_reply(reply).status)
            kinds.add(kind if reply is not None or kind in ("foreign", "port", "damaged") else "?")
            while len(got) < len(expected):
                await ctx.tick()
            await ctx.tick().repeat(8)   # a dropped datagram must stay unanswered
        await ctx.tick().repeat(40)

    async def collector(ctx):
        while True:
            ctx.set(tx.ready, rng.random() >= stall)
            await ctx.tick()

    async def monitor(ctx):
        async for clk, rst, valid, ready, data, last, ip, dst, src, length in ctx.tick().sample(
                tx.valid, tx.ready, tx.data, tx.last, tx.ip_address, tx.dst_port, tx.src_port, tx.length):
            if valid and ready:
                cur.append(data)
                if last:
                    got.append((bytes(cur), (ip, dst, src, length)))
                    cur.clear()

    axi_write, axi_read = axil_slave(bus, hw_mem, rng, stall)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder)
    for p in (collector, monitor, axi_write, axi_read):
        sim.add_testbench(p, background=True)
    sim.run()
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"response {i}: got {decode_reply(g[0])} {g[1]}, expected {decode_reply(e[0])} {e[1]}"
    assert hw_mem.words == model_mem.words
    # The stream exercised every outcome.
    assert set(UdpStatus) <= statuses, statuses
    assert {"resend", "stale", "foreign", "port", "damaged", "trunc"} <= kinds, kinds


def test_bad_port_is_named():
    # a rejected component is never elaborated: its "unused" warning at collection is noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="port 0"):
            UdpAxiBridge(port=0)
        gc.collect()
