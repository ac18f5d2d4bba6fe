"""Row-wise quantized tables: TorchRec's quantized EBC (FBGEMM INT8 rows: fp16 scale and bias,
uint8 codes) loaded into evssd.torch.EmbeddingBagCollection; outputs equal bit for bit."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torch.ao.quantization import PlaceholderObserver, QConfig  # noqa: E402
from torchrec import EmbeddingBagCollection as TorchRecEBC  # noqa: E402
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC  # noqa: E402

import evssd.torch as et  # noqa: E402


def _quantize(configs, weighted=False, weight_dtype=torch.quint8, seed=0):
    torch.manual_seed(seed)
    ebc = TorchRecEBC(tables=configs, is_weighted=weighted)
    ebc.qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float),
                          weight=PlaceholderObserver.with_args(dtype=weight_dtype))
    return QuantEBC.from_float(ebc)


def _configs():
    return [EmbeddingBagConfig(num_embeddings=400, embedding_dim=24, name="t0", feature_names=["a", "b"]),
            EmbeddingBagConfig(num_embeddings=90, embedding_dim=16, name="t1", feature_names=["c"],
                               pooling=PoolingType.MEAN),
            EmbeddingBagConfig(num_embeddings=50, embedding_dim=8, name="t2", feature_names=["d"])]


def _kjt(B, rng, weighted=False, dtype=torch.int64):
    rows = {"a": 400, "b": 400, "c": 90, "d": 50}
    keys = ["d", "c", "b", "a"]
    lens = rng.integers(0, 25, len(keys) * B)
    lens[1] = 0
    vals = np.concatenate([rng.integers(0, rows[k], lens[i * B:(i + 1) * B].sum()) for i, k in enumerate(keys)])
    w = torch.from_numpy(rng.random(vals.size, dtype=np.float32)) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(vals).to(dtype),
                             lengths=torch.from_numpy(lens).to(torch.int32), weights=w)


def _same(got, want):
    assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
    assert got.values().dtype == want.values().dtype
    assert torch.equal(got.values(), want.values()), (got.values() - want.values()).abs().max()


@pytest.mark.parametrize("backend,opts", [("dram", {}), ("evssd", {"cache_fraction": 0.05}),
                                          ("file", {"cache_fraction": None})])
def test_int8_rowwise_equals_quantized_torchrec(backend, opts):
    rng = np.random.default_rng(0)
    q = _quantize(_configs())
    assert q.state_dict()["embedding_bags.t0.weight"].dtype == torch.uint8
    ebc = et.EmbeddingBagCollection.from_torchrec(q, backend=backend, **opts)
    try:
        for dtype in (torch.int64, torch.int32):
            kjt = _kjt(8, rng, dtype=dtype)
            _same(ebc(kjt), q(kjt))
        # the state_dict is TorchRec's quantized one, byte for byte
        for k, v in q.state_dict().items():
            assert torch.equal(ebc.state_dict()[k], v), k
    finally:
        ebc.close()


def test_int8_weighted_and_state_dict_load():
    rng = np.random.default_rng(1)
    configs = [EmbeddingBagConfig(num_embeddings=300, embedding_dim=32, name="t0", feature_names=["a", "b"])]
    q = _quantize(configs, weighted=True)
    ebc = et.EmbeddingBagCollection.from_torchrec(q, backend="evssd")
    for _ in range(2):
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.from_numpy(rng.integers(0, 300, 60)),
                                lengths=torch.tensor([0, 10, 20, 5, 25, 0], dtype=torch.int32),
                                weights=torch.from_numpy(rng.random(60, dtype=np.float32) - 0.3))
        _same(ebc(kjt), q(kjt))
    other = _quantize(configs, weighted=True, seed=9)
    ebc.load_state_dict(other.state_dict())
    _same(ebc(kjt), other(kjt))
    ebc.close()


def test_fp16_tables_of_a_quantized_ebc():
    rng = np.random.default_rng(2)
    q = _quantize(_configs(), weight_dtype=torch.float16)
    ebc = et.EmbeddingBagCollection.from_torchrec(q)
    kjt = _kjt(6, rng)
    _same(ebc(kjt), q(kjt))
    for k, v in q.state_dict().items():
        assert torch.equal(ebc.state_dict()[k], v), k
    ebc.close()
