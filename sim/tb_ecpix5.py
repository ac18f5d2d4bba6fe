"""cocotb bench: the real driver runs the ECPIX-5 core over UDP datagrams, DRAM in a bus model.

:class:`CocotbUdpLink` is a :class:`~evssd.host.udp.DatagramLink` on the core's raw UDP port
(``i_udp``/``o_udp``: the signals LiteEth's UDP core would drive), so the host's
:class:`~evssd.host.udp.UdpTransport` and the driver run unchanged; a cocotbext-axi ``AxiRam``
on ``m_axi_dram`` stands where LiteDRAM's AXI user port is on the board, with random stalls on
every channel. Timeouts are in simulated time, so a core that does not answer fails fast.

LiteDRAM's control registers (``m_dram_ctrl``) are an ``AxiLiteRam`` that says "calibrated"
(``ddrctrl_init_done = 1``), or, in ``dram_bring_up``, the register-level mock of the DFII, the
ECP5 PHY and a DDR3 chip (tests/dram_model.py): the transport's DDR3 initialisation and read
levelling then run over the real bridge.
"""
from __future__ import annotations

import collections
import os
import random

import cocotb
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteRam, AxiLiteSlave, AxiRam

from evssd.hw import regmap
from evssd.hw.bridge_protocol import DRAM_CTRL_BASE, DRAM_CTRL_BYTES
from evssd.hw.udp_protocol import FLAG_REPLAYED, Op, UdpStatus, decode_reply, encode_request
from evssd.host.dram_init import load_dram_data
from evssd.host.udp import DatagramLink, LinkTimeoutError, UdpTransport
from evssd.sim.board_scenarios import BOARD_SCENARIOS, Board
from evssd.sim.runner import load_meta
from evssd.sim.transport import quiet_cocotbext_axi, random_pause, start_clock_and_reset

PERIOD_NS = 10
HOST_IP = 0xC0A8_0102       # 192.168.1.2, the host's address the core must answer to
HOST_PORT = 50123


class _Port:
    """The flattened signals of one UDP stream port (``i_udp__valid`` ...) as attributes."""

    def __init__(self, dut, prefix):
        self._dut, self._prefix = dut, prefix

    def __getattr__(self, name):
        return getattr(self._dut, f"{self._prefix}__{name}")


class CocotbUdpLink(DatagramLink):
    """Sends request datagrams into ``dut.i_udp`` (random idle cycles between bytes) and collects
    response datagrams from ``dut.o_udp`` (random ready stalls), checking their addressing."""

    def __init__(self, dut, *, port: int, rng: random.Random, timeout_cycles: int = 20000,
                 poll_cycles: int = 200, gaps: float = 0.1, stall: float = 0.2):
        self.dut, self.port, self.rng = dut, port, rng
        self.timeout_cycles, self.poll_cycles = timeout_cycles, poll_cycles
        self.gaps, self.stall = gaps, stall
        self.name = f"cocotb-udp:{port}"
        self.rxq: collections.deque[bytes] = collections.deque()
        self.drop_next = 0          # answers to drop (a lost response)
        self.recv_step = 16         # cycles between looks for an answer (1 when measuring)
        self.sent = 0
        u = _Port(dut, "i_udp")
        u.valid.value = 0
        u.ip_address.value = HOST_IP
        u.src_port.value = HOST_PORT
        u.dst_port.value = port
        u.error.value = 0
        self._task = cocotb.start_soon(self._receiver())

    async def _receiver(self):
        o, clk = _Port(self.dut, "o_udp"), self.dut.clk
        cur = bytearray()
        while True:
            o.ready.value = int(self.rng.random() >= self.stall)
            await RisingEdge(clk)
            if int(o.valid.value) and int(o.ready.value):
                cur.append(int(o.data.value))
                if int(o.last.value):
                    assert int(o.ip_address.value) == HOST_IP, hex(int(o.ip_address.value))
                    assert int(o.dst_port.value) == HOST_PORT and int(o.src_port.value) == self.port
                    assert int(o.length.value) == len(cur), (int(o.length.value), len(cur))
                    if self.drop_next:
                        self.drop_next -= 1
                    else:
                        self.rxq.append(bytes(cur))
                    cur = bytearray()

    async def send(self, datagram: bytes) -> None:
        u, clk = _Port(self.dut, "i_udp"), self.dut.clk
        u.length.value = len(datagram)
        for i, b in enumerate(datagram):
            while self.rng.random() < self.gaps:
                u.valid.value = 0
                await RisingEdge(clk)
            u.valid.value = 1
            u.data.value = b
            u.last.value = int(i == len(datagram) - 1)
            while True:
                await RisingEdge(clk)
                if int(u.ready.value):
                    break
        u.valid.value = 0
        self.sent += 1

    async def recv(self) -> bytes:
        waited = 0
        while not self.rxq:
            if waited >= self.timeout_cycles:
                raise LinkTimeoutError(f"{self.name}: no answer within {self.timeout_cycles} cycles")
            await ClockCycles(self.dut.clk, self.recv_step)
            waited += self.recv_step
        return self.rxq.popleft()

    async def pause(self) -> None:
        await ClockCycles(self.dut.clk, self.poll_cycles)

    async def sleep(self, seconds: float) -> None:
        await ClockCycles(self.dut.clk, max(1, int(seconds * 1e9 / PERIOD_NS)))


class _CsrTarget:
    """cocotbext-axi's slave target interface over the DRAM-controller mock's registers."""

    def __init__(self, model):
        self.model = model

    async def read(self, address, length):
        return b"".join(self.model.read_word(address + i).to_bytes(4, "little") for i in range(0, length, 4))

    async def write(self, address, data):
        for i in range(0, len(data), 4):
            self.model.write_word(address + i, int.from_bytes(data[i:i + 4], "little"))


async def _setup(dut, seed_offset=0, dram=None):
    """Clock, reset, the UDP link; ``m_dram_ctrl`` gets ``dram`` (a tests/dram_model.py mock) or a
    RAM that reads "calibrated". Returns (meta, link, rng, the DRAM-control slave)."""
    meta = load_meta()
    quiet_cocotbext_axi()
    rng = random.Random(int(os.environ.get("EVSSD_SEED", "7")) + seed_offset)
    bus = AxiLiteBus.from_prefix(dut, "m_dram_ctrl", bus_separator="__")
    if dram is None:
        ctrl = AxiLiteRam(bus, dut.clk, dut.rst, size=DRAM_CTRL_BYTES)
        addr, _ = load_dram_data().reg("ddrctrl_init_done")
        ctrl.write(addr, (1).to_bytes(4, "little"))
    else:
        ctrl = AxiLiteSlave(bus, dut.clk, dut.rst, target=_CsrTarget(dram))
    quiet_cocotbext_axi()
    await start_clock_and_reset(dut, period_ns=PERIOD_NS)
    dut.dram_ready.value = 1
    link = CocotbUdpLink(dut, port=meta["top_args"].get("udp_port", 7788), rng=rng)
    return meta, link, rng, ctrl


async def _raw(link: CocotbUdpLink, datagram: bytes):
    await link.send(datagram)
    return decode_reply(await link.recv())


async def _udp_identify(board: Board, ctrl):
    """identify_and_registers' ECPIX-5 part: the DRAM controller left alone, its register
    window, and a clean link."""
    t, rng = board.transport, board.rng
    assert t.dram is not None and not t.dram.ran          # the RAM says "calibrated": left alone
    assert t.info["divisor"] == 0
    # the DRAM controller's register window: its own target, addresses relative to its base
    words = bytes(rng.getrandbits(8) for _ in range(64))
    assert await t.proto.write_words(DRAM_CTRL_BASE + 0x1000, words) == 0
    assert ctrl.read(0x1000, 64) == words
    ctrl.write(0x800, b"\x5a\xa5\x00\x01")
    data, resp = await t.proto.read_words(DRAM_CTRL_BASE + 0x800, 1)
    assert (data, resp) == (b"\x5a\xa5\x00\x01", 0)
    assert await t.read32(regmap.register("EXT_LBA").addr) == 0xDEADBEEF   # the rest still decodes
    assert t.proto.stats["retransmissions"] == 0 and t.proto.stats["stale"] == 0


def _dram_ram(dut, meta, rng):
    """The AxiRam where LiteDRAM's user port is, random stalls on every channel."""
    ram = AxiRam(AxiBus.from_prefix(dut, "m_axi_dram", bus_separator="__"), dut.clk, dut.rst,
                 size=1 << meta["top_args"]["dram_addr_width"])
    quiet_cocotbext_axi()
    for ch in (ram.read_if.r_channel, ram.read_if.ar_channel, ram.write_if.aw_channel,
               ram.write_if.w_channel, ram.write_if.b_channel):
        ch.set_pause_generator(random_pause(rng, 0.3))
    return ram


def _shared(name, scenario, seed_offset):
    """The shared board scenario ``name`` as a cocotb test of this bench (the DRAM port in an
    AxiRam when the device is built; the ECPIX-5's own checks after the shared body)."""
    async def run(dut):
        meta, link, rng, ctrl = await _setup(dut, seed_offset)
        params, device = meta["params"], meta["top_args"].get("device", False)
        ram = _dram_ram(dut, meta, rng) if device else None

        async def channels_in_own_regions():
            # every channel's pages are in its own DRAM region
            region = 1 << max(12, (params.channel_bytes - 1).bit_length())
            used = [c for c in range(params.n_channels) if any(ram.read(c * region, params.page_size))]
            assert len(used) >= 2, used

        t = await UdpTransport.create(link=link)
        board = Board("UDP", t, params, meta["top_args"]["window_bytes"], device, blob_bytes=1500,
                      after_load=channels_in_own_regions if device else None, rng=rng)
        await scenario.body(board)      # 1500 bytes: more than one datagram's 1 KiB of words
        if name == "identify_and_registers":
            await _udp_identify(board, ctrl)
    run.__name__ = run.__qualname__ = name
    run.__doc__ = scenario.body.__doc__
    return cocotb.test(run)


# every shared scenario (sim/board_scenarios.py) is a test of this bench, under its own name
_SEED_OFFSETS = {"identify_and_registers": 0, "gather_and_pooled": 2}   # 1, 3, 4: the tests below
for _i, (_name, _scenario) in enumerate(BOARD_SCENARIOS.items()):
    globals()[_name] = _shared(_name, _scenario, _SEED_OFFSETS.get(_name, 10 + _i))


@cocotb.test()
async def resent_writes_run_once(dut):
    """A resent WRITE is answered REPLAYED and not executed again; an older one is refused STALE;
    a lost answer is retransmitted by the protocol and replayed by the board; bad datagrams are
    refused or dropped and the bridge keeps working."""
    meta, link, rng, _ = await _setup(dut, 1)
    t = await UdpTransport.create(link=link)
    reg = regmap.register("EXT_FIRST").addr
    seq = t.proto._seq + 100
    w1 = encode_request(Op.WRITE, seq + 1, reg, 1, 0xF, (0x1111_1111).to_bytes(4, "little"))
    w2 = encode_request(Op.WRITE, seq + 2, reg, 1, 0xF, (0x2222_2222).to_bytes(4, "little"))
    assert (await _raw(link, w1)).flags == 0
    assert (await _raw(link, w2)).flags == 0
    r = await _raw(link, w2)                                    # resent: answered, not run again
    assert r.status == UdpStatus.OK and r.flags == FLAG_REPLAYED
    r = await _raw(link, w1)                                    # older: refused
    assert r.status == UdpStatus.STALE
    t.proto._seq = seq + 2
    assert await t.read32(reg) == 0x2222_2222, "a stale WRITE was executed"
    # a lost answer: the protocol sends the same datagram again, the board replays it
    link.drop_next = 1
    await t.write32(reg, 0x3333_3333)
    assert t.proto.stats["retransmissions"] == 1 and t.proto.stats["replayed"] == 1
    assert await t.read32(reg) == 0x3333_3333
    # refused and dropped datagrams
    bad = bytearray(encode_request(Op.READ, seq + 900, reg, 1))
    bad[2] = 0x37
    assert (await _raw(link, bytes(bad))).status == UdpStatus.BAD_OPCODE
    assert (await _raw(link, encode_request(Op.READ, seq + 901, reg, 2) + b"\0")).status == UdpStatus.BAD_LENGTH
    assert (await _raw(link, encode_request(Op.WRITE, seq + 902, reg, 2, data=bytes(8))[:-3])).status \
        == UdpStatus.BAD_LENGTH
    await link.send(b"\x00\x00" + encode_request(Op.PING, seq + 903)[2:])   # not ours: no answer
    await ClockCycles(dut.clk, 500)
    assert not link.rxq
    t.proto._seq = seq + 1000
    assert await t.read32(reg) == 0x3333_3333


@cocotb.test()
async def link_throughput(dut):
    """Cycle counts of the UDP link at the raw-port seam (no idle cycles, no back-pressure): a PING
    round trip, and READ/WRITE of a full datagram (256 words) from/to the host-memory window.
    Written as JSON to $EVSSD_LINK_JSON (cycle-accurate; the Ethernet MAC/PHY and the wire are
    not in the simulation, docs/udp-protocol.md adds them)."""
    import json
    meta, link, rng, _ = await _setup(dut, 3)
    link.gaps, link.stall, link.recv_step = 0.0, 0.0, 1
    t = await UdpTransport.create(link=link)
    words = t.proto.max_words
    base = t.alloc(4 * words)

    async def cycles(coro):
        start = cocotb.utils.get_sim_time("ns")
        await coro
        return round((cocotb.utils.get_sim_time("ns") - start) / PERIOD_NS)

    blob = bytes(rng.getrandbits(8) for _ in range(4 * words))
    out = {
        "ping_cycles": await cycles(t.proto.ping()),
        "write_1k_cycles": await cycles(t.proto.write_words(base, blob)),
        "read_1k_cycles": await cycles(t.proto.read_words(base, words)),
        "read32_cycles": await cycles(t.read32(regmap.register("ID_MAGIC").addr)),
        "words": words,
    }
    data, resp = await t.proto.read_words(base, words)
    assert data == blob and resp == 0
    path = os.environ.get("EVSSD_LINK_JSON")
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=2)
    dut._log.warning(f"UDP link: {out}")


@cocotb.test()
async def dram_bring_up(dut):
    """The DDR3 initialisation and read levelling of an uncalibrated board, run by the transport
    over the real UDP bridge and AXI-Lite split into the DRAM-controller mock: the generated
    init sequence in order, each lane at the centre of its window, then init done."""
    import sys
    sys.path.insert(0, os.environ["EVSSD_REPO"])          # the repository, for tests/dram_model.py
    from tests.dram_model import Ddr3PhyModel
    data = load_dram_data()
    dram = Ddr3PhyModel(data, {0: {1: range(2, 7)}, 1: {3: range(0, 4)}}, seed=9)
    meta, link, rng, _ = await _setup(dut, 4, dram=dram)
    link.gaps = link.stall = 0.0               # ~2,200 requests: the link's own stalls are tested above
    t = await UdpTransport.create(link=link)
    assert dram.violations == [], dram.violations
    assert [(r.bitslip, r.delay) for r in t.dram.lanes] == [(1, 4), (3, 1)], t.dram.summary()
    assert dram.values["ddrctrl_init_done"] == 1 and dram.values["sdram_dfii_control"] == data.control["sel"]
    steps = dram.init_steps()
    want = [("control" if s["kind"] == "control" else "command", s["value"]) for s in data.init_sequence]
    assert [st[:2] for st in steps[1:1 + len(want)]] == want, steps
    assert t.proto.stats["retransmissions"] == 0
