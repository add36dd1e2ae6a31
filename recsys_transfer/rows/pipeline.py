"""The row pipeline: recorded touched rows -> row transforms -> row optimizer, inside the step's backward phase.

One step with the pipeline (what :class:`recsys_transfer.train.step.TrainStep` does)::

    pipeline.begin(loss)            # open the backward phase; l_main for the barrier's phi_i (all-reduced)
    loss.backward()                 # dense grads as usual; every fused lookup RECORDS its touched rows and g_i
    pipeline.apply()                # per recorded lookup call: transforms in STAGES order, then the row optimizer
    dense_optimizer.step()

Per-task recording (gradient surgery needs one gradient per task): ``with pipeline.task(name): loss_k.backward(
retain_graph=True)`` for every task inside one phase; the lookups record each task's ``g_i`` in its own slot, and
the ``surgery`` stage turns them into one ``g_main`` (without a surgery transform: their sum, which is the gradient
of the summed loss). Outside a phase (plain ``loss.backward()`` with the pipeline attached) each call's rows are
transformed and applied as soon as its backward has run, as the fused update always did.

Stages, in this order (:data:`STAGES`); each registered :class:`RowTransform` declares its stage:

1. ``surgery`` -- per-task row gradients -> ``g_main`` (:class:`recsys_transfer.multitask.surgery.RowSurgery`:
   PCGrad or GradVac per table; it rewrites ``grad``, which the later stages read as ``g_main``);
2. ``transfer`` -- the transfer term and the item-wise barrier (:class:`recsys_transfer.transfer.barrier.TransferTransform`):
   ``mu_i = t_i + lambda_i g_main_i``;
3. ``freeze`` -- chosen tables are dropped from the update (their rows and optimizer state never change);
4. ``clip`` -- optionally, each row's direction is scaled to an L2 norm of at most ``max_norm``;

then the row optimizer applies the directions (one ``update_rows_many`` per call). A frozen table still takes part
in the transfer stage (its rows are a domain the transfer loss sees); it is only never written.

Tables are registered by name, ``<collection path>.<table>`` (``embedding.t_zip``), the same name sharded or not
(DistributedModelParallel's wrapper prefix is dropped): the row optimizer's state is keyed by it.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.errors import UserError
from recsys_transfer.flat import Blocks, Lazy
from recsys_transfer.modules.embedding import occurrence_rows, unique_rows
from recsys_transfer.optim.rowwise import RowOptimizer

STAGES = ("surgery", "transfer", "freeze", "clip")
DMP_PREFIX = "_dmp_wrapped_module."


@dataclass(eq=False)
class TableSlot:
    """One embedding table the pipeline updates (static). ``features``: the features it serves (several for a
    table shared by fields of one vocabulary, e.g. ``item_id`` and a ``history`` list: the occurrences of all of
    them sum into one gradient per touched row, the table's gradient); ``weight``: the table (or, for a sharded
    table, this rank's shard); ``row_offset``: the global id of local row 0 (row-wise shards); ``group``: the
    process group of a row-wise sharded table (None otherwise); ``dim``: the row width."""

    name: str
    collection: str
    table: str
    features: tuple[str, ...]
    weight: torch.Tensor
    row_offset: int = 0
    group: object = None

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


@dataclass(eq=False)
class SharedRows:
    """Every touched row of one lookup call whose tables are row blocks of ONE buffer (:mod:`recsys_transfer.flat`),
    as whole arrays: transforms and the optimizer then run once over all rows."""

    base: torch.Tensor  # the buffer, as rows
    rows: torch.Tensor  # [U] unique buffer row ids, sorted (so each table's rows are one span)
    grad: torch.Tensor  # [U, D] g_main of every row
    firsts: list[int]  # first buffer row of each table of the call
    slots: list[TableSlot]  # each table of the call (with or without touched rows)
    direction: torch.Tensor | None = None  # [U, D] set by a transform; None: grad
    current: torch.Tensor | None = None  # the rows' present values, if a transform gathered them (optimizer reuses)


class TableRows:
    """One table's touched rows in one lookup call: unique local row ids ``rows`` [U] and ``grad`` [U, D] (the
    main-loss gradient of each row, summed over its occurrences). ``direction``: the update direction a transform
    set (None: ``grad``). When the call's tables share a buffer (``shared``), this table's rows are
    ``shared.rows[span[0]:span[1]]`` and ``rows`` / ``grad`` are sliced from the call's arrays only when first asked
    for: the whole-array paths never ask (a slice and a shift per table cost ~0.15 ms per call for Criteo's 39
    tables)."""

    __slots__ = ("slot", "direction", "span", "shared", "first", "_rows", "_grad")

    def __init__(self, slot: TableSlot, rows: torch.Tensor | None = None, grad: torch.Tensor | None = None, *,
                 span: tuple[int, int] = (0, 0), shared: "SharedRows | None" = None, first: int = 0) -> None:
        self.slot, self.span, self.shared, self.first = slot, span, shared, first  # first: the table's buffer row 0
        self._rows, self._grad = rows, grad
        self.direction: torch.Tensor | None = None

    @property
    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.shared.rows[self.span[0] : self.span[1]] - self.first
        return self._rows

    @property
    def grad(self) -> torch.Tensor:
        if self._grad is None:
            self._grad = self.shared.grad[self.span[0] : self.span[1]]
        return self._grad

    @grad.setter
    def grad(self, value: torch.Tensor) -> None:
        self._grad = value

    def __len__(self) -> int:
        return self.span[1] - self.span[0] if self._rows is None else len(self._rows)

    @property
    def weight(self) -> torch.Tensor:
        return self.slot.weight


@dataclass(eq=False)
class SplitUpdate:
    """Tables of a call whose update combines two directions inside the row optimizer
    (:meth:`recsys_transfer.optim.rowwise.RowOptimizer.update_rows_split`): set by the transfer stage under
    ``transfer.barrier: applied``. ``tables``: a subset of the call's tables, in their order; ``grads`` /
    ``transfers``: each one's main and transfer gradient (``[U_k, D]``; possibly :class:`~recsys_transfer.flat.Blocks`
    of one array); ``combine(g, u, v)``: the applied update from the two optimizer updates; ``rows`` / ``current``:
    their buffer rows and present values when the transform has them (None otherwise); ``done``: called after the
    update (statistics)."""

    tables: list["TableRows"]
    grads: Sequence[torch.Tensor]
    transfers: Sequence[torch.Tensor]
    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rows: torch.Tensor | None = None
    current: torch.Tensor | None = None
    done: Callable[[], None] | None = None

    def keep(self, keep: Callable[["TableRows"], bool]) -> None:
        """Drop tables (``keep(table)`` False) from the split update."""
        kept = [k for k, t in enumerate(self.tables) if keep(t)]
        if len(kept) == len(self.tables):
            return
        self.tables = [self.tables[k] for k in kept]
        self.grads = [self.grads[k] for k in kept]
        self.transfers = [self.transfers[k] for k in kept]
        self.rows = self.current = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every main and transfer gradient ``x`` by ``fn(x)``, a row-wise function (a later stage's)."""
        self.grads, self.transfers = _map_rows(self.grads, fn), _map_rows(self.transfers, fn)


def _map_rows(xs: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> Sequence[torch.Tensor]:
    # a row-wise fn commutes with taking row blocks: blocks of one array are mapped as one array
    if isinstance(xs, Blocks):
        return Blocks(fn(xs.whole), xs.spans)
    return [fn(x) for x in xs]


@dataclass(eq=False)
class CallRows:
    """What one fused lookup call's backward recorded: its tables' touched rows (tables without touched rows are
    absent), the shared-buffer view when they share one, and, with per-task recording, each task's gradients
    (``task_grads[task]``: one ``[U, D]`` per table, in ``tables`` order; ``task_whole[task]``: the ``[U, D]``
    array over the shared rows, when the tables share a buffer)."""

    tables: list[TableRows]
    shared: SharedRows | None = None
    task_grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    task_whole: dict[str, torch.Tensor] = field(default_factory=dict)
    split: SplitUpdate | None = None

    def whole(self) -> bool:
        """The directions are one ``[U, D]`` array over the shared rows (no per-table direction was set)."""
        return self.shared is not None and all(t.direction is None for t in self.tables)

    def directions(self) -> Sequence[torch.Tensor]:
        """Each table's update direction, in ``tables`` order (row blocks of one array, sliced on demand, when the
        call is one whole array)."""
        if self.whole():
            s = self.shared
            return Blocks(s.grad if s.direction is None else s.direction, [t.span for t in self.tables])
        return [t.grad if t.direction is None else t.direction for t in self.tables]

    def drop_tables(self, keep: list[bool]) -> None:
        """Remove tables from the update (``keep[k]`` False): the call stops being one whole array."""
        if all(keep):
            return
        directions = self.directions()
        for t, d in zip(self.tables, directions):
            t.direction = d
        dropped = {id(t) for t, k in zip(self.tables, keep) if not k}
        if self.split is not None:
            self.split.keep(lambda t: id(t) not in dropped)
            if not self.split.tables:
                self.split = None
        self.tables = [t for t, k in zip(self.tables, keep) if k]
        self.task_grads = {task: [g for g, k in zip(gs, keep) if k] for task, gs in self.task_grads.items()}
        self.task_whole = {}
        self.shared = None


class SameIds:
    """The last lookup call's occurrence rows (forward) and their unique rows (backward), for the next call over
    the same ids: DeepFM and FM look up their embedding tables and their first-order tables with the same
    KeyedJaggedTensor, over buffers with the same table sizes, so both calls have the same buffer row of every
    occurrence and, in backward, the same unique rows (~0.3 ms per step for Criteo, computed once instead of
    twice). Recognised by identity -- the same ``indices``/``offsets`` tensors, not modified since (``_version``),
    and the same layout; the same ``gids`` tensor -- so a hit is the computation's own result. A miss computes and
    replaces the slot (one batch's index tensors are kept)."""

    __slots__ = ("_rows", "_unique")

    def __init__(self) -> None:
        self._rows: tuple | None = None
        self._unique: tuple | None = None

    def occurrence_rows(self, indices: torch.Tensor, offsets: torch.Tensor, features,
                        firsts) -> tuple[torch.Tensor, bool]:
        """``occurrence_rows(indices, offsets, features, firsts, sample_major=True)``
        (:mod:`recsys_transfer.modules.embedding`), or the last call's when it had these ids."""
        layout = (tuple(features), tuple(firsts))
        last = self._rows
        if (last is not None and last[0] is indices and last[1] == indices._version and last[2] is offsets
                and last[3] == offsets._version and last[4] == layout):
            return last[5]
        out = occurrence_rows(indices, offsets, features, firsts, sample_major=True)
        self._rows = (indices, indices._version, offsets, offsets._version, layout, out)
        return out

    def unique_rows(self, gids: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``unique_rows(gids, n_rows)`` (:mod:`recsys_transfer.modules.embedding`), or the last call's when it had
        this ``gids``."""
        last = self._unique
        if last is not None and last[0] is gids and last[1] == gids._version and last[2] == n_rows:
            return last[3]
        out = unique_rows(gids, n_rows)
        self._unique = (gids, gids._version, n_rows, out)
        return out


class StepContext:
    """What the transforms of one step may read: ``main_loss`` (``l_main``, float64, averaged over ranks) when a
    transform asked for it (:attr:`RowTransform.needs_main_loss`)."""

    def __init__(self) -> None:
        self.main_loss: torch.Tensor | None = None


class RowTransform(abc.ABC):
    """A stage of the row pipeline: ``__call__(call, context)`` reads the call's gradients and writes its
    directions in place. ``stage``: one of :data:`STAGES`."""

    stage: str = ""
    needs_main_loss: bool = False

    @abc.abstractmethod
    def __call__(self, call: CallRows, context: StepContext) -> None:
        """Set the directions of ``call``'s rows (``CallRows.shared.direction`` or ``TableRows.direction``)."""

    def prepare(self, calls: list["CallRows"], pipeline: "RowPipeline") -> None:
        """Called once per step (phase) with every recorded call, before any call is transformed: for a stage that
        needs all of them first (gradient surgery under torchrun: one all-reduce for every group). Default:
        nothing."""

    def reads_rows(self, slot: TableSlot) -> bool:
        """Whether this transform reads the values of ``slot``'s touched rows (every column), not only their
        gradients: then the lookup may not take its one-column path for that table."""
        return False

    def stats(self) -> dict:
        return {}


class FreezeTables(RowTransform):
    """Stage ``freeze``: the named tables are never updated (their rows and row-optimizer state stay bitwise the
    same); names are full (``embedding.t_zip``) or bare table names (``t_zip``, any collection)."""

    stage = "freeze"

    def __init__(self, names: tuple[str, ...] | list[str], slots: list[TableSlot]) -> None:
        known = {s.name for s in slots} | {s.table for s in slots}
        unknown = sorted(set(names) - known)
        if unknown:
            raise UserError(f"rows.freeze: unknown table(s) {unknown}; tables: {sorted(s.name for s in slots)}")
        self.names = frozenset(names)

    def frozen(self, slot: TableSlot) -> bool:
        return slot.name in self.names or slot.table in self.names

    def __call__(self, call: CallRows, context: StepContext) -> None:
        call.drop_tables([not self.frozen(t.slot) for t in call.tables])


class ClipRowNorm(RowTransform):
    """Stage ``clip``: ``d_i <- d_i * min(1, max_norm / ||d_i||)`` for every touched row (a row's direction keeps
    its orientation; rows already within the norm are unchanged)."""

    stage = "clip"

    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def _clip(self, d: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        return d * (self.max_norm / norm.clamp_min(torch.finfo(d.dtype).tiny)).clamp_max(1.0)

    def __call__(self, call: CallRows, context: StepContext) -> None:
        if call.split is not None:  # the barrier is applied by the optimizer: bound both of its inputs, and the
            call.split.map(self._clip)  # directions of the other tables only (the split ones' are not used)
            split = {id(t) for t in call.split.tables}
            for t, d in zip(call.tables, call.directions()):
                if id(t) not in split:
                    t.direction = self._clip(d)
            return
        s = call.shared
        if call.whole():  # one pass over the whole array
            s.direction = self._clip(s.grad if s.direction is None else s.direction)
            return
        for t, d in zip(call.tables, call.directions()):
            t.direction = self._clip(d)


def mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` (a scalar) as a float64 0-dim tensor, averaged over the ranks of a torchrun job (an all-reduce:
    every rank calls it, in the same order); itself in a single process."""
    value = loss.detach().to(torch.float64).reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value[0]


def collection_name(path: str) -> str:
    """A collection's module path without DistributedModelParallel's wrapper prefix."""
    return path[len(DMP_PREFIX):] if path.startswith(DMP_PREFIX) else path


class RowPipeline:
    """Owns the recording lookups of a model's embedding collections, the row transforms and the row optimizer.

    Build it with :func:`recsys_transfer.rows.lookup.attach_rows` (which finds the collections, plain or sharded,
    and registers their tables); see the module docstring for one step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: list[TableSlot] = []
        self.by_name: dict[str, TableSlot] = {}
        # every embedding collection of the model -> whether it is sharded (a rank may hold none of its tables)
        self.collections: dict[str, bool] = {}
        self.optimizer: RowOptimizer | None = None
        self.transforms: list[RowTransform] = []
        self.context = StepContext()
        self.same_ids = SameIds()
        self._full_rows: dict[tuple[int, ...], bool] = {}
        self._phase = False
        self._task: str | None = None
        self._records: dict[int, dict[str | None, CallRows]] = {}

    # -- composition ---------------------------------------------------------------------------------------------
    def register(self, slots: list[TableSlot], collections: dict[str, bool], optimizer: RowOptimizer | None) -> None:
        """The tables the pipeline updates, the model's collections (name -> sharded) and the row optimizer."""
        self.slots = slots
        self.by_name = {s.name: s for s in slots}
        self.collections = collections
        self.optimizer = optimizer

    def add_transform(self, transform: RowTransform) -> None:
        """Register ``transform`` at its stage (transforms of one stage run in registration order)."""
        if transform.stage not in STAGES:
            raise ValueError(f"unknown stage {transform.stage!r}; stages: {STAGES}")
        self.transforms.append(transform)
        self.transforms.sort(key=lambda t: STAGES.index(t.stage))
        self._full_rows.clear()

    def reads_rows(self, slots: list[TableSlot]) -> bool:
        """Whether a transform reads the values of any of these tables' rows (see :meth:`RowTransform.reads_rows`)."""
        key = tuple(map(id, slots))
        found = self._full_rows.get(key)
        if found is None:
            found = self._full_rows[key] = any(t.reads_rows(s) for t in self.transforms for s in slots)
        return found


    @property
    def table_weights(self) -> list[torch.Tensor]:
        return [s.weight for s in self.slots]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Model parameters outside the embedding collections (give these to the dense optimizer)."""
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
        from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

        table_ids = {id(w) for w in self.table_weights}
        for module in self.model.modules():
            if isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection, EmbeddingCollection,
                                   ShardedEmbeddingCollection)):
                table_ids |= {id(p) for p in module.parameters()}
        return [p for p in self.model.parameters() if id(p) not in table_ids and p.requires_grad]

    # -- one step ------------------------------------------------------------------------------------------------
    def begin(self, main_loss: torch.Tensor | None = None, averaged: bool = False) -> None:
        """Open the backward phase: records are kept until :meth:`apply`. ``main_loss``: ``l_main`` of the step
        (the weighted task losses), needed when a transform reads it (the barrier's phi_i); it is averaged over
        ranks, so every shard uses the global-batch loss (a collective: every rank calls it, in the same order),
        unless ``averaged`` says the caller did that already."""
        self._records.clear()
        self._phase = True
        if any(t.needs_main_loss for t in self.transforms):
            if main_loss is None:
                raise RuntimeError("the barrier needs l_main: pass the step's loss to RowPipeline.begin(loss)")
            if averaged:
                self.context.main_loss = main_loss.detach().to(torch.float64)
            else:
                self.set_main_loss(main_loss)

    def set_main_loss(self, loss: torch.Tensor) -> None:
        """``l_main`` for the barrier, averaged over ranks (a collective)."""
        self.context.main_loss = mean_over_ranks(loss)

    @contextlib.contextmanager
    def task(self, name: str):
        """Record the row gradients of backward passes run inside this block in task ``name``'s slot."""
        if not self._phase:
            raise RuntimeError("per-task recording needs an open backward phase: call begin() first")
        before, self._task = self._task, name
        try:
            yield
        finally:
            self._task = before

    def record(self, key: int, call: CallRows) -> None:
        """Called by a fused lookup's backward with what it recorded (``key`` identifies the lookup call)."""
        if not self._phase:  # a plain loss.backward(): transform and apply now
            self._run(call)
            return
        slots = self._records.setdefault(key, {})
        if self._task in slots:
            raise RuntimeError("a lookup call was recorded twice in one task: run each task's backward once")
        slots[self._task] = call

    def apply(self) -> None:
        """Close the phase: combine each recorded call's per-task gradients, let the transforms see every call
        (:meth:`RowTransform.prepare`), then per call (in record order) run the transforms and apply the directions
        through the row optimizer."""
        records, self._records, self._phase = self._records, {}, False
        calls = [self._combine(by_task) for by_task in records.values()]
        for transform in self.transforms:  # a stage that needs every call first (RowTransform.prepare)
            prepare = getattr(transform, "prepare", None)
            if prepare is not None:
                prepare(calls, self)
        for call in calls:
            self._run(call)


    @staticmethod
    def _combine(by_task: dict[str | None, CallRows]) -> CallRows:
        if len(by_task) == 1 and None in by_task:
            return by_task[None]
        calls = list(by_task.values())
        call = calls[0]
        call.task_grads = {task: [t.grad for t in c.tables] for task, c in by_task.items()}
        if call.shared is not None:
            call.task_whole = {task: c.shared.grad for task, c in by_task.items()}
            call.shared.grad = torch.stack([c.shared.grad for c in calls]).sum(0) if len(calls) > 1 else call.shared.grad
            for t in call.tables:
                t.grad = call.shared.grad[t.span[0] : t.span[1]]
        else:
            for k, t in enumerate(call.tables):
                t.grad = torch.stack([c.tables[k].grad for c in calls]).sum(0) if len(calls) > 1 else t.grad
        return call

    @torch.no_grad()
    def _run(self, call: CallRows) -> None:
        for transform in self.transforms:
            transform(call, self.context)
        if not call.tables:
            return
        tables, shared, split = call.tables, call.shared, call.split
        if split is not None:
            self._run_split(call, split)
            return
        # while shared is set, the tables' rows are exactly shared.rows
        buffer_rows, current = (shared.rows, shared.current) if shared is not None else (None, None)
        # the rows as a lazy sequence: made per table only if the optimizer cannot use the buffer rows
        self.optimizer.update_rows_many([t.weight for t in tables], Lazy(len(tables), lambda k: tables[k].rows),
                                        call.directions(), buffer_rows=buffer_rows, current=current)

    def _run_split(self, call: CallRows, split: SplitUpdate) -> None:
        """The call's tables without a split update as usual, then the split ones through
        :meth:`~recsys_transfer.optim.rowwise.RowOptimizer.update_rows_split`."""
        ids = {id(t) for t in split.tables}
        rest = [(t, d) for t, d in zip(call.tables, call.directions()) if id(t) not in ids]
        if rest:
            self.optimizer.update_rows_many([t.weight for t, _ in rest], Lazy(len(rest), lambda k: rest[k][0].rows),
                                            [d for _, d in rest])
        tables = split.tables
        self.optimizer.update_rows_split([t.weight for t in tables], Lazy(len(tables), lambda k: tables[k].rows),
                                         split.grads, split.transfers, split.combine, buffer_rows=split.rows,
                                         current=split.current)
        if split.done is not None:
            split.done()

    def stats(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for t in self.transforms:
            out.update(t.stats())
        return out


__all__ = ["CallRows", "ClipRowNorm", "FreezeTables", "RowPipeline", "RowTransform", "STAGES", "SharedRows",
           "SplitUpdate", "StepContext", "TableRows", "TableSlot"]
