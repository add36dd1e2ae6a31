"""The transfer plug-in: one switch (``mode``) turns any model built on TorchRec tables (EmbeddingBagCollection
or EmbeddingCollection, plain or sharded by DistributedModelParallel) into B / +T / +Ours / select / lexico
training, without touching the model's code. A convenience over the row pipeline for a hand-written loop; the
trainer composes the same pieces in :class:`recsys_transfer.train.step.TrainStep`.

    plugin = TransferPlugin(model, meta, TransferConfig(mode="+Ours", fields=("zip",)),
                            RowsConfig(optimizer="adam", lr=1e-3), domains=selection)
    dense_opt = torch.optim.Adam(plugin.dense_parameters(), lr=1e-3)
    for batch in loader:
        loss = bce(model(batch)["label"], batch.labels["label"])
        dense_opt.zero_grad()
        plugin.backward(loss)        # the touched rows are updated in this call's backward phase
        dense_opt.step()             # theta: ordinary optimizer on l_main (Algorithm 1, first line)

Modes (paper Sec. 5 notation): ``B`` main loss only; ``+T`` ``l_main + lam * l_transfer`` with the frequency
domains (S = head, T = tail); ``select`` the same with the selective target domain T'_eta (Eq. 3); ``lexico`` the
item-wise barrier (Algorithm 1) on the frequency domains; ``+Ours`` barrier + selective domain. Every table of
the model, transferred or not, is updated by the same row optimizer in the backward phase, so modes differ only in
the update direction (:mod:`recsys_transfer.rows`, :mod:`recsys_transfer.transfer.barrier`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.transfer.barrier import TransferTransform, transfer_transform


class TransferPlugin:
    """Attach to ``model`` (plain or wrapped by DistributedModelParallel); see module docstring.

    ``domains``: per field, the selective target domain as a bool array over ids (required for ``+Ours`` and
    ``select``; see :mod:`recsys_transfer.transfer.domains`). Source = the field's head ids from ``meta.json``.
    """

    def __init__(self, model: nn.Module, meta, config: TransferConfig, rows: RowsConfig = RowsConfig(),
                 domains: dict[str, np.ndarray] | None = None) -> None:
        self.model = model
        self.meta = meta
        self.config = config
        self.pipeline = attach_rows(model, rows)
        self.transfer: TransferTransform | None = transfer_transform(self.pipeline, meta, config, domains)
        if self.transfer is not None:
            self.pipeline.add_transform(self.transfer)
        self.fields = config.transfer_fields(meta)

    @property
    def optimizer(self):
        return self.pipeline.optimizer

    @property
    def table_weights(self) -> list[torch.Tensor]:
        return self.pipeline.table_weights

    @property
    def losses(self) -> dict:
        """The transfer loss objects, one per embedding width (batched over tables)."""
        return self.transfer.losses if self.transfer is not None else {}

    def dense_parameters(self) -> list[nn.Parameter]:
        """Model parameters outside the embedding collections (theta): give these to the dense optimizer."""
        return self.pipeline.dense_parameters()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the touched rows updated at its end (one backward phase of the pipeline)."""
        self.pipeline.begin(loss)
        loss.backward()
        self.pipeline.apply()

    def set_main_loss(self, loss: torch.Tensor) -> None:
        """For a bare ``loss.backward()`` outside a phase: ``l_main`` of the barrier's phi_i."""
        self.pipeline.set_main_loss(loss)

    def stats(self) -> dict[str, dict]:
        return self.pipeline.stats()
