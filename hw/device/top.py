"""EVSSD: the whole embedding-vector SSD device.

Ports (Verilog names flatten with ``__``):

- ``s_axil``: ``In(AXI4LiteSignature(addr_width=12, data_width=32))`` -- every register.
- ``m_axi_host``: ``Out(AXI4Signature(addr_width=64, data_width=host_data_bits))`` -- DMA.
- ``m_axi_ch0`` .. ``m_axi_ch{n-1}``: ``Out(AXI4Signature(addr_width=channel_addr_width(params),
  data_width=ch_data_bits, id_width=1))`` -- one DDR bank per flash channel.
- ``irq``: ``Out(1)``, high while the completion queue holds unread entries and CTRL.irq_enable.

Inside: MMIOManager -> CommandQueue (SQ/CQ) -> CommandEngine -> ExtentTranslator -> LinearFTL
-> ChannelDemux -> FlashChannelController[c] -> ResultMerger -> CommandEngine (result DMA) ->
completion. HostDMA ports: read 0 = SQ fetch, 1 = index lists, 2 = offsets, 3 = page data;
write 0 = CQ posts, 1 = results.
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..lib.axi import AXI4LiteSignature, AXI4Signature
from .channel import FlashChannelController, channel_addr_width, read_request_layout
from .dma import HostDMA
from .engine import CommandEngine
from .fork import XLAT_TAG_WIDTH
from .ftl import ChannelDemux, LinearFTL
from .merger import ResultMerger
from .mmio import ADDR_WIDTH, MMIOManager
from .queues import CommandQueue
from ..regmap import ElemType, Params, default_read_queue, default_slots
from ..lib.register_stage import RegisterStage
from ..lib.skid_buffer import SkidBuffer
from .translator import ExtentTranslator

__all__ = ["EVSSD", "default_slots"]


class EVSSD(wiring.Component):
    def __init__(self, params: Params, *, n_slots: int | None = None, read_queue: int | None = None):
        Params.require(params)
        if n_slots is None:
            n_slots = default_slots(params)
        if n_slots < 2 or n_slots & (n_slots - 1) or n_slots > 256:
            raise ValueError(f"n_slots {n_slots} must be a power of two 2..256")
        if read_queue is None:
            read_queue = default_read_queue(params, n_slots)
        if read_queue < 0:
            raise ValueError(f"read_queue {read_queue} must be >= 0")
        self.params = params
        self.n_slots = n_slots
        # Per-channel queue between the FTL demux and each channel: without it a channel whose
        # page registers are all busy holds back requests for every other channel (head-of-line).
        # Its depth (hw/regmap.py default_read_queue) is also the timing model's.
        self.read_queue = read_queue
        members = {
            "s_axil": In(AXI4LiteSignature(addr_width=ADDR_WIDTH, data_width=32)),
            "m_axi_host": Out(AXI4Signature(addr_width=64, data_width=params.host_data_bits)),
        }
        for c in range(params.n_channels):
            members[f"m_axi_ch{c}"] = Out(AXI4Signature(addr_width=channel_addr_width(params),
                                                        data_width=params.ch_data_bits, id_width=1))
        members["irq"] = Out(1)
        super().__init__(members)

    def m_axi_ch(self, c: int):
        return getattr(self, f"m_axi_ch{c}")

    def elaborate(self, platform):
        m = Module()
        p = self.params
        n = p.n_channels
        T = self.n_slots.bit_length() - 1

        m.submodules.mmio = mmio = MMIOManager(p)
        m.submodules.queues = q = CommandQueue(p)
        m.submodules.dma = dma = HostDMA(p, n_read=5, n_write=2)
        m.submodules.engine = eng = CommandEngine(p, self.n_slots)
        m.submodules.translator = xl = ExtentTranslator(p, XLAT_TAG_WIDTH)
        m.submodules.ftl = ftl = LinearFTL(p, T)
        m.submodules.demux = demux = ChannelDemux(p, T)
        m.submodules.merger = mg = ResultMerger(p, self.n_slots)
        chans = []
        for c in range(n):
            ch = FlashChannelController(p, T)
            m.submodules[f"channel{c}"] = ch
            chans.append(ch)

        regs = mmio.regs
        wiring.connect(m, wiring.flipped(self.s_axil), mmio.s_axil)
        wiring.connect(m, dma.m_axi_host, wiring.flipped(self.m_axi_host))

        # ---- queues <-> registers
        m.d.comb += [
            q.sq_base.eq(Cat(regs.sq_base_lo, regs.sq_base_hi)),
            q.sq_size.eq(regs.sq_size_entries),
            q.sq_tail.eq(regs.sq_tail_tail), q.sq_tail_written.eq(regs.sq_tail_tail_written),
            q.cq_base.eq(Cat(regs.cq_base_lo, regs.cq_base_hi)),
            q.cq_size.eq(regs.cq_size_entries),
            q.cq_head.eq(regs.cq_head_head), q.cq_head_written.eq(regs.cq_head_head_written),
            q.enable.eq(regs.ctrl_enable), q.irq_enable.eq(regs.ctrl_irq_enable),
            q.reset_queues.eq(regs.ctrl_trigger_reset_queues),
            regs.sq_head_head.eq(q.sq_head),
            regs.cq_tail_tail.eq(q.cq_tail), regs.cq_tail_phase.eq(q.cq_phase),
            regs.status_fatal.eq(q.fatal),
            regs.status_busy.eq(eng.inflight != 0),
            regs.status_inflight.eq(eng.inflight),
            self.irq.eq(q.irq),
        ]

        def registered(name, src, dst, stages=1):
            """src -> dst through ``stages`` SkidBuffers: no combinational path between the two
            modules (and with two, the placer can put one near each end of a long link)."""
            for k in range(stages):
                reg = SkidBuffer(src.payload.shape())
                m.submodules[name if k == 0 else f"{name}_{k}"] = reg
                wiring.connect(m, src, reg.i)
                src = reg.o
            wiring.connect(m, src, dst)

        # ---- DMA clients, each stream through a register slice: the DMA's arbitration and
        # its AXI handshakes were one combinational chain with its clients' state machines
        # (e.g. W ready -> engine result stage -> merger packer, 67 MHz)
        registered("q_rd_cmd_reg", q.o_rd_cmd, dma.rd_cmd[0])
        registered("q_rd_data_reg", dma.rd_data[0], q.i_rd_data)
        registered("idx_cmd_reg", eng.o_idx_cmd, dma.rd_cmd[1])
        registered("idx_data_reg", dma.rd_data[1], eng.i_idx_data)
        registered("off_cmd_reg", eng.o_off_cmd, dma.rd_cmd[2])
        registered("off_data_reg", dma.rd_data[2], eng.i_off_data)
        registered("pg_cmd_reg", eng.o_pg_cmd, dma.rd_cmd[3])
        registered("pg_data_reg", dma.rd_data[3], eng.i_pg_data)
        registered("wgt_cmd_reg", eng.o_wgt_cmd, dma.rd_cmd[4])
        registered("wgt_data_reg", dma.rd_data[4], eng.i_wgt_data)
        registered("q_wr_cmd_reg", q.o_wr_cmd, dma.wr_cmd[0])
        registered("q_wr_data_reg", q.o_wr_data, dma.wr_data[0])
        registered("q_wr_done_reg", dma.wr_done[0], q.i_wr_done)
        registered("res_cmd_reg", eng.o_res_cmd, dma.wr_cmd[1])
        registered("res_data_reg", eng.o_res_data, dma.wr_data[1])
        registered("res_done_reg", dma.wr_done[1], eng.i_res_done)

        # ---- command path
        wiring.connect(m, q.o_cmd, eng.i_cmd)
        wiring.connect(m, eng.o_cpl, q.i_cpl)
        # Register slices around the translator and into the FTL: the engine's lookup fork
        # (FTL ready -> engine side FIFO -> translator stall -> engine emit) was one
        # combinational chain across four modules (the 62.8 MHz critical path).
        registered("xlat_req_reg", eng.o_xlat, xl.i_req)
        registered("xlat_resp_reg", xl.o_resp, eng.i_xlat)
        registered("ftl_req_reg", eng.o_ftl, ftl.i_req)
        wiring.connect(m, ftl.o_req, demux.i_req)
        # The merger works out each descriptor's op count in front of its own input slice, so
        # the link from the engine's fork (across the chip) gets a register stage of its own:
        # the op count's adders then start from flip-flops (the merger's input ready is a
        # register, so the stage's combinational ready is early).
        m.submodules.desc_reg = desc_reg = RegisterStage(eng.o_desc.payload.shape())
        wiring.connect(m, eng.o_desc, desc_reg.i)
        wiring.connect(m, desc_reg.o, mg.i_desc)
        wiring.connect(m, mg.o_free, eng.i_free)
        wiring.connect(m, mg.o_data, eng.i_out)

        rowwise = ResultMerger.supports_rowwise(p)
        max_elem = ElemType.INT8_ROWWISE if rowwise else ElemType.INT32
        m.d.comb += [regs.caps_int8_rowwise.eq(rowwise), regs.caps_weighted.eq(1)]
        cfg = xl.cfg
        m.d.comb += [
            cfg.table.eq(regs.tbl_sel_table), cfg.extent.eq(regs.tbl_sel_extent),
            cfg.row_bytes.eq(regs.tbl_cfg_row_bytes), cfg.elem.eq(regs.tbl_cfg_elem),
            # an element type this merger does not pool (CAPS says which) leaves its table
            # disabled: its commands complete TABLE_DISABLED instead of summing wrongly
            cfg.enable.eq(regs.tbl_cfg_enable & (regs.tbl_cfg_elem <= max_elem)), cfg.rows_per_page.eq(regs.tbl_rows_per_page_rows),
            cfg.magic.eq(Cat(regs.tbl_div_magic_magic, regs.tbl_div_shift_magic_hi)),
            cfg.shift.eq(regs.tbl_div_shift_shift),
            cfg.ext_first.eq(regs.ext_first), cfg.ext_rows.eq(regs.ext_rows),
            cfg.ext_lba.eq(regs.ext_lba),
            cfg.commit_table.eq(regs.tbl_commit_table), cfg.commit_extent.eq(regs.tbl_commit_extent),
        ]

        clear = regs.ctrl_trigger_clear_counters
        for c, ch in enumerate(chans):
            wiring.connect(m, ch.m_axi, wiring.flipped(self.m_axi_ch(c)))
            if self.read_queue:
                lay = read_request_layout(T)
                fifo = SyncFIFOBuffered(width=lay.size, depth=self.read_queue)
                m.submodules[f"read_queue{c}"] = fifo
                m.d.comb += [
                    fifo.w_data.eq(demux.o_read[c].payload), fifo.w_en.eq(demux.o_read[c].valid),
                    demux.o_read[c].ready.eq(fifo.w_rdy),
                    ch.i_read.payload.eq(fifo.r_data), ch.i_read.valid.eq(fifo.r_rdy),
                    fifo.r_en.eq(ch.i_read.ready),
                ]
            else:
                wiring.connect(m, demux.o_read[c], ch.i_read)
            # The channel's o_row is combinational from its R channel and the merger's
            # round-robin ready depends on every channel's valid: without a register slice the
            # chain runs channel -> merger -> other channels' rready (23 ns, 43.5 MHz). Two
            # slices: the channels sit by their flash block RAMs, spread over the chip, and one
            # slice between a channel and the merger left a 6.4 ns wire in a 10 ns cycle.
            registered(f"row_reg{c}", ch.o_row, mg.i_row[c], stages=2)
            # Programs pass register slices too: the channel's read accept waits on i_prog.valid,
            # which came combinationally from the engine's front FSM. Reordering is impossible:
            # the engine starts a program only when it is the sole command in flight.
            registered(f"prog_reg{c}", eng.o_prog[c], ch.i_prog)
            registered(f"prog_data_reg{c}", eng.o_prog_data[c], ch.i_prog_data)
            registered(f"prog_done_reg{c}", ch.o_prog_done, eng.i_prog_done[c])
            m.d.comb += [
                ch.t_r.eq(regs.t_r_cycles), ch.t_prog.eq(regs.t_prog_cycles),
                ch.block_mode.eq(regs.ctrl_block_mode), ch.clear_counters.eq(clear),
                regs.ch_rows[c].eq(ch.cnt_rows), regs.ch_bytes[c].eq(ch.cnt_bytes),
                regs.ch_tr_waits[c].eq(ch.cnt_tr_waits), regs.ch_busy_cycles[c].eq(ch.cnt_busy),
                regs.ch_programs[c].eq(ch.cnt_programs),
            ]

        # ---- device counters
        commands = Signal(32)
        lookups = Signal(32)
        errors = Signal(32)
        cycles = Signal(64)
        busy = Signal(32)
        # events registered first: the adders then start from flip-flops
        ev_complete, ev_lookup, ev_error, ev_busy = (Signal(name=f"ev_{k}") for k in
                                                     ("complete", "lookup", "error", "busy"))
        m.d.sync += [ev_complete.eq(eng.ev_complete), ev_lookup.eq(eng.ev_lookup),
                     ev_error.eq(eng.ev_error), ev_busy.eq(eng.inflight != 0)]
        with m.If(clear):
            m.d.sync += [commands.eq(0), lookups.eq(0), errors.eq(0), cycles.eq(0), busy.eq(0)]
        with m.Else():
            m.d.sync += [
                commands.eq(commands + ev_complete),
                lookups.eq(lookups + ev_lookup),
                errors.eq(errors + ev_error),
                cycles.eq(cycles + 1),
                busy.eq(busy + ev_busy),
            ]
        m.d.comb += [
            regs.cnt_commands.eq(commands), regs.cnt_lookups.eq(lookups),
            regs.cnt_errors.eq(errors), regs.cnt_cycles_lo.eq(cycles[:32]),
            regs.cnt_cycles_hi.eq(cycles[32:]), regs.cnt_busy_cycles.eq(busy),
        ]
        return m
