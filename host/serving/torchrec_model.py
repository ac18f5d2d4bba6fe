"""TorchRec models in the serving layer (the ``torch`` extra; the numpy ranker stays the default).

* Embedding servers load table shards from a TorchRec EBC checkpoint: a table entry
  ``{"rows": N, "torchrec": "ebc.pt"}`` (optional ``"key"``, default
  ``embedding_bags.<table>.weight``; optional ``"prefix"`` for a whole model's state_dict, e.g.
  ``sparse_arch.embedding_bag_collection.``) is read by
  :func:`~.torchrec_checkpoint.checkpoint_rows`;
  :func:`config_from_checkpoint` writes the whole cluster config for a checkpoint.
  fp32/fp16 tables are served as float32; row-wise INT8 tables of a quantized EBC (uint8 rows:
  fp16 scale, fp16 bias, codes) are dequantized to float32 (``scale * q + bias``).
* :class:`TorchRecDLRM`: a ``torchrec.models.dlrm.DLRM`` as the ranker's model
  (``Ranker(cfg, engine, model=TorchRecDLRM(dlrm))``): the pooled bags from the servers go
  through the DLRM's dense, interaction and over arches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError, make_config, validate_config
from .torchrec_checkpoint import checkpoint_rows, checkpoint_tables

__all__ = ["checkpoint_rows", "checkpoint_tables", "config_from_checkpoint", "TorchRecDLRM", "load_torchrec_dlrm"]

#: dense features per sample of the ranker's inputs (synthetic batches and Criteo rows)
RANKER_DENSE = 13


def config_from_checkpoint(path, n_servers: int = 2, *, prefix: str = "", replicas: int = 0,
                           dim: int | None = None, host: str = "127.0.0.1") -> dict:
    """A cluster config serving every table of a TorchRec EBC checkpoint, each split in row
    ranges over ``n_servers`` servers (see :func:`evssd.host.serving.config.make_config`).
    ``dim``: needed for INT8 checkpoints (a padded INT8 row does not say its dim)."""
    tables = checkpoint_tables(path, prefix)
    dims = {}
    for name, (rows, d, dtype) in tables.items():
        if d < 0 and dim is None:
            raise ConfigError(f"table {name!r}: {dtype} rows: pass dim= (a padded INT8 row does not say it)")
        dims[name] = d if d >= 0 else dim
    if len(set(dims.values())) != 1:
        raise ConfigError(f"{path}: the serving layer needs one dim for all tables, got {dims}")
    rows = {n: r for n, (r, _, _) in tables.items()}
    cfg = make_config(1, 1, next(iter(dims.values())), n_servers, replicas=replicas, host=host)
    cfg["tables"], cfg["shards"] = {}, []
    for name, n in rows.items():
        one = make_config(1, n, cfg["dim"], n_servers, replicas=replicas, host=host)
        cfg["tables"][name] = {"rows": n, "torchrec": str(Path(path).resolve())}
        if prefix:
            cfg["tables"][name]["prefix"] = prefix
        for sh in one["shards"]:
            cfg["shards"].append(dict(sh, table=name))
    return validate_config(cfg)


class TorchRecDLRM:
    """A TorchRec ``DLRM`` with the numpy ranker model's interface: ``forward(dense, embs)``.

    ``embs[i]`` is the pooled ``[B, dim]`` of the config's i-th table; it feeds the DLRM feature
    ``features[i]`` (default: the model's sparse feature names, in order).
    """

    def __init__(self, model, features: list[str] | None = None):
        import torch
        arch = model.sparse_arch
        self.model = model.eval()
        self.features = list(features or arch.sparse_feature_names)
        if sorted(self.features) != sorted(arch.sparse_feature_names):
            raise ValueError(f"features {self.features} must be the model's {arch.sparse_feature_names}")
        self.dim = int(arch.D)
        self.n_tables = len(self.features)
        first = next((m for m in model.dense_arch.modules() if isinstance(m, torch.nn.Linear)), None)
        if first is None:
            raise ValueError("the DLRM's dense arch has no Linear layer")
        self.n_dense = int(first.in_features)

    def forward(self, dense: np.ndarray, embs: list[np.ndarray]) -> np.ndarray:
        import torch
        from torchrec.sparse.jagged_tensor import KeyedTensor

        from evssd.torch import dlrm_logits
        if len(embs) != self.n_tables:
            raise ValueError(f"{len(embs)} pooled tables for a DLRM with {self.n_tables} sparse features")
        values = torch.from_numpy(np.ascontiguousarray(np.concatenate(embs, axis=1), dtype=np.float32))
        kt = KeyedTensor(keys=self.features, length_per_key=[self.dim] * self.n_tables, values=values)
        with torch.no_grad():
            logits = dlrm_logits(self.model, torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)), kt)
            return torch.sigmoid(logits).reshape(-1).numpy()

    def activation_bytes(self, batch: int) -> int:
        """A bound on the dense part's activations per batch (for the ranker's memory budget)."""
        widths = [m.out_features for m in self.model.modules() if hasattr(m, "out_features")]
        f = self.n_tables + 1
        return 4 * batch * (sum(widths) + f * f + f * self.dim)



def load_torchrec_dlrm(path, cfg: dict) -> TorchRecDLRM:
    """The ranker model of ``evssd serve ... --torchrec-dlrm``: a ``torchrec.models.dlrm.DLRM``
    pickled by ``torch.save(model, path)``, checked against the cluster config (one sparse
    feature per table, the tables' dim, 13 dense features). :class:`ConfigError` names what
    does not fit."""
    import torch
    from torchrec.models.dlrm import DLRM
    try:
        model = torch.load(path, weights_only=False)
    except Exception as exc:  # a missing file, a corrupt pickle, a class that no longer exists
        raise ConfigError(f"--torchrec-dlrm {path}: cannot load a pickled model: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, DLRM):
        raise ConfigError(f"--torchrec-dlrm {path}: holds a {type(model).__name__}, not a torchrec.models.dlrm.DLRM")
    ranker_model = TorchRecDLRM(model)
    want = (len(cfg["tables"]), cfg["dim"], RANKER_DENSE)
    got = (ranker_model.n_tables, ranker_model.dim, ranker_model.n_dense)
    if got != want:
        raise ConfigError(f"--torchrec-dlrm {path}: the DLRM has {got[0]} sparse features of dim {got[1]} and "
                          f"{got[2]} dense features; the cluster serves {want[0]} tables of dim {want[1]} and the "
                          f"ranker feeds {want[2]} dense features")
    return ranker_model
