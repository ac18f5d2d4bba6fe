"""`evssd serve` and `evssd bench serve` end to end (real server subprocesses on loopback)."""
import json

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
