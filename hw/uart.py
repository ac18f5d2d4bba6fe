"""The host link of the board: an 8N1 UART and a framed UART-to-AXI-Lite bridge.

- :class:`UartRx`: serial line -> byte stream (mid-bit sampling, start-bit glitch rejection,
  stop-bit check). The line cannot be back-pressured: a byte that arrives while the previous one
  is still unread replaces it and pulses ``overrun``.
- :class:`UartTx`: byte stream -> serial line.
- :class:`UartAxiBridge`: parses request frames from the byte stream, checks their CRC-8, runs
  them as AXI4-Lite transactions on ``m_axil`` and answers with a response frame. The frame
  format is in ``docs/uart-protocol.md``; the host side is :mod:`evssd.host.uart` (whose encoder
  and decoder are the golden model of this bridge in the tests).

The bit time is ``divisor`` clock cycles, so a simulation can use 4 cycles per bit while the
board uses ``clock_hz // baud``.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, C
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, Resp

__all__ = ["UartRx", "UartTx", "UartAxiBridge", "crc8", "crc8_byte", "SOF_REQUEST", "SOF_RESPONSE",
           "Op", "FrameStatus", "MAX_WORDS"]

# Frame constants. The host library must import without Amaranth, so evssd.host.uart keeps its
# own copy; tests/hw/test_uart.py checks that both agree.
SOF_REQUEST = 0xA5
SOF_RESPONSE = 0x5A
MAX_WORDS = 256          # words per frame: COUNT holds words - 1 in one byte
CRC8_POLY = 0x07         # CRC-8 (x^8 + x^2 + x + 1), init 0, no reflection, no final xor


class Op:
    PING = 0x00
    READ = 0x01
    WRITE = 0x02


class FrameStatus:
    OK = 0x00
    CRC_ERROR = 0x01     # checksum mismatch: nothing was executed
    BAD_OPCODE = 0x02    # unknown opcode: nothing was executed
    TIMEOUT = 0x03       # the line went idle in the middle of a frame: nothing was executed


def crc8_byte(crc: int, byte: int) -> int:
    """Python reference of the CRC-8 update the gateware builds."""
    crc ^= byte
    for _ in range(8):
        crc = ((crc << 1) ^ CRC8_POLY) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def crc8(data: bytes, crc: int = 0) -> int:
    for b in data:
        crc = crc8_byte(crc, b)
    return crc


def _crc8_next(crc, byte):
    """CRC-8 update as an XOR network: each output bit is the parity of a fixed set of input
    bits, found by running the bit-serial algorithm on unit vectors at elaboration time."""
    data = crc ^ byte
    outs = []
    for o in range(8):
        taps = [i for i in range(8) if crc8_byte(0, 1 << i) >> o & 1]
        bit = C(0, 1)
        for i in taps:
            bit = bit ^ data[i]
        outs.append(bit)
    return Cat(*outs)


def _check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < 4:
        raise ValueError(f"UART divisor {divisor!r} must be an integer >= 4 (clock cycles per bit)")


class UartRx(wiring.Component):
    """Serial line (8N1, LSB first) -> ``o_data`` byte stream.

    Ports: ``rx`` (line, idle high), ``o_data`` (``stream.Signature(8)``), ``frame_error`` and
    ``overrun`` (one-cycle pulses).
    """

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self.divisor = divisor
        super().__init__({
            "rx": In(1, init=1),
            "o_data": Out(stream.Signature(8)),
            "frame_error": Out(1),
            "overrun": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        # Two flops: the line is asynchronous to our clock.
        sync1 = Signal(init=1)
        line = Signal(init=1)
        m.d.sync += [sync1.eq(self.rx), line.eq(sync1)]

        count = Signal(range(d))
        bit = Signal(range(8))
        shreg = Signal(8)

        with m.If(self.o_data.ready):
            m.d.sync += self.o_data.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += count.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(count == 0):
                    with m.If(line):
                        m.next = "IDLE"      # a glitch, not a start bit
                    with m.Else():
                        m.d.sync += [count.eq(d - 1), bit.eq(0)]
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("DATA"):
                with m.If(count == 0):
                    m.d.sync += [shreg.eq(Cat(shreg[1:], line)), count.eq(d - 1), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("STOP"):
                with m.If(count == 0):
                    with m.If(line):
                        m.d.sync += [self.o_data.payload.eq(shreg), self.o_data.valid.eq(1)]
                        m.d.comb += self.overrun.eq(self.o_data.valid & ~self.o_data.ready)
                    with m.Else():
                        m.d.comb += self.frame_error.eq(1)
                    # Back to IDLE in the middle of the stop bit: the next start edge may come
                    # half a bit early from a fast sender.
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
        return m


class UartTx(wiring.Component):
    """``i_data`` byte stream -> serial line (8N1, LSB first). Ports: ``i_data``, ``tx``, ``busy``."""

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self.divisor = divisor
        super().__init__({
            "i_data": In(stream.Signature(8)),
            "tx": Out(1, init=1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        count = Signal(range(d))
        shreg = Signal(10, init=0x3FF)
        bits = Signal(range(11))
        m.d.comb += [self.tx.eq(shreg[0]), self.busy.eq(bits != 0),
                     self.i_data.ready.eq(bits == 0)]
        with m.If(bits == 0):
            with m.If(self.i_data.valid):
                m.d.sync += [shreg.eq(Cat(C(0, 1), self.i_data.payload, C(1, 1))),
                             bits.eq(10), count.eq(d - 1)]
        with m.Elif(count == 0):
            m.d.sync += [shreg.eq(Cat(shreg[1:], C(1, 1))), bits.eq(bits - 1), count.eq(d - 1)]
        with m.Else():
            m.d.sync += count.eq(count - 1)
        return m


class UartAxiBridge(wiring.Component):
    """Request frames on ``i_rx`` -> AXI4-Lite transactions on ``m_axil`` -> response frames on
    ``o_tx``.

    Ports:
    - ``i_rx``: ``In(stream.Signature(8))`` received bytes (from :class:`UartRx`).
    - ``o_tx``: ``Out(stream.Signature(8))`` bytes to send (to :class:`UartTx`).
    - ``m_axil``: ``Out(AXI4LiteSignature(addr_width=32, data_width=32))``.
    - ``crc_error``, ``bus_error``, ``timeout``: one-cycle pulses (for LEDs and counters).
    - ``active``: a frame is being received or executed.

    ``idle_timeout``: cycles without a byte in the middle of a frame after which the frame is
    dropped (answered with TIMEOUT), so a truncated frame or a corrupted COUNT cannot wedge the
    bridge. WRITE data is held in a buffer until its CRC checked: a corrupted frame never
    reaches the bus.
    """

    def __init__(self, *, idle_timeout: int):
        if not isinstance(idle_timeout, int) or idle_timeout < 16:
            raise ValueError(f"idle_timeout {idle_timeout!r} must be an integer >= 16 cycles")
        self.idle_timeout = idle_timeout
        super().__init__({
            "i_rx": In(stream.Signature(8)),
            "o_tx": Out(stream.Signature(8)),
            "m_axil": Out(AXI4LiteSignature(addr_width=32, data_width=32)),
            "crc_error": Out(1),
            "bus_error": Out(1),
            "timeout": Out(1),
            "active": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rx, tx, bus = self.i_rx, self.o_tx, self.m_axil

        m.submodules.buf = buf = Memory(shape=32, depth=MAX_WORDS, init=[])
        wbuf = buf.write_port()
        rbuf = buf.read_port(transparent_for=())

        op = Signal(8)
        tag = Signal(8)
        addr = Signal(32)
        count = Signal(8)        # words - 1
        strb = Signal(4)
        hdr_idx = Signal(range(8))
        byte_idx = Signal(2)
        word_idx = Signal(range(MAX_WORDS + 1))
        word = Signal(32)
        rx_crc = Signal(8)
        tx_crc = Signal(8)
        fstatus = Signal(8)
        resp = Signal(2)         # first non-OKAY response of the frame
        got_err = Signal()
        aw_done = Signal()
        w_done = Signal()
        idle = Signal(range(self.idle_timeout + 1))

        # Received bytes are always taken (the UART cannot wait); the FSM decides what they mean.
        m.d.comb += rx.ready.eq(1)
        take = rx.valid
        rx_crc_next = _crc8_next(rx_crc, rx.payload)
        tx_crc_next = _crc8_next(tx_crc, tx.payload)
        with m.If(tx.valid & tx.ready):
            m.d.sync += tx_crc.eq(tx_crc_next)

        def send(value, next_state):
            m.d.comb += [tx.valid.eq(1), tx.payload.eq(value)]
            with m.If(tx.ready):
                m.next = next_state

        def note_resp(r):
            with m.If((r != Resp.OKAY) & ~got_err):
                m.d.sync += [resp.eq(r), got_err.eq(1)]
            with m.If(r != Resp.OKAY):
                m.d.comb += self.bus_error.eq(1)

        # Inter-byte timeout inside a frame.
        in_frame = Signal()
        with m.If(in_frame & ~take):
            m.d.sync += idle.eq(idle + 1)
        with m.Else():
            m.d.sync += idle.eq(0)
        timed_out = in_frame & (idle == self.idle_timeout)

        # Address, data and strobes straight from registers (not through the FSM's decode): they
        # feed the targets' address decoders, the longest paths of the board.
        m.d.comb += [bus.araddr.eq(addr), bus.awaddr.eq(addr), bus.wdata.eq(rbuf.data), bus.wstrb.eq(strb)]

        valid_op = (op == Op.PING) | (op == Op.READ) | (op == Op.WRITE)

        def in_frame_take():
            """A state inside a request frame: line silence ends the frame (TIMEOUT answer);
            returns the branch for a byte taken."""
            m.d.comb += [in_frame.eq(1), self.active.eq(1)]
            with m.If(timed_out):
                m.d.sync += fstatus.eq(FrameStatus.TIMEOUT)
                m.d.comb += self.timeout.eq(1)
                m.next = "R_SOF"
            return m.Elif(take)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(take & (rx.payload == SOF_REQUEST)):
                    # OP/TAG read as 0 in a TIMEOUT answer when they had not arrived.
                    m.d.sync += [rx_crc.eq(0), hdr_idx.eq(0), op.eq(0), tag.eq(0)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                with in_frame_take():
                    m.d.sync += [rx_crc.eq(rx_crc_next), hdr_idx.eq(hdr_idx + 1)]
                    with m.Switch(hdr_idx):
                        with m.Case(0):
                            m.d.sync += op.eq(rx.payload)
                        with m.Case(1):
                            m.d.sync += tag.eq(rx.payload)
                        for i in range(4):
                            with m.Case(2 + i):
                                m.d.sync += addr.word_select(i, 8).eq(rx.payload)
                        with m.Case(6):
                            m.d.sync += count.eq(rx.payload)
                        with m.Case(7):
                            m.d.sync += strb.eq(rx.payload[:4])
                    with m.If(hdr_idx == 7):
                        m.d.sync += [byte_idx.eq(0), word_idx.eq(0)]
                        with m.If(op == Op.WRITE):
                            m.next = "DATA"
                        with m.Else():
                            m.next = "CHECK"
            with m.State("DATA"):
                with in_frame_take():
                    m.d.sync += [rx_crc.eq(rx_crc_next), byte_idx.eq(byte_idx + 1),
                                 word.eq(Cat(word[8:], rx.payload))]
                    with m.If(byte_idx == 3):
                        m.d.comb += [wbuf.en.eq(1), wbuf.addr.eq(word_idx),
                                     wbuf.data.eq(Cat(word[8:], rx.payload))]
                        m.d.sync += word_idx.eq(word_idx + 1)
                        with m.If(word_idx == count):
                            m.next = "CHECK"
            with m.State("CHECK"):
                with in_frame_take():
                    with m.If(rx.payload != rx_crc):
                        m.d.sync += fstatus.eq(FrameStatus.CRC_ERROR)
                        m.d.comb += self.crc_error.eq(1)
                    with m.Elif(~valid_op):
                        m.d.sync += fstatus.eq(FrameStatus.BAD_OPCODE)
                    with m.Else():
                        m.d.sync += fstatus.eq(FrameStatus.OK)
                    m.d.sync += [resp.eq(Resp.OKAY), got_err.eq(0), word_idx.eq(0)]
                    m.next = "R_SOF"

            # ---- response header: SOF, OP, TAG, FSTATUS
            with m.State("R_SOF"):
                m.d.comb += self.active.eq(1)
                send(SOF_RESPONSE, "R_OP")
                # The CRC covers OP..RESP, not the SOF (this assignment overrides the update above).
                m.d.sync += tx_crc.eq(0)
            with m.State("R_OP"):
                m.d.comb += self.active.eq(1)
                send(op, "R_TAG")
            with m.State("R_TAG"):
                m.d.comb += self.active.eq(1)
                send(tag, "R_STATUS")
            with m.State("R_STATUS"):
                m.d.comb += self.active.eq(1)
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(fstatus)]
                with m.If(tx.ready):
                    with m.If(fstatus != FrameStatus.OK):
                        m.next = "R_CRC"
                    with m.Elif(op == Op.READ):
                        m.next = "RD_AR"
                    with m.Elif(op == Op.WRITE):
                        m.next = "WR_FETCH"
                    with m.Else():
                        m.next = "R_RESP"

            # ---- READ: one AXI4-Lite read per word, bytes sent as they come
            with m.State("RD_AR"):
                m.d.comb += [self.active.eq(1), bus.arvalid.eq(1)]
                with m.If(bus.arready):
                    m.next = "RD_R"
            with m.State("RD_R"):
                m.d.comb += [self.active.eq(1), bus.rready.eq(1)]
                with m.If(bus.rvalid):
                    m.d.sync += [word.eq(bus.rdata), byte_idx.eq(0)]
                    note_resp(bus.rresp)
                    m.next = "RD_SEND"
            with m.State("RD_SEND"):
                m.d.comb += [self.active.eq(1), tx.valid.eq(1), tx.payload.eq(word[:8])]
                with m.If(tx.ready):
                    m.d.sync += [word.eq(word >> 8), byte_idx.eq(byte_idx + 1)]
                    with m.If(byte_idx == 3):
                        m.d.sync += [addr.eq(addr + 4), word_idx.eq(word_idx + 1)]
                        with m.If(word_idx == count):
                            m.next = "R_RESP"
                        with m.Else():
                            m.next = "RD_AR"

            # ---- WRITE: words from the buffer, one AXI4-Lite write each
            with m.State("WR_FETCH"):
                m.d.comb += [self.active.eq(1), rbuf.addr.eq(word_idx)]
                m.d.sync += [aw_done.eq(0), w_done.eq(0)]
                m.next = "WR_AW"
            with m.State("WR_AW"):
                m.d.comb += [self.active.eq(1), rbuf.addr.eq(word_idx),
                             bus.awvalid.eq(~aw_done), bus.wvalid.eq(~w_done)]
                aw_ok = aw_done | bus.awready
                w_ok = w_done | bus.wready
                m.d.sync += [aw_done.eq(aw_ok), w_done.eq(w_ok)]
                with m.If(aw_ok & w_ok):
                    m.next = "WR_B"
            with m.State("WR_B"):
                m.d.comb += [self.active.eq(1), bus.bready.eq(1)]
                with m.If(bus.bvalid):
                    note_resp(bus.bresp)
                    m.d.sync += [addr.eq(addr + 4), word_idx.eq(word_idx + 1)]
                    with m.If(word_idx == count):
                        m.next = "R_RESP"
                    with m.Else():
                        m.next = "WR_FETCH"

            # ---- response tail: RESP, CRC
            with m.State("R_RESP"):
                m.d.comb += self.active.eq(1)
                send(resp, "R_CRC")
            with m.State("R_CRC"):
                m.d.comb += [self.active.eq(1), tx.valid.eq(1), tx.payload.eq(tx_crc)]
                with m.If(tx.ready):
                    m.next = "IDLE"
        return m
