"""The training loop every model, mode and entry point uses (``recsys-transfer train``, ``make demo``, the
harmlessness tests, the peer benchmark): :func:`train_epoch` runs a :class:`~recsys_transfer.train.step.TrainStep`
over a loader; :func:`fit` runs epochs with validation, a named monitor, early stopping and an optional EMA of
the weights.

Monitor (``train.monitor``): ``valid/<task>/<metric>`` (e.g. ``valid/label/auc``), ``valid/mean/<metric>`` (the
mean over every task of that metric), or ``auto``: the first task's primary metric (binary AUC, regression MSE,
multiclass accuracy, retrieval MRR@10). Larger is better for AUC, gAUC, accuracy, macro-F1, HR/MRR/NDCG; smaller for
log loss, NE, MSE, MAE, RMSE.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.train.evaluate import SAMPLED_RANKING_METRICS, TASK_METRICS
from recsys_transfer.train.progress import Progress, reporter
from recsys_transfer.train.step import NonFiniteLoss, TrainStep

MAXIMIZE = ("auc", "gauc", "head_auc", "tail_auc", "accuracy", "macro_f1", "hr@", "mrr@", "ndcg@", "sampled_hr@",
            "sampled_mrr@", "sampled_ndcg@")
MINIMIZE = ("logloss", "ne", "mse", "mae", "rmse")


def check_dataset(model: nn.Module, loader) -> None:
    """A model built for one prepared dataset refuses another (FuxiCTR's feature-map handshake)."""
    expected = getattr(model, "dataset_id", None)
    if expected is not None and expected != loader.meta.dataset_id:
        raise UserError(f"{loader.data_dir}: dataset id {loader.meta.dataset_id} does not match the model's {expected}")


class NonFiniteTrainingLoss(UserError):
    """A training batch's loss was NaN or infinite (``train.nonfinite_loss: error``)."""


@dataclass
class EpochStats:
    loss: float  # mean l_main over the trained rows
    losses: dict[str, float]  # mean unweighted loss per task (and auxiliary term)
    rows: int
    seconds: float
    skipped_batches: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def loss_key(name: str, prefix: str = "train") -> str:
    """The record key of a training loss: ``train/<task>/loss`` for a task, ``train/aux/<term>`` for a model's
    auxiliary term."""
    return f"{prefix}/{name}" if name.startswith("aux/") else f"{prefix}/{name}/loss"


@dataclass
class EpochProgress:
    """The running sums of the epoch in progress: what a checkpoint taken mid-epoch must hold so that the resumed
    epoch reports the same means (``sums``: per task, sum over trained rows of the loss, as tensors: the exact
    float32 values the uninterrupted run adds)."""

    batches: int = 0  # batches of the epoch consumed (trained or skipped)
    total: float = 0.0  # sum of l_main * rows
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0  # training time of the epoch so far (before an interruption, too)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def stats(self) -> EpochStats:
        losses = {name: float(v) / max(self.rows, 1) for name, v in self.sums.items()}
        return EpochStats(self.total / max(self.rows, 1), losses, self.rows, self.seconds, self.skipped)


def fault_step() -> tuple[int, int] | None:
    """Fault injection for tests and drills: ``RECSYS_TRANSFER_FAULT_STEP=k`` kills the process with SIGKILL
    before it trains global step ``k`` (counted from 0 over the whole run), on rank ``RECSYS_TRANSFER_FAULT_RANK``
    (default 0), in the first attempt only (a worker restarted by torchrun, ``TORCHELASTIC_RESTART_COUNT > 0``,
    runs on). Returns ``(k, rank)`` or None."""
    value = os.environ.get("RECSYS_TRANSFER_FAULT_STEP")
    if not value or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return None
    try:
        return int(value), int(os.environ.get("RECSYS_TRANSFER_FAULT_RANK", "0"))
    except ValueError:
        raise UserError(f"RECSYS_TRANSFER_FAULT_STEP / _RANK must be integers, got {value!r}") from None


def _kill_self() -> None:
    print(f"fault injection: killing rank {os.environ.get('RANK', '0')} (pid {os.getpid()}) with SIGKILL",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def train_epoch(step: TrainStep, loader, *, epoch: int = 0, device: torch.device | None = None,
                progress: bool | Progress = False, after_step: Callable[[], None] | None = None,
                state: EpochProgress | None = None, on_step: Callable[[EpochProgress], None] | None = None,
                first_step: int = 0, rank: int = 0) -> EpochStats:
    """One pass of ``step`` over ``loader`` (batches moved to ``device`` when it is not the CPU). A non-finite loss
    raises :class:`NonFiniteTrainingLoss` naming the epoch and step, unless the step skips such batches.
    ``progress``: a :class:`~recsys_transfer.train.progress.Progress` told of every batch, or True for
    :func:`~recsys_transfer.train.progress.reporter`'s default (a bar on a terminal, else plain lines).

    Resuming: ``state`` holds the sums of the batches already trained in this epoch (the loader must serve the
    rest: ``loader.set_epoch(epoch, start_batch=state.batches)``); ``on_step(state)`` runs after every batch (a
    checkpoint hook); ``first_step`` is the run's global step of the first batch served (fault injection,
    :func:`fault_step`, reads it; ``rank`` is this process's)."""
    check_dataset(step.model, loader)
    step.model.train()
    move = device is not None and torch.device(device).type != "cpu"
    state = state if state is not None else EpochProgress()
    fault = fault_step()
    fault_at = fault[0] if fault is not None and fault[1] == rank else -1
    t0 = time.perf_counter() - state.seconds
    sums = state.sums
    report = progress if isinstance(progress, Progress) else reporter(progress)
    report.start(epoch, len(loader), state)
    start = state.batches
    for k, batch in enumerate(loader, start=start):
        if first_step + k - start == fault_at:
            _kill_self()
        n = batch.batch_size
        try:
            result = step(batch.to(device, non_blocking=True) if move else batch)
        except NonFiniteLoss as exc:
            raise NonFiniteTrainingLoss(f"epoch {epoch}, step {k}: {exc}; set train.nonfinite_loss=skip to skip such "
                                        "batches") from None
        state.batches = k + 1
        if result.skipped:
            state.skipped += 1
        else:
            if after_step is not None:
                after_step()
            state.total += result.loss * n
            state.rows += n
            for name, value in result.losses.items():
                sums[name] = sums[name] + value * n if name in sums else value * n
        state.seconds = time.perf_counter() - t0
        report.update(state)
        if on_step is not None:
            on_step(state)
    state.seconds = time.perf_counter() - t0
    report.close()
    return state.stats()


# -- monitor --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Monitor:
    """What early stopping and the best-model choice follow (module docstring)."""

    key: str
    task: str | None  # None: the mean over tasks
    metric: str
    maximize: bool

    def value(self, valid: dict[str, dict]) -> float | None:
        """The monitored value of one validation result (``{task: metrics}``); None when undefined or not finite."""
        vals = [valid[self.task].get(self.metric)] if self.task is not None else \
            [m.get(self.metric) for m in valid.values()]
        if any(v is None or not math.isfinite(v) for v in vals):
            return None
        return float(sum(vals) / len(vals))

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.maximize else value < best)


def resolve_monitor(name: str, tasks: tuple[TaskSpec, ...] | list[TaskSpec]) -> Monitor:
    """``train.monitor`` against the run's tasks: a :class:`UserError` for an unknown task or a metric that is not
    one of the task kind's (or has no direction)."""
    if name == "auto":
        name = f"valid/{tasks[0].name}/{tasks[0].primary_metric}"
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "valid":
        raise UserError(f"train.monitor {name!r}: expected valid/<task>/<metric> or valid/mean/<metric>")
    _, task, metric = parts
    names = [t.name for t in tasks]
    if task != "mean" and task not in names:
        raise UserError(f"train.monitor {name!r}: unknown task {task!r}; tasks: {names}")
    chosen = tasks if task == "mean" else [t for t in tasks if t.name == task]
    for t in chosen:
        if metric not in metric_names(t):
            raise UserError(f"train.monitor {name!r}: task {t.name!r} ({t.kind}) has no metric {metric!r}; it has "
                            f"{metric_names(t)}")
    if metric.startswith(MAXIMIZE):
        maximize = True
    elif metric in MINIMIZE:
        maximize = False
    else:
        raise UserError(f"train.monitor {name!r}: {metric!r} has no better direction to follow")
    return Monitor(name, None if task == "mean" else task, metric, maximize)


def metric_names(task: TaskSpec) -> list[str]:
    """The metrics :func:`recsys_transfer.train.evaluate.task_metrics` reports for this task."""
    return list(TASK_METRICS[task.kind]) + (list(SAMPLED_RANKING_METRICS) if task.eval_negatives else [])


# -- epochs ---------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of every parameter (dense and tables), swapped in for evaluation and saving.

    Costs O(parameters) per step; meant for the paper's small CTR models (it used EMA), not billion-row tables.
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float) -> None:
        self.tensors = tensors
        self.decay = decay
        self.shadow = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        for s, t in zip(self.shadow, self.tensors):
            s.mul_(self.decay).add_(t.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for s, t in zip(self.shadow, self.tensors):
            tmp = t.detach().clone()
            t.data.copy_(s)
            s.copy_(tmp)


@dataclass
class FitResult:
    """Where :func:`fit` is (a checkpoint holds it, :mod:`recsys_transfer.train.state`) and what it found."""

    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best_epoch: int = -1  # -1: no epoch had a finite monitor
    best_value: float | None = None
    skipped_batches: int = 0
    epoch: int = 0  # the epoch in progress (== len(history) unless stopped)
    stale: int = 0  # epochs since the monitor last improved
    global_step: int = 0  # batches consumed since the run began
    stopped: bool = False  # early stopping ended the run
    progress: EpochProgress = field(default_factory=EpochProgress)  # the epoch in progress


def fit(step: TrainStep, train, validate: Callable[[], dict[str, dict]], *, epochs: int, monitor: Monitor,
        patience: int = 0, device: torch.device | None = None, ema: EMA | None = None,
        progress: bool | Progress = False,
        on_epoch: Callable[[dict], None] | None = None, on_best: Callable[[int], None] | None = None,
        result: FitResult | None = None, on_step: Callable[[FitResult], None] | None = None,
        on_epoch_end: Callable[[FitResult], None] | None = None, rank: int = 0) -> FitResult:
    """Train ``epochs`` epochs (``train.set_epoch`` each); after each, ``validate()`` (``{task: metrics}``, with the
    EMA weights swapped in when ``ema`` is given) gives the monitor's value; ``on_best(epoch)`` runs when it
    improves (save the model there), ``on_epoch(record)`` for every epoch. Stops after ``patience`` epochs without
    improvement (0: never early). An epoch whose monitor is None (undefined or not finite) never counts as best.

    Checkpoints: ``result`` resumes a run where a checkpoint left it (epoch, batch of the epoch, the epoch's
    sums, history, best, stale count); ``on_step(result)`` runs after every batch and ``on_epoch_end(result)``
    after every epoch (the EMA swapped back, ``result`` pointing at the next epoch), so a checkpoint taken there
    holds everything the rest of the run depends on."""
    result = result if result is not None else FitResult()
    while not result.stopped and result.epoch < epochs:
        epoch = result.epoch
        train.set_epoch(epoch, start_batch=result.progress.batches)
        first, start = result.global_step, result.progress.batches

        def stepped(p: EpochProgress) -> None:
            result.global_step = first + p.batches - start
            if on_step is not None:
                on_step(result)

        stats = train_epoch(step, train, epoch=epoch, device=device, progress=progress,
                            after_step=ema.update if ema is not None else None, state=result.progress,
                            on_step=stepped, first_step=first, rank=rank)
        result.skipped_batches += stats.skipped_batches
        if ema is not None:
            ema.swap()
        valid = validate()
        value = monitor.value(valid)
        record = {"epoch": epoch, "train/loss": stats.loss, "train/rows": stats.rows,
                  "train/rows_per_s": stats.rows_per_s, "train/seconds": stats.seconds,
                  "train/skipped_batches": stats.skipped_batches,
                  **{loss_key(k): v for k, v in stats.losses.items()},
                  **{f"valid/{task}/{k}": v for task, m in valid.items() for k, v in m.items()},
                  "monitor": monitor.key, "monitor_value": value}
        improved = value is not None and monitor.better(value, result.best_value)
        if improved:
            result.best_value, result.best_epoch, result.stale = value, epoch, 0
            if on_best is not None:
                on_best(epoch)
        else:
            result.stale += 1
        record["best_epoch"] = result.best_epoch
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if ema is not None:
            ema.swap()
        result.epoch, result.progress = epoch + 1, EpochProgress()
        result.stopped = bool(patience and result.stale >= patience)
        if on_epoch_end is not None:
            on_epoch_end(result)
    return result
