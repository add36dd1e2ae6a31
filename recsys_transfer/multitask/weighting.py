"""Loss weighting: how the task losses ``l_k`` of one step become the training objective.

* ``equal``: ``sum_k w_k l_k`` with each task's own weight (``tasks[].weight``, default 1: the plain sum) -- exactly
  :meth:`recsys_transfer.objectives.Objective.total`, the arithmetic of a run without a ``multitask`` section;
* ``fixed``: ``sum_k v_k l_k`` with ``v_k = multitask.weights[k]`` (a task not listed keeps its own weight);
* ``uncertainty`` (Kendall, Gal and Cipolla, CVPR 2018): one learnable log-variance ``s_k = log sigma_k^2`` per
  task, a dense parameter (trained by the dense optimizer, at 0 to start, checkpointed with the train state):

  - regression (a Gaussian likelihood, the paper's Eq. 7): ``1/(2 sigma^2) l_k + log sigma = 1/2 exp(-s_k) l_k +
    1/2 s_k``;
  - binary, multiclass, retrieval (a softmax likelihood, Eq. 10 with the approximation of Eq. 12, applied to the
    sigmoid of a binary task as to a 2-class softmax): ``1/sigma^2 l_k + log sigma = exp(-s_k) l_k + 1/2 s_k``.

  The task's own weight multiplies ``l_k`` first. The log-variance form (``s = log sigma^2``, not ``sigma``) is the
  paper's Sec. 3.2 advice for numerical stability.

A weighting returns the per-task data terms (``exp(-s_k) l_k``: what reaches the model, the terms of the one
backward per task) and, apart, the regularizer ``sum_k 1/2 s_k`` (reaches only the ``s_k``). ``l_main`` -- the
value the barrier's ``phi_i`` uses (:mod:`recsys_transfer.transfer.barrier`) -- is the sum of the data terms: the
loss whose gradient with respect to the rows is ``g_main``. Model terms (``aux/...``) keep their
``train.aux_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from recsys_transfer.config import WEIGHTINGS
from recsys_transfer.objectives import Objective


class Weighting:
    """Equal weighting: the objective's own weights (module docstring)."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def terms(self, losses: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(the weighted term of every task and model term, the regularizer or None)."""
        return self.objective.weighted(losses), None

    def parameters(self) -> dict[str, nn.Parameter]:
        """Learnable weights, by the name the train state saves them under (none here)."""
        return {}

    def stats(self) -> dict[str, float]:
        return {}


class FixedWeighting(Weighting):
    """``v_k l_k`` with ``weights[k]`` for the tasks it names, the task's own weight otherwise."""

    def __init__(self, objective: Objective, weights: Mapping[str, float]) -> None:
        super().__init__(objective)
        unknown = sorted(set(weights) - set(objective.by_name))
        if unknown:
            raise ValueError(f"multitask.weights names unknown task(s) {unknown}; tasks: {sorted(objective.by_name)}")
        self.weights = {k: float(v) for k, v in weights.items()}

    def terms(self, losses):
        out = {}
        for key, value in losses.items():
            w = self.weights.get(key, self.objective.weight(key))
            out[key] = value if w == 1.0 else value * w
        return out, None


class UncertaintyWeighting(Weighting):
    """Kendall et al.'s homoscedastic uncertainty weighting (module docstring); ``log_vars[k]``: ``s_k``."""

    def __init__(self, objective: Objective, device: torch.device | str | None = None) -> None:
        super().__init__(objective)
        self.names = [t.name for t in objective.tasks]
        self.log_vars = nn.Parameter(torch.zeros(len(self.names), device=device))
        # 1/2 for a Gaussian likelihood (regression), 1 for a softmax likelihood
        self.scale = torch.tensor([0.5 if t.kind == "regression" else 1.0 for t in objective.tasks], device=device)

    def terms(self, losses):
        out = {}
        s = self.log_vars
        scale = self.scale.to(device=s.device, dtype=s.dtype)
        for k, name in enumerate(self.names):
            value = losses[name] * self.objective.weight(name)
            out[name] = scale[k] * torch.exp(-s[k]).to(value.dtype) * value
        for key, value in losses.items():
            if key not in out:  # model terms
                w = self.objective.weight(key)
                out[key] = value if w == 1.0 else value * w
        return out, 0.5 * s.sum()

    def parameters(self) -> dict[str, nn.Parameter]:
        return {"multitask.log_vars": self.log_vars}

    def stats(self) -> dict[str, float]:
        return {f"log_var/{n}": float(v) for n, v in zip(self.names, self.log_vars.detach().tolist())}


def make_weighting(name: str, objective: Objective, weights: Mapping[str, float] | None = None,
                   device: torch.device | str | None = None) -> Weighting:
    """The weighting ``name`` (:data:`WEIGHTINGS`) of ``objective``'s tasks."""
    if name == "equal":
        return Weighting(objective)
    if name == "fixed":
        return FixedWeighting(objective, weights or {})
    if name == "uncertainty":
        return UncertaintyWeighting(objective, device)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {name!r}")


__all__ = ["FixedWeighting", "UncertaintyWeighting", "WEIGHTINGS", "Weighting", "make_weighting"]
