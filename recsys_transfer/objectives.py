"""Training objectives: one loss per task kind (:mod:`recsys_transfer.tasks`) and the model-specific terms.

``l_main = sum_k weight_k * loss_k(output_k, label_k) + sum_j aux_weight_j * term_j(aux_j)``

* ``binary``: ``BCE-with-logits(logit [B], y [B])`` (mean over rows);
* ``regression``: ``MSE(pred [B], y [B])``;
* ``multiclass``: ``cross_entropy(logits [B, C], class ids [B])``;
* ``retrieval`` with sampled candidates (``scores [B, 1 + N]``, positive first): ``softmax`` is the sampled
  softmax ``cross_entropy(scores, 0)`` (no log-Q correction: a model that samples non-uniformly subtracts
  ``log q`` from its scores itself); ``bpr`` is ``mean_{b, j} softplus(s_bj - s_b0)`` over the N negatives
  (Rendle et al. 2009, Eq. 4, without the regularizer); with full candidates (``scores [B, num_items]``, label =
  the positive item id): the full softmax ``cross_entropy(scores, item id)``, or ``bpr``
  ``mean_b softplus(s_b,y- - s_b,y)`` with one negative label ``y-`` per row drawn uniformly from the other
  ``C - 1`` items (PeterRec Eq. 8: "a false label randomly sampled from Y \\ y"; from torch's global generator,
  which the train state checkpoints).

Model-specific terms: a model may return, next to its task outputs, auxiliary outputs keyed by a term name
(:class:`recsys_transfer.types.ModelOutput`); the term named by the key's part before ``/`` turns the value into a
loss (:data:`AUX_TERMS`), weighted by ``train.aux_weights[key]`` (default 1):

* ``penalty``: the value is a scalar the model derives from its own structure (e.g. an orthogonality measure);
  the term is the value itself;
* ``heads``: the value maps task names to auxiliary predictions of that task (a tensor, or a list of tensors,
  each shaped like the task's output); the term is the mean over them of the task's own loss (FDN's L_aux).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec


def task_loss(task: TaskSpec, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The loss of one task kind (module docstring), a scalar."""
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(output, label.to(output.dtype))
    if task.kind == "regression":
        return F.mse_loss(output, label.to(output.dtype))
    if task.kind == "multiclass":
        return F.cross_entropy(output, label.long())
    if task.candidates == "full":
        if task.loss == "bpr":  # PeterRec Eq. 8: y- uniform over Y \ y, one per row (Rendle et al. 2009)
            y = label.long()
            shift = torch.randint(1, output.shape[1], y.shape, device=output.device)
            neg = (y + shift) % output.shape[1]  # uniform over the other C - 1 labels
            pair = output.gather(1, torch.stack([y, neg], 1))
            return F.softplus(pair[:, 1] - pair[:, 0]).mean()
        return F.cross_entropy(output, label.long())
    if task.loss == "bpr":
        return F.softplus(output[:, 1:] - output[:, :1]).mean()
    return F.cross_entropy(output, torch.zeros(len(output), dtype=torch.long, device=output.device))


def _penalty(value, batch, tasks: Mapping[str, TaskSpec]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise UserError("a 'penalty' auxiliary output must be a scalar tensor")
    return value


def _heads(value, batch, tasks: Mapping[str, TaskSpec]) -> torch.Tensor:
    terms = []
    for name, outputs in value.items():
        task = tasks.get(name)
        if task is None:
            raise UserError(f"a 'heads' auxiliary output names task {name!r}; tasks: {sorted(tasks)}")
        for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
            terms.append(task_loss(task, out, batch.labels[task.label]))
    return torch.stack(terms).mean()


#: term name -> ``term(value, batch, tasks) -> scalar loss``
AUX_TERMS: dict[str, Callable] = {"penalty": _penalty, "heads": _heads}


class Objective:
    """The weighted task losses plus the model's auxiliary terms (module docstring)."""

    def __init__(self, tasks: tuple[TaskSpec, ...] | list[TaskSpec], aux_weights: Mapping[str, float] | None = None):
        self.tasks = tuple(tasks)
        self.by_name = {t.name: t for t in self.tasks}
        self.aux_weights = dict(aux_weights or {})

    def losses(self, outputs: Mapping[str, torch.Tensor], aux: Mapping[str, object], batch) -> dict[str, torch.Tensor]:
        """Unweighted loss per task (key = task name) and per auxiliary term (key = ``aux/<name>``)."""
        out = {}
        for task in self.tasks:
            if task.name not in outputs:
                raise UserError(f"the model gave no output for task {task.name!r} (outputs: {sorted(outputs)})")
            out[task.name] = task_loss(task, outputs[task.name], batch.labels[task.label])
        for key, value in aux.items():
            term = AUX_TERMS.get(key.split("/", 1)[0])
            if term is None:
                raise UserError(f"auxiliary output {key!r}: no loss term named {key.split('/', 1)[0]!r}; terms: "
                                f"{sorted(AUX_TERMS)}")
            out[f"aux/{key}"] = term(value, batch, self.by_name)
        return out

    def weight(self, key: str) -> float:
        if key.startswith("aux/"):
            return float(self.aux_weights.get(key[4:], 1.0))
        return self.by_name[key].weight

    def total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_k weight_k * losses[k]`` (a weight of 1 multiplies nothing, so one task gives its loss itself)."""
        total = None
        for key, value in losses.items():
            w = self.weight(key)
            term = value if w == 1.0 else value * w
            total = term if total is None else total + term
        return total

    def weighted(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss times its weight (one backward each, for per-task row gradients)."""
        return {k: (v if self.weight(k) == 1.0 else v * self.weight(k)) for k, v in losses.items()}
