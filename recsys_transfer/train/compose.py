"""One call that composes a :class:`~recsys_transfer.train.step.TrainStep` from configs, for every entry point
(the trainer, ``make demo``, the harmlessness tests, the benchmarks)::

    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-3),
                        transfer=TransferConfig(mode="+Ours", fields=("zip",)), domains=domains,
                        multitask=MultitaskConfig(surgery="gradvac"))
    for batch in loader:
        step(batch)

It attaches the row pipeline to the model's embedding collections (row optimizer, freeze, clip), adds the gradient
surgery stage of ``multitask.surgery`` (none by default) and the transfer stage of ``transfer.mode`` (none in mode
B), builds the objective of the tasks, the loss weighting of ``multitask.weighting`` and the dense optimizer of the
remaining parameters (with the weighting's own, if it learns any). Surgery turns on one backward per task.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from recsys_transfer.config import MultitaskConfig, RowsConfig, TrainConfig, TransferConfig
from recsys_transfer.errors import UserError
from recsys_transfer.multitask.surgery import DenseSurgery, RowSurgery, Surgery
from recsys_transfer.multitask.weighting import make_weighting
from recsys_transfer.objectives import Objective
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.rows.pipeline import collection_name
from recsys_transfer.train.step import TrainStep, dense_optimizer
from recsys_transfer.transfer.barrier import transfer_transform


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """Parameter names as in the unwrapped model (DistributedModelParallel's and DDP's prefixes dropped), so the
    surgery's group names -- keys of its checkpointed targets -- are the same in every world size."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    wrapped = isinstance(model, DistributedModelParallel)
    out = {}
    for name, p in model.named_parameters():
        name = collection_name(name)
        if wrapped and name.startswith("module."):
            name = name[len("module."):]
        out[id(p)] = name
    return out


def compose_step(model: nn.Module, meta, *, tasks=None, rows: RowsConfig = RowsConfig(),
                 transfer: TransferConfig = TransferConfig(), domains: dict[str, np.ndarray] | None = None,
                 train: TrainConfig = TrainConfig(), multitask: MultitaskConfig = MultitaskConfig()) -> TrainStep:
    """The training step of ``model`` (module docstring). ``tasks``: default the dataset's; ``train``: the dense
    optimizer (``optimizer``, ``lr``, ``weight_decay``), ``aux_weights`` and ``nonfinite_loss``; ``multitask``:
    loss weighting and gradient surgery."""
    pipeline = attach_rows(model, rows)
    objective = Objective(tuple(tasks or meta.tasks), train.aux_weights)
    dense_params = pipeline.dense_parameters()
    surgery = None
    if multitask.surgery != "none":
        try:
            state = Surgery(multitask.surgery, [t.name for t in objective.tasks], multitask.tasks, multitask.beta,
                            multitask.seed)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        pipeline.add_transform(RowSurgery(state, multitask.row_groups))
        names = _parameter_names(model)
        surgery = DenseSurgery(state, {names[id(p)]: p for p in dense_params}, multitask.groups)
    stage = transfer_transform(pipeline, meta, transfer, domains)
    if stage is not None:
        pipeline.add_transform(stage)
    weighting = None
    if multitask.weighting != "equal":
        device = dense_params[0].device if dense_params else None
        try:
            weighting = make_weighting(multitask.weighting, objective, multitask.weights, device)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        dense_params = dense_params + list(weighting.parameters().values())
    return TrainStep(model, objective, dense_optimizer(train, dense_params), pipeline,
                     per_task=rows.per_task or surgery is not None, skip_nonfinite=train.nonfinite_loss == "skip",
                     weighting=weighting, surgery=surgery)
