"""DDR3 bring-up of the ECPIX-5 from the host (evssd.host.dram_init), against a register-level mock
of LiteDRAM's DFII, the ECP5 PHY and a DDR3 chip (tests/dram_model.py): no board exists here, and
nothing of this has run on hardware.

The init sequence is checked against the generated core's data (LiteDRAM's own, committed in
hw/boards/ecpix5_dram.json and compared with the generator in tests/hw/test_litex_cores.py); the
read levelling against random per-lane capture windows, with the expected setting computed here
from the windows (the centre of the widest run of passing delays, over all bitslips)."""
import asyncio
import json
import random

import pytest

from evssd.hw.bridge_protocol import DRAM_CTRL_BASE
from evssd.host.dram_init import (RESET_HOLD_S, BridgeCsrBus, DramController, DramData, DramInitError,
                                  dram_ready, init_dram, load_dram_data, widest_run)
from tests.dram_model import Ddr3PhyModel

DATA = load_dram_data()


def run(coro):
    return asyncio.run(coro)


def bring_up(model, data=DATA):
    waits = []

    async def sleep(s):
        waits.append((len(model.log), s))       # where in the command log the host waited, how long

    result = run(init_dram(DramController(model, data), sleep=sleep))
    return result, waits


def expected(windows: dict, delays: int) -> tuple[int, int]:
    """The reference choice for one lane: per bitslip the longest run of delays, the widest of all
    (the lowest bitslip among equals), its centre (rounded down)."""
    best = None
    for b in sorted(windows):
        ds = sorted(windows[b])
        runs, start = [], None
        for d in range(delays + 1):
            if d in ds and start is None:
                start = d
            elif d not in ds and start is not None:
                runs.append((start, d - 1))
                start = None
        for r in runs:
            if best is None or r[1] - r[0] > best[1][1] - best[1][0]:
                best = (b, r)
    b, (lo, hi) = best
    return b, (lo + hi) // 2


def test_the_data_is_the_ecpix5_core():
    assert DATA.lanes == 2 and DATA.phy["type"] == "ECP5DDRPHY" and DATA.sys_clk_hz == 75_000_000
    assert DATA.phy["delays"] == 8 and DATA.phy["bitslips"] == 4 and DATA.phy["read_leveling"]
    # LiteX CSRs: 32-bit words, 4 bytes apart; the DFII data registers are 64 bits (2 words)
    assert DATA.reg("sdram_dfii_pi0_wrdata")[1] == 2 and DATA.reg("ddrctrl_init_done") == (0, 1)


def test_init_sequence_is_litedrams_and_levelling_centres_each_lane():
    windows = {0: {1: range(2, 7)}, 1: {3: range(0, 3)}}
    model = Ddr3PhyModel(DATA, windows, seed=1)
    result, waits = bring_up(model)
    assert model.violations == []
    steps = model.init_steps()
    # first software control with RESET# and CKE low, held; then the generated sequence in order
    assert steps[0] == ("control", 0, None, None)
    assert waits[0] == (1, RESET_HOLD_S)
    want = [("control" if s["kind"] == "control" else "command", s["value"],
             None if s["kind"] == "control" else s["address"], None if s["kind"] == "control" else s["bank"])
            for s in DATA.init_sequence]
    assert steps[1:1 + len(want)] == want
    # MR2, MR3, MR1, MR0 (with DLL reset), then ZQCL: the DDR3 order
    mrs = [(s[3], s[2]) for s in steps if s[0] == "command"]
    assert [b for b, _ in mrs] == [2, 3, 1, 0, 0] and mrs[3][1] & 0x100 and mrs[4][1] & 0x400
    # each step's wait, from the core's clock
    timed = [s["delay_cycles"] / DATA.sys_clk_hz for s in DATA.init_sequence if s["delay_cycles"]]
    assert [w for _, w in waits[1:]] == timed
    # the levelling leaves each lane at the centre of its window; then hardware control, init done
    assert [(r.bitslip, r.delay, r.window) for r in result.lanes] == [(1, 4, (2, 6)), (3, 1, (0, 2))]
    assert [model.host_bitslip(i) for i in range(2)] == [1, 3] and model.rdly == [4, 1]
    assert steps[-1] == ("control", DATA.control["sel"], None, None)
    assert model.values["ddrctrl_init_done"] == 1 and model.values["ddrctrl_init_error"] == 0
    assert model.values["ddrphy_dly_sel"] == 0
    assert run(dram_ready(DramController(model, DATA)))
    assert "lane 0 bitslip 1 delay 4 (window 2..6)" in result.summary()


@pytest.mark.parametrize("seed", range(12))
def test_levelling_finds_the_widest_window_for_random_windows(seed):
    rng = random.Random(seed)
    delays, bitslips = DATA.phy["delays"], DATA.phy["bitslips"]
    windows, burst = {}, {}
    for lane in range(DATA.lanes):
        slips = rng.sample(range(bitslips), rng.choice([1, 2]))
        windows[lane] = {}
        for b in slips:
            lo = rng.randrange(delays)
            windows[lane][b] = set(range(lo, rng.randrange(lo, delays) + 1))
        if rng.random() < 0.3:              # a broken-up window: two runs on one bitslip
            b = slips[0]
            windows[lane][b] |= {rng.randrange(delays)}
        # the DQS burst detector sees more delays than capture correctly
        burst[lane] = set().union(*windows[lane].values()) | {rng.randrange(delays)}
    model = Ddr3PhyModel(DATA, windows, burst=burst, seed=seed)
    result, _ = bring_up(model)
    assert model.violations == []
    for lane in range(DATA.lanes):
        want = expected(windows[lane], delays)
        got = result.lanes[lane]
        assert (got.bitslip, got.delay) == want, (lane, windows[lane], got.scan_text())
        assert (model.host_bitslip(lane), model.rdly[lane]) == want
        # the scan shows exactly the configured windows
        for b in range(bitslips):
            assert [d in windows[lane].get(b, ()) for d in range(delays)] == got.scan[b]


def test_the_burst_detector_is_required():
    # data capture at delays 1..6, but DQS bursts only seen at 4..6: the window is 4..6
    model = Ddr3PhyModel(DATA, {0: {0: range(1, 7)}, 1: {2: range(3, 6)}}, burst={0: range(4, 7), 1: range(0, 8)})
    result, _ = bring_up(model)
    assert (result.lanes[0].bitslip, result.lanes[0].delay, result.lanes[0].window) == (0, 5, (4, 6))
    assert (result.lanes[1].bitslip, result.lanes[1].delay) == (2, 4)


def test_a_lane_without_a_window_is_named_with_its_scan():
    model = Ddr3PhyModel(DATA, {0: {2: range(0, 8)}, 1: {}}, seed=3)
    with pytest.raises(DramInitError, match=r"no passing read delay on lane 1 .*bitslip 0: 00000000; "
                                            r"bitslip 1: 00000000; bitslip 2: 00000000; bitslip 3: 00000000"):
        bring_up(model)
    assert model.values["ddrctrl_init_error"] == 1 and model.values["ddrctrl_init_done"] == 0
    assert model.values["ddrphy_dly_sel"] == 0 and model.violations == []


def test_wrong_bitslip_data_never_pass():
    # one window, the bitslip three steps away: every other bitslip reads shifted beats
    model = Ddr3PhyModel(DATA, {0: {3: range(0, 8)}, 1: {0: {7}}})
    result, _ = bring_up(model)
    assert result.lanes[0].scan[:3] == [[False] * 8] * 3 and result.lanes[0].scan[3] == [True] * 8
    assert (result.lanes[1].bitslip, result.lanes[1].delay) == (0, 7)


class FakeProto:
    """A bridge protocol whose bus is the mock's window at DRAM_CTRL_BASE, with injectable error answers."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at, self.requests = model, fail_at, 0

    async def read_words(self, addr, count):
        self.requests += 1
        off = addr - DRAM_CTRL_BASE
        if off == self.fail_at:
            return bytes(4 * count), 2
        return b"".join(w.to_bytes(4, "little") for w in await self.model.read(off, count)), 0

    async def write_words(self, addr, data, strb=0xF):
        self.requests += 1
        off = addr - DRAM_CTRL_BASE
        if off == self.fail_at:
            return 2
        await self.model.write(off, [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)])
        return 0


def test_over_the_bridge_window_and_a_silent_controller():
    model = Ddr3PhyModel(DATA, {0: {0: range(2, 5)}, 1: {1: range(5, 8)}})
    proto = FakeProto(model)
    result = run(init_dram(DramController(BridgeCsrBus(proto, "board"), DATA), sleep=lambda s: asyncio.sleep(0)))
    assert [(r.bitslip, r.delay) for r in result.lanes] == [(0, 3), (1, 6)]
    # neighbouring registers go in one request: (address, bank) and (command, issue) pairs
    assert proto.requests == model.reads + model.writes < 2500
    # the Wishbone timeout of a controller that does not answer: a named error
    addr = DATA.reg("sdram_dfii_pi0_address")[0]
    model = Ddr3PhyModel(DATA, {0: {0: range(8)}, 1: {0: range(8)}})
    with pytest.raises(DramInitError, match=f"register write at \\+0x{addr:x} answered resp=2"):
        run(init_dram(DramController(BridgeCsrBus(FakeProto(model, fail_at=addr)), DATA),
                      sleep=lambda s: asyncio.sleep(0)))
    assert model.values["ddrctrl_init_error"] == 1


def test_widest_run():
    assert widest_run([False] * 4) is None
    assert widest_run([True, False, True, True, False, True, True]) == (2, 3)
    assert widest_run([True] * 8) == (0, 7)


def test_bad_data_files_are_named(tmp_path):
    d = json.loads(json.dumps(DATA.__dict__ | {"format": 1, "csr_data_width": 32, "dfii_control": DATA.control,
                                                "dfii_command": DATA.command}))
    del d["registers"]["ddrphy_burstdet_seen"]
    with pytest.raises(DramInitError, match="has no 'ddrphy_burstdet_seen'"):
        DramData.from_dict(d, "x.json")
    d["csr_data_width"] = 8
    with pytest.raises(DramInitError, match="CSR data width 8"):
        DramData.from_dict(d, "x.json")
    p = tmp_path / "broken.json"
    p.write_text("{")
    with pytest.raises(DramInitError, match="cannot read the DDR3 bring-up data .*broken.json"):
        load_dram_data(p)
