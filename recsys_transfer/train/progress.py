"""What :func:`recsys_transfer.train.loop.train_epoch` shows while an epoch runs (``train.progress``): a tqdm bar on
a terminal, plain log lines in a log file (a cluster job's stdout), nothing when off.

The loop calls the same three methods whatever is shown: ``start(epoch, total, state)`` before the first batch,
``update(state)`` after every batch and ``close()`` at the end, ``state`` being the loop's
:class:`~recsys_transfer.train.loop.EpochProgress` (read, never written). :func:`reporter` picks the kind: the bar
only when stderr (where tqdm draws) is a terminal, else :class:`LogLines`, which print to stdout, e.g.::

    epoch 1  step 120/469  loss 0.5123  12,345 rows/s  eta 0:00:42

``loss`` is the mean training loss of the epoch so far (what the bar's postfix shows), ``rows/s`` this process's
training rows per second of the epoch, ``eta`` the epoch's remaining batches at its pace so far. A resumed epoch
continues its counts (the checkpoint holds them).
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class EpochState(Protocol):
    """What a progress report reads of the loop's ``EpochProgress``."""

    batches: int  # batches of the epoch consumed
    total: float  # sum of l_main * rows
    rows: int
    seconds: float  # training time of the epoch so far


class Progress:
    """Shows nothing (``train.progress: false``, and every rank but 0); the interface of the others."""

    def start(self, epoch: int, total: int, state: EpochState) -> None:
        """Epoch ``epoch`` of ``total`` batches begins, ``state.batches`` of them already consumed (a resumed epoch)."""

    def update(self, state: EpochState) -> None:
        """A batch of the epoch was consumed (trained or skipped)."""

    def close(self) -> None:
        """The epoch ended."""


class Bar(Progress):
    """A tqdm bar on stderr, the epoch's running loss as its postfix every 50 batches."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.bar = None

    def start(self, epoch: int, total: int, state: EpochState) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=state.batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                        mininterval=0.5, file=self.stream)

    def update(self, state: EpochState) -> None:
        self.bar.update(1)
        if state.batches % 50 == 1 and state.rows:
            self.bar.set_postfix(loss=f"{state.total / state.rows:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLines(Progress):
    """A plain line (module docstring) every ``every_steps`` batches of the epoch (0: off) and whenever
    ``every_seconds`` passed since the last line (0: off); no control characters, so a log file stays readable."""

    def __init__(self, every_steps: int = 0, every_seconds: float = 30.0, stream: TextIO | None = None,
                 clock=time.monotonic) -> None:
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.stream, self.clock = stream, clock
        self.epoch, self.total, self.last = 0, 0, 0.0

    def start(self, epoch: int, total: int, state: EpochState) -> None:
        self.epoch, self.total, self.last = epoch, total, self.clock()

    def update(self, state: EpochState) -> None:
        now = self.clock()
        due = (self.every_steps and state.batches % self.every_steps == 0) or \
            (self.every_seconds and now - self.last >= self.every_seconds)
        if due:
            self.last = now
            print(self.line(state), file=self.stream or sys.stdout, flush=True)

    def line(self, state: EpochState) -> str:
        seconds = max(state.seconds, 1e-9)
        eta = round((self.total - state.batches) * seconds / max(state.batches, 1))
        loss = f"{state.total / state.rows:.4f}" if state.rows else "-"
        return (f"epoch {self.epoch}  step {state.batches}/{self.total}  loss {loss}  "
                f"{state.rows / seconds:,.0f} rows/s  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def reporter(enabled: bool, *, every_steps: int = 0, every_seconds: float = 30.0,
             stream: TextIO | None = None) -> Progress:
    """The progress report of ``train.progress`` (``enabled``): a :class:`Bar` when ``stream`` (default stderr) is a
    terminal, else :class:`LogLines` every ``every_steps`` batches / ``every_seconds`` seconds
    (``log.lines_every_steps`` / ``log.lines_every_seconds``); :class:`Progress` (nothing) when off."""
    if not enabled:
        return Progress()
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return Bar(stream)
    return LogLines(every_steps, every_seconds)
