"""Formal checks (SymbiYosys + Yices from PyPI) of the bus and stream contracts: the properties
of :mod:`evssd.hw.formal` around one component at a time, bounded model checks to a depth past
the deepest cover, and cover runs that show each scenario is reached (a cover run fails when
any cover statement is unreached). Broken toy components show that the properties can fail.
"""
import pytest

pytest.importorskip("amaranth")

from amaranth import Module, Signal, Mux
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from evssd.hw import formal
from evssd.hw.lib.axi import AXI4LiteSignature, AXI4Signature

pytestmark = pytest.mark.formal


def _run(tmp_path, harness, name, mode, depth):
    try:
        res = formal.run_sby(harness, name, tmp_path, mode=mode, depth=depth, timeout=600)
    except formal.FormalError as exc:
        pytest.fail(str(exc))
    return res


def _skid():
    from evssd.hw.lib.skid_buffer import SkidBuffer
    return formal.StreamHarness(SkidBuffer(16))


def _register_stage():
    from evssd.hw.lib.register_stage import RegisterStage
    return formal.StreamHarness(RegisterStage(16))


def _ftl():
    from evssd.hw.device.ftl import LinearFTL
    return formal.StreamHarness(LinearFTL(formal.formal_params(n_channels=2), 4))


def _demux():
    from evssd.hw.device.ftl import ChannelDemux
    return formal.StreamHarness(ChannelDemux(formal.formal_params(n_channels=2), 4))


def _width_up():
    from evssd.hw.lib.width_converter import WidthConverter
    return formal.StreamHarness(WidthConverter(8, 32))


def _width_down():
    from evssd.hw.lib.width_converter import WidthConverter
    return formal.StreamHarness(WidthConverter(32, 8))


def _result_writer():
    from evssd.hw.device.result_writer import ResultWriter
    return formal.StreamHarness(ResultWriter(formal.formal_params(), 16))


def _fork():
    from amaranth.hdl import Assume
    from evssd.hw.device.fork import LookupFork

    def drained(m, started, dut):
        # the engine admits at most max_inflight commands, as many as the statistics FIFO holds
        # (the fork asserts the push finds room): here, the result stage takes them at once
        m.d.comb += Assume(dut.o_stats.ready)
    return formal.StreamHarness(LookupFork(formal.formal_params(), 4), drained)


def _channel_stage(cls, checks=True):
    """A stage of the flash channel controller alone, its stream ports under the stream rule
    (the intake's and issuer's own assertions relate their registers to page-register state,
    which is a free input here: those two run without them). The realigner's descriptors must
    be planned ones: its joins are checked inside the whole controller (``channel``)."""
    def make():
        from evssd.hw.device.channel_plan import ChannelGeometry
        g = ChannelGeometry(formal.formal_params(page_size=512, ch_data_bits=256,
                                                 pages_per_channel=8), 4)
        return formal.StreamHarness(cls()(g, checks=checks))
    return make


def _issuer_cls():
    from evssd.hw.device.burst_issuer import BurstIssuer
    return BurstIssuer


def _intake_cls():
    from evssd.hw.device.read_intake import ReadIntake
    return ReadIntake


def _programmer_cls():
    from evssd.hw.device.channel_programmer import ChannelProgrammer
    return ChannelProgrammer


def _zip():
    from amaranth.hdl import Cover
    from evssd.hw.lib.stream_zip import StreamZip

    def pair_between_items(m, started, dut):
        # the engine changes `pair` only between commands, never under an offered item
        held = formal._past(m, dut.o.valid & ~dut.o.ready, "zip_held")
        p_pair = formal._past(m, dut.pair, "zip_p_pair")
        m.d.comb += [formal.Assume(~(started & held) | (dut.pair == p_pair), "pair_stable"),
                     Cover(dut.o.valid & dut.o.ready & dut.pair, "zip_pair_taken"),
                     Cover(dut.o.valid & dut.o.ready & ~dut.pair & dut.i_b.valid, "zip_a_alone")]
    return formal.StreamHarness(StreamZip(8, 4), pair_between_items)


def _page_programmer():
    from amaranth.hdl import Assume
    from evssd.hw.device.page_programmer import PageProgrammer

    def completions_answer_programs(m, started, dut):
        # a channel reports a program done only for a program it was given
        for i, (req, done) in enumerate(zip(dut.o_prog, dut.i_prog_done)):
            out = formal._counter(m, 4, req.valid & req.ready, done.valid & done.ready,
                                  f"prog{i}_out")
            m.d.comb += [Assume(~done.valid | (out != 0)), Assume(out < 12)]
    # 512-byte pages of 256-bit beats: a whole page program (16 beats) fits in the cover depth
    p = formal.formal_params(n_channels=2, page_size=512, host_data_bits=256, ch_data_bits=256)
    return formal.StreamHarness(PageProgrammer(p),
                                completions_answer_programs)


def _axil_executor():
    from amaranth.hdl import Cover
    from evssd.hw.boards.axil_executor import AxiLiteExecutor

    def master(m, started, dut):
        hs = formal.axi_lite_master_rules(m, started, dut.m_axil, prot=False)
        m.d.comb += [Cover(hs["b"], "exec_write_answered"), Cover(hs["r"], "exec_read_answered")]
    return formal.StreamHarness(AxiLiteExecutor(), master)


def _word_packer():
    from amaranth.hdl import Assert, Cover
    from evssd.hw.device.merger_packer import WordPacker

    def rules(m, started, dut):
        # The input under the stream rule. The output holds valid and data until taken; its
        # `last` (and `err` with it) may rise while the beat waits: a command end of zero words
        # arriving behind a full beat makes that beat the command's last (documented in
        # WordPacker; the merger's output slice takes the beat as it is when it is taken).
        formal.stream_rules(m, started, dut.i_words, check=formal.Assume, name="i_words")
        o = dut.o_beat
        formal._hold_rule(m, started, o.valid, o.ready, o.payload.data, formal.Assert, "o_beat")
        p_wait = formal._past(m, o.valid & ~o.ready, "o_beat_p_wait")
        p_last = formal._past(m, o.payload.last, "o_beat_p_last")
        p_err = formal._past(m, o.payload.err, "o_beat_p_err")
        with m.If(started & p_wait):
            m.d.comb += [Assert(~p_last | o.payload.last, "chk_o_beat_last_kept"),
                         Assert(~p_err | o.payload.err, "chk_o_beat_err_kept")]
        m.d.comb += Cover(o.valid & o.ready & o.payload.last, "o_beat_last_taken")
    return formal.Harness(WordPacker(2, 4), rules)


def _row_intake():
    from evssd.hw.device.merger import row_layout
    from evssd.hw.device.merger_intake import RowIntake
    p = formal.formal_params(n_channels=2)
    return formal.StreamHarness(RowIntake(p, 4, row_layout(p, 4)))


def _merger_geometry():
    from evssd.hw.device.merger_layouts import MergerGeometry
    return MergerGeometry(formal.formal_params(ch_data_bits=32, max_row_bytes=32), 4)


def _descriptor_queue():
    from evssd.hw.device.merger_descq import DescriptorQueue
    return formal.StreamHarness(DescriptorQueue(_merger_geometry(), 4))


def _row_entries():
    from evssd.hw.device.merger_entries import RowEntries

    def retire_only_the_head(m, started, dut):
        # the issue stage retires only a head it has (RowEntries asserts it in simulation)
        m.d.comb += formal.Assume(~dut.o_head.ready | dut.o_head.valid, "retire_head")
    return formal.StreamHarness(RowEntries(_merger_geometry()), retire_only_the_head)


def _output_queue():
    from evssd.hw.device.merger_outq import OutputQueue

    def credits(m, started, dut):
        # an output op fires only with a credit and reaches stage R two cycles later
        f1 = formal._past(m, dut.i_fire, "oq_fire1")
        f2 = formal._past(m, f1, "oq_fire2")
        m.d.comb += [formal.Assume(~dut.i_fire | dut.o_ok, "fire_with_credit"),
                     formal.Assume(dut.i_r.out == f2, "stage_r_follows_fire")]
    return formal.StreamHarness(OutputQueue(_merger_geometry(), 4), credits)


def _issue_stage():
    from evssd.hw.device.merger_issue import IssueStage

    def planned_rows(m, started, dut):
        # rows as the DescriptorQueue plans them: at least one op, one_op for exactly one
        # and the head's flags as RowEntries keeps them: once its row is done (all beats in),
        # done and err stay until the row retires
        x = dut.i_row.payload
        held = formal._past(m, dut.i_row.valid & ~dut.i_row.ready, "iss_held")
        p_done = formal._past(m, dut.i_done, "iss_p_done")
        p_err = formal._past(m, dut.i_err, "iss_p_err")
        d = x.desc
        m.d.comb += [formal.Assume(x.n_ops != 0, "n_ops"),
                     formal.Assume(x.one_op == (x.n_ops == 1), "one_op"),
                     formal.Assume(x.gather == (~d.pooled & ~d.empty_bag), "gather"),
                     formal.Assume(x.accum == (d.pooled & ~d.empty_bag & ~d.bad), "accum"),
                     formal.Assume(x.bad_or_empty == (d.bad | d.empty_bag), "bad_or_empty"),
                     formal.Assume(x.pooled_or_empty == (d.pooled | d.empty_bag), "pooled_or_empty"),
                     formal.Assume(x.goes_emit == (d.empty_bag | (d.pooled & d.bag_end)), "goes_emit"),
                     formal.Assume(~x.hdr | (d.pooled & (x.n_ops > 1)), "hdr"),
                     formal.Assume(~(started & held & p_done) |
                                   (dut.i_done & (dut.i_err == p_err)), "flags_kept")]
    return formal.StreamHarness(IssueStage(_merger_geometry()), planned_rows)


def _bag_emitter():
    from evssd.hw.device.merger_emitter import BagEmitter

    def one_bag_at_a_time(m, started, dut):
        m.d.comb += formal.Assume(~dut.i_bag.valid | ~dut.o_busy, "bag_when_free")
    return formal.StreamHarness(BagEmitter(_merger_geometry()), one_bag_at_a_time)


def _read_stages():
    from evssd.hw.device.merger_read_stages import ReadStages

    def one_output_op(m, started, dut):
        iss = dut.i_issue
        m.d.comb += formal.Assume(~(iss.valid & iss.payload.out & dut.i_emit.valid), "one_out")
    return formal.StreamHarness(ReadStages(_merger_geometry()), one_output_op)


# (name, harness factory, bmc depth, cover depth)
CASES = [
    ("skid", _skid, 8, 6),
    ("register_stage", _register_stage, 8, 6),
    ("ftl", _ftl, 8, 8),
    ("demux", _demux, 8, 8),
    ("mmio", formal.mmio_harness, 10, 8),
    ("dma", lambda: formal.dma_harness(min_bytes=1), 16, 12),
    ("channel", formal.channel_harness, 12, 22),
    ("width_up", _width_up, 8, 8),
    ("width_down", _width_down, 8, 8),
    ("result", _result_writer, 12, 12),
    ("fork", _fork, 10, 10),
    ("ch_issuer", _channel_stage(_issuer_cls, checks=False), 10, 8),
    ("ch_intake", _channel_stage(_intake_cls, checks=False), 10, 8),
    ("ch_programmer", _channel_stage(_programmer_cls), 10, 12),
    ("zip", _zip, 8, 6),
    ("page_programmer", _page_programmer, 12, 26),
    ("axil_executor", _axil_executor, 10, 14),
    ("word_packer", _word_packer, 8, 10),
    ("row_intake", _row_intake, 8, 6),
    ("merger_descq", _descriptor_queue, 10, 10),
    ("merger_entries", _row_entries, 8, 8),
    ("merger_outq", _output_queue, 10, 10),
    ("merger_issue", _issue_stage, 10, 8),
    ("merger_emitter", _bag_emitter, 10, 8),
    ("merger_read_stages", _read_stages, 6, 4),
]


@pytest.mark.parametrize("name,factory,depth,_", CASES, ids=[c[0] for c in CASES])
def test_bmc(tmp_path, name, factory, depth, _):
    res = _run(tmp_path, factory(), name, "bmc", depth)
    assert res.passed, f"{res.status}: failed properties {res.failed}\n{res.log_tail}"


@pytest.mark.parametrize("name,factory,_,depth", CASES, ids=[c[0] for c in CASES])
def test_cover(tmp_path, name, factory, _, depth):
    res = _run(tmp_path, factory(), name, "cover", depth)
    assert res.passed, f"{res.status}: unreached covers\n{res.log_tail}"
    assert "reached cover statement" in (res.workdir / f"{name}_cover" / "logfile.txt").read_text()


def test_bmc_dma_zero_byte_read(tmp_path):
    """Zero-byte reads (one local beat, no bus traffic) keep the stream rule too."""
    res = _run(tmp_path, formal.dma_harness(max_bytes=1), "dma0", "bmc", 8)
    assert res.passed, f"{res.status}: failed properties {res.failed}"


# ---- the properties fail on components that break them

class _DroppingSlave(wiring.Component):
    """An AXI4-Lite slave that answers a write and drops BVALID after one cycle."""

    def __init__(self):
        super().__init__({"s_axil": In(AXI4LiteSignature(addr_width=12, data_width=32))})

    def elaborate(self, platform):
        m = Module()
        bus = self.s_axil
        busy = Signal()
        m.d.comb += [bus.awready.eq(~busy), bus.wready.eq(~busy), bus.arready.eq(0), bus.rvalid.eq(0),
                     bus.bresp.eq(0)]
        with m.If(bus.awvalid & bus.wvalid & ~busy):
            m.d.sync += busy.eq(1)
        with m.If(busy):
            m.d.sync += busy.eq(0)
        m.d.comb += bus.bvalid.eq(busy)
        return m


class _ShortBurstMaster(wiring.Component):
    """An AXI4 master that writes 4-beat bursts (LEN 3, 32 bytes) at ``addr``, with WLAST on beat
    ``wlast_beat`` (0-based) and W beats before AW is taken."""

    def __init__(self, wlast_beat, addr):
        self.wlast_beat = wlast_beat
        self.addr = addr
        super().__init__({"m_axi": Out(AXI4Signature(addr_width=16, data_width=64, id_width=1))})

    def elaborate(self, platform):
        m = Module()
        bus = self.m_axi
        beat = Signal(2)
        aw_sent = Signal()
        m.d.comb += [bus.awaddr.eq(self.addr), bus.awlen.eq(3),
                     bus.awsize.eq(3), bus.awburst.eq(1), bus.awvalid.eq(~aw_sent),
                     bus.wvalid.eq(1), bus.wlast.eq(beat == self.wlast_beat), bus.bready.eq(1),
                     bus.rready.eq(1), bus.arvalid.eq(0), bus.wdata.eq(beat), bus.wstrb.eq(0xFF),
                     bus.awid.eq(0), bus.awprot.eq(0)]
        with m.If(bus.awvalid & bus.awready):
            m.d.sync += aw_sent.eq(1)
        with m.If(bus.wvalid & bus.wready):
            m.d.sync += beat.eq(Mux(bus.wlast, 0, beat + 1))
            with m.If(bus.wlast):
                m.d.sync += aw_sent.eq(0)
        return m


def test_properties_catch_a_dropped_bvalid(tmp_path):
    def rules(m, started, dut):
        formal.axi_lite_slave_rules(m, started, dut.s_axil)
    res = _run(tmp_path, formal.Harness(_DroppingSlave(), rules), "drop", "bmc", 6)
    assert not res.passed and "trace.vcd: chk_axil_b_valid_held" in res.failed, res.failed


@pytest.mark.parametrize("wlast_beat,crosses", [(2, False), (3, True)])
def test_properties_catch_wlast_and_4k(tmp_path, wlast_beat, crosses):
    """WLAST on the third beat of a LEN 3 burst breaks the beat rule; a 32-byte burst at 0xFF0
    with the right WLAST crosses 4 KiB."""
    def rules(m, started, dut):
        formal.axi4_master_rules(m, started, dut.m_axi, name="m", data_bytes=8)
    res = _run(tmp_path, formal.Harness(_ShortBurstMaster(wlast_beat, 0x0FF0 if crosses else 0x0F00), rules), "master", "bmc", 10)
    assert not res.passed
    flags = {f.split(": ")[1] for f in res.failed}
    assert ("chk_m_aw_within_4k" in flags) if crosses else ("chk_m_wlast_on_beat_len_plus_1" in flags), flags
