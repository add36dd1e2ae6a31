"""Task outputs of the CTR models: one output column per binary/regression task and ``num_classes`` per multiclass
task, computed as one ``[B, W]`` tensor by the model's last layer and split per task here."""

from __future__ import annotations

import torch

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec


class TaskColumns:
    """The tasks' column ranges in a model's ``[B, W]`` output (``W = sum of the tasks' widths``)."""

    def __init__(self, tasks: tuple[TaskSpec, ...] | list[TaskSpec], model: str) -> None:
        if not tasks:
            raise UserError(f"{model}: at least one task is required")
        bad = [t.name for t in tasks if t.kind == "retrieval"]
        if bad:
            raise UserError(f"{model} scores rows, not candidate items: it has no output for the retrieval task(s) {bad}")
        self.tasks = tuple(tasks)
        self.spans: list[tuple[str, int, int]] = []
        start = 0
        for t in self.tasks:
            self.spans.append((t.name, start, t.width))
            start += t.width
        self.width = start

    def split(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[B, W]`` -> ``{task: [B]}`` for one-column tasks, ``{task: [B, C]}`` for multiclass tasks."""
        return {name: logits[:, start] if width == 1 else logits[:, start:start + width]
                for name, start, width in self.spans}


def single_score_task(tasks: tuple[TaskSpec, ...] | list[TaskSpec], model: str) -> TaskSpec:
    """The one task of a model that computes a single score per row (LR, FM): binary or regression."""
    if len(tasks) != 1 or tasks[0].kind not in ("binary", "regression"):
        raise UserError(f"{model} computes one score per row: it takes exactly one binary or regression task, got "
                        f"{[(t.name, t.kind) for t in tasks]} (use deepfm or autoint for several tasks)")
    return tasks[0]


def full_candidates(task: TaskSpec, meta: DatasetMeta, label_vocab: dict[str, int] | None, model: str) -> int:
    """``|Y|``, the number of candidates of a retrieval task that a model scores over its whole label vocabulary
    (``candidates: full``; output ``[B, |Y|]``): ``label_vocab[task.name]``, else the cold dataset's
    ``meta.source["num_target_classes"]`` (:mod:`recsys_transfer.data.sequences`). :class:`UserError` for
    sampled candidates or an unknown size."""
    if task.candidates != "full":
        raise UserError(f"{model}: retrieval task {task.name!r} scores the whole target-label vocabulary "
                        "(candidates: full), got candidates: sampled")
    size = (label_vocab or {}).get(task.name) or meta.source.get("num_target_classes")
    if not size or size < 2:
        raise UserError(f"{model}: retrieval task {task.name!r} needs the size of its label vocabulary: "
                        f"label_vocab: {{{task.name}: |Y|}} (the cold dataset records it as "
                        "source.num_target_classes)")
    return int(size)
