"""Harmlessness on synthetic long-tail data (paper Sec. 5.3, Table 8 setting: SGD + 0.9 momentum).

A deliberately harmful fixed weight (lambda = 100) makes +T lose AUC against B; +Ours with the same transfer loss
(MMD) does not. Measured on this machine (200k rows, seed 0, FM dim 16, 2 epochs, batch 1024, rows: SGD+momentum
lr 0.5, dense: Adam 1e-2): B 0.7324, +T 0.6535, +Ours 0.7375.

Also recorded: with Adam on the rows the paper's alpha = 2 does NOT make +Ours harmless with MMD at lambda = 1
(B 0.7528, +T 0.7398, +Ours 0.7427); Adam normalizes each coordinate by the RMS of mu, which the transfer term
dominates, so the main-loss component is scaled down. +Ours still beats +T there.
"""

from __future__ import annotations

import pytest
import torch

from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
from recsys_transfer.models.fm import FM
from recsys_transfer.train.compose import compose_step
from recsys_transfer.train.evaluate import evaluate
from recsys_transfer.train.loop import train_epoch
from recsys_transfer.transfer.domains import load_domains, select_command

FIELDS = ("item", "user")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("harmless") / "syn"
    meta = prepare_synthetic(SyntheticConfig(rows=200_000, seed=0), out, split=SplitSpec(), head_tail=HeadTailSpec(),
                             progress=False)
    select_command(out, list(FIELDS))
    return out, meta, load_domains(out / "selection", FIELDS, meta)


def _auc(synthetic, mode: str, lam: float, optimizer: str, lr: float, epochs: int = 2) -> float:
    data, meta, domains = synthetic
    torch.manual_seed(0)
    model = FM(meta, embedding_dim=16)
    step = compose_step(model, meta, rows=RowsConfig(optimizer=optimizer, lr=lr),
                        transfer=TransferConfig(mode=mode, loss="mmd", fields=FIELDS, lam=lam), domains=domains,
                        train=TrainConfig(optimizer="adam", lr=1e-2))
    train = BatchLoader(data, "train", 1024, shuffle=True, seed=0, meta=meta)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        train_epoch(step, train, epoch=epoch)
    return evaluate(model, BatchLoader(data, "test", 8192, meta=meta), meta.tasks)["label"]["auc"]


def test_ours_is_harmless_where_fixed_lambda_hurts(synthetic):
    b = _auc(synthetic, "B", 0.0, "momentum", 0.5)
    t = _auc(synthetic, "+T", 100.0, "momentum", 0.5)
    ours = _auc(synthetic, "+Ours", 100.0, "momentum", 0.5)  # lambda is unused by the barrier
    assert t < b - 0.03, (b, t)
    assert ours >= b - 0.002, (b, ours)


def test_adam_alpha_2_limits_but_does_not_remove_harm(synthetic):
    b = _auc(synthetic, "B", 0.0, "adam", 1e-2)
    t = _auc(synthetic, "+T", 1.0, "adam", 1e-2)
    ours = _auc(synthetic, "+Ours", 1.0, "adam", 1e-2)
    assert t < b - 0.005, (b, t)
    assert t < ours < b, (b, t, ours)
