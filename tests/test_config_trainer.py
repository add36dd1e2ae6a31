"""Strict configs and the trainer end to end (raw ML-100K -> prepared -> DeepFM -> metrics.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_transfer.config import load_config
from recsys_transfer.errors import UserError
from recsys_transfer.train.run import run_training

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_keys_rejected_at_every_level(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml\.train: unknown key\(s\) \['batchsize'\]"):
        load_config(_write(tmp_path, "data: {path: x}\ntrain: {batchsize: 3}\n"))
    with pytest.raises(UserError, match=r"c\.yaml: unknown key\(s\) \['trian'\]"):
        load_config(_write(tmp_path, "data: {path: x}\ntrian: {}\n"))
    with pytest.raises(UserError, match=r"data\.prepare: unknown key\(s\) \['rowz'\]"):
        load_config(_write(tmp_path, "data: {path: x, prepare: {rowz: 3}}\n"))
    with pytest.raises(UserError, match=r"train\.epochs: expected int, got 'many'"):
        load_config(_write(tmp_path, "data: {path: x}\ntrain: {epochs: many}\n"))
    with pytest.raises(UserError, match=r"transfer: transfer mode must be one of"):
        load_config(_write(tmp_path, "data: {path: x}\ntransfer: {mode: '+Theirs'}\n"))
    with pytest.raises(UserError, match=r"c\.yaml:3: invalid YAML"):
        load_config(_write(tmp_path, "data: {path: x}\ntrain: [\n"))


def test_overrides_and_shipped_pipelines(tmp_path):
    cfg = load_config(ROOT / "pipelines" / "movielens100k.yaml",
                      ["train.epochs=3", "transfer.mode=+Ours", "model.params.embedding_dim=32"])
    assert cfg.train.epochs == 3 and cfg.transfer.mode == "+Ours" and cfg.model.params["embedding_dim"] == 32
    assert cfg.transfer.fields == ("zip",) and cfg.train.lr == 1e-3
    for path in (ROOT / "pipelines").glob("*.yaml"):
        load_config(path)  # every shipped pipeline parses strictly
    with pytest.raises(UserError, match=r"--set 'train\.epochs': expected key\.path=value"):
        load_config(ROOT / "pipelines" / "synthetic.yaml", ["train.epochs"])


def test_train_movielens_end_to_end(tmp_path, ml100k_dir):
    cfg = load_config(ROOT / "pipelines" / "movielens100k.yaml", [
        f"data.path={tmp_path / 'data'}", f"data.prepare.input=[{ml100k_dir}]", "train.epochs=3",
        "train.progress=false", "transfer.mode=+Ours", "train.group_field=user_id"])
    result = run_training(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epochs = [json.loads(line) for line in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    assert metrics["status"] == "completed" and json.loads((tmp_path / "run" / "run.json").read_text())["status"] == \
        "completed"
    assert len(epochs) == metrics["epochs_run"] == 3
    test = metrics["test"]["label"]
    assert test["rows"] == result["test"]["label"]["rows"] > 7000
    assert test["auc"] > 0.75 and 0.5 < test["gauc"] < test["auc"] + 0.05
    assert test["head_rows"] + test["tail_rows"] == test["rows"]
    assert 0.5 < test["tail_auc"] < 1 and 0.5 < test["head_auc"] < 1
    assert 0.5 < test["ne"] < 1 and 0.8 < test["calibration"] < 1.2
    assert metrics["monitor"] == "valid/label/auc"
    assert metrics["best_epoch"] == max(range(3), key=lambda e: epochs[e]["valid/label/auc"])
    assert metrics["valid_best"]["label"]["auc"] == epochs[metrics["best_epoch"]]["valid/label/auc"]
    assert (tmp_path / "data" / "selection" / "selection.json").is_file()  # +Ours selected T'_eta itself
    assert metrics["transfer"]["embedding.t_zip"]["target_rows"] > 0


@pytest.mark.distributed
def test_train_under_torchrun(tmp_path, ml100k_prepared):
    data, meta = ml100k_prepared
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "recsys_transfer", "train", "--config", str(ROOT / "pipelines" / "movielens100k.yaml"),
           "--set", f"data.path={data}", "--set", "train.epochs=1", "--set", "train.progress=false",
           "--set", "transfer.mode=lexico", "--output", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["test"]["label"]["rows"] == meta.split_rows["test"]  # predictions gathered from both ranks
    assert metrics["test"]["label"]["auc"] > 0.7
    assert r.stdout.count("test label: auc") == 1  # rank 0 reports
