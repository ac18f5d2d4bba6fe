"""A register-level model (a mock) of the ECPIX-5's LiteDRAM control registers: the DFI injector
(DFII), the ECP5 PHY's read-delay, bitslip and burst-detect registers, and a DDR3 chip behind them.

No board exists here: this is what :mod:`evssd.host.dram_init` is tested against. It decodes the
CSR window by address (the generated core's map: ``hw/boards/ecpix5_dram.json``, which
tests/hw/test_litex_cores.py checks against the generator), keeps every register as LiteDRAM
does (storage registers read back; ``command_issue``, ``rdly_*`` and ``burstdet_clr`` act on a
write; multi-word registers hold their most significant word first), and records what the host
did: control writes, DFI commands with their phase, address and bank, and the host's waits.

The read path is the part calibration is about. As on the ECP5, a lane's ``dly_sel`` bit is also
its DQS buffer's PAUSE: a new delay or bitslip takes effect when the lane's PAUSE is released, and
a burst read while it is held comes back as noise with no burst detected. Per byte lane the model is given, for each bitslip
setting (steps after ``rdly_dq_bitslip_rst``), the read delays (steps after ``rdly_dq_rst``) at
which the lane captures correctly; at a delay that captures for another bitslip the lane's bytes
come back shifted by the bitslip difference in beats, elsewhere they are noise. The DQS burst
detector (``burstdet_seen``) fires for delays in ``burst`` (default: every delay that captures
for some bitslip). Protocol errors (a command under hardware control, a WRITE on the wrong phase
or without its data flag, a READ of a closed row, a mode-register write with CKE low or a row
open...) are collected in ``violations``.
"""
from __future__ import annotations

import random

from evssd.hw.bridge_protocol import DRAM_CTRL_BASE, DRAM_CTRL_BYTES
from evssd.host.dram_init import CsrBus, DramData

PULSES = ("command_issue", "ddrphy_rdly_dq_rst", "ddrphy_rdly_dq_inc", "ddrphy_rdly_dq_bitslip_rst",
          "ddrphy_rdly_dq_bitslip", "ddrphy_burstdet_clr")


class MockBusError(Exception):
    """An access the real core would not answer (an address outside its registers)."""


class Ddr3PhyModel(CsrBus):
    def __init__(self, data: DramData, windows: dict, *, burst: dict | None = None, seed: int = 0,
                 calibrated: bool = False):
        self.d = data
        self.windows = {lane: {b: set(ds) for b, ds in windows.get(lane, {}).items()} for lane in range(data.lanes)}
        self.burst = {lane: set(burst[lane]) if burst and lane in burst else
                      set().union(*self.windows[lane].values()) for lane in range(data.lanes)}
        self.rng = random.Random(seed)
        self.by_addr = {}
        for name, r in data.registers.items():
            for i in range(r["words"]):
                self.by_addr[r["addr"] + 4 * i] = (name, i)
        self.values = {name: 0 for name in data.registers}
        self.values["sdram_dfii_control"] = data.control["sel"]        # LiteDRAM's reset: hardware control
        if calibrated:
            self.values["ddrctrl_init_done"] = 1
        phy = data.phy
        self.delays, self.bitslips = phy["delays"], phy["bitslips"]
        self.rdly = [0] * data.lanes
        self.slip = [self.bitslips - 1] * data.lanes                    # BitSlip's reset value
        self.applied = [(0, self.bitslips - 1)] * data.lanes            # (rdly, slip) at the last PAUSE release
        self.open_rows: dict[int, int] = {}
        self.mem: dict[tuple, list] = {}
        self.log: list[tuple] = []
        self.violations: list[str] = []
        self.reads = self.writes = 0

    # ---------------------------------------------------------------- the CSR bus
    async def read(self, addr: int, count: int = 1) -> list[int]:
        self.reads += 1
        return [self.read_word(addr + 4 * i) for i in range(count)]

    async def write(self, addr: int, words: list[int]) -> None:
        self.writes += 1
        for i, w in enumerate(words):
            self.write_word(addr + 4 * i, w)

    def _locate(self, addr):
        try:
            return self.by_addr[addr]
        except KeyError:
            raise MockBusError(f"no LiteDRAM register at +0x{addr:x}") from None

    def read_word(self, addr: int) -> int:
        name, i = self._locate(addr)
        words = self.d.registers[name]["words"]
        return (self.values[name] >> (32 * (words - 1 - i))) & 0xFFFF_FFFF

    def write_word(self, addr: int, value: int) -> None:
        name, i = self._locate(addr)
        r = self.d.registers[name]
        if r["access"] == "ro":
            return                      # LiteX ignores writes to status registers
        shift = 32 * (r["words"] - 1 - i)
        old = self.values[name]
        self.values[name] = (self.values[name] & ~(0xFFFF_FFFF << shift)) | ((value & 0xFFFF_FFFF) << shift)
        if name == "ddrphy_dly_sel":
            for lane in range(self.d.lanes):
                if old >> lane & 1 and not self.values[name] >> lane & 1:
                    self.applied[lane] = (self.rdly[lane], self.slip[lane])
        if name == "sdram_dfii_control":
            self.log.append(("control", value))
        if i == r["words"] - 1 and any(name.endswith(p) for p in PULSES):
            self._pulse(name)

    # ---------------------------------------------------------------- actions
    def lane_selected(self, lane):
        return self.values["ddrphy_dly_sel"] >> lane & 1

    def host_bitslip(self, lane):
        return (self.slip[lane] - (self.bitslips - 1)) % self.bitslips

    def _pulse(self, name):
        for lane in range(self.d.lanes):
            if not self.lane_selected(lane):
                continue
            if name == "ddrphy_rdly_dq_rst":
                self.rdly[lane] = 0
            elif name == "ddrphy_rdly_dq_inc":
                self.rdly[lane] = (self.rdly[lane] + 1) % self.delays
            elif name == "ddrphy_rdly_dq_bitslip_rst":
                self.slip[lane] = self.bitslips - 1
            elif name == "ddrphy_rdly_dq_bitslip":
                self.slip[lane] = (self.slip[lane] + 1) % self.bitslips
        if name == "ddrphy_burstdet_clr":
            self.values["ddrphy_burstdet_seen"] = 0
        if name.endswith("command_issue"):
            self._command(int(name[len("sdram_dfii_pi"):].split("_")[0]))

    def _command(self, phase):
        d, k, c = self.d, self.d.command, self.d.control
        p = f"sdram_dfii_pi{phase}_"
        cmd, address, bank = self.values[p + "command"], self.values[p + "address"], self.values[p + "baddress"]
        control = self.values["sdram_dfii_control"]
        if control & c["sel"]:
            self.violations.append(f"command 0x{cmd:x} issued under hardware control")
            return
        if not cmd & k["cs"]:
            return                                                  # deselected: a NOP
        ras, cas, we = bool(cmd & k["ras"]), bool(cmd & k["cas"]), bool(cmd & k["we"])
        kind = {(1, 1, 1): "MRS", (1, 0, 0): "ACT", (0, 1, 1): "WR", (0, 1, 0): "RD", (1, 0, 1): "PRE",
                (0, 0, 1): "ZQ", (1, 1, 0): "REF"}.get((ras, cas, we), "NOP")
        self.log.append(("command", kind, phase, address, bank, cmd))
        ready = control & c["cke"] and control & c["reset_n"]
        if kind in ("MRS", "ZQ", "REF") and (not ready or self.open_rows):
            self.violations.append(f"{kind} with CKE/RESET# 0x{control:x} or rows open {self.open_rows}")
        elif kind in ("ACT", "WR", "RD", "PRE") and not ready:
            self.violations.append(f"{kind} with CKE/RESET# low (control 0x{control:x})")
        if kind == "ACT":
            if bank in self.open_rows:
                self.violations.append(f"ACT of bank {bank} with row {self.open_rows[bank]} open")
            self.open_rows[bank] = address
        elif kind == "PRE":
            if address >> 10 & 1:
                self.open_rows.clear()
            else:
                self.open_rows.pop(bank, None)
        elif kind == "WR":
            if phase != d.phy["wrphase"] or not cmd & k["wrdata"] or bank not in self.open_rows:
                self.violations.append(f"WR on phase {phase} (cmd 0x{cmd:x}), open rows {self.open_rows}")
                return
            self.mem[(bank, self.open_rows[bank], address)] = [
                self.values[f"sdram_dfii_pi{q}_wrdata"] for q in range(d.phy["nphases"])]
        elif kind == "RD":
            if phase != d.phy["rdphase"] or not cmd & k["rddata"] or bank not in self.open_rows:
                self.violations.append(f"RD on phase {phase} (cmd 0x{cmd:x}), open rows {self.open_rows}")
                return
            self._read_burst(self.mem.get((bank, self.open_rows[bank], address)))

    def _read_burst(self, stored):
        phy = self.d.phy
        n, width, beats = phy["nphases"], phy["databits"], phy["dfi_databits"] // phy["databits"]
        total = n * beats
        if stored is None:
            stored = [self.rng.getrandbits(phy["dfi_databits"]) for _ in range(n)]

        def byte(lane, beat):
            return (stored[beat // beats] >> ((beat % beats) * width + 8 * lane)) & 0xFF

        out = [0] * n
        for lane in range(self.d.lanes):
            good = self.windows[lane]
            rdly, hw_slip = self.applied[lane]
            slip = (hw_slip - (self.bitslips - 1)) % self.bitslips
            paused = self.lane_selected(lane)
            if rdly in self.burst[lane] and not paused:
                self.values["ddrphy_burstdet_seen"] |= 1 << lane
            captures = [] if paused else [b for b, ds in good.items() if rdly in ds]
            for beat in range(total):
                if slip in captures:
                    v = byte(lane, beat)
                elif captures:
                    v = byte(lane, (beat + slip - captures[0]) % total)     # a whole beat early or late
                else:
                    v = self.rng.getrandbits(8)
                out[beat // beats] |= v << ((beat % beats) * width + 8 * lane)
        for q in range(n):
            self.values[f"sdram_dfii_pi{q}_rddata"] = out[q]

    # ---------------------------------------------------------------- views for the tests
    def init_steps(self):
        """The control writes and mode-register/ZQ commands, in order, as (kind, value, address, bank)."""
        out = []
        for e in self.log:
            if e[0] == "control":
                out.append(("control", e[1], None, None))
            elif e[1] in ("MRS", "ZQ"):
                out.append(("command", e[5], e[3], e[4]))
        return out


class DramWindow:
    """A board bus (``read(addr) -> (word, resp)``, ``write(addr, value, strb) -> resp``) with the
    DRAM controller's window at ``DRAM_CTRL_BASE`` served by a :class:`Ddr3PhyModel`."""

    def __init__(self, read, write, model: Ddr3PhyModel):
        self._read, self._write, self.model = read, write, model

    def read(self, addr):
        if DRAM_CTRL_BASE <= addr < DRAM_CTRL_BASE + DRAM_CTRL_BYTES:
            try:
                return self.model.read_word(addr - DRAM_CTRL_BASE), 0
            except MockBusError:
                return 0, 2
        return self._read(addr)

    def write(self, addr, value, strb):
        if DRAM_CTRL_BASE <= addr < DRAM_CTRL_BASE + DRAM_CTRL_BYTES:
            try:
                self.model.write_word(addr - DRAM_CTRL_BASE, value)
                return 0
            except MockBusError:
                return 2
        return self._write(addr, value, strb)
