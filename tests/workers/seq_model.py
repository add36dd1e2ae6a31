"""A tiny model over a TorchRec EmbeddingCollection (sequence, non-pooled embeddings), for the barrier tests.

Every field is looked up as a sequence; rows of one example are summed per field (segment sum over the
JaggedTensor), then a linear layer gives the logit. With single-valued fields it computes the same function as
an EmbeddingBagCollection with sum pooling.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection

from recsys_transfer.types import Batch


class SeqModel(nn.Module):
    def __init__(self, meta, dim: int = 8) -> None:
        super().__init__()
        self.keys = meta.sparse_names
        self.dataset_id = meta.dataset_id
        self.embedding = EmbeddingCollection(tables=[
            EmbeddingConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=meta.field(f).vocab_size, feature_names=[f])
            for f in self.keys])
        self.out = nn.Linear(len(self.keys) * dim, 1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        jts = self.embedding(batch.sparse)
        B = batch.batch_size
        pooled = []
        for f in self.keys:
            jt = jts[f]
            row = torch.repeat_interleave(torch.arange(B), jt.lengths().long())
            pooled.append(torch.zeros(B, jt.values().shape[1]).scatter_add(
                0, row.unsqueeze(1).expand(-1, jt.values().shape[1]), jt.values()))
        return {"label": self.out(torch.cat(pooled, dim=1)).squeeze(1)}


class BagModel(nn.Module):
    """The same function as :class:`SeqModel` over an EmbeddingBagCollection (sum pooling)."""

    def __init__(self, meta, dim: int = 8) -> None:
        super().__init__()
        from recsys_transfer.modules.embedding import make_ebc

        self.keys = meta.sparse_names
        self.dataset_id = meta.dataset_id
        self.embedding = make_ebc(meta, dim)
        self.out = nn.Linear(len(self.keys) * dim, 1)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"label": self.out(self.embedding(batch.sparse).values()).squeeze(1)}
