"""FDN: Feature Decomposition Network (Zhou, Yu, Luo, Zhang, Beihang University: "Feature Decomposition for Reducing
Negative Transfer: A Novel Multi-task Learning Method for Recommender System"; equations and tables numbered as in
that paper).

Each task k has M decomposition pairs (DCPs); pair (k, m) is a task-specific expert ``f^p_km`` and a task-shared
expert ``f^s_km``, both feed-forward experts like MMoE's ("the expert of DCP is designed to be feed-forward network
the same as that of MMOE"; :class:`recsys_transfer.modules.experts.Expert`) on the shared input x
(models/multitask.py)::

    f_k^MTL(x) = sigma(g_k(f^p(x), f^s(x)))                                        (Eq. 1)
    logit_k    = w_k^T g_k + b_k     g_k = concatenation (the paper's fusion), one prediction layer per task,
                                     no tower networks (the paper: "we did not use the tower network")
    L_orth     = sum_k sum_m || (f^s_km)^T f^p_km ||_F^2                               (Eq. 2)
    L_aux      = sum_k sum_m L_k(yhat^k_m, y^k),  yhat^k_m = sigma(h_km(f^p_km(x)))     (Eq. 3-4)
    L          = L_task + L_orth + L_aux

Which shared features task k fuses (the paper is terse). Eq. 2 indexes the shared experts per task ("f^s_m ... the
m-th task-shared expert of task k"), so each task owns M shared experts, one per pair. What makes them *shared* is
the "Task-shared Feature Fusion Constraint": "these task-shared experts of different DCPs can be treated as a fusion
model ... which will induce the model to further learn task-shared features", and f^s "extracts features that are
potentially shared by all the tasks". Experts read by one task only would have no reason to hold what the tasks
share, so we read it as: **every task fuses the task-shared features of ALL the DCPs (of every task) and its own
task-specific features**::

    g_k = [f^p_k1; ...; f^p_kM; f^s_11; ...; f^s_1M; ...; f^s_K1; ...; f^s_KM]      width (M + K M) d

The ablation "FDN (without task-shared feature)" (Table 3) removes that fusion constraint: with ``shared=False``
task k fuses only its own pairs, ``g_k = [f^p_k1..f^p_kM; f^s_k1..f^s_kM]`` (width 2 M d); the pairs, L_orth and
L_aux stay, so the three ablations switch off one component each, as the paper's Table 3 does. (The other reading,
dropping the shared experts altogether, would also drop L_orth and so mix two ablations.) ``orth=False``: no L_orth;
``aux=False``: no auxiliary heads (and no their parameters).

Losses, as auxiliary outputs (:class:`recsys_transfer.types.ModelOutput`, read by
:mod:`recsys_transfer.objectives`; weights from ``train.aux_weights``, default 1):

* ``penalty/orth``: ``sum_{k,m} || (f^s_km)^T f^p_km / B ||_F^2`` over the batch's rows (``f`` are ``[B, d]``
  matrices, rows = examples, as in the Domain Separation Networks loss Eq. 2 cites). **Normalisation**: Eq. 2 has
  none, so its value grows as B^2 with the batch size (at B = 512 and 64 ReLU units it starts around 1e6-1e7 and
  swamps the task loss); we divide the cross-product by B, making it the squared Frobenius norm of the batch
  estimate of E[f^s f^p^T], independent of B. Eq. 2 literally is ``aux_weights: {penalty/orth: B^2}``.
* ``heads/aux``: ``{task k: [h_k1(f^p_k1), ..., h_kM(f^p_kM)]}``, one linear head per task-specific expert (the
  paper's "aux" boxes: a single-task prediction from the expert's feature, trained with the task's own loss and
  labels). The objective averages the K M losses: L_aux / (K M); Eq. 3's plain sum is
  ``aux_weights: {heads/aux: K*M}``.

Auxiliary outputs are computed in training mode only (evaluation reads the task outputs). Defaults: ``num_pairs 2``
(the paper's Ali-CCP setting, "2 DCPs for each task"; its synthetic setting is 4), experts ``(128, 64)`` (the paper's
synthetic setting: "two fully-connected layers (128 units and 64 units)"), ``embedding_dim 16`` (the paper: 32 on
the synthetic data). Works for binary, regression (the paper's synthetic tasks, MSE) and multiclass tasks.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.multitask import MultiTaskBase, check_widths
from recsys_transfer.modules.experts import Expert
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch, ModelOutput


def orthogonality(shared: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
    """``sum_n || shared[:, n]^T specific[:, n] / B ||_F^2`` for ``[B, N, d]`` feature stacks (N pairs): L_orth
    divided by B^2 (module docstring)."""
    B = shared.shape[0]
    cross = torch.einsum("bnd,bne->nde", shared, specific) / B  # [N, d, d]: per pair (f^s)^T f^p / B
    return cross.square().sum()


class FDN(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, num_pairs: int = 2,
                 expert_hidden: tuple[int, ...] = (128, 64), orth: bool = True, aux: bool = True, shared: bool = True,
                 dropout: float = 0.0, batch_norm: bool = False, init_std: float = 1e-2,
                 pooling: dict[str, str] | None = None, tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, "fdn", embedding_dim, pooling, init_std, tasks)
        check_widths("fdn", num_pairs=num_pairs, expert_hidden=expert_hidden)
        K, M, d = len(self.tasks), num_pairs, expert_hidden[-1]
        self.num_pairs, self.orth, self.aux, self.shared = M, orth, aux, shared

        def experts() -> nn.ModuleList:  # K * M experts, pair (k, m) at k * M + m
            return nn.ModuleList(Expert(self.input_dim, expert_hidden, dropout, batch_norm) for _ in range(K * M))

        self.specific = experts()  # f^p_km
        self.shared_experts = experts()  # f^s_km
        fused = (M + K * M) * d if shared else 2 * M * d
        self.predict = self.output_layers(fused)  # one prediction layer per task, no towers
        self.aux_heads = (nn.ModuleList(nn.Linear(d, self.tasks[k].width) for k in range(K) for _ in range(M))
                          if aux else None)

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.inputs(batch)  # [B, n]
        B, K, M = x.shape[0], len(self.tasks), self.num_pairs
        p = torch.stack([f(x) for f in self.specific], dim=1)  # [B, K*M, d]
        s = torch.stack([f(x) for f in self.shared_experts], dim=1)  # [B, K*M, d]
        p_task = p.view(B, K, -1)  # [B, K, M*d]: task k's specific features, pairs in order
        s_task = s.view(B, K, -1)  # [B, K, M*d]
        s_all = s.reshape(B, -1)  # [B, K*M*d]: every pair's shared features
        logits = []
        for k, layer in enumerate(self.predict):
            g = torch.cat([p_task[:, k], s_all if self.shared else s_task[:, k]], dim=1)  # [B, (M + K*M) d | 2 M d]
            logits.append(layer(g))  # [B, width_k]
        out = ModelOutput(self.task_outputs(logits))
        if not self.training:
            return out
        if self.orth:
            out.aux["penalty/orth"] = orthogonality(s, p)
        if self.aux_heads is not None:
            heads = [head(p[:, j]) for j, head in enumerate(self.aux_heads)]  # K*M x [B, width_k]
            out.aux["heads/aux"] = {t.name: [h.squeeze(1) if t.width == 1 else h for h in heads[k * M:(k + 1) * M]]
                                    for k, t in enumerate(self.tasks)}
        return out
