"""``recsys-transfer train``: one training loop for every model and mode, in one process or under torchrun.

Steps: prepare the data if ``data.path`` does not exist (rank 0; the others wait), select the target domain if
the mode needs it and no selection exists, build the model from the registry, shard it with
DistributedModelParallel when ``WORLD_SIZE > 1``, attach the transfer plug-in (every mode, ``B`` included, so all
modes share one row-update path), then train with early stopping on the validation AUC. Each rank reads its own
part of every split; predictions are gathered so metrics are global. Rank 0 writes:

* ``OUT/epochs.jsonl`` — one line per epoch (train loss, rows/s, valid AUC/log loss, seconds);
* ``OUT/metrics.json`` — test AUC and log loss, AUC on test rows whose transfer field is a head or a tail item,
  best epoch, wall time, rows/s, the resolved config and the git commit;
* ``OUT/best/`` — the best model (torch.distributed.checkpoint, so sharded tables are saved shard by shard).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recsys_transfer.config import RunConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.metrics import auc, logloss
from recsys_transfer.train.distributed import init_distributed, shard_model, shutdown
from recsys_transfer.train.loop import check_dataset, train_epoch
from recsys_transfer.transfer.plugin import SELECTIVE_MODES, TransferPlugin


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def ensure_prepared(cfg: RunConfig, rank: int) -> Path:
    path = Path(cfg.data.path)
    if not (path / "meta.json").is_file():
        if cfg.data.prepare is None:
            raise UserError(f"{path}: not a prepared dataset and the config has no data.prepare section")
        if rank == 0:
            from recsys_transfer.cli import main as cli_main

            p = cfg.data.prepare
            argv = ["prepare", "--dataset", p.dataset, "--output", str(path), "--split", p.split,
                    "--split-fractions", ",".join(str(x) for x in p.split_fractions), "--seed", str(p.seed),
                    "--head-rule", p.head_rule, "--head-fraction", str(p.head_fraction),
                    "--head-min-count", str(p.head_min_count), "--no-progress"]
            if p.input:
                argv += ["--input", *p.input]
            for flag, value in (("--rows", p.rows), ("--min-count", p.min_count), ("--hash-size", p.hash_size)):
                if value is not None:
                    argv += [flag, str(value)]
            if cli_main(argv) != 0:
                raise UserError(f"{path}: preparing the data failed (see above)")
        _barrier()
    return path


def _domains(cfg: RunConfig, data: Path, meta: DatasetMeta, rank: int) -> dict | None:
    if cfg.transfer.mode not in SELECTIVE_MODES:
        return None
    from recsys_transfer.transfer.domains import load_domains, select_command

    fields = cfg.transfer.transfer_fields(meta)
    selection = data / "selection"
    try:
        return load_domains(selection, fields, meta)
    except UserError:
        if rank == 0:
            select_command(data, fields, selection, top_k=cfg.data.select_top_k, quantile=cfg.data.select_quantile)
        _barrier()
        return load_domains(selection, fields, meta)


class EMA:
    """Exponential moving average of every parameter (dense and tables), applied for evaluation and saving.

    Costs O(parameters) per step; meant for the paper's small CTR models (it used EMA), not billion-row tables.
    """

    def __init__(self, tensors: list[torch.Tensor], decay: float) -> None:
        self.tensors = tensors
        self.decay = decay
        self.shadow = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def update(self) -> None:
        for s, t in zip(self.shadow, self.tensors):
            s.mul_(self.decay).add_(t.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        for s, t in zip(self.shadow, self.tensors):
            tmp = t.detach().clone()
            t.data.copy_(s)
            s.copy_(tmp)


def _gather(arrays: list[np.ndarray]) -> list[np.ndarray]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return arrays
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, arrays)
    return [np.concatenate([g[k] for g in got]) for k in range(len(arrays))]


@torch.no_grad()
def _predict(model, loader: BatchLoader, label: str, field: str | None):
    model.eval()
    ys, ps, ids = [], [], []
    for batch in loader:
        ps.append(torch.sigmoid(model(batch)[label]).double().numpy())
        ys.append(batch.labels[label].numpy())
        if field is not None:
            ids.append(batch.sparse[field].values().numpy())
    empty = np.zeros(0)
    y = np.concatenate(ys) if ys else empty
    p = np.concatenate(ps) if ps else empty
    i = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return _gather([y, p, i])


def _metrics(y, p, ids, meta: DatasetMeta, field: str | None) -> dict:
    out = {"auc": auc(y, p), "logloss": logloss(y, p), "rows": int(len(y))}
    if field is not None and len(ids):
        head = meta.field(field).head_mask()[ids.astype(np.int64)]
        out.update({"field": field, "head_auc": auc(y[head], p[head]), "tail_auc": auc(y[~head], p[~head]),
                    "head_rows": int(head.sum()), "tail_rows": int((~head).sum())})
    return out


def run_training(cfg: RunConfig, output: str | Path) -> dict:
    from recsys_transfer.models.registry import build_model

    t_start = time.perf_counter()
    info = init_distributed()
    out = Path(output)
    try:
        data = ensure_prepared(cfg, info.rank)
        meta = DatasetMeta.load(data)
        domains = _domains(cfg, data, meta, info.rank)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, meta, **cfg.model.params)
        if info.world_size > 1:
            model = shard_model(model, info.device)
        plugin = TransferPlugin(model, meta, cfg.transfer, domains=domains)
        dense = cfg.train.dense_optimizer(plugin.dense_parameters())
        label = meta.labels[0]
        field = (plugin.fields or cfg.transfer.transfer_fields(meta) or [None])[0]
        common = dict(rank=info.rank, world_size=info.world_size, meta=meta)
        train = BatchLoader(data, "train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                            drop_last=info.world_size > 1, shuffle_buffer_rows=cfg.train.shuffle_buffer_rows, **common)
        valid = BatchLoader(data, "valid", cfg.train.eval_batch_size, **common)
        test = BatchLoader(data, "test", cfg.train.eval_batch_size, **common)
        check_dataset(model, train)
        ema = EMA(_unique_tensors(list(model.parameters()) + plugin.table_weights), cfg.train.ema_decay) \
            if cfg.train.ema_decay > 0 else None
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "epochs.jsonl").write_text("")
        best, best_epoch, stale, history = -math.inf, -1, 0, []
        rows_seen, train_seconds = 0, 0.0
        for epoch in range(cfg.train.epochs):
            train.set_epoch(epoch)
            stats = train_epoch(model, train, dense, label, progress=cfg.train.progress and info.is_main,
                                plugin=plugin, after_step=ema.update if ema else None)
            rows_seen += stats.rows * info.world_size
            train_seconds += stats.seconds
            if ema:
                ema.swap()
            y, p, ids = _predict(model, valid, label, field)
            val = _metrics(y, p, ids, meta, field)
            record = {"epoch": epoch, "train_loss": stats.loss, "train_rows_per_s": stats.rows_per_s * info.world_size,
                      **{f"valid_{k}": v for k, v in val.items() if k != "field"}}
            history.append(record)
            if info.is_main:
                with (out / "epochs.jsonl").open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if cfg.train.progress:
                    print(f"epoch {epoch}: loss {stats.loss:.4f}  valid AUC {val['auc']:.4f}  "
                          f"logloss {val['logloss']:.4f}  ({record['train_rows_per_s']:,.0f} rows/s)", flush=True)
            if val["auc"] > best:
                best, best_epoch, stale = val["auc"], epoch, 0
                _save(model, out / "best")
            else:
                stale += 1
            if ema:
                ema.swap()
            if cfg.train.early_stopping_patience and stale >= cfg.train.early_stopping_patience:
                break
        _load(model, out / "best")
        y, p, ids = _predict(model, test, label, field)
        test_metrics = _metrics(y, p, ids, meta, field)
        result = {"test": test_metrics, "best_epoch": best_epoch, "best_valid_auc": best, "epochs_run": len(history),
                  "wall_seconds": time.perf_counter() - t_start, "train_rows_per_s": rows_seen / max(train_seconds, 1e-9),
                  "world_size": info.world_size, "transfer": plugin.stats(), "config": cfg.to_dict(),
                  "dataset_id": meta.dataset_id, "commit": _git_commit()}
        if info.is_main:
            (out / "metrics.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        return result
    finally:
        shutdown()


def _unique_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        key = (t.data_ptr(), t.shape)
        if key not in seen and t.is_floating_point():
            seen.add(key)
            out.append(t)
    return out


def _save(model, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # single-process runs: DCP notes it saves without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(str(path), overwrite=True))


def _load(model, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state)
