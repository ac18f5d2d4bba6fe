"""DDR3 initialisation and read levelling of the ECPIX-5's LiteDRAM core, from the host.

The ECPIX-5 build generates LiteDRAM without a CPU (:mod:`evssd.hw.boards.litex_cores`), so nothing
on the board runs the DDR3 power-up sequence or calibrates the read path: until the host does,
LiteDRAM holds its user port and every flash-channel access waits. The host reaches the core's
control/status registers through the bridge window at ``DRAM_CTRL_BASE``
(:mod:`evssd.hw.bridge_protocol`) and runs, through LiteDRAM's DFI injector (DFII):

1. software control with RESET# and CKE low (held for ``RESET_HOLD_S``), then LiteDRAM's own DDR3
   sequence for this core: release reset, CKE high, MR2, MR3, MR1, MR0 with DLL reset, ZQCL, with
   its waits (``init_sequence`` of the generated data: ``litedram.init``, not retyped here);
2. read levelling of the ECP5 PHY, one byte lane at a time: for every bitslip and read delay
   (the PHY's ``rdly_dq_bitslip``/``rdly_dq_inc`` steps), write a pseudo-random burst to a test
   row through the DFII, read it back, and count the setting as passing when the lane's bytes
   match for two patterns and the DQS burst detector saw the read; per bitslip the widest run of
   passing delays wins, and the lane is left at the centre of the widest run of all. On the
   ECP5 a lane's ``dly_sel`` bit also holds its DQSBUFM's PAUSE: a lane is selected only around
   each step, then all lanes' PAUSE lines are toggled once to resynchronise the DQS buffers (as
   LiteX's ``liblitedram`` does for this PHY), and bursts are read with nothing selected;
3. hardware control, ``ddrctrl_init_done = 1``: LiteDRAM opens its user port.

A lane with no passing setting ends in :class:`DramInitError` naming the lane and showing the
scan, with ``ddrctrl_init_error = 1`` (the board's red LED). Register addresses, the DFII bit
values, the sequence and the PHY's delay/bitslip counts come from the committed data of the
generated core (``hw/boards/ecpix5_dram.json``, checked against the generator by the build and the
tests): one source of truth, nothing typed twice.

**Not run on hardware** (no board was available): the tests drive it against a register-level
model of the DFII, the ECP5 PHY and a DDR3 chip (``tests/dram_model.py``, a mock).

Pure Python: no Amaranth, no LiteX at run time.
"""
from __future__ import annotations

import abc
import asyncio
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from evssd.hw.bridge_protocol import DRAM_CTRL_BASE, DRAM_CTRL_BYTES
from evssd.host.transport import TransportError

__all__ = ["DramInitError", "DramData", "load_dram_data", "CsrBus", "BridgeCsrBus", "LaneResult",
           "DramInitResult", "DramController", "init_dram", "dram_ready", "RESET_HOLD_S", "DEFAULT_DATA"]

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "hw" / "boards" / "ecpix5_dram.json"
RESET_HOLD_S = 200e-6       # JEDEC DDR3: RESET# low for at least 200 us at power-up
TEST_BANK, TEST_ROW, TEST_COL = 0, 0, 0
PATTERN_SEEDS = (42, 84)    # two pseudo-random bursts per setting

# the registers the bring-up uses; a data file without one of them is refused at load time
REQUIRED = ("ddrctrl_init_done", "ddrctrl_init_error", "ddrphy_dly_sel", "ddrphy_rdly_dq_rst",
            "ddrphy_rdly_dq_inc", "ddrphy_rdly_dq_bitslip_rst", "ddrphy_rdly_dq_bitslip",
            "ddrphy_burstdet_clr", "ddrphy_burstdet_seen", "sdram_dfii_control")
PHASE_REGS = ("command", "command_issue", "address", "baddress", "wrdata", "rddata")


class DramInitError(TransportError):
    """The DDR3 could not be brought up (calibration failed, a register did not answer, bad data)."""


@dataclass(frozen=True)
class DramData:
    """The generated core's bring-up data (see :mod:`evssd.hw.boards.litex_cores`)."""
    registers: dict            # name -> {"addr": byte offset in the CSR window, "words", "access"}
    control: dict              # DFII control bits: sel, cke, odt, reset_n
    command: dict              # DFII command bits: cs, we, cas, ras, wrdata, rddata
    init_sequence: list        # [{"comment", "address", "bank", "kind": control|command, "value", "delay_cycles"}]
    phy: dict                  # nphases, rdphase, wrphase, databits, dfi_databits, strobes, delays, bitslips ...
    sys_clk_hz: int
    source: str = ""

    @property
    def lanes(self) -> int:
        return self.phy["strobes"]

    def reg(self, name: str) -> tuple[int, int]:
        """(byte offset, 32-bit words) of register ``name``."""
        try:
            r = self.registers[name]
        except KeyError:
            raise DramInitError(f"{self.source}: LiteDRAM has no register {name!r}") from None
        return r["addr"], r["words"]

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "DramData":
        def need(mapping, key, where):
            if key not in mapping:
                raise DramInitError(f"{source}: {where} has no {key!r}: not LiteDRAM bring-up data")
            return mapping[key]

        if d.get("format") != 1:
            raise DramInitError(f"{source}: data format {d.get('format')!r}, this evssd reads format 1")
        if d.get("csr_data_width") != 32:
            raise DramInitError(f"{source}: CSR data width {d.get('csr_data_width')!r}; the bridge "
                                f"window needs 32-bit CSRs")
        phy = need(d, "phy", "the data")
        for k in ("nphases", "rdphase", "wrphase", "databits", "dfi_databits", "strobes", "delays", "bitslips",
                  "read_leveling"):
            need(phy, k, "phy")
        if phy["dfi_databits"] % (8 * phy["strobes"]) or phy["databits"] != 8 * phy["strobes"]:
            raise DramInitError(f"{source}: {phy['databits']} data bits in {phy['strobes']} byte lanes "
                                f"({phy['dfi_databits']} per DFI phase): not a byte-lane PHY")
        regs = need(d, "registers", "the data")
        names = list(REQUIRED) + [f"sdram_dfii_pi{p}_{r}" for p in range(phy["nphases"]) for r in PHASE_REGS]
        for name in names:
            r = need(regs, name, "the register map")
            if r["addr"] % 4 or not 0 <= r["addr"] < DRAM_CTRL_BYTES - 4 * r["words"] + 1:
                raise DramInitError(f"{source}: register {name} at 0x{r['addr']:x} is outside the "
                                    f"{DRAM_CTRL_BYTES:#x}-byte control window")
        control, command = need(d, "dfii_control", "the data"), need(d, "dfii_command", "the data")
        for k in ("sel", "cke", "odt", "reset_n"):
            need(control, k, "dfii_control")
        for k in ("cs", "we", "cas", "ras", "wrdata", "rddata"):
            need(command, k, "dfii_command")
        for step in need(d, "init_sequence", "the data"):
            if step.get("kind") not in ("control", "command"):
                raise DramInitError(f"{source}: init step {step!r} is neither a control write nor a command")
        return cls(regs, control, command, d["init_sequence"], phy, int(need(d, "sys_clk_hz", "the data")), source)


def load_dram_data(path: str | Path | None = None) -> DramData:
    """The bring-up data of the ECPIX-5's LiteDRAM core (default: the committed copy)."""
    path = Path(path) if path is not None else DEFAULT_DATA
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DramInitError(f"cannot read the DDR3 bring-up data {path}: {exc}") from None
    return DramData.from_dict(d, str(path))


class CsrBus(abc.ABC):
    """32-bit access to the core's CSR window (byte offsets from its base)."""

    @abc.abstractmethod
    async def read(self, addr: int, count: int = 1) -> list[int]: ...

    @abc.abstractmethod
    async def write(self, addr: int, words: list[int]) -> None:
        """Write ``words`` to consecutive addresses from ``addr``, in address order."""


class BridgeCsrBus(CsrBus):
    """The CSR window behind a board bridge (``proto``: a
    :class:`~evssd.host.bridge_transport.BridgeProtocol`) at ``DRAM_CTRL_BASE``. A non-OKAY answer
    (the bridge's Wishbone timeout: the core did not answer) is a :class:`DramInitError`."""

    def __init__(self, proto, name: str = "board"):
        self.proto, self.name = proto, name

    async def read(self, addr: int, count: int = 1) -> list[int]:
        data, resp = await self.proto.read_words(DRAM_CTRL_BASE + addr, count)
        if resp:
            raise DramInitError(f"{self.name}: DRAM controller register read at +0x{addr:x} answered "
                                f"resp={resp} (the controller does not answer: is this the ECPIX-5 build?)")
        return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]

    async def write(self, addr: int, words: list[int]) -> None:
        data = b"".join((w & 0xFFFF_FFFF).to_bytes(4, "little") for w in words)
        resp = await self.proto.write_words(DRAM_CTRL_BASE + addr, data)
        if resp:
            raise DramInitError(f"{self.name}: DRAM controller register write at +0x{addr:x} answered "
                                f"resp={resp} (the controller does not answer: is this the ECPIX-5 build?)")


class DramController:
    """LiteDRAM's registers by name over a :class:`CsrBus`. A register of several 32-bit words
    holds its most significant word at its lowest address (LiteX's CSR order)."""

    def __init__(self, bus: CsrBus, data: DramData):
        self.bus, self.data = bus, data

    async def read(self, name: str) -> int:
        addr, words = self.data.reg(name)
        value = 0
        for w in await self.bus.read(addr, words):
            value = (value << 32) | w
        return value

    async def write(self, *pairs: tuple[str, int]) -> None:
        """Write registers in the order given; neighbours in address order share one bus write."""
        run_addr, run = None, []
        for name, value in pairs:
            addr, words = self.data.reg(name)
            split = [(value >> (32 * (words - 1 - i))) & 0xFFFF_FFFF for i in range(words)]
            if run and addr == run_addr + 4 * len(run):
                run += split
                continue
            if run:
                await self.bus.write(run_addr, run)
            run_addr, run = addr, split
        if run:
            await self.bus.write(run_addr, run)

    async def command(self, phase: int, cmd: int, address: int = 0, bank: int = 0) -> None:
        """Issue one DFI command on ``phase`` (software control): address and bank first, then the
        command and its issue strobe."""
        p = f"sdram_dfii_pi{phase}_"
        await self.write((p + "address", address), (p + "baddress", bank))
        await self.write((p + "command", cmd), (p + "command_issue", 1))

    async def select_lane(self, lane: int | None) -> None:
        await self.write(("ddrphy_dly_sel", 0 if lane is None else 1 << lane))


@dataclass
class LaneResult:
    lane: int
    bitslip: int                 # bitslip steps after reset
    delay: int                   # read delay steps after reset
    window: tuple[int, int]      # the chosen run of passing delays (first, last)
    scan: list = field(default_factory=list)     # scan[bitslip][delay]: passed?

    def scan_text(self) -> str:
        return scan_text(self.scan)


@dataclass
class DramInitResult:
    lanes: list
    ran: bool = True

    def summary(self) -> str:
        if not self.ran:
            return "DDR3 already calibrated (ddrctrl_init_done = 1): not initialised again"
        return "DDR3 initialised; read levelling: " + ", ".join(
            f"lane {r.lane} bitslip {r.bitslip} delay {r.delay} (window {r.window[0]}..{r.window[1]})"
            for r in self.lanes)


def scan_text(scan: list) -> str:
    """``bitslip b: delays 0..n-1 as 1 (pass) / 0 (fail)`` rows."""
    return "; ".join(f"bitslip {b}: " + "".join("1" if ok else "0" for ok in row) for b, row in enumerate(scan))


def widest_run(row: list) -> tuple[int, int] | None:
    """(first, last) of the longest run of True in ``row`` (the earliest of equal runs), or None."""
    best, start = None, None
    for i, ok in enumerate(list(row) + [False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return best


async def dram_ready(ctrl: DramController) -> bool:
    return bool(await ctrl.read("ddrctrl_init_done") & 1)


async def init_dram(ctrl: DramController, *, sleep=asyncio.sleep) -> DramInitResult:
    """Initialise and level the DDR3 (the module docstring's steps); returns the levelling result.
    On any failure the controller is left in software control with ``ddrctrl_init_error = 1``."""
    d = ctrl.data
    await ctrl.write(("ddrctrl_init_done", 0), ("ddrctrl_init_error", 0))
    try:
        await ctrl.write(("sdram_dfii_control", 0))              # software control, RESET# and CKE low
        await sleep(RESET_HOLD_S)
        for step in d.init_sequence:
            await ctrl.write(("sdram_dfii_pi0_address", step["address"]), ("sdram_dfii_pi0_baddress", step["bank"]))
            if step["kind"] == "control":
                await ctrl.write(("sdram_dfii_control", step["value"]))
            else:
                await ctrl.write(("sdram_dfii_pi0_command", step["value"]), ("sdram_dfii_pi0_command_issue", 1))
            if step["delay_cycles"]:
                await sleep(step["delay_cycles"] / d.sys_clk_hz)
        lanes = []
        if d.phy["read_leveling"]:
            leveller = _ReadLeveller(ctrl)
            for lane in range(d.lanes):
                lanes.append(await leveller.level(lane))
        await ctrl.write(("sdram_dfii_control", d.control["sel"]))     # hardware control
    except BaseException:
        try:
            await ctrl.write(("ddrctrl_init_error", 1))
        except Exception:
            pass            # the original error says more than a second one
        raise
    await ctrl.write(("ddrctrl_init_done", 1))
    return DramInitResult(lanes)


class _ReadLeveller:
    """Read levelling of one byte lane at a time (see the module docstring)."""

    def __init__(self, ctrl: DramController):
        self.ctrl, self.d = ctrl, ctrl.data
        phy = self.d.phy
        self.nphases, self.beats = phy["nphases"], phy["dfi_databits"] // phy["databits"]
        self.databits = phy["databits"]
        self.patterns = [self._pattern(seed) for seed in PATTERN_SEEDS]

    def _pattern(self, seed: int) -> list[int]:
        r = random.Random(seed)
        return [r.getrandbits(self.d.phy["dfi_databits"]) for _ in range(self.nphases)]

    def lane_bytes(self, words: list[int], lane: int) -> list[int]:
        """The bytes of ``lane`` in a burst (per phase, ``beats`` beats of ``databits``)."""
        return [(w >> (beat * self.databits + 8 * lane)) & 0xFF for w in words for beat in range(self.beats)]

    async def _check(self, lane: int, pattern: list[int]) -> bool:
        ctrl, k, phy = self.ctrl, self.d.command, self.d.phy
        await ctrl.command(0, k["ras"] | k["cs"], TEST_ROW, TEST_BANK)                    # ACTIVATE
        await ctrl.write(*[(f"sdram_dfii_pi{p}_wrdata", pattern[p]) for p in range(self.nphases)])
        await ctrl.command(phy["wrphase"], k["cas"] | k["we"] | k["cs"] | k["wrdata"], TEST_COL, TEST_BANK)
        await ctrl.command(phy["rdphase"], k["cas"] | k["cs"] | k["rddata"], TEST_COL, TEST_BANK)
        got = [await ctrl.read(f"sdram_dfii_pi{p}_rddata") for p in range(self.nphases)]
        await ctrl.command(0, k["ras"] | k["we"] | k["cs"], 0, TEST_BANK)                # PRECHARGE
        return self.lane_bytes(got, lane) == self.lane_bytes(pattern, lane)

    async def _passes(self, lane: int) -> bool:
        await self.ctrl.write(("ddrphy_burstdet_clr", 1))
        ok = True
        for pattern in self.patterns:
            ok &= await self._check(lane, pattern)
        seen = await self.ctrl.read("ddrphy_burstdet_seen")
        return ok and bool(seen >> lane & 1)

    async def _step(self, lane: int, reg: str) -> None:
        """One strobe of a PHY delay/bitslip register for ``lane``: selected (its PAUSE held) only
        around the strobe, then every lane's PAUSE toggled to resynchronise the DQS buffers."""
        ctrl = self.ctrl
        await ctrl.write(("ddrphy_dly_sel", 1 << lane), (reg, 1))
        await ctrl.select_lane(None)
        await ctrl.write(("ddrphy_dly_sel", (1 << self.d.lanes) - 1))
        await ctrl.select_lane(None)

    async def _set(self, lane: int, bitslip: int, delay: int) -> None:
        await self._step(lane, "ddrphy_rdly_dq_bitslip_rst")
        for _ in range(bitslip):
            await self._step(lane, "ddrphy_rdly_dq_bitslip")
        await self._step(lane, "ddrphy_rdly_dq_rst")
        for _ in range(delay):
            await self._step(lane, "ddrphy_rdly_dq_inc")

    async def level(self, lane: int) -> LaneResult:
        try:
            return await self._level(lane)
        except BaseException:
            try:
                await self.ctrl.select_lane(None)
            except Exception:
                pass        # the original error says more
            raise

    async def _level(self, lane: int) -> LaneResult:
        phy = self.d.phy
        scan = []
        for bitslip in range(phy["bitslips"]):
            await self._set(lane, bitslip, 0)
            row = []
            for delay in range(phy["delays"]):
                if delay:
                    await self._step(lane, "ddrphy_rdly_dq_inc")
                row.append(await self._passes(lane))
            scan.append(row)
        runs = [widest_run(row) for row in scan]
        best = None
        for b, run in enumerate(runs):
            if run and (best is None or run[1] - run[0] > runs[best][1] - runs[best][0]):
                best = b
        if best is None:
            raise DramInitError(
                f"DDR3 read levelling: no passing read delay on lane {lane} (byte lane {lane}, "
                f"DQ{8 * lane}..DQ{8 * lane + 7}) for any bitslip; scan ({phy['bitslips']} bitslips x "
                f"{phy['delays']} delays, 1 = pattern read back and DQS burst seen): {scan_text(scan)}")
        first, last = runs[best]
        delay = (first + last) // 2
        await self._set(lane, best, delay)
        if not await self._passes(lane):
            raise DramInitError(f"DDR3 read levelling: lane {lane} fails at the chosen bitslip {best} "
                                f"delay {delay} (window {first}..{last}); scan: {scan_text(scan)}")
        return LaneResult(lane, best, delay, (first, last), scan)
