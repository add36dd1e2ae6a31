"""Predict and evaluate: the public functions the trainer, the bench runner and users call.

    preds = predict(model, loader, tasks, fields=("zip",))          # gathered over ranks under torchrun
    metrics = evaluate(model, loader, tasks, meta, transfer_field="zip", group_field="user_id")
    metrics["label"]["auc"], metrics["label"]["tail_auc"]

What is kept per row and task (CPU numpy, float64): ``binary`` the probability ``sigmoid(logit)``; ``regression``
the prediction; ``multiclass`` the predicted class (argmax); ``retrieval`` the positive item's rank (1-based, ties
pessimistic: ``1 + #candidates scoring >= the positive``, as :mod:`recsys_transfer.metrics.ranking`) among the
sampled candidates (positive in column 0) or among all items (full candidates; label = the positive's id), so a
full score matrix is never stored. Metrics per kind (:func:`task_metrics`): binary AUC, log loss, normalized
entropy, calibration, and with a group field the group AUC, with the transfer field the AUC on rows whose item
is a head (source) or a tail item; regression MSE, MAE, RMSE; multiclass accuracy and macro-F1; retrieval HR,
MRR and NDCG at 5 and 10 (candidates: the task's ``eval_candidates``), and with ``eval_negatives`` the same metrics
prefixed ``sampled_`` ranking the positive among the row's fixed negative ids only (from the full scores). An undefined metric (no rows, one class, non-finite predictions) is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.metrics import classification, multiclass, ranking, regression
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import split_output

RANKING_KS = (5, 10)

#: the metrics :func:`task_metrics` reports per task kind (besides row counts); the monitor may name these
TASK_METRICS = {
    "binary": ("auc", "logloss", "ne", "calibration", "gauc", "head_auc", "tail_auc"),
    "regression": ("mse", "mae", "rmse"),
    "multiclass": ("accuracy", "macro_f1"),
    "retrieval": tuple(f"{m}@{k}" for k in RANKING_KS for m in ("hr", "mrr", "ndcg")),
}
#: with ``eval_negatives`` a retrieval task also reports the ranking metrics among those ids only
SAMPLED_RANKING_METRICS = tuple(f"sampled_{m}" for m in TASK_METRICS["retrieval"])


@dataclass
class TaskPredictions:
    """``labels`` [n] (label column values), ``values`` [n] (see the module docstring), ``nonfinite``: rows whose
    output was NaN or infinite (their metrics are then None)."""

    labels: np.ndarray
    values: np.ndarray
    nonfinite: int = 0
    sampled_ranks: np.ndarray | None = None  # retrieval with eval_negatives: rank among those ids only


@dataclass
class Predictions:
    tasks: dict[str, TaskPredictions]
    fields: dict[str, np.ndarray] = field(default_factory=dict)  # ids of the requested (single-valued) fields

    @property
    def rows(self) -> int:
        first = next(iter(self.tasks.values()), None)
        return 0 if first is None else len(first.labels)


def _rank_values(task: TaskSpec, out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    if task.eval_candidates == "sampled":
        return 1 + (out[:, 1:] >= out[:, :1]).sum(1)
    pos = out.gather(1, label.long().unsqueeze(1))
    return (out >= pos).sum(1)  # the positive counts itself once: 1 + #other items scoring >= it


def _sampled_ranks(out: torch.Tensor, label: torch.Tensor, negatives) -> torch.Tensor:
    """Rank of the positive (``label``, an id) among the row's fixed negative ids (a JaggedTensor of ``negatives``)
    only, from full scores ``out [B, C]``: ``1 + #{negatives of the row scoring >= the positive}``."""
    lengths = negatives.lengths().to(out.device)
    ids = negatives.values().to(out.device).long()
    row = torch.repeat_interleave(torch.arange(len(out), device=out.device), lengths)
    pos = out.gather(1, label.long().unsqueeze(1)).squeeze(1)  # [B]
    beats = (out[row, ids] >= pos[row]).long()  # [sum lengths]
    return 1 + torch.zeros(len(out), dtype=torch.long, device=out.device).index_add_(0, row, beats)


def _task_values(task: TaskSpec, out: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row value to keep, per-row finiteness) of one task's output."""
    finite = torch.isfinite(out) if out.dim() == 1 else torch.isfinite(out).all(1)
    if task.kind == "binary":
        return torch.sigmoid(out.double()), finite
    if task.kind == "regression":
        return out.double(), finite
    if task.kind == "multiclass":
        return out.argmax(1).double(), finite
    return _rank_values(task, out, label.to(out.device)).double(), finite


def _gather(arrays: list[np.ndarray]) -> list[np.ndarray]:
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, arrays)
    return [np.concatenate([g[k] for g in got]) for k in range(len(arrays))]


@torch.no_grad()
def predict(model: nn.Module, loader, tasks: tuple[TaskSpec, ...] | list[TaskSpec], fields: tuple[str, ...] = (),
            device: torch.device | None = None) -> Predictions:
    """Every row of ``loader`` (all ranks' rows, gathered, rank order), per task (module docstring), plus the ids
    of ``fields``. Batches are moved to ``device`` (non-blocking; labels and ids are read from the CPU batch)."""
    model.eval()
    move = device is not None and torch.device(device).type != "cpu"
    labels: dict[str, list] = {t.name: [] for t in tasks}
    values: dict[str, list] = {t.name: [] for t in tasks}
    finite: dict[str, list] = {t.name: [] for t in tasks}
    sampled: dict[str, list] = {t.name: [] for t in tasks if t.eval_negatives}
    ids: dict[str, list] = {f: [] for f in fields}
    for batch in loader:
        outputs, _ = split_output(model(batch.to(device, non_blocking=True) if move else batch))
        for t in tasks:
            label = batch.labels[t.label]
            v, ok = _task_values(t, outputs[t.name], label)
            values[t.name].append(v.cpu().numpy())
            finite[t.name].append(ok.cpu().numpy())
            labels[t.name].append(label.numpy().astype(np.float64))
            if t.eval_negatives:
                negatives = batch.sparse[t.eval_negatives]
                sampled[t.name].append(_sampled_ranks(outputs[t.name], label.to(v.device), negatives).cpu().numpy())
        for f in fields:
            ids[f].append(batch.sparse[f].values().numpy())
    flat: list[np.ndarray] = []
    for t in tasks:
        for parts, dtype in ((labels[t.name], np.float64), (values[t.name], np.float64), (finite[t.name], bool)):
            flat.append(np.concatenate(parts) if parts else np.zeros(0, dtype))
    for f in fields:
        flat.append(np.concatenate(ids[f]) if ids[f] else np.zeros(0, np.int64))
    for name, parts in sampled.items():
        flat.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    flat = _gather(flat)
    out = {}
    for k, t in enumerate(tasks):
        y, v, ok = flat[3 * k : 3 * k + 3]
        out[t.name] = TaskPredictions(y, np.where(ok, v, np.nan), int((~ok).sum()))
    after = 3 * len(tasks) + len(fields)
    for j, name in enumerate(sampled):
        out[name].sampled_ranks = flat[after + j].astype(np.int64)
    return Predictions(out, {f: flat[3 * len(tasks) + j].astype(np.int64) for j, f in enumerate(fields)})


def task_metrics(task: TaskSpec, pred: TaskPredictions, groups: np.ndarray | None = None,
                 head: np.ndarray | None = None) -> dict:
    """The metrics of one task's predictions (module docstring). ``groups``: group id per row (binary: group AUC);
    ``head``: bool per row, True when the row's transfer-field item is a head item (binary: head/tail AUC)."""
    y, v = pred.labels, pred.values
    out: dict = {"rows": int(len(y))}
    if pred.nonfinite:
        out["nonfinite_predictions"] = pred.nonfinite
    ok = pred.nonfinite == 0
    if task.kind == "binary":
        out.update(positives=int((y == 1).sum()),
                   auc=classification.auc(y, v) if ok else None,
                   logloss=classification.logloss(y, v) if ok else None,
                   ne=classification.normalized_entropy(y, v) if ok else None,
                   calibration=classification.calibration(y, v) if ok else None)
        if groups is not None:
            out["gauc"] = classification.group_auc(y, v, groups) if ok else None
        if head is not None:
            out.update(head_auc=classification.auc(y[head], v[head]) if ok else None,
                       tail_auc=classification.auc(y[~head], v[~head]) if ok else None,
                       head_rows=int(head.sum()), tail_rows=int((~head).sum()))
    elif task.kind == "regression":
        out.update(mse=regression.mse(y, v) if ok else None, mae=regression.mae(y, v) if ok else None,
                   rmse=regression.rmse(y, v) if ok else None)
    elif task.kind == "multiclass":
        cls = v.astype(np.int64) if ok else v
        out.update(accuracy=multiclass.accuracy(y.astype(np.int64), cls) if ok else None,
                   macro_f1=multiclass.macro_f1(y.astype(np.int64), cls, task.num_classes) if ok else None)
    else:
        metrics = ranking.ranking_metrics(v.astype(np.int64) if ok else np.zeros(0, np.int64), RANKING_KS)
        out.update({k: (m if ok else None) for k, m in metrics.items()})
        if pred.sampled_ranks is not None:
            metrics = ranking.ranking_metrics(pred.sampled_ranks if ok else np.zeros(0, np.int64), RANKING_KS)
            out.update({f"sampled_{k}": (m if ok else None) for k, m in metrics.items()})
    return out


def evaluate(model: nn.Module, loader, tasks: tuple[TaskSpec, ...] | list[TaskSpec], meta=None, *,
             transfer_field: str | None = None, group_field: str | None = None,
             device: torch.device | None = None) -> dict[str, dict]:
    """``{task: metrics}`` over every row of ``loader`` (module docstring). ``transfer_field``: head/tail AUC of
    binary tasks on rows whose item of that field is a head (source) or tail item (``meta`` gives the head ids);
    ``group_field``: group AUC over that field's ids."""
    fields = tuple(f for f in (transfer_field, group_field) if f is not None)
    preds = predict(model, loader, tasks, tuple(dict.fromkeys(fields)), device)
    return metrics_of(preds, tasks, meta, transfer_field=transfer_field, group_field=group_field)


def metrics_of(preds: Predictions, tasks, meta=None, *, transfer_field: str | None = None,
               group_field: str | None = None) -> dict[str, dict]:
    """:func:`evaluate`'s metrics of predictions already made."""
    head = None
    if transfer_field is not None:
        head = meta.field(transfer_field).head_mask()[preds.fields[transfer_field]]
    groups = preds.fields[group_field] if group_field is not None else None
    out = {}
    for t in tasks:
        m = task_metrics(t, preds.tasks[t.name], groups, head)
        if head is not None and t.kind == "binary":
            m["field"] = transfer_field
        out[t.name] = m
    return out
