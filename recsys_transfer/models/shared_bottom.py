"""Shared-Bottom (Caruana 1997; the hard-parameter-sharing baseline of Ma et al. 2018, Fig. 1a).

    h       = bottom(x)                  one MLP shared by all tasks, x: the shared input (models/multitask.py)
    logit_k = tower_k(h)                 a per-task MLP ending in the task's output layer

Defaults (modest; FuxiCTR's ShareBottom uses bottom [512, 256, 128], towers [128, 64]): ``bottom (128, 64)``,
``tower_hidden (64,)``, ``embedding_dim 16``. Output: ``{task: logit [B]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.multitask import MultiTaskBase, check_widths
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class SharedBottom(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, bottom: tuple[int, ...] = (128, 64),
                 tower_hidden: tuple[int, ...] = (64,), dropout: float = 0.0, batch_norm: bool = False,
                 init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, "shared_bottom", embedding_dim, pooling, init_std, tasks)
        check_widths("shared_bottom", bottom=bottom)
        self.bottom = MLP(self.input_dim, bottom, None, dropout, batch_norm)
        self.towers = nn.ModuleList(MLP(self.bottom.out_dim, tower_hidden, t.width, dropout, batch_norm)
                                    for t in self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h = self.bottom(self.inputs(batch))  # [B, d]
        return self.task_outputs([tower(h) for tower in self.towers])  # T x [B, width_k]
