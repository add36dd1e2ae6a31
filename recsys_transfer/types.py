"""The one data contract: a :class:`Batch` flows from the loader to the model unchanged.

Shapes (B = batch size, F = number of sparse fields, D = number of dense fields):

* ``dense``: ``float32[B, D]`` (``D`` may be 0).
* ``sparse``: a TorchRec ``KeyedJaggedTensor`` with keys = sparse field names (in ``meta.json`` order),
  ``lengths`` of shape ``[F * B]`` (field-major, as TorchRec expects) and ``values`` holding ids in
  ``[0, vocab_size)`` of each field; single-valued fields have all lengths equal to 1.
* ``labels``: ``{task name: float32[B]}`` so multi-task models fit the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass

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
