"""List fields end to end on the real ML-100K: genres as a bag and a 5-item user history sharing item_id's table
(``prepare_movielens(genres="bag", history=5)``), DeepFM under +Ours with the transfer on the item table."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig, load_config
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.train.compose import compose_step
from recsys_transfer.train.run import run_training
from recsys_transfer.transfer.domains import load_domains, select_command

ROOT = Path(__file__).resolve().parents[1]


def test_deepfm_ours_on_history_and_genre_bags_moves_only_the_touched_rows(ml100k_lists_prepared, tmp_path):
    prepared, meta = ml100k_lists_prepared
    data = tmp_path / "data"
    shutil.copytree(prepared, data)  # the selection is written next to the data
    select_command(data, ["item_id"], data / "selection", top_k=200)
    domains = load_domains(data / "selection", ("item_id",), meta)
    torch.manual_seed(0)
    model = DeepFM(meta, embedding_dim=8, hidden=(16,), pooling={"history": "mean"})
    assert model.embedding.embedding_bag_configs()[1].feature_names == ["item_id", "history"]
    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-2),
                        transfer=TransferConfig(mode="+Ours", loss="mmd", fields=("item_id",), lam=1.0),
                        domains=domains, train=TrainConfig(optimizer="adam", lr=1e-2))
    tables = {f"{c}.{n}": b.weight for c, ebc in (("embedding", model.embedding), ("linear", model.linear.tables))
              for n, b in ebc.embedding_bags.items()}
    features = {cfg.name: cfg.feature_names for cfg in model.embedding.embedding_bag_configs()}
    history_only_moved = 0
    for k, batch in enumerate(BatchLoader(data, "train", 512, shuffle=True, seed=1, meta=meta, prefetch=0)):
        if k == 4:
            break
        before = {name: w.detach().clone() for name, w in tables.items()}
        result = step(batch)
        assert math.isfinite(result.loss)
        for name, w in tables.items():
            fs = features[name.split(".", 1)[1]]
            touched = torch.unique(torch.cat([batch.sparse[f].values() for f in fs]))
            moved = (w.detach() != before[name]).any(dim=1).nonzero().view(-1)
            assert len(moved) and bool(torch.isin(moved, touched).all()), name  # only the batch's rows move
            if name == "embedding.t_item_id":
                only = ~torch.isin(moved, batch.sparse["item_id"].values())
                history_only_moved += int(only.sum())  # rows reached through the history lists alone
        stats = step.rows.stats()
        assert set(stats) == {"embedding.t_item_id"} and stats["embedding.t_item_id"]["target_rows"] > 0
    assert history_only_moved > 100


def test_train_run_with_list_fields(ml100k_lists_prepared, tmp_path):
    """The trainer on the list dataset: one epoch of +Ours (the selection counts the list fields' ids), metrics
    with head/tail AUC on item_id (whose table the history shares)."""
    prepared, _ = ml100k_lists_prepared
    shutil.copytree(prepared, tmp_path / "data")
    cfg = load_config(ROOT / "pipelines" / "movielens100k.yaml", [
        f"data.path={tmp_path / 'data'}", "train.epochs=1", "train.batch_size=2048", "train.progress=false",
        "transfer.mode=+Ours", "transfer.fields=[history]", "data.select_top_k=200", "rows.lr=1e-2",
        "train.lr=1e-2", "model.params={embedding_dim: 8, hidden: [32], pooling: {history: mean}}"])
    run_training(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = metrics["test"]["label"]
    assert metrics["status"] == "completed" and test["field"] == "item_id"
    assert test["head_rows"] + test["tail_rows"] == test["rows"] > 7000
    assert test["auc"] > 0.7 and np.isfinite(test["logloss"])
    assert metrics["transfer"]["embedding.t_item_id"]["target_rows"] > 0
