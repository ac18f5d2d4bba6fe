"""Serving with TorchRec: embedding servers load a TorchRec EBC checkpoint, the ranker runs a
TorchRec DLRM on the pooled bags from the servers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torch.ao.quantization import PlaceholderObserver, QConfig  # noqa: E402
from torchrec import EmbeddingBagCollection as TorchRecEBC  # noqa: E402
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402
from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC  # noqa: E402

import evssd.torch as et  # noqa: E402
from evssd.host.serving.config import ConfigError, table_rows  # noqa: E402
from evssd.host.serving.engine import Engine  # noqa: E402
from evssd.host.serving.launcher import LocalCluster  # noqa: E402
from evssd.host.serving.providers import get_provider  # noqa: E402
from evssd.host.serving.ranker import Ranker  # noqa: E402
from evssd.host.serving.torchrec_checkpoint import CheckpointError  # noqa: E402
from evssd.host.serving.torchrec_model import TorchRecDLRM, config_from_checkpoint  # noqa: E402


def _model():
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(num_embeddings=3000 + 100 * k, embedding_dim=8, name=f"t{k}",
                                  feature_names=[f"C{k + 1}"]) for k in range(3)]
    return DLRM(TorchRecEBC(tables=configs), dense_in_features=13, dense_arch_layer_sizes=[16, 8],
                over_arch_layer_sizes=[16, 1]).eval(), configs


def _multi_hot(configs, B, rng):
    lens = rng.integers(0, 12, len(configs) * B)
    vals = np.concatenate([rng.integers(0, c.num_embeddings, lens[i * B:(i + 1) * B].sum())
                           for i, c in enumerate(configs)])
    return KeyedJaggedTensor(keys=[c.feature_names[0] for c in configs], values=torch.from_numpy(vals),
                             lengths=torch.from_numpy(lens).to(torch.int32))


def test_servers_load_checkpoint_and_ranker_runs_torchrec_dlrm(tmp_path):
    model, configs = _model()
    ebc = model.sparse_arch.embedding_bag_collection
    ckpt = tmp_path / "ebc.pt"
    torch.save(ebc.state_dict(), ckpt)
    cfg = config_from_checkpoint(ckpt, n_servers=2)
    assert cfg["dim"] == 8 and sorted(cfg["tables"]) == ["t0", "t1", "t2"]
    for c in configs:
        w = ebc.state_dict()[f"embedding_bags.{c.name}.weight"].numpy()
        np.testing.assert_array_equal(table_rows(cfg, c.name, 100, 2500), w[100:2500])
    rng = np.random.default_rng(0)
    dense, criteo = et.criteo_inputs(configs, limit=64)
    batches = [(dense, criteo), (dense, _multi_hot(configs, 64, rng))]
    with LocalCluster(cfg) as cluster, Engine(get_provider("tcp"), 2, request_timeout=30) as eng:
        ranker = Ranker(cluster.config, eng, model=TorchRecDLRM(model), timeout=30)
        for d, kjt in batches:
            sparse = {c.name: (kjt[c.feature_names[0]].values().numpy(), kjt[c.feature_names[0]].offsets().numpy())
                      for c in configs}
            got = ranker.score(d.numpy(), sparse)
            with torch.no_grad():
                want = torch.sigmoid(model(d, kjt)).reshape(-1).numpy()
            # the servers' partial sums per shard add in another order than one bag sum
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert got.shape == (64,) and np.ptp(got) > 0


def test_int8_checkpoint_rows_are_dequantized(tmp_path):
    torch.manual_seed(1)
    configs = [EmbeddingBagConfig(num_embeddings=500, embedding_dim=16, name="t0", feature_names=["f"])]
    ebc = TorchRecEBC(tables=configs)
    ebc.qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float),
                          weight=PlaceholderObserver.with_args(dtype=torch.quint8))
    q = QuantEBC.from_float(ebc)
    ckpt = tmp_path / "q.pt"
    torch.save(q.state_dict(), ckpt)
    with pytest.raises(ConfigError, match="pass dim="):
        config_from_checkpoint(ckpt)
    cfg = config_from_checkpoint(ckpt, n_servers=1, dim=16)
    rows = table_rows(cfg, "t0", 0, 500)
    # one-row bags of the quantized EBC are the dequantized rows (FBGEMM rounds once, we twice)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.arange(500), lengths=torch.ones(500, dtype=torch.int32))
    np.testing.assert_allclose(rows, q(kjt).values().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rows, ebc.state_dict()["embedding_bags.t0.weight"].numpy(), atol=2e-3)


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read a TorchRec checkpoint"):
        config_from_checkpoint(bad)
    model, configs = _model()
    ckpt = tmp_path / "ebc.pt"
    torch.save(model.sparse_arch.embedding_bag_collection.state_dict(), ckpt)
    cfg = config_from_checkpoint(ckpt)
    cfg["tables"]["t1"]["rows"] = 10
    with pytest.raises(CheckpointError, match="'t1'.*config says 10 rows"):
        table_rows(cfg, "t1", 0, 5)
    with pytest.raises(ValueError, match="3 sparse features"):
        TorchRecDLRM(model).forward(np.zeros((2, 13), np.float32), [np.zeros((2, 8), np.float32)])


def test_serve_config_from_checkpoint_cli(tmp_path, capsys):
    from evssd.host.cli import main
    from evssd.host.serving.config import load_config
    model, configs = _model()
    ckpt = tmp_path / "ebc.pt"
    torch.save(model.sparse_arch.embedding_bag_collection.state_dict(), ckpt)
    out = tmp_path / "cluster.json"
    assert main(["serve", "config", "--torchrec", str(ckpt), "--servers", "3", "-o", str(out)]) == 0
    cfg = load_config(out)
    assert cfg["dim"] == 8 and len(cfg["servers"]) == 3
    assert {t: v["rows"] for t, v in cfg["tables"].items()} == {c.name: c.num_embeddings for c in configs}
    w = model.sparse_arch.embedding_bag_collection.state_dict()["embedding_bags.t2.weight"].numpy()
    np.testing.assert_array_equal(table_rows(cfg, "t2"), w)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    assert main(["serve", "config", "--torchrec", str(bad), "-o", str(out)]) == 2
    assert "cannot read a TorchRec checkpoint" in capsys.readouterr().err


def test_serve_local_ranks_with_a_torchrec_dlrm_cli(tmp_path, capsys):
    """`--torchrec-dlrm FILE` puts a pickled TorchRec DLRM behind the ranker; the local run checks
    its scores against the same DLRM on the all-in-memory bags."""
    from evssd.host.cli import main
    model, _ = _model()
    path = tmp_path / "dlrm.pt"
    torch.save(model, path)
    args = ["serve", "local", "--tables", "3", "--dim", "8", "--rows", "400", "--servers", "2",
            "--batches", "2", "--batch-size", "16", "--pooling", "4", "--torchrec-dlrm", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"ranker model: TorchRec DLRM from {path}" in out
    worst = float(out.split("max |score - numpy golden| = ")[1].split()[0])
    assert worst <= 1e-4
    # a DLRM that does not fit the cluster (4 tables here) is refused with what differs
    assert main(args[:2] + ["--tables", "4"] + args[4:]) == 2
    err = capsys.readouterr().err
    assert "the DLRM has 3 sparse features of dim 8 and 13 dense features; the cluster serves 4 tables" in err
    path.write_bytes(b"junk")
    assert main(args) == 2
    assert "cannot load a pickled model" in capsys.readouterr().err
