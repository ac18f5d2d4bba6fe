"""evssd.torch: evssd tables behind PyTorch / TorchRec interfaces (the ``torch`` extra).

* :class:`EmbeddingBagCollection` -- TorchRec's EBC (KeyedJaggedTensor in, KeyedTensor out,
  TorchRec state_dict names), built from a float or quantized TorchRec EBC or from configs.
* :class:`TableBatchedEmbeddingBags` -- FBGEMM's calling convention (concatenated indices,
  offsets of T*B+1, optional per-sample weights, output [B, sum(D)]).
* :func:`with_evssd_embeddings` -- a TorchRec DLRM whose EBC is served by evssd;
  :func:`criteo_inputs` -- Criteo rows as (dense tensor, KJT).

The source lives in ``host/torchface`` (installed as ``evssd.torch``) so that no folder named
``torch`` can shadow PyTorch. Only this package imports torch; the core library does not.
"""
from .core import BACKENDS, BatchPlan, EmbeddingTables, FeatureRequest
from .dlrm import criteo_inputs, dlrm_logits, with_evssd_embeddings
from .ebc import EmbeddingBagCollection, kjt_requests
from .tables import TableSpec, TorchFaceError
from .tbe import TableBatchedEmbeddingBags

__all__ = ["EmbeddingBagCollection", "TableBatchedEmbeddingBags", "with_evssd_embeddings", "criteo_inputs",
           "dlrm_logits",
           "EmbeddingTables", "FeatureRequest", "BatchPlan", "TableSpec", "TorchFaceError", "BACKENDS",
           "kjt_requests"]
