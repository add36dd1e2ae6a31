"""One call that composes a :class:`~recsys_transfer.train.step.TrainStep` from configs, for every entry point
(the trainer, ``make demo``, the harmlessness tests, the benchmarks)::

    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-3),
                        transfer=TransferConfig(mode="+Ours", fields=("zip",)), domains=domains)
    for batch in loader:
        step(batch)

It attaches the row pipeline to the model's embedding collections (row optimizer, freeze, clip), adds the transfer
stage of ``transfer.mode`` (none in mode B), builds the objective of the tasks and the dense optimizer of the
remaining parameters.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
from recsys_transfer.objectives import Objective
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.train.step import TrainStep, dense_optimizer
from recsys_transfer.transfer.barrier import transfer_transform


def compose_step(model: nn.Module, meta, *, tasks=None, rows: RowsConfig = RowsConfig(),
                 transfer: TransferConfig = TransferConfig(), domains: dict[str, np.ndarray] | None = None,
                 train: TrainConfig = TrainConfig()) -> TrainStep:
    """The training step of ``model`` (module docstring). ``tasks``: default the dataset's; ``train``: the dense
    optimizer (``optimizer``, ``lr``, ``weight_decay``), ``aux_weights`` and ``nonfinite_loss``."""
    pipeline = attach_rows(model, rows)
    stage = transfer_transform(pipeline, meta, transfer, domains)
    if stage is not None:
        pipeline.add_transform(stage)
    return TrainStep(model, Objective(tuple(tasks or meta.tasks), train.aux_weights),
                     dense_optimizer(train, pipeline.dense_parameters()), pipeline, per_task=rows.per_task,
                     skip_nonfinite=train.nonfinite_loss == "skip")
