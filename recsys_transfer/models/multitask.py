"""What every multi-task model here shares: the input layer and one output per task.

Input: ``x = [v_1; ...; v_F; dense]``, the pooled embedding of every sparse field (ONE TorchRec
EmbeddingBagCollection, ``self.embedding``, built by :func:`recsys_transfer.modules.embedding.make_ebc` and shared by
all tasks, so the row pipeline and the transfer modes reach its tables as they reach DeepFM's) followed by the
batch's dense features: ``[B, F * k + D]``. A dataset without sparse fields (dense only) has no collection and
``x = dense``; one without dense fields has ``D = 0``.

Output: ``{task: logit [B]}`` for binary tasks, ``{task: value [B]}`` for regression tasks and ``{task: [B, C]}`` for
multiclass tasks (each task's last layer has the task's width); no sigmoid or loss in the model. Retrieval tasks are
refused (these models score rows).
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.modules.embedding import make_ebc, output_keys, values_in_order
from recsys_transfer.modules.heads import TaskColumns
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


def check_widths(model: str, **widths) -> None:
    """Every count or layer width >= 1: an int, or a non-empty tuple of layer widths (an MLP that may have no
    hidden layer, a tower or a gate's, is not checked here)."""
    for name, value in widths.items():
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise UserError(f"{model}: {name} must be {'a non-empty list of ' if values != (value,) else 'a '}"
                            f"positive integer(s), got {value!r}")


class MultiTaskBase(nn.Module):
    """The shared input layer (module docstring); subclasses build their experts, gates and towers on
    ``self.input_dim`` and call :meth:`inputs` and :meth:`task_outputs`."""

    def __init__(self, meta: DatasetMeta, model: str, embedding_dim: int, pooling: dict[str, str] | None,
                 init_std: float, tasks: tuple[TaskSpec, ...] | None) -> None:
        super().__init__()
        check_widths(model, embedding_dim=embedding_dim)
        self.dataset_id = meta.dataset_id
        self.columns = TaskColumns(tuple(tasks or meta.tasks), model)  # refuses retrieval tasks
        self.tasks = self.columns.tasks
        self.num_fields = len(meta.sparse_names)
        self.embedding = make_ebc(meta, embedding_dim, pooling=pooling) if self.num_fields else None
        self._keys = output_keys(self.embedding) if self.embedding is not None else []  # its column order
        if self.embedding is None and pooling:
            raise UserError(f"{model}: pooling {pooling} given, but the dataset has no sparse fields")
        self.input_dim = self.num_fields * embedding_dim + len(meta.dense)
        if self.input_dim == 0:
            raise UserError(f"{model}: the dataset has neither sparse nor dense features")
        if self.embedding is not None:
            for p in self.embedding.parameters():
                nn.init.normal_(p, std=init_std)

    def inputs(self, batch: Batch) -> torch.Tensor:
        """``[B, F * k + D]``: the sparse fields' pooled embeddings, then the dense features."""
        if self.embedding is None:
            return batch.dense  # [B, D]
        flat = values_in_order(self.embedding(batch.sparse), self._keys)  # [B, F * k]
        return torch.cat([flat, batch.dense], dim=1) if batch.dense.shape[1] else flat  # [B, F * k + D]

    def output_layers(self, in_dim: int) -> nn.ModuleList:
        """One ``Linear(in_dim, width of task k)`` per task."""
        return nn.ModuleList(nn.Linear(in_dim, t.width) for t in self.tasks)

    def task_outputs(self, outputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``[B, width_k]`` per task -> ``{task: [B]}`` (``[B, C]`` for a multiclass task)."""
        return {t.name: out.squeeze(1) if t.width == 1 else out for t, out in zip(self.tasks, outputs)}
