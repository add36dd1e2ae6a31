"""Grid spec: a strict YAML file (unknown keys are errors naming the file and key path, as in config.py).

Example (``benchmarks/grids/ml100k.yaml``)::

    name: ml100k
    base: pipelines/movielens100k.yaml     # pipeline config every run starts from
    overrides: [train.epochs=5]            # --set style, applied to every run
    datasets:                              # each: its own pipeline (default: base) and/or overrides
      - {name: ml100k}
    models:                                # names, or {name, params (replaces model.params), overrides}
      - deepfm
      - {name: autoint, params: {num_layers: 3}}
      - {name: autoint, label: autoint-l1, params: {num_layers: 1}}   # label: its name in the tables
    modes: [B, +T, +Ours]                  # subset of B, +T, +Ours, select, lexico
    methods:                               # optional further columns: a mode with overrides of its own
      - {name: "+Ours applied", mode: +Ours, overrides: [transfer.barrier=applied]}
    dims: [16]                             # model.params.embedding_dim; #P is counted from the built model
    seeds: [0, 1, 2]                       # train.seed and transfer.seed (>= 3 unless allow_few_seeds)
    extras:                                # optional named override sets (optimizer variants ...)
      - {name: adam}
      - {name: sgd_m09, overrides: [rows.optimizer=momentum, rows.lr=0.1]}
    lambdas: [0.001, 0.01, 0.1, 1.0]       # optional lambda sweep for +T (extra +T runs)
    single_task: [{name: income}, {name: never_married}]   # multi-task grids: each model also trained on each of
                                           # these tasks alone (mode B, extra "single-task"), the reference of the
                                           # per-task negative-transfer gap (thesis Eq. 3.4)
    lam_main: 0.01                         # the lambda of the +T column in the tables (default: the base config's)
    n_boot: 1000                           # paired bootstrap resamples in the report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from recsys_transfer.config import TRAINING_MODES as MODES
from recsys_transfer.config import build
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec

#: the extra (column group) of the single-task reference runs of a multi-task grid
SINGLE_TASK = "single-task"

#: the order of training modes in tables and plots
MODE_ORDER = ["B", "+T", "select", "lexico", "+Ours"]


def modes_in(df) -> list[str]:
    """The modes present in a results frame, in :data:`MODE_ORDER` (unknown ones last)."""
    present = list(df["mode"].unique())
    return [m for m in MODE_ORDER if m in present] + [m for m in present if m not in MODE_ORDER]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    pipeline: str | None = None  # default: the grid's base
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the registry name (model.name)
    params: dict | None = None  # replaces model.params of the pipeline when given
    overrides: tuple[str, ...] = ()
    label: str = ""  # the model's name in tables (default: name), so one model can appear with other params
    reference: str = ""  # multi-task grids: the model (label) whose single-task runs are this one's NTG reference,
    # for a model that cannot train one task alone (ESMM); default: its own single-task runs

    @property
    def column(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class MethodSpec:
    """A column of the tables beyond the plain modes: ``mode`` trained with ``overrides`` (e.g. another barrier)."""

    name: str
    mode: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtraSpec:
    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class GridSpec:
    name: str
    base: str
    datasets: tuple[DatasetSpec, ...]
    models: tuple[ModelSpec, ...]
    modes: tuple[str, ...]
    dims: tuple[int, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    extras: tuple[ExtraSpec, ...] = (ExtraSpec("default"),)
    methods: tuple[MethodSpec, ...] = ()
    lambdas: tuple[float, ...] = ()
    lam_main: float | None = None
    n_boot: int = 1000
    allow_few_seeds: bool = False
    threads: int = 1
    single_task: tuple[TaskSpec, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes: unknown {bad}; choose from {list(MODES)}")
        for m in self.methods:
            if m.mode not in MODES:
                raise ValueError(f"methods: {m.name!r} has unknown mode {m.mode!r}; choose from {list(MODES)}")
            if m.name in MODES or m.name in self.modes:
                raise ValueError(f"methods: the name {m.name!r} is a mode's; give the method a name of its own")
        if len({m.name for m in self.methods}) != len(self.methods):
            raise ValueError(f"methods: names must be unique, got {[m.name for m in self.methods]}")
        if "B" not in self.modes:
            raise ValueError("modes: must include B (the reference of NTG and the CIs)")
        if not self.seeds or (len(self.seeds) < 3 and not self.allow_few_seeds):
            raise ValueError(f"seeds: need at least 3, got {list(self.seeds)} (set allow_few_seeds: true for smoke grids)")
        for label, items in (("datasets", self.datasets), ("models", self.models), ("extras", self.extras)):
            names = [i.column if isinstance(i, ModelSpec) else i.name for i in items]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{label}: need at least one, with unique names; got {names}")
        if not self.dims or any(d < 1 for d in self.dims):
            raise ValueError(f"dims: need positive embedding dims, got {list(self.dims)}")
        labels = [m.column for m in self.models]
        for m in self.models:
            if m.reference and (m.reference not in labels or m.reference == m.column):
                raise ValueError(f"models: {m.column!r} takes its reference from {m.reference!r}, which must be "
                                 "another model of the grid")
        names = [t.name for t in self.single_task]
        if len(set(names)) != len(names):
            raise ValueError(f"single_task: task names must be unique, got {names}")
        if any(e.name == SINGLE_TASK for e in self.extras):
            raise ValueError(f"extras: {SINGLE_TASK!r} names the single-task reference runs; pick another name")
        if self.lambdas and "+T" not in self.modes:
            raise ValueError("lambdas: a lambda sweep needs +T in modes")


def load_grid(path: str | Path) -> GridSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: grid file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    if "models" in tree and isinstance(tree["models"], list):  # a plain name is {name: ...}
        tree["models"] = [{"name": m} if isinstance(m, str) else m for m in tree["models"]]
    if "datasets" in tree and isinstance(tree["datasets"], list):
        tree["datasets"] = [{"name": d} if isinstance(d, str) else d for d in tree["datasets"]]
    if "extras" in tree and isinstance(tree["extras"], list):
        tree["extras"] = [{"name": e} if isinstance(e, str) else e for e in tree["extras"]]
    missing = [k for k in ("name", "base", "datasets", "models", "modes", "dims", "seeds") if k not in tree]
    if missing:
        raise UserError(f"{path}: missing required key(s) {missing}")
    tree["source"] = str(path)
    return build(GridSpec, tree, str(path))
