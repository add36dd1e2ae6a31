"""Train-state checkpoints and resume (issue 11, sections 1 and 2), on the real ML-100K files.

A run killed with SIGKILL mid-epoch (``RECSYS_TRANSFER_FAULT_STEP``) and started again with the same command ends
with final weights and metrics bitwise equal to the uninterrupted run: in one process and in two (gloo), in mode B
and +Ours (adversarial loss, applied barrier, Adam rows, dropout and an EMA, so the RNG, the row state's
``transfer_`` copies, the discriminators and the EMA all have to come back); torchrun ``--max-restarts 1`` resumes
by itself; a damaged newest checkpoint is named in one line and the previous one is used; another config is
refused with the keys that differ; the row state reshards 2 -> 1 and 1 -> 2 processes, table-wise and row-wise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from recsys_transfer.data.loader import BatchLoader

WORKER = Path(__file__).parent / "workers" / "state_worker.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _config(tmp_path: Path, data: Path, mode: str) -> Path:
    p = tmp_path / f"run_{mode.strip('+')}.yaml"
    p.write_text(f"""data: {{path: {data}}}
model: {{name: deepfm, params: {{embedding_dim: 8, hidden: [32], dropout: 0.2}}}}
rows: {{optimizer: adam, lr: 1.0e-2}}
transfer: {{mode: "{mode}", loss: adversarial, fields: [zip]}}
train: {{epochs: 2, batch_size: 2048, lr: 1.0e-3, progress: false, ema_decay: 0.9}}
checkpoint: {{every_steps: 5, keep: 2}}
""")
    return p


def _train(config: Path, out: Path, *extra: str, procs: int = 1, fault: int | None = None, fault_rank: int = 0,
           restarts: int = 0) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if fault is not None:
        env.update(RECSYS_TRANSFER_FAULT_STEP=str(fault), RECSYS_TRANSFER_FAULT_RANK=str(fault_rank))
    cmd = [sys.executable, "-m", "recsys_transfer"]
    if procs > 1:
        cmd += ["launch", "--standalone", "--nproc-per-node", str(procs), "--max-restarts", str(restarts), "--"]
    cmd += ["train", "--config", str(config), "--output", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's last checkpoint (model, optimizers, EMA, discriminators)."""
    path = sorted((run / "checkpoints").glob("step-*"))[-1]
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items() if hasattr(m, "size")}
    dcp.load(out, checkpoint_id=str(path))
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["status"] == mb["status"] == "completed"
    for key in ("test", "valid_best", "best_epoch", "best_monitor", "transfer", "epochs_run"):
        assert ma[key] == mb[key], key
    timing = ("train/seconds", "train/rows_per_s")
    ea, eb = ([{k: v for k, v in json.loads(x).items() if k not in timing}
               for x in (r / "epochs.jsonl").read_text().splitlines()] for r in (a, b))
    assert ea == eb
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys() and any(k.startswith("rows.") for k in sa)
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:5]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["B", "+Ours"])
def test_killed_single_process_run_resumes_bitwise(ml100k_prepared, runs, mode):
    data, _ = ml100k_prepared
    cfg = _config(runs, data, mode)
    whole, cut = runs / f"whole1_{mode}", runs / f"cut1_{mode}"
    assert _train(cfg, whole).returncode == 0
    killed = _train(cfg, cut, fault=37)  # epoch 1 (29 batches per epoch), 2 steps after the checkpoint of step 35
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "fault injection: killing rank 0" in killed.stderr
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000000030", "step-000000035"]
    assert json.loads((cut / "run.json").read_text())["status"] == "running"
    resumed = _train(cfg, cut)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-000000035 (epoch 1, batch 6, step 35" in resumed.stdout
    _assert_same_run(whole, cut)
    run = json.loads((cut / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed_from"][0]["checkpoint"].endswith("step-000000035")
    assert json.loads((cut / "metrics.json").read_text())["run_id"] == run["run_id"]


@pytest.fixture(scope="module")
def whole_two(ml100k_prepared, runs):
    data, _ = ml100k_prepared
    cfg = _config(runs, data, "+Ours")
    out = runs / "whole2"
    r = _train(cfg, out, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, out


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_two_process_run_resumes_bitwise(whole_two, runs):
    cfg, whole = whole_two
    cut = runs / "cut2"
    killed = _train(cfg, cut, procs=2, fault=17, fault_rank=1)  # 14 batches per rank and epoch
    assert killed.returncode == 1 and "[rank 1] worker ended with signal SIGKILL" in killed.stderr
    r = _train(cfg, cut, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_run(whole, cut)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_restart_resumes_from_the_latest_checkpoint_by_itself(whole_two, runs):
    cfg, whole = whole_two
    out = runs / "restarted"
    r = _train(cfg, out, procs=2, fault=17, fault_rank=1, restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fault injection: killing rank 1" in r.stderr
    assert json.loads((out / "run.json").read_text())["resumed_from"][0]["checkpoint"].endswith("step-000000015")
    _assert_same_run(whole, out)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(ml100k_prepared, runs, damage):
    data, _ = ml100k_prepared
    cfg = _config(runs, data, "B")
    whole, cut = runs / "whole1_B", runs / f"damaged_{damage}"
    if not whole.exists():
        assert _train(cfg, whole).returncode == 0
    assert _train(cfg, cut, fault=37).returncode == -9
    shard = cut / "checkpoints" / "step-000000035" / "__0_0.distcp"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    r = _train(cfg, cut)
    assert r.returncode == 0, r.stderr[-2000:]
    problem = (f"{len(raw) // 2} bytes, {len(raw)} when saved (truncated)" if damage == "truncate"
               else "CRC-32 differs from the one saved (corrupted)")
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {shard}: {problem}; falling back to the previous checkpoint"]
    assert "step-000000030 (epoch 1, batch 1, step 30" in r.stdout
    assert f"note: {shard.parent} set aside as damaged-step-000000035" in r.stderr
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == [
        "damaged-step-000000035", "step-000000055", "step-000000058"]
    _assert_same_run(whole, cut)  # exact from the older checkpoint too


def test_another_config_is_refused_with_the_keys_that_differ(ml100k_prepared, runs):
    data, _ = ml100k_prepared
    cfg = _config(runs, data, "B")
    out = runs / "other_config"
    assert _train(cfg, out, "--set", "train.epochs=1", "--set", "checkpoint.every_steps=0", fault=10).returncode == -9
    assert _train(cfg, out, "--set", "train.epochs=1", "--set", "checkpoint.every_steps=0",
                  "--resume").returncode == 2  # no checkpoint yet: nothing to resume
    assert _train(cfg, out, "--set", "train.epochs=1").returncode == 0  # started over: no checkpoint was written
    r = _train(cfg, out, "--set", "train.lr=0.002", "--set", "rows.optimizer=sgd", "--resume")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {out}: holds checkpoints of another config (rows.optimizer: 'adam' -> 'sgd'; train.lr: 0.001 -> "
        "0.002); use the same config, another --output, or --overwrite")
    # a completed run continues with more epochs only when asked (train.epochs may change)
    assert _train(cfg, out, "--set", "train.epochs=2").returncode == 2
    r = _train(cfg, out, "--set", "train.epochs=2", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["epoch"] for x in (out / "epochs.jsonl").read_text().splitlines()] == [0, 1]


def test_loader_start_batch_serves_exactly_the_rest_of_the_epoch(ml100k_prepared):
    data, meta = ml100k_prepared
    loader = BatchLoader(data, "train", 1000, shuffle=True, seed=5, shuffle_buffer_rows=7000, meta=meta, prefetch=0)
    loader.set_epoch(2)
    full = [b.labels["label"].clone() for b in loader]
    for start in (0, 6, 7, len(full) - 1, len(full)):
        loader.set_epoch(2, start_batch=start)
        rest = [b.labels["label"] for b in loader]
        assert len(rest) == len(full) - start
        assert all(torch.equal(x, y) for x, y in zip(rest, full[start:]))
    loader.set_epoch(2, start_batch=9)
    first = next(iter(loader))
    loader.set_epoch(2)
    assert torch.equal(first.sparse.values(), list(loader)[9].sparse.values())


def _assemble(dumps: list[dict], part: str) -> dict[str, torch.Tensor]:
    """Full tables (or their row state) from each rank's (row offset, local rows)."""
    out: dict[str, list] = {}
    for d in dumps:
        for key, value in d[part].items():
            items = value.items() if part == "state" else [("weight", value)]
            for name, (offset, rows) in items:
                out.setdefault(f"{key}/{name}", []).append((offset, rows))
    full = {}
    for key, pieces in out.items():
        pieces.sort(key=lambda p: p[0])
        assert [p[0] for p in pieces] == [sum(len(q[1]) for q in pieces[:k]) for k in range(len(pieces))], key
        full[key] = torch.cat([p[1] for p in pieces])
    return full


def _run_worker(procs: int, *args: str) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(WORKER)]
           if procs > 1 else [sys.executable, str(WORKER)])
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
@pytest.mark.parametrize("saved,loaded", [(2, 1), (1, 2)])
def test_train_state_reshards_between_world_sizes(ml100k_prepared, tmp_path, sharding, saved, loaded):
    data, _ = ml100k_prepared
    common = ["--data", str(data), "--ckpt", str(tmp_path / "ckpt"), "--sharding", sharding]
    _run_worker(saved, *common, "--action", "save", "--dump", str(tmp_path / "save"))
    _run_worker(loaded, *common, "--action", "load", "--dump", str(tmp_path / "load"))
    before = [torch.load(tmp_path / "save" / f"rank{r}.pt") for r in range(saved)]
    after = [torch.load(tmp_path / "load" / f"rank{r}.pt") for r in range(loaded)]
    for part in ("tables", "state"):
        a, b = _assemble(before, part), _assemble(after, part)
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key
    state = _assemble(after, "state")
    # the applied barrier's own optimizer state came along, and rows were really trained (not zeros)
    assert state["embedding.t_zip/transfer_exp_avg"].abs().sum() > 0
    assert state["embedding.t_zip/row_step"].max() == 3  # one update per global step
    disc_a = {k: v for d in before for k, v in d["disc"].items()}
    disc_b = {k: v for d in after for k, v in d["disc"].items()}
    assert disc_a.keys() == disc_b.keys() == {"embedding.t_zip", "embedding.t_user_id"}
    for name in disc_a:
        for part, value in disc_a[name].items():
            assert torch.equal(value, disc_b[name][part]), (name, part)
    assert all(d["step"] == 3 for d in after)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_a_run_resumes_under_another_world_size(whole_two, runs, saved, resumed):
    """Through the trainer: the planner's own plan, every state resharded, the mid-epoch position converted."""
    cfg, _ = whole_two
    out = runs / f"reshard_{saved}_{resumed}"
    fault = 17 if saved == 2 else 37  # 14 batches per epoch and rank with 2 processes, 29 with 1
    assert _train(cfg, out, procs=saved, fault=fault).returncode != 0
    r = _train(cfg, out, procs=resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("resuming from"))
    assert line.endswith(f"saved by {saved} process(es))"), line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["world_size"] == resumed and metrics["epochs_run"] == 2
    assert [json.loads(x)["epoch"] for x in (out / "epochs.jsonl").read_text().splitlines()] == [0, 1]


def test_checkpoint_dir_is_atomic_keeps_the_newest_and_verifies(tmp_path, monkeypatch):
    from recsys_transfer.train.checkpoint import CheckpointDir

    store = CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (5, 10, 15):
        store.save({"w": torch.full((100, 4), float(step)), "meta": b"x"}, step, {"run_id": "r", "step": step})
    assert [p.name for p in store.complete()] == ["step-000000015", "step-000000010"]
    manifest = store.manifest(store.complete()[0])
    assert manifest["run_id"] == "r" and manifest["step"] == 15 and ".metadata" in manifest["files"]

    def killed(*args, **kwargs):  # a process killed while DCP writes: part of the files are there, no rename
        partial = tmp_path / "checkpoints" / ".step-000000020.tmp"
        partial.mkdir()
        (partial / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save({"w": torch.zeros(3)}, 20, {})
    monkeypatch.undo()
    assert store.latest().name == "step-000000015"  # the interrupted save left the previous ones loadable
    loaded = {"w": torch.empty(100, 4)}
    dcp.load(loaded, checkpoint_id=str(store.latest()))
    assert torch.equal(loaded["w"], torch.full((100, 4), 15.0))
    store.save({"w": torch.ones(2)}, 25, {})
    assert not list((tmp_path / "checkpoints").glob(".step-*.tmp"))  # the next save removes the leftover
    one = CheckpointDir(tmp_path / "one", keep=1)
    for step in (30, 20, 25):  # a newer (damaged, not yet set aside) checkpoint never prunes the one just written
        one.save({"w": torch.ones(2)}, step, {})
    assert [p.name for p in one.complete()] == ["step-000000030", "step-000000025"]
    assert [p.name for p in one.set_aside_newer(one.complete()[1])] == ["damaged-step-000000030"]
    assert [p.name for p in one.complete()] == ["step-000000025"]
    (store.complete()[0] / ".metadata").unlink()
    lines = []
    assert store.latest(warn=lines.append).name == "step-000000015"
    assert lines == [f"warning: {store.complete()[0] / '.metadata'}: missing; falling back to the previous checkpoint"]
