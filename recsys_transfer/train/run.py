"""``recsys-transfer train``: what one run composes, in one process or under torchrun.

1. the run directory (:mod:`recsys_transfer.train.rundir`: an earlier run there is refused unless ``overwrite``);
2. the data: prepared by rank 0 if ``data.path`` does not exist yet (:func:`recsys_transfer.data.prepare.prepare`,
   the others wait and fail with it), then the selective target domain if the mode needs it and none exists;
3. the tasks (the run config's, or the dataset's ``meta.json``) and the monitor;
4. the model from the registry, on ``train.device``, sharded with DistributedModelParallel when ``WORLD_SIZE > 1``
   by the ``sharding`` section's plan (:mod:`recsys_transfer.train.sharding`; rank 0 prints it, saves ``plan.json``);
   rank 0 prints its parameter counts (``model mmoe: N dense parameters, R embedding rows x k``; with
   ``train.progress``), recorded as ``parameters`` in ``run.json`` and ``metrics.json``
   (:func:`recsys_transfer.models.registry.parameter_counts`);
5. the training step (:func:`recsys_transfer.train.compose.compose_step`): the row pipeline over the model's
   tables (row optimizer, freeze, clip) with the transfer stage of ``transfer.mode`` (none in mode B), the
   objective of the tasks and the dense optimizer, composed by :class:`~recsys_transfer.train.step.TrainStep`;
6. :func:`recsys_transfer.train.loop.fit` with validation after each epoch, early stopping on the monitor, the best
   model saved to ``best/``, the train state (:class:`~recsys_transfer.train.state.TrainState`) checkpointed to
   ``checkpoints/`` at each epoch end and every ``checkpoint.every_steps`` steps; then the test split on the best
   model.

Resume: when ``output`` holds a checkpoint of the same config (keys in
:data:`~recsys_transfer.config.RESUMABLE_CHANGES` may differ), the run continues from the newest one that verifies
(a damaged one is named in one line and the previous one is used) with the same run id, and ends as the
uninterrupted run would have, bitwise (same world size); a checkpoint of another config is refused with the keys
that differ. A completed run is continued only with ``resume=True`` (e.g. with more ``train.epochs``);
``overwrite`` starts over.

Each rank reads its own part of every split; predictions are gathered so metrics are global. Rank 0 writes
``run.json`` (status, config, versions), ``epochs.jsonl`` (one strict-JSON record per epoch: train loss per task,
rows/s, every validation metric of every task, the monitor) and ``metrics.json`` (test and best-validation
metrics of every task, head/tail AUC of the transfer field, status; written last); with ``log.tensorboard`` also
TensorBoard scalars under ``tensorboard/`` (:mod:`recsys_transfer.train.scalars`; a resumed run continues the same
series). While an epoch runs, rank 0 shows a bar on a terminal or plain progress lines in a log file
(:mod:`recsys_transfer.train.progress`, ``train.progress``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from recsys_transfer.config import BARRIER_MODES, SELECTIVE_MODES, RunConfig
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import check_tasks


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict:
    """Versions of the libraries a run's numbers depend on."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist_name in ("torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "recsys-transfer"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return out


def ensure_prepared(cfg: RunConfig) -> Path:
    """``data.path``, prepared first by rank 0 if it holds no dataset yet (``data.prepare``)."""
    from recsys_transfer.data.prepare import prepare
    from recsys_transfer.train.distributed import run_on_rank0

    path = Path(cfg.data.path)
    if (path / "meta.json").is_file():
        return path
    if cfg.data.prepare is None:
        raise UserError(f"{path}: not a prepared dataset and the config has no data.prepare section")

    def build() -> None:
        if not (path / "meta.json").is_file():
            prepare(cfg.data.prepare, path, progress=False)

    run_on_rank0(build)
    return path


def select_domains(cfg: RunConfig, data: Path, meta) -> dict | None:
    """The selective target domain of the transfer fields (modes ``+Ours`` / ``select``), selected by rank 0
    first when ``data/selection`` has none for them."""
    if cfg.transfer.mode not in SELECTIVE_MODES:
        return None
    from recsys_transfer.train.distributed import run_on_rank0
    from recsys_transfer.transfer.domains import load_domains, select_command

    fields = cfg.transfer.transfer_fields(meta)
    selection = data / "selection"

    def select() -> None:
        try:
            load_domains(selection, fields, meta)
        except UserError:
            select_command(data, fields, selection, top_k=cfg.data.select_top_k, quantile=cfg.data.select_quantile,
                           meta=meta)

    run_on_rank0(select)
    return load_domains(selection, fields, meta)


def resolve_tasks(cfg: RunConfig, meta) -> tuple:
    """The run's tasks: ``tasks:`` of the config, else the dataset's. A config task given by its name alone
    (``tasks: [{name: age}]``, every other key at its default) is the dataset's task of that name, so one task of a
    dataset is chosen without restating its kind, classes or candidates."""
    from recsys_transfer.tasks import TaskSpec

    known = {t.name: t for t in meta.tasks}
    tasks = tuple(known[t.name] if t.name in known and t == TaskSpec(name=t.name) else t for t in cfg.tasks)
    tasks = tasks or tuple(meta.tasks)
    try:
        check_tasks(tasks, list(meta.labels), "tasks")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return tasks


def sequence_transform(cfg: RunConfig, meta, tasks, split: str, rank: int = 0):
    """The ``sequence`` section's per-batch sampling for the loader of ``split`` (None when the section is off):
    training batches get negatives and masking; evaluation batches the tokens, and negatives only when a task is
    evaluated on sampled candidates."""
    if not cfg.sequence.enabled:
        return None
    from recsys_transfer.data.sequences import SequenceSampling

    sampled_eval = any(t.kind == "retrieval"
                       and (getattr(t, "eval_candidates", None) or t.candidates) == "sampled" for t in tasks)
    return SequenceSampling(cfg.sequence, meta, split=split, negatives=None if split == "train" else sampled_eval,
                            rank=rank)


def report_field(cfg: RunConfig, meta) -> str | None:
    """The field whose head/tail AUC every mode reports (B too, for comparison): the first single-valued transfer
    field (a row of a list field has no one item to call head or tail)."""
    fields = [f for f in cfg.transfer.candidate_fields(meta) if not meta.field(f).multi_valued]
    return fields[0] if fields else None


def _unique_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = (t.data_ptr(), t.shape)
        if key not in seen and t.is_floating_point() and t.numel():  # a rank holding no table of a lookup
            # group has an empty weight there: nothing to average or checkpoint
            seen.add(key)
            out.append(t)
    return out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _previous_resumes(out: Path) -> list:
    return list(_read_json(out / "run.json").get("resumed_from", []))


def _epoch_line(record: dict, tasks) -> str:
    parts = [f"epoch {record['epoch']}: loss {record['train/loss']:.4f}"]
    for t in tasks:
        metric = t.primary_metric
        value = record.get(f"valid/{t.name}/{metric}")
        parts.append(f"valid {t.name} {metric} {value:.4f}" if value is not None else f"valid {t.name} {metric} -")
    return "  ".join(parts) + f"  ({record['train/rows_per_s']:,.0f} rows/s)"


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_or_resume(out: Path, cfg: RunConfig, store, *, overwrite: bool, resume: bool) -> tuple[str, str | None]:
    """(the run id, the checkpoint to resume from or None) for a run of ``cfg`` into ``out`` (module docstring);
    run by rank 0."""
    from recsys_transfer.config import config_differences
    from recsys_transfer.train.rundir import open_run_dir

    if not overwrite and store.complete():
        previous = _read_json(out / "run.json")
        if previous.get("status") == "completed" and not resume:
            raise UserError(f"{out}: holds a completed run; choose another --output, pass --overwrite to replace it "
                            "or --resume to continue it (e.g. with more train.epochs)")
        path = store.latest(warn=_warn)
        if path is None:
            raise UserError(f"{store.root}: no checkpoint verifies (each is named above); pass --overwrite to start "
                            "over")
        manifest = store.manifest(path)
        differ = config_differences(manifest["config"], json.loads(json.dumps(cfg.to_dict())))
        if differ:
            raise UserError(f"{out}: holds checkpoints of another config ({'; '.join(differ)}); use the same config, "
                            "another --output, or --overwrite")
        for moved in store.set_aside_newer(path):
            _warn(f"note: {moved.with_name(moved.name.removeprefix('damaged-'))} set aside as {moved.name}")
        return manifest["run_id"], str(path)
    if resume and not overwrite:
        raise UserError(f"{out}: no checkpoint to resume from (checkpoints/ holds none)")
    previous = _read_json(out / "run.json")
    if (not overwrite and previous.get("status") in ("running", "failed")
            and not config_differences(previous.get("config", {}), json.loads(json.dumps(cfg.to_dict())))):
        # the same run, ended before its first checkpoint (a torchrun restart lands here): start it over
        _warn(f"note: {out}: the earlier run of this config ended before its first checkpoint; starting it over")
        overwrite = True
    return open_run_dir(out, overwrite), None


def run_training(cfg: RunConfig, output: str | Path, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Train one run of ``cfg`` into ``output`` (module docstring); returns what ``metrics.json`` holds. User
    mistakes raise :class:`UserError` (the run's ``run.json`` and ``metrics.json`` then say ``failed``)."""
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.models.registry import build_model, parameter_counts, parameter_line
    from recsys_transfer.train.checkpoint import CheckpointDir, load_model, load_pretrained, save_model
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.distributed import init_distributed, run_on_rank0, shard_model, shutdown
    from recsys_transfer.train.evaluate import evaluate
    from recsys_transfer.train.loop import EMA, FitResult, fit, resolve_monitor
    from recsys_transfer.train.progress import reporter
    from recsys_transfer.train.rundir import append_jsonl, dumps, write_json
    from recsys_transfer.train.scalars import Scalars, require_tensorboard, run_scalars
    from recsys_transfer.train.sharding import sharded_plan_rows, write_plan
    from recsys_transfer.train.state import TrainState

    t_start = time.perf_counter()
    out = Path(output)
    if cfg.log.tensorboard:
        require_tensorboard()  # on every rank, before anything is written
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = init_distributed(cfg.train.device)
    run: dict = {"status": "running", "config": cfg.to_dict(), "command": sys.argv, "commit": git_commit(),
                 "versions": versions(), "world_size": info.world_size, "device": str(info.device)}
    opened = False
    store = CheckpointDir(out / "checkpoints", keep=cfg.checkpoint.keep)
    scalars = Scalars()
    try:
        run["run_id"], resume_from = run_on_rank0(lambda: open_or_resume(out, cfg, store, overwrite=overwrite,
                                                                         resume=resume))
        opened = True
        if info.is_main:
            if resume_from is not None:
                run["resumed_from"] = _previous_resumes(out) + [{"checkpoint": resume_from, "time": time.time()}]
            write_json(out / "run.json", run)
            if resume_from is None:
                (out / "epochs.jsonl").write_text("")
        data = ensure_prepared(cfg)
        meta = DatasetMeta.load(data)
        tasks = resolve_tasks(cfg, meta)
        monitor = resolve_monitor(cfg.train.monitor, tasks)
        field = report_field(cfg, meta)
        group_field = cfg.train.group_field if cfg.train.group_field is not None else meta.group
        if group_field is not None and meta.field(group_field).multi_valued:
            raise UserError(f"train.group_field {group_field!r} is a list field; group AUC needs one group id per row")
        domains = select_domains(cfg, data, meta)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, meta, tasks=tasks, **cfg.model.params)
        wants = getattr(model, "pretrained", None)  # a fine-tuning model says whether it starts from pretraining
        if wants is True and cfg.model.init_from is None:
            raise UserError(f"model {cfg.model.name} ({cfg.model.params.get('variant', 'default variant')}) fine-tunes "
                            f"a pretrained network: set model.init_from to the pretraining run's directory")
        if wants is False and cfg.model.init_from is not None:
            raise UserError(f"model {cfg.model.name} ({cfg.model.params.get('variant')}) trains from a random "
                            f"initialization: model.init_from does not apply")
        run["parameters"] = parameter_counts(model)  # before sharding: the whole model's
        if info.is_main and cfg.train.progress:
            print(parameter_line(cfg.model.name, run["parameters"]), flush=True)
        # one backward per task (surgery, rows.per_task): no DDP, the step averages the dense gradients itself
        per_task = cfg.rows.per_task or cfg.multitask.surgery != "none"
        model = (shard_model(model, info.device, sharding=cfg.sharding, batch_size=cfg.train.batch_size,
                             data_parallel=not per_task)
                 if info.world_size > 1 else model.to(info.device))
        plan = sharded_plan_rows(model, cfg.sharding) if info.world_size > 1 else []
        if plan and info.is_main:
            write_plan(out, plan)
        if cfg.model.init_from is not None and resume_from is None:  # a resumed run has its own weights
            init = load_pretrained(model, cfg.model.init_from)
            run["init_from"] = {"path": init["path"], "run_id": init["run_id"], "loaded": len(init["loaded"]),
                                "new": init["new"], "unused": init["unused"]}
            if info.is_main and cfg.train.progress:
                print(f"init_from {init['path']} (run {init['run_id']}): {len(init['loaded'])} tensors loaded, "
                      f"{len(init['new'])} new, {len(init['unused'])} not used", flush=True)
        step = compose_step(model, meta, tasks=tasks, rows=cfg.rows, transfer=cfg.transfer, domains=domains,
                            train=cfg.train, multitask=cfg.multitask)
        rows = step.rows
        pin = info.device.type == "cuda"
        common = dict(rank=info.rank, world_size=info.world_size, meta=meta, pin_memory=pin)
        train = BatchLoader(data, "train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                            drop_last=info.world_size > 1, shuffle_buffer_rows=cfg.train.shuffle_buffer_rows,
                            transform=sequence_transform(cfg, meta, tasks, "train", info.rank), **common)
        valid = BatchLoader(data, "valid", cfg.train.eval_batch_size,
                            transform=sequence_transform(cfg, meta, tasks, "valid", info.rank), **common)
        test = BatchLoader(data, "test", cfg.train.eval_batch_size,
                           transform=sequence_transform(cfg, meta, tasks, "test", info.rank), **common)
        ema = (EMA(_unique_tensors(list(model.parameters()) + rows.table_weights), cfg.train.ema_decay)
               if cfg.train.ema_decay > 0 else None)

        def validate() -> dict:
            return evaluate(model, valid, tasks, meta, transfer_field=field, group_field=group_field,
                            device=info.device)

        def on_epoch(record: dict) -> None:
            if info.is_main:
                append_jsonl(out / "epochs.jsonl", record)
                scalars.epoch(record, loop.global_step)
                if cfg.train.progress:
                    print(_epoch_line(record, tasks), flush=True)

        loop = FitResult()
        state = TrainState(model, step, ema, loop, rank=info.rank, world_size=info.world_size,
                           meta={"run_id": run["run_id"], "config": cfg.to_dict(), "versions": run["versions"],
                                 "plan": plan})
        if resume_from is not None:
            saved = state.load(resume_from)
            if info.is_main:
                (out / "epochs.jsonl").write_text("".join(dumps(r) + "\n" for r in loop.history))
                print(f"resuming from {resume_from} (epoch {saved['epoch']}, batch {saved['batch']}, step "
                      f"{saved['global_step']}, saved by {saved['world_size']} process(es))", flush=True)
        scalars = run_scalars(cfg.log, out, main=info.is_main, batches=len(train),
                              resumed_at=loop.global_step if resume_from is not None else None,
                              transfer_stats=rows.stats, lambdas=cfg.transfer.mode in BARRIER_MODES)

        def checkpoint(result: FitResult) -> None:
            if not cfg.checkpoint.enabled:
                return
            scalars.flush()  # every scalar up to this step is on disk before the checkpoint a resume starts from
            t0 = time.perf_counter()
            store.save(state.state_dict(), result.global_step, {**state.position(), "time": time.time()})
            scalars.checkpoint(time.perf_counter() - t0, result.global_step)

        def on_step(result: FitResult) -> None:
            scalars.step(result)
            every = cfg.checkpoint.every_steps
            if every and result.global_step % every == 0 and result.progress.batches < len(train):
                checkpoint(result)  # the last batch of an epoch is checkpointed at the epoch's end

        result = fit(step, train, validate, epochs=cfg.train.epochs, monitor=monitor,
                     patience=cfg.train.early_stopping_patience, device=info.device, ema=ema,
                     progress=reporter(cfg.train.progress and info.is_main, every_steps=cfg.log.lines_every_steps,
                                       every_seconds=cfg.log.lines_every_seconds), on_epoch=on_epoch,
                     on_best=lambda epoch: save_model(model, out / "best", run["run_id"]), result=loop,
                     on_step=on_step, on_epoch_end=checkpoint, rank=info.rank)
        if result.best_epoch < 0:
            values = [r["monitor_value"] for r in result.history]
            raise UserError(f"no epoch gave a finite {monitor.key} (per epoch: {values}); no model was saved")
        load_model(model, out / "best", run["run_id"])
        test_metrics = evaluate(model, test, tasks, meta, transfer_field=field, group_field=group_field,
                                device=info.device)
        scalars.test(test_metrics, result.global_step)
        best = result.history[result.best_epoch]
        train_rows = sum(r["train/rows"] for r in result.history) * info.world_size
        train_seconds = sum(r["train/seconds"] for r in result.history)
        metrics = {"status": "completed", "run_id": run["run_id"], "tasks": [t.to_json() for t in tasks],
                   "test": test_metrics,
                   "valid_best": {t.name: {k.split("/", 2)[2]: v for k, v in best.items()
                                           if k.startswith(f"valid/{t.name}/")} for t in tasks},
                   "monitor": monitor.key, "best_epoch": result.best_epoch, "best_monitor": result.best_value,
                   "epochs_run": len(result.history), "skipped_batches": result.skipped_batches,
                   "transfer_field": field, "wall_seconds": time.perf_counter() - t_start,
                   "train_rows_per_s": train_rows / max(train_seconds, 1e-9), "world_size": info.world_size,
                   "device": str(info.device), "transfer": rows.stats(), "config": cfg.to_dict(),
                   "dataset_id": meta.dataset_id, "parameters": run["parameters"], "commit": run["commit"],
                   "versions": run["versions"]}
        if info.is_main:
            write_json(out / "metrics.json", metrics)
            write_json(out / "run.json", {**run, "status": "completed"})
        return metrics
    except BaseException as exc:
        if opened and info.is_main:
            failed = {**run, "status": "failed", "error": str(exc) or type(exc).__name__}
            write_json(out / "run.json", failed)
            write_json(out / "metrics.json", {"status": "failed", "run_id": run.get("run_id"), "error": failed["error"]})
        raise
    finally:
        scalars.close()
        shutdown()
