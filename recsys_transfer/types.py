"""The one data contract: a :class:`Batch` flows from the loader to the model unchanged.

Shapes (B = batch size, F = number of sparse fields, D = number of dense fields):

* ``dense``: ``float32[B, D]`` (``D`` may be 0).
* ``sparse``: a TorchRec ``KeyedJaggedTensor`` with keys = sparse field names (in ``meta.json`` order),
  ``lengths`` of shape ``[F * B]`` (field-major, as TorchRec expects; ``L[f][b]`` ids for field ``f`` of row
  ``b``) and ``values`` of shape ``[sum_f,b L[f][b]]`` holding ids in ``[0, vocab_size)`` of each field.
  Single-valued fields have ``L[f][b] = 1``; a list field (``multi_valued`` in ``meta.json``) has the length of
  each row's list, 0 for an empty one. A field sharing another's vocabulary (``vocab_of``) holds ids of that
  field's vocabulary.
* ``labels``: ``{label column: float32[B]}`` so multi-task models fit the same contract.

A model's ``forward(batch)`` returns ``{task name: output}`` (see :mod:`recsys_transfer.tasks` for each kind's
shape; a :class:`FactoredScores` for a full softmax too large to materialize), or a :class:`ModelOutput` when it also has auxiliary outputs for model-specific loss terms
(:mod:`recsys_transfer.objectives`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(torch.device(device), non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), {k: v.pin_memory() for k, v in self.labels.items()})


class FactoredScores(NamedTuple):
    """A retrieval output too large to materialize: the scores ``query @ candidates.T`` (``query [M, C]``,
    ``candidates [S, C]``: ``[M, S]``) of M predictions over a shared candidate set, each prediction's positive at
    column ``positive [M]`` (long). A sequence model's full softmax returns this in training (S = every item), so
    the objective (:func:`recsys_transfer.objectives.factored_softmax_loss`) computes the cross entropy chunk by
    chunk without the ``[M, S]`` logits; :meth:`materialize` gives them."""

    query: torch.Tensor
    candidates: torch.Tensor
    positive: torch.Tensor

    def materialize(self) -> torch.Tensor:
        return self.query @ self.candidates.t()  # [M, S]


@dataclass
class ModelOutput:
    """``tasks``: ``{task name: output}``; ``aux``: ``{term key: value}`` read by the objective's model-specific
    terms (:data:`recsys_transfer.objectives.AUX_TERMS`), never by metrics."""

    tasks: dict[str, torch.Tensor]
    aux: dict[str, object] = field(default_factory=dict)


def split_output(output) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """``(task outputs, auxiliary outputs)`` of what a model's forward returned (a dict or a :class:`ModelOutput`)."""
    if isinstance(output, ModelOutput):
        return output.tasks, output.aux
    return output, {}
