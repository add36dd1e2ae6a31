"""Factorization Machine (Rendle, ICDM 2010) over TorchRec tables.

    logit(x) = b + sum_f w_f[x_f] + <w_d, dense> + 1/2 * sum_k [ (sum_f v_{f,k})^2 - sum_f v_{f,k}^2 ]

where ``v_f = E_f[x_f]`` (dim ``k``) is the field's embedding row and ``w_f`` its first-order weight. Departure
for TorchRec: fbgemm's fused TBE (the kernel DistributedModelParallel uses for model-parallel tables) needs
widths divisible by 4, so first-order weights live in 4-wide tables (``FIRST_ORDER_WIDTH``) of which only column 0
is read; columns 1-3 get zero gradient and never move from their zero init. ``forward(batch)`` returns raw logits ``{label: float32[B]}``; no sigmoid or loss here.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.modules.embedding import make_ebc
from recsys_transfer.types import Batch


FIRST_ORDER_WIDTH = 4


class FM(nn.Module):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16) -> None:
        super().__init__()
        self.dataset_id = meta.dataset_id
        self.label = meta.labels[0]
        self.keys = meta.sparse_names
        self.embedding = make_ebc(meta, embedding_dim)
        self.linear = make_ebc(meta, FIRST_ORDER_WIDTH)
        self.dense_linear = nn.Linear(len(meta.dense), 1) if meta.dense else None
        self.bias = nn.Parameter(torch.zeros(1))
        for p in self.linear.parameters():
            nn.init.zeros_(p)
        for p in self.embedding.parameters():
            nn.init.normal_(p, std=0.01)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        emb = self.embedding(batch.sparse)  # KeyedTensor, values [B, F * k]
        B = batch.batch_size
        v = emb.values().view(B, len(self.keys), -1)  # [B, F, k]
        first = self.linear(batch.sparse).values().view(B, len(self.keys), FIRST_ORDER_WIDTH)[:, :, 0].sum(dim=1)  # [B]
        second = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)  # [B]
        logit = self.bias + first + second
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(batch.dense).squeeze(1)
        return {self.label: logit}
