"""Sharding plans: which TorchRec sharding type and compute kernel each embedding table gets under
DistributedModelParallel, the planner that places them, and the plan as rows (printed, saved as ``plan.json``).

Flow: :func:`model_tables` (every table of the model's EmbeddingBagCollections / EmbeddingCollections) ->
:func:`choose` (the policy of a :class:`~recsys_transfer.config.ShardingConfig`: a ``tables`` override, else by
size, ``row_wise`` from ``row_wise_min_rows`` rows and ``table_wise`` below) -> :func:`check_choices` (what TorchRec
and the row pipeline can do with it, as one-line :class:`UserError` naming the table) -> :func:`make_planner`
(TorchRec's ``EmbeddingShardingPlanner`` with one :class:`ParameterConstraints` per table and a ``Topology`` from
``TopologyFactory`` with the config's memory budgets) -> :func:`plan_sharding` (run by rank 0; every rank gets the
plan, or rank 0's error) -> :func:`plan_rows` / :func:`format_plan` / :func:`write_plan`. Planning needs no process
group: a plan for any world size can be made (and tested) in one process.

Which sharding types the row pipeline supports (measured on CPU/gloo, FM on ML-100K, 4 steps of ``lexico`` / MMD /
Adam rows, final weights against the single-process run; :data:`~recsys_transfer.config.REFUSED_SHARDINGS`):

* ``table_wise``, ``row_wise`` and mixes of them: equal (max abs difference < 2e-7; tested), also on 2 torchrun
  agents x 2 ranks with table-wise tables on 2 of the 4 ranks only.
* ``table_row_wise``: refused. On one node it is row_wise (same shards; equal). Across nodes (2 agents x 2 ranks on
  this machine, c10d rendezvous) two things broke. (1) The row pipeline all-gathers a row-sharded table's touched
  rows over the lookup's process group, which for table-row-wise is the whole world while the table lives on one
  node's ranks: the two nodes' gathers of different tables met (``IndexError: index 800 is out of bounds for
  dimension 0 with size 796``: t_user_id's ids in t_zip). Gathering over TorchRec's node group
  (``sharding._intra_pg``) fixed that (equal, max 1.8e-7) while both nodes held a table-row-wise table. (2) When
  one node held none, a transfer run (mode lexico, which all-reduces ``l_main`` before the backward) deadlocked:
  that node's ranks waited in TorchRec's backward all-to-all (``comm_ops.py`` ``All2All_Pooled_Req.backward``)
  while the other node's went on to the next step; the same layout in mode B trained correctly. TorchRec 1.8's own
  tests skip row-wise and table-row-wise on gloo. Refusing it costs nothing on one node (use row_wise).
* ``data_parallel``: refused. The recording kernel replaces the dense kernel whose table gradients DDP all-reduces,
  so each replica is updated from its own rank's rows only: after 4 steps the two ranks' copies of t_time were
  0.37 apart and every table differed from the single-process run by up to 0.27 -- silently (no error was raised).
* ``column_wise`` (and ``table_column_wise``, ``grid_shard``, which also split columns): refused. A row's
  dimensions live in several shards, while the row pipeline's state and maths are per whole row (row-wise Adagrad's
  mean over the row, the barrier's ``<g_i, mu_i>``, the transfer loss on rows, clip norms). Measured: the
  attach-time check fired only on the rank that held the column shards, and the other rank went on into the first
  all-to-all: the job hung. Refusing from the config (and, at attach time, on every rank from the plan) avoids that.

Compute kernels: TorchRec 1.8 offers ``fused`` (fbgemm's TBE) for model-parallel tables, ``dense`` for
data_parallel only; its fused kernel needs widths divisible by 4 (an assertion in TorchRec) -- both are checked here
before planning, with the table named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from recsys_transfer.config import REFUSED_SHARDINGS, ShardingConfig
from recsys_transfer.errors import UserError
from recsys_transfer.train.rundir import PLAN_FILE, write_json

#: the sharding types TorchRec's planner chooses between when ``row_wise_min_rows`` is null
PLANNER_CHOICES = ("table_wise", "row_wise")
#: fbgemm's fused TBE (the kernel of every model-parallel table) needs widths divisible by this
FUSED_WIDTH_MULTIPLE = 4
#: the fixed share of each device's memory kept for the dense parts (TorchRec's default heuristic warns that it
#: over-estimates them)
DENSE_RESERVE = 0.15


@dataclass(frozen=True)
class TableInfo:
    """One embedding table of a model: the collection's module path, the table's name, size and element size."""

    collection: str
    name: str
    rows: int
    dim: int
    itemsize: int
    sequence: bool  # an EmbeddingCollection's table (sequence embeddings), else an EmbeddingBagCollection's

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * self.itemsize


@dataclass(frozen=True)
class Choice:
    """The policy's decision for one table name: the sharding types the planner may use (one, or
    :data:`PLANNER_CHOICES`), the compute kernel, and why (``sharding.tables``: an override; ``rows >= N`` /
    ``rows < N``: the size policy; ``planner``: TorchRec's cost model; ``sharding_type``: the argument of
    :func:`~recsys_transfer.train.distributed.shard_model`)."""

    sharding_types: tuple[str, ...]
    compute_kernel: str
    source: str


def model_tables(model: nn.Module) -> list[TableInfo]:
    """Every table of the model's (unsharded) embedding collections, in module order."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    out = []
    for path, module in model.named_modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            pooled = isinstance(module, EmbeddingBagCollection)
            configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
            weights = module.embedding_bags if pooled else module.embeddings
            for cfg in configs:
                itemsize = weights[cfg.name].weight.element_size()
                out.append(TableInfo(path, cfg.name, cfg.num_embeddings, cfg.embedding_dim, itemsize, not pooled))
    return out


def choose(config: ShardingConfig, tables: list[TableInfo]) -> dict[str, Choice]:
    """The policy of ``config`` (:class:`~recsys_transfer.config.ShardingConfig`) for each table name: the
    ``tables`` override, else ``row_wise`` from ``row_wise_min_rows`` rows (the largest table of that name) and
    ``table_wise`` below, or the planner's choice when it is null. An override naming no table is an error."""
    by_name: dict[str, list[TableInfo]] = {}
    for t in tables:
        by_name.setdefault(t.name, []).append(t)
    unknown = sorted(set(config.tables) - set(by_name))
    if unknown:
        raise UserError(f"sharding.tables: no table named {', '.join(unknown)} in the model (its tables: "
                        f"{', '.join(sorted(by_name))})")
    out = {}
    limit = config.row_wise_min_rows
    for name, found in by_name.items():
        override = config.tables.get(name)
        kernel = (override.compute_kernel if override is not None and override.compute_kernel
                  else config.compute_kernel)
        if override is not None and override.sharding_type is not None:
            out[name] = Choice((override.sharding_type,), kernel, "sharding.tables")
        elif limit is None:
            out[name] = Choice(PLANNER_CHOICES, kernel, "planner")
        else:
            big = max(t.rows for t in found) >= limit
            why = f"rows {'>=' if big else '<'} {limit}"
            out[name] = Choice(("row_wise",) if big else ("table_wise",), kernel, why)
    return out


def uniform_choices(tables: list[TableInfo], sharding_type: str | None, compute_kernel: str) -> dict[str, Choice]:
    """``shard_model(sharding_type=...)``: one sharding type for every table (None: the planner's choice among
    :data:`PLANNER_CHOICES`), unchecked against the row pipeline (plain TorchRec training may use any type)."""
    types = (sharding_type,) if sharding_type else PLANNER_CHOICES
    return {t.name: Choice(types, compute_kernel, "sharding_type" if sharding_type else "planner") for t in tables}


def sharders(fused_params: dict | None = None) -> list:
    """TorchRec's EBC and EC sharders; the EBC's also offers row-wise sharding on CPU (TorchRec lists it for CUDA
    only; its CPU path -- fbgemm block bucketization, gloo reduce-scatter -- works and is tested here)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType

    class Sharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = list(super().sharding_types(compute_device_type))
            if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
                types.append(ShardingType.ROW_WISE.value)
            return types

    return [Sharder(fused_params=fused_params), EmbeddingCollectionSharder(fused_params=fused_params)]


def check_choices(tables: list[TableInfo], choices: dict[str, Choice], device_type: str, sharder_list: list,
                  row_pipeline: bool = True) -> None:
    """One-line :class:`UserError` naming the table for what TorchRec would otherwise fail on deep in the planner or
    in DistributedModelParallel (a type or kernel its sharder does not offer on this device, a fused width not
    divisible by 4), and, with ``row_pipeline``, for the sharding types the row pipeline refuses."""
    ebc_sharder, ec_sharder = sharder_list[0], sharder_list[1]
    for t in tables:
        choice = choices[t.name]
        sharder = ec_sharder if t.sequence else ebc_sharder
        kind = "EmbeddingCollection" if t.sequence else "EmbeddingBagCollection"
        offered = sharder.sharding_types(device_type)
        for st in choice.sharding_types:
            if row_pipeline and st in REFUSED_SHARDINGS:
                raise UserError(f"table {t.name}: {st} sharding is refused: {REFUSED_SHARDINGS[st]}")
            if st not in offered:
                raise UserError(f"table {t.name} ({t.collection}): TorchRec's {kind} sharder does not offer {st} "
                                f"sharding on {device_type} (it offers {', '.join(offered)})")
            kernels = sharder.compute_kernels(st, device_type)
            if choice.compute_kernel not in kernels:
                raise UserError(f"table {t.name}: compute kernel {choice.compute_kernel} is not available for {st} "
                                f"sharding on {device_type} (TorchRec offers {', '.join(kernels)})")
            if choice.compute_kernel.startswith("fused") and t.dim % FUSED_WIDTH_MULTIPLE:
                raise UserError(f"table {t.name} ({t.collection}): embedding_dim {t.dim} is not a multiple of "
                                f"{FUSED_WIDTH_MULTIPLE}, which TorchRec's fused kernel needs (the only kernel it "
                                "offers for model-parallel tables); use a width divisible by 4")


def make_planner(config: ShardingConfig, choices: dict[str, Choice], world_size: int, local_world_size: int,
                 device_type: str, batch_size: int | None = None):
    """TorchRec's planner for ``choices``: one ``ParameterConstraints`` per table name, a ``Topology`` from
    ``TopologyFactory`` with the config's ``hbm_bytes`` / ``ddr_bytes`` per device, the per-rank batch size
    (``config.batch_size``, else ``batch_size``, else TorchRec's 512) and a fixed 15% reserve for the dense parts."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig

    constraints = {name: ParameterConstraints(sharding_types=list(c.sharding_types), compute_kernels=[c.compute_kernel])
                   for name, c in choices.items()}
    trainer = TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                            hbm_cap_bytes=config.hbm_bytes, ddr_cap_bytes=config.ddr_bytes)
    topology = TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=device_type))
    return EmbeddingShardingPlanner(topology=topology, batch_size=config.batch_size or batch_size,
                                    constraints=constraints, debug=False,
                                    storage_reservation=FixedPercentageStorageReservation(DENSE_RESERVE))


def plan_sharding(model: nn.Module, device_type: str, choices: dict[str, Choice], sharder_list: list,
                  config: ShardingConfig = ShardingConfig(), *, world_size: int | None = None,
                  local_world_size: int | None = None, batch_size: int | None = None):
    """The ``ShardingPlan`` of ``model`` for ``choices``, planned in this process for ``world_size`` ranks (default:
    the process group's), ``local_world_size`` per node (default: torchrun's ``LOCAL_WORLD_SIZE``). Under torchrun
    run it on rank 0 only and hand the plan to the others
    (:func:`~recsys_transfer.train.distributed.shard_model` does, so that a failure reaches every rank: TorchRec's
    ``collective_plan`` leaves them waiting). A plan that does not fit the memory budgets is a :class:`UserError`
    with TorchRec's reason."""
    from torchrec.distributed.planner.types import PlannerError

    grouped = dist.is_available() and dist.is_initialized()
    world = world_size or (dist.get_world_size() if grouped else 1)
    local = local_world_size or min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    planner = make_planner(config, choices, world, local, device_type, batch_size)
    try:
        return planner.plan(model, sharder_list)
    except PlannerError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"sharding: TorchRec's planner found no plan for {world} rank(s) within the budgets "
                        f"(hbm_bytes={config.hbm_bytes}, ddr_bytes={config.ddr_bytes}): {first}") from None


# ------------------------------------------------------------------------------------------------------------
# the plan as rows


def plan_rows(plan, tables: list[TableInfo], choices: dict[str, Choice] | None = None) -> list[dict]:
    """One row per (collection, table) of a ``ShardingPlan`` (or a DistributedModelParallel's ``.plan``):
    ``collection``, ``table``, ``rows``, ``dim``, ``sharding_type``, ``compute_kernel``, ``ranks`` (holding a shard),
    ``bytes`` (the whole table's weights; optimizer state not included), ``shards`` (``rank``, ``offsets``,
    ``sizes``, ``bytes`` of each) and, given the choices, ``chosen_by`` (:class:`Choice`'s ``source``); in the
    model's table order."""
    plan = getattr(plan, "plan", plan)  # DMP.plan -> ShardingPlan -> {path: {table: ParameterSharding}}
    plan = getattr(plan, "plan", plan)
    info = {(t.collection, t.name): t for t in tables}
    order = {key: k for k, key in enumerate(info)}
    rows = []
    for path, module_plan in plan.items():
        for name, ps in module_plan.items():
            t = info[(path, name)]
            spec = getattr(ps, "sharding_spec", None)
            shards = []
            for md in getattr(spec, "shards", None) or []:
                sizes = list(md.shard_sizes)
                shards.append({"rank": md.placement.rank(), "offsets": list(md.shard_offsets), "sizes": sizes,
                               "bytes": sizes[0] * sizes[1] * t.itemsize})
            ranks = sorted({s["rank"] for s in shards}) if shards else sorted(ps.ranks or [])
            row = {"collection": path, "table": name, "rows": t.rows, "dim": t.dim, "sharding_type": ps.sharding_type,
                   "compute_kernel": ps.compute_kernel, "ranks": ranks, "bytes": t.bytes, "shards": shards}
            if choices is not None:
                row["chosen_by"] = choices[name].source
            rows.append(row)
    return sorted(rows, key=lambda r: order[(r["collection"], r["table"])])


def bytes_per_rank(rows: list[dict]) -> dict[int, int]:
    """Bytes of table shards each rank holds (a table without shard metadata counts whole on each of its ranks)."""
    out: dict[int, int] = {}
    for row in rows:
        parts = [(s["rank"], s["bytes"]) for s in row["shards"]] or [(r, row["bytes"]) for r in row["ranks"]]
        for rank, n in parts:
            out[rank] = out.get(rank, 0) + n
    return dict(sorted(out.items()))


def format_plan(rows: list[dict]) -> str:
    """The plan as a text table: collection, table, rows, dim, sharding type, compute kernel, ranks, bytes; then the
    bytes each rank holds."""
    head = ("collection", "table", "rows", "dim", "sharding", "kernel", "ranks", "bytes", "chosen by")
    body = [(r["collection"], r["table"], f"{r['rows']:,}", str(r["dim"]), r["sharding_type"], r["compute_kernel"],
             ",".join(map(str, r["ranks"])), f"{r['bytes']:,}", r.get("chosen_by", "")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    numeric = {2, 3, 7}

    def line(cells) -> str:
        cells = (c.rjust(w) if k in numeric else c.ljust(w) for k, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(cells).rstrip()

    per_rank = ", ".join(f"rank {k}: {n:,}" for k, n in bytes_per_rank(rows).items())
    return "\n".join([line(head), *map(line, body), f"table bytes per rank: {per_rank}"])


def write_plan(out: str | Path, rows: list[dict], *, echo: bool = True) -> Path:
    """Save the plan rows as ``out/plan.json`` (``tables`` and ``bytes_per_rank``) and, with ``echo``, print the
    table. Call it on rank 0 only."""
    path = Path(out) / PLAN_FILE
    write_json(path, {"tables": rows, "bytes_per_rank": {str(k): v for k, v in bytes_per_rank(rows).items()}})
    if echo:
        print(f"sharding plan ({PLAN_FILE}):\n{format_plan(rows)}", flush=True)
    return path


def sharded_tables(dmp: nn.Module) -> list[TableInfo]:
    """:func:`model_tables` of a DistributedModelParallel model (from its sharded collections' table configs)."""
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.modules.embedding_configs import data_type_to_dtype

    out = []
    for path, module in dmp.module.named_modules():  # paths inside DMP's (and DDP's) wrappers, as in the plan
        if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
            sequence = isinstance(module, ShardedEmbeddingCollection)
            configs = module._embedding_configs if sequence else module._embedding_bag_configs
            for cfg in configs:
                itemsize = data_type_to_dtype(cfg.data_type).itemsize
                out.append(TableInfo(path, cfg.name, cfg.num_embeddings, cfg.embedding_dim, itemsize, sequence))
    return out


def sharded_plan_rows(dmp: nn.Module, config: ShardingConfig | None = None) -> list[dict]:
    """:func:`plan_rows` of a DistributedModelParallel model (``chosen_by`` too, given the config it was planned
    with)."""
    tables = sharded_tables(dmp)
    return plan_rows(dmp.plan, tables, choose(config, tables) if config is not None else None)


__all__ = ["Choice", "TableInfo", "check_choices", "choose", "format_plan", "make_planner", "model_tables",
           "plan_rows", "plan_sharding", "sharded_plan_rows", "sharded_tables", "sharders", "uniform_choices",
           "write_plan"]
