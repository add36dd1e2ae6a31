"""Run configuration: frozen dataclasses validated in ``__post_init__``, loaded from YAML strictly. No torch import
(``recsys-transfer --help`` and ``info`` start without loading torch; a test checks it).

A pipeline file (``pipelines/*.yaml``) has these sections::

    data:     {path: runs/ml100k, prepare: {dataset: movielens, input: [../shared/data/movielens-100k]}}
    tasks:    [{name: label, kind: binary}]      # optional: default = the tasks in the dataset's meta.json
    model:    {name: deepfm, params: {embedding_dim: 16, hidden: [100, 100]}}
    sharding: {row_wise_min_rows: 1000000, tables: {t_zip: table_wise}}  # torchrun runs: the tables' layout
    rows:     {optimizer: adam, lr: 1.0e-3}      # how embedding rows are updated (every mode)
    transfer: {mode: "+Ours", loss: adversarial, fields: [zip]}
    multitask: {weighting: equal, surgery: gradvac, groups: layer, row_groups: table, beta: 0.01}
    train:    {epochs: 10, batch_size: 1024, lr: 1.0e-3, monitor: valid/label/auc, device: auto, ...}
    checkpoint: {every_steps: 500, keep: 2}     # train-state checkpoints (resume); default: each epoch end
    log:      {tensorboard: true, every_steps: 50}  # TensorBoard scalars (rank 0); plain progress lines off a terminal
    sequence: {negatives: 1024, mask_rate: 0.3, token: end, seed: 0}  # sequence models: per-batch sampling

Unknown keys are rejected at every level with the file, the key path and the known keys (no silent typos like
``batchsize``); ``--set train.epochs=3`` style overrides are parsed as YAML scalars and go through the same check.
A number written ``1e-3`` (YAML 1.1 reads it as a string) is accepted wherever a float is expected.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec

DATASETS = ("movielens", "criteo", "synthetic", "fdn-synthetic", "movielens-sequences", "table-sequences")
SEQUENCE_DATASETS = ("movielens-sequences", "table-sequences")  # data/sequences.py, data/table_sequences.py
SEQUENCE_TASKS = ("pretrain", "profile", "cold")  # table-sequences: pretrain and cold (no user attributes)
FDN_VARIANTS = ("A", "B", "I")  # fdn-synthetic: Dataset-A, Dataset-B (single-task oracles), Dataset-I (multi-task)
TRAINING_MODES = ("B", "+T", "+Ours", "select", "lexico")  # paper Sec. 5 notation; not a pooling mode
SELECTIVE_MODES = ("+Ours", "select")  # modes that need the selective target domain T'_eta
BARRIER_MODES = ("+Ours", "lexico")  # modes that combine the gradients by Algorithm 1
TRANSFER_LOSSES = ("adversarial", "mmd", "moment", "cosreg")
BARRIERS = ("paper", "applied")  # Algorithm 1 on the direction | the barrier on the row optimizer's applied update
TRANSFER_LOSS_ALIASES = {"frage": "adversarial", "adda": "adversarial", "coral": "moment"}
ROW_OPTIMIZERS = ("sgd", "momentum", "adam", "rowwise_adagrad")
DENSE_OPTIMIZERS = ("adam", "sgd", "momentum")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class PrepareConfig:
    """How to build a prepared dataset (the options of ``recsys-transfer prepare``; :func:`recsys_transfer.data.prepare.prepare`)."""

    dataset: str | None = None  # a built-in source; default synthetic (when no schema is given)
    schema: str | None = None  # or a schema file (data/schema.py) describing any CSV/TSV/parquet table
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
    on_bad_row: str = "error"
    allow_degenerate: bool = False  # else a split with zero rows or a binary label with one class in train is an error
    genres: str = "combination"  # movielens: the genres of a movie as one value (combination) or a list (bag)
    history: int = 0  # movielens: a list field of the user's last N items rated before this rating (0 = none)
    conversion: bool = False  # synthetic: add a post-click conversion label `purchase` (CTR / CVR / CTCVR)
    variant: str | None = None  # fdn-synthetic: A | B | I (default I); no other dataset takes it
    # movielens-sequences (data/sequences.py) and table-sequences (data/table_sequences.py): the task, the last-n
    # cut, the target-domain genres (movielens-sequences only; pretrain, cold; empty: the source's default,
    # Documentary and Horror) and the most target ratings of a cold user (cold)
    sequence_task: str | None = None
    sequence_length: int = 50
    target_genres: tuple[str, ...] = ()
    max_target: int = 3
    # table-sequences only: the input's column names of the user id, the item id, the time (numbers or ISO dates;
    # orders each user's items) -- all three required -- and the optional domain column (0 = source-domain item,
    # 1 = target-domain item; absent: every item is source domain, so only sequence_task pretrain)
    user_column: str | None = None
    item_column: str | None = None
    time_column: str | None = None
    domain_column: str | None = None

    def __post_init__(self) -> None:
        if self.schema is not None and self.dataset is not None:
            raise ValueError("data.prepare: give either dataset (a built-in source) or schema (a schema file), "
                             "not both")
        if self.schema is None and self.dataset is None:
            object.__setattr__(self, "dataset", "synthetic")
        if self.schema is None and self.dataset not in DATASETS:
            raise ValueError(f"data.prepare.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        if self.genres not in ("combination", "bag"):
            raise ValueError(f"genres must be 'combination' or 'bag', got {self.genres!r}")
        if self.history < 0:
            raise ValueError(f"history must be >= 0, got {self.history}")
        if (self.genres, self.history) != ("combination", 0) and self.dataset != "movielens":
            raise ValueError("genres, history: MovieLens options (data.prepare.dataset: movielens)")
        if self.conversion and self.dataset != "synthetic":
            raise ValueError("conversion: a synthetic-data option (data.prepare.dataset: synthetic)")
        if self.dataset == "fdn-synthetic":
            if self.variant is None:
                object.__setattr__(self, "variant", "I")
            if self.variant not in FDN_VARIANTS:
                raise ValueError(f"variant must be one of {FDN_VARIANTS}, got {self.variant!r}")
        elif self.variant is not None:
            raise ValueError("variant: an fdn-synthetic option (data.prepare.dataset: fdn-synthetic)")
        self._check_sequences()

    def _check_sequences(self) -> None:
        columns = {"user_column": self.user_column, "item_column": self.item_column,
                   "time_column": self.time_column, "domain_column": self.domain_column}
        if self.dataset != "table-sequences" and any(v is not None for v in columns.values()):
            raise ValueError("user_column, item_column, time_column, domain_column: table-sequences options "
                             "(data.prepare.dataset: table-sequences)")
        if self.dataset not in SEQUENCE_DATASETS:
            if (self.sequence_task, self.sequence_length, self.target_genres, self.max_target) != (None, 50, (), 3):
                raise ValueError("sequence_task, sequence_length, target_genres, max_target: movielens-sequences "
                                 "options (data.prepare.dataset: movielens-sequences; all but target_genres also "
                                 "table-sequences)")
            return
        if self.sequence_task not in SEQUENCE_TASKS:
            raise ValueError(f"sequence_task must be one of {SEQUENCE_TASKS}, got {self.sequence_task!r}")
        if isinstance(self.sequence_length, bool) or not self.sequence_length >= 2:
            raise ValueError(f"sequence_length must be an integer >= 2, got {self.sequence_length!r}")
        if isinstance(self.max_target, bool) or not self.max_target >= 1:
            raise ValueError(f"max_target must be an integer >= 1, got {self.max_target!r}")
        if self.max_target != 3 and self.sequence_task != "cold":
            raise ValueError("max_target: an option of sequence_task cold")
        if len(set(self.target_genres)) != len(self.target_genres):
            raise ValueError(f"target_genres lists a genre twice: {list(self.target_genres)}")
        if self.dataset == "table-sequences":
            self._check_table_columns(columns)

    def _check_table_columns(self, columns: dict[str, str | None]) -> None:
        if self.target_genres:
            raise ValueError("target_genres: a movielens-sequences option; table-sequences marks the target domain "
                             "by domain_column (1 = target-domain item)")
        if self.sequence_task == "profile":
            raise ValueError("sequence_task profile: needs the user attributes (gender, age, occupation) only "
                             "MovieLens has; table-sequences builds pretrain and cold")
        missing = [k for k in ("user_column", "item_column", "time_column") if columns[k] is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required by table-sequences (the input's column names)")
        named = {k: v for k, v in columns.items() if v is not None}
        for k, v in named.items():
            if not isinstance(v, str) or not v:
                raise ValueError(f"{k} must be a non-empty column name, got {v!r}")
        if len(set(named.values())) != len(named):
            raise ValueError(f"user_column, item_column, time_column, domain_column name one column twice: {named}")
        if self.sequence_task == "cold" and self.domain_column is None:
            raise ValueError("sequence_task cold: needs domain_column (1 marks the target-domain items)")


@dataclass(frozen=True)
class DataConfig:
    path: str
    prepare: PrepareConfig | None = None
    select_top_k: int = 1000
    select_quantile: float = 0.2


@dataclass(frozen=True)
class ModelConfig:
    """``name`` from the model registry; ``params`` are its constructor arguments (checked by the registry).
    ``init_from``: a finished run's directory (its ``best/`` model) or a model checkpoint directory whose parameters
    initialize this model by name before training (a pretrained network that a fine-tuning run loads; the
    parameters only this model has keep their initialization, the checkpoint's parameters it lacks -- e.g. a
    pretraining output layer -- are not used; both lists go to ``run.json``)."""

    name: str = "deepfm"
    params: dict = field(default_factory=dict)
    init_from: str | None = None


@dataclass(frozen=True)
class RowsConfig:
    """The fused row update of every embedding table (:mod:`recsys_transfer.rows`), in every training mode.

    ``optimizer`` / ``lr`` / ``optimizer_kwargs``: the row optimizer (:mod:`recsys_transfer.optim.rowwise`);
    ``freeze``: tables never updated (names as ``<collection path>.<table>``, e.g. ``embedding.t_zip``, or a bare
    table name ``t_zip`` matching it in any collection); ``clip_norm``: if set, each row's update direction is
    scaled to at most this L2 norm (after the transfer barrier); ``per_task``: one backward per task, recording
    each task's row gradients (gradient surgery needs them; without surgery the result equals one backward)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    optimizer_kwargs: dict = field(default_factory=dict)
    freeze: tuple[str, ...] = ()
    clip_norm: float | None = None
    per_task: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ROW_OPTIMIZERS:
            raise ValueError(f"rows.optimizer must be one of {ROW_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"rows.lr must be > 0, got {self.lr}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"rows.clip_norm must be > 0, got {self.clip_norm}")


@dataclass(frozen=True)
class TransferConfig:
    """The transfer row transform (:mod:`recsys_transfer.transfer`). ``mode`` B trains on the main loss only.

    ``barrier`` (modes +Ours and lexico): ``applied`` (default) puts the barrier on the update the row optimizer
    applies, with the main and transfer gradients preconditioned by their own optimizer state and the transfer
    update bounded per row by ``max_ratio`` times the main update; ``paper`` is Algorithm 1 on the direction, as
    published (harmless with SGD, not with Adam: :mod:`recsys_transfer.transfer.barrier`). ``alpha``: the barrier's
    coefficient (None: 2, the paper's, for ``paper``; 1 for ``applied``). Cost controls (off by default):
    ``max_rows`` source and target rows per table and step drawn for the transfer loss, ``disc_every``: the
    adversarial discriminators step every k-th step."""

    mode: str = "B"
    loss: str = "adversarial"
    fields: tuple[str, ...] = ()  # fields under transfer; empty = every field with > min_vocab rows
    min_vocab: int = 100  # the paper's Criteo rule: transfer on fields with more than 100 values
    lam: float = 1e-2
    alpha: float | None = None  # the barrier's alpha; None: 2 for the paper's barrier (its choice), 1 for applied
    barrier: str = "applied"
    max_ratio: float | None = 0.1  # applied barrier: per row, ||transfer update|| <= max_ratio ||main update||
    max_rows: int | None = None  # cost control: at most this many source and target rows per table and step
    disc_every: int = 1  # cost control (adversarial loss): the discriminators take a step every k-th step
    loss_kwargs: dict = field(default_factory=dict)
    embedding_module: str = "embedding"  # attribute name of the model's collection whose tables carry the transfer
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in TRAINING_MODES:
            raise ValueError(f"transfer mode must be one of {TRAINING_MODES}, got {self.mode!r}")
        name = TRANSFER_LOSS_ALIASES.get(self.loss.lower(), self.loss.lower())
        if name not in TRANSFER_LOSSES:
            raise ValueError(f"transfer loss must be one of {TRANSFER_LOSSES}, got {self.loss!r}")
        object.__setattr__(self, "loss", name)
        if self.barrier not in BARRIERS:
            raise ValueError(f"transfer.barrier must be one of {BARRIERS}, got {self.barrier!r}")
        if not self.lam >= 0 or (self.alpha is not None and not self.alpha > 0):
            raise ValueError(f"transfer.lam must be >= 0 and transfer.alpha > 0, got {self.lam}, {self.alpha}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or not self.max_rows >= 1):
            raise ValueError(f"transfer.max_rows must be a positive integer or null, got {self.max_rows}")
        if isinstance(self.disc_every, bool) or not self.disc_every >= 1:
            raise ValueError(f"transfer.disc_every must be a positive integer, got {self.disc_every}")
        if self.disc_every != 1 and self.loss != "adversarial":
            raise ValueError(f"transfer.disc_every applies to the adversarial loss's discriminators; loss is "
                             f"{self.loss!r}")
        if self.max_ratio is not None and not self.max_ratio > 0:
            raise ValueError(f"transfer.max_ratio must be > 0 or null, got {self.max_ratio}")

    @property
    def barrier_alpha(self) -> float:
        """``alpha``, or its default for the barrier: 2 for ``paper`` (the paper's), 1 for ``applied`` (the applied
        update descends the main loss at least as fast as mode B's update from the same state)."""
        if self.alpha is not None:
            return float(self.alpha)
        return 2.0 if self.barrier == "paper" else 1.0

    def candidate_fields(self, meta) -> list[str]:
        """The fields the transfer is about, whatever the mode (``fields``, checked against ``meta``; or every field
        with its own vocabulary and more than ``min_vocab`` ids); B runs report head/tail AUC on the first of them,
        for comparison.

        Transfer is on embedding TABLES, one per vocabulary: a field sharing another's vocabulary (``vocab_of`` in
        meta.json, e.g. a ``history`` list of ``item_id``'s items, looked up in ``t_item_id``) names its owner's
        table, so it stands for its owner here: ``fields: [history]`` is transfer on ``t_item_id`` with
        ``item_id``'s domains (its head ids, its selective target domain). Naming two fields of one table
        (``[item_id, history]``) is refused: the table has one source and one target domain."""
        if self.fields:
            owners: dict[str, str] = {}
            for f in self.fields:
                owner = meta.field(f).table_field  # raises a clear error for an unknown field
                if owner in owners:
                    raise UserError(f"transfer.fields: {owners[owner]!r} and {f!r} both name the table t_{owner} "
                                    f"(they share {owner!r}'s vocabulary, and a table has one source and one target "
                                    f"domain: {owner!r}'s); name one of them")
                owners[owner] = f
            return list(owners)
        return [f.name for f in meta.sparse if f.vocab_of is None and f.vocab_size > self.min_vocab]

    def transfer_fields(self, meta) -> list[str]:
        """The fields under transfer: :meth:`candidate_fields`, empty in mode B; a transfer mode with none is an
        error (it would silently be a B run)."""
        if self.mode == "B":
            return []
        found = self.candidate_fields(meta)
        if not found:
            sizes = {f.name: f.vocab_size for f in meta.sparse if f.vocab_of is None}
            raise UserError(f"transfer mode {self.mode!r}: no field has more than transfer.min_vocab = "
                            f"{self.min_vocab} ids ({sizes}); name transfer.fields or lower min_vocab")
        return found


#: TorchRec's sharding types (``torchrec.distributed.types.ShardingType``)
SHARDING_TYPES = ("table_wise", "row_wise", "table_row_wise", "data_parallel", "column_wise", "table_column_wise",
                  "grid_shard")
#: the sharding types whose shards the row pipeline updates: whole rows of model-parallel tables (every table of a
#: run is updated by it); the others are refused, for the reason measured in :mod:`recsys_transfer.train.sharding`
ROW_PIPELINE_SHARDINGS = ("table_wise", "row_wise")
_WHOLE_ROWS = ("it splits each row's dimensions over shards, and the row pipeline needs whole rows (row optimizer "
               "state, the barrier and the transfer loss are per row)")
REFUSED_SHARDINGS = {
    "data_parallel": ("the row pipeline updates each replica from its own rank's rows only (no table gradient reaches "
                      "DDP's all-reduce), so the replicas drift apart; use table_wise for small tables"),
    "table_row_wise": ("across nodes on gloo a transfer run deadlocked in TorchRec's backward all-to-all when a node "
                       "held no table-row-wise table, and on one node it is row_wise; use row_wise"),
    "column_wise": f"{_WHOLE_ROWS}; use row_wise",
    "table_column_wise": f"{_WHOLE_ROWS}; use row_wise",
    "grid_shard": f"{_WHOLE_ROWS}; use row_wise",
}
#: compute kernels the row pipeline can drive: it swaps the lookup kernel for its own over the shard's weight tensor
#: (``fused_uvm*``: CUDA only; ``dense``: data_parallel's kernel). Key-value / SSD / virtual tables keep rows outside
#: a weight tensor and quantized kernels are inference-only.
COMPUTE_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching", "dense")
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}


def parse_bytes(value: object, where: str) -> int | None:
    """A byte count from an int or a string with a unit (``16GiB``, ``512MB``, ``1.5e9``); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where} must be a byte count (e.g. 17179869184 or 16GiB), got {value!r}")
    number, unit = value, ""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"{where} must be a byte count (e.g. 17179869184 or 16GiB), got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    out = number * _BYTE_UNITS[unit]
    if not out >= 1 or out != int(out):
        raise ValueError(f"{where} must be a positive whole number of bytes, got {value!r}")
    return int(out)


@dataclass(frozen=True)
class TableShardingConfig:
    """One table's override in ``sharding.tables``: its sharding type and/or compute kernel (None: the policy's)."""

    sharding_type: str | None = None
    compute_kernel: str | None = None


@dataclass(frozen=True)
class ShardingConfig:
    """How DistributedModelParallel lays out the embedding tables of a torchrun run
    (:mod:`recsys_transfer.train.sharding`; single-process runs are not sharded).

    Per table, by precedence: ``tables[<table name>]`` (``{sharding_type: row_wise, compute_kernel: fused}``, or
    just the sharding type as a string); else the size policy: tables with at least ``row_wise_min_rows`` rows are
    ``row_wise``, smaller ones ``table_wise`` (None: TorchRec's planner chooses between the two by its cost model;
    it picks row_wise even for a 3-row table). Table names are TorchRec's (``t_<field>``); TorchRec's planner takes
    one decision per name, so tables of one name in several collections (FM's embedding and first-order tables)
    share it. ``compute_kernel``: the default kernel. Refused sharding types (:data:`REFUSED_SHARDINGS`) are an
    error naming the table and why. Topology budgets for the planner: ``hbm_bytes`` (GPU memory per device),
    ``ddr_bytes`` (host memory per rank), as bytes or with a unit (``16GiB``); None: TorchRec's defaults (32 GiB,
    128 GiB). ``batch_size``: the per-rank batch the planner's estimates assume (None: ``train.batch_size``)."""

    row_wise_min_rows: int | None = 1_000_000
    compute_kernel: str = "fused"
    tables: dict = field(default_factory=dict)
    hbm_bytes: object = None
    ddr_bytes: object = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.row_wise_min_rows is not None and (isinstance(self.row_wise_min_rows, bool)
                                                   or not isinstance(self.row_wise_min_rows, int)
                                                   or self.row_wise_min_rows < 1):
            raise ValueError(f"sharding.row_wise_min_rows must be a positive integer or null, got "
                             f"{self.row_wise_min_rows!r}")
        _check_kernel(self.compute_kernel, "sharding.compute_kernel")
        if not isinstance(self.tables, dict):
            raise ValueError(f"sharding.tables must map table names to overrides, got {self.tables!r}")
        tables = {}
        for name, raw in self.tables.items():
            where = f"sharding.tables.{name}"
            if isinstance(raw, str):
                raw = {"sharding_type": raw}
            if isinstance(raw, dict):
                try:
                    raw = build(TableShardingConfig, raw, where)
                except UserError as exc:
                    raise ValueError(str(exc)) from None
            if not isinstance(raw, TableShardingConfig):
                raise ValueError(f"{where}: expected a sharding type or {{sharding_type, compute_kernel}}, got {raw!r}")
            if raw.sharding_type is None and raw.compute_kernel is None:
                raise ValueError(f"{where}: give sharding_type and/or compute_kernel")
            if raw.sharding_type is not None:
                check_sharding_type(raw.sharding_type, f"table {name}")
            if raw.compute_kernel is not None:
                _check_kernel(raw.compute_kernel, f"{where}.compute_kernel")
            tables[str(name)] = raw
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "hbm_bytes", parse_bytes(self.hbm_bytes, "sharding.hbm_bytes"))
        object.__setattr__(self, "ddr_bytes", parse_bytes(self.ddr_bytes, "sharding.ddr_bytes"))
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"sharding.batch_size must be a positive integer or null, got {self.batch_size!r}")


def check_sharding_type(sharding_type: str, what: str) -> None:
    """A ValueError for an unknown sharding type, or one the row pipeline refuses (naming ``what`` and why)."""
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"{what}: unknown sharding type {sharding_type!r}; one of {ROW_PIPELINE_SHARDINGS} (TorchRec "
                         f"also has {tuple(REFUSED_SHARDINGS)}, which the row pipeline refuses)")
    if sharding_type in REFUSED_SHARDINGS:
        raise ValueError(f"{what}: {sharding_type} sharding is refused: {REFUSED_SHARDINGS[sharding_type]}")


def _check_kernel(kernel: str, where: str) -> None:
    if kernel not in COMPUTE_KERNELS:
        raise ValueError(f"{where} must be one of {COMPUTE_KERNELS}, got {kernel!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    eval_batch_size: int = 8192
    optimizer: str = "adam"  # dense optimizer: adam | sgd | momentum (SGD, momentum 0.9); tables: rows.optimizer
    lr: float = 1e-3  # dense optimizer
    weight_decay: float = 0.0
    seed: int = 2022
    early_stopping_patience: int = 2  # epochs without a better monitor before stopping (0 = never stop early)
    monitor: str = "auto"  # valid/<task>/<metric> | valid/mean/<metric> | auto (the first task's primary metric)
    ema_decay: float = 0.0  # 0 = off; else evaluate/save an exponential moving average of the weights
    shuffle_buffer_rows: int = 1_000_000
    progress: bool = True
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default (one per core)
    nonfinite_loss: str = "error"  # error: stop naming epoch and step | skip: drop the batch, counted
    group_field: str | None = None  # sparse field grouping rows for group AUC (binary tasks); default: the dataset's
    # group column (a schema's ``kind: group``), if any
    aux_weights: dict = field(default_factory=dict)  # weight per auxiliary loss term of the model (default 1)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("train.epochs, train.batch_size and train.eval_batch_size must be >= 1")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0, got {self.threads}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {DENSE_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"train.device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"train.nonfinite_loss must be one of {NONFINITE_POLICIES}, got {self.nonfinite_loss!r}")
        if self.monitor != "auto" and not re.fullmatch(r"valid/[^/]+/[^/]+", self.monitor):
            raise ValueError(f"train.monitor must be valid/<task>/<metric>, valid/mean/<metric> or auto, "
                             f"got {self.monitor!r}")


WEIGHTINGS = ("equal", "fixed", "uncertainty")
SURGERIES = ("none", "pcgrad", "gradvac")
DENSE_GROUPS = ("model", "layer", "parameter")
ROW_GROUPS = ("table", "tables")


@dataclass(frozen=True)
class MultitaskConfig:
    """Loss weighting and gradient surgery (:mod:`recsys_transfer.multitask`), pieces of the one training step.

    ``weighting``: ``equal`` (each task's own ``tasks[].weight``: the plain sum), ``fixed`` (``weights: {task: w}``;
    tasks not named keep their own weight) or ``uncertainty`` (Kendall et al. 2018: learnable log-variances).
    ``surgery``: ``none``, ``pcgrad`` or ``gradvac`` over the shared dense parameters (grouped by ``groups``:
    ``model`` / ``layer`` (per module) / ``parameter``) and the touched embedding rows (``row_groups``: ``table``
    (one group per table) / ``tables`` (the tables of one lookup call together)); ``beta``: GradVac's EMA rate
    (Eq. 6.3); ``tasks``: the tasks whose gradients are altered (the thesis's G; the others stay as they are and
    serve as references; empty: all); ``seed``: the random task order. Surgery turns on one backward per task
    (``rows.per_task``) by itself."""

    weighting: str = "equal"
    weights: dict = field(default_factory=dict)
    surgery: str = "none"
    groups: str = "layer"
    row_groups: str = "table"
    beta: float = 1e-2
    tasks: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"multitask.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.weights and self.weighting != "fixed":
            raise ValueError("multitask.weights is for weighting: fixed")
        for name, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"multitask.weights.{name} must be a number >= 0, got {w!r}")
        if self.surgery not in SURGERIES:
            raise ValueError(f"multitask.surgery must be one of {SURGERIES}, got {self.surgery!r}")
        if self.groups not in DENSE_GROUPS:
            raise ValueError(f"multitask.groups must be one of {DENSE_GROUPS}, got {self.groups!r}")
        if self.row_groups not in ROW_GROUPS:
            raise ValueError(f"multitask.row_groups must be one of {ROW_GROUPS}, got {self.row_groups!r}")
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"multitask.beta must be in (0, 1], got {self.beta}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"multitask.tasks lists a task twice: {list(self.tasks)}")
        if self.tasks and self.surgery == "none":
            raise ValueError("multitask.tasks chooses the tasks of gradient surgery: set multitask.surgery")

    @property
    def enabled(self) -> bool:
        """Anything other than the plain weighted sum."""
        return self.weighting != "equal" or self.surgery != "none"


@dataclass(frozen=True)
class CheckpointConfig:
    """Train-state checkpoints (:mod:`recsys_transfer.train.state`) under ``<output>/checkpoints/``: one at the
    end of every epoch and, with ``every_steps`` > 0, every that many training steps; the newest ``keep`` are
    kept. ``enabled: false`` writes none (the run then cannot resume)."""

    enabled: bool = True
    every_steps: int = 0
    keep: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.every_steps, bool) or self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if isinstance(self.keep, bool) or self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class LogConfig:
    """Watching a run (:mod:`recsys_transfer.train.scalars`, :mod:`recsys_transfer.train.progress`); no effect on
    its numbers.

    ``tensorboard``: rank 0 writes TensorBoard event files under ``<output>/tensorboard/`` (needs the optional
    ``tensorboard`` package: ``pip install 'recsys-transfer[tensorboard]'``): the running train loss, rows/s and
    transfer statistics every ``every_steps`` global steps and at each epoch's end (0: at epoch ends only), every
    ``epochs.jsonl`` number per epoch, checkpoint save times and the test metrics. ``lines_every_steps`` /
    ``lines_every_seconds``: with ``train.progress`` and no terminal on stderr (a cluster log), a plain progress
    line every that many batches of the epoch and whenever that many seconds passed since the last one (0: that
    trigger off; not both)."""

    tensorboard: bool = False
    every_steps: int = 50
    lines_every_steps: int = 0
    lines_every_seconds: float = 30.0

    def __post_init__(self) -> None:
        for key in ("every_steps", "lines_every_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"log.{key} must be an integer >= 0, got {value!r}")
        if not 0 <= self.lines_every_seconds < float("inf"):
            raise ValueError(f"log.lines_every_seconds must be a finite number >= 0, got {self.lines_every_seconds!r}")
        if not self.lines_every_steps and not self.lines_every_seconds:
            raise ValueError("log.lines_every_steps and log.lines_every_seconds are both 0; set train.progress: false "
                             "to turn progress lines off")


SEQUENCE_TOKENS = ("none", "end", "both")
SEQUENCE_SAMPLERS = ("uniform", "popularity")


@dataclass(frozen=True)
class SequenceConfig:
    """The per-batch sampling of sequence models (:class:`recsys_transfer.data.sequences.SequenceSampling`, applied
    by the loader; needs a ``movielens-sequences`` dataset): ``negatives`` item ids per training batch (a shared
    pool for a sampled softmax; 0 = none), ``mask_rate`` (GRec's masking with the 80/10/10 rule; 0 = none, the
    causal NextItNet), ``token`` (``end``: append the special token [TCL]; ``both``: also prepend it [TCS]) and the
    ``seed`` of the draws (with the epoch and batch index, so a resumed run gets the same batches). ``sampler``:
    how the pool is drawn -- ``uniform`` over the items, or ``popularity``: proportional to ``(training count +
    1) ** sampler_power``, with the sampled softmax's log-Q correction (the batch carries ``log(S q(id))`` as the
    KJT's weights and the model subtracts it from every logit; :func:`recsys_transfer.data.sequences.
    popularity_distribution`)."""

    negatives: int = 0
    mask_rate: float = 0.0
    token: str = "none"
    seed: int = 0
    sampler: str = "uniform"
    sampler_power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.negatives, bool) or not isinstance(self.negatives, int) or self.negatives < 0:
            raise ValueError(f"sequence.negatives must be an integer >= 0, got {self.negatives!r}")
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"sequence.mask_rate must be in [0, 1], got {self.mask_rate}")
        if self.token not in SEQUENCE_TOKENS:
            raise ValueError(f"sequence.token must be one of {SEQUENCE_TOKENS}, got {self.token!r}")
        if self.sampler not in SEQUENCE_SAMPLERS:
            raise ValueError(f"sequence.sampler must be one of {SEQUENCE_SAMPLERS}, got {self.sampler!r}")
        if isinstance(self.sampler_power, bool) or not self.sampler_power >= 0:  # also rejects NaN
            raise ValueError(f"sequence.sampler_power must be a number >= 0, got {self.sampler_power!r}")
        if self.sampler_power != 1.0 and self.sampler != "popularity":
            raise ValueError("sequence.sampler_power is for sampler: popularity")

    @property
    def enabled(self) -> bool:
        return self.negatives > 0 or self.mask_rate > 0 or self.token != "none"


#: config keys that may differ between a checkpoint and the run resuming it (they do not change its numbers)
RESUMABLE_CHANGES = ("train.epochs", "train.progress", "train.threads", "train.device", "train.eval_batch_size",
                     "checkpoint.every_steps", "checkpoint.keep", "checkpoint.enabled", "data.prepare", "log",
                     "sharding")  # a checkpoint reshards: recsys_transfer.train.state


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two :meth:`RunConfig.to_dict` trees, except
    :data:`RESUMABLE_CHANGES` (a key missing on one side is listed as ``<absent>``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        if path in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        default = dataclasses.asdict(MultitaskConfig())
        if path == "multitask" and a == "<absent>" and b in (default, {**default, "tasks": []}):
            continue  # a checkpoint from before the section existed: the default is what it ran
        if path == "sequence" and a == "<absent>" and b == dataclasses.asdict(SequenceConfig()):
            continue  # likewise
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            out.extend(config_differences(a, b, path + "."))
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    tasks: tuple[TaskSpec, ...] = ()  # empty: the dataset's tasks (meta.json)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    rows: RowsConfig = field(default_factory=RowsConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- strict loading ---------------------------------------------------------------------------------------------

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
            return tuple(_coerce(v, args[0], f"{where}[{k}]") for k, v in enumerate(value))
        if len(args) != len(value):
            raise UserError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
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


def build(cls: type, raw: Any, where: str):
    """A dataclass ``cls`` from a raw mapping, strictly (unknown keys and wrong types are a :class:`UserError`
    naming ``where`` and the key path)."""
    return _build(cls, raw, where)


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key.path=value")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: invalid YAML value {text!r} ({getattr(exc, 'problem', exc)})") from None
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
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for assignment in overrides:
        _apply_override(tree, assignment)
    if "data" not in tree:
        raise UserError(f"{path}: the 'data' section (with 'path') is required")
    return _build(RunConfig, tree, str(path))
