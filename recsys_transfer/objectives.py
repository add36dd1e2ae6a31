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
  which the train state checkpoints). A :class:`~recsys_transfer.types.FactoredScores` output (a full softmax
  not materialized) gets the same losses over its candidates, the softmax computed in chunks
  (:func:`factored_softmax_loss`).

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
from recsys_transfer.types import FactoredScores


#: rows of one chunk of :func:`factored_softmax_loss`: about this many logits (4 MiB of float32) at a time
CHUNK_LOGITS = 1 << 20


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    """``mean_m [logsumexp_s <q_m, c_s> - <q_m, c_{y_m}>]`` and its gradients, one chunk of rows at a time.

    Forward computes the loss AND both gradients chunk by chunk (``p = softmax(q_c C^T) - onehot(y)``;
    ``dq_c = p C``; ``dC += p^T q_c``), so the ``[M, S]`` logits, probabilities and their gradient never exist
    whole -- only ``[rows, S]`` of them, in cache; backward scales the saved ``[M, C]`` / ``[S, C]`` gradients by
    the incoming scalar. The same sums as ``cross_entropy(q @ C.T, y)`` (tests hold them equal in float64);
    measured on CPU (one thread, M 8,030, S 3,527, C 64, forward + backward): 2x faster than the unfused one."""

    @staticmethod
    def forward(ctx, query, candidates, positive):
        M, S = query.shape[0], candidates.shape[0]
        rows = max(1, min(M, CHUNK_LOGITS // max(S, 1)))
        grad_q = torch.empty_like(query)
        grad_c = torch.zeros_like(candidates)
        total = torch.zeros((), dtype=torch.float64, device=query.device)
        for start in range(0, M, rows):
            q, y = query[start:start + rows], positive[start:start + rows]
            logits = q @ candidates.t()  # [rows, S]
            top = logits.amax(dim=1, keepdim=True)  # [rows, 1]
            positive_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)  # [rows]
            p = logits.sub_(top).exp_()  # one exp pass, in place: exp(logit - max)
            norm = p.sum(dim=1, keepdim=True)  # [rows, 1]
            lse = top.squeeze(1) + norm.log().squeeze(1)  # logsumexp
            total += (lse - positive_logit).sum(dtype=torch.float64)
            p.div_(norm)  # softmax
            p[torch.arange(len(y), device=p.device), y] -= 1  # - onehot(y)
            torch.mm(p, candidates, out=grad_q[start:start + rows])
            grad_c.addmm_(p.t(), q)
        ctx.save_for_backward(grad_q.div_(M), grad_c.div_(M))
        return (total / M).to(query.dtype)

    @staticmethod
    def backward(ctx, grad):
        grad_q, grad_c = ctx.saved_tensors
        return grad * grad_q, grad * grad_c, None


def factored_softmax_loss(task: TaskSpec, scores: FactoredScores) -> torch.Tensor:
    """The loss of a retrieval task on :class:`FactoredScores`: ``softmax`` = the full softmax cross entropy over
    the candidates (chunked, :class:`_ChunkedSoftmaxCrossEntropy`); ``bpr`` = ``mean_m softplus(s_m,y- -
    s_m,y)`` with one other candidate ``y-`` per row drawn uniformly (as the full-candidate BPR below)."""
    q, c, y = scores.query, scores.candidates, scores.positive.long()
    if len(y) == 0:
        return q.sum() * 0.0
    if task.loss == "bpr":
        shift = torch.randint(1, c.shape[0], y.shape, device=q.device)
        neg = (y + shift) % c.shape[0]
        return F.softplus((q * c[neg]).sum(1) - (q * c[y]).sum(1)).mean()
    return _ChunkedSoftmaxCrossEntropy.apply(q, c, y)


def task_loss(task: TaskSpec, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The loss of one task kind (module docstring), a scalar."""
    if isinstance(output, FactoredScores):
        return factored_softmax_loss(task, output)
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
