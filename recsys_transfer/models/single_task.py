"""Single-task baseline: the same feed-forward expert backbone, one network per task.

    logit_k = w_k^T Expert_k(x) + b_k          x: the shared input (models/multitask.py)

``Expert_k`` is the feed-forward expert of MMoE/PLE/FDN (:class:`recsys_transfer.modules.experts.Expert`,
``expert_hidden`` layers, default ``(128, 64)`` as theirs) with the task's own output layer; ``tower_hidden``
(default none) puts a tower between them. The model trains the tasks it is given and shares nothing between them
but the embedding tables (one collection: the row pipeline and transfer treat it as every other model). The
single-task baseline of a multi-task comparison (the FDN paper's Table 2 "Single-Task") is one run per task with
the run's tasks restricted to that one, e.g.::

    recsys-transfer train --config pipelines/adult-mtl.yaml --set model.name=single_task \\
        --set 'tasks=[{name: income}]' --output runs/adult-single-income

(a task named in ``tasks:`` takes the dataset's label of that name unless ``label`` says otherwise; its kind is
``binary`` unless ``kind`` says otherwise). Output: ``{task: logit [B]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.multitask import MultiTaskBase, check_widths
from recsys_transfer.modules.experts import Expert
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class SingleTask(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, expert_hidden: tuple[int, ...] = (128, 64),
                 tower_hidden: tuple[int, ...] = (), dropout: float = 0.0, batch_norm: bool = False,
                 init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, "single_task", embedding_dim, pooling, init_std, tasks)
        check_widths("single_task", expert_hidden=expert_hidden)
        self.experts = nn.ModuleList(Expert(self.input_dim, expert_hidden, dropout, batch_norm) for _ in self.tasks)
        self.towers = nn.ModuleList(MLP(expert_hidden[-1], tower_hidden, t.width, dropout, batch_norm)
                                    for t in self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)  # [B, n]
        return self.task_outputs([tower(expert(x)) for expert, tower in zip(self.experts, self.towers)])
