"""evssd.torch.EmbeddingBagCollection and TableBatchedEmbeddingBags against TorchRec and FBGEMM.

Real TorchRec objects (KJT, EBC) and FBGEMM's training TBE are the references; outputs must be
equal bit for bit (the store's pooling is FBGEMM's order of additions).
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection as TorchRecEBC  # noqa: E402
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402
from torchrec.modules.embedding_configs import DataType  # noqa: E402

import evssd.torch as et  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    return [
        EmbeddingBagConfig(num_embeddings=300, embedding_dim=8, name="t0", feature_names=["f0", "f1"]),
        EmbeddingBagConfig(num_embeddings=120, embedding_dim=4, name="t1", feature_names=["f2"],
                           pooling=PoolingType.MEAN),
        # f0 feeds two tables: TorchRec names its outputs f0@t0 and f0@t2
        EmbeddingBagConfig(num_embeddings=200, embedding_dim=6, name="t2", feature_names=["f0"],
                           data_type=DataType.FP16),
        EmbeddingBagConfig(num_embeddings=150, embedding_dim=8, name="t3", feature_names=["f3"]),
    ]


def _rows(configs):
    rows = {}
    for c in configs:
        for f in c.feature_names:
            rows[f] = min(rows.get(f, c.num_embeddings), c.num_embeddings)
    return rows


def _kjt(configs, B, rng, *, dtype=torch.int64, weighted=False, max_len=6, keys=None):
    rows = _rows(configs)
    keys = keys or sorted(rows, reverse=True)      # not the module's order
    lens = rng.integers(0, max_len, len(keys) * B)
    lens[0] = 0                                    # an empty bag, always
    vals = np.concatenate([rng.integers(0, rows[k], lens[i * B:(i + 1) * B].sum()) for i, k in enumerate(keys)])
    w = torch.from_numpy(rng.random(vals.size, dtype=np.float32) * 2 - 0.5) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(vals).to(dtype),
                             lengths=torch.from_numpy(lens).to(torch.int32), weights=w)


def _ref(configs, weighted=False, seed=0):
    torch.manual_seed(seed)
    return TorchRecEBC(tables=configs, is_weighted=weighted)


def _assert_same(got, want):
    assert got.keys() == want.keys()
    assert got.length_per_key() == want.length_per_key()
    assert got.values().dtype == want.values().dtype == torch.float32
    assert got.values().shape == want.values().shape
    assert torch.equal(got.values(), want.values()), (got.values() - want.values()).abs().max()


@pytest.mark.parametrize("backend,opts", [
    ("dram", {}),
    ("file", {"cache_fraction": 0.05}),
    ("file", {"file_mode": "page", "cache_fraction": None}),
    ("rocksdb", {"cache_fraction": 0.05}),
    ("evssd", {"cache_fraction": 0.05}),          # the device model behind EV-Cache
    ("evssd", {"cache_fraction": None}),          # pooled on the device (GATHER_POOLED)
    ("evssd", {"cache_fraction": 0.05, "pack": True}),   # t0 and t3 stacked in one device table
    ("dram", {"pack": True}),
])
def test_forward_equals_torchrec_on_every_backend(backend, opts):
    rng = np.random.default_rng(1)
    configs = _configs()
    ref = _ref(configs)
    ebc = et.EmbeddingBagCollection.from_torchrec(ref, backend=backend, **opts)
    try:
        for dtype in (torch.int64, torch.int32):
            for B in (1, 7):
                kjt = _kjt(configs, B, rng, dtype=dtype)
                with torch.no_grad():
                    want = ref(kjt)
                _assert_same(ebc(kjt), want)
        assert ebc.embedding_names() == ["f0@t0", "f1", "f2", "f0@t2", "f3"]
        if opts.get("pack"):
            assert ebc.tables.where["t3"] == ("pack0", 300) and len(ebc.store.tables) == 3
        for k, v in ref.state_dict().items():
            assert torch.equal(ebc.state_dict()[k], v), k
    finally:
        ebc.close()


def test_weighted_kjt_equals_torchrec():
    rng = np.random.default_rng(2)
    configs = [EmbeddingBagConfig(num_embeddings=500, embedding_dim=16, name="a", feature_names=["x", "y"]),
               EmbeddingBagConfig(num_embeddings=64, embedding_dim=3, name="b", feature_names=["z"])]
    ref = _ref(configs, weighted=True)
    for backend in ("dram", "evssd"):
        ebc = et.EmbeddingBagCollection.from_torchrec(ref, backend=backend)
        try:
            assert ebc.is_weighted()
            # the store's default cache: 1% EV-Cache per table, none in DRAM
            assert bool(ebc.store.caches) == (backend == "evssd")
            for _ in range(3):
                kjt = _kjt(configs, 9, rng, weighted=True, max_len=40)
                with torch.no_grad():
                    # weighted bags are fma(w, x, acc) on both sides: bit for bit
                    _assert_same(ebc(kjt), ref(kjt))
            with pytest.raises(et.TorchFaceError, match="needs weights"):
                ebc(_kjt(configs, 2, rng))
        finally:
            ebc.close()


def _vbe_kjt(configs, strides, B, rng, *, weighted=False, inverse=True):
    """A KJT with a batch size per feature (``strides``) and inverse indices to a batch of B."""
    rows = _rows(configs)
    keys = sorted(rows, reverse=True)
    lens = rng.integers(0, 5, sum(strides))
    vals = rng.integers(0, min(rows.values()), int(lens.sum()))
    inv = torch.from_numpy(np.stack([rng.integers(0, s, B) for s in strides]))
    w = torch.from_numpy(rng.random(vals.size, dtype=np.float32) * 2 - 0.5) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(vals), lengths=torch.from_numpy(lens).to(torch.int32),
                             weights=w, stride_per_key_per_rank=[[s] for s in strides],
                             inverse_indices=(keys, inv) if inverse else None)


@pytest.mark.parametrize("backend,opts,weighted", [
    ("dram", {}, False), ("dram", {}, True),
    ("evssd", {"cache_fraction": None}, False),     # pooled on the device model
    ("evssd", {"cache_fraction": 0.05}, True),
])
def test_variable_batch_kjt_equals_torchrec(backend, opts, weighted):
    """TorchRec's EBC takes a KJT with a batch size per feature (stride_per_key_per_rank) when it
    carries inverse_indices: each feature's bags pooled, then expanded to the batch. So do we."""
    rng = np.random.default_rng(8)
    configs = _configs()
    if weighted:
        configs = [c for c in configs if c.pooling == PoolingType.SUM and c.data_type == DataType.FP32]
    ref = _ref(configs, weighted=weighted)
    ebc = et.EmbeddingBagCollection.from_torchrec(ref, backend=backend, **opts)
    try:
        n_keys = len(_rows(configs))
        for strides, B in (([2, 3, 1, 4][:n_keys], 5), ([1] * n_keys, 3), ([3] * n_keys, 3)):
            kjt = _vbe_kjt(configs, strides, B, rng, weighted=weighted)
            with torch.no_grad():
                want = ref(kjt)
            assert want.values().shape[0] == B
            _assert_same(ebc(kjt), want)
        # a plain KJT with inverse indices (deduplicated bags) expands the same way
        plain = _kjt(configs, 3, rng, weighted=weighted)
        keys = plain.keys()
        inv = torch.from_numpy(rng.integers(0, 3, (len(keys), 6)))
        dedup = KeyedJaggedTensor(keys=keys, values=plain.values(), lengths=plain.lengths(),
                                  weights=plain.weights_or_none(), inverse_indices=(keys, inv))
        with torch.no_grad():
            _assert_same(ebc(dedup), ref(dedup))
        # bad inverse indices name the feature; nothing is lost
        kjt = _vbe_kjt(configs, [2] * n_keys, 4, rng, weighted=weighted)
        keys, inv = kjt.inverse_indices()
        bad = inv.clone()
        bad[0, 1] = 2
        with pytest.raises(et.TorchFaceError, match=rf"feature '{keys[0]}': inverse index 2 out of range \[0, 2\)"):
            ebc(KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights_or_none(),
                                  stride_per_key_per_rank=[[2]] * n_keys, inverse_indices=(keys, bad)))
        with pytest.raises(et.TorchFaceError, match=r"feature 'f0' has no row in the KeyedJaggedTensor's inverse"):
            ebc(KeyedJaggedTensor(keys=keys, values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights_or_none(),
                                  stride_per_key_per_rank=[[2]] * n_keys,
                                  inverse_indices=([k for k in keys if k != "f0"], inv[[i for i, k in enumerate(keys)
                                                                                           if k != "f0"]])))
        with pytest.raises(et.TorchFaceError, match="variable batch size per feature needs inverse_indices"):
            ebc(_vbe_kjt(configs, [2, 3, 1, 4][:n_keys], 5, rng, weighted=weighted, inverse=False))
        with torch.no_grad():
            _assert_same(ebc(kjt), ref(kjt))
    finally:
        ebc.close()


def test_all_empty_bags_and_kjt_extra_keys():
    configs = _configs()
    ref = _ref(configs)
    ebc = et.EmbeddingBagCollection.from_torchrec(ref)
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2", "unused", "f3"], values=torch.zeros(0, dtype=torch.int64),
                            lengths=torch.zeros(5 * 3, dtype=torch.int32))
    with torch.no_grad():
        want = ref(kjt)
    got = ebc(kjt)
    _assert_same(got, want)
    assert not got.values().any()


def test_from_configs_and_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    configs = _configs()
    ref = _ref(configs, seed=5)
    weights = {c.name: ref.state_dict()[f"embedding_bags.{c.name}.weight"] for c in configs}
    ebc = et.EmbeddingBagCollection.from_configs(configs, weights, backend="file", path=tmp_path / "t")
    sd = ebc.state_dict()
    assert list(sd) == [f"embedding_bags.{c.name}.weight" for c in configs]
    for k, v in ref.state_dict().items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v)
    # a TorchRec checkpoint of other weights, loaded by name, through torch.save / torch.load
    other = _ref(configs, seed=6)
    path = tmp_path / "ckpt.pt"
    torch.save(other.state_dict(), path)
    res = ebc.load_state_dict(torch.load(path))
    assert not res.missing_keys and not res.unexpected_keys
    kjt = _kjt(configs, 5, rng, max_len=10)
    with torch.no_grad():
        _assert_same(ebc(kjt), other(kjt))
    # float64 converts (as PyTorch's copy_ does); integers do not
    ebc.load_state_dict({k: v.double() for k, v in other.state_dict().items()})
    with torch.no_grad():
        _assert_same(ebc(kjt), other(kjt))
    with pytest.raises(RuntimeError, match="t0.*floating point"):
        ebc.load_state_dict({k: v.long() for k, v in other.state_dict().items()})
    # a wrong shape names the table and keeps the old tables
    bad = dict(other.state_dict())
    bad["embedding_bags.t1.weight"] = torch.zeros(119, 4)
    with pytest.raises(RuntimeError, match="t1.*shape"):
        ebc.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key.*embedding_bags.t2.weight"):
        ebc.load_state_dict({k: v for k, v in other.state_dict().items() if "t2." not in k})
    with torch.no_grad():
        _assert_same(ebc(kjt), other(kjt))
    # non-strict: a partial state_dict replaces the tables it names only
    third = _ref(configs, seed=7)
    res = ebc.load_state_dict({"embedding_bags.t1.weight": third.state_dict()["embedding_bags.t1.weight"]},
                              strict=False)
    assert res.missing_keys == ["embedding_bags.t0.weight", "embedding_bags.t2.weight", "embedding_bags.t3.weight"]
    got = ebc(kjt).to_dict()
    with torch.no_grad():
        assert torch.equal(got["f2"], third(kjt).to_dict()["f2"])
        assert torch.equal(got["f1"], other(kjt).to_dict()["f1"])
    ebc.close()


def test_bad_input_names_the_argument():
    rng = np.random.default_rng(4)
    configs = _configs()
    ebc = et.EmbeddingBagCollection.from_torchrec(_ref(configs))
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2", "f3"], values=torch.tensor([1, 2, 300, 4]),
                            lengths=torch.tensor([1, 1, 1, 1], dtype=torch.int32))
    with pytest.raises(et.TorchFaceError, match=r"feature 'f2' \(table 't1'\): index 300 .* range \[0, 120\)"):
        ebc(kjt)
    with pytest.raises(et.TorchFaceError, match="feature 'f2' is not in the KeyedJaggedTensor"):
        ebc(KeyedJaggedTensor(keys=["f0", "f1", "f3"], values=torch.tensor([1]), lengths=torch.tensor([1, 0, 0])))
    vbe = KeyedJaggedTensor(keys=["f0", "f1", "f2", "f3"], values=torch.tensor([1, 2, 3, 4, 5]),
                            lengths=torch.tensor([1, 1, 1, 1, 1], dtype=torch.int32),
                            stride_per_key_per_rank=[[1], [2], [1], [1]])
    with pytest.raises(et.TorchFaceError, match="variable batch size"):
        ebc(vbe)
    with pytest.raises(et.TorchFaceError, match="backend must be one of"):
        et.EmbeddingBagCollection.from_torchrec(_ref(configs), backend="tape")
    with pytest.raises(et.TorchFaceError, match="no weights for table"):
        et.EmbeddingBagCollection.from_configs(configs, {"t0": torch.zeros(300, 8)})
    with pytest.raises(et.TorchFaceError, match=r"table 't0': weight must have shape \(300, 8\), got \(300, 4\)"):
        et.EmbeddingBagCollection.from_configs(configs, {c.name: torch.zeros(c.num_embeddings, 4)
                                                          for c in configs})
    with pytest.raises(et.TorchFaceError, match="block_mode .* backend='evssd'"):
        et.EmbeddingBagCollection.from_torchrec(_ref(configs), block_mode=True)
    # nothing was lost: the module still answers
    good = _kjt(configs, 3, rng)
    with torch.no_grad():
        _assert_same(ebc(good), _ref(configs)(good))


def test_device_argument_and_block_mode():
    """An open Device (model here; RTL/board the same way) and its block mode give the same bags."""
    from evssd.host.device import Device
    rng = np.random.default_rng(5)
    configs = _configs()
    ref = _ref(configs)
    with Device.open("model") as dev:
        ebc = et.EmbeddingBagCollection.from_torchrec(ref, backend="evssd", device=dev, block_mode=True,
                                                      cache_fraction=None)
        kjt = _kjt(configs, 6, rng, max_len=20)
        before = dev.counters()
        with torch.no_grad():
            _assert_same(ebc(kjt), ref(kjt))
        after = dev.counters()
        moved = sum(a["bytes"] - b["bytes"] for a, b in zip(after["channels"], before["channels"]))
        rows = sum(a["rows"] - b["rows"] for a, b in zip(after["channels"], before["channels"]))
        assert rows > 0 and moved == rows * dev.params.page_size    # whole pages per row read
        ebc.close()


def _tbe(specs, pooling, feature_table_map=None, weighted=False):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    mode = {"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}[pooling]
    kw = {} if feature_table_map is None else {"feature_table_map": feature_table_map}
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for r, d in specs], pooling_mode=mode, **kw)
    with torch.no_grad():
        for w in tbe.split_embedding_weights():
            w.copy_(torch.randn(w.shape))
    return tbe


@pytest.mark.parametrize("pooling,weighted,ftm", [("sum", False, None), ("sum", True, [0, 1, 0]),
                                                   ("mean", False, [1, 0])])
def test_fbgemm_calling_convention_equals_tbe(pooling, weighted, ftm):
    rng = np.random.default_rng(6)
    torch.manual_seed(0)
    specs = [(400, 8), (90, 12)]
    tbe = _tbe(specs, pooling, ftm)
    ours = et.TableBatchedEmbeddingBags.from_fbgemm(tbe, backend="evssd")
    ftm = ftm or [0, 1]
    T, B = len(ftm), 11
    lens = rng.integers(0, 30, T * B)
    lens[B] = 0
    idx = np.concatenate([rng.integers(0, specs[ftm[f]][0], lens[f * B:(f + 1) * B].sum()) for f in range(T)])
    offs = np.concatenate([[0], np.cumsum(lens)])
    w = torch.from_numpy(rng.random(idx.size, dtype=np.float32)) if weighted else None
    with torch.no_grad():
        want = tbe(torch.from_numpy(idx), torch.from_numpy(offs), per_sample_weights=w)
    for it in (torch.int64, torch.int32):
        got = ours(torch.from_numpy(idx).to(it), torch.from_numpy(offs).to(it), per_sample_weights=w)
        assert got.shape == (B, sum(specs[t][1] for t in ftm))
        assert torch.equal(got, want), (got - want).abs().max()  # weighted: fma on both sides
    for a, b in zip(ours.split_embedding_weights(), tbe.split_embedding_weights()):
        assert torch.equal(a, b)
    with pytest.raises(et.TorchFaceError, match="T\\*B\\+1"):
        ours(torch.from_numpy(idx), torch.from_numpy(offs[:-1]))
    ours.close()


def test_import_torch_is_pytorch_everywhere_and_core_needs_no_torch():
    dirs = [ROOT, ROOT / "host", ROOT / "tests", ROOT / "host" / "torchface"]
    code = ("import importlib.util, sys\n"
            f"for d in {[str(d) for d in dirs]!r}:\n"
            "    sys.path[0] = d\n"
            "    importlib.invalidate_caches()\n"
            "    origin = importlib.util.find_spec('torch').origin\n"
            "    assert 'site-packages' in origin, (d, origin)\n"
            "import torch, evssd.torch\n"
            "assert hasattr(torch, 'nn') and evssd.torch.__file__.endswith('torchface/__init__.py')\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "host", check=True, timeout=120)
    # the core library with torch made unimportable
    core = ("import sys; sys.modules['torch'] = None; "
            "import evssd.host.store, evssd.host.pipeline, evssd.host.device, evssd.host.serving.ranker, "
            "evssd.host.serving.config; "
            "s = evssd.host.store.EmbeddingStore.from_arrays({'a': __import__('numpy').ones((4, 2), 'f4')}); "
            "assert s.pooled('a', [0, 1], [0, 2])[0, 0] == 2")
    subprocess.run([sys.executable, "-c", core], cwd=ROOT, check=True, timeout=120)
