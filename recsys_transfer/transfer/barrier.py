"""Item-wise dynamic barrier (paper Sec. 3.2.1, Algorithm 1) as a fused backward hook on TorchRec tables.

Design
------
All lookups of a collection's tables go through :class:`_FusedRowUpdate`, a custom autograd function over the
whole collection (every table and feature in one call, like a TBE). Its forward is the ordinary pooled lookup on
the (detached) tables. Its backward receives the gradient of the pooled output ``[B, sum D]`` and, instead of
returning gradients for the tables, runs :func:`fused_step` once for all of them:

1. per table, the output gradient is summed per *unique* row of the batch: ``g_i = dl_main/de_i`` for the
   touched rows only (``[U, D]``; no ``[num_embeddings, D]`` gradient is ever allocated);
2. the transfer loss of every table under transfer is evaluated in ONE batched call (rows of all tables padded to
   ``[T, N, D]``, :mod:`recsys_transfer.transfer.losses`) on the touched rows (source rows vs target rows present
   in the batch), giving ``t_i = dl_transfer/de_i`` from a small autograd graph over those rows;
3. the direction is combined per row according to the training mode — for ``+Ours``/``lexico`` the barrier of
   Algorithm 1 (:func:`barrier_direction`), evaluated for the rows of all tables at once;
4. each table's direction is applied by a row optimizer (:mod:`recsys_transfer.optim.rowwise`: SGD, momentum,
   Adam, row-wise Adagrad) that reads and writes the touched rows of the weight and of its state only.

Extra memory is ``O(U x D)`` per table and step, independent of the table size.

When the call's tables are row blocks of one buffer (the unsharded EBC built by
:func:`recsys_transfer.modules.embedding.make_ebc`), steps 1-4 run on whole arrays (:func:`_fused_step_flat`):
the touched rows of every table are gathered from the buffer ONCE (the loss reads them, the optimizer updates them
and writes them back), placed in the padded layout by one index, and the barrier and the optimizer each run once
over all rows; per-table work is only Python bookkeeping. Sharded tables and mixed calls take the per-table path
(same results, tested against each other).

Why a custom lookup and not TorchRec's fused TBE: the barrier needs, per row, the *main-loss gradient itself*
(for ``lambda_i``) before any update, and the CPU fused TBE can only apply its own optimizer to it
(``OptimType.NONE``, which returns gradients, is CUDA-only); ``apply_optimizer_in_backward`` would hand us a dense
``[num_embeddings, D]`` gradient. So the plug-in replaces the lookup *kernel* and keeps everything else TorchRec's:

* unsharded :class:`~torchrec.EmbeddingBagCollection` / :class:`~torchrec.EmbeddingCollection`: the instance's
  ``forward`` is replaced by the fused one (:func:`attach_ebc`, :func:`attach_ec`) over the same
  ``nn.EmbeddingBag``/``nn.Embedding`` weights (same Parameters, state-dict keys unchanged, same ``KeyedTensor`` /
  ``Dict[str, JaggedTensor]`` output);
* under :class:`~torchrec.distributed.DistributedModelParallel`: in every sharded EBC lookup group, the TBE module
  (``emb_module`` of ``BatchedFusedEmbeddingBag``/``BatchedDenseEmbeddingBag``) is swapped for
  :class:`BarrierTBE`, which computes the same ``[B, sum D]`` output from the shard's own weight views
  (``split_embedding_weights()``, so checkpoints see the updated rows) and runs the same backward. TorchRec's input
  and output all-to-alls are untouched: on table-wise shards the backward sees the global batch of its tables; on
  row-wise shards each rank sees the rows of its block, and the touched rows of the table are all-gathered over
  the process group so the transfer loss is the one the single-process run computes. TorchRec divides the
  embedding gradient by the world size (``GRADIENT_DIVISION``), so ``g_i`` is the gradient of the global-batch
  mean loss, and the plug-in all-reduces ``l_main`` for the barrier ``phi_i``. The same code path runs with nccl.

Rows with zero main gradient
----------------------------
A touched row whose main gradient is exactly zero (e.g. its examples' output gradients cancel) has
``phi_i = alpha * min(0, l_main) = 0`` and the constraint ``<0, nu> >= 0`` holds for every ``nu``, so
``lambda_i = 0`` and ``mu_i = t_i``: the row follows the transfer gradient alone. Rows not in the batch are not
touched at all (no transfer gradient either, because the transfer loss only sees batch rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from recsys_transfer.flat import LayoutCache
from recsys_transfer.modules.embedding import (flat_lookup, lookup, occurrence_grads, pooled_over_all,
                                                pooled_rows_and_grads, stacked_occurrences)
from recsys_transfer.optim.rowwise import RowOptimizer
from recsys_transfer.transfer.losses import TransferLoss

MODES = ("B", "+T", "+Ours", "select", "lexico")
_USES_BARRIER = {"+Ours": True, "lexico": True, "+T": False, "select": False}


def barrier_direction(g_main: torch.Tensor, g_transfer: torch.Tensor, main_loss: torch.Tensor | float,
                      alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, per row ``i`` (rows of ``[U, D]`` inputs):

    ``phi_i = alpha * min(||g_i||^2, l_main)``,
    ``lambda_i = max((phi_i - t_i . g_i) / ||g_i||^2, 0)`` (0 where ``g_i = 0``),
    ``mu_i = t_i + lambda_i g_i`` (Eq. 6-7 applied item-wise). Returns ``(mu, lambda)``.
    """
    gg = (g_main * g_main).sum(dim=1)
    phi = alpha * torch.minimum(gg, torch.as_tensor(main_loss, dtype=gg.dtype, device=gg.device))
    dot = (g_transfer * g_main).sum(dim=1)
    safe = torch.where(gg > 0, gg, torch.ones_like(gg))
    lam = torch.where(gg > 0, ((phi - dot) / safe).clamp_min(0.0), torch.zeros_like(gg))
    return torch.addcmul(g_transfer, lam.unsqueeze(1), g_main), lam


@dataclass
class StepStats:
    """What the last update of a table did (for logging and tests)."""

    rows: int = 0
    source_rows: int = 0
    target_rows: int = 0
    transfer_loss: float = 0.0
    mean_lambda: float = 0.0


class BarrierContext:
    """State shared by every table rule of one plug-in: the current ``l_main`` (for ``phi_i``)."""

    def __init__(self) -> None:
        self.main_loss: torch.Tensor | None = None
        self.flat_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see _flat_domain_masks


class TableRule:
    """Update rule of one table: mode, domains, transfer loss (shared, batched over tables), row optimizer.

    ``source_mask`` / ``target_mask``: bool ``[num_embeddings]`` over *global* row ids (S and T or T'_eta).
    ``loss_index``: this table's slot in the shared ``loss`` (its own discriminator, for the adversarial loss).
    """

    def __init__(self, name: str, mode: str, context: BarrierContext, *, loss: TransferLoss | None = None,
                 loss_index: int = 0, source_mask: torch.Tensor | None = None,
                 target_mask: torch.Tensor | None = None, lam: float = 1e-2, alpha: float = 2.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "B" and (loss is None or source_mask is None or target_mask is None):
            raise ValueError(f"mode {mode!r} needs a transfer loss and source/target masks")
        self.name = name
        self.mode = mode
        self.context = context
        self.optimizer: RowOptimizer | None = None  # set by the plug-in once every table weight is known
        self.loss = loss
        self.loss_index = loss_index
        self.source_mask = source_mask
        self.target_mask = target_mask
        self.lam = lam
        self.alpha = alpha
        self.stats = StepStats()

    def masks_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The source and target masks on ``device`` (moved there once, on first use)."""
        if self.source_mask.device != device:
            self.source_mask, self.target_mask = self.source_mask.to(device), self.target_mask.to(device)
        return self.source_mask, self.target_mask


@dataclass
class _Item:
    rule: TableRule
    weight: torch.Tensor
    rows: torch.Tensor  # unique local row ids [U]
    row_offset: int
    g: torch.Tensor  # main gradient [U, D]
    group: object  # process group of a row-wise sharded table, else None
    flat: "_Flat | None" = None  # the call's rows of every table at once, when the tables share one buffer
    span: tuple[int, int] = (0, 0)  # this table's rows are flat.rows[span[0]:span[1]]

    @property
    def buffer_rows(self) -> torch.Tensor | None:
        """The rows in the tables' shared buffer (:mod:`recsys_transfer.flat`), if they share one."""
        return None if self.flat is None else self.flat.rows[self.span[0] : self.span[1]]


@dataclass
class _Flat:
    """Every touched row of one lookup call whose tables are row blocks of one buffer (see :func:`_flat_items`)."""

    base: torch.Tensor  # the buffer, as rows
    rows: torch.Tensor  # [U] unique buffer row ids, sorted (so each table's rows are one span)
    g: torch.Tensor  # [U, D] main gradients
    firsts: list[int]  # first buffer row of each table of the call
    rules: list["TableRule"]  # each table's rule


def _on(loss: TransferLoss, device: torch.device) -> TransferLoss:
    """``loss`` with its parameters (a discriminator's) on ``device``, where the rows are."""
    p = next(loss.parameters(), None)
    if p is not None and p.device != device:
        loss.to(device)
    return loss


def _domain_rows(item: _Item):
    """(global ids, current rows, index of this rank's rows or None), gathered over a row-wise table's group."""
    ids = item.rows + item.row_offset
    cur = item.weight.detach().index_select(0, item.rows)
    if item.group is not None and dist.get_world_size(item.group) > 1:
        return _all_gather_rows(ids, cur, item.group)
    return ids, cur, None


def _transfer_grads(items: list[_Item]) -> list[torch.Tensor]:
    """``t_i`` for every item, one batched loss call per shared loss object.

    Every touched row of every table of a bucket is packed into one padded ``[T, N, D]`` call, with its source
    and target masks; rows in neither domain (and padding) have both masks False, so the loss gives them zero
    gradient (CosReg, which regularizes every touched row, marks them all as "source"). Passing them instead of
    compacting the domain rows costs a few more rows in the loss but no per-table gather and scatter.
    """
    out: list[torch.Tensor | None] = [None] * len(items)
    buckets: dict[int, list[int]] = {}
    for k, it in enumerate(items):
        buckets.setdefault(id(it.rule.loss), []).append(k)
    for ks in buckets.values():
        loss = items[ks[0]].rule.loss
        assert loss is not None
        parts, xs, srcs, tgts = [], [], [], []
        for k in ks:
            rule = items[k].rule
            ids, cur, mine = _domain_rows(items[k])
            if loss.uses_all_rows:
                s = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
                t = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            else:
                src_mask, tgt_mask = rule.masks_on(ids.device)
                s, t = src_mask[ids], tgt_mask[ids]
            parts.append((len(ids), mine))
            xs.append(cur)
            srcs.append(s)
            tgts.append(t)
        x = pad_sequence(xs, batch_first=True)  # [T, N, D]
        src = pad_sequence(srcs, batch_first=True)  # [T, N], padding False
        tgt = pad_sequence(tgts, batch_first=True)
        tables = torch.tensor([items[k].rule.loss_index for k in ks], dtype=torch.int64, device=x.device)
        values, gx = _on(loss, x.device).grad(x, src, tgt, tables)
        n_src, n_tgt, vals = src.sum(1).tolist(), tgt.sum(1).tolist(), values.tolist()
        for j, (k, (n_all, mine)) in enumerate(zip(ks, parts)):
            t = gx[j, :n_all]
            out[k] = t if mine is None else t.index_select(0, mine)
            st = items[k].rule.stats
            st.source_rows, st.target_rows, st.transfer_loss = n_src[j], n_tgt[j], vals[j]
    return out  # type: ignore[return-value]


@torch.no_grad()
def fused_step(items: list[_Item]) -> None:
    """Directions for the touched rows of every table of one lookup call, then the row updates."""
    for it in items:
        it.rule.stats = StepStats(rows=len(it.rows))
    if items and _fused_step_flat(items):
        return
    transfer = [k for k, it in enumerate(items) if it.rule.mode != "B"]
    t_grads = dict(zip(transfer, _transfer_grads([items[k] for k in transfer]))) if transfer else {}
    mus: list[torch.Tensor] = [it.g for it in items]
    barrier = [k for k in transfer if _USES_BARRIER[items[k].rule.mode]]
    for k in transfer:
        if k not in barrier:
            mus[k] = items[k].g + items[k].rule.lam * t_grads[k].to(items[k].g.dtype)  # Eq. 1: l_main + lam l_tr
    if barrier:
        main_loss = _main_loss(items[barrier[0]].rule)
        sizes = [len(items[k].rows) for k in barrier]
        g = torch.cat([items[k].g for k in barrier])
        t = torch.cat([t_grads[k].to(g.dtype) for k in barrier])
        alpha = torch.cat([torch.full((n,), items[k].rule.alpha, dtype=g.dtype, device=g.device)
                           for k, n in zip(barrier, sizes)])
        mu, lam = barrier_direction(g, t, main_loss, alpha)
        for k, m, lk in zip(barrier, mu.split(sizes), lam.split(sizes)):
            mus[k] = m
            items[k].rule.stats.mean_lambda = float(lk.mean()) if len(lk) else 0.0
    _apply(items, mus)


def _main_loss(rule: TableRule) -> torch.Tensor:
    if rule.context.main_loss is None:
        raise RuntimeError("the main loss is unknown: call plugin.backward(loss) (or plugin.set_main_loss(loss)) "
                           "instead of loss.backward()")
    return rule.context.main_loss


def _apply(items: list[_Item], mus: list[torch.Tensor], buffer_rows: torch.Tensor | None = None,
           current: torch.Tensor | None = None) -> None:
    """Each item's direction through its row optimizer: one ``update_rows_many`` per optimizer (one run of the
    update maths per optimizer and width). ``buffer_rows`` / ``current``: what the caller knows of all items'
    rows together (see :meth:`RowOptimizer.update_rows_many`), used when one optimizer serves every item."""
    by_optimizer: dict[int, tuple[RowOptimizer, list, list, list, list]] = {}
    for it, mu in zip(items, mus):
        assert it.rule.optimizer is not None
        _, ws, rs, ms, bs = by_optimizer.setdefault(id(it.rule.optimizer), (it.rule.optimizer, [], [], [], []))
        ws.append(it.weight)
        rs.append(it.rows)
        ms.append(mu)
        bs.append(it.buffer_rows)
    one = len(by_optimizer) == 1
    for optimizer, ws, rs, ms, bs in by_optimizer.values():
        rows = buffer_rows if one else None
        if rows is None and all(b is not None for b in bs):
            rows = bs[0] if len(bs) == 1 else torch.cat(bs)
        optimizer.update_rows_many(ws, rs, ms, buffer_rows=rows, current=current if one else None)


def _flat_domain_masks(base: torch.Tensor, firsts: list[int],
                       rules: list[TableRule]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and target masks over every row of the buffer ``base`` whose tables start at ``firsts`` (False in
    tables without transfer), so the rows of all tables are classified by one index each. Built once per layout
    (the plug-in builds it when it attaches); each rule's masks then become views of them, so they are not held
    twice."""
    context = rules[0].context
    key = (base.untyped_storage().data_ptr(), len(base), tuple(firsts), tuple(map(id, rules)))
    masks = context.flat_masks.get(key)
    if masks is None:
        src = torch.zeros(len(base), dtype=torch.bool, device=base.device)
        tgt = torch.zeros(len(base), dtype=torch.bool, device=base.device)
        for first, rule in zip(firsts, rules):
            if rule.mode == "B":
                continue
            source, target = rule.masks_on(src.device)
            n = len(source)
            src[first : first + n] = source
            tgt[first : first + n] = target
            rule.source_mask, rule.target_mask = src[first : first + n], tgt[first : first + n]
        masks = context.flat_masks[key] = (src, tgt)
    return masks


def _fused_step_flat(items: list[_Item]) -> bool:
    """:func:`fused_step` for the items of one call whose tables share a buffer (:func:`_flat_items`), on whole
    arrays: one gather of the transfer rows, one padded loss call, one barrier over every row, one optimizer
    call -- no per-table tensor op. Returns False (nothing done) when the items do not qualify: the general
    path then runs (sharded tables, several loss objects or modes in one call)."""
    flat = items[0].flat
    if flat is None or any(it.flat is not flat for it in items):
        return False
    transfer = [it for it in items if it.rule.mode != "B"]
    rules = [it.rule for it in transfer]
    if transfer and any(r.loss is not rules[0].loss or r.mode != rules[0].mode or r.alpha != rules[0].alpha
                        or r.lam != rules[0].lam for r in rules):
        return False
    mu_all, current = flat.g, None
    if transfer:
        rule0 = rules[0]
        spans = [it.span for it in transfer]
        sizes = [hi - lo for lo, hi in spans]
        whole = spans[0][0] == 0 and spans[-1][1] == len(flat.rows) and all(
            spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
        dev = flat.rows.device
        sel = (torch.arange(len(flat.rows), device=dev) if whole else
               torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in spans]))
        rows = flat.rows if whole else flat.rows.index_select(0, sel)
        g = flat.g if whole else flat.g.index_select(0, sel)
        # padded layout [T, N]: row j of table k sits at slot k * N + j; a padding slot repeats a real row, with
        # both masks False (so the loss gives it no gradient)
        n_tab, n_max, m = len(transfer), max(sizes), len(rows)
        size_t = torch.tensor(sizes, device=dev)
        tix = torch.repeat_interleave(torch.arange(n_tab, device=dev), size_t, output_size=m)
        shift = torch.arange(n_tab, device=dev) * n_max - (torch.cumsum(size_t, 0) - size_t)  # slot - position
        pidx = torch.arange(m, device=dev).add_(shift.index_select(0, tix))
        # the rows' present values, gathered ONCE from the (large) buffer: the loss reads them, the optimizer
        # updates them in place and writes them back
        current = flat.base.index_select(0, flat.rows)
        at = torch.zeros(n_tab * n_max, dtype=torch.int64, device=dev).index_copy_(0, pidx, sel)  # slot -> position
        x = current.index_select(0, at)
        if rule0.loss.uses_all_rows:
            src = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev).index_fill_(0, pidx, True)
            tgt = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
        else:
            src_all, tgt_all = _flat_domain_masks(flat.base, flat.firsts, flat.rules)
            src = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
            tgt = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
            src.index_copy_(0, pidx, src_all.index_select(0, rows))
            tgt.index_copy_(0, pidx, tgt_all.index_select(0, rows))
        src, tgt = src.view(n_tab, n_max), tgt.view(n_tab, n_max)
        tables = torch.tensor([r.loss_index for r in rules], dtype=torch.int64, device=dev)
        values, gx = _on(rule0.loss, dev).grad(x.view(n_tab, n_max, -1), src, tgt, tables)
        t = gx.reshape(n_tab * n_max, -1).index_select(0, pidx).to(g.dtype)  # [M, D], in the rows' order
        if _USES_BARRIER[rule0.mode]:
            mu, lam = barrier_direction(g, t, _main_loss(rule0), rule0.alpha)
            lam_means = torch.segment_reduce(lam, "mean", lengths=size_t).tolist()
        else:
            mu, lam_means = g + rule0.lam * t, [0.0] * n_tab  # Eq. 1: l_main + lam l_transfer
        if whole:
            mu_all = mu
        else:
            mu_all = flat.g.clone()
            mu_all[sel] = mu
        n_src, n_tgt, vals = src.sum(1).tolist(), tgt.sum(1).tolist(), values.tolist()
        for j, it in enumerate(transfer):
            st = it.rule.stats
            st.source_rows, st.target_rows, st.transfer_loss, st.mean_lambda = n_src[j], n_tgt[j], vals[j], lam_means[j]
    _apply(items, [mu_all[it.span[0] : it.span[1]] for it in items], buffer_rows=flat.rows, current=current)
    return True


def _all_gather_rows(ids: torch.Tensor, rows: torch.Tensor, group):
    """Gather variable-length (ids, rows) from every rank of ``group``; returns (all_ids, all_rows, mine)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = torch.tensor([len(ids)], dtype=torch.int64, device=ids.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_i = [int(s) for s in sizes]
    m = max(sizes_i)
    pad_ids = torch.full((m,), -1, dtype=ids.dtype, device=ids.device)
    pad_ids[: len(ids)] = ids
    pad_rows = torch.zeros((m, rows.shape[1]), dtype=rows.dtype, device=rows.device)
    pad_rows[: len(rows)] = rows
    got_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    got_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(got_ids, pad_ids, group=group)
    dist.all_gather(got_rows, pad_rows, group=group)
    all_ids = torch.cat([g[:k] for g, k in zip(got_ids, sizes_i)])
    all_rows = torch.cat([g[:k] for g, k in zip(got_rows, sizes_i)])
    start = sum(sizes_i[:rank])
    mine = torch.arange(start, start + sizes_i[rank], device=ids.device)
    return all_ids, all_rows, mine


# ------------------------------------------------------------------------------------------------------------
# the fused lookup


def _plain_lookup(indices, offsets, per_sample_weights, tables, features, modes) -> torch.Tensor:
    return lookup(indices, offsets, per_sample_weights, [t[0] for t in tables], features, modes)


class _FusedRowUpdate(torch.autograd.Function):
    """Lookup whose backward updates the touched rows in place and returns no table gradient.

    ``tables``: list of (weight [R, D], rule, row_offset, group) per table; ``features``: the table index of each
    feature; ``modes``: pooling per feature (``sum``, ``mean``, or ``none`` for sequence embeddings — all features
    of one call are pooled or all are not); ``indices``/``offsets``: TBE layout (features major, ``offsets`` of
    length ``F * B + 1``). Output: ``[B, sum_f D_f]`` pooled, ``[n_indices, D]`` for sequences.
    """

    @staticmethod
    def forward(ctx, anchor, indices, offsets, per_sample_weights, tables, features, modes, layout):
        ctx.tables, ctx.features, ctx.modes = tables, features, modes
        ctx.flat = _flat_call(tables, features, modes, offsets, layout)
        if ctx.flat is not None:  # keep the occurrences' buffer rows for the backward
            base, firsts = ctx.flat
            out, gids, ctx.single = flat_lookup(indices, offsets, per_sample_weights, base, firsts, features, modes[0])
            ctx.save_for_backward(indices, offsets, per_sample_weights, gids)
            return out
        ctx.save_for_backward(indices, offsets, per_sample_weights, None)
        return lookup(indices, offsets, per_sample_weights, [t[0] for t in tables], features, modes)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, offsets, psw, gids = ctx.saved_tensors
        tables, features = ctx.tables, ctx.features
        if ctx.flat is not None:
            fused_step(_flat_items(ctx.flat, grad_out, indices, offsets, psw, tables,
                                   features, ctx.modes[0], known=(gids, ctx.single)))
            return None, None, None, None, None, None, None, None
        dims = [tables[t][0].shape[1] for t in features]
        per_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for f, ids, occ in occurrence_grads(grad_out, indices, offsets, psw, dims, ctx.modes):
            t = features[f]
            t_ids, t_grads = per_table.setdefault(t, ([], []))
            t_ids.append(ids)
            t_grads.append(occ)
        items = []
        shapes = [(w.shape[0], w.shape[1], w.dtype) for w, *_ in tables]
        # tables of one width and dtype share one unique + scatter_add: table t's rows live at bases[t] + id
        for ts, bases, gids, occ in stacked_occurrences(per_table, shapes):
            rows, g = _row_sums(gids, occ)
            cuts = torch.searchsorted(rows, torch.tensor(bases, dtype=rows.dtype, device=rows.device)).tolist()
            for j, t in enumerate(ts):
                weight, rule, row_offset, group = tables[t]
                lo, hi = cuts[j], cuts[j + 1]
                items.append(_Item(rule, weight, rows[lo:hi] - bases[j], row_offset, g[lo:hi], group))
        fused_step(items)
        return None, None, None, None, None, None, None, None


def _row_sums(gids: torch.Tensor, occ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique rows, sorted; the sum of ``occ`` per row): ``g_i`` of every touched row from its occurrences."""
    rows, inverse = torch.unique(gids, return_inverse=True)
    g = torch.zeros((len(rows), occ.shape[1]), dtype=occ.dtype, device=occ.device)
    # scatter_add_, not index_add_: on CPU index_add_ with repeated indices takes ~100x longer
    g.scatter_add_(0, inverse.unsqueeze(1).expand(-1, occ.shape[1]), occ)
    return rows, g


def _flat_call(tables, features, modes, offsets, layout: LayoutCache):
    """(base, first rows) when one pooled lookup call's tables are row blocks of one buffer, else None."""
    if not pooled_over_all(features, modes, len(tables), offsets) or any(t[3] is not None for t in tables):
        return None
    return layout.get([t[0] for t in tables])


def _flat_items(flat, grad_out, indices, offsets, psw, tables, features, mode, known=None) -> list[_Item]:
    """The per-table items of a call whose tables share one buffer: every occurrence at once (global row ids in
    the buffer, one unique, one scatter_add), then one slice per table. ``known``: the forward's
    ``(gids, single)`` (see :func:`recsys_transfer.modules.embedding.flat_lookup`)."""
    base, firsts = flat
    gids, occ = pooled_rows_and_grads(grad_out, indices, offsets, psw, features, firsts, mode, known=known)
    rows, g = _row_sums(gids, occ.to(base.dtype))
    edges = [e for t in range(len(tables)) for e in (firsts[t], firsts[t] + tables[t][0].shape[0])]
    cuts = torch.searchsorted(rows, torch.tensor(edges, dtype=rows.dtype, device=rows.device)).tolist()
    whole = _Flat(base, rows, g, list(firsts), [t[1] for t in tables])
    items = []
    for t, (weight, rule, row_offset, group) in enumerate(tables):
        lo, hi = cuts[2 * t], cuts[2 * t + 1]
        if hi > lo:
            items.append(_Item(rule, weight, rows[lo:hi] - firsts[t], row_offset, g[lo:hi], group, whole, (lo, hi)))
    return items


def _anchor() -> torch.Tensor:
    """A 0-element leaf that requires grad, so autograd calls the fused backward (the tables themselves get none)."""
    return torch.zeros(0, requires_grad=True)


def attach_ebc(ebc: nn.Module, rules: dict[str, TableRule]) -> list[torch.Tensor]:
    """Replace an unsharded EmbeddingBagCollection's forward by the fused one; returns its table weights."""
    configs = ebc.embedding_bag_configs()
    tables, features, modes, names = [], [], [], []
    for t, cfg in enumerate(configs):
        bag = ebc.embedding_bags[cfg.name]
        if bag.mode not in ("sum", "mean"):
            raise ValueError(f"table {cfg.name}: pooling {bag.mode!r} is not supported by the fused lookup (sum, mean)")
        tables.append((bag.weight, rules[cfg.name], 0, None))
        for fname in cfg.feature_names:
            features.append(t)
            modes.append(bag.mode)
            names.append(fname)
    anchor, layout = _anchor(), LayoutCache()
    flat = layout.get([t[0] for t in tables])
    if flat is not None and any(t[1].mode != "B" for t in tables):  # the buffer-wide masks now, at setup
        _flat_domain_masks(flat[0], list(flat[1]), [t[1] for t in tables])

    def forward(features_kjt):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kjt = features_kjt
        if kjt.keys() != names:
            kjt = kjt.permute([kjt.keys().index(n) for n in names])
        weights = kjt.weights_or_none() if ebc.is_weighted() else None
        args = (kjt.values(), kjt.offsets(), weights, tables, features, modes)
        values = _FusedRowUpdate.apply(anchor, *args, layout) if torch.is_grad_enabled() else _plain_lookup(*args)
        return KeyedTensor(keys=ebc._embedding_names, values=values, length_per_key=ebc._lengths_per_embedding)

    ebc.forward = forward
    return [t[0] for t in tables]


def attach_ec(ec: nn.Module, rules: dict[str, TableRule]) -> list[torch.Tensor]:
    """Replace an unsharded EmbeddingCollection's forward (sequence embeddings) by the fused one."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    tables, features, names, out_names = [], [], [], []
    for t, cfg in enumerate(ec.embedding_configs()):
        tables.append((ec.embeddings[cfg.name].weight, rules[cfg.name], 0, None))
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
        args = (kjt.values(), kjt.offsets(), None, tables, features, modes)
        values = _FusedRowUpdate.apply(anchor, *args, layout) if torch.is_grad_enabled() else _plain_lookup(*args)
        out, start = {}, 0
        for name, fname in zip(out_names, names):
            lengths = kjt[fname].lengths()
            n = int(lengths.sum())
            out[name] = JaggedTensor(values=values[start : start + n], lengths=lengths,
                                     weights=kjt[fname].values() if ec.need_indices() else None)
            start += n
        return out

    ec.forward = forward
    return [t[0] for t in tables]


class BarrierTBE(nn.Module):
    """Drop-in for a sharded lookup group's TBE module (``emb_module``), over the shard's weight views."""

    def __init__(self, tbe: nn.Module, rules: list[TableRule], row_offsets: list[int],
                 feature_table_map: list[int], modes: list[str], groups: list) -> None:
        super().__init__()
        self.base = tbe
        self.weights = list(tbe.split_embedding_weights())
        self.tables = list(zip(self.weights, rules, row_offsets, groups))
        self.feature_table_map = list(feature_table_map)
        self.modes = modes
        self._anchor, self._layout = _anchor(), LayoutCache()

    def split_embedding_weights(self):
        return self.weights

    def flush(self) -> None:
        """Rows are written in place during backward: nothing is cached, nothing to flush."""

    def purge(self) -> None:
        """No cache to purge (see :meth:`flush`)."""

    def reset_cache_states(self) -> None:
        """No cache (TorchRec calls this before loading a state dict)."""

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        args = (indices, offsets, per_sample_weights, self.tables, self.feature_table_map, self.modes)
        if not torch.is_grad_enabled():
            return _plain_lookup(*args)
        return _FusedRowUpdate.apply(self._anchor, *args, self._layout)
