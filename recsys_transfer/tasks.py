"""What a model predicts: task specs (torch-free, so configs and ``meta.json`` can hold them).

A :class:`TaskSpec` names one prediction target: ``name`` (the key of the model's output dict and of every metric),
``label`` (the label column of the prepared data that supervises it), ``kind`` and ``weight`` (its share of the
training loss ``sum_k weight_k * loss_k``). Kinds and what the model outputs for them:

* ``binary`` -- one logit per row ``[B]``; loss: BCE with logits; label 0/1.
* ``regression`` -- one value per row ``[B]``; loss: MSE; label: a float.
* ``multiclass`` -- ``num_classes`` logits per row ``[B, C]``; loss: cross entropy; label: the class id
  ``0..C-1`` (stored as a float column, cast to int64).
* ``retrieval`` -- scores of candidate items. ``candidates: sampled``: ``[B, 1 + N]``, the positive item's score in
  column 0 and N sampled negatives after it (the label column is not read by the loss); loss ``softmax`` (sampled
  softmax: cross entropy with target 0) or ``bpr`` (``mean_j softplus(s_neg_j - s_pos)``, Rendle et al. 2009).
  ``candidates: full``: ``[B, num_items]`` scores of every item, the label is the positive item's id; loss
  ``softmax`` (full softmax) or ``bpr`` (one negative label per row drawn uniformly from the other items: the
  paper's ``y-`` sampled from ``Y \\ y``, PeterRec Eq. 8). Used by the sequence models.
  ``eval_candidates`` (default: ``candidates``): what the model outputs in eval mode when it differs from training
  (a pretraining network trains on sampled candidates at every position and is validated on the full item pool).
  ``eval_negatives``: a list field holding fixed sampled negative ids per row (e.g. 99, the sampled protocol of
  He et al. 2017 that PeterRec Sec. 4.1 follows); with full eval candidates, evaluation then also ranks the positive
  among those ids only (``sampled_hr@k``, ``sampled_mrr@k``, ``sampled_ndcg@k``) next to the full-ranking metrics.

Every prepared dataset carries its tasks in ``meta.json``; a dataset prepared before tasks existed gets one
``binary`` task per label column, named after the column (:func:`default_tasks`). A run config may restate them
(``tasks:``), e.g. to change a weight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TASK_KINDS = ("binary", "regression", "multiclass", "retrieval")
RETRIEVAL_CANDIDATES = ("sampled", "full")
RETRIEVAL_LOSSES = ("softmax", "bpr")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label: str = ""  # label column; empty = the task's name
    kind: str = "binary"
    weight: float = 1.0
    num_classes: int | None = None  # multiclass only
    candidates: str = "sampled"  # retrieval only: sampled | full
    loss: str = "softmax"  # retrieval only: softmax | bpr
    eval_candidates: str | None = None  # retrieval only: sampled | full in eval mode (default: candidates)
    eval_negatives: str = ""  # retrieval with full eval candidates: list field of fixed sampled negative ids

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name == "mean":
            raise ValueError(f"task name must be non-empty, contain no '/' and not be 'mean' (the monitor's mean "
                             f"over tasks), got {self.name!r}")
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not self.weight >= 0:  # also rejects NaN
            raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.kind == "multiclass":
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError(f"task {self.name!r}: a multiclass task needs num_classes >= 2, got {self.num_classes}")
        elif self.num_classes is not None:
            raise ValueError(f"task {self.name!r}: num_classes is for multiclass tasks only")
        if self.candidates not in RETRIEVAL_CANDIDATES:
            raise ValueError(f"task {self.name!r}: candidates must be one of {RETRIEVAL_CANDIDATES}")
        if self.loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"task {self.name!r}: loss must be one of {RETRIEVAL_LOSSES}")
        if self.eval_candidates is None:
            object.__setattr__(self, "eval_candidates", self.candidates)
        if self.eval_candidates not in RETRIEVAL_CANDIDATES:
            raise ValueError(f"task {self.name!r}: eval_candidates must be one of {RETRIEVAL_CANDIDATES}")
        if self.kind != "retrieval" and (self.eval_candidates != self.candidates or self.eval_negatives):
            raise ValueError(f"task {self.name!r}: eval_candidates and eval_negatives are for retrieval tasks")
        if self.eval_negatives and self.eval_candidates != "full":
            raise ValueError(f"task {self.name!r}: eval_negatives ranks the positive among fixed ids of the full "
                             f"scores; it needs eval_candidates: full")

    @property
    def width(self) -> int | None:
        """Output columns per row: 1 (binary, regression), ``num_classes`` (multiclass), None (retrieval: the number
        of candidates is the model's)."""
        if self.kind == "multiclass":
            return self.num_classes
        return None if self.kind == "retrieval" else 1

    @property
    def primary_metric(self) -> str:
        """The metric early stopping follows by default: auc | mse | accuracy | mrr@10."""
        return {"binary": "auc", "regression": "mse", "multiclass": "accuracy", "retrieval": "mrr@10"}[self.kind]

    def to_json(self) -> dict:
        """The spec as meta.json / run records hold it; the evaluation keys only when they differ from their
        defaults (so the records of tasks without them are unchanged)."""
        out = asdict(self)
        if out["eval_candidates"] == self.candidates:
            del out["eval_candidates"]
        if not out["eval_negatives"]:
            del out["eval_negatives"]
        return out


def default_tasks(labels: list[str] | tuple[str, ...]) -> tuple[TaskSpec, ...]:
    """One binary task per label column, named after it (the tasks of a dataset prepared before tasks existed)."""
    return tuple(TaskSpec(name=label, label=label) for label in labels)


def tasks_from_json(entries: list[dict]) -> tuple[TaskSpec, ...]:
    return tuple(TaskSpec(**e) for e in entries)


def check_tasks(tasks: tuple[TaskSpec, ...] | list[TaskSpec], labels: list[str], where: str) -> None:
    """Task names unique, every label column present; ``ValueError`` naming ``where`` otherwise."""
    names = [t.name for t in tasks]
    if not tasks:
        raise ValueError(f"{where}: at least one task is required")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate task names {names}")
    missing = [t.label for t in tasks if t.label not in labels]
    if missing:
        raise ValueError(f"{where}: label column(s) {missing} not in the dataset's labels {labels}")
