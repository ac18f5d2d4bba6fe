"""The UDP link (docs/udp-protocol.md) over real sockets on loopback, to the bridge's golden model
in front of the functional device model: lost requests, lost and duplicated answers, late
answers to earlier attempts and foreign datagrams. Every request, WRITE included, is retried;
no WRITE reaches the bus twice; every wait ends."""
import asyncio
import socket
import threading

import numpy as np
import pytest

from evssd.hw.udp_protocol import (FLAG_REPLAYED, MAGIC, MAX_WORDS, REQ_HEADER, Op, ProtocolError, Reply,
                                   UdpStatus, decode_reply, decode_request, encode_reply, encode_request,
                                   seq_newer)
from evssd.host.device import Device
from evssd.host.dram_init import DramInitError, load_dram_data
from evssd.host.model import ModelTransport
from evssd.host.transport import TransportError
from evssd.host.udp import LinkTimeoutError, UdpBridgeModel, UdpProtocol, UdpTransport
from tests.board_model import ModelBoardBus
from tests.dram_model import Ddr3PhyModel, DramWindow
from tests.test_uart_link import PARAMS, _load_and_check


class UdpBoard:
    """A UDP server thread on 127.0.0.1: the bridge model in front of the board-bus model (tests/board_model.py).

    Faults, each drawn per datagram from a seeded generator: ``drop_req`` (the request is lost),
    ``drop_rsp`` (the answer is lost after the request executed), ``dup_rsp`` (the answer is
    sent twice), ``late`` (the answer is held back and sent before the next answer, i.e. it
    arrives after the host's retransmission), ``junk`` (a foreign datagram precedes the answer).
    ``dram``: the DRAM controller's registers (tests/dram_model.py; default: a calibrated one).
    """

    def __init__(self, *, seed=0, dram=None, **faults):
        # the bridge answers a register write before the device works on it (as the gateware does)
        self.board = ModelBoardBus(PARAMS, run_on_write=False)
        self.dram = dram or Ddr3PhyModel(load_dram_data(), {}, calibrated=True)
        self.bus = DramWindow(self.board._read, self.board._write, self.dram)
        self.writes_by_seq: dict[int, int] = {}   # bus writes made for each WRITE request
        self.words_by_seq: dict[int, int] = {}    # words each WRITE request carries
        self.model = UdpBridgeModel(self.bus.read, self._write)
        self.faults = {k: 0.0 for k in ("drop_req", "drop_rsp", "dup_rsp", "late", "junk")}
        self.faults.update(faults)
        self.rng = np.random.default_rng(seed)
        self.seen = {k: 0 for k in self.faults}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self._seq = None
        self._held = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _write(self, addr, value, strb):
        self.writes_by_seq[self._seq] = self.writes_by_seq.get(self._seq, 0) + 1
        return self.bus.write(addr, value, strb)

    def _hit(self, name):
        if self.rng.random() < self.faults[name]:
            self.seen[name] += 1
            return True
        return False

    def _run(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if self._hit("drop_req"):
                continue
            try:
                req = decode_request(data)
                self._seq = req.seq
                if req.op == Op.WRITE:
                    self.words_by_seq[req.seq] = req.count
            except ProtocolError:
                self._seq = None
            reply = self.model.handle(data)
            if reply is None or self._hit("drop_rsp"):
                continue
            out = self._held + ([b"\x00not ours"] if self._hit("junk") else [])
            self._held = []
            if self._hit("late"):
                self._held.append(reply)     # goes out before the next answer: too late for this attempt
            else:
                out += [reply] * (2 if self._hit("dup_rsp") else 1)
            for d in out:
                self.sock.sendto(d, peer)
            self.board.run_pending()

    def close(self):
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def warm_model():
    """Run the scenario once on the model in this process first: the model's first run compiles
    its kernels (seconds on a loaded machine), which is not what the link tests time out on."""
    with Device.open(ModelTransport(PARAMS), sq_entries=8, cq_entries=8) as dev:
        _load_and_check(dev, np.random.default_rng(0))


@pytest.fixture
def udp_board(request, warm_model):
    boards = []

    def make(**kw):
        b = UdpBoard(**kw)
        boards.append(b)
        return b
    yield make
    for b in boards:
        b.close()


# ------------------------------------------------------------------------------------ format

def test_datagram_format_round_trips_and_rejects_bad_arguments():
    d = encode_request(Op.WRITE, 0xFFFF_FFFF, 0x1000_0040, 2, 0x3, bytes(range(8)))
    assert len(d) == REQ_HEADER + 8 and d[:2] == MAGIC.to_bytes(2, "little")
    r = decode_request(d)
    assert (r.op, r.seq, r.addr, r.count, r.strb, r.data) == (Op.WRITE, 0xFFFF_FFFF, 0x1000_0040, 2, 3, bytes(range(8)))
    rep = decode_reply(encode_reply(Reply(Op.READ, UdpStatus.OK, 7, 3, FLAG_REPLAYED, b"abcd")))
    assert (rep.op, rep.status, rep.seq, rep.resp, rep.flags, rep.data) == (Op.READ, 0, 7, 3, 1, b"abcd")
    with pytest.raises(ValueError, match="address 0x3"):
        encode_request(Op.READ, 1, 3, 1)
    with pytest.raises(ValueError, match="word count 257"):
        encode_request(Op.READ, 1, 0, MAX_WORDS + 1)
    with pytest.raises(ValueError, match="needs 8 data bytes"):
        encode_request(Op.WRITE, 1, 0, 2, data=b"1234")
    with pytest.raises(ValueError, match="seq"):
        encode_request(Op.PING, -1)
    with pytest.raises(ProtocolError, match="magic"):
        decode_reply(b"\0" * 16)
    with pytest.raises(ProtocolError, match="COUNT"):
        decode_reply(encode_reply(Reply(Op.READ, 0, 1, data=b"abcd"))[:-1])


def test_serial_number_order_wraps():
    assert seq_newer(1, 0) and seq_newer(0, 0xFFFF_FFFF) and seq_newer(0x7FFF_FFFF, 0)
    assert not seq_newer(0, 0) and not seq_newer(0, 1) and not seq_newer(0x8000_0000, 0)


def test_bridge_model_replays_a_resent_write_and_refuses_an_older_one():
    mem = {}
    model = UdpBridgeModel(lambda a: (mem.get(a, 0), 0), lambda a, v, s: mem.__setitem__(a, v) or 0)
    assert decode_reply(model.handle(encode_request(Op.PING, 100))).status == UdpStatus.OK
    w = encode_request(Op.WRITE, 101, 0x40, 1, data=(5).to_bytes(4, "little"))
    assert decode_reply(model.handle(w)).flags == 0 and mem[0x40] == 5
    mem[0x40] = 6                                   # a later change the resend must not undo
    again = decode_reply(model.handle(w))
    assert again.status == UdpStatus.OK and again.flags == FLAG_REPLAYED and mem[0x40] == 6
    old = decode_reply(model.handle(encode_request(Op.WRITE, 99, 0x40, 1, data=bytes(4))))
    assert old.status == UdpStatus.STALE and mem[0x40] == 6
    assert decode_reply(model.handle(encode_request(Op.READ, 50, 0x40, 1))).data == (6).to_bytes(4, "little")
    assert model.handle(b"\x45\x56" + bytes(5)) is None                 # short: not ours
    assert model.handle(encode_request(Op.PING, 1), error=True) is None  # bad FCS/checksum: dropped
    bad = bytearray(encode_request(Op.READ, 102, 0, 1))
    bad[12:14] = (0).to_bytes(2, "little")
    assert decode_reply(model.handle(bytes(bad))).status == UdpStatus.BAD_LENGTH
    assert decode_reply(model.handle(encode_request(Op.WRITE, 103, 0, 2, data=bytes(8))[:-4])).status \
        == UdpStatus.BAD_LENGTH
    bad = bytearray(encode_request(Op.PING, 104))
    bad[2] = 9
    assert decode_reply(model.handle(bytes(bad))).status == UdpStatus.BAD_OPCODE


# ------------------------------------------------------------------------------------ sockets

def test_the_driver_runs_over_real_udp_sockets(udp_board):
    b = udp_board()
    with Device.open("udp", host="127.0.0.1", port=b.port, link_timeout=1.0, sq_entries=8, cq_entries=8,
                     timeout=5.0) as dev:
        _load_and_check(dev, np.random.default_rng(1))
        stats = dev.transport.proto.stats
    # (a slow first answer, e.g. while the model compiles, may be retransmitted: not asserted)
    assert stats["requests"] > 100 and stats["garbled"] == 0
    assert b.writes_by_seq and b.writes_by_seq == b.words_by_seq


def test_every_request_is_retried_and_no_write_runs_twice(udp_board):
    b = udp_board(seed=3, drop_req=0.08, drop_rsp=0.08, dup_rsp=0.1, late=0.05, junk=0.1)
    transport = UdpTransport("127.0.0.1", b.port, link_timeout=0.1, retries=10)
    with Device.open(transport, sq_entries=8, cq_entries=8, timeout=5.0) as dev:
        _load_and_check(dev, np.random.default_rng(2))
    s = transport.proto.stats
    assert min(b.seen.values()) > 0, b.seen                          # every fault happened
    assert s["retransmissions"] >= b.seen["drop_req"] + b.seen["drop_rsp"]
    assert s["replayed"] > 0                                          # resent WRITEs answered from memory
    assert s["stale"] >= b.seen["dup_rsp"] and s["garbled"] == b.seen["junk"]
    # one bus write per word of each WRITE request: a retransmission never wrote again
    assert b.writes_by_seq == b.words_by_seq


def test_a_silent_board_gives_a_clear_error_after_the_retries(udp_board):
    b = udp_board(drop_req=1.0)
    with pytest.raises(LinkTimeoutError, match=r"PING at 0x00000000 not answered after 3 attempts"):
        UdpTransport("127.0.0.1", b.port, link_timeout=0.05, retries=2)
    # nothing listening at all (ICMP port unreachable): still a timeout, not a hang or a crash
    port = b.port
    b.close()
    with pytest.raises(LinkTimeoutError, match="not answered"):
        UdpTransport("127.0.0.1", port, link_timeout=0.05, retries=1)


def test_a_stale_write_is_refused_not_executed(udp_board):
    b = udp_board()
    t = UdpTransport("127.0.0.1", b.port)
    try:
        b.model.last_seq = (t.proto._seq + 1000) & 0xFFFF_FFFF   # another host's newer session
        writes = dict(b.writes_by_seq)

        async def write():
            await t.write32(0x10, 1)
        with pytest.raises(TransportError, match="STALE"):
            asyncio.run(write())
        assert b.writes_by_seq == writes
    finally:
        asyncio.run(t.close())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="host="):
        UdpTransport()
    with pytest.raises(ValueError, match="port 70000"):
        UdpTransport("127.0.0.1", 70000)
    with pytest.raises(TransportError, match="cannot resolve host"):
        UdpTransport("no-such-host.invalid", 7788)
    with pytest.raises(ValueError, match="retries"):
        UdpProtocol(None, retries=-1)


def test_evssd_info_over_udp(udp_board, capsys):
    """`evssd info --backend udp --host ... --port ...` identifies a board over real sockets; bad
    arguments are usage errors naming the argument."""
    import json
    from evssd.host.cli import main
    b = udp_board()
    assert main(["info", "--backend", "udp", "--host", "127.0.0.1", "--port", str(b.port), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "udp" and info["params"]["n_channels"] == 2
    assert main(["info", "--backend", "udp"]) == 2
    assert "--backend udp needs --host" in capsys.readouterr().err
    assert main(["info", "--backend", "udp", "--host", "127.0.0.1", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_an_uncalibrated_board_gets_its_ddr3_brought_up_on_open(udp_board, capsys):
    """A freshly configured ECPIX-5 reports ``init_done = 0``: opening the udp backend runs the DDR3
    initialisation and read levelling (evssd.host.dram_init; here against the register-level mock,
    tests/dram_model.py), then the device works; a calibrated board is left alone; a lane that
    never reads back fails the open with an error naming it."""
    import json
    from evssd.host.cli import main
    dram = Ddr3PhyModel(load_dram_data(), {0: {2: range(1, 6)}, 1: {0: range(4, 8)}}, seed=5)
    b = udp_board(dram=dram)
    with Device.open("udp", host="127.0.0.1", port=b.port, link_timeout=1.0, sq_entries=8, cq_entries=8,
                     timeout=5.0) as dev:
        assert [(r.lane, r.bitslip, r.delay) for r in dev.transport.dram.lanes] == [(0, 2, 3), (1, 0, 5)]
        _load_and_check(dev, np.random.default_rng(4))
    assert dram.values["ddrctrl_init_done"] == 1 and dram.violations == [] and dram.rdly == [3, 5]
    assert b.writes_by_seq == b.words_by_seq          # the bring-up's writes, each executed once
    writes = dram.writes
    assert main(["info", "--backend", "udp", "--host", "127.0.0.1", "--port", str(b.port), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dram"] == "DDR3 already calibrated (ddrctrl_init_done = 1): " \
                                                          "not initialised again"
    assert dram.writes == writes
    bad = udp_board(dram=Ddr3PhyModel(load_dram_data(), {0: {0: range(8)}, 1: {}}))
    with pytest.raises(DramInitError, match="no passing read delay on lane 1"):
        UdpTransport("127.0.0.1", bad.port, link_timeout=1.0)
    assert bad.dram.values["ddrctrl_init_error"] == 1
    with pytest.raises(ValueError, match="dram_init='yes'"):
        UdpTransport("127.0.0.1", b.port, dram_init="yes")
