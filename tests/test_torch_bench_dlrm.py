"""`evssd bench dlrm --quick`: runs, writes JSON + PNG, every peer's scores equal TorchRec's."""
import json

import pytest

pytest.importorskip("torchrec")

from evssd.host.cli import main  # noqa: E402


def test_bench_dlrm_quick(tmp_path):
    assert main(["bench", "dlrm", "--quick", "--results", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "dlrm" / "dlrm.json").read_text())
    assert (tmp_path / "dlrm" / "dlrm.png").stat().st_size > 0
    assert data["scores_identical"] is True
    peers = {p["peer"]: p for p in data["peers"]}
    assert list(peers) == ["torchrec-dram", "evssd-dram", "evssd", "evssd-block"]
    assert all(p["scores_identical"] for n, p in peers.items() if n != "torchrec-dram")
    fine, block = peers["evssd"]["projected"], peers["evssd-block"]["projected"]
    # same trace, same cache: block mode moves a whole 4 KiB page per row read, 128 B rows otherwise
    assert fine["flash_rows_read"] == block["flash_rows_read"] > 0
    assert block["flash_channel_bytes"] == block["flash_rows_read"] * 4096
    assert fine["flash_channel_bytes"] == fine["flash_rows_read"] * 128
    assert block["device_ms_mean"] > fine["device_ms_mean"] > 0
    assert data["ratios"]["block_over_evssd_flash_bytes"] == pytest.approx(32.0)
    from evssd.hw.synth import BOARDS        # the released ULX3S clock, one definition
    assert data["config"]["clock_mhz"] == BOARDS["ulx3s-85f"].clock_mhz == 100.0


def test_bench_dlrm_bad_arguments(tmp_path, capsys):
    # checked at parse time (host/cli_types.py): one line, exit 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "dlrm", "--quick", "--peers", "evssd,tape", "--results", str(tmp_path)])
    assert exc.value.code == 2 and "argument --peers: 'tape' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "dlrm", "--quick", "--cache-fraction", "0", "--results", str(tmp_path)])
    assert exc.value.code == 2
    assert "argument --cache-fraction: 0 is not a fraction in (0, 1]" in capsys.readouterr().err
