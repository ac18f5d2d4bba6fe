"""Reorder-buffer slot sizing (``hw.regmap.default_slots``) and ``evssd bench rtl --sweep`` on the
model side (the RTL side needs Verilator builds; ``evssd bench rtl --sweep`` runs it)."""
import argparse
import json

import pytest

from evssd.hw.regmap import Params, default_read_queue, default_slots
from evssd.sim import bench_rtl


@pytest.mark.parametrize("c", range(1, 9))
def test_default_slots_rule(c):
    for w in range(1, 9):
        s = default_slots(Params(n_channels=c, ways=w))
        want = max(8, 2 * w * c, 4 * c * c)
        assert s & (s - 1) == 0 and 8 <= s <= 256          # what the merger accepts
        assert s == 256 or (s >= want and s // 2 < want)     # the next power of two, capped


@pytest.mark.parametrize("c,w", [(1, 1), (4, 4), (8, 1), (8, 8), (7, 1)])
def test_default_build_reaches_90_percent_of_the_bound_on_the_model(c, w):
    """The issue's goal on the model: the default build keeps >= 90% of the flash bound for
    random lookups (the RTL check of the same builds is `evssd bench rtl --sweep`)."""
    params = bench_rtl.bench_params(c, w)
    for t_r in (1000, 2500):
        m = bench_rtl.model_throughput(params, t_r=t_r)
        assert m["lookups"] == 4096 and m["cycles"] > 0
        assert m["lookups_per_cycle"] >= 0.9 * bench_rtl.bound(params, 64, t_r)["bound"], (c, w, t_r, m)


def test_fewer_slots_than_the_default_lose_throughput_on_the_model():
    """The sweep can tell slot counts apart: 8 x 8 with the old cap (64 slots) is well below
    the default build (256)."""
    params = bench_rtl.bench_params(8, 8)
    few = bench_rtl.model_throughput(params, t_r=1000, n_slots=64)["lookups_per_cycle"]
    default = bench_rtl.model_throughput(params, t_r=1000)["lookups_per_cycle"]
    assert few < 0.85 * default


def test_short_read_queue_holds_back_one_way_builds_on_the_model():
    """Issue 18.3 on the model: with the old one-way read queue (2 entries) a full channel holds
    back the lookups for the others (8 x 1: 77% of the bound, as the RTL measured); the default
    queue (hw.regmap.default_read_queue, 32 here) gives the same cycles as one that never fills."""
    params = bench_rtl.bench_params(8, 1)
    old = bench_rtl.model_throughput(params, t_r=1000, read_queue=2)
    default = bench_rtl.model_throughput(params, t_r=1000)
    unlimited = bench_rtl.model_throughput(params, t_r=1000, read_queue=4096)
    assert old["lookups_per_cycle"] < 0.8 * bench_rtl.bound(params, 64, 1000)["bound"]
    assert default["cycles"] == unlimited["cycles"] < 0.85 * old["cycles"]


def test_throughput_batches_are_reproducible():
    a = bench_rtl.throughput_batches(1000, 16, 3, seed=1)
    b = bench_rtl.throughput_batches(1000, 16, 3, seed=1)
    assert len(a) == 3 and all((x == y).all() and x.size == 16 and x.max() < 1000 for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, bench_rtl.throughput_batches(1000, 16, 3, seed=2)))


def test_sweep_cli_on_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EVSSD_RESULTS", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench_rtl.add_arguments(parser)
    args = parser.parse_args(["--sweep", "--sweep-channels", "1,2", "--sweep-ways", "1,3",
                              "--sweep-t-r", "1000,2500", "--sweep-lookups", "64", "--rtl-configs", "none"])
    assert bench_rtl.run(args) == 0
    report = json.loads((tmp_path / "bench_rtl_sweep" / "bench_rtl_sweep.json").read_text())
    assert report["rtl"] == [] and len(report["model"]) == 2 * 2 * 2 and report["read_queue"] is None
    for r in report["model"]:
        params = bench_rtl.bench_params(r["channels"], r["ways"])
        assert r["n_slots"] == default_slots(params) and r["lookups"] == 256
        assert r["read_queue"] == default_read_queue(params)
        assert r["lookups_per_cycle"] == pytest.approx(r["lookups"] / r["cycles"])
        assert r["fraction_of_bound"] == pytest.approx(r["lookups_per_cycle"] / bench_rtl.bound(params, 64, r["t_r"])["bound"])
    assert (tmp_path / "bench_rtl_sweep" / "bench_rtl_sweep.png").stat().st_size > 0


def test_rtl_configs_argument():
    assert bench_rtl._configs("1x1, 8X8") == [(1, 1), (8, 8)]
    assert bench_rtl._configs("none") == []
    for bad in ("4", "0x2", "ax2", "2x2x2"):
        with pytest.raises(ValueError, match="CHANNELSxWAYS"):
            bench_rtl._configs(bad)
    parser = argparse.ArgumentParser()
    bench_rtl.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "--rtl-configs", "4"])
    assert parser.parse_args(["--read-queue", "2"]).read_queue == 2
    assert parser.parse_args([]).read_queue is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--read-queue", "-1"])


def test_cxx_opt_argument_and_runner_check():
    """`--cxx-opt O0` reaches the runner as -O0; the runner refuses anything but one -O flag
    before it builds anything."""
    from evssd.hw.regmap import Params
    from evssd.sim import runner

    parser = argparse.ArgumentParser()
    bench_rtl.add_arguments(parser)
    assert bench_rtl._cxx_opt(parser.parse_args(["--cxx-opt", "O0"])) == "-O0"
    assert bench_rtl._cxx_opt(parser.parse_args([])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--cxx-opt", "O9"])
    for bad in ("O0", "-O0 -g", "-O9", "-march=native"):
        with pytest.raises(ValueError, match="cxx_opt must be one of"):
            runner.run("evssd.sim.tb_bench_rtl", "device", Params(), cxx_opt=bad)


def test_model_replay_tells_the_draws_apart():
    """`evssd bench rtl --legacy-draw`: the current draw's sustained runs are exactly the model
    measurement of `model_throughput`; the legacy draw measures other rows (so other cycles)."""
    params = bench_rtl.bench_params(4, 4)
    cur = bench_rtl.model_replay(params, draw="current", t_r=1000, sizes=(64,), batches=1)
    old = bench_rtl.model_replay(params, draw="legacy", t_r=1000, sizes=(64,), batches=1)
    assert [t["lookups"] for t in cur["throughput"]] == [1024, 2048]
    first = bench_rtl.model_throughput(params, t_r=1000, lookups=256)
    assert cur["throughput"][0]["cycles"] == first["cycles"]
    assert old["throughput"][0]["cycles"] != cur["throughput"][0]["cycles"]
    assert set(old["latency_p50"]) == {"64"} and old["latency_p50"]["64"] > 0
    with pytest.raises(ValueError, match="draw"):
        bench_rtl.model_replay(params, draw="other", t_r=1000)
