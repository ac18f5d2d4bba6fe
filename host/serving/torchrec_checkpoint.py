"""Table rows from a TorchRec EBC checkpoint (a state_dict file), for the embedding servers.

Kept apart from :mod:`.torchrec_model` so that :mod:`.config` can read checkpoints without an
import circle. torch is imported only when a checkpoint is read.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = ["CheckpointError", "checkpoint_rows", "checkpoint_tables"]


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not hold the table the config names."""


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict:
    import torch
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read a TorchRec checkpoint ({exc})") from exc


def _resolve(cfg: dict, table: str) -> tuple[str, str]:
    t = cfg["tables"][table]
    p = Path(t["torchrec"])
    if not p.is_absolute():
        p = Path(cfg.get("_base", ".")) / p
    key = t.get("key") or f"{t.get('prefix', '')}embedding_bags.{table}.weight"
    return str(p), key


def checkpoint_tables(path, prefix: str = "") -> dict[str, tuple[int, int, str]]:
    """Tables of a TorchRec EBC state_dict file: name -> (rows, dim, dtype)."""
    sd = _load(str(path))
    out = {}
    head = f"{prefix}embedding_bags."
    for k, v in sd.items():
        if k.startswith(head) and k.endswith(".weight"):
            name = k[len(head):-len(".weight")]
            if v.dtype.is_floating_point:
                out[name] = (int(v.shape[0]), int(v.shape[1]), str(v.dtype).replace("torch.", ""))
            else:
                out[name] = (int(v.shape[0]), -1, str(v.dtype).replace("torch.", ""))
    if not out:
        raise CheckpointError(f"{path}: no '{head}<table>.weight' tensors (is it a TorchRec EBC state_dict?)")
    return out


def checkpoint_rows(cfg: dict, table: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``table`` from its TorchRec checkpoint, float32 ``[hi - lo, dim]``."""
    path, key = _resolve(cfg, table)
    sd = _load(path)
    if key not in sd:
        raise CheckpointError(f"table {table!r}: {path} has no {key!r}")
    w = sd[key]
    dim = cfg["dim"]
    rows = cfg["tables"][table]["rows"]
    if w.dim() != 2 or w.shape[0] != rows:
        raise CheckpointError(f"table {table!r}: {key} in {path} has shape {tuple(w.shape)}, the config says "
                          f"{rows} rows")
    part = w[lo:hi].numpy()
    if w.dtype.is_floating_point:
        if w.shape[1] != dim:
            raise CheckpointError(f"table {table!r}: {key} in {path} has dim {w.shape[1]}, the config says {dim}")
        return np.ascontiguousarray(part, dtype=np.float32)
    if part.dtype != np.uint8 or part.shape[1] < 4 + dim:
        raise CheckpointError(f"table {table!r}: {key} in {path} is {part.dtype} {tuple(w.shape)}: neither float nor "
                          f"row-wise INT8 rows of dim {dim}")
    sb = np.ascontiguousarray(part[:, :4]).view(np.float16).astype(np.float32)
    return (part[:, 4:4 + dim].astype(np.float32) * sb[:, :1] + sb[:, 1:]).astype(np.float32)
