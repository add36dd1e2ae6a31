"""The rebuilt training core gives the numbers of the fused row update it replaced.

``tests/reference/row_updates.json`` was recorded at commit 89c3dfe, before the row pipeline existed, by
``tests/reference/record_row_updates.py``: DeepFM in float64 on real ML-100K batches, 6 steps, every training mode
x every row optimizer (adversarial loss) and +Ours with every other loss. Here the same steps run through
:class:`~recsys_transfer.train.step.TrainStep` with the row pipeline (recorded rows -> transfer stage -> row
optimizer), and every weight, every row-optimizer state tensor, every step's loss and the last step's transfer
statistics must match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.flat import share_storage
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.objectives import Objective
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.train.step import TrainStep
from recsys_transfer.transfer.barrier import transfer_transform
from recsys_transfer.transfer.domains import load_domains, select_command
from recsys_transfer.types import Batch

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from record_row_updates import FIELDS, LRS, sketch  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "reference" / "row_updates.json").read_text())


@pytest.fixture(scope="module")
def domains(ml100k_prepared):
    out, meta = ml100k_prepared
    assert meta.dataset_id == REFERENCE["dataset_id"]  # the same prepared rows as the recording
    select_command(out, list(FIELDS), out / "selection_reference")
    return load_domains(out / "selection_reference", FIELDS, meta)


def _close(got: list[float], want: list[float], what: str) -> None:
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-12 * (1 + abs(b)), (what, got, want)


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_training_core_reproduces_the_recorded_updates(ml100k_prepared, domains, case):
    out, meta = ml100k_prepared
    mode, optimizer, loss = case.split("|")
    want = REFERENCE["cases"][case]
    torch.manual_seed(5)
    model = DeepFM(meta, embedding_dim=4, hidden=(8,)).double()
    for ebc in (model.embedding, model.linear.tables):  # .double() gave each table its own storage
        share_storage([bag.weight for bag in ebc.embedding_bags.values()])
    rows = attach_rows(model, RowsConfig(optimizer=optimizer, lr=LRS[optimizer]))
    transfer = transfer_transform(rows, meta, TransferConfig(mode=mode, loss=loss, fields=FIELDS, lam=0.5,
                                                                   seed=3, barrier="paper"), domains)  # recorded: Alg. 1
    if transfer is not None:
        transfer.losses[4].double()
        rows.add_transform(transfer)
    assert (transfer is None) == (mode == "B")
    step = TrainStep(model, Objective(meta.tasks), torch.optim.Adam(rows.dense_parameters(), lr=1e-2), rows)
    losses = []
    for k, b in enumerate(BatchLoader(out, "train", 256, shuffle=True, seed=7, prefetch=0)):
        if k == 6:
            break
        losses.append(step(Batch(b.dense.double(), b.sparse, {n: v.double() for n, v in b.labels.items()})).loss)
    _close(losses, want["losses"], "losses")
    weights = model.state_dict()
    assert sorted(weights) == sorted(want["weights"])
    for name, value in weights.items():
        assert value.dtype == torch.float64
        _close(sketch(value), want["weights"][name], name)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"{names[id(p)]}/{k}": v for p in rows.table_weights for k, v in rows.optimizer.state[p].items()}
    assert sorted(state) == sorted(want["row_state"])
    for name, value in state.items():
        _close(sketch(value), want["row_state"][name], name)
    params = {f"{dim}/{n}": p for dim, lo in (transfer.losses.items() if transfer else []) for n, p in lo.named_parameters()}
    assert sorted(params) == sorted(want["transfer_params"])
    for name, value in params.items():
        _close(sketch(value), want["transfer_params"][name], name)
    stats = rows.stats()
    assert sorted(stats) == sorted(want["stats"])
    for table, s in stats.items():
        for key, value in s.items():
            assert value == pytest.approx(want["stats"][table][key], rel=1e-12, abs=1e-15), (table, key)
