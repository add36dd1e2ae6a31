"""Factorization Machine (Rendle, ICDM 2010) over TorchRec tables.

    logit(x) = b + sum_f w_f[x_f] + <w_d, dense> + 1/2 * sum_k [ (sum_f v_{f,k})^2 - sum_f v_{f,k}^2 ]

where ``v_f = E_f[x_f]`` (dim ``k``) is the field's embedding row. Departure for TorchRec: first-order weights
live in 4-wide tables (see :data:`recsys_transfer.modules.fm.FIRST_ORDER_WIDTH`). ``forward(batch)`` returns
raw logits ``{task: float32[B]}`` (one binary or regression task); no sigmoid or loss here. A list field's ``v_f``
and ``w_f`` are its bag pooled by ``pooling`` (``{field: 'sum' | 'mean'}``, default sum; with sum pooling
and all x = 1 this is Rendle's FM over every id of the row, except that two ids of one bag do not interact: the
bag is one field, and Eq. 5 subtracts ``v_f^2`` of the whole bag).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.modules.embedding import make_ebc, output_keys, values_in_order
from recsys_transfer.modules.fm import FIRST_ORDER_WIDTH, FirstOrder, fm_second_order
from recsys_transfer.modules.heads import single_score_task
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch

__all__ = ["FM", "FIRST_ORDER_WIDTH"]


class FM(nn.Module):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__()
        self.dataset_id = meta.dataset_id
        self.task = single_score_task(tuple(tasks or meta.tasks), "fm").name
        self.num_fields = len(meta.sparse_names)
        self.embedding = make_ebc(meta, embedding_dim, pooling=pooling)
        self._keys = output_keys(self.embedding)  # its column order (sharded: values_in_order)
        self.linear = FirstOrder(meta, pooling)
        self.bias = nn.Parameter(torch.zeros(1))
        for p in self.embedding.parameters():
            nn.init.normal_(p, std=0.01)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        B = batch.batch_size
        v = values_in_order(self.embedding(batch.sparse), self._keys).view(B, self.num_fields, -1)  # [B, F, k]
        logit = self.bias + self.linear(batch.sparse, batch.dense) + fm_second_order(v)
        return {self.task: logit}
