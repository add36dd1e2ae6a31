"""Sharded (2 processes under torchrun, gloo) final weights equal the single-process run on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.models.fm import FM
from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.transfer.plugin import TransferPlugin

WORKER = Path(__file__).parent / "workers" / "barrier_worker.py"
sys.path.insert(0, str(WORKER.parent))
from seq_model import SeqModel  # noqa: E402
from shards import assemble  # noqa: E402
STEPS, LOCAL_BATCH, WORLD = 4, 64, 2


#: the list dataset (tests/conftest.py): t_item serves item and the mean-pooled hist lists, tags is a list field
LISTS = {"fields": ("item", "tags"), "pooling": {"hist": "mean"}, "table": "t_item"}
ML100K = {"fields": ("zip", "user_id"), "pooling": {}, "table": "t_zip"}


def _model(kind: str, meta, pooling: dict | None = None):
    return SeqModel(meta, dim=8) if kind == "seq" else FM(meta, embedding_dim=8, pooling=pooling)


def _single_process(data: Path, meta, init: dict, mode: str, loss: str, optimizer: str, kind: str = "fm",
                    case: dict = ML100K) -> dict:
    model = _model(kind, meta, case["pooling"])
    model.load_state_dict(init)
    plugin = TransferPlugin(model, meta, TransferConfig(mode=mode, loss=loss, fields=case["fields"], lam=0.5),
                            RowsConfig(optimizer=optimizer, lr=0.05))
    dense = torch.optim.SGD(plugin.dense_parameters(), lr=0.05)
    for step, batch in enumerate(BatchLoader(data, "train", WORLD * LOCAL_BATCH, drop_last=True)):
        if step == STEPS:
            break
        out = F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"])
        dense.zero_grad()
        plugin.backward(out)
        dense.step()
    return model.state_dict()


@pytest.mark.distributed
@pytest.mark.parametrize("sharding,mode,loss,optimizer,kind,dataset", [
    ("table_wise", "lexico", "mmd", "adam", "fm", "ml100k"),
    ("row_wise", "lexico", "mmd", "adam", "fm", "ml100k"),
    ("row_wise", "+T", "adversarial", "momentum", "fm", "ml100k"),
    ("row_wise", "lexico", "moment", "adam", "seq", "ml100k"),  # EmbeddingCollection (sequence embeddings)
    ("row_wise", "lexico", "mmd", "adam", "fm", "lists"),  # list fields, a table serving item and hist
])
def test_sharded_equals_single_process(request, tmp_path, sharding, mode, loss, optimizer, kind, dataset):
    data, meta = request.getfixturevalue(f"{dataset}_prepared")
    case = LISTS if dataset == "lists" else ML100K
    torch.manual_seed(0)
    model = _model(kind, meta, case["pooling"])
    with torch.no_grad():
        for p in model.embedding.parameters():
            p.normal_(0, 0.1)
    init = model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(WORKER),
           "--data", str(data), "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "out"),
           "--sharding", sharding, "--mode", mode, "--loss", loss, "--optimizer", optimizer,
           "--steps", str(STEPS), "--batch", str(LOCAL_BATCH), "--model", kind, "--fields", ",".join(case["fields"]),
           "--pooling", ",".join(f"{k}={v}" for k, v in case["pooling"].items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]

    want = _single_process(data, meta, init, mode, loss, optimizer, kind, case)
    parts = [torch.load(tmp_path / "out" / f"rank{k}.pt") for k in range(WORLD)]
    layouts = set()
    for key, full in want.items():
        got, covered, shards = assemble(init[key], parts, key)
        table = case["table"]
        if key.startswith((f"embedding.embedding_bags.{table}", f"embedding.embeddings.{table}")):
            layouts.update((rank, offsets) for rank, offsets, _ in shards)
        if "embedding_bags" in key or "embeddings" in key:
            assert bool((covered == 1).all()), f"{key}: shards overlap or miss rows"
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5, msg=key)
        assert not torch.equal(full, init[key]), f"{key} did not train"
    if sharding == "row_wise":
        assert len(layouts) == WORLD  # the zip table really is split over both ranks
    else:
        assert len(layouts) == 1
