"""PageProgrammer: the PROGRAM_PAGES data path, host pages to the flash channels.

For one job (``i_job``: ``src_addr``, ``lba``, ``count``) it moves ``count`` pages, page ``k``
from host memory at ``src_addr + k * page_size`` to flash LBA ``lba + k``:

```
PG_REQ  -> o_prog[ch] (page)               when channel ch has no program outstanding
PG_DMA  -> o_pg_cmd (addr, page_size)      one host DMA read per page
PG_DATA -> i_pg_data -> width conversion -> o_prog_data[ch]   (page_size / ch bytes beats)
PG_NEXT    the next LBA's channel and page
PG_END  -> o_done (err)                    once every channel's last program is done
```

The LBA -> (channel, page) mapping is :func:`evssd.hw.device.ftl.lba_split`, the one
definition the FTL's read path uses too: the first page's position is ``lba_split(lba)``, and
each next LBA steps it the way ``lba_split`` does (channel + 1, wrapping to channel 0 and
page + 1), so no divider sits in the per-page loop. A channel takes its next page only after
its previous program is done (``i_prog_done``, taken in any state); the other channels'
programs (tPROG each) overlap with this page's transfer. ``o_done.err`` is set when any page's
DMA read or any program completion of the job carried an error. A job of ``count`` 0 completes
at once without error.

A component of its own because it shares nothing with the command engine's front but the job
and its completion: the front waits until PROGRAM_PAGES is the only command in flight, hands
over the job and waits for ``o_done``. Job accept and ``o_done`` cost no cycle of their own
(``i_job.ready`` is high in IDLE, ``o_done.valid`` comes from the busy flags' registers).
"""
from __future__ import annotations

from amaranth import Module, Signal, Const
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.dma_stream import DMA_CMD_LAYOUT, dma_read_layout
from ..lib.width_converter import WidthConverter
from ..regmap import Params
from . import channel_programmer as ch_mod
from .ftl import lba_split

__all__ = ["PageProgrammer", "JOB_LAYOUT", "DONE_LAYOUT"]

# one PROGRAM_PAGES command as the front hands it over
JOB_LAYOUT = data.StructLayout({"src_addr": 64, "lba": 32, "count": 32})
DONE_LAYOUT = data.StructLayout({"err": 1})


class PageProgrammer(wiring.Component):
    """See the module docstring. Ports: ``i_job``, ``o_done``; DMA read port
    ``o_pg_cmd``/``i_pg_data``; per channel c ``o_prog[c]``, ``o_prog_data[c]``,
    ``i_prog_done[c]`` (channel c's program ports)."""

    def __init__(self, params: Params):
        try:
            Params.require(params)
        except (TypeError, ValueError):
            self._MustUse__silence = True   # a rejected object is not an unused elaboratable
            raise
        self.params = p = params
        super().__init__({
            "i_job": In(stream.Signature(JOB_LAYOUT)),
            "o_done": Out(stream.Signature(DONE_LAYOUT)),
            "o_pg_cmd": Out(stream.Signature(DMA_CMD_LAYOUT)),
            "i_pg_data": In(stream.Signature(dma_read_layout(p.host_data_bits))),
            "o_prog": Out(stream.Signature(ch_mod.prog_request_layout())).array(p.n_channels),
            "o_prog_data": Out(stream.Signature(ch_mod.prog_data_layout(p))).array(p.n_channels),
            "i_prog_done": In(stream.Signature(ch_mod.prog_done_layout())).array(p.n_channels),
        })

    def elaborate(self, platform):
        m = Module()
        p = self.params
        wh, wc = p.host_data_bits, p.ch_data_bits
        n_ch = p.n_channels
        ps = p.page_size

        src = Signal(64)
        pg_k = Signal(32)
        count_m1 = Signal(32)
        pg_ch = Signal(range(n_ch))
        pg_page = Signal(32)
        pg_beats = Signal(range(ps // (wc // 8) + 1))
        pg_err = Signal()               # a page's DMA read carried an error
        pg_busy = Signal(n_ch)          # a program is outstanding in channel i
        pg_issue = Signal(n_ch)         # pulse: a program request was accepted by channel i
        pg_done_err = Signal()          # a program completion of this job carried an error
        job = self.i_job.payload
        first_ch, first_page = lba_split(m, job.lba, n_ch, name="pg_first")

        m.submodules.pgconv = pgconv = WidthConverter(wh, wc)
        m.d.comb += [
            pgconv.i.payload.data.eq(self.i_pg_data.payload.data),
            pgconv.i.payload.err.eq(self.i_pg_data.payload.err),
        ]
        accept = Signal()

        with m.FSM(name="programmer"):
            with m.State("IDLE"):
                m.d.comb += [self.i_job.ready.eq(1), accept.eq(self.i_job.valid)]
                with m.If(self.i_job.valid):
                    m.d.sync += [src.eq(job.src_addr), count_m1.eq(job.count - 1), pg_k.eq(0),
                                 pg_err.eq(0), pg_ch.eq(first_ch), pg_page.eq(first_page)]
                    with m.If(job.count == 0):
                        m.next = "PG_END"
                    with m.Else():
                        m.next = "PG_REQ"
            with m.State("PG_REQ"):
                # a channel takes its next page only after its previous program is done; the
                # other channels' programs (tPROG each) overlap with this one
                for i in range(n_ch):
                    with m.If((pg_ch == i) & ~pg_busy[i]):
                        m.d.comb += self.o_prog[i].valid.eq(1)
                        with m.If(self.o_prog[i].ready):
                            m.d.comb += pg_issue[i].eq(1)
                            m.next = "PG_DMA"
            with m.State("PG_DMA"):
                m.d.comb += [self.o_pg_cmd.valid.eq(1),
                             self.o_pg_cmd.payload.addr.eq(src + pg_k * ps),
                             self.o_pg_cmd.payload.bytes.eq(ps)]
                with m.If(self.o_pg_cmd.ready):
                    m.d.sync += pg_beats.eq(ps // (wc // 8))
                    m.next = "PG_DATA"
            with m.State("PG_DATA"):
                m.d.comb += [pgconv.i.valid.eq(self.i_pg_data.valid),
                             self.i_pg_data.ready.eq(pgconv.i.ready)]
                with m.If(self.i_pg_data.valid & self.i_pg_data.ready & self.i_pg_data.payload.err):
                    m.d.sync += pg_err.eq(1)
                for i in range(n_ch):
                    with m.If(pg_ch == i):
                        m.d.comb += [self.o_prog_data[i].valid.eq(pgconv.o.valid),
                                     pgconv.o.ready.eq(self.o_prog_data[i].ready)]
                with m.If(pgconv.o.valid & pgconv.o.ready):
                    m.d.sync += pg_beats.eq(pg_beats - 1)
                    with m.If(pg_beats == 1):
                        m.next = "PG_NEXT"
            with m.State("PG_NEXT"):
                # the next LBA's channel and page (lba_split stepped by one), a cycle after the
                # last beat (the data handshake stays out of these registers' enables)
                m.d.sync += pg_k.eq(pg_k + 1)
                with m.If(pg_ch == n_ch - 1):
                    m.d.sync += [pg_ch.eq(0), pg_page.eq(pg_page + 1)]
                with m.Else():
                    m.d.sync += pg_ch.eq(pg_ch + 1)
                with m.If(pg_k == count_m1):
                    m.next = "PG_END"
                with m.Else():
                    m.next = "PG_REQ"
            with m.State("PG_END"):
                # the job is done when every channel has finished its last program
                m.d.comb += [self.o_done.valid.eq(pg_busy == 0),
                             self.o_done.payload.err.eq(pg_err | pg_done_err)]
                with m.If(self.o_done.valid & self.o_done.ready):
                    m.next = "IDLE"

        # the program payloads go to every channel (only the selected one sees valid)
        for i in range(n_ch):
            m.d.comb += [self.o_prog[i].payload.page.eq(pg_page),
                         self.o_prog_data[i].payload.data.eq(pgconv.o.payload.data)]

        # program completions are taken in any state: one outstanding program per channel
        for i in range(n_ch):
            m.d.comb += self.i_prog_done[i].ready.eq(1)
            with m.If(pg_issue[i]):
                m.d.sync += pg_busy[i].eq(1)
            with m.Elif(self.i_prog_done[i].valid):
                m.d.sync += pg_busy[i].eq(0)
        done_err = Const(0, 1)
        for i in range(n_ch):
            done_err = done_err | (self.i_prog_done[i].valid & self.i_prog_done[i].payload.err)
        with m.If(accept):
            m.d.sync += pg_done_err.eq(0)
        with m.Elif(done_err):
            m.d.sync += pg_done_err.eq(1)
        return m
