"""``make demo``: synthetic long-tail data -> prepared parquet -> FM on TorchRec tables -> held-out AUC.

The embedded default needs no download. (The B / +T / +Ours comparison joins this demo with the transfer
plug-in and the model zoo.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import human_summary
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
from recsys_transfer.models.fm import FM
from recsys_transfer.train.loop import evaluate, train_epoch


def run_demo(output: Path, rows: int = 200_000, epochs: int = 2, seed: int = 2022, batch_size: int = 1024) -> dict:
    output = Path(output)
    data = output / "data"
    t0 = time.perf_counter()
    meta = prepare_synthetic(SyntheticConfig(rows=rows, seed=seed), data, split=SplitSpec(seed=seed),
                             head_tail=HeadTailSpec(), progress=True)
    print(human_summary(meta))
    print(f"prepared in {time.perf_counter() - t0:.1f}s -> {data}")

    torch.manual_seed(seed)
    label = meta.labels[0]
    model = FM(meta, embedding_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = BatchLoader(data, "train", batch_size, shuffle=True, seed=seed, meta=meta)
    valid = BatchLoader(data, "valid", 8192, meta=meta)
    test = BatchLoader(data, "test", 8192, meta=meta)
    print(f"FM over TorchRec EmbeddingBagCollection, dim 16, Adam 1e-3, batch {batch_size}")
    history = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        stats = train_epoch(model, train, optimizer, label, progress=True)
        val = evaluate(model, valid, label)
        history.append({"epoch": epoch, "train_loss": stats.loss, "rows_per_s": stats.rows_per_s, **{f"valid_{k}": v for k, v in val.items()}})
        print(f"epoch {epoch}: train loss {stats.loss:.4f} ({stats.rows_per_s:,.0f} rows/s)  "
              f"valid AUC {val['auc']:.4f}  logloss {val['logloss']:.4f}")
    result = evaluate(model, test, label)
    print(f"held-out test AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}  ({result['rows']:,} rows)")
    record = {"test": result, "history": history, "rows": rows, "seed": seed}
    (output / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
