"""MMoE: Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong, Chi; KDD 2018).

    f_e(x)   e = 1..E feed-forward experts on the shared input x (models/multitask.py)
    g^k(x)   = softmax(W_gk x)                                    one gate per task
    f^k(x)   = sum_e g^k(x)_e f_e(x)
    logit_k  = h^k(f^k(x))                                        per-task tower, before the sigmoid

Defaults: ``num_experts 8`` (FuxiCTR's default; the FDN paper's MMoE), experts ``(128, 64)`` (the FDN paper's
experts: "two fully-connected layers (128 units and 64 units)"; FuxiCTR's default [512, 256, 128] is ~25x the dense
parameters), linear gates (``gate_hidden ()``, the paper's gate; FuxiCTR uses [128, 64]), towers
``(64,)`` (FuxiCTR [128, 64]), ``embedding_dim 16``. Output: ``{task: logit [B]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.multitask import MultiTaskBase, check_widths
from recsys_transfer.modules.experts import Experts, Gate, mix
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class MMoE(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, num_experts: int = 8,
                 expert_hidden: tuple[int, ...] = (128, 64), gate_hidden: tuple[int, ...] = (),
                 tower_hidden: tuple[int, ...] = (64,), dropout: float = 0.0, batch_norm: bool = False,
                 init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, "mmoe", embedding_dim, pooling, init_std, tasks)
        check_widths("mmoe", num_experts=num_experts, expert_hidden=expert_hidden)
        self.experts = Experts(num_experts, self.input_dim, expert_hidden, dropout, batch_norm)
        self.gates = nn.ModuleList(Gate(self.input_dim, num_experts, gate_hidden) for _ in self.tasks)
        self.towers = nn.ModuleList(MLP(self.experts.out_dim, tower_hidden, t.width, dropout, batch_norm)
                                    for t in self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)  # [B, n]
        experts = self.experts(x)  # [B, E, d]
        mixed = [mix(gate(x), experts) for gate in self.gates]  # T x ([B, E] @ [B, E, d] -> [B, d])
        return self.task_outputs([tower(h) for tower, h in zip(self.towers, mixed)])
