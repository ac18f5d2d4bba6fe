"""PageRegisters: a flash channel's ``ways`` NAND page registers, their tR timers and LRU order.

A read whose page is in a register (loaded or still loading) skips tR; a miss claims the least
recently used register that no accepted read still needs, and its data can move ``t_r`` cycles
later (:class:`~.channel.WayModel` is the executable definition of which reads pay tR). The
decisions are the read intake's (:class:`~.read_intake.ReadIntake`); this component holds the
state they change and shows it as registers (plus the LRU one-hot, one LUT level of them):

- ``claim`` (one-hot or zero) with ``claim_page``: that register takes the page; its timer is
  loaded a cycle later (``loading``) with ``t_r - 1``, so tR ends on the same cycle as if loaded
  at once while the claim's fan-out stays small.
- ``touch`` (one-hot or zero): a read was accepted on that register: it becomes the most
  recently used, and its reference count goes up. One-hot, so each register's update is one
  gate of the intake's accept and its own bit (no way-number decode behind the accept).
- ``done`` / ``done_way``: a read using that register has finished; the reference is dropped a
  cycle later (from registers: a late drop only delays an LRU replacement by a cycle).
- ``invalidate`` / ``invalidate_page``: a program started: a register holding the page is emptied.

Outputs: ``valid``, ``page`` (an array), ``ready`` (tR over), ``ref_zero`` (no reference),
``lru`` (one-hot: the least recently used register), ``loading`` (timer loads this cycle).
"""
from __future__ import annotations

from amaranth import Module, Signal, Cat, Const, Mux
from amaranth.hdl import Assert
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .channel_plan import ChannelGeometry

__all__ = ["PageRegisters"]


class PageRegisters(wiring.Component):
    """Page-register state of one channel: pages, tR timers, references, LRU order."""

    def __init__(self, geometry: ChannelGeometry, *, checks: bool = True):
        self.geometry = g = geometry
        self.checks = checks
        ways = g.ways
        super().__init__({
            "t_r": In(24),
            "claim": In(ways), "claim_page": In(g.page_bits),
            "touch": In(ways),
            "done": In(1), "done_way": In(range(ways)),
            "invalidate": In(1), "invalidate_page": In(g.page_bits),
            "valid": Out(ways), "page": Out(data.ArrayLayout(g.page_bits, ways)),
            "ready": Out(ways, init=(1 << ways) - 1), "ref_zero": Out(ways, init=(1 << ways) - 1),
            "lru": Out(ways), "loading": Out(ways),
        })

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        ways = g.ways
        way_valid = [Signal(name=f"way{w}_valid") for w in range(ways)]
        way_page = [Signal(g.page_bits, name=f"way{w}_page") for w in range(ways)]
        way_timer = [Signal(24, name=f"way{w}_timer") for w in range(ways)]
        way_ready = [Signal(init=1, name=f"way{w}_ready") for w in range(ways)]  # timer == 0
        way_ref = [Signal(g.ref_width, name=f"way{w}_ref") for w in range(ways)]
        way_ref_zero = [Signal(init=1, name=f"way{w}_ref_zero") for w in range(ways)]  # ref == 0
        # more_recent[i][j]: way i was used after way j (exact LRU order as a bit matrix).
        # Reset order: way 0 least recent, as WayModel.
        more_recent = [[Signal(init=int(i > j), name=f"lru_{i}_{j}") if i != j else None
                        for j in range(ways)] for i in range(ways)]
        claim_d = [Signal(name=f"way{w}_claim_d") for w in range(ways)]
        m.d.comb += [
            self.valid.eq(Cat(*way_valid)), self.ready.eq(Cat(*way_ready)),
            self.ref_zero.eq(Cat(*way_ref_zero)), self.loading.eq(Cat(*claim_d)),
            self.lru.eq(Cat(*[Cat(*[~more_recent[i][j] for j in range(ways) if j != i]).all()
                              if ways > 1 else Const(1) for i in range(ways)])),
        ]
        for w in range(ways):
            m.d.comb += self.page[w].eq(way_page[w])

        t_r_m1 = Signal(24)
        m.d.comb += t_r_m1.eq(Mux(self.t_r == 0, 0, self.t_r - 1))
        for w in range(ways):
            m.d.sync += claim_d[w].eq(self.claim[w])
            with m.If(claim_d[w]):
                m.d.sync += [way_timer[w].eq(t_r_m1), way_ready[w].eq(self.t_r <= 1)]
            with m.Elif(~way_ready[w]):
                m.d.sync += way_timer[w].eq(way_timer[w] - 1)
                with m.If(way_timer[w] == 1):
                    m.d.sync += way_ready[w].eq(1)
            with m.If(self.invalidate & (way_page[w] == self.invalidate_page)):
                m.d.sync += way_valid[w].eq(0)
            with m.If(self.claim[w]):
                m.d.sync += [way_valid[w].eq(1), way_page[w].eq(self.claim_page)]
            if self.checks:
                m.d.sync += Assert(way_ready[w] == (way_timer[w] == 0),
                                   "channel: way_ready out of step")
        for i in range(ways):
            for j in range(ways):
                if i == j:
                    continue
                with m.If(self.touch[i]):
                    m.d.sync += more_recent[i][j].eq(1)
                with m.Elif(self.touch[j]):
                    m.d.sync += more_recent[i][j].eq(0)

        if self.checks:
            m.d.sync += Assert((self.touch & (self.touch - 1)) == 0, "channel: touch not one-hot")
        done_d = Signal()
        done_way = Signal.like(self.done_way)
        m.d.sync += [done_d.eq(self.done), done_way.eq(self.done_way)]
        for w in range(ways):
            inc = self.touch[w]
            dec = done_d & (done_way == w)
            with m.If(inc & ~dec):
                m.d.sync += [way_ref[w].eq(way_ref[w] + 1), way_ref_zero[w].eq(0)]
            with m.Elif(dec & ~inc):
                m.d.sync += [way_ref[w].eq(way_ref[w] - 1), way_ref_zero[w].eq(way_ref[w] == 1)]
        return m
