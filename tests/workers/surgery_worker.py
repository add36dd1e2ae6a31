"""torchrun worker for the sharded gradient-surgery test (tests/test_surgery_distributed.py).

For each --configs entry ``sharding:method:row_groups`` each rank trains the same two-task DeepFM (from --init) on
the same global batches (rank r takes rows [r*B, (r+1)*B) of each global batch of size W*B) under
DistributedModelParallel without DDP (``shard_model(..., data_parallel=False)``), with the step of
``compose_step`` (Adam rows, the default dense optimizer, PCGrad or GradVac over the shared dense layers and the
rows; a loss weighting when the entry names one), and saves its local shards (with their row offsets), the dense
parameters, the weighting's learned parameters and the surgery's state to
--out/<sharding>-<method>-<row_groups>/rank<r>.pt. One process group for every config: torchrun starts once. First, the
same step over a model sharded WITH DDP is built and its refusal recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from barrier_worker import local_rows  # noqa: E402

from recsys_transfer.config import MultitaskConfig, RowsConfig  # noqa: E402
from recsys_transfer.data.loader import BatchLoader  # noqa: E402
from recsys_transfer.data.prepared import DatasetMeta  # noqa: E402
from recsys_transfer.models.deepfm import DeepFM  # noqa: E402
from recsys_transfer.train.compose import compose_step  # noqa: E402
from recsys_transfer.train.distributed import exit_rank, init_distributed, shard_model  # noqa: E402


def model_of(meta) -> DeepFM:
    return DeepFM(meta, embedding_dim=8, hidden=(16, 16))


def multitask_of(method: str, row_groups: str, weighting: str = "equal") -> MultitaskConfig:
    return MultitaskConfig(surgery=method, row_groups=row_groups, groups="layer", beta=0.2, seed=3,
                           weighting=weighting)


ROWS = RowsConfig(optimizer="adam", lr=1e-2)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", required=True, help="sharding:method:row_groups[:weighting],...")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()

    info = init_distributed()
    meta = DatasetMeta.load(args.data)
    W, B = info.world_size, args.batch
    # one backward per task with DDP around the dense part is refused (DDP averages one backward per forward)
    try:
        compose_step(shard_model(model_of(meta), info.device, sharding_type="row_wise"), meta, rows=ROWS,
                     multitask=multitask_of("pcgrad", "table"))
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    for config in args.configs.split(","):
        sharding, method, row_groups, *weighting = config.split(":")
        torch.manual_seed(0)
        model = model_of(meta)
        model.load_state_dict(torch.load(args.init))
        # surgery: no DDP (one backward per task); none: TorchRec's DDP (the weighting's parameters are outside it)
        dmp = shard_model(model, info.device, sharding_type=sharding, data_parallel=method == "none")
        step = compose_step(dmp, meta, rows=ROWS, multitask=multitask_of(method, row_groups, *weighting))
        loader = BatchLoader(args.data, "train", W * B, drop_last=True, prefetch=0)
        for k, batch in enumerate(loader):
            if k == args.steps:
                break
            step(local_rows(batch, info.rank * B, (info.rank + 1) * B))
        saved = {}
        for key, value in dmp.state_dict().items():
            if hasattr(value, "local_shards"):
                saved[key] = [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                              for s in value.local_shards()]
            else:
                saved[key] = [([0] * value.dim(), value.detach().clone())]
        out = args.out / config.replace(":", "-")
        out.mkdir(parents=True, exist_ok=True)
        learned = {k: v.detach().clone() for k, v in step.weighting.parameters().items()} if step.weighting else {}
        surgery = step.surgery.surgery.state_dict() if step.surgery is not None else None
        torch.save({"state": saved, "surgery": surgery, "refused": refused,
                    "weighting": learned},
                   out / f"rank{info.rank}.pt")
    exit_rank(0)


if __name__ == "__main__":
    sys.exit(main())
