"""Submission/completion queues: NVMe-style rings in host memory, fetched and posted by DMA.

``CommandQueue(params)``:

- Register inputs (connect from the MMIO manager's ``regs``): ``sq_base`` (64), ``sq_size``
  (16, a power of two), ``sq_tail`` + ``sq_tail_written`` (doorbell), ``cq_base`` (64),
  ``cq_size``, ``cq_head`` + ``cq_head_written`` (doorbell), ``enable``, ``irq_enable``,
  ``reset_queues`` (pulse). Outputs: ``sq_head``, ``cq_tail``, ``cq_phase``, ``irq``, ``fatal``.
- SQ fetch: while ``enable`` and not ``fatal`` and head != tail, reads the 64-byte entry at
  ``sq_base + head * 64`` through its DMA read port (``o_rd_cmd``/``i_rd_data``), advances the
  head (mod ``sq_size``) and offers ``o_cmd`` = ``{cmd: COMMAND_LAYOUT, sq_head}`` (``sq_head``
  = head after this fetch). One entry is buffered, so the next fetch overlaps the engine's work.
  A fetch that returns an AXI error sets ``fatal`` and stops fetching (the entry is dropped).
- CQ post: takes ``i_cpl`` = ``{n_bad, first_bad, sq_head, cid, status}`` only when the ring
  has room (``(tail + 1) % size != head``: one slot stays empty so a full ring is never
  mistaken for an empty one, and an unread entry is never overwritten), writes the 16-byte
  entry with the current phase to ``cq_base + tail * 16`` through its DMA write port
  (``o_wr_cmd``/``o_wr_data``/``i_wr_done``), waits for the B response, then advances the tail;
  the phase flips when the tail wraps. The phase starts at 1 (the host zeroes the ring), as in
  NVMe and the functional model. An AXI error on the post sets ``fatal``.
- ``irq`` is high while ``cq_tail != cq_head`` and ``irq_enable``.
- ``reset_queues`` zeroes SQ head/tail, CQ head/tail, sets the phase to 1 and clears ``fatal``
  (use it only while the device is idle).

The descriptor layouts (:data:`COMMAND_LAYOUT`, :data:`COMPLETION_LAYOUT`) are built from the
field table below, which ``tests/hw/test_queues.py`` checks against ``regmap.Command.pack`` /
``regmap.Completion.pack``.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Const, Mux
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.dma_stream import DMA_CMD_LAYOUT, DMA_DONE_LAYOUT, dma_read_layout, dma_write_layout
from ..regmap import COMMAND_BYTES, COMPLETION_BYTES, Params

__all__ = ["CommandQueue", "COMMAND_FIELDS", "COMPLETION_FIELDS", "COMMAND_LAYOUT",
           "COMPLETION_LAYOUT", "FETCHED_LAYOUT", "CPL_REQUEST_LAYOUT"]

# (name, bits) from bit 0 of the little-endian descriptor; mirrors regmap.Command / Completion.
COMMAND_FIELDS = (
    ("opcode", 8), ("table", 8), ("cid", 16), ("count", 32), ("n_bags", 32), ("lba", 32),
    ("src_addr", 64), ("offsets_addr", 64), ("dst_addr", 64), ("dst_bytes", 32),
    ("weights_addr", 64), ("reserved", 96),
)
COMPLETION_FIELDS = (
    ("n_bad", 32), ("first_bad", 32), ("sq_head", 16), ("reserved0", 16), ("cid", 16),
    ("phase", 1), ("reserved1", 7), ("status", 8),
)
COMMAND_LAYOUT = data.StructLayout(dict(COMMAND_FIELDS))
COMPLETION_LAYOUT = data.StructLayout(dict(COMPLETION_FIELDS))
assert COMMAND_LAYOUT.size == COMMAND_BYTES * 8
assert COMPLETION_LAYOUT.size == COMPLETION_BYTES * 8

FETCHED_LAYOUT = data.StructLayout({"cmd": COMMAND_LAYOUT, "sq_head": 16})
CPL_REQUEST_LAYOUT = data.StructLayout({
    "n_bad": 32, "first_bad": 32, "sq_head": 16, "cid": 16, "status": 8,
})


class CommandQueue(wiring.Component):
    def __init__(self, params: Params):
        Params.require(params)
        self.params = params
        w = params.host_data_bits
        super().__init__({
            "sq_base": In(64), "sq_size": In(16), "sq_tail": In(16), "sq_tail_written": In(1),
            "cq_base": In(64), "cq_size": In(16), "cq_head": In(16), "cq_head_written": In(1),
            "enable": In(1), "irq_enable": In(1), "reset_queues": In(1),
            "sq_head": Out(16), "cq_tail": Out(16), "cq_phase": Out(1, init=1),
            "irq": Out(1), "fatal": Out(1),
            "o_rd_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_rd_data": In(stream.Signature(dma_read_layout(w))),
            "o_wr_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "o_wr_data": Out(stream.Signature(dma_write_layout(w))),
            "i_wr_done": In(stream.Signature(DMA_DONE_LAYOUT)),
            "o_cmd": Out(stream.Signature(FETCHED_LAYOUT)),
            "i_cpl": In(stream.Signature(CPL_REQUEST_LAYOUT)),
        })

    def elaborate(self, platform):
        m = Module()
        w = self.params.host_data_bits
        bb = w // 8
        entry_bits = COMMAND_BYTES * 8

        sq_tail = Signal(16)
        cq_head = Signal(16)
        with m.If(self.sq_tail_written):
            m.d.sync += sq_tail.eq(self.sq_tail)
        with m.If(self.cq_head_written):
            m.d.sync += cq_head.eq(self.cq_head)

        m.d.comb += self.irq.eq(self.irq_enable & (self.cq_tail != cq_head))

        # ---------------------------------------------------------------- SQ fetch
        sq_mask = Signal(16)
        m.d.comb += sq_mask.eq(self.sq_size - 1)
        head = self.sq_head
        buf = Signal(entry_bits)
        f_err = Signal()
        have = Signal()
        out_head = Signal(16)
        m.d.comb += [
            self.o_cmd.valid.eq(have),
            self.o_cmd.payload.cmd.eq(buf),
            self.o_cmd.payload.sq_head.eq(out_head),
        ]
        with m.If(self.o_cmd.valid & self.o_cmd.ready):
            m.d.sync += have.eq(0)

        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                with m.If(self.enable & ~self.fatal & ~have & (head != (sq_tail & sq_mask)) &
                          ~self.reset_queues):
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += [
                    self.o_rd_cmd.valid.eq(1),
                    self.o_rd_cmd.payload.addr.eq(self.sq_base + (head << 6)),
                    self.o_rd_cmd.payload.bytes.eq(COMMAND_BYTES),
                ]
                with m.If(self.o_rd_cmd.ready):
                    m.d.sync += f_err.eq(0)
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += self.i_rd_data.ready.eq(1)
                with m.If(self.i_rd_data.valid):
                    beat = self.i_rd_data.payload
                    if w >= entry_bits:
                        m.d.sync += buf.eq(beat.data[:entry_bits])
                    else:
                        # beats arrive in address order: shift down, newest on top
                        m.d.sync += buf.eq(Cat(buf[w:], beat.data))
                    err = f_err | beat.err
                    m.d.sync += f_err.eq(err)
                    with m.If(beat.last):
                        with m.If(err):
                            m.d.sync += self.fatal.eq(1)
                        with m.Else():
                            nxt = (head + 1) & sq_mask
                            m.d.sync += [have.eq(1), head.eq(nxt), out_head.eq(nxt)]
                        m.next = "IDLE"

        # ---------------------------------------------------------------- CQ post
        cq_mask = Signal(16)
        m.d.comb += cq_mask.eq(self.cq_size - 1)
        tail = self.cq_tail
        entry = Signal(COMPLETION_LAYOUT)
        addr = Signal(64)
        beat_idx = Signal()
        # `full` is a register (the compare on cq_size, the tail and the head fanned out into
        # the completion handshake); it lags the tail by one cycle, so a post waits one cycle
        # after the previous one advanced the tail (`settle`). A stale `full` after a doorbell
        # only delays the post.
        full = Signal()
        settle = Signal()
        m.d.sync += [full.eq(((tail + 1) & cq_mask) == cq_head), settle.eq(0)]
        cpl = self.i_cpl.payload

        with m.FSM(name="post"):
            with m.State("IDLE"):
                with m.If(self.i_cpl.valid & ~full & ~settle & ~self.fatal & ~self.reset_queues):
                    m.d.comb += self.i_cpl.ready.eq(1)
                    m.d.sync += [
                        entry.eq(0),
                        entry.n_bad.eq(cpl.n_bad), entry.first_bad.eq(cpl.first_bad),
                        entry.sq_head.eq(cpl.sq_head), entry.cid.eq(cpl.cid),
                        entry.status.eq(cpl.status), entry.phase.eq(self.cq_phase),
                        addr.eq(self.cq_base + (tail << 4)),
                        beat_idx.eq(0),
                    ]
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += [
                    self.o_wr_cmd.valid.eq(1),
                    self.o_wr_cmd.payload.addr.eq(addr),
                    self.o_wr_cmd.payload.bytes.eq(COMPLETION_BYTES),
                ]
                with m.If(self.o_wr_cmd.ready):
                    m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += self.o_wr_data.valid.eq(1)
                if w >= 128:
                    # one beat; the entry sits in the byte lanes of its address
                    lane = addr[4:(bb.bit_length() - 1)] if bb > 16 else Const(0, 1)
                    m.d.comb += [self.o_wr_data.payload.data.eq(entry.as_value() << (lane * 128)),
                                 self.o_wr_data.payload.last.eq(1)]
                    with m.If(self.o_wr_data.ready):
                        m.next = "DONE"
                else:
                    m.d.comb += [
                        self.o_wr_data.payload.data.eq(
                            Mux(beat_idx, entry.as_value()[64:], entry.as_value()[:64])),
                        self.o_wr_data.payload.last.eq(beat_idx),
                    ]
                    with m.If(self.o_wr_data.ready):
                        m.d.sync += beat_idx.eq(1)
                        with m.If(beat_idx):
                            m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.i_wr_done.ready.eq(1)
                with m.If(self.i_wr_done.valid):
                    with m.If(self.i_wr_done.payload.err):
                        m.d.sync += self.fatal.eq(1)
                    with m.Else():
                        nxt = (tail + 1) & cq_mask
                        m.d.sync += [tail.eq(nxt), settle.eq(1)]
                        with m.If(nxt == 0):
                            m.d.sync += self.cq_phase.eq(~self.cq_phase)
                    m.next = "IDLE"

        with m.If(self.reset_queues):
            m.d.sync += [head.eq(0), sq_tail.eq(0), tail.eq(0), cq_head.eq(0),
                         self.cq_phase.eq(1), self.fatal.eq(0), have.eq(0), settle.eq(1)]
        return m
