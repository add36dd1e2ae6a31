"""``make demo``: synthetic long-tail data -> prepared parquet -> selective domain -> B / +T / +Ours -> AUC table.

The embedded default needs no download: 200k synthetic rows whose rare ``item`` values mostly resemble a frequent
one, except a planted 20% that resemble none (see :mod:`recsys_transfer.data.synthetic`). The same FM (dim 16,
TorchRec tables) is trained four times on the same batches: ``B`` (main loss), ``+T`` (fixed ``lam``, frequency
domain), ``+Ours`` (selective domain T'_eta + item-wise barrier on the update the row optimizer applies, the
default) and ``+Ours paper`` (the same with the paper's Algorithm 1 on the direction, which Adam's per-coordinate
normalization makes harmful), and the held-out AUC is printed overall and on test rows whose ``item`` is a head
(source) or tail item.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import human_summary
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
from recsys_transfer.models.fm import FM
from recsys_transfer.train.compose import compose_step
from recsys_transfer.train.evaluate import evaluate
from recsys_transfer.train.loop import train_epoch
from recsys_transfer.transfer.domains import load_domains, select_command

FIELDS = ("item", "user")


#: (row optimizer, its lr, lam of +T): the paper's Table 8 optimizer with a deliberately harmful lam, then Adam
SETTINGS = (("momentum", 0.5, 100.0), ("adam", 1e-2, 1.0))


def run_demo(output: Path, rows: int = 200_000, epochs: int = 2, seed: int = 2022, batch_size: int = 1024,
             loss: str = "mmd") -> dict:
    output = Path(output)
    data = output / "data"
    # one intra-op thread: the FM and batches are small, and on a machine whose cores are busy with anything else
    # OpenMP threads waiting for a core made one +T epoch 20x slower here (50 s vs 2.6 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(output, data, rows, epochs, seed, batch_size, loss)
    finally:
        torch.set_num_threads(threads)


def _run_demo(output: Path, data: Path, rows: int, epochs: int, seed: int, batch_size: int, loss: str) -> dict:
    t0 = time.perf_counter()
    meta = prepare_synthetic(SyntheticConfig(rows=rows, seed=seed), data, split=SplitSpec(seed=seed),
                             head_tail=HeadTailSpec(), progress=True, overwrite=True)
    print(human_summary(meta))
    selections = select_command(data, list(FIELDS))
    domains = load_domains(data / "selection", FIELDS, meta)
    for sel in selections:
        print(f"selective target domain {sel.field}: " + ", ".join(f"{k} {v:,}" for k, v in sel.counts().items()))
    print(f"prepared + selected in {time.perf_counter() - t0:.1f}s -> {data}")

    task = meta.tasks[0].name
    test = BatchLoader(data, "test", 8192, meta=meta)
    results: dict[str, dict] = {}
    for optimizer, lr, lam in SETTINGS:
        print(f"\nFM over TorchRec tables, dim 16, rows: {optimizer} lr {lr}, dense: Adam 1e-2, batch {batch_size}, "
              f"{epochs} epochs; transfer loss {loss} on {', '.join(FIELDS)}; +T uses lam = {lam}")
        block = results[optimizer] = {}
        for label, mode, barrier in (("B", "B", "applied"), ("+T", "+T", "applied"), ("+Ours", "+Ours", "applied"),
                                     ("+Ours paper", "+Ours", "paper")):
            torch.manual_seed(seed)
            model = FM(meta, embedding_dim=16)
            step = compose_step(model, meta, rows=RowsConfig(optimizer=optimizer, lr=lr),
                                transfer=TransferConfig(mode=mode, loss=loss, fields=FIELDS, lam=lam, barrier=barrier),
                                domains=domains, train=TrainConfig(optimizer="adam", lr=1e-2))
            train = BatchLoader(data, "train", batch_size, shuffle=True, seed=seed, meta=meta)
            start = time.perf_counter()
            for epoch in range(epochs):
                train.set_epoch(epoch)
                train_epoch(step, train, epoch=epoch, progress=True)
            m = evaluate(model, test, meta.tasks, meta, transfer_field=FIELDS[0])[task]
            block[label] = {"auc": m["auc"], "head_auc": m["head_auc"], "tail_auc": m["tail_auc"],
                           "seconds": time.perf_counter() - start}
        print(f"{'mode':<12} {'test AUC':>9} {'head AUC':>9} {'tail AUC':>9} {'NTG':>8} {'train s':>8}")
        for mode, r in block.items():
            ntg = block["B"]["auc"] - r["auc"]
            print(f"{mode:<12} {r['auc']:9.4f} {r['head_auc']:9.4f} {r['tail_auc']:9.4f} {ntg:8.4f} {r['seconds']:8.1f}")
    print("\nNTG = AUC(B) - AUC(mode): positive means the transfer hurt. Head/tail: test rows whose item is a "
          "source (top-20%) or rare item.\n+Ours: the barrier on the update the row optimizer applies (default); "
          "+Ours paper: Algorithm 1 on the direction, alpha 2 -- under momentum its gain is mostly the doubled main "
          "step (B at twice the row lr gains as much: benchmarks/results/harmless_stress.md), under Adam it hurts.")
    record = {"rows": rows, "epochs": epochs, "seed": seed, "loss": loss, "settings": SETTINGS, "results": results}
    (output / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
