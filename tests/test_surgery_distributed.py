"""Gradient surgery under torchrun (2 processes, gloo, DistributedModelParallel): the final weights (tables and
dense) and GradVac's EMA targets equal the single-process run on the same global batches, on row-wise and
table-wise shards (tests/workers/surgery_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.train.compose import compose_step

WORKER = Path(__file__).parent / "workers" / "surgery_worker.py"
sys.path.insert(0, str(WORKER.parent))
from shards import assemble  # noqa: E402
from surgery_worker import ROWS, model_of, multitask_of  # noqa: E402

STEPS, LOCAL_BATCH, WORLD = 4, 64, 2
#: sharding:method:row_groups[:weighting] (uncertainty: log-variances, dense parameters outside the model; with
#: method none the model keeps TorchRec's DDP, which does not average them: the step does)
CONFIGS = ("row_wise:gradvac:table", "row_wise:pcgrad:tables", "table_wise:gradvac:table",
           "row_wise:gradvac:tables", "table_wise:pcgrad:tables", "row_wise:gradvac:table:uncertainty",
           "table_wise:none:table:uncertainty")
#: the largest difference seen per config (printed: the measured agreement, not only the tolerance)
MAX_DIFF: dict[str, float] = {}


def _single_process(data: Path, meta, init: dict, method: str, row_groups: str, *weighting: str):
    torch.manual_seed(0)
    model = model_of(meta)
    model.load_state_dict(init)
    step = compose_step(model, meta, rows=ROWS, multitask=multitask_of(method, row_groups, *weighting))
    for k, batch in enumerate(BatchLoader(data, "train", WORLD * LOCAL_BATCH, drop_last=True, prefetch=0)):
        if k == STEPS:
            break
        step(batch)
    learned = {k: v.detach().clone() for k, v in step.weighting.parameters().items()} if step.weighting else {}
    return model.state_dict(), step.surgery.surgery.state_dict() if step.surgery else None, learned


@pytest.mark.distributed
def test_sharded_surgery_equals_single_process(adult_prepared, tmp_path):
    data, meta = adult_prepared
    assert len(meta.tasks) == 2
    torch.manual_seed(0)
    model = model_of(meta)
    with torch.no_grad():
        for p in model.embedding.parameters():
            p.normal_(0, 0.1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(init, tmp_path / "init.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", str(WORKER),
           "--data", str(data), "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "out"),
           "--configs", ",".join(CONFIGS), "--steps", str(STEPS), "--batch", str(LOCAL_BATCH)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"torchrun: {time.perf_counter() - start:.1f} s for {len(CONFIGS)} configs")

    for config in CONFIGS:
        sharding, method, row_groups, *weighting = config.split(":")
        want, want_surgery, want_learned = _single_process(data, meta, init, method, row_groups, *weighting)
        parts = [torch.load(tmp_path / "out" / config.replace(":", "-") / f"rank{k}.pt") for k in range(WORLD)]
        diff, split = 0.0, set()
        for key, full in want.items():
            got, covered, shards = assemble(init[key], parts, key)
            if "embedding_bags" in key and any(shape[0] < full.shape[0] for _, _, shape in shards):
                split.add(key)
            if "embedding_bags" in key:
                assert bool((covered == 1).all()), f"{config} {key}: shards overlap or miss rows"
            else:  # replicated: both ranks hold it, equal
                copies = [t for part in parts for _, t in part["state"].get(key, [])]
                assert len(copies) == WORLD and all(torch.equal(copies[0], c) for c in copies[1:]), key
            torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5, msg=f"{config} {key}")
            assert not torch.equal(full, init[key]), f"{config} {key} did not train"
            diff = max(diff, float((got - full).abs().max()))
        if sharding == "row_wise":
            assert split, f"{config}: no table is split over the ranks"
        else:
            assert not split
        # the surgery's state: the same task orders drawn on every rank; GradVac's targets equal on every rank that
        # holds a group (row-wise and dense groups: all of them; a table-wise table's: its rank) and to one process
        for part in parts:  # a loss weighting's parameters (no DDP ever averaged them): equal to one process
            assert part["weighting"].keys() == want_learned.keys() and (bool(want_learned) == bool(weighting))
            for name, value in want_learned.items():
                torch.testing.assert_close(part["weighting"][name], value, rtol=1e-4, atol=1e-6, msg=name)
                diff = max(diff, float((part["weighting"][name] - value).abs().max()))
        assert all("data_parallel=False" in part["refused"] for part in parts)  # DDP + one backward per task
        MAX_DIFF[config] = diff
        if method == "none":
            continue
        states = [part["surgery"] for part in parts]
        for s in states:
            assert torch.equal(s["generator"], want_surgery["generator"]) and s["steps"] == want_surgery["steps"]
        held = set()
        for s in states:
            for group, target in s["targets"].items():
                torch.testing.assert_close(target, want_surgery["targets"][group], rtol=1e-4, atol=1e-6,
                                           msg=f"{config} target of {group}")
                diff = max(diff, float((target - want_surgery["targets"][group]).abs().max()))
                held.add(group)
        assert held == set(want_surgery["targets"]), (config, sorted(held), sorted(want_surgery["targets"]))
        if method == "gradvac":
            assert any(float(t.abs().max()) > 0 for t in want_surgery["targets"].values())
            row_groups_held = [{g for g in s["targets"] if not g.startswith("dense")} for s in states]
            if sharding == "row_wise":
                assert row_groups_held[0] == row_groups_held[1] and row_groups_held[0]
        MAX_DIFF[config] = diff
    print("max |sharded - single process| per config:", {k: f"{v:.2e}" for k, v in MAX_DIFF.items()})
