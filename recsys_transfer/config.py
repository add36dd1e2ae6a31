"""Run configuration: frozen dataclasses validated in ``__post_init__``, loaded from YAML strictly.

A pipeline file (``pipelines/*.yaml``) has four sections::

    data:     {path: runs/ml100k, prepare: {dataset: movielens, input: ../shared/data/movielens-100k}}
    model:    {name: deepfm, params: {embedding_dim: 16, hidden: [100, 100]}}
    transfer: {mode: "+Ours", loss: adversarial, fields: [zip]}
    train:    {epochs: 10, batch_size: 1024, lr: 1.0e-3, ...}

Unknown keys are rejected at every level with the file, the key path and the known keys (no silent typos like
``batchsize``); ``--set train.epochs=3`` style overrides are parsed as YAML scalars and go through the same check.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from recsys_transfer.errors import UserError
from recsys_transfer.transfer.plugin import TransferConfig


@dataclass(frozen=True)
class PrepareConfig:
    """How to build ``data.path`` if it does not exist yet (same options as ``recsys-transfer prepare``)."""

    dataset: str = "synthetic"
    input: tuple[str, ...] = ()
    rows: int | None = None
    min_count: int | None = None
    hash_size: int | None = None
    split: str = "random"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2022
    head_rule: str = "pareto"
    head_fraction: float = 0.2
    head_min_count: int = 10

    def __post_init__(self) -> None:
        if self.dataset not in ("movielens", "criteo", "synthetic"):
            raise ValueError(f"data.prepare.dataset must be movielens, criteo or synthetic, got {self.dataset!r}")


@dataclass(frozen=True)
class DataConfig:
    path: str
    prepare: PrepareConfig | None = None
    select_top_k: int = 1000
    select_quantile: float = 0.2


@dataclass(frozen=True)
class ModelConfig:
    """``name`` from the model registry; ``params`` are its constructor arguments (checked by the registry)."""

    name: str = "deepfm"
    params: dict = field(default_factory=dict)


DENSE_OPTIMIZERS = ("adam", "sgd", "momentum")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    eval_batch_size: int = 8192
    optimizer: str = "adam"  # dense optimizer: adam | sgd | momentum (SGD, momentum 0.9); tables: transfer.optimizer
    lr: float = 1e-3  # dense optimizer
    weight_decay: float = 0.0
    seed: int = 2022
    early_stopping_patience: int = 2  # epochs without a better valid AUC before stopping (0 = never stop early)
    ema_decay: float = 0.0  # 0 = off; else evaluate/save an exponential moving average of the weights
    shuffle_buffer_rows: int = 1_000_000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("train.epochs and train.batch_size must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {DENSE_OPTIMIZERS}, got {self.optimizer!r}")

    def dense_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer of the dense (non-table) parameters; fused kernels (one call for all tensors)."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        momentum = 0.9 if self.optimizer == "momentum" else 0.0
        return torch.optim.SGD(params, lr=self.lr, momentum=momentum, weight_decay=self.weight_decay, fused=True)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- strict loading ---------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(args) != len(value):
            raise UserError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is dict and not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return value


def _build(cls: type, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{where}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key.path=value")
    key, text = assignment.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a pipeline YAML with ``--set`` overrides; every unknown key is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    for assignment in overrides:
        _apply_override(tree, assignment)
    if "data" not in tree:
        raise UserError(f"{path}: the 'data' section (with 'path') is required")
    return _build(RunConfig, tree, str(path))
