"""Record the training reference that ``tests/test_reference_updates.py`` compares against.

Written and run at commit 89c3dfe (the last commit before the training core was rebuilt, issue 9), with that
commit's API (``TransferPlugin`` + ``train.loop.train_step``), so the rebuilt row pipeline can be proved to give
the same numbers: DeepFM (dim 4, MLP [8]) in float64 on real ML-100K batches (prepared with the default split),
6 shuffled batches of 256, dense Adam lr 1e-2; every transfer mode x every row optimizer with the adversarial
loss, and +Ours with the other losses. Per state-dict tensor, per row-optimizer state tensor and per transfer
loss parameter it stores a float64 sketch: the sum, the sum of absolute values and the dot product with a fixed
N(0, 1) vector (numpy seed 0); plus the loss of every step and the last step's statistics. It is kept for the
record; it does not run against the rebuilt API.

    python tests/reference/record_row_updates.py ../shared/data/movielens-100k tests/reference/row_updates.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

CASES = [(mode, opt, "adversarial") for mode in ("B", "+T", "select", "lexico", "+Ours")
         for opt in ("sgd", "momentum", "adam", "rowwise_adagrad")]
CASES += [("+Ours", "adam", loss) for loss in ("mmd", "moment", "cosreg")]
FIELDS = ("zip", "user_id")
LRS = {"sgd": 0.05, "momentum": 0.05, "adam": 1e-2, "rowwise_adagrad": 0.05}


def sketch(t: torch.Tensor) -> list[float]:
    x = t.detach().double().reshape(-1).numpy()
    r = np.random.default_rng(0).standard_normal(len(x))
    return [float(x.sum()), float(np.abs(x).sum()), float(x @ r)]


def main(raw: str, out_path: str) -> None:
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.flat import share_storage
    from recsys_transfer.data.movielens import prepare_movielens
    from recsys_transfer.models.deepfm import DeepFM
    from recsys_transfer.train.loop import train_step
    from recsys_transfer.transfer.domains import load_domains, select_command
    from recsys_transfer.transfer.plugin import TransferConfig, TransferPlugin
    from recsys_transfer.types import Batch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    meta = prepare_movielens(Path(raw), work / "ml", progress=False)
    select_command(work / "ml", list(FIELDS))
    domains = load_domains(work / "ml" / "selection", FIELDS, meta)
    cases = {}
    for mode, opt, loss in CASES:
        torch.manual_seed(5)
        model = DeepFM(meta, embedding_dim=4, hidden=(8,)).double()
        for ebc in (model.embedding, model.linear.tables):  # .double() gave each table its own storage
            share_storage([bag.weight for bag in ebc.embedding_bags.values()])
        plugin = TransferPlugin(model, meta, TransferConfig(mode=mode, loss=loss, fields=FIELDS, optimizer=opt,
                                                            lr=LRS[opt], lam=0.5, seed=3), domains=domains)
        for transfer_loss in plugin.losses.values():
            transfer_loss.double()  # the discriminators (re-packed in float64)
        dense = torch.optim.Adam(plugin.dense_parameters(), lr=1e-2)
        losses = []
        for step, b in enumerate(BatchLoader(work / "ml", "train", 256, shuffle=True, seed=7, prefetch=0)):
            if step == 6:
                break
            b = Batch(b.dense.double(), b.sparse, {k: v.double() for k, v in b.labels.items()})
            losses.append(float(train_step(model, b, dense, "label", plugin).detach()))
        names = {id(p): n for n, p in model.named_parameters()}
        state = {f"{names[id(p)]}/{k}": sketch(v) for p in plugin.table_weights
                 for k, v in plugin.optimizer.state[p].items()}
        disc = {f"{dim}/{n}": sketch(p) for dim, lo in plugin.losses.items() for n, p in lo.named_parameters()}
        cases[f"{mode}|{opt}|{loss}"] = {
            "losses": losses, "weights": {k: sketch(v) for k, v in model.state_dict().items()},
            "row_state": state, "transfer_params": disc,
            "stats": {k: v for k, v in plugin.stats().items()}}
        print(mode, opt, loss, losses[-1])
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    doc = {"dtypes": dtypes, "recorded_at": "89c3dfe", "dataset_id": meta.dataset_id, "fields": FIELDS, "lrs": LRS, "cases": cases}
    Path(out_path).write_text(json.dumps(doc, indent=0) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
