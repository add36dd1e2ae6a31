"""The recording lookup: a TorchRec collection's lookup whose backward records the touched rows and their gradients
(stage 1 of :mod:`recsys_transfer.rows`), and the code that attaches it to a model (the one place that touches
TorchRec internals).

All lookups of a collection's tables go through :class:`RecordingLookup`, a custom autograd function over the
whole collection (every table and feature in one call, like a TBE). Its forward is the ordinary pooled (or, for an
EmbeddingCollection, sequence) lookup on the detached tables. Its backward receives the gradient of the output
``[B, sum D]`` and, instead of returning table gradients, sums it per *unique* touched row of each table -- over
every occurrence of the row in every feature the table serves (a history list and the target item on one item
table; repeated ids in a bag; an occurrence's gradient is its bag's, divided by the bag's length under mean
pooling): ``g_i = dl_main/de_i`` for the touched rows only (``[U, D]``; no ``[num_embeddings, D]`` gradient is ever
allocated), and hands the record (:class:`~recsys_transfer.rows.pipeline.CallRows`) to the
:class:`~recsys_transfer.rows.pipeline.RowPipeline`. When the call's tables are row blocks of one buffer (the
unsharded EBC built by :func:`recsys_transfer.modules.embedding.make_ebc`), every occurrence is summed at once (one
unique + ``scatter_add_`` over buffer row ids) and the record carries whole arrays
(:class:`~recsys_transfer.rows.pipeline.SharedRows`), so transforms and the optimizer run once for all tables.

Why a custom lookup and not TorchRec's fused TBE: the barrier needs, per row, the *main-loss gradient itself*
(for ``lambda_i``) before any update, and the CPU fused TBE can only apply its own optimizer to it
(``OptimType.NONE``, which returns gradients, is CUDA-only); ``apply_optimizer_in_backward`` would hand us a dense
``[num_embeddings, D]`` gradient. So the pipeline replaces the lookup *kernel* and keeps everything else TorchRec's:

* unsharded :class:`~torchrec.EmbeddingBagCollection` / :class:`~torchrec.EmbeddingCollection`: the instance's
  ``forward`` is replaced (:func:`attach_ebc`, :func:`attach_ec`) over the same ``nn.EmbeddingBag``/``nn.Embedding``
  weights (same Parameters, state-dict keys unchanged, same ``KeyedTensor`` / ``Dict[str, JaggedTensor]`` output);
* under :class:`~torchrec.distributed.DistributedModelParallel`: in every sharded lookup group, the TBE module
  (``emb_module`` of ``BatchedFusedEmbeddingBag``/``BatchedDenseEmbeddingBag``) is swapped for
  :class:`RecordingTBE`, which computes the same output from the shard's own weight views
  (``split_embedding_weights()``, so checkpoints see the updated rows) and records the same way. TorchRec's input
  and output all-to-alls are untouched: on table-wise shards the backward sees the global batch of its tables; on
  row-wise shards each rank sees the rows of its block. TorchRec divides the embedding gradient by the world size
  (``GRADIENT_DIVISION``), so ``g_i`` is the gradient of the global-batch mean loss.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from recsys_transfer.config import REFUSED_SHARDINGS, ROW_PIPELINE_SHARDINGS, RowsConfig
from recsys_transfer.errors import UserError
from recsys_transfer.flat import LayoutCache
from recsys_transfer.modules.embedding import (flat_lookup, lookup, occurrence_grads, pooled_over_all,
                                                pooled_rows_and_grads, single_valued, stacked_occurrences,
                                                unique_rows)
from recsys_transfer.optim.rowwise import make_row_optimizer
from recsys_transfer.rows.pipeline import (CallRows, ClipRowNorm, FreezeTables, RowPipeline, SharedRows, TableRows,
                                           TableSlot, collection_name)

_CALL_KEYS = itertools.count()  # one key per forward call: per-task records of the same call are merged by it


def _plain_lookup(indices, offsets, per_sample_weights, slots, features, modes) -> torch.Tensor:
    return lookup(indices, offsets, per_sample_weights, [s.weight for s in slots], features, modes)


class RecordingLookup(torch.autograd.Function):
    """Lookup whose backward records the touched rows (module docstring) and returns no table gradient.

    ``slots``: the :class:`TableSlot` of each table; ``features``: the table index of each feature; ``modes``:
    pooling per feature (``sum``, ``mean``, or ``none`` for sequence embeddings -- all features of one call are
    pooled or all are not); ``indices``/``offsets``: TBE layout (features major, ``offsets`` of length
    ``F * B + 1``). Output: ``[B, sum_f D_f]`` pooled, ``[n_indices, D]`` for sequences.
    """

    @staticmethod
    def forward(ctx, anchor, indices, offsets, per_sample_weights, slots, features, modes, layout, pipeline):
        ctx.slots, ctx.features, ctx.modes, ctx.pipeline = slots, features, modes, pipeline
        ctx.key = next(_CALL_KEYS)
        ctx.shared = _shared_call(slots, features, modes, offsets, layout)
        if ctx.shared is not None:  # keep the occurrences' buffer rows for the backward
            base, firsts = ctx.shared
            known = pipeline.same_ids.occurrence_rows(indices, offsets, features, firsts)
            out, gids, ctx.single = flat_lookup(indices, offsets, per_sample_weights, base, firsts, features, modes[0],
                                                known=known)
            ctx.save_for_backward(indices, offsets, per_sample_weights, gids)
            return out
        ctx.save_for_backward(indices, offsets, per_sample_weights, None)
        return _plain_lookup(indices, offsets, per_sample_weights, slots, features, modes)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, offsets, psw, gids = ctx.saved_tensors
        if ctx.shared is not None:
            call = _shared_call_rows(ctx.shared, grad_out, indices, offsets, psw, ctx.slots, ctx.features,
                                     ctx.modes[0], ctx.pipeline, known=(gids, ctx.single))
        else:
            call = _per_table_call_rows(grad_out, indices, offsets, psw, ctx.slots, ctx.features, ctx.modes)
        ctx.pipeline.record(ctx.key, call)
        return (None,) * 9


def _row_sums(gids: torch.Tensor, occ: torch.Tensor, n_rows: int | None = None,
              unique: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows, sorted; the sum of ``occ`` per row): ``g_i`` of every touched row from its occurrences.
    ``n_rows``: a bound on the row ids (the buffer's length), if known (:func:`unique_rows`); ``unique``: the rows
    and inverse of ``gids`` if the caller has them."""
    rows, inverse = unique if unique is not None else unique_rows(gids, n_rows)
    g = torch.zeros((len(rows), occ.shape[1]), dtype=occ.dtype, device=occ.device)
    # scatter_add_ (measured ~1.1-1.3x faster than index_add_ with repeated indices on CPU, torch 2.13)
    g.scatter_add_(0, inverse.unsqueeze(1).expand(-1, occ.shape[1]), occ)
    return rows, g


def _per_table_call_rows(grad_out, indices, offsets, psw, slots, features, modes) -> CallRows:
    """The record of a call whose tables do not share one buffer (sharded, or of several widths)."""
    dims = [slots[t].dim for t in features]
    per_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for f, ids, occ in occurrence_grads(grad_out, indices, offsets, psw, dims, modes):
        t_ids, t_grads = per_table.setdefault(features[f], ([], []))
        t_ids.append(ids)
        t_grads.append(occ)
    tables = []
    shapes = [(s.weight.shape[0], s.weight.shape[1], s.weight.dtype) for s in slots]
    # tables of one width and dtype share one unique + scatter_add: table t's rows live at bases[t] + id
    for ts, bases, gids, occ in stacked_occurrences(per_table, shapes):
        rows, g = _row_sums(gids, occ, bases[-1])
        cuts = torch.searchsorted(rows, torch.tensor(bases, dtype=rows.dtype, device=rows.device)).tolist()
        for j, t in enumerate(ts):
            lo, hi = cuts[j], cuts[j + 1]
            tables.append(TableRows(slots[t], rows[lo:hi] - bases[j], g[lo:hi]))
    return CallRows(tables)


def _shared_call(slots, features, modes, offsets, layout: LayoutCache):
    """(base, first rows) when one pooled lookup call's tables are row blocks of one buffer, else None."""
    if not pooled_over_all(features, modes, len(slots), offsets) or any(s.group is not None for s in slots):
        return None
    return layout.get([s.weight for s in slots])


def _shared_call_rows(shared, grad_out, indices, offsets, psw, slots, features, mode, pipeline,
                      known=None) -> CallRows:
    """The record of a call whose tables share one buffer: every occurrence at once (global row ids in the buffer,
    one unique, one scatter_add), then one span per table. ``known``: the forward's ``(gids, single)`` (see
    :func:`recsys_transfer.modules.embedding.flat_lookup`)."""
    base, firsts = shared
    gids, occ = pooled_rows_and_grads(grad_out, indices, offsets, psw, features, firsts, mode, known=known)
    unique = pipeline.same_ids.unique_rows(gids, len(base))
    rows, g = _row_sums(gids, occ.to(base.dtype), unique=unique)
    return _shared_record(shared, rows, g, slots)


def _shared_record(shared, rows: torch.Tensor, g: torch.Tensor, slots) -> CallRows:
    """The record of the unique buffer rows ``rows`` (sorted) of tables sharing one buffer and their gradients."""
    base, firsts = shared
    edges = [e for t in range(len(slots)) for e in (firsts[t], firsts[t] + slots[t].weight.shape[0])]
    cuts = torch.searchsorted(rows, torch.tensor(edges, dtype=rows.dtype, device=rows.device)).tolist()
    shared = SharedRows(base, rows, g, list(firsts), list(slots))
    tables = []
    for t, slot in enumerate(slots):
        lo, hi = cuts[2 * t], cuts[2 * t + 1]
        if hi > lo:  # the table's rows and gradient are sliced from the call's arrays only if asked for
            tables.append(TableRows(slot, span=(lo, hi), shared=shared, first=firsts[t]))
    return CallRows(tables, shared)


class RecordingColumnLookup(torch.autograd.Function):
    """Column ``column`` of every feature's pooled row, ``[B, F]``, recording the touched rows like
    :class:`RecordingLookup`: the row pipeline's path for :func:`recsys_transfer.modules.embedding.lookup_column`
    (the FM first-order weights: 4-wide tables of which only column 0 is read). The full lookup gathers
    ``[B * F, 4]`` rows, slices them, and its backward sums an output gradient that is zero outside the column 4
    columns wide; here only the column is gathered and summed (a strided 1-D gather, a 1-D ``scatter_add_``). The
    record holds whole rows with the other columns of the gradient exactly zero, as on the full path, so every
    transform and the row optimizer (row-wise Adagrad's mean over the 4 columns included) see the same numbers,
    bitwise (tested). Used for single-valued bags over tables sharing one buffer whose rows no transform reads
    (:meth:`RowPipeline.reads_rows`; a transfer loss reads every column).

    Why the values agree: the forward reads ``base[gid, column]``, the entries the full lookup's rows hold; per
    row, the gradient sum adds the same occurrences in the same (occurrence) order, starting from zero (the full
    path's other columns sum zeros to zero)."""

    @staticmethod
    def forward(ctx, anchor, indices, offsets, per_sample_weights, slots, features, column, shared, pipeline):
        base, firsts = shared
        batch = (len(offsets) - 1) // len(features)
        gids, _ = pipeline.same_ids.occurrence_rows(indices, offsets, features, firsts)  # row b * F + f
        vals = base.detach()[:, column].index_select(0, gids)
        psw = None
        if per_sample_weights is not None:  # feature major, as the ids: reordered as the occurrences
            psw = per_sample_weights.view(len(features), batch).t().reshape(-1)
            vals = vals * psw
        ctx.slots, ctx.column, ctx.shared, ctx.pipeline, ctx.key = slots, column, shared, pipeline, next(_CALL_KEYS)
        ctx.save_for_backward(gids, psw)
        return vals.view(batch, len(features))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gids, psw = ctx.saved_tensors
        base, _ = ctx.shared
        occ = grad_out.reshape(-1)
        if psw is not None:
            occ = occ * psw
        rows, inverse = ctx.pipeline.same_ids.unique_rows(gids, len(base))
        column = torch.zeros(len(rows), dtype=base.dtype, device=base.device)
        column.scatter_add_(0, inverse, occ.to(base.dtype))
        g = torch.zeros((len(rows), base.shape[1]), dtype=base.dtype, device=base.device)
        g.select(1, ctx.column).copy_(column)
        ctx.pipeline.record(ctx.key, _shared_record(ctx.shared, rows, g, ctx.slots))
        return (None,) * 9


def _anchor() -> torch.Tensor:
    """A 0-element leaf that requires grad, so autograd calls the recording backward (the tables get none)."""
    return torch.zeros(0, requires_grad=True)


def attach_ebc(ebc: nn.Module, slots: list[TableSlot], pipeline: RowPipeline) -> None:
    """Replace an unsharded EmbeddingBagCollection's forward by the recording one (``slots``: its tables, in
    config order)."""
    features, modes, names = [], [], []
    for t, cfg in enumerate(ebc.embedding_bag_configs()):
        bag = ebc.embedding_bags[cfg.name]
        if bag.mode not in ("sum", "mean"):
            raise UserError(f"table {cfg.name}: pooling {bag.mode!r} is not supported by the fused lookup (sum, mean)")
        for fname in cfg.feature_names:
            features.append(t)
            modes.append(bag.mode)
            names.append(fname)
    anchor, layout = _anchor(), LayoutCache()

    def forward(features_kjt):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kjt = features_kjt
        if kjt.keys() != names:
            kjt = kjt.permute([kjt.keys().index(n) for n in names])
        weights = kjt.weights_or_none() if ebc.is_weighted() else None
        args = (kjt.values(), kjt.offsets(), weights, slots, features, modes)
        values = (RecordingLookup.apply(anchor, *args, layout, pipeline) if torch.is_grad_enabled()
                  else _plain_lookup(*args))
        return KeyedTensor(keys=ebc._embedding_names, values=values, length_per_key=ebc._lengths_per_embedding)

    def column_lookup(features_kjt, column: int):
        """``lookup_column(ebc, features_kjt, column)`` through :class:`RecordingColumnLookup`, or None where that
        does not apply (then ``lookup_column`` takes the full lookup and slices it)."""
        kjt = features_kjt
        if kjt.keys() != names:
            kjt = kjt.permute([kjt.keys().index(n) for n in names])
        indices, offsets = kjt.values(), kjt.offsets()
        shared = _shared_call(slots, features, modes, offsets, layout)
        if (shared is None or not torch.is_grad_enabled() or pipeline.reads_rows(slots)
                or not single_valued(len(indices), offsets, len(offsets) - 1)):
            return None
        weights = kjt.weights_or_none() if ebc.is_weighted() else None
        return RecordingColumnLookup.apply(anchor, indices, offsets, weights, slots, features, column, shared,
                                           pipeline)

    forward.column_lookup = column_lookup  # found by lookup_column
    ebc.forward = forward


def attach_ec(ec: nn.Module, slots: list[TableSlot], pipeline: RowPipeline) -> None:
    """Replace an unsharded EmbeddingCollection's forward (sequence embeddings) by the recording one."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    features, names, out_names = [], [], []
    for t, cfg in enumerate(ec.embedding_configs()):
        for fname, ename in zip(cfg.feature_names, ec._embedding_names_by_table[t]):
            features.append(t)
            names.append(fname)
            out_names.append(ename)
    modes = ["none"] * len(features)
    anchor, layout = _anchor(), LayoutCache()

    def forward(features_kjt):
        kjt = features_kjt
        if kjt.keys() != names:
            kjt = kjt.permute([kjt.keys().index(n) for n in names])
        args = (kjt.values(), kjt.offsets(), None, slots, features, modes)
        values = (RecordingLookup.apply(anchor, *args, layout, pipeline) if torch.is_grad_enabled()
                  else _plain_lookup(*args))
        out, start = {}, 0
        for name, fname in zip(out_names, names):
            lengths = kjt[fname].lengths()
            n = int(lengths.sum())
            out[name] = JaggedTensor(values=values[start : start + n], lengths=lengths,
                                     weights=kjt[fname].values() if ec.need_indices() else None)
            start += n
        return out

    ec.forward = forward


class RecordingTBE(nn.Module):
    """Drop-in for a sharded lookup group's TBE module (``emb_module``), over the shard's weight views."""

    def __init__(self, tbe: nn.Module, slots: list[TableSlot], feature_table_map: list[int], modes: list[str],
                 pipeline: RowPipeline) -> None:
        super().__init__()
        self.base = tbe
        self.slots = slots
        self.feature_table_map = list(feature_table_map)
        self.modes = modes
        self._pipeline = pipeline
        self._anchor, self._layout = _anchor(), LayoutCache()

    def split_embedding_weights(self):
        return [s.weight for s in self.slots]

    def flush(self) -> None:
        """Rows are written in place during the backward phase: nothing is cached, nothing to flush."""

    def purge(self) -> None:
        """No cache to purge (see :meth:`flush`)."""

    def reset_cache_states(self) -> None:
        """No cache (TorchRec calls this before loading a state dict)."""

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        args = (indices, offsets, per_sample_weights, self.slots, self.feature_table_map, self.modes)
        if not torch.is_grad_enabled():
            return _plain_lookup(*args)
        return RecordingLookup.apply(self._anchor, *args, self._layout, self._pipeline)


# ------------------------------------------------------------------------------------------------------------
# attaching to a model


def _features_of(config) -> tuple[str, ...]:
    """The features a table serves (a table may serve several: their occurrences sum into its rows' gradients)."""
    names = tuple(config.feature_names)
    if not names:
        raise UserError(f"table {config.name} serves no feature")
    return names


def _unsharded_slots(path: str, module: nn.Module, pooled: bool) -> list[TableSlot]:
    configs = module.embedding_bag_configs() if pooled else module.embedding_configs()
    tables = module.embedding_bags if pooled else module.embeddings
    collection = collection_name(path)
    return [TableSlot(f"{collection}.{cfg.name}", collection, cfg.name, _features_of(cfg), tables[cfg.name].weight)
            for cfg in configs]


def _attach_sharded(path: str, sharded: nn.Module, pipeline: RowPipeline, slots: list[TableSlot]) -> None:
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

    collection = collection_name(path)
    # the sharding types come from the plan, the same on every rank: every rank refuses (a check on the local shards
    # alone fired only on the ranks holding one, and the others hung in the next all-to-all)
    for sharding_type in sharded._sharding_types:
        if sharding_type not in ROW_PIPELINE_SHARDINGS:
            plan = getattr(sharded, "module_sharding_plan", {})
            names = sorted(n for n, p in plan.items() if p.sharding_type == sharding_type)
            what = f"table {', '.join(names)}" if names else collection
            raise UserError(f"{what}: {sharding_type} sharding is refused by the row pipeline: "
                            f"{REFUSED_SHARDINGS.get(sharding_type, 'not supported')}")
    for lookup_module in sharded._lookups:
        inner = getattr(lookup_module, "module", lookup_module)
        if not hasattr(inner, "_emb_modules"):
            raise UserError(f"{collection}: unsupported sharded lookup {type(inner).__name__} (use table-wise or "
                            "row-wise sharding)")
        for emb in inner._emb_modules:
            group_slots = []
            weights = list(emb._emb_module.split_embedding_weights())
            for t, weight in zip(emb._config.embedding_tables, weights):
                if t.local_cols != t.embedding_dim:
                    raise UserError(f"table {t.name}: column-wise sharding splits rows' dimensions; the row pipeline "
                                    "needs whole rows (use table-wise or row-wise sharding)")
                offset = int(t.local_metadata.shard_offsets[0]) if t.local_metadata is not None else 0
                group = emb._pg if t.local_rows != t.num_embeddings else None
                group_slots.append(TableSlot(f"{collection}.{t.name}", collection, t.name, _features_of(t), weight,
                                             offset, group))
            pooling = getattr(emb, "_pooling", PoolingMode.NONE)  # sequence (EC) lookups have no pooling
            mode = {PoolingMode.SUM: "sum", PoolingMode.MEAN: "mean"}.get(pooling, "none")
            emb._emb_module = RecordingTBE(emb._emb_module, group_slots, emb._feature_table_map,
                                           [mode] * len(emb._feature_table_map), pipeline)
            slots.extend(group_slots)


def attach_rows(model: nn.Module, config: RowsConfig = RowsConfig()) -> RowPipeline:
    """Replace the lookup kernel of every embedding collection of ``model`` (EmbeddingBagCollection or
    EmbeddingCollection, plain or sharded by DistributedModelParallel) by the recording one, and return the
    :class:`RowPipeline` that updates their rows: the row optimizer of ``config`` over every table, keyed by
    table name, and the ``freeze`` / ``clip`` stages when configured (``freeze``: the tables of ``config.freeze`` and
    every unsharded table whose weight has ``requires_grad=False``). Register further transforms (the transfer
    barrier) with :meth:`RowPipeline.add_transform`."""
    from torchrec.distributed.embedding import ShardedEmbeddingCollection
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    pipeline = RowPipeline(model)  # the recording lookups hand their records to it
    slots: list[TableSlot] = []
    attached = []
    collections: dict[str, bool] = {}
    # module paths inside DistributedModelParallel's wrappers (DMP, and DDP when world > 1: tables were named
    # "module.embedding.t_zip" under torchrun, "embedding.t_zip" in one process)
    root = model.module if isinstance(model, DistributedModelParallel) else model
    for path, module in list(root.named_modules()):
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            pooled = isinstance(module, EmbeddingBagCollection)
            found = _unsharded_slots(path, module, pooled)
            attached.append((attach_ebc if pooled else attach_ec, module, found))
            slots.extend(found)
            collections[collection_name(path)] = False
        elif isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
            _attach_sharded(path, module, pipeline, slots)
            collections[collection_name(path)] = True
    names = [s.name for s in slots]
    if len(set(names)) != len(names):
        raise UserError(f"two embedding tables share a name: {sorted(n for n in names if names.count(n) > 1)}")
    # a model marks a table it keeps fixed (PeterRec's pretrained item table) by requires_grad=False on its weight:
    # frozen like rows.freeze (unsharded collections; under DMP the flag does not reach the shards: use rows.freeze)
    marked = tuple(s.name for s in slots if not collections.get(s.collection, True) and not s.weight.requires_grad)
    names = tuple(config.freeze) + tuple(n for n in marked if n not in config.freeze)
    freeze = FreezeTables(names, slots) if names else None
    trained = [s for s in slots if freeze is None or not freeze.frozen(s)]  # frozen tables get no optimizer state
    optimizer = make_row_optimizer(config.optimizer, [s.weight for s in trained], names=[s.name for s in trained],
                                   lr=config.lr, **config.optimizer_kwargs) if trained else None
    pipeline.register(slots, collections, optimizer)
    for attach, module, found in attached:
        attach(module, found, pipeline)
    if freeze is not None:
        pipeline.add_transform(freeze)
    if config.clip_norm is not None:
        pipeline.add_transform(ClipRowNorm(config.clip_norm))
    return pipeline


__all__ = ["RecordingLookup", "RecordingTBE", "attach_ebc", "attach_ec", "attach_rows"]
