"""The board's UDP host link in gateware: request datagrams -> AXI4-Lite -> response datagrams.

:class:`UdpAxiBridge` sits on one raw UDP port of a LiteEth UDP/IP core (8 bits wide: the
``udpN_source_*`` / ``udpN_sink_*`` signals ``liteeth_gen`` exports for a ``mode: raw`` port) and
masters the board's AXI4-Lite address map (:class:`evssd.hw.boards.board.BridgeDecoder`) through
the :class:`~evssd.hw.boards.axil_executor.AxiLiteExecutor` the UART bridge uses too. The datagram format is :mod:`evssd.hw.udp_protocol` (``docs/udp-protocol.md``);
the host side is :mod:`evssd.host.udp`, whose :class:`~evssd.host.udp.UdpBridgeModel` is this
component's golden model in the tests.

One datagram at a time: the request is taken at one byte per cycle (WRITE data into a buffer,
so nothing reaches the bus before the whole datagram arrived and was checked), executed, and the
response is built in the same buffer and sent without a gap (the MAC must not run dry in the
middle of a frame). While a request executes, ``i_udp.ready`` is low and LiteEth holds the next
datagram.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, C, Mux
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4LiteSignature, Resp
from .axil_executor import AxiLiteExecutor
from ..udp_protocol import DEFAULT_PORT, FLAG_REPLAYED, MAGIC, MAX_WORDS, REQ_HEADER, RSP_HEADER, Op, UdpStatus

__all__ = ["UdpStreamSignature", "UdpAxiBridge"]


class UdpStreamSignature(wiring.Signature):
    """One direction of a LiteEth raw UDP port, 8 bits wide, from the sender's side.

    ``ip_address``, ``src_port``, ``dst_port``, ``length`` (payload bytes) hold for the whole
    datagram; ``last`` marks its final byte; ``error`` (receive side) marks a datagram LiteEth
    found damaged.
    """

    def __init__(self):
        super().__init__({
            "valid": Out(1), "ready": In(1), "data": Out(8), "last": Out(1), "error": Out(1),
            "ip_address": Out(32), "src_port": Out(16), "dst_port": Out(16), "length": Out(16),
        })


def _bytes_of(value: int, n: int) -> list[int]:
    return [(value >> (8 * i)) & 0xFF for i in range(n)]


class UdpAxiBridge(wiring.Component):
    """Request datagrams on ``i_udp`` -> AXI4-Lite on ``m_axil`` -> response datagrams on ``o_udp``.

    Ports: ``i_udp`` (``In(UdpStreamSignature())``), ``o_udp`` (``Out(...)``), ``m_axil``
    (``Out(AXI4LiteSignature(32, 32))``), one-cycle pulses ``dropped`` (a datagram not ours or
    damaged), ``refused`` (answered BAD_OPCODE/BAD_LENGTH/STALE), ``replayed``, ``bus_error``;
    ``active`` while a datagram is being executed or answered.

    ``port``: the UDP port the bridge answers (datagrams to another port are dropped; the answer
    goes back to the sender's address and port).
    """

    def __init__(self, *, port: int = DEFAULT_PORT):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port {port!r} must be a UDP port number 1..65535")
        self.port = port
        super().__init__({
            "i_udp": In(UdpStreamSignature()),
            "o_udp": Out(UdpStreamSignature()),
            "m_axil": Out(AXI4LiteSignature(addr_width=32, data_width=32)),
            "dropped": Out(1),
            "refused": Out(1),
            "replayed": Out(1),
            "bus_error": Out(1),
            "active": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rx, tx, bus = self.i_udp, self.o_udp, self.m_axil

        m.submodules.buf = buf = Memory(shape=32, depth=MAX_WORDS, init=[])
        wbuf = buf.write_port()
        rbuf = buf.read_port(transparent_for=())

        # ---- the request, as received
        pos = Signal(16)             # byte position in the datagram
        n_bytes = Signal(16)         # datagram length, set at its last byte
        damaged = Signal()
        peer_ip = Signal(32)
        peer_port = Signal(16)
        to_port = Signal(16)
        magic = Signal(16)
        op = Signal(8)
        strb = Signal(4)
        seq = Signal(32)
        hdr_addr = Signal(32)
        count = Signal(16)
        wword = Signal(32, reset_less=True)

        # ---- the board's sequence state (docs/udp-protocol.md: duplicate suppression)
        last_seq = Signal(32)
        last_resp = Signal(2)

        # ---- the response
        status = Signal(8)
        flags = Signal(8)
        resp = Signal(2)             # first non-OKAY AXI response of the request
        rsp_words = Signal(range(MAX_WORDS + 1))
        rsp_len = Signal(16)

        # ---- pulses
        for name in ("dropped", "refused", "replayed"):
            p = Signal(name=f"{name}_p")
            m.d.sync += p.eq(0)
            m.d.comb += getattr(self, name).eq(p)
            setattr(self, f"_{name}_p", p)
        active = Signal()
        m.d.comb += self.active.eq(active)

        beat = rx.valid & rx.ready
        # header fields, little-endian, by byte position
        fields = [(magic, 0, 2), (op, 2, 1), (strb, 3, 1), (seq, 4, 4), (hdr_addr, 8, 4), (count, 12, 2)]
        data_pos = pos - REQ_HEADER

        # ---- checks, registered in CHECK, acted on in DECIDE
        ours = Signal()
        op_ok = Signal()
        len_ok = Signal()
        is_read, is_write, is_ping = Signal(), Signal(), Signal()
        dist = Signal(32)            # seq - last_seq (serial-number arithmetic)

        # ---- execution: the shared executor, fed from the checked request and the buffer
        m.submodules.exe = exe = AxiLiteExecutor()
        wiring.connect(m, exe.m_axil, wiring.flipped(bus))
        m.d.comb += [rbuf.addr.eq(exe.wbuf_addr), exe.wbuf_data.eq(rbuf.data),
                     self.bus_error.eq(exe.bus_error),
                     exe.i_cmd.payload.write.eq(is_write), exe.i_cmd.payload.addr.eq(hdr_addr),
                     exe.i_cmd.payload.n_words_m1.eq(count - 1), exe.i_cmd.payload.strb.eq(strb)]


        # ---- sending
        spos = Signal(16)
        tx_word = Signal(32, reset_less=True)
        snext = Signal(range(MAX_WORDS + 1))
        header = Cat(C(MAGIC, 16), op, status, seq, resp, C(0, 6), flags,
                     rsp_words, C(0, 16 - len(rsp_words)), C(0, 32))
        assert len(header) == 8 * RSP_HEADER
        hdr_byte = Signal(8)
        with m.Switch(spos[:4]):
            for i in range(RSP_HEADER):
                with m.Case(i):
                    m.d.comb += hdr_byte.eq(header[8 * i:8 * i + 8])
        m.d.comb += [tx.ip_address.eq(peer_ip), tx.dst_port.eq(peer_port), tx.src_port.eq(self.port),
                     tx.length.eq(rsp_len), tx.error.eq(0),
                     tx.data.eq(Mux(spos < RSP_HEADER, hdr_byte, tx_word.word_select(spos[:2], 8))),
                     tx.last.eq(spos == rsp_len - 1)]

        with m.FSM():
            with m.State("RX"):
                m.d.comb += rx.ready.eq(1)
                m.d.sync += active.eq(0)
                with m.If(beat):
                    m.d.sync += pos.eq(pos + 1)
                    with m.If(pos == 0):
                        m.d.sync += [peer_ip.eq(rx.ip_address), peer_port.eq(rx.src_port),
                                     to_port.eq(rx.dst_port), damaged.eq(rx.error)]
                    with m.Else():
                        with m.If(rx.error):
                            m.d.sync += damaged.eq(1)
                    for sig, at, n in fields:
                        for i in range(n):
                            with m.If(pos == at + i):
                                m.d.sync += sig[8 * i:8 * i + 8].eq(rx.data)
                    with m.If(pos >= REQ_HEADER):
                        m.d.sync += wword.eq(Cat(wword[8:], rx.data))
                        m.d.comb += [wbuf.addr.eq(data_pos[2:]), wbuf.data.eq(Cat(wword[8:], rx.data)),
                                     wbuf.en.eq((data_pos[:2] == 3) & (pos < REQ_HEADER + 4 * MAX_WORDS))]
                    with m.If(rx.last):
                        m.d.sync += [n_bytes.eq(pos + 1), pos.eq(0), active.eq(1)]
                        m.next = "CHECK"
            with m.State("CHECK"):
                n_data = Mux(op == Op.WRITE, count << 2, 0)
                m.d.sync += [
                    ours.eq((magic == MAGIC) & (to_port == self.port) & ~damaged & (n_bytes >= REQ_HEADER)),
                    op_ok.eq(op <= Op.WRITE),
                    is_read.eq(op == Op.READ), is_write.eq(op == Op.WRITE), is_ping.eq(op == Op.PING),
                    len_ok.eq(Mux(op == Op.PING, count == 0, (count >= 1) & (count <= MAX_WORDS))
                              & (n_bytes == REQ_HEADER + n_data)),
                    dist.eq(seq - last_seq),
                    resp.eq(Resp.OKAY), flags.eq(0), rsp_words.eq(0),
                ]
                m.next = "DECIDE"
            with m.State("DECIDE"):
                with m.If(~ours):
                    m.d.sync += self._dropped_p.eq(1)
                    m.next = "RX"
                with m.Elif(~op_ok):
                    m.d.sync += [status.eq(UdpStatus.BAD_OPCODE), self._refused_p.eq(1)]
                    m.next = "SEND"
                with m.Elif(~len_ok):
                    m.d.sync += [status.eq(UdpStatus.BAD_LENGTH), self._refused_p.eq(1)]
                    m.next = "SEND"
                with m.Elif(is_ping):
                    m.d.sync += [status.eq(UdpStatus.OK), last_seq.eq(seq), last_resp.eq(0)]
                    m.next = "SEND"
                with m.Elif(is_read):
                    m.d.sync += status.eq(UdpStatus.OK)
                    m.next = "X_CMD"
                with m.Elif(dist == 0):
                    m.d.sync += [status.eq(UdpStatus.OK), resp.eq(last_resp), flags.eq(FLAG_REPLAYED),
                                 self._replayed_p.eq(1)]
                    m.next = "SEND"
                with m.Elif(dist[31]):
                    m.d.sync += [status.eq(UdpStatus.STALE), self._refused_p.eq(1)]
                    m.next = "SEND"
                with m.Else():
                    m.d.sync += status.eq(UdpStatus.OK)
                    m.next = "X_CMD"

            # ---- READ/WRITE: the executor runs the words; READ words go into the buffer
            with m.State("X_CMD"):
                m.d.comb += exe.i_cmd.valid.eq(1)
                with m.If(exe.i_cmd.ready):
                    m.next = "X_RUN"
            with m.State("X_RUN"):
                m.d.comb += [exe.o_rdata.ready.eq(1), exe.o_done.ready.eq(1)]
                with m.If(exe.o_rdata.valid):
                    m.d.comb += [wbuf.addr.eq(exe.o_rdata.payload.index),
                                 wbuf.data.eq(exe.o_rdata.payload.data), wbuf.en.eq(1)]
                with m.If(exe.o_done.valid):
                    m.d.sync += resp.eq(exe.o_done.payload.resp)
                    with m.If(is_read):
                        m.d.sync += rsp_words.eq(count)
                    with m.Else():
                        # the request is executed: remember it, so a resend is answered, not
                        # run again
                        m.d.sync += [last_seq.eq(seq), last_resp.eq(exe.o_done.payload.resp)]
                    m.next = "SEND"

            # ---- the response: header, then the buffer's words, one byte per cycle
            with m.State("SEND"):
                m.d.sync += [rsp_len.eq(RSP_HEADER + (rsp_words << 2)), spos.eq(0), snext.eq(0)]
                m.next = "SEND_DATA"
            with m.State("SEND_DATA"):
                m.d.comb += [tx.valid.eq(1), rbuf.addr.eq(snext)]
                with m.If(tx.ready):
                    m.d.sync += spos.eq(spos + 1)
                    # load the next word as the previous one (or the header) finishes; the buffer
                    # has shown word `snext` since at least a cycle
                    with m.If((spos == RSP_HEADER - 1) | ((spos >= RSP_HEADER) & (spos[:2] == 3))):
                        m.d.sync += [tx_word.eq(rbuf.data), snext.eq(snext + 1)]
                    with m.If(tx.last):
                        m.next = "RX"
        return m
