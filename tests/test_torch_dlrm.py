"""TorchRec's DLRM with evssd embeddings on the Criteo sample rows: the same scores."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection as TorchRecEBC  # noqa: E402
from torchrec import EmbeddingBagConfig  # noqa: E402
from torchrec.models.dlrm import DLRM  # noqa: E402

import evssd.torch as et  # noqa: E402


def _dlrm(n_features=26, rows=2000, dim=8, seed=0):
    torch.manual_seed(seed)
    configs = [EmbeddingBagConfig(num_embeddings=rows + 37 * k, embedding_dim=dim, name=f"t{k}",
                                  feature_names=[f"C{k + 1}"]) for k in range(n_features)]
    return DLRM(TorchRecEBC(tables=configs), dense_in_features=13, dense_arch_layer_sizes=[16, dim],
                over_arch_layer_sizes=[16, 1]), configs


@pytest.mark.parametrize("backend,opts", [("dram", {}), ("evssd", {"cache_fraction": 0.01})])
def test_dlrm_scores_on_criteo_rows_equal_torchrec(backend, opts):
    model, configs = _dlrm()
    model.eval()
    dense, kjt = et.criteo_inputs(configs)
    assert dense.shape == (200, 13) and kjt.keys() == [f"C{k + 1}" for k in range(26)]
    assert int(kjt.values().max()) < 2000 + 37 * 25 and kjt.lengths().eq(1).all()
    ours = et.with_evssd_embeddings(model, backend=backend, **opts)
    assert isinstance(ours.sparse_arch.embedding_bag_collection, et.EmbeddingBagCollection)
    assert isinstance(model.sparse_arch.embedding_bag_collection, TorchRecEBC)   # the original is untouched
    if backend == "evssd":   # 26 tables, 16 device table slots: packed into one device table
        assert len(ours.sparse_arch.embedding_bag_collection.store.tables) == 1
    with torch.no_grad():
        got, want = torch.sigmoid(ours(dense, kjt)), torch.sigmoid(model(dense, kjt))
        assert torch.equal(got, want), (got - want).abs().max()
        for lo in range(0, 200, 64):       # in batches, as served (the dense matmuls' blocking
            sl = slice(lo, min(200, lo + 64))   # depends on the batch size: compare batch to batch)
            d, k = dense[sl], _slice_kjt(kjt, sl)
            got, want_b = torch.sigmoid(ours(d, k)), torch.sigmoid(model(d, k))
            assert torch.equal(got, want_b), (got - want_b).abs().max()
            torch.testing.assert_close(got, want[sl], rtol=1e-5, atol=1e-6)
        # the dense part alone, from pooled embeddings (what the pipelined benchmark runs)
        ebc = ours.sparse_arch.embedding_bag_collection
        plan = ebc.plan(kjt)
        pooled = ebc.keyed_tensor(plan, ebc.tables.lookup(plan))
        assert torch.equal(torch.sigmoid(et.dlrm_logits(model, dense, pooled)), want)
    # the whole model's state_dict keeps TorchRec's names and values
    sd, ref = ours.state_dict(), model.state_dict()
    assert list(sd) == list(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    ours.sparse_arch.embedding_bag_collection.close()


def _slice_kjt(kjt, sl):
    """The samples ``sl`` of a KJT with one value per sample and feature."""
    from torchrec import KeyedJaggedTensor
    B = kjt.stride()
    vals = kjt.values().reshape(len(kjt.keys()), B)[:, sl].reshape(-1)
    return KeyedJaggedTensor(keys=kjt.keys(), values=vals, lengths=torch.ones(vals.numel(), dtype=torch.int32))


def test_criteo_inputs_bad_model():
    configs = [EmbeddingBagConfig(num_embeddings=10, embedding_dim=4, name=f"t{k}", feature_names=[f"f{k}"])
               for k in range(27)]
    with pytest.raises(et.TorchFaceError, match="26 categorical columns"):
        et.criteo_inputs(configs)
    with pytest.raises(et.TorchFaceError, match="TorchRec DLRM"):
        et.with_evssd_embeddings(torch.nn.Linear(2, 2))
