"""TorchRec's DLRM with its embeddings served by evssd, and Criteo rows as model inputs."""
from __future__ import annotations

import copy

import numpy as np
import torch

from .ebc import EmbeddingBagCollection
from .tables import TorchFaceError

__all__ = ["with_evssd_embeddings", "criteo_inputs", "dlrm_logits"]


def with_evssd_embeddings(model, backend: str = "dram", **options):
    """A view of a TorchRec ``DLRM`` (``torchrec.models.dlrm``) whose ``sparse_arch`` looks up an
    :class:`EmbeddingBagCollection` built from the model's EBC on ``backend`` (options as
    :meth:`EmbeddingBagCollection.from_torchrec`). The dense and over arches are shared with
    ``model``, not copied; ``model`` itself is unchanged."""
    sparse = getattr(model, "sparse_arch", None)
    src = getattr(sparse, "embedding_bag_collection", None)
    if src is None:
        raise TorchFaceError(f"model must be a TorchRec DLRM with sparse_arch.embedding_bag_collection, "
                             f"got {type(model).__name__}")
    ebc = src if isinstance(src, EmbeddingBagCollection) else \
        EmbeddingBagCollection.from_torchrec(src, backend=backend, **options)
    out = copy.copy(model)
    out._modules = dict(model._modules)
    arch = copy.copy(sparse)
    arch._modules = dict(sparse._modules)
    arch.embedding_bag_collection = ebc
    out.sparse_arch = arch
    return out


def criteo_inputs(configs, path=None, *, limit: int | None = None):
    """Criteo rows as DLRM inputs: (dense float32 [N, 13], KeyedJaggedTensor).

    The features of ``configs`` (TorchRec ``EmbeddingBagConfig``s, in order) take the
    categorical columns C1, C2, ... in turn, each hashed into its table's rows by
    :func:`evssd.host.workload.load_criteo` (one lookup per sample and feature); dense features are
    log(1 + max(x, 0)). ``path``: a Criteo CSV (default: the shipped 200-row sample).
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from evssd.host.workload import N_SPARSE, load_criteo
    feats = [(f, int(c.num_embeddings)) for c in configs for f in (c.feature_names or [c.name])]
    if not 1 <= len(feats) <= N_SPARSE:
        raise TorchFaceError(f"Criteo rows have {N_SPARSE} categorical columns; the model has {len(feats)} features")
    data = load_criteo(path, n_tables=len(feats), rows_per_table=[r for _, r in feats])
    n = len(data) if limit is None else min(limit, len(data))
    values = np.ascontiguousarray(data.indices[:, :n]).reshape(-1)
    kjt = KeyedJaggedTensor(keys=[f for f, _ in feats], values=torch.from_numpy(values),
                            lengths=torch.ones(len(feats) * n, dtype=torch.int32))
    return torch.from_numpy(np.ascontiguousarray(data.dense[:n])), kjt


def dlrm_logits(model, dense: torch.Tensor, pooled) -> torch.Tensor:
    """A TorchRec DLRM's logits from already pooled embeddings (a ``KeyedTensor``): the steps of
    ``DLRM.forward`` after the EBC, so a pipeline can look up batch i+1 while batch i's dense
    part runs. Equal to ``model(dense, kjt)`` when ``pooled`` is the model's EBC output for ``kjt``."""
    arch = model.sparse_arch
    by_name = pooled.to_dict()
    sparse = torch.cat([by_name[n] for n in arch.sparse_feature_names], dim=1).reshape(-1, arch.F, arch.D)
    x = model.dense_arch(dense)
    return model.over_arch(model.inter_arch(dense_features=x, sparse_features=sparse))
