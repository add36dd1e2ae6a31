"""One training step, composed in the order it runs (the whole of it is :meth:`TrainStep.__call__`):

1. forward: ``model(batch)`` -> ``{task: output}`` (+ auxiliary outputs);
2. per-task losses by task kind and the model's own terms (:class:`recsys_transfer.objectives.Objective`);
   ``l_main = sum_k w_k l_k + terms`` -- or the terms of a loss weighting (``weighting``:
   :mod:`recsys_transfer.multitask.weighting`); a non-finite ``l_main`` stops the run (or skips the batch, counted);
3. backward phase: dense gradients as usual, while every fused lookup RECORDS its touched rows and their
   gradient (never a dense table gradient) -- with ``per_task`` one backward per task, each into its own slot;
   with gradient surgery (``surgery``) each task's dense gradients are also taken aside after its backward;
4. row transforms, in the pipeline's stage order (surgery -> transfer barrier -> freeze -> clip), then the row
   optimizer applies the directions to the touched rows (:mod:`recsys_transfer.rows`): surgery first turns the
   per-task row gradients into one ``g_main``, the barrier then works on that ``g_main``;
5. dense: surgery per parameter group (:class:`recsys_transfer.multitask.surgery.DenseSurgery`), then the dense
   optimizer step.

With one task and no surgery this is exactly the arithmetic of the fused row update it replaced (tested against
weights recorded before the change, ``tests/test_reference_updates.py``).

Under torchrun (DistributedModelParallel) the dense gradients must be those of the global batch: the mean over
the ranks of each rank's gradient (every rank's loss is its local batch's mean, local batches of equal size).
TorchRec wraps the dense part in DDP, whose hooks all-reduce (average) the gradients of ONE backward per forward:
measured on 2 gloo ranks (torch 2.x, TorchRec's ``static_graph=True``, ``gradient_as_bucket_view``), the first
backward after a forward is averaged and the hooks of the later ones are ignored (the second task's dense gradient
stayed the rank's own; in one probe a later step's even repeated an earlier one), and ``no_sync`` fails an
internal assertion of the reducer in a static graph's first iteration; GradVac / PCGrad through DDP ended up to
0.02 from the single-process weights after 4 steps (``tests/test_surgery_distributed.py``'s setting). So one
backward per task (``per_task``, gradient surgery) refuses
a DDP-wrapped model: shard it with ``shard_model(..., data_parallel=False)`` (no DDP; the dense parameters are
replicated) and this step averages the dense gradients itself -- each task's, taken aside by the surgery, before
the surgery reads them (:class:`~recsys_transfer.multitask.surgery.DenseSurgery`), and whatever else the
parameters accumulated -- in one all-reduce (the sum, divided by the world size: the mean, as DDP). Dense
parameters no DDP averages (a loss weighting's log-variances, also under DDP) are averaged the same way. In one process
nothing of this runs: the arithmetic is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.config import TrainConfig
from recsys_transfer.multitask.surgery import DenseSurgery
from recsys_transfer.multitask.weighting import Weighting
from recsys_transfer.objectives import Objective
from recsys_transfer.rows.pipeline import RowPipeline, mean_over_ranks
from recsys_transfer.types import split_output


def dense_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer of the dense (non-table) parameters (``train.optimizer``, ``train.lr``): fused kernels, one
    call for all tensors."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    momentum = 0.9 if config.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=config.lr, momentum=momentum, weight_decay=config.weight_decay, fused=True)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _ddp_parameters(model: nn.Module) -> set[int] | None:
    """The ids of the parameters whose gradients a DDP inside ``model`` averages (None: no DDP)."""
    from torch.nn.parallel import DistributedDataParallel

    found = None
    for module in model.modules():
        if isinstance(module, DistributedDataParallel):
            ignored = getattr(module, "parameters_to_ignore", set())
            found = (found or set()) | {id(p) for n, p in module.module.named_parameters() if n not in ignored}
    return found


def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks (in place: a sum divided by the world size), one all-reduce
    per dtype and device. Every rank passes tensors of the same shapes in the same order (a collective)."""
    world = _world_size()
    if world == 1 or not tensors:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat)
        flat /= world
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))


@dataclass
class StepResult:
    """``loss``: ``l_main`` (a float, NaN/inf for a skipped batch; with a weighting that learns, the whole objective,
    its regularizer included); ``losses``: each task's (and term's) unweighted loss, detached; ``skipped``: the
    batch was not trained on (non-finite loss under ``nonfinite_loss: skip``)."""

    loss: float
    losses: dict[str, torch.Tensor]
    skipped: bool = False


class NonFiniteLoss(Exception):
    """The training loss of a batch is NaN or infinite (raised before any parameter moved)."""

    def __init__(self, value: float, losses: dict[str, float]) -> None:
        self.value = value
        self.losses = losses
        parts = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        super().__init__(f"training loss is {value} ({parts})")


class TrainStep:
    """Forward, losses, backward phase with recorded rows, row transforms + row optimizer, dense step.

    ``rows``: the row pipeline of the model's embedding tables (None for a model trained entirely by
    ``dense_optimizer``, e.g. with dense table gradients); ``per_task``: one backward per task (each task's row
    gradients recorded in its own slot, for gradient surgery; without surgery the result equals one backward of
    the weighted sum); ``skip_nonfinite``: a batch with a non-finite loss is dropped (``StepResult.skipped``)
    instead of raising :class:`NonFiniteLoss`. ``weighting``: a loss weighting (None: the objective's weights);
    ``surgery``: gradient surgery of the dense parameters (its :class:`~recsys_transfer.multitask.surgery.Surgery`
    state is shared with the row pipeline's ``surgery`` stage; needs ``per_task``)."""

    def __init__(self, model: nn.Module, objective: Objective, dense: torch.optim.Optimizer,
                 rows: RowPipeline | None = None, *, per_task: bool = False, skip_nonfinite: bool = False,
                 weighting: Weighting | None = None, surgery: DenseSurgery | None = None) -> None:
        if surgery is not None and not per_task:
            raise ValueError("gradient surgery needs one backward per task (per_task=True)")
        self.model = model
        self.objective = objective
        self.dense = dense
        self.rows = rows
        self.per_task = per_task
        self.skip_nonfinite = skip_nonfinite
        self.weighting = weighting
        self.surgery = surgery
        # dense parameters whose gradients this step averages over the ranks (module docstring): under torchrun,
        # all of the dense optimizer's that no DDP averages; none in one process
        self._average: list[nn.Parameter] = []
        if _world_size() > 1:
            ddp = _ddp_parameters(model)
            if ddp is not None and per_task:
                raise ValueError("one backward per task (gradient surgery, rows.per_task) under torchrun needs the "
                                 "dense part without DDP, which averages one backward per forward: shard the model "
                                 "with shard_model(..., data_parallel=False)")
            self._average = [p for group in dense.param_groups for p in group["params"]
                             if ddp is None or id(p) not in ddp]

    def _average_dense(self, extra: list[torch.Tensor] = ()) -> None:
        """Average the dense gradients over the ranks (module docstring); ``extra``: gradients taken aside."""
        if self._average:
            average_over_ranks([p.grad for p in self._average if p.grad is not None] + list(extra))

    def __call__(self, batch) -> StepResult:
        # 1. forward
        outputs, aux = split_output(self.model(batch))
        # 2. per-task losses and model terms; l_main
        losses = self.objective.losses(outputs, aux, batch)
        if self.weighting is not None or self.surgery is not None:
            return self._multitask(losses)
        loss = self.objective.total(losses)
        # l_main averaged over ranks (every rank then agrees on whether it is finite, and the barrier's phi_i uses
        # the global-batch loss); the step's one host sync: nothing has moved yet if it is not finite
        main = mean_over_ranks(loss)
        value = float(main)
        if not math.isfinite(value):
            return self._nonfinite(value, losses)
        self.dense.zero_grad(set_to_none=True)
        # 3. backward phase: dense grads; the fused lookups record the touched rows and their gradients
        if self.rows is not None:
            self.rows.begin(main, averaged=True)
        if self.per_task and self.rows is not None and len(losses) > 1:
            weighted = list(self.objective.weighted(losses).items())
            for k, (name, term) in enumerate(weighted):
                with self.rows.task(name):
                    term.backward(retain_graph=k + 1 < len(weighted))
        else:
            loss.backward()
        # 4. row transforms (surgery -> transfer -> freeze -> clip) and the row optimizer, touched rows only
        if self.rows is not None:
            self.rows.apply()
        # 5. dense update
        self._average_dense()
        self.dense.step()
        return StepResult(value, {k: v.detach() for k, v in losses.items()})

    def _nonfinite(self, value: float, losses: dict[str, torch.Tensor]) -> StepResult:
        """A batch whose loss is NaN or infinite, before anything moved: skipped (counted) or NonFiniteLoss."""
        if self.skip_nonfinite:
            return StepResult(value, {k: v.detach() for k, v in losses.items()}, skipped=True)
        raise NonFiniteLoss(value, {k: float(v.detach()) for k, v in losses.items()})

    def _multitask(self, losses: dict[str, torch.Tensor]) -> StepResult:
        """Steps 2-5 with a loss weighting and/or gradient surgery (the class docstring's order)."""
        weighting = self.weighting or Weighting(self.objective)
        terms, regularizer = weighting.terms(losses)
        data = None
        for term in terms.values():
            data = term if data is None else data + term
        # l_main: the weighted task terms, whose row gradient is g_main (the barrier's phi_i reads it); the
        # weighting's regularizer (uncertainty's 1/2 s_k) reaches only its own parameters
        main = mean_over_ranks(data)
        value = float(main if regularizer is None else main + regularizer.detach().to(main.dtype))
        if not math.isfinite(value):
            return self._nonfinite(value, losses)
        self.dense.zero_grad(set_to_none=True)
        if self.rows is not None:
            self.rows.begin(main, averaged=True)
        if self.per_task and len(terms) > 1:
            surgery = self.surgery
            tasks = surgery.surgery.tasks if surgery is not None else ()
            if surgery is not None:
                surgery.surgery.new_step()
            # the surgery's tasks first: each one's dense gradients are taken aside after its backward, and what
            # the other terms add afterwards stays in .grad (DenseSurgery.apply adds it)
            items = [(n, terms[n]) for n in tasks if n in terms] + [(n, t) for n, t in terms.items() if n not in tasks]
            for k, (name, term) in enumerate(items):
                with self.rows.task(name) if self.rows is not None else contextlib.nullcontext():
                    term.backward(retain_graph=k + 1 < len(items))
                if surgery is not None and name in tasks:
                    surgery.collect(name)
            if regularizer is not None:
                regularizer.backward()
        else:
            (data if regularizer is None else data + regularizer).backward()
        # 4. row transforms (surgery -> transfer -> freeze -> clip) and the row optimizer, touched rows only
        if self.rows is not None:
            self.rows.apply()
        # 5. dense: the global batch's gradients (torchrun), surgery per group, then the update
        self._average_dense(self.surgery.pending() if self.surgery is not None else [])
        if self.surgery is not None:
            self.surgery.apply()
        self.dense.step()
        return StepResult(value, {k: v.detach() for k, v in losses.items()})
