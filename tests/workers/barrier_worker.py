"""torchrun worker for the sharded-vs-single-process equality test (tests/test_barrier_distributed.py).

Each rank trains the same FM on the same global batches (rank r takes rows [r*B, (r+1)*B) of each global batch of
size W*B) under DistributedModelParallel with the transfer plug-in, starting from the weights in --init, and saves
its local shards (with their row offsets), the dense parameters and the plan's rows to --out/rank<r>.pt. The layout:
one --sharding type for every table, or a ``sharding`` config section: the size policy (--row-wise-min-rows N) and
per-table overrides (--tables t_zip=table_row_wise,...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.models.fm import FM
from recsys_transfer.train.distributed import exit_rank, init_distributed, shard_model
from recsys_transfer.train.sharding import sharded_plan_rows
from recsys_transfer.config import RowsConfig, ShardingConfig, TransferConfig
from recsys_transfer.transfer.plugin import TransferPlugin
from recsys_transfer.types import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def local_rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch (list fields: those rows' lists)."""
    keys = batch.sparse.keys()
    values, lengths = [], []
    for k in keys:
        jt = batch.sparse[k]
        offsets = jt.offsets()
        values.append(jt.values()[int(offsets[start]) : int(offsets[stop])])
        lengths.append(jt.lengths()[start:stop])
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=stop - start)
    return Batch(batch.dense[start:stop], kjt, {k: v[start:stop] for k, v in batch.labels.items()})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sharding", choices=("table_wise", "row_wise"))
    p.add_argument("--row-wise-min-rows", type=int)
    p.add_argument("--tables", default="", help="per-table overrides: name=sharding_type,...")
    p.add_argument("--mode", default="lexico")
    p.add_argument("--loss", default="mmd")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--fields", default="zip,user_id")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", choices=("fm", "seq"), default="fm")
    p.add_argument("--pooling", default="", help="list fields' pooling: field=sum|mean,...")
    args = p.parse_args()

    info = init_distributed()
    torch.manual_seed(0)
    meta = DatasetMeta.load(args.data)
    if args.model == "seq":
        sys.path.insert(0, str(Path(__file__).parent))
        from seq_model import SeqModel

        model = SeqModel(meta, dim=8)
    else:
        model = FM(meta, embedding_dim=8, pooling=dict(item.split("=") for item in args.pooling.split(",") if item))
    model.load_state_dict(torch.load(args.init))
    if args.sharding is None:
        tables = dict(item.split("=") for item in args.tables.split(",") if item)
        sharding = ShardingConfig(row_wise_min_rows=args.row_wise_min_rows, tables=tables)
        dmp = shard_model(model, info.device, sharding=sharding, batch_size=args.batch)
    else:
        dmp = shard_model(model, info.device, sharding_type=args.sharding)  # keeps the loaded initial weights
    cfg = TransferConfig(mode=args.mode, loss=args.loss, fields=tuple(args.fields.split(",")), lam=0.5)
    plugin = TransferPlugin(dmp, meta, cfg, RowsConfig(optimizer=args.optimizer, lr=args.lr))
    dense_opt = torch.optim.SGD(plugin.dense_parameters(), lr=args.lr)
    W, B = info.world_size, args.batch
    loader = BatchLoader(args.data, "train", W * B, drop_last=True)
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        local = local_rows(batch, info.rank * B, (info.rank + 1) * B)
        loss = F.binary_cross_entropy_with_logits(dmp(local)["label"], local.labels["label"])
        dense_opt.zero_grad()
        plugin.backward(loss)
        dense_opt.step()
    saved = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            saved[key] = [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
        else:
            saved[key] = [([0] * value.dim(), value.detach().clone())]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": saved, "stats": plugin.stats(), "plan": sharded_plan_rows(dmp)},
               args.out / f"rank{info.rank}.pt")
    exit_rank(0)


if __name__ == "__main__":
    sys.exit(main())
