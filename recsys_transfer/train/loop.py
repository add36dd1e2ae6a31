"""The training loop (single process for now; the distributed trainer builds on it).

``train_epoch`` runs ``loss = BCE-with-logits(model(batch)[label], batch.labels[label])`` and one optimizer step
per batch; ``evaluate`` returns the exact labels and sigmoid scores of a split, so every metric (AUC, log loss,
head/tail AUC) is computed on the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.errors import UserError
from recsys_transfer.metrics import auc, logloss


def check_dataset(model: nn.Module, loader: BatchLoader) -> None:
    """A model built for one prepared dataset refuses another (FuxiCTR's feature-map handshake)."""
    expected = getattr(model, "dataset_id", None)
    if expected is not None and expected != loader.meta.dataset_id:
        raise UserError(f"{loader.data_dir}: dataset id {loader.meta.dataset_id} does not match the model's {expected}")


@dataclass
class EpochStats:
    loss: float
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, label: str, plugin=None) -> torch.Tensor:
    """One step: BCE-with-logits on ``label``, backward (through ``plugin.backward`` when a transfer plug-in owns
    the embedding rows), dense optimizer step. Returns the loss."""
    loss = F.binary_cross_entropy_with_logits(model(batch)[label], batch.labels[label])
    optimizer.zero_grad(set_to_none=True)
    if plugin is None:
        loss.backward()
    else:
        plugin.backward(loss)
    optimizer.step()
    return loss


def train_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer, label: str,
                progress: bool = False, plugin=None, after_step=None) -> EpochStats:
    """One pass over ``loader``. With a transfer ``plugin`` (see :mod:`recsys_transfer.transfer.plugin`) the
    embedding rows are updated inside ``plugin.backward`` and ``optimizer`` holds the dense parameters only."""
    check_dataset(model, loader)
    model.train()
    total, rows, t0 = 0.0, 0, time.perf_counter()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, total=len(loader), desc="train", unit="batch", leave=False, mininterval=0.5)
    for batch in it:
        loss = train_step(model, batch, optimizer, label, plugin)
        if after_step is not None:
            after_step()
        total += float(loss.detach()) * batch.batch_size
        rows += batch.batch_size
        if progress and rows // batch.batch_size % 50 == 0:
            it.set_postfix(loss=f"{total / rows:.4f}", refresh=False)
    return EpochStats(total / max(rows, 1), rows, time.perf_counter() - t0)


@torch.no_grad()
def predict(model: nn.Module, loader: BatchLoader, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigmoid scores) over the whole loader, in loader order."""
    check_dataset(model, loader)
    model.eval()
    ys, ps = [], []
    for batch in loader:
        ps.append(torch.sigmoid(model(batch)[label]).double().numpy())
        ys.append(batch.labels[label].numpy())
    return np.concatenate(ys), np.concatenate(ps)


def evaluate(model: nn.Module, loader: BatchLoader, label: str) -> dict[str, float]:
    y, p = predict(model, loader, label)
    return {"auc": auc(y, p), "logloss": logloss(y, p), "rows": int(len(y))}
