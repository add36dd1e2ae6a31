"""TensorBoard scalars of a run (``log.tensorboard``), written by rank 0 under ``<output>/tensorboard/`` with
``torch.utils.tensorboard.SummaryWriter`` (the optional ``tensorboard`` package: the ``tensorboard`` extra).

Every scalar's step is the run's global step (batches consumed since the run began, as in the checkpoints):

* ``step/train/loss``, ``step/train/<task>/loss`` (``step/train/aux/<term>``), ``step/train/rows_per_s``: the
  epoch's running mean loss and rows/s so far (what ``epochs.jsonl`` reports at its end), every
  ``log.every_steps`` steps and at each epoch's last step;
* ``step/transfer/<table>/transfer_loss`` and, in the modes with the barrier (``+Ours``, ``lexico``),
  ``step/transfer/<table>/mean_lambda``: the logged step's values (``RowPipeline.stats()``), at the same steps.
  Under sharding, rank 0's tables only (the same as ``metrics.json``'s ``transfer``);
* every number of each ``epochs.jsonl`` record under its own key (``train/loss``, ``train/<task>/loss``,
  ``train/rows_per_s``, ``valid/<task>/<metric>``, ``monitor_value``, ``epoch``, ...), at the epoch's last step;
* ``checkpoint/save_seconds``: each train-state checkpoint's save time, at its step;
* ``test/<task>/<metric>``: ``metrics.json``'s test metrics, at the last step.

Non-finite values (``null`` in the JSON records) are left out. A resumed run appends a new event file to the same
directory whose first event purges the steps after its checkpoint (``purge_step``), so TensorBoard shows one run
with one value per step; the writer is flushed before every checkpoint, so nothing up to a checkpoint's step is
lost when the run is killed after it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from recsys_transfer.config import LogConfig
from recsys_transfer.errors import UserError
from recsys_transfer.train.loop import FitResult, loss_key

EXTRA = "pip install 'recsys-transfer[tensorboard]'"


def require_tensorboard() -> None:
    """A one-line :class:`UserError` naming the extra when the ``tensorboard`` package is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError(f"log.tensorboard is on but the tensorboard package is not installed: {EXTRA}") from None


class Scalars:
    """Writes nothing (``log.tensorboard: false``, and every rank but 0); the interface of
    :class:`TensorBoardScalars`."""

    def step(self, result: FitResult) -> None:
        """After every training step (:func:`recsys_transfer.train.loop.fit`'s ``on_step``)."""

    def epoch(self, record: dict, step: int) -> None:
        """An ``epochs.jsonl`` record, at global step ``step`` (the epoch's last)."""

    def checkpoint(self, seconds: float, step: int) -> None:
        """A checkpoint of step ``step`` took ``seconds`` to save."""

    def test(self, metrics: dict[str, dict], step: int) -> None:
        """The test metrics (``{task: {metric: value}}``)."""

    def flush(self) -> None:
        """Everything written so far is on disk."""

    def close(self) -> None:
        pass


def _after_earlier_files(log_dir: Path) -> None:
    """Wait (at most a second) until this second is later than every earlier event file's: TensorBoard reads a
    directory's files in name order, ``events.out.tfevents.<whole seconds>.<host>.<pid>...``, and a resumed run
    started in the second its killed attempt started in sorted by pid, before it (seen in the tests: the resumed
    steps came first and the purge hid nothing)."""
    stamps = [int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class TensorBoardScalars(Scalars):
    """The scalars of the module docstring in ``log_dir``. ``batches``: the batches of an epoch (its last step is
    always logged); ``transfer_stats``: ``RowPipeline.stats`` (``{table: {transfer_loss, mean_lambda, ...}}``);
    ``lambdas``: log ``mean_lambda`` (the mode has the barrier); ``purge_step``: the first step of a resumed run
    (earlier event files' steps from there on are hidden)."""

    def __init__(self, log_dir: Path, every_steps: int, batches: int, *,
                 transfer_stats: Callable[[], dict[str, dict]] | None = None, lambdas: bool = False,
                 purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _after_earlier_files(Path(log_dir))
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30)
        self.every, self.batches = every_steps, batches
        self.transfer_stats, self.lambdas = transfer_stats, lambdas

    def add(self, tag: str, value, step: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.writer.add_scalar(tag, float(value), step)

    def step(self, result: FitResult) -> None:
        at = result.global_step
        if result.progress.batches != self.batches and not (self.every and at % self.every == 0):
            return
        stats = result.progress.stats()
        self.add("step/train/loss", stats.loss, at)
        for name, value in stats.losses.items():
            self.add(loss_key(name, "step/train"), value, at)
        self.add("step/train/rows_per_s", stats.rows_per_s, at)
        for table, st in (self.transfer_stats() if self.transfer_stats is not None else {}).items():
            self.add(f"step/transfer/{table}/transfer_loss", st.get("transfer_loss"), at)
            if self.lambdas:
                self.add(f"step/transfer/{table}/mean_lambda", st.get("mean_lambda"), at)

    def epoch(self, record: dict, step: int) -> None:
        for key, value in record.items():
            self.add(key, value, step)

    def checkpoint(self, seconds: float, step: int) -> None:
        self.add("checkpoint/save_seconds", seconds, step)

    def test(self, metrics: dict[str, dict], step: int) -> None:
        for task, values in metrics.items():
            for key, value in values.items():
                self.add(f"test/{task}/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def run_scalars(config: LogConfig, out: Path, *, main: bool, batches: int, resumed_at: int | None = None,
                transfer_stats: Callable[[], dict[str, dict]] | None = None, lambdas: bool = False) -> Scalars:
    """The scalars of a run into ``out`` (``log``: ``config``): :class:`TensorBoardScalars` on rank 0 (``main``)
    with ``log.tensorboard``, else :class:`Scalars`. ``resumed_at``: the global step of the checkpoint a resumed
    run starts from (the steps after it are purged)."""
    if not (config.tensorboard and main):
        return Scalars()
    require_tensorboard()
    return TensorBoardScalars(out / "tensorboard", config.every_steps, batches, transfer_stats=transfer_stats,
                              lambdas=lambdas, purge_step=None if resumed_at is None else resumed_at + 1)
