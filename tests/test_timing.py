"""The numba timing model (host/timing.py) against its per-row Python definition
(tests/timing_reference.py): same cycles, same counters, command after command, on random traces
of every command kind, build and mode."""
import numpy as np
import pytest

from evssd.host.timing import TimingModel, default_slots, result_schedule
from evssd.hw.regmap import READ_INTAKE_ENTRIES, Params, channel_accept_depth, default_read_queue
from evssd.host.timing import RESULT_TAIL
from tests.timing_reference import ReferenceTimingModel


def _state(fast: TimingModel, ref: ReferenceTimingModel):
    chans = [(int(fast.ch_rows[c]), int(fast.ch_bytes[c]), int(fast.ch_tr_waits[c]),
              int(fast.ch_busy_cycles[c]), int(fast.ch_programs[c]), int(fast.bus_free[c]),
              int(fast.last_start[c]), [(int(p), int(r), int(f)) for p, r, f in
                                        zip(fast.way_page[c], fast.way_ready[c], fast.way_free[c])])
             for c in range(fast.params.n_channels)]
    want = [(ch.rows, ch.bytes, ch.tr_waits, ch.busy_cycles, ch.programs, ch.bus_free, ch.last_start,
             [(w.page, w.ready, w.free_at) for w in ch.ways]) for ch in ref.channels]
    return (fast.cycles, fast.engine_free, fast.busy_cycles, chans), \
        (ref.cycles, ref.engine_free, ref.busy_cycles, want)


def _random_run(seed: int, params: Params, n_slots=None, n_commands=40, read_queue=None):
    rng = np.random.default_rng(seed)
    t_r = int(rng.choice([0, 1, 50, 1000, 2500]))
    fast = TimingModel(params, t_r=t_r, t_prog=int(rng.integers(0, 500)), n_slots=n_slots,
                       read_queue=read_queue)
    ref = ReferenceTimingModel(params, t_r=t_r, t_prog=fast.t_prog, n_slots=n_slots,
                               read_queue=read_queue)
    assert fast.accept_depth == ref.accept_depth
    n_pages = int(rng.choice([2, params.ways + 1, 64, 4096]))
    for _ in range(n_commands):
        kind = rng.choice(["lookups", "lookups", "lookups", "program", "read_page", "nop", "clear"])
        overlap = bool(rng.integers(0, 2))
        fast.overlap = ref.overlap = overlap
        if kind == "lookups":
            n = int(rng.choice([0, 1, 7, 64, 300, 1100]))
            row_bytes = int(rng.choice([4, 8, 60, 64, 256, 512]))
            rpp = params.page_size // row_bytes
            chs = rng.integers(0, params.n_channels, n)
            pages = rng.integers(0, n_pages, n)
            offs = rng.integers(0, rpp, n) * row_bytes
            # request positions of the good lookups among `count` (the others are bad), and the
            # result units: one row per position (GATHER) or bags (GATHER_POOLED)
            count = n + int(rng.integers(0, 20))
            pos = np.sort(rng.choice(count, n, replace=False)) if count else np.zeros(0, np.int64)
            if rng.integers(0, 2):
                ends, unit = np.arange(count), row_bytes
            else:
                cuts = np.sort(rng.integers(0, count + 1, int(rng.integers(0, 30))))
                ends, unit = np.concatenate([cuts, [count]]) - 1, 4 * row_bytes
            block = bool(rng.integers(0, 4) == 0)
            got = fast.lookups(chs, pages, offs, row_bytes, result_schedule(pos, ends, unit), block)
            want = ref.lookups(list(zip(chs.tolist(), pages.tolist(), offs.tolist(), pos.tolist())),
                               row_bytes, [(int(e), unit) for e in ends], block)
            assert got == want
        elif kind == "program":
            c, pg = int(rng.integers(0, params.n_channels)), int(rng.integers(0, n_pages))
            fast.program(c, pg)
            ref.program(c, pg)
        elif kind == "read_page":
            c, pg = int(rng.integers(0, params.n_channels)), int(rng.integers(0, n_pages))
            fast.read_page(c, pg)
            ref.read_page(c, pg)
        elif kind == "nop":
            fast.nop()
            ref.nop()
        else:
            fast.clear()
            ref.clear()
        got, want = _state(fast, ref)
        assert got == want, (seed, kind)
    return fast


@pytest.mark.parametrize("seed", range(12))
def test_kernel_matches_the_reference_on_random_traces(seed):
    rng = np.random.default_rng(1000 + seed)
    params = Params(n_channels=int(rng.integers(1, 9)), ways=int(rng.integers(1, 9)),
                    ch_data_bits=int(rng.choice([32, 64, 256])),
                    host_data_bits=int(rng.choice([64, 256])), page_size=4096)
    slots = [None, 1, 2, 16, 256][seed % 5]
    # the read queue: the default's, none (the intake stage alone), short ones that do limit
    read_queue = [None, 0, 1, 3][seed % 4]
    fast = _random_run(seed, params, slots, read_queue=read_queue)
    assert fast.cycles > 0


def test_a_full_channel_holds_back_the_lookups_behind_it():
    """Hand-checked: 1 way, no read queue (2 reads wait in the intake stage). Four misses on
    channel 0, then one on channel 1: the fourth read for channel 0 gets in only when the second
    is accepted (when the first's data phase ends, 1081), and channel 1's read waits behind it."""
    params = Params(n_channels=2, ways=1)
    chs = np.array([0, 0, 0, 0, 1])
    pages = np.array([0, 1, 2, 3, 0])
    for rq, arrive in ((0, 1083), (2, 74), (None, 74)):
        t = TimingModel(params, t_r=1000, read_queue=rq)
        ref = ReferenceTimingModel(params, t_r=1000, read_queue=rq)
        assert t.accept_depth == (2 if rq == 0 else 4 if rq == 2 else default_read_queue(params) + 2)
        # engine at 60, lookup k reaches channel at 70 + k; each read: tR 1000, then 3 + 8 beats
        got = t.lookups(chs, pages, np.zeros(5, np.int64), 64,
                        result_schedule(np.arange(5), np.arange(5), 64), False)
        want = ref.lookups([(int(c), int(p), 0, k) for k, (c, p) in enumerate(zip(chs, pages))],
                           64, [(k, 64) for k in range(5)], False)
        assert got == want
        assert int(t.last_start[1]) == arrive and int(t.way_ready[1, 0]) == arrive + 1000
        assert int(t.last_start[0]) == 70 + 3 * 1011            # channel 0 unaffected
    with pytest.raises(ValueError, match="read_queue"):
        TimingModel(params, read_queue=-1)


def test_default_read_queue_rule():
    """A channel's read queue holds its share of the reorder window, at least 2 per way; the
    device builds with it and the timing model waits on it (queue + intake stage)."""
    from evssd.hw.device.top import EVSSD
    for c in range(1, 9):
        for w in range(1, 9):
            p = Params(n_channels=c, ways=w)
            s = default_slots(p)
            q = default_read_queue(p)
            assert q == max(2 * w, s // c) and q >= 2 * w
            assert q * c <= max(s, 2 * w * c)   # never much more than the window can use
            assert channel_accept_depth(p) == q + READ_INTAKE_ENTRIES == TimingModel(p).accept_depth
    p = Params(n_channels=8, ways=1)
    assert default_read_queue(p) == 32 and default_read_queue(p, n_slots=16) == 2
    assert EVSSD(p).read_queue == 32 and EVSSD(p, n_slots=64).read_queue == 8
    assert EVSSD(p, read_queue=0).read_queue == 0
    with pytest.raises(ValueError, match="read_queue"):
        EVSSD(p, read_queue=-1)


def test_default_build_counts_tr_waits_and_rows():
    """Hand-checked numbers: 4 reads of one page pay tR once; rows and bytes counted."""
    t = TimingModel(Params(), t_r=1000)
    z = np.zeros(4, np.int64)
    cycles = t.lookups(z, z, np.arange(4) * 64, 64, result_schedule(np.arange(4), np.arange(4), 64), False)
    assert int(t.ch_tr_waits[0]) == 1 and int(t.ch_rows[0]) == 4 and int(t.ch_bytes[0]) == 4 * 64
    # engine at 60, reach the channel at 70, tR to 1070, 4 data phases of 3 + 8 beats each,
    # each row retires 4 later and streams out in 8 host beats (8 bytes each), then the tail
    assert cycles == 1070 + 4 * 11 + 4 + 8 + RESULT_TAIL
    assert t.n_slots == default_slots(Params())
    with pytest.raises(ValueError, match="out_after needs 5"):
        t.lookups(z, z, z, 64, [0], False)


def test_result_schedule_assigns_units_to_the_last_good_lookup():
    # good lookups at positions 1, 4; units end at 0 (before any), 1, 3, 4, 6
    got = result_schedule([1, 4], [0, 1, 3, 4, 6], 8)
    assert got.tolist() == [8, 16, 16]


def test_bad_slots_are_named():
    with pytest.raises(ValueError, match="n_slots"):
        TimingModel(Params(), n_slots=0)
