"""Logistic regression: the first-order baseline.

    logit(x) = b + sum_f w_f[x_f] + <w_d, dense>

First-order weights live in 4-wide TorchRec tables of which only column 0 is read (see
:data:`recsys_transfer.modules.fm.FIRST_ORDER_WIDTH`). LR has no embedding vectors, hence no ``self.embedding``:
embedding transfer does not apply to it (it is the reference point for models that have them). Output: raw
logits ``{task: [B]}`` (one binary or regression task); no sigmoid or loss here. A list field's ``w_f`` is its bag's
weights pooled by ``pooling`` (``{field: 'sum' | 'mean'}``, default sum).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.modules.fm import FirstOrder
from recsys_transfer.modules.heads import single_score_task
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class LR(nn.Module):
    def __init__(self, meta: DatasetMeta, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__()
        self.dataset_id = meta.dataset_id
        self.task = single_score_task(tuple(tasks or meta.tasks), "lr").name
        self.linear = FirstOrder(meta, pooling)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {self.task: self.bias + self.linear(batch.sparse, batch.dense)}  # [B]
