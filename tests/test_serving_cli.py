"""`evssd serve` and `evssd bench serve` end to end (real server subprocesses on loopback)."""
import json

import pytest

from evssd.host.cli import main


def test_serve_local_checks_scores_against_numpy(capsys):
    rc = main(["serve", "local", "--servers", "2", "--tables", "3", "--rows", "3000", "--replicas", "1",
               "--batches", "3", "--batch-size", "32", "--threads", "2", "--budget-mb", "2",
               "--criteo", "/work/shared/data/criteo_sample.txt"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "top-5" in out and "max |score - numpy golden|" in out


def test_bench_serve_small_run_writes_results(tmp_path, capsys):
    rc = main(["bench", "serve", "--quick", "--max-fanout", "2", "--rows", "4000", "--tables", "2",
               "--batch-size", "64", "--threads", "2", "--budget-mb", "4", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "serve" / "serve.json").read_text())
    assert (tmp_path / "serve" / "serve.png").exists()
    assert {p["fanout"] for p in data["engine"]} == {1, 2}
    pooled, per_table, rows = data["pooling"]
    # hierarchical pooling moves fewer bytes than one READ per row, and both match numpy
    assert pooled["bytes_per_batch"] < rows["bytes_per_batch"]
    assert max(p["max_abs_err_vs_numpy"] for p in data["pooling"]) < 1e-4
    assert data["cache"]["adaptive"]["largest_batch_served"] >= data["cache"]["static"]["largest_batch_served"]
    # the EV-SSD backend column: the same batches, the same answers
    assert [p["backend"] for p in data["backends"]] == ["dram", "evssd"]
    assert max(p["max_abs_err_vs_numpy"] for p in data["backends"]) < 1e-4
    assert {p["threads"] for p in data["cpu_per_request"]} == {1, 2} and all(p["cpu_us_per_request"] > 0 for p in data["cpu_per_request"])


def test_bench_serve_rtt_only_writes_all_five_variants(tmp_path, capsys):
    rc = main(["bench", "serve", "--only", "rtt", "--rtt-reps", "20", "--rtt-block", "5", "--quick", "--threads", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "serve-rtt" / "serve-rtt.json").read_text())
    assert (tmp_path / "serve-rtt" / "serve-rtt.png").exists()
    assert [p["bytes"] for p in data["overhead"]] == [64, 4096, 65536]
    for p in data["overhead"]:        # every variant answered (the bench asserts each echo's bytes)
        for k in ("engine_echo_p50_us", "engine_p50_us", "engine_future_p50_us", "server_no_engine_p50_us",
                  "bare_p50_us"):
            assert p[k] > 0, (k, p)
        assert p["ratio_echo_p50"] == pytest.approx(p["engine_echo_p50_us"] / p["bare_p50_us"])
        assert set(p["client_cpu_us"]) == {"engine_echo", "engine", "engine_future", "bare", "server_no_engine"}
    assert "Engine.call" in data["note"] and "evssd serve echo" in data["note"]
    # CPU per request per I/O thread count, in the same run
    assert [p["threads"] for p in data["cpu_per_request"]] == [1, 2]
    assert all(p["requests"] == 400 and p["cpu_us_per_request"] > 0 for p in data["cpu_per_request"])
    out = capsys.readouterr().out
    assert "engine echo/bare" in out and "call/bare" in out and "2 I/O threads" in out


def test_serve_config_gives_usable_addresses_for_separately_started_processes(tmp_path, capsys):
    import subprocess
    import sys

    from evssd.host.serving.server import READY_PREFIX

    path = tmp_path / "cluster.json"
    assert main(["serve", "config", "--servers", "2", "--tables", "2", "--rows", "2000", "-o", str(path)]) == 0
    cfg = json.loads(path.read_text())
    ports = [s["port"] for s in cfg["servers"].values()]
    assert all(p > 0 for p in ports) and len(set(ports)) == 2
    procs = [subprocess.Popen([sys.executable, "-m", "evssd.host.serving.cli", "embeddings", "--config", str(path),
                               "--server", s], stdout=subprocess.PIPE, text=True) for s in cfg["servers"]]
    try:
        for p, s in zip(procs, cfg["servers"]):
            line = p.stdout.readline()             # bounded: the server exits on a bind error
            assert line.startswith(READY_PREFIX), line
            assert json.loads(line[len(READY_PREFIX):])["port"] == cfg["servers"][s]["port"]
        capsys.readouterr()
        assert main(["serve", "ranker", "--config", str(path), "--batches", "2", "--batch-size", "16"]) == 0
        assert "2 batches of 16" in capsys.readouterr().out
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
            p.stdout.close()
    # a config with port 0 is refused by the ranker with a clear message
    cfg["servers"]["s0"]["port"] = 0
    path.write_text(json.dumps(cfg))
    assert main(["serve", "ranker", "--config", str(path), "--batches", "1"]) == 2
    assert "servers ['s0'] have port 0" in capsys.readouterr().err


def test_serve_config_base_port(tmp_path):
    from evssd.host.serving.config import ConfigError, assign_ports, make_config
    cfg = assign_ports(make_config(1, 100, 4, 3), base=7100)
    assert [s["port"] for s in cfg["servers"].values()] == [7100, 7101, 7102]
    import pytest
    with pytest.raises(ConfigError, match="base port 65535 leaves no room for 3 servers"):
        assign_ports(make_config(1, 100, 4, 3), base=65535)
