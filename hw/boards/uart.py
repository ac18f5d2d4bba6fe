"""The host link of the board: an 8N1 UART and a framed UART-to-AXI-Lite bridge.

- :class:`UartRx`: serial line -> byte stream (mid-bit sampling, start-bit glitch rejection,
  stop-bit check). The line cannot be back-pressured: a byte that arrives while the previous one
  is still unread replaces it and pulses ``overrun``.
- :class:`UartTx`: byte stream -> serial line.
- :class:`UartAxiBridge`: parses request frames from the byte stream, checks their CRC-8, runs
  them as AXI4-Lite transactions on ``m_axil`` (through the
  :class:`~evssd.hw.boards.axil_executor.AxiLiteExecutor` the UDP bridge shares) and answers
  with a response frame. The frame
  format is in ``docs/uart-protocol.md``; the host side is :mod:`evssd.host.uart` (whose encoder
  and decoder are the golden model of this bridge in the tests).

The bit time is ``divisor`` clock cycles, so a simulation can use 4 cycles per bit while the
board uses ``clock_hz // baud``.
"""
from __future__ import annotations

from contextlib import contextmanager

from amaranth import Module, Signal, Cat, C
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4LiteSignature, Resp
from .axil_executor import AxiLiteExecutor

__all__ = ["UartRx", "UartTx", "UartAxiBridge", "crc8", "crc8_byte", "SOF_REQUEST", "SOF_RESPONSE",
           "Op", "FrameStatus", "MAX_WORDS"]

# The frame constants and the CRC's definition live in the pure-Python bridge_protocol, which
# the host imports too.
from ..bridge_protocol import (CRC8_POLY, MAX_WORDS, SOF_REQUEST, SOF_RESPONSE, FrameStatus, Op, crc8,
                              crc8_byte)


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
        # Pipelined for timing: the received byte and its decoded flags are registered before the
        # frame parser looks at them; every decision the parser needs (last header byte, last
        # word, opcode class, line timeout) is a register computed ahead; the buffer's read data,
        # the AXI4-Lite request and every valid are registers; the response bytes go out through
        # a holding register. The line (one byte per 10 bit times) bounds the throughput, so the
        # extra cycles cost nothing; the parser still takes a byte every cycle.
        m = Module()
        rx, tx, bus = self.i_rx, self.o_tx, self.m_axil

        m.submodules.buf = buf = Memory(shape=32, depth=MAX_WORDS, init=[])
        wbuf = buf.write_port()
        rbuf = buf.read_port(transparent_for=())

        # ---- stage 0: the byte, registered (received bytes are always taken: the UART cannot wait)
        b_stb = Signal()
        b_data = Signal(8, reset_less=True)
        b_sof = Signal()
        m.d.comb += rx.ready.eq(1)
        m.d.sync += [b_stb.eq(rx.valid), b_data.eq(rx.payload),
                     b_sof.eq(rx.payload == SOF_REQUEST)]

        # ---- request fields
        op = Signal(8)
        op_read = Signal()
        op_write = Signal()
        op_valid = Signal()
        tag = Signal(8)
        hdr_addr = Signal(32)
        count = Signal(8)        # words - 1
        strb = Signal(4)
        hdr_oh = Signal(8)       # one-hot: which header byte comes next (0 outside HEADER)
        rx_crc = Signal(8)
        fstatus = Signal(8)
        fail = Signal()          # fstatus != OK

        # ---- WRITE data into the buffer: assembled in `wword`, written a cycle later
        byte_idx = Signal(2)
        wword = Signal(32, reset_less=True)
        wr_pend = Signal()
        widx = Signal(8)
        wlast = Signal()         # widx == count, a cycle late (a word takes >= 4 cycles)
        m.d.sync += wlast.eq(widx == count)
        m.d.comb += [wbuf.en.eq(wr_pend), wbuf.addr.eq(widx), wbuf.data.eq(wword)]
        m.d.sync += wr_pend.eq(0)
        with m.If(wr_pend):
            m.d.sync += widx.eq(widx + 1)

        # ---- execution: the shared executor, fed from the checked request and the buffer
        m.submodules.exe = exe = AxiLiteExecutor()
        wiring.connect(m, exe.m_axil, wiring.flipped(bus))
        m.d.comb += [rbuf.addr.eq(exe.wbuf_addr), exe.wbuf_data.eq(rbuf.data),
                     exe.i_cmd.payload.write.eq(op_write), exe.i_cmd.payload.addr.eq(hdr_addr),
                     exe.i_cmd.payload.n_words_m1.eq(count), exe.i_cmd.payload.strb.eq(strb)]
        # data registers: no reset (a gate less in front of them; only read once loaded)
        rword = Signal(32, reset_less=True)
        resp = Signal(2)         # first non-OKAY response of the frame
        send_idx = Signal(2)

        # ---- response bytes: a holding register in front of o_tx
        tx_v = Signal()
        tx_q = Signal(8)
        tx_crc = Signal(8)
        m.d.comb += [tx.valid.eq(tx_v), tx.payload.eq(tx_q)]
        with m.If(tx_v & tx.ready):
            m.d.sync += [tx_v.eq(0), tx_crc.eq(_crc8_next(tx_crc, tx_q))]

        @contextmanager
        def send(value, next_state=None):
            """Load `value` into the holding register when it is free (the body runs then)."""
            with m.If(~tx_v):
                m.d.sync += [tx_q.eq(value), tx_v.eq(1)]
                if next_state is not None:
                    m.next = next_state
                yield

        # ---- pulses and activity, registered
        crc_err_p = Signal()
        timeout_p = Signal()
        active = Signal()
        m.d.sync += [crc_err_p.eq(0), timeout_p.eq(0)]
        m.d.comb += [self.crc_error.eq(crc_err_p), self.bus_error.eq(exe.bus_error),
                     self.timeout.eq(timeout_p), self.active.eq(active)]

        # ---- inter-byte timeout inside a frame: `to_q` is (idle == idle_timeout), registered
        in_frame = Signal()
        idle = Signal(range(self.idle_timeout + 1))
        to_q = Signal()
        with m.If(b_stb | ~in_frame):
            m.d.sync += [idle.eq(0), to_q.eq(0)]
        with m.Else():
            m.d.sync += [idle.eq(idle + 1), to_q.eq(idle == self.idle_timeout - 1)]

        # Header fields: one-hot byte position, so each field's enable is one gate.
        for i, (field, lo) in enumerate([(op, 0), (tag, 0), (hdr_addr, 0), (hdr_addr, 8), (hdr_addr, 16),
                                         (hdr_addr, 24), (count, 0), (strb, 0)]):
            with m.If(b_stb & hdr_oh[i]):
                m.d.sync += field[lo:lo + min(8, len(field))].eq(b_data[:min(8, len(field))])
        with m.If(b_stb & hdr_oh[0]):
            m.d.sync += [op_read.eq(b_data == Op.READ), op_write.eq(b_data == Op.WRITE),
                         op_valid.eq(b_data <= Op.WRITE)]

        def in_frame_take():
            """A state inside a request frame: a byte is taken; line silence ends the frame
            (TIMEOUT answer). Returns the branch for a byte taken."""
            m.d.comb += in_frame.eq(1)
            m.d.sync += active.eq(1)
            with m.If(to_q & ~b_stb):
                m.d.sync += [fstatus.eq(FrameStatus.TIMEOUT), fail.eq(1), timeout_p.eq(1),
                             hdr_oh.eq(0)]
                m.next = "R_SOF"
            return m.Elif(b_stb)

        with m.FSM():
            with m.State("IDLE"):
                m.d.sync += active.eq(0)
                with m.If(b_stb & b_sof):
                    # OP/TAG read as 0 in a TIMEOUT answer when they had not arrived.
                    m.d.sync += [rx_crc.eq(0), hdr_oh.eq(1), op.eq(0), tag.eq(0), active.eq(1)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                with in_frame_take():
                    m.d.sync += [rx_crc.eq(_crc8_next(rx_crc, b_data)), hdr_oh.eq(hdr_oh << 1)]
                    with m.If(hdr_oh[7]):
                        m.d.sync += [byte_idx.eq(0), widx.eq(0)]
                        with m.If(op_write):
                            m.next = "DATA"
                        with m.Else():
                            m.next = "CHECK"
            with m.State("DATA"):
                with in_frame_take():
                    m.d.sync += [rx_crc.eq(_crc8_next(rx_crc, b_data)), byte_idx.eq(byte_idx + 1),
                                 wword.eq(Cat(wword[8:], b_data))]
                    with m.If(byte_idx == 3):
                        m.d.sync += wr_pend.eq(1)
                        with m.If(wlast):
                            m.next = "CHECK"
            with m.State("CHECK"):
                with in_frame_take():
                    with m.If(b_data != rx_crc):
                        m.d.sync += [fstatus.eq(FrameStatus.CRC_ERROR), fail.eq(1), crc_err_p.eq(1)]
                    with m.Elif(~op_valid):
                        m.d.sync += [fstatus.eq(FrameStatus.BAD_OPCODE), fail.eq(1)]
                    with m.Else():
                        m.d.sync += [fstatus.eq(FrameStatus.OK), fail.eq(0)]
                    m.d.sync += resp.eq(Resp.OKAY)
                    m.next = "R_SOF"

            # ---- response header: SOF, OP, TAG, FSTATUS
            with m.State("R_SOF"):
                with send(SOF_RESPONSE, "R_OP"):
                    pass
            with m.State("R_OP"):
                # The CRC covers OP..RESP, not the SOF: the SOF has left the holding register
                # (it is free), so restart the CRC here.
                with send(op, "R_TAG"):
                    m.d.sync += tx_crc.eq(0)
            with m.State("R_TAG"):
                with send(tag, "R_STATUS"):
                    pass
            with m.State("R_STATUS"):
                with send(fstatus):
                    with m.If(fail):
                        m.next = "R_CRC"
                    with m.Elif(op_read | op_write):
                        m.next = "X_CMD"
                    with m.Else():
                        m.next = "R_RESP"

            # ---- READ/WRITE: the executor runs the words; READ words are sent as they come
            with m.State("X_CMD"):
                m.d.comb += exe.i_cmd.valid.eq(1)
                with m.If(exe.i_cmd.ready):
                    m.next = "X_RUN"
            with m.State("X_RUN"):
                m.d.comb += [exe.o_rdata.ready.eq(1), exe.o_done.ready.eq(1)]
                with m.If(exe.o_rdata.valid):
                    m.d.sync += [rword.eq(exe.o_rdata.payload.data), send_idx.eq(0)]
                    m.next = "RD_SEND"
                with m.If(exe.o_done.valid):
                    m.d.sync += resp.eq(exe.o_done.payload.resp)
                    m.next = "R_RESP"
            with m.State("RD_SEND"):
                with send(rword[:8]):
                    m.d.sync += [rword.eq(rword >> 8), send_idx.eq(send_idx + 1)]
                    with m.If(send_idx == 3):
                        m.next = "X_RUN"

            # ---- response tail: RESP, CRC
            with m.State("R_RESP"):
                with send(resp, "R_CRC"):
                    pass
            with m.State("R_CRC"):
                # Every earlier byte has left the holding register: tx_crc covers them all.
                with send(tx_crc, "IDLE"):
                    pass
        return m
