"""ESMM: Entire Space Multi-task Model (Ma, Zhao, Huang, Wang, Hu, Zhu, Gai; SIGIR 2018).

    pCTR    = sigmoid(a),  a = CTR_tower(x)              x: the shared input (the paper's shared embeddings)
    pCVR    = sigmoid(b),  b = CVR_tower(x)              p(conversion | click, x), never supervised directly
    pCTCVR  = pCTR * pCVR
    L       = BCE(pCTR, click) + BCE(pCTCVR, click & conversion), over ALL impressions

Tasks: exactly two binary tasks, the CTR task and the CTCVR task (``ctr_task`` / ``ctcvr_task``; default the
first and the second of the run's tasks). On Ali-CCP's layout (pipelines/datasets/ali-ccp.yaml) they are ``click``
(ctr = click) and ``purchase`` (ctcvr = purchase: 1 only on clicked rows, i.e. click AND conversion over the entire
space), the dataset's tasks in that order, so the defaults fit.

Output: logits, since the objectives train binary tasks with BCE-with-logits. The CTR task gets ``a``; the CTCVR
task gets ``logit(pCTR * pCVR)``. With ``p = sigmoid(a) sigmoid(b)``, ``1 - p = (e^-a + e^-b + e^-(a+b)) / ((1 +
e^-a)(1 + e^-b))``, so exactly::

    logit(pCTR * pCVR) = -logsumexp(-a, -b, -(a + b))

finite and accurate for any finite logits (forming the product first loses ``1 - p`` to rounding once p nears 1, and
its log to underflow once p nears 0); ``sigmoid(output) = pCTR * pCVR`` to rounding (tested). :meth:`parts` gives
``(a, b)`` for anyone who wants pCVR itself (e.g. CVR AUC over clicked rows); the model's outputs are only the two
trained tasks.

Towers: two MLPs ``tower_hidden`` wide over the shared input (the paper's CVR and CTR networks share the embedding
layer only); defaults ``(128, 64)`` (torch-rechub's ESMM uses [360, 200, 80] towers), ``embedding_dim 16``.
"""

from __future__ import annotations

import torch

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.multitask import MultiTaskBase
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b)) = -logsumexp(-a, -b, -(a + b))`` (module docstring)."""
    return -torch.logsumexp(torch.stack([-a, -b, -(a + b)]), dim=0)  # [3, B] -> [B]


class ESMM(MultiTaskBase):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, tower_hidden: tuple[int, ...] = (128, 64),
                 dropout: float = 0.0, batch_norm: bool = False, init_std: float = 1e-2, ctr_task: str = "",
                 ctcvr_task: str = "", pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, "esmm", embedding_dim, pooling, init_std, tasks)
        names = [t.name for t in self.tasks]
        if len(self.tasks) != 2 or any(t.kind != "binary" for t in self.tasks):
            raise UserError(f"esmm takes exactly two binary tasks (CTR and CTCVR), got "
                            f"{[(t.name, t.kind) for t in self.tasks]}")
        self.ctr_task = ctr_task or names[0]
        self.ctcvr_task = ctcvr_task or next(n for n in names if n != self.ctr_task)
        if sorted([self.ctr_task, self.ctcvr_task]) != sorted(names):
            raise UserError(f"esmm: ctr_task {self.ctr_task!r} and ctcvr_task {self.ctcvr_task!r} must name the two "
                            f"tasks {names}")
        self.ctr = MLP(self.input_dim, tower_hidden, 1, dropout, batch_norm)
        self.cvr = MLP(self.input_dim, tower_hidden, 1, dropout, batch_norm)

    def parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(CTR logit a [B], CVR logit b [B])``: pCTR = sigmoid(a), pCVR = sigmoid(b)."""
        x = self.inputs(batch)  # [B, n]
        return self.ctr(x).squeeze(1), self.cvr(x).squeeze(1)  # [B, 1] -> [B]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        a, b = self.parts(batch)
        return {self.ctr_task: a, self.ctcvr_task: product_logit(a, b)}
