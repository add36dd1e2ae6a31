"""Expand a grid into runs and execute them resumably.

Each cell x seed is one :func:`run_training` into ``OUT/runs/<run_id>/``; ``run_id`` is a readable slug plus a
hash of the resolved config (minus ``train.progress`` and ``log``), so it is stable across invocations and identical
configs share one run. A run counts as done when its ``metrics.json`` says ``completed`` (the trainer writes it
last), so a run interrupted midway (or failed) is redone from scratch. After training the harness writes, next to it:

* ``bench.json``  — the cell (dataset, model, mode, dim, seed, extra, lam), overrides and ``params`` (#P:
  every parameter of the built model, embedding tables included);
* ``test_predictions.npz`` — labels, scores and row index of the test split for the run's report task (the
  monitor's task), and ``labels/<task>``, ``scores/<task>`` of every binary task, recomputed from ``best/`` with the test loader in file order (the same forward path as the
  trainer, :func:`recsys_transfer.train.evaluate.predict`), for the paired bootstrap.

A multi-task grid (``single_task:`` in the spec) also trains each model on each listed task alone: mode B, extra
``single-task``, ``tasks`` = the task's name (every other run: ``all``); they are the per-task NTG's reference.

``results.csv`` has one row per finished run: the cell, the report task's headline metrics (``test_auc``,
``head_auc``, ...) and, for every task, every test metric as ``test/<task>/<metric>`` columns.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys_transfer.bench.spec import SINGLE_TASK, GridSpec
from recsys_transfer.config import MultitaskConfig, RunConfig, SequenceConfig, load_config

ALL_TASKS = "all"
CSV_COLUMNS = ["dataset", "model", "mode", "dim", "params", "seed", "extra", "lam", "overrides", "tasks", "task",
               "test_auc",
               "test_logloss", "head_auc", "tail_auc", "best_epoch", "epochs_run", "best_valid_auc",
               "transfer_loss", "wall_seconds", "run_id", "commit"]


@dataclass
class Run:
    dataset: str
    model: str
    mode: str
    dim: int
    seed: int
    extra: str
    lam: float
    pipeline: str
    overrides: list[str]
    cfg: RunConfig = field(repr=False)
    run_id: str = ""
    tasks: str = ALL_TASKS  # the tasks trained: every task of the dataset, or one (a single-task reference run)

    def cell(self) -> dict:
        return {"dataset": self.dataset, "model": self.model, "mode": self.mode, "dim": self.dim, "seed": self.seed,
                "extra": self.extra, "lam": self.lam, "pipeline": self.pipeline, "overrides": self.overrides,
                "tasks": self.tasks}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text.replace("+", "p"))


#: config keys added after runs were recorded, by dotted path, with the value that means "not used": a run that does
#: not use one hashes as it did before the key existed (a new config key must not rename every finished run)
LATER_KEYS = {
    "model.init_from": None,
    "sequence.sampler": "uniform", "sequence.sampler_power": 1.0,
    **{f"data.prepare.{k}": v for k, v in {
        "schema": None, "genres": "combination", "history": 0, "conversion": False, "variant": None,
        "sequence_task": None, "sequence_length": 50, "target_genres": (), "max_target": 3,
        "user_column": None, "item_column": None, "time_column": None, "domain_column": None}.items()},
}
#: sections added after runs were recorded: dropped when, their later keys aside, they hold their defaults
LATER_SECTIONS = {"multitask": MultitaskConfig, "sequence": SequenceConfig}


def _drop_unused(tree: dict, path: str, default) -> None:
    *parents, key = path.split(".")
    node = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and key in node and node[key] == default:
        node.pop(key)


def run_id_of(cfg: RunConfig, slug: str) -> str:
    """``<slug>-<10 hex digits>``: the hash of the config that decides the run's numbers -- without how it is watched
    (``train.progress``, ``log``) and without keys and sections added later while they hold their unused value
    (:data:`LATER_KEYS`, :data:`LATER_SECTIONS`; a retrieval task's evaluation keys when they repeat its training
    ones), so every recorded run keeps its id."""
    tree = cfg.to_dict()
    tree["train"].pop("progress", None)
    tree.pop("log", None)  # how a run is watched, not what it computes
    for path, default in LATER_KEYS.items():
        _drop_unused(tree, path, default)
    for name, section in LATER_SECTIONS.items():
        later = {p.split(".", 1)[1] for p in LATER_KEYS if p.startswith(f"{name}.")}
        defaults = {k: v for k, v in dataclasses.asdict(section()).items() if k not in later}
        if tree.get(name) == defaults:
            tree.pop(name)
    for task in tree.get("tasks") or ():  # the retrieval tasks' evaluation keys
        if task.get("eval_candidates") == task.get("candidates"):
            task.pop("eval_candidates", None)
        if task.get("eval_negatives") == "":
            task.pop("eval_negatives", None)
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{_slug(slug)}-{digest}"


def expand(spec: GridSpec, extra_overrides: list[str] | tuple[str, ...] = ()) -> list[Run]:
    """Every run of the grid, in a deterministic order (seeds innermost); identical configs appear once."""
    runs, seen = [], set()
    for ds in spec.datasets:
        pipeline = ds.pipeline or spec.base
        for ex in spec.extras:
            for m in spec.models:
                for dim in spec.dims:
                    columns = [(mode, mode, ()) for mode in spec.modes]
                    columns += [(meth.name, meth.mode, meth.overrides) for meth in spec.methods]
                    for column, mode, method_overrides in columns:
                        lams = [None]
                        if column == "+T" and spec.lambdas:
                            lams = [None, *spec.lambdas]
                        for lam in lams:
                            for seed in spec.seeds:
                                ov = [*spec.overrides, *ds.overrides, f"model.name={m.name}"]
                                if m.params is not None:
                                    ov.append("model.params=" + json.dumps(m.params))
                                ov += [*m.overrides, f"model.params.embedding_dim={dim}", f"transfer.mode={mode}",
                                       *method_overrides, *ex.overrides]
                                if lam is not None:
                                    ov.append(f"transfer.lam={lam}")
                                ov += [f"train.seed={seed}", f"transfer.seed={seed}", *extra_overrides]
                                cfg = load_config(pipeline, ov)
                                slug = f"{ds.name}-{m.column}-d{dim}-{column}-{ex.name}-lam{cfg.transfer.lam:g}-s{seed}"
                                rid = run_id_of(cfg, slug)
                                if rid in seen:
                                    continue
                                seen.add(rid)
                                runs.append(Run(ds.name, m.column, column, dim, seed, ex.name, cfg.transfer.lam,
                                                pipeline, ov, cfg, rid))
        for m in spec.models:  # multi-task grids: the single-task references (mode B, no extra's overrides)
            if m.reference:
                continue
            for dim in spec.dims:
                for task in spec.single_task:
                    for seed in spec.seeds:
                        ov = [*spec.overrides, *ds.overrides, f"model.name={m.name}"]
                        if m.params is not None:
                            ov.append("model.params=" + json.dumps(m.params))
                        ov += [*m.overrides, f"model.params.embedding_dim={dim}", "transfer.mode=B",
                               "tasks=" + json.dumps([task.to_json()]), f"train.seed={seed}", f"transfer.seed={seed}",
                               *extra_overrides]
                        cfg = load_config(pipeline, ov)
                        rid = run_id_of(cfg, f"{ds.name}-{m.column}-d{dim}-single-{task.name}-s{seed}")
                        if rid not in seen:
                            seen.add(rid)
                            runs.append(Run(ds.name, m.column, "B", dim, seed, SINGLE_TASK, cfg.transfer.lam, pipeline,
                                            ov, cfg, rid, tasks=task.name))
    return runs


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def report_task(metrics: dict) -> str:
    """The task a run's headline numbers are about: the monitor's task (the first task for a mean monitor)."""
    task = metrics["monitor"].split("/")[1]
    return metrics["tasks"][0]["name"] if task == "mean" else task


def completed(run_dir: Path) -> bool:
    """``run_dir/metrics.json`` exists and says the run completed."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "completed"
    except ValueError:
        return False


def save_predictions(cfg: RunConfig, run_dir: Path) -> dict:
    """Recompute the report task's test predictions from ``run_dir/best``; returns {'params', 'pred_auc'}."""
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.metrics import auc
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.rows.lookup import attach_rows
    from recsys_transfer.tasks import tasks_from_json
    from recsys_transfer.train.checkpoint import load_model
    from recsys_transfer.train.evaluate import predict

    metrics = json.loads((run_dir / "metrics.json").read_text())
    tasks = tasks_from_json(metrics["tasks"])
    task = next(t for t in tasks if t.name == report_task(metrics))
    meta = DatasetMeta.load(Path(cfg.data.path))
    model = build_model(cfg.model.name, meta, tasks=tasks, **cfg.model.params)
    attach_rows(model, cfg.rows)  # the trainer's lookup path
    params = count_parameters(model)
    load_model(model, run_dir / "best", metrics["run_id"])
    test = BatchLoader(Path(cfg.data.path), "test", cfg.train.eval_batch_size, rank=0, world_size=1, meta=meta)
    binary = [t for t in tasks if t.kind == "binary" and t.name != task.name]
    preds = predict(model, test, [task, *binary]).tasks
    pred = preds[task.name]
    per_task = {}  # every binary task's predictions too (the per-task NTG of a multi-task grid pairs them)
    for t in (task, *binary) if task.kind == "binary" else binary:
        per_task[f"labels/{t.name}"] = preds[t.name].labels.astype(np.int8)
        per_task[f"scores/{t.name}"] = preds[t.name].values.astype(np.float64)
    np.savez_compressed(run_dir / "test_predictions.npz", labels=pred.labels.astype(np.int8),
                        scores=pred.values.astype(np.float64), row=np.arange(len(pred.labels), dtype=np.int64),
                        **per_task)
    return {"params": params, "pred_auc": auc(pred.labels, pred.values) if task.kind == "binary" else None}


def _transfer_loss(metrics: dict) -> float | None:
    vals = [v.get("transfer_loss") for v in (metrics.get("transfer") or {}).values() if "transfer_loss" in v]
    return float(np.mean(vals)) if vals else None


def row_of(run_dir: Path) -> dict | None:
    mpath, bpath = run_dir / "metrics.json", run_dir / "bench.json"
    if not (completed(run_dir) and bpath.is_file()):
        return None
    m = json.loads(mpath.read_text())
    b = json.loads(bpath.read_text())
    task = report_task(m)
    t = m["test"][task]
    row = {"dataset": b["dataset"], "model": b["model"], "mode": b["mode"], "dim": b["dim"],
           "params": b.get("params"), "seed": b["seed"], "extra": b["extra"], "lam": b["lam"],
           "overrides": " ".join(b["overrides"]), "tasks": b.get("tasks", ALL_TASKS), "task": task,
           "test_auc": t.get("auc"),
           "test_logloss": t.get("logloss"), "head_auc": t.get("head_auc"), "tail_auc": t.get("tail_auc"),
           "best_epoch": m["best_epoch"], "epochs_run": m.get("epochs_run"),
           "best_valid_auc": m.get("valid_best", {}).get(task, {}).get("auc"),
           "transfer_loss": _transfer_loss(m), "wall_seconds": m["wall_seconds"], "run_id": run_dir.name,
           "commit": b.get("code_commit") or m.get("commit", "")}
    for name, metrics in m["test"].items():
        row.update({f"test/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None})
    return row


def rebuild_csv(out: Path, run_ids: list[str] | None = None) -> list[dict]:
    """Rewrite ``results.csv`` from the finished runs' files (all of ``runs/``, or ``run_ids``, in that order)."""
    dirs = [out / "runs" / r for r in run_ids] if run_ids is not None else sorted((out / "runs").glob("*"))
    rows = [r for r in (row_of(d) for d in dirs) if r is not None]
    extra = sorted({k for r in rows for k in r} - set(CSV_COLUMNS))
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS + extra)
        w.writeheader()
        w.writerows(rows)
    return rows


def _append_csv(out: Path, row: dict) -> None:
    """Progress while a grid runs (the fixed columns only; :func:`rebuild_csv` writes every column at the end)."""
    path = out / "results.csv"
    new = not path.is_file()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def code_state() -> str:
    """HEAD at harness start (+ '-dirty' when recsys_transfer/ has uncommitted changes): the code every run of this
    process executes, since the modules are imported once (the trainer's per-run commit is HEAD at run end)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "recsys_transfer"], capture_output=True, text=True,
                               timeout=5, cwd=root).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if dirty else "")


def run_grid(spec: GridSpec, out: str | Path, extra_overrides=(), max_runs: int | None = None,
             log=print, shard: tuple[int, int] | None = None) -> dict:
    """Run every missing run of ``spec`` into ``out``; returns {'ran': [...], 'skipped': [...], 'runs': [...]}.
    ``shard = (k, n)``: only the runs whose index is ``k`` mod ``n`` (one of ``n`` processes sharing ``out``)."""
    import torch

    from recsys_transfer.train.run import run_training

    torch.set_num_threads(spec.threads)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = expand(spec, extra_overrides)
    (out / "grid.json").write_text(json.dumps({"source": spec.source, "extra_overrides": list(extra_overrides),
                                               "runs": [r.run_id for r in runs]}, indent=1) + "\n")
    ran, skipped = [], []
    code = code_state()
    for i, r in enumerate(runs):
        if shard is not None and i % shard[1] != shard[0]:
            continue
        d = out / "runs" / r.run_id
        done = completed(d)
        if done and (d / "bench.json").is_file() and (d / "test_predictions.npz").is_file():
            skipped.append(r.run_id)
            continue
        if max_runs is not None and len(ran) >= max_runs:
            break
        d.mkdir(parents=True, exist_ok=True)
        bench = r.cell()
        if not done:
            bench["code_commit"] = code
            log(f"[{i + 1}/{len(runs)}] {r.run_id}")
            t0 = time.perf_counter()
            run_training(r.cfg, d, overwrite=True)  # an interrupted or failed attempt of this run is redone
            log(f"    done in {time.perf_counter() - t0:.1f}s")
        elif (d / "bench.json").is_file():
            bench["code_commit"] = json.loads((d / "bench.json").read_text()).get("code_commit", "")
        bench.update(save_predictions(r.cfg, d))
        (d / "bench.json").write_text(json.dumps(bench, indent=1) + "\n")
        ran.append(r.run_id)
        row = row_of(d)
        if row is not None:
            _append_csv(out, row)
    rebuild_csv(out, [r.run_id for r in runs])  # every finished run of the grid, whichever shard trained it
    return {"ran": ran, "skipped": skipped, "runs": [r.run_id for r in runs]}
