"""TorchRec embedding tables built from a prepared dataset's schema, and the grouped lookup kernel.

One table per vocabulary: a field with its own vocabulary gets the table ``t_<field>`` (the name the transfer
plug-in and sharders use to reach it) with ``num_embeddings = vocab_size`` from ``meta.json``; a field that shares
another's vocabulary (``vocab_of``, e.g. a ``history`` list of ``item_id``'s items) is one more feature of that
owner's table (``t_item_id`` serves ``item_id`` and ``history``): its ids are the owner's ids, so they look up the
owner's rows, and the table's gradient sums the occurrences of all its features. The collection's output is
TorchRec's: a ``KeyedTensor`` keyed by feature name, in table order, each table's features in their meta.json order
(so not always meta.json's field order: models that stack every field's embedding do not depend on it).

Pooling (list fields; a single-valued bag pools to its row either way): ``sum`` unless ``pooling`` maps a field
to ``mean``. TorchRec pools per TABLE (``EmbeddingBagConfig.pooling``, and the sharded kernels group tables by
it), so the fields of one shared table pool alike: a value given for any of them sets the table's pooling, and
two different values for fields of one table are refused (:class:`UserError`) rather than silently ignored.
A single-valued field (``item_id``) is unchanged by its table's ``mean`` (a bag of one id), so
``pooling: {history: mean}`` is the way to mean-pool a history sharing the item table. A field that must pool
differently from its vocabulary owner needs its own table: give it its own vocabulary when preparing.

Grouped lookup. TorchRec's unsharded ``EmbeddingBagCollection.forward`` splits the KeyedJaggedTensor per table
and runs one ``nn.EmbeddingBag`` (and one autograd node) per table; on CPU with small batches that per-table
overhead, not the arithmetic, is most of the embedding cost (DeepFM on ML-100K: 18 tables, ~4 of ~8 ms per
step). :func:`use_grouped_lookup` (applied by :func:`make_ebc`) replaces the instance's forward by ONE autograd
function over all its tables, and moves same-width tables into one buffer
(:func:`recsys_transfer.flat.share_storage`; each table stays its own Parameter with its values). Then the
lookup of every feature is ONE ``embedding_bag`` over the buffer with global row ids, and the backward ONE
``index_put_(accumulate=True)`` into a buffer-shaped gradient whose row blocks are the tables' gradients — the
same values and the same ``[num_embeddings, D]`` gradients as TorchRec's path (tested; tables of mixed widths
take a per-table path). DeepFM on ML-100K trains ~1.5x faster than on TorchRec's unsharded forward. It is the
EBC's own parameters, state-dict keys and ``KeyedTensor`` output; DistributedModelParallel replaces the whole
module by its sharded version (this forward is not used there), and the transfer plug-in replaces it by its
fused row-update lookup. :func:`lookup` and :func:`occurrence_grads` are shared with that plug-in.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.flat import LayoutCache, rows_of_one_buffer, share_storage


#: pooling of list fields' bags (``pooling: {field: mode}``)
POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_name(field: str) -> str:
    return f"t_{field}"


def tables_of(meta: DatasetMeta, fields: Sequence[str] | None = None) -> dict[str, list[str]]:
    """``{vocabulary owner: [its features among fields]}``, owners in order of their first feature in ``fields``
    (default: every sparse field, in meta.json order)."""
    out: dict[str, list[str]] = {}
    for f in fields or meta.sparse_names:
        out.setdefault(meta.field(f).table_field, []).append(f)
    return out


def table_poolings(meta: DatasetMeta, pooling: dict[str, str] | None, fields: Sequence[str] | None = None,
                   ) -> dict[str, PoolingType]:
    """``{vocabulary owner: TorchRec pooling of its table}`` from ``pooling`` (``{field: 'sum' | 'mean'}``,
    default sum; see the module docstring). Unknown fields or modes, and two modes for one table: :class:`UserError`."""
    tables = tables_of(meta, fields)
    pooling = dict(pooling or {})
    owner_of = {f: owner for owner, fs in tables.items() for f in fs}
    for f, mode in pooling.items():
        if f not in owner_of:
            raise UserError(f"pooling: {f!r} is not a sparse field of this collection ({sorted(owner_of)})")
        if mode not in POOLINGS:
            raise UserError(f"pooling of {f!r} must be one of {sorted(POOLINGS)}, got {mode!r}")
    out = {}
    for owner, fs in tables.items():
        modes = {f: pooling[f] for f in fs if f in pooling}
        if len(set(modes.values())) > 1:
            raise UserError(f"pooling: fields {sorted(modes)} share the table {table_name(owner)} (one vocabulary), "
                            f"and TorchRec pools per table; got {modes}. Give them one mode (a single-valued field "
                            "pools to its row under either)")
        out[owner] = POOLINGS[next(iter(modes.values()), "sum")]
    return out


def table_configs(meta: DatasetMeta, dim: int, fields: Sequence[str] | None = None,
                  pooling: dict[str, str] | None = None) -> list[EmbeddingBagConfig]:
    """One ``dim``-wide table per vocabulary owner of ``fields`` (default every sparse field), serving every one of
    those fields that uses its vocabulary (module docstring)."""
    poolings = table_poolings(meta, pooling, fields)
    return [
        EmbeddingBagConfig(
            name=table_name(owner),
            embedding_dim=dim,
            num_embeddings=meta.field(owner).vocab_size,
            feature_names=list(features),
            pooling=poolings[owner],
        )
        for owner, features in tables_of(meta, fields).items()
    ]


def make_ebc(meta: DatasetMeta, dim: int, device: str = "cpu", pooling: dict[str, str] | None = None,
             fields: Sequence[str] | None = None) -> EmbeddingBagCollection:
    """An EmbeddingBagCollection with one ``dim``-wide table per vocabulary owner of ``fields`` (default every
    sparse field; ``device='meta'`` for DMP), pooling list fields by ``pooling`` (``{field: 'sum' | 'mean'}``,
    default sum), with the grouped lookup (see the module docstring). Its forward reads only its own features of a
    KeyedJaggedTensor holding more."""
    return use_grouped_lookup(EmbeddingBagCollection(tables=table_configs(meta, dim, fields, pooling),
                                                     device=torch.device(device)))


def output_keys(ebc: EmbeddingBagCollection) -> list[str]:
    """The keys of an unsharded EmbeddingBagCollection's output ``KeyedTensor``, in its column order (each table's
    features, tables in config order): record them at construction and read the output with
    :func:`values_in_order`."""
    return [name for cfg in ebc.embedding_bag_configs() for name in cfg.feature_names]


def values_in_order(kt, keys: Sequence[str]) -> torch.Tensor:
    """``kt.values()`` (``[B, sum D]``) with its key blocks in the order ``keys`` (:func:`output_keys` of the
    unsharded collection). A collection sharded by DistributedModelParallel lists its output keys in the order of
    its shardings (table-wise: rank by rank), not the config's: a model that reads the values positionally (a deep
    network on the concatenated fields) would otherwise see its fields permuted under table-wise sharding -- a
    different function of the same weights than in one process (measured: DeepFM on Adult, logits apart from the
    first step). Unsharded, and whenever the order already agrees (row-wise), this is ``kt.values()`` itself."""
    if list(kt.keys()) == list(keys):
        return kt.values()
    by_key = kt.to_dict()
    return torch.cat([by_key[k] for k in keys], dim=1)


def make_ec(meta: DatasetMeta, dim: int, fields: Sequence[str] | None = None,
            device: str = "cpu") -> EmbeddingCollection:
    """An EmbeddingCollection (unpooled lookups, for sequence models) with one ``dim``-wide table per vocabulary
    owner of ``fields`` (default every sparse field), named and shared as :func:`table_configs`' tables. Its
    ``forward(kjt)`` is TorchRec's: ``{feature name: JaggedTensor}``, the ``[L, dim]`` rows of each feature's ids
    with the KJT's lengths (keys of ``kjt`` outside ``fields`` are ignored). The row pipeline records its tables
    like an EBC's (:func:`recsys_transfer.rows.lookup.attach_ec`)."""
    configs = [EmbeddingConfig(name=table_name(owner), embedding_dim=dim, num_embeddings=meta.field(owner).vocab_size,
                               feature_names=list(features))
               for owner, features in tables_of(meta, fields).items()]
    return EmbeddingCollection(tables=configs, device=torch.device(device))


# ----------------------------------------------------------------------------------------------------------
# the lookup kernel (TBE layout: features major, ``offsets`` of length F * B + 1)


def flat_tables(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """``(base [R, D], first row of each table in base)`` when the 2-D tables are row blocks of one buffer
    (:func:`recsys_transfer.flat.share_storage`), else None (then lookups go table by table)."""
    if weights[0].dim() != 2:
        return None
    return rows_of_one_buffer(weights)


def buffer_ids(indices: torch.Tensor, bounds: list[int], features: Sequence[int], firsts: list[int]) -> torch.Tensor:
    """Row ids in the shared buffer: feature ``f``'s ids (``indices[bounds[f]:bounds[f+1]]``) shifted by the first
    row of its table, ``firsts[features[f]]``."""
    shift = torch.tensor([firsts[t] for t in features], dtype=indices.dtype, device=indices.device)
    counts = torch.tensor([bounds[f + 1] - bounds[f] for f in range(len(features))], device=indices.device)
    return indices + torch.repeat_interleave(shift, counts, output_size=len(indices))


_ARANGES: dict[tuple, torch.Tensor] = {}


def single_valued(n_indices: int, offsets: torch.Tensor, n_bags: int) -> bool:
    """Every one of the ``n_bags`` bags holds exactly one id: ``offsets == arange``, one compare against a cached
    arange (instead of forming the lengths)."""
    if n_indices != n_bags:
        return False
    key = (len(offsets), offsets.dtype, offsets.device)
    ref = _ARANGES.get(key)
    if ref is None:
        if len(_ARANGES) > 8:  # batch sizes seen by a process are few; keep the cache small regardless
            _ARANGES.clear()
        ref = _ARANGES[key] = torch.arange(len(offsets), dtype=offsets.dtype, device=offsets.device)
    return torch.equal(offsets, ref)


def occurrence_rows(indices: torch.Tensor, offsets: torch.Tensor, features: Sequence[int], firsts: Sequence[int],
                    sample_major: bool) -> tuple[torch.Tensor, bool]:
    """``(gids, single)``: every occurrence's row in the buffer whose table blocks start at ``firsts``, and whether
    every bag holds one id. Feature major, or sample major (row ``b * F + f``) when ``single`` and
    ``sample_major``. Single-valued bags (every prepared dataset) need no per-feature bounds: one broadcast add."""
    n_feat = len(features)
    batch = (len(offsets) - 1) // n_feat
    single = single_valued(len(indices), offsets, n_feat * batch)
    if not single:
        return buffer_ids(indices.long(), offsets[::batch].tolist(), features, firsts), False
    shift = torch.tensor([firsts[t] for t in features], dtype=torch.int64, device=indices.device)
    ids = indices.reshape(n_feat, batch)
    if not sample_major:
        return torch.add(ids, shift.unsqueeze(1)).view(-1), True
    gids = torch.empty((batch, n_feat), dtype=torch.int64, device=indices.device)
    return torch.add(ids.t(), shift, out=gids).view(-1), True


#: :func:`unique_rows` marks rows in a dense ``[n_rows]`` array when ``n_rows`` is at most this many times the
#: number of occurrences (its cost grows with ``n_rows``, a sort's with the occurrences only)
MARK_ROWS_PER_OCCURRENCE = 8


def unique_rows(gids: torch.Tensor, n_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(gids, return_inverse=True)`` (sorted unique rows, each occurrence's position among them) for
    row ids in ``[0, n_rows)``. CPU ``torch.unique`` sorts (~1.1 ms for DeepFM's 40k occurrences per step); when
    the buffer is small next to the occurrences, marking the touched rows in a dense ``[n_rows]`` array is ~6x
    cheaper: ``nonzero`` lists them in order, and the running count of marks is one more than each row's position.
    The same two integer tensors either way (tested). The mark is an int64 per row, not a gradient: it is only
    made for buffers of at most ``MARK_ROWS_PER_OCCURRENCE`` rows per occurrence."""
    if n_rows is None or not 0 < n_rows <= MARK_ROWS_PER_OCCURRENCE * len(gids) or gids.device.type != "cpu":
        return torch.unique(gids, return_inverse=True)
    mark = torch.zeros(n_rows, dtype=torch.int64, device=gids.device).index_fill_(0, gids, 1)
    rows = mark.nonzero().view(-1)
    return rows, mark.cumsum_(0).index_select(0, gids).sub_(1)


def pooled_over_all(features: Sequence[int], modes: Sequence[str], n_tables: int, offsets: torch.Tensor) -> bool:
    """One pooled lookup (a single pooling mode, not sequences, a non-empty batch) that reads every one of the
    ``n_tables`` tables: the case where tables sharing a buffer are looked up in ONE call (:func:`flat_lookup`)."""
    return (len(set(modes)) == 1 and modes[0] != "none" and len(offsets) > 1
            and sorted(set(features)) == list(range(n_tables)))


def stacked_occurrences(per_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]],
                        shapes: Sequence[tuple[int, int, torch.dtype]]):
    """The occurrences of tables that do NOT share a buffer, stacked per width and dtype as if they did: yields
    ``(tables, bases, gids, occ)`` per group, where table ``tables[j]``'s row ``r`` is row ``bases[j] + r`` of a
    virtual ``[bases[-1], D]`` buffer. ``per_table[t]``: (ids, grads) lists of table ``t``'s occurrences;
    ``shapes[t]``: (rows, width, dtype)."""
    by_width: dict[tuple, list[int]] = {}
    for t in per_table:
        by_width.setdefault(tuple(shapes[t][1:]), []).append(t)
    for (_, dtype), ts in by_width.items():
        bases = [0]
        for t in ts:
            bases.append(bases[-1] + shapes[t][0])
        gids = torch.cat([ids + bases[j] for j, t in enumerate(ts) for ids in per_table[t][0]])
        occ = torch.cat([o for t in ts for o in per_table[t][1]]).to(dtype)
        yield ts, bases, gids, occ


def flat_lookup(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
                base: torch.Tensor, firsts: Sequence[int], features: Sequence[int], mode: str,
                known: tuple[torch.Tensor, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Pooled lookup of every feature in ONE call over tables that are row blocks of ``base`` (``firsts``: each
    table's first row). Returns ``(out [B, sum D], gids, single)``: ``gids`` is every occurrence's row in the
    buffer, in the order :func:`pooled_rows_and_grads` pairs with the output gradient (sample major when
    ``single``, i.e. every bag holds one id; else feature major) -- a backward can keep it instead of recomputing.
    ``known``: ``occurrence_rows(indices, offsets, features, firsts, sample_major=True)`` if the caller has it."""
    n_feat = len(features)
    batch = (len(offsets) - 1) // n_feat
    gids, single = known if known is not None else occurrence_rows(indices, offsets, features, firsts,
                                                                   sample_major=True)
    if single:  # the rows gathered sample-major, so the output needs no transpose
        out = F.embedding(gids, base.detach())  # [B * F, D]
        if per_sample_weights is not None:
            out = out * per_sample_weights.view(n_feat, batch).t().reshape(-1, 1)
        return out.view(batch, -1), gids, True
    out = F.embedding_bag(gids, base.detach(), offsets, mode=mode, per_sample_weights=per_sample_weights,
                          include_last_offset=True)  # [F * B, D]
    return out.view(n_feat, batch, -1).transpose(0, 1).reshape(batch, -1), gids, False


def lookup(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
           weights: Sequence[torch.Tensor], features: Sequence[int], modes: Sequence[str],
           flat: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
    """Pooled (``sum``/``mean``: ``[B, sum_f D_f]``) or sequence (``none``: ``[n_indices, D]``) lookup of every
    feature ``f`` in table ``weights[features[f]]`` (detached: gradients are the caller's business). ``flat``:
    the tables' shared-buffer layout if the caller knows it (else it is worked out here)."""
    n_feat = len(features)
    batch = (len(offsets) - 1) // n_feat
    if batch and pooled_over_all(features, modes, len(weights), offsets):
        flat = flat if flat is not None else flat_tables(weights)
        if flat is not None:  # every feature in ONE lookup over the shared buffer
            return flat_lookup(indices, offsets, per_sample_weights, flat[0], flat[1], features, modes[0])[0]
    bounds = offsets[::batch].tolist() if batch else [0] * (n_feat + 1)  # each feature's first index, one sync
    outs = []
    for f, t in enumerate(features):
        weight = weights[t].detach()
        lo, hi = bounds[f], bounds[f + 1]
        if modes[f] == "none":
            outs.append(F.embedding(indices[lo:hi], weight))
            continue
        off = offsets[f * batch : (f + 1) * batch + 1] - lo
        psw = per_sample_weights[lo:hi] if per_sample_weights is not None else None
        outs.append(F.embedding_bag(indices[lo:hi], weight, off, mode=modes[f], per_sample_weights=psw,
                                    include_last_offset=True))
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, dim=0 if modes[0] == "none" else 1)


def occurrence_grads(grad_out: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                     per_sample_weights: torch.Tensor | None, dims: Sequence[int],
                     modes: Sequence[str]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For the output gradient of :func:`lookup`, yield ``(feature, ids [n_f], grads [n_f, D_f])``: the gradient
    reaching each looked-up occurrence (pooling and per-sample weights undone), features in order."""
    n_feat = len(dims)
    batch = (len(offsets) - 1) // n_feat
    bounds = offsets[::batch].tolist() if batch else [0] * (n_feat + 1)
    all_lengths = (offsets[1:] - offsets[:-1]).view(n_feat, batch)
    single = (all_lengths == 1).all(dim=1).tolist()  # single-valued features: occurrence k is bag k
    col = 0
    for f in range(n_feat):
        dim = dims[f]
        lo, hi = bounds[f], bounds[f + 1]
        if modes[f] == "none":  # sequence output: row k of the output is occurrence k
            occ = grad_out[lo:hi]
        else:
            gf = grad_out[:, col : col + dim]
            col += dim
            if single[f]:
                occ = gf
            else:
                lengths = all_lengths[f]
                bag = torch.repeat_interleave(torch.arange(batch, device=grad_out.device), lengths.long())
                occ = gf.index_select(0, bag)
                if modes[f] == "mean":
                    occ = occ / lengths.clamp_min(1).to(occ.dtype).index_select(0, bag).unsqueeze(1)
            if per_sample_weights is not None:
                occ = occ * per_sample_weights[lo:hi].unsqueeze(1)
        yield f, indices[lo:hi].long(), occ


def pooled_rows_and_grads(grad_out: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                          per_sample_weights: torch.Tensor | None, features: Sequence[int], firsts: Sequence[int],
                          mode: str,
                          known: tuple[torch.Tensor, bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a pooled lookup over tables sharing one buffer (all features of one width and pooling): every
    occurrence's row in the buffer ``[n_indices]`` and the gradient reaching it ``[n_indices, D]``, in matching
    order (sample major when every bag holds one id -- then the gradient is a view of ``grad_out`` -- else
    feature major). ``known``: ``(gids, single)`` from the forward's :func:`flat_lookup`, saving their
    recomputation."""
    n_feat = len(features)
    batch = (len(offsets) - 1) // n_feat
    gids, single = known if known is not None else occurrence_rows(indices, offsets, features, firsts, True)
    if single:
        occ = grad_out.reshape(batch * n_feat, -1)  # row b*F + f: sample b, feature f
        if per_sample_weights is not None:
            occ = occ * per_sample_weights.view(n_feat, batch).t().reshape(-1, 1)
        return gids, occ
    lengths = offsets[1:] - offsets[:-1]
    bags = grad_out.view(batch, n_feat, -1).transpose(0, 1).reshape(n_feat * batch, -1)  # bag (f, b) -> row f*B+b
    bag = torch.repeat_interleave(torch.arange(n_feat * batch, device=grad_out.device), lengths.long(),
                                  output_size=len(indices))
    occ = bags.index_select(0, bag)
    if mode == "mean":
        occ = occ / lengths.clamp_min(1).to(occ.dtype).index_select(0, bag).unsqueeze(1)
    if per_sample_weights is not None:
        occ = occ * per_sample_weights.unsqueeze(1)
    return gids, occ


def _zeroed_grad_buffer(grad_buffers: dict, weights: Sequence[torch.Tensor], shape: tuple[int, int],
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed ``shape`` buffer for the tables' gradients (its row blocks become them). Last step's is reused when
    no table holds a gradient any more (``zero_grad(set_to_none=True)`` ran): a fresh ~10 MB buffer is
    page-faulted in by the OS every step. Else (gradient accumulation) a new one."""
    flat = grad_buffers.get("flat")
    if flat is None or flat.shape != shape or flat.dtype != dtype or any(w.grad is not None for w in weights):
        flat = grad_buffers["flat"] = torch.zeros(shape, dtype=dtype, device=device)
    else:
        flat.zero_()
    return flat


class _GroupedLookup(torch.autograd.Function):
    """:func:`lookup` over all tables of a collection as one autograd node; backward: dense table gradients."""

    @staticmethod
    def forward(ctx, indices, offsets, per_sample_weights, features, modes, grad_buffers, layout, *weights):
        ctx.features, ctx.modes, ctx.grad_buffers, ctx.weights = features, modes, grad_buffers, weights
        ctx.shapes = [(w.shape, w.dtype, w.device) for w in weights]
        flat = layout.get(weights) if pooled_over_all(features, modes, len(weights), offsets) else None
        ctx.flat = None
        if flat is not None:  # keep the occurrences' buffer rows for the backward
            base, firsts = flat
            out, gids, ctx.single = flat_lookup(indices, offsets, per_sample_weights, base, firsts, features,
                                                modes[0])
            ctx.flat = (base.shape[0], base.shape[1], base.dtype, base.device, firsts)
            ctx.save_for_backward(indices, offsets, per_sample_weights, gids)
            return out
        ctx.save_for_backward(indices, offsets, per_sample_weights, None)
        return lookup(indices, offsets, per_sample_weights, weights, features, modes)

    @staticmethod
    def backward(ctx, grad_out):
        indices, offsets, psw, gids = ctx.saved_tensors
        features = ctx.features
        if ctx.flat is not None:  # one buffer: one gradient buffer, one index_put_, views per table
            rows, dim, dtype, device, firsts = ctx.flat
            gids, occ = pooled_rows_and_grads(grad_out, indices, offsets, psw, features, firsts, ctx.modes[0],
                                              known=(gids, ctx.single))
            flat = _zeroed_grad_buffer(ctx.grad_buffers, ctx.weights, (rows, dim), dtype, device)
            flat.index_put_((gids,), occ.to(dtype), accumulate=True)
            views = [flat[first : first + ctx.shapes[t][0][0]] for t, first in enumerate(firsts)]
            return (None, None, None, None, None, None, None, *views)
        dims = [ctx.shapes[t][0][1] for t in features]
        per_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for f, ids, occ in occurrence_grads(grad_out, indices, offsets, psw, dims, ctx.modes):
            t = features[f]
            if ctx.needs_input_grad[7 + t]:
                t_ids, t_occ = per_table.setdefault(t, ([], []))
                t_ids.append(ids)
                t_occ.append(occ)
        grads: list[torch.Tensor | None] = [None] * len(ctx.shapes)
        shapes = [(shape[0], shape[1], dtype) for shape, dtype, _ in ctx.shapes]
        for ts, bases, gids, occ in stacked_occurrences(per_table, shapes):  # one buffer, one index_put_ per width
            flat = torch.zeros((bases[-1], occ.shape[1]), dtype=occ.dtype, device=occ.device)
            flat.index_put_((gids,), occ, accumulate=True)
            for j, t in enumerate(ts):
                grads[t] = flat[bases[j] : bases[j + 1]]  # contiguous views of one buffer
        return (None, None, None, None, None, None, None, *grads)


def _grouped_inputs(ebc: EmbeddingBagCollection, features):
    """``(kjt in the collection's feature order, per-sample weights or None, table weights)``."""
    names = ebc._grouped_layout[0]
    kjt = features if features.keys() == names else features.permute([features.keys().index(n) for n in names])
    psw = kjt.weights_or_none() if ebc.is_weighted() else None
    return kjt, psw, [bag.weight for bag in ebc.embedding_bags.values()]


def _grouped_forward(self: EmbeddingBagCollection, features):
    from torchrec.sparse.jagged_tensor import KeyedTensor

    kjt, psw, weights = _grouped_inputs(self, features)
    _, table_of, modes = self._grouped_layout
    values = _GroupedLookup.apply(kjt.values(), kjt.offsets(), psw, table_of, modes, self._grad_buffers,
                                  self._layout, *weights)
    return KeyedTensor(keys=self._embedding_names, values=values, length_per_key=self._lengths_per_embedding)


class _ColumnLookup(torch.autograd.Function):
    """Column ``column`` of every feature's pooled row, ``[B, F]``, for tables that are row blocks of one buffer:
    the values and gradients of ``lookup(...)`` followed by selecting that column of each feature, without
    gathering or scattering the other columns (see :func:`lookup_column`). Backward: the same dense
    ``[num_embeddings, D]`` table gradients as the full lookup's, zero outside the column."""

    @staticmethod
    def forward(ctx, indices, offsets, per_sample_weights, features, mode, column, grad_buffers, base, firsts,
                *weights):
        n_feat = len(features)
        batch = (len(offsets) - 1) // n_feat
        gids, single = occurrence_rows(indices, offsets, features, firsts, sample_major=False)
        vals = base.detach()[:, column].index_select(0, gids)  # a strided 1-D gather: ~3x cheaper than rows
        if per_sample_weights is not None:
            vals = vals * per_sample_weights
        bag = None
        if not single:  # pool the bags
            lengths = offsets[1:] - offsets[:-1]
            bag = torch.repeat_interleave(torch.arange(n_feat * batch, device=vals.device), lengths.long(),
                                          output_size=len(indices))
            vals = vals.new_zeros(n_feat * batch).index_add_(0, bag, vals)
            if mode == "mean":
                vals = vals / lengths.clamp_min(1).to(vals.dtype)
        ctx.mode, ctx.column, ctx.grad_buffers, ctx.weights, ctx.firsts = mode, column, grad_buffers, weights, firsts
        ctx.base = (base.shape, base.dtype, base.device)
        ctx.save_for_backward(offsets, per_sample_weights, gids, bag)
        return vals.view(n_feat, batch).t().contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        offsets, psw, gids, bag = ctx.saved_tensors
        occ = grad_out.t().reshape(-1)  # bag (f, b) -> f * B + b
        if bag is not None:
            if ctx.mode == "mean":
                occ = occ / (offsets[1:] - offsets[:-1]).clamp_min(1).to(occ.dtype)
            occ = occ.index_select(0, bag)
        if psw is not None:
            occ = occ * psw
        shape, dtype, device = ctx.base
        flat = _zeroed_grad_buffer(ctx.grad_buffers, ctx.weights, tuple(shape), dtype, device)
        flat[:, ctx.column].index_add_(0, gids, occ.to(dtype))
        views = [flat[first : first + w.shape[0]] for w, first in zip(ctx.weights, ctx.firsts)]
        return (None,) * 9 + tuple(views)


def lookup_column(ebc: EmbeddingBagCollection, features, column: int = 0) -> torch.Tensor:
    """``ebc(features)`` reduced to column ``column`` of each feature's pooled embedding: ``[B, F]``, features in
    the order of the output's keys. For a module that reads one column of its tables (the FM first-order weights
    of :class:`recsys_transfer.modules.fm.FirstOrder`): on the grouped lookup it gathers and scatters only that
    column (a strided 1-D gather; the full lookup of 4-wide tables costs ~3x more on CPU); so does the row
    pipeline's recording lookup where its column path applies (no transform reads these tables' other columns:
    :class:`recsys_transfer.rows.lookup.RecordingColumnLookup`); anywhere else (a sharded module, tables that do
    not share a buffer, tables under transfer) it is the full lookup, sliced. Values and table gradients (for the
    row pipeline: the row updates) are the same either way (tested)."""
    # the test is which forward RUNS, not whether use_grouped_lookup was applied: the row pipeline replaces that
    # forward on the same module, and its lookup (which records the rows in backward) must not be bypassed; it
    # offers its own column path (recsys_transfer.rows.lookup.RecordingColumnLookup) where it applies
    column_lookup = getattr(ebc.forward, "column_lookup", None)
    if column_lookup is not None:
        out = column_lookup(features, column)
        if out is not None:
            return out
    if getattr(ebc.forward, "__func__", None) is _grouped_forward:
        kjt, psw, weights = _grouped_inputs(ebc, features)
        _, table_of, modes = ebc._grouped_layout
        flat = ebc._layout.get(weights) if pooled_over_all(table_of, modes, len(weights), kjt.offsets()) else None
        if flat is not None:
            return _ColumnLookup.apply(kjt.values(), kjt.offsets(), psw, table_of, modes[0], column,
                                       ebc._grad_buffers, flat[0], flat[1], *weights)
    kt = ebc(features)
    dims = kt.length_per_key()
    starts = [sum(dims[:k]) + column for k in range(len(dims))]
    return kt.values()[:, starts]


def use_grouped_lookup(ebc: EmbeddingBagCollection) -> EmbeddingBagCollection:
    """Give ``ebc`` the grouped lookup (module docstring); left unchanged if a table's pooling is not sum/mean."""
    names, table_of, modes = [], [], []
    for t, cfg in enumerate(ebc.embedding_bag_configs()):
        bag = ebc.embedding_bags[cfg.name]
        if bag.mode not in ("sum", "mean") or list(ebc.embedding_bags.keys())[t] != cfg.name:
            return ebc
        for name in cfg.feature_names:
            names.append(name)
            table_of.append(t)
            modes.append(bag.mode)
    ebc._grouped_layout = (names, table_of, modes)
    ebc._grad_buffers = {}  # the tables' gradient buffer, reused across steps (see _GroupedLookup.backward)
    ebc._layout = LayoutCache()  # the tables' shared-buffer layout, re-derived only when a table moves
    ebc.forward = types.MethodType(_grouped_forward, ebc)  # bound to the instance: deepcopy rebinds it
    if not any(p.is_meta for p in ebc.parameters()):
        share_storage([bag.weight for bag in ebc.embedding_bags.values()])
    return ebc
