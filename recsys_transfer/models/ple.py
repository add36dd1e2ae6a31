"""PLE: Progressive Layered Extraction, and CGC: Customized Gate Control (Tang, Liu, Zhao, Gong; RecSys 2020).

CGC, one block of :class:`recsys_transfer.modules.experts.CGC`::

    g^k(x)   = softmax(W_gk x)  over [E_k ; E_s]                          task k's and the shared experts
    f^k(x)   = sum_e g^k(x)_e [E_k ; E_s](x)_e
    logit_k  = t^k(f^k(x))                                                (per-task tower)

PLE stacks ``num_levels`` extraction levels: level j's task-k experts read task k's output of level j-1,
its shared experts read the shared output of level j-1 (the gate over ALL experts of that level), and the
towers read the last level's task outputs (the last level has no shared gate). ``cgc`` is PLE with one level.

Defaults (modest; the paper's Ali-CCP comparison in the FDN paper uses 8 experts for CGC, 2 levels and 16 experts
for PLE): ``specific_experts 2`` per task and ``shared_experts 2`` per level, experts ``(128, 64)`` (as MMoE's
here), linear gates, towers ``(64,)``, ``num_levels 2`` for PLE, ``embedding_dim 16``. Departure: every level's
experts have the same ``expert_hidden`` layers (the paper does not say otherwise). Output: ``{task: logit [B]}``.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.multitask import MultiTaskBase, check_widths
from recsys_transfer.modules.experts import CGC as CGCBlock
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class PLE(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, num_levels: int = 2, specific_experts: int = 2,
                 shared_experts: int = 2, expert_hidden: tuple[int, ...] = (128, 64),
                 gate_hidden: tuple[int, ...] = (), tower_hidden: tuple[int, ...] = (64,), dropout: float = 0.0,
                 batch_norm: bool = False, init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None, _name: str = "ple") -> None:
        super().__init__(meta, _name, embedding_dim, pooling, init_std, tasks)
        check_widths(_name, num_levels=num_levels, expert_hidden=expert_hidden,
                     experts_per_gate=specific_experts + shared_experts)
        if specific_experts < 0 or shared_experts < 0:
            raise UserError(f"{_name}: specific_experts and shared_experts must be >= 0, got {specific_experts}, "
                            f"{shared_experts}")
        dims = [self.input_dim] + [expert_hidden[-1]] * num_levels
        self.levels = nn.ModuleList(
            CGCBlock(dims[j], len(self.tasks), specific_experts, shared_experts, expert_hidden,
                     shared_gate=j < num_levels - 1, gate_hidden=gate_hidden, dropout=dropout, batch_norm=batch_norm)
            for j in range(num_levels))
        self.towers = nn.ModuleList(MLP(dims[-1], tower_hidden, t.width, dropout, batch_norm) for t in self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)  # [B, n]
        task_h, shared_h = [x] * len(self.tasks), x
        for level in self.levels:
            task_h, shared_h = level(task_h, shared_h)  # T x [B, d], [B, d] (None after the last level)
        return self.task_outputs([tower(h) for tower, h in zip(self.towers, task_h)])


class CGC(PLE):
    """CGC: PLE with one extraction level (module docstring); defaults as PLE's."""

    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, specific_experts: int = 2, shared_experts: int = 2,
                 expert_hidden: tuple[int, ...] = (128, 64), gate_hidden: tuple[int, ...] = (),
                 tower_hidden: tuple[int, ...] = (64,), dropout: float = 0.0, batch_norm: bool = False,
                 init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, embedding_dim, 1, specific_experts, shared_experts, expert_hidden, gate_hidden,
                         tower_hidden, dropout, batch_norm, init_std, pooling, tasks, _name="cgc")
