"""torchrun (or plain) worker for the resharding tests of the train state (tests/test_resume.py).

``--action save``: a DeepFM on ML-100K with the lexico barrier (adversarial loss, applied barrier: Adam row state
with its ``transfer_`` copies, discriminators) trains ``--steps`` steps on this rank's part of the data and saves its
:class:`~recsys_transfer.train.state.TrainState` to ``--ckpt``. ``--action load``: the same model built from another
seed loads it. Either way each rank then dumps what it holds — its table shards, their row-optimizer state (with
global row offsets) and its discriminators — to ``--dump/rank<r>.pt`` for the test to assemble and compare.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.registry import build_model
from recsys_transfer.train.checkpoint import CheckpointDir
from recsys_transfer.train.compose import compose_step
from recsys_transfer.train.distributed import exit_rank, init_distributed, shard_model
from recsys_transfer.train.loop import FitResult, train_epoch
from recsys_transfer.train.state import TrainState


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--dump", type=Path, required=True)
    p.add_argument("--action", choices=("save", "load"), required=True)
    p.add_argument("--sharding", choices=("table_wise", "row_wise"), default="row_wise")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    info = init_distributed("cpu")
    meta = DatasetMeta.load(args.data)
    torch.manual_seed(0 if args.action == "save" else 1)
    model = build_model("deepfm", meta, embedding_dim=8, hidden=[16])
    if info.world_size > 1:
        model = shard_model(model, info.device, sharding_type=args.sharding)
    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-2),
                        transfer=TransferConfig(mode="lexico", loss="adversarial", fields=("zip", "user_id"), lam=0.5))
    loop = FitResult()
    state = TrainState(model, step, None, loop, meta={"run_id": "x"}, rank=info.rank, world_size=info.world_size)
    store = CheckpointDir(args.ckpt)
    if args.action == "save":
        loader = BatchLoader(args.data, "train", 256, shuffle=True, seed=3, drop_last=True, rank=info.rank,
                             world_size=info.world_size, meta=meta)
        train_epoch(step, _First(loader, args.steps), on_step=lambda p: setattr(loop, "global_step", p.batches))
        store.save(state.state_dict(), loop.global_step, {"run_id": "x", "config": {}})
    else:
        state.load(store.latest())
    rows = step.rows
    dump: dict = {"tables": {}, "state": {}, "disc": {}, "step": loop.global_step}
    for slot in rows.slots:
        key = f"{slot.collection.removeprefix('module.')}.{slot.table}"
        dump["tables"][key] = (slot.row_offset, slot.weight.detach().clone())
        dump["state"][key] = {k: (slot.row_offset, v.clone()) for k, v in rows.optimizer.state[slot.weight].items()}
    for stage in rows.transforms:
        for name, rule in getattr(stage, "rules", {}).items():
            dump["disc"][name.removeprefix("module.")] = rule.loss.table_state(rule.loss_index)
    args.dump.mkdir(parents=True, exist_ok=True)
    torch.save(dump, args.dump / f"rank{info.rank}.pt")
    if info.world_size > 1:
        exit_rank(0)
    return 0


class _First:
    """The first ``n`` batches of a loader (an epoch cut short)."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n, self.meta, self.data_dir = loader, n, loader.meta, loader.data_dir

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.n:
                return
            yield batch


if __name__ == "__main__":
    raise SystemExit(main())
