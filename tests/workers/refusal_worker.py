"""torchrun worker for tests/test_sharding.py: the row pipeline refuses a layout it cannot update on EVERY rank.

For each --types entry, each rank shards a fresh FM with ``shard_model(sharding_type=...)`` (the path that does not
check the row pipeline, as plain TorchRec training may use any type), attaches the row pipeline, and records the
error it raised (or None); then all ranks meet at a barrier, so a rank that went on alone would hang here and fail
the test by its timeout. --out/rank<r>.json: {type: message or null}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from recsys_transfer.config import RowsConfig
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.fm import FM
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.train.distributed import exit_rank, init_distributed, shard_model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--types", default="column_wise,data_parallel")
    args = p.parse_args()
    info = init_distributed()
    meta = DatasetMeta.load(args.data)
    found = {}
    for sharding_type in args.types.split(","):
        torch.manual_seed(0)
        kernel = "dense" if sharding_type == "data_parallel" else "fused"
        dmp = shard_model(FM(meta, embedding_dim=8), info.device, sharding_type=sharding_type, compute_kernel=kernel)
        try:
            attach_rows(dmp, RowsConfig())
            found[sharding_type] = None
        except UserError as exc:
            found[sharding_type] = str(exc)
        dist.barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{info.rank}.json").write_text(json.dumps(found))
    exit_rank(0)


if __name__ == "__main__":
    sys.exit(main())
