"""Multi-node training and the cluster recipes (docker/): one command, run here as two torchrun agents on one machine.

:data:`COMMAND` is what docker/k8s-indexed-job.yaml, docker/kubeflow-trainjob.yaml and docker/slurm.sbatch run on
every node, with their own variables in the ``{placeholder}`` slots (each recipe is parsed and compared word by
word). The test runs it with ``--nnodes 2`` as two agents rendezvousing over c10d on a free local port, on real
ML-100K, and requires the result to EQUAL the single-node 2-process run (``--standalone --nproc-per-node 2``) of the
same training: test and validation metrics exactly, the saved best model bitwise.

Equality needs the same sharding plan, and TorchRec's planner sees the node layout (LOCAL_WORLD_SIZE): on 2 nodes x 1
process it puts tables wider than 8 table-wise, on 1 node x 2 processes row-wise, and the summation order changes
(ML-100K DeepFM at embedding_dim 16, 2 epochs: test AUC 0.8073 vs 0.8091; equal when the layout is forced alike).
Hence ``embedding_dim=8`` here, where both layouts give the same plan, and the test checks the checkpoints' shard
layout first, so a planner change shows up as such rather than as a metric difference.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"

#: the launch + train command of every recipe; {shared}: a directory all nodes see, holding movielens-100k/
COMMAND = ("recsys-transfer launch --nnodes {nnodes} --nproc-per-node {nproc} --rdzv-backend c10d "
           "--rdzv-endpoint {endpoint} --rdzv-id {rdzv_id} --max-restarts 3 "
           "-- train --config pipelines/movielens100k.yaml --set data.prepare.input=[{shared}/movielens-100k] "
           "--set data.path={shared}/data/ml100k --set train.epochs=2 --set model.params.embedding_dim=8 "
           "--set model.params.hidden=[16] --set train.progress=false --output {shared}/runs/ml100k").split()

# Each recipe's spelling of the placeholders: whole words, then the shared directory inside words.
K8S_WORDS = {"$(NNODES)": "{nnodes}", "$(NPROC_PER_NODE)": "{nproc}",
             "recsys-ml100k-0.recsys-ml100k:29500": "{endpoint}", "recsys-ml100k": "{rdzv_id}"}
TRAINJOB_WORDS = {"$(PET_NNODES)": "{nnodes}", "$(PET_NPROC_PER_NODE)": "{nproc}",
                  "$(PET_MASTER_ADDR):$(PET_MASTER_PORT)": "{endpoint}", "recsys-ml100k": "{rdzv_id}"}
SLURM_WORDS = {"$SLURM_NNODES": "{nnodes}", "$NPROC_PER_NODE": "{nproc}", "$HEAD:29500": "{endpoint}",
               "$SLURM_JOB_ID": "{rdzv_id}"}
#: what the Trainer's torch runtime puts in the node container's environment
TRAINER_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}


def _canonical(words: list[str], table: dict[str, str], shared: str) -> list[str]:
    return [table.get(w, w).replace(shared, "{shared}") for w in words]


def _k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DOCKER / name).read_text()) if d]


def _kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _slurm_command() -> list[str]:
    text = (DOCKER / "slurm.sbatch").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("srun ")]
    words = shlex.split(line)
    return words[words.index("recsys-transfer"):]


def test_recipes_parse():
    for name in ("k8s-indexed-job.yaml", "kubeflow-trainjob.yaml"):
        assert _k8s(name), name
    for script in ("slurm.sbatch", "ci.sh"):
        r = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


def test_recipes_run_the_tested_command():
    docs = _k8s("k8s-indexed-job.yaml")
    job, service = _kind(docs, "Job"), _kind(docs, "Service")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert _canonical(container["command"] + container["args"], K8S_WORDS, "/shared") == COMMAND
    # the rendezvous host is pod 0 of this Job under this headless Service; $(VAR)s are the container's env
    assert job["spec"]["completionMode"] == "Indexed" and service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500" in K8S_WORDS
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= set(env)
    assert int(env["NNODES"]) == job["spec"]["completions"] == job["spec"]["parallelism"]

    trainjob = _kind(_k8s("kubeflow-trainjob.yaml"), "TrainJob")
    trainer = trainjob["spec"]["trainer"]
    assert _canonical(trainer["command"], TRAINJOB_WORDS, "/shared") == COMMAND
    assert set(re.findall(r"\$\((\w+)\)", " ".join(trainer["command"]))) <= TRAINER_ENV

    assert _canonical(_slurm_command(), SLURM_WORDS, "$SHARED") == COMMAND


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(words: list[str]) -> list[str]:
    assert words[0] == "recsys-transfer"
    return [sys.executable, "-m", "recsys_transfer", *words[1:]]


def _run_all(commands: list[list[str]], logs: Path, timeout: int = 150) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own process group, output to files in ``logs``), wait for all; on a
    timeout kill them all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs.mkdir(parents=True, exist_ok=True)
    files = [(open(logs / f"{k}.out", "w+"), open(logs / f"{k}.err", "w+")) for k in range(len(commands))]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
             for c, (out, err) in zip(commands, files)]
    results = []
    try:
        for p, c, (out, err) in zip(procs, commands, files):
            p.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(c, p.returncode, out.read(), err.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for out, err in files:
            out.close(), err.close()
    return results


def _shared_dir(path: Path, ml100k_dir: Path) -> Path:
    path.mkdir()
    (path / "movielens-100k").symlink_to(ml100k_dir)
    return path


def _shard_layout(best: Path) -> dict[tuple, str]:
    """(tensor, shard offset) -> the rank's file holding it, from the DCP metadata: the sharding plan as saved."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(best)).read_metadata().storage_data
    return {(index.fqn, tuple(index.offset or ())): info.relative_path for index, info in storage.items()}


def _load_best(run: Path) -> dict[str, torch.Tensor]:
    """The run's best/ checkpoint (DCP, one file per rank) loaded into a single-process model of its config."""
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.tasks import tasks_from_json
    from recsys_transfer.train.checkpoint import load_model

    metrics = json.loads((run / "metrics.json").read_text())
    cfg = metrics["config"]
    meta = DatasetMeta.load(cfg["data"]["path"])
    model = build_model(cfg["model"]["name"], meta, tasks=tasks_from_json(metrics["tasks"]), **cfg["model"]["params"])
    load_model(model, run / "best", metrics["run_id"])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_two_nodes_train_exactly_like_one_node_with_two_processes(tmp_path, ml100k_dir):
    one, two = _shared_dir(tmp_path / "one", ml100k_dir), _shared_dir(tmp_path / "two", ml100k_dir)
    train = COMMAND[COMMAND.index("--") + 1:]
    single = ["recsys-transfer", "launch", "--standalone", "--nproc-per-node", "2", "--",
              *(w.format(shared=one) for w in train)]
    values = dict(nnodes=2, nproc=1, endpoint=f"127.0.0.1:{_free_port()}", rdzv_id=f"test-{os.getpid()}", shared=two)
    node = [w.format(**values) for w in COMMAND]
    (r1,) = _run_all([_argv(single)], tmp_path / "logs-one")
    assert r1.returncode == 0, r1.stderr[-3000:]
    # the same command on both "nodes": the c10d rendezvous gives them their ranks
    agents = _run_all([_argv(node), _argv(node)], tmp_path / "logs-two")
    for r in agents:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert sum(r.stdout.count("test label: auc") for r in agents) == 1  # rank 0, on one of the nodes

    runs = {"standalone": one / "runs" / "ml100k", "two nodes": two / "runs" / "ml100k"}
    # the same sharding plan (module docstring), as the checkpoints record it; both nodes wrote their shards of best/
    layout = _shard_layout(runs["standalone"] / "best")
    assert _shard_layout(runs["two nodes"] / "best") == layout, "the planner sharded the two node layouts differently"
    assert sorted(set(layout.values())) == ["__0_0.distcp", "__1_0.distcp"]
    metrics = {k: json.loads((run / "metrics.json").read_text()) for k, run in runs.items()}
    a, b = metrics["standalone"], metrics["two nodes"]
    assert a["status"] == b["status"] == "completed" and a["world_size"] == b["world_size"] == 2
    assert a["dataset_id"] == b["dataset_id"]  # each prepared its copy of the raw files: the same dataset
    assert a["test"] == b["test"] and a["valid_best"] == b["valid_best"] and a["best_epoch"] == b["best_epoch"]
    assert a["epochs_run"] == b["epochs_run"] == 2
    epochs = {k: [{m: v for m, v in json.loads(line).items() if m.startswith(("valid/", "train/loss"))}
                  for line in (run / "epochs.jsonl").read_text().splitlines()] for k, run in runs.items()}
    assert epochs["standalone"] == epochs["two nodes"]
    wa, wb = _load_best(runs["standalone"]), _load_best(runs["two nodes"])
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert wa[key].dtype == wb[key].dtype and torch.equal(wa[key], wb[key]), key
