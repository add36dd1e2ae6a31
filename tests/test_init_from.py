"""model.init_from: a run starts from another run's model by parameter name (a pretrained network that a
fine-tuning run loads), and refuses checkpoints that do not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from recsys_transfer.config import load_config
from recsys_transfer.errors import UserError
from recsys_transfer.models.registry import build_model
from recsys_transfer.train.checkpoint import load_pretrained, save_model
from recsys_transfer.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def _deepfm(meta, seed, **kwargs):
    torch.manual_seed(seed)
    return build_model("deepfm", meta, embedding_dim=8, hidden=(16,), **kwargs)


def test_load_pretrained_by_name(ml100k_prepared, tmp_path):
    _, meta = ml100k_prepared
    source = _deepfm(meta, 0)
    source.pretraining_head = nn.Linear(8, 3)  # only the checkpoint has it: not used
    save_model(source, tmp_path / "pre" / "best", "pre-run")
    target = _deepfm(meta, 1)
    target.new_head = nn.Linear(8, 2)  # only the model has it: keeps its initialization
    new_before = target.new_head.weight.detach().clone()
    differ = [k for k, v in source.state_dict().items() if k in target.state_dict()
              and not torch.equal(v, target.state_dict()[k])]
    assert differ  # another seed: the load below has something to do
    info = load_pretrained(target, tmp_path / "pre")  # a run directory: its best/
    assert info["run_id"] == "pre-run" and info["path"].endswith("best")
    assert info["new"] == ["new_head.weight", "new_head.bias"]
    assert info["unused"] == ["pretraining_head.bias", "pretraining_head.weight"]
    src, got = source.state_dict(), target.state_dict()
    assert sorted(info["loaded"]) == sorted(k for k in src if not k.startswith("pretraining_head"))
    for k in info["loaded"]:
        assert torch.equal(got[k], src[k]), k  # bitwise: tables and dense layers
    assert torch.equal(target.new_head.weight, new_before)


def test_load_pretrained_refuses_what_does_not_fit(ml100k_prepared, tmp_path):
    _, meta = ml100k_prepared
    save_model(_deepfm(meta, 0), tmp_path / "pre" / "best", "pre-run")
    with pytest.raises(UserError, match=r"init_from .*: dnn\.0\.weight is \[16, 72\] in the checkpoint but \[32, 72\]"):
        load_pretrained(build_model("deepfm", meta, embedding_dim=8, hidden=(32,)), tmp_path / "pre")
    with pytest.raises(UserError, match="no complete model checkpoint there"):
        load_pretrained(_deepfm(meta, 0), tmp_path / "nothing")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

    with pytest.raises(UserError, match="shares no parameter name"):
        load_pretrained(Other(), tmp_path / "pre")


def test_a_run_starts_from_another_runs_model(tmp_path, ml100k_dir):
    """End to end: run 2 (init_from run 1, zero learning rates) evaluates exactly run 1's best model."""
    base = [f"data.path={tmp_path / 'data'}", f"data.prepare.input=[{ml100k_dir}]", "train.epochs=1",
            "train.progress=false", "model.params.embedding_dim=8"]
    cfg = load_config(ROOT / "pipelines" / "movielens100k.yaml", base)
    first = run_training(cfg, tmp_path / "run1")
    cfg2 = load_config(ROOT / "pipelines" / "movielens100k.yaml",
                       base + [f"model.init_from={tmp_path / 'run1'}", "train.lr=1e-30", "rows.lr=1e-30"])
    second = run_training(cfg2, tmp_path / "run2")
    run = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert run["init_from"]["run_id"] == first["run_id"] and run["init_from"]["new"] == []
    assert run["init_from"]["unused"] == [] and run["init_from"]["loaded"] > 0
    assert second["test"]["label"]["auc"] == pytest.approx(first["test"]["label"]["auc"], abs=1e-9)
