"""Item-wise dynamic barrier (paper Sec. 3.2.1, Algorithm 1) as a fused backward hook on TorchRec tables.

Design
------
Every embedding lookup of a table under transfer goes through :class:`_FusedRowUpdate`, a custom autograd
function. Its forward is the ordinary pooled lookup on the (detached) table. Its backward receives the gradient of
the pooled output, and instead of returning a gradient for the table it

1. sums the output gradient per *unique* row of the batch: ``g_i = dl_main/de_i`` for the touched rows only
   (``[U, D]``; no ``[num_embeddings, D]`` gradient is ever allocated);
2. asks the table's :class:`RowUpdater` for the update direction of those rows, which evaluates the transfer loss
   on the touched rows (source rows vs target rows present in the batch), takes ``t_i = dl_transfer/de_i`` with a
   small autograd graph over ``[U, D]`` leaves, and combines ``g`` and ``t`` according to the training mode —
   for ``+Ours``/``lexico`` the barrier of Algorithm 1 (:func:`barrier_direction`);
3. applies the direction through a row optimizer (:mod:`recsys_transfer.optim.rowwise`: SGD, momentum, Adam,
   row-wise Adagrad) that reads and writes the touched rows of the weight and of its state only.

Extra memory is ``O(U x D)`` per table and step, independent of the table size.

Why a custom lookup and not TorchRec's fused TBE: the barrier needs, per row, the *main-loss gradient itself*
(for ``lambda_i``) before any update, and the CPU fused TBE can only apply its own optimizer to it
(``OptimType.NONE``, which returns gradients, is CUDA-only); ``apply_optimizer_in_backward`` would hand us a dense
``[num_embeddings, D]`` gradient. So the plug-in replaces the lookup *kernel* and keeps everything else TorchRec's:

* unsharded :class:`~torchrec.EmbeddingBagCollection`: each ``nn.EmbeddingBag`` in ``embedding_bags`` is swapped
  for :class:`BarrierEmbeddingBag`, which keeps the same ``weight`` Parameter (state-dict keys unchanged);
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
import torch.nn.functional as F
from torch import nn

from recsys_transfer.optim.rowwise import RowOptimizer
from recsys_transfer.transfer.losses import TransferLoss

MODES = ("B", "+T", "+Ours", "select", "lexico")
_USES_BARRIER = {"+Ours": True, "lexico": True, "+T": False, "select": False}


def barrier_direction(g_main: torch.Tensor, g_transfer: torch.Tensor, main_loss: torch.Tensor | float,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
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
    return g_transfer + lam.unsqueeze(1) * g_main, lam


@dataclass
class StepStats:
    """What the last update of a table did (for logging and tests)."""

    rows: int = 0
    source_rows: int = 0
    target_rows: int = 0
    transfer_loss: float = 0.0
    mean_lambda: float = 0.0


class RowUpdater:
    """Update rule of one table: mode, domains, transfer loss, row optimizer.

    ``source_mask`` / ``target_mask``: bool ``[num_embeddings]`` over *global* row ids (S and T or T'_eta).
    ``row_offset``: global id of local row 0 (row-wise shards). ``group``: process group over which the touched
    rows of a row-wise sharded table are gathered (None when the table is whole on this rank).
    """

    def __init__(self, name: str, mode: str, optimizer: RowOptimizer, *, loss: TransferLoss | None = None,
                 source_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                 lam: float = 1e-2, alpha: float = 2.0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "B" and (loss is None or source_mask is None or target_mask is None):
            raise ValueError(f"mode {mode!r} needs a transfer loss and source/target masks")
        self.name = name
        self.mode = mode
        self.optimizer = optimizer
        self.loss = loss
        self.source_mask = source_mask
        self.target_mask = target_mask
        self.lam = lam
        self.alpha = alpha
        self.main_loss: torch.Tensor | None = None
        self.stats = StepStats()

    # -- transfer gradient on the touched rows ---------------------------------------------------------------
    def transfer_grad(self, global_ids: torch.Tensor, rows: torch.Tensor, group) -> torch.Tensor:
        """``dl_transfer/de_i`` for the touched rows ``rows`` ([U, D] current values, global ids ``global_ids``)."""
        assert self.loss is not None and self.source_mask is not None and self.target_mask is not None
        all_ids, all_rows, mine = global_ids, rows, None
        if group is not None and dist.get_world_size(group) > 1:
            all_ids, all_rows, mine = _all_gather_rows(global_ids, rows, group)
        if self.loss.uses_all_rows:
            src_sel = torch.ones_like(all_ids, dtype=torch.bool)
            tgt_sel = torch.zeros_like(src_sel)
        else:
            src_sel = self.source_mask[all_ids]
            tgt_sel = self.target_mask[all_ids]
        with torch.enable_grad():
            leaf = all_rows.detach().clone().requires_grad_(True)
            source, target = leaf[src_sel], leaf[tgt_sel]
            value = self.loss(source, target)
            if value.requires_grad:
                (grad,) = torch.autograd.grad(value, leaf)
            else:  # an empty side: no transfer signal this step
                grad = torch.zeros_like(leaf)
        self.loss.update_discriminator(source.detach(), target.detach())
        self.stats.source_rows = int(src_sel.sum())
        self.stats.target_rows = int(tgt_sel.sum())
        self.stats.transfer_loss = float(value.detach())
        return grad if mine is None else grad[mine]

    # -- the row update -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def direction(self, global_ids: torch.Tensor, rows: torch.Tensor, g_main: torch.Tensor, group) -> torch.Tensor:
        self.stats = StepStats(rows=len(global_ids))
        if self.mode == "B":
            return g_main
        t = self.transfer_grad(global_ids, rows, group).to(g_main.dtype)
        if not _USES_BARRIER[self.mode]:
            return g_main + self.lam * t  # Eq. 1: gradient of l_main + lambda * l_transfer
        if self.main_loss is None:
            raise RuntimeError(f"table {self.name}: the main loss is unknown; call plugin.backward(loss) "
                               "(or plugin.set_main_loss(loss)) instead of loss.backward()")
        mu, lam = barrier_direction(g_main, t, self.main_loss, self.alpha)
        self.stats.mean_lambda = float(lam.mean()) if len(lam) else 0.0
        return mu

    def apply(self, weight: torch.Tensor, local_rows: torch.Tensor, row_offset: int, g_main: torch.Tensor,
              group=None) -> None:
        """One fused step for the touched ``local_rows`` (unique) of ``weight`` with main gradient ``g_main``."""
        global_ids = local_rows + row_offset
        rows = weight.detach().index_select(0, local_rows)
        mu = self.direction(global_ids, rows, g_main, group)
        self.optimizer.update_rows(weight, local_rows, mu)


def _all_gather_rows(ids: torch.Tensor, rows: torch.Tensor, group):
    """Gather variable-length (ids, rows) from every rank of ``group``; returns (all_ids, all_rows, mine)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = torch.tensor([len(ids)], dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_i = [int(s) for s in sizes]
    m = max(sizes_i)
    pad_ids = torch.full((m,), -1, dtype=ids.dtype)
    pad_ids[: len(ids)] = ids
    pad_rows = torch.zeros((m, rows.shape[1]), dtype=rows.dtype)
    pad_rows[: len(rows)] = rows
    got_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    got_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(got_ids, pad_ids, group=group)
    dist.all_gather(got_rows, pad_rows, group=group)
    all_ids = torch.cat([g[:k] for g, k in zip(got_ids, sizes_i)])
    all_rows = torch.cat([g[:k] for g, k in zip(got_rows, sizes_i)])
    start = sum(sizes_i[:rank])
    mine = torch.arange(start, start + sizes_i[rank])
    return all_ids, all_rows, mine


# ------------------------------------------------------------------------------------------------------------
# the fused lookup


class _FusedRowUpdate(torch.autograd.Function):
    """Pooled lookup whose backward updates the touched rows in place and returns no table gradient.

    ``tables``: list of (weight [R, D], updater, row_offset, group) per table of the lookup; ``features``: the
    table index of each feature; ``indices``/``offsets``: TBE layout (features major, ``offsets`` of length
    ``F * B + 1``). Output: ``[B, sum_f D_f]``.
    """

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None, tables: list, features: list[int], mean: bool):
        n_feat = len(features)
        batch = (len(offsets) - 1) // n_feat
        outs = []
        for f, t in enumerate(features):
            weight = tables[t][0]
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            off = offsets[f * batch : (f + 1) * batch + 1] - lo
            psw = per_sample_weights[lo:hi] if per_sample_weights is not None else None
            outs.append(F.embedding_bag(indices[lo:hi], weight.detach(), off, mode="mean" if mean else "sum",
                                        per_sample_weights=psw, include_last_offset=True))
        ctx.save_for_backward(indices, offsets, per_sample_weights if per_sample_weights is not None else torch.empty(0))
        ctx.has_psw = per_sample_weights is not None
        ctx.tables, ctx.features, ctx.mean, ctx.batch = tables, features, mean, batch
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        indices, offsets, psw = ctx.saved_tensors
        tables, features, batch = ctx.tables, ctx.features, ctx.batch
        # occurrence-level gradients per table, then one segment sum over the table's unique rows
        per_table: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        col = 0
        for f, t in enumerate(features):
            dim = tables[t][0].shape[1]
            lo, hi = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
            lengths = (offsets[f * batch + 1 : (f + 1) * batch + 1] - offsets[f * batch : (f + 1) * batch])
            bag = torch.repeat_interleave(torch.arange(batch, device=grad_out.device), lengths.long())
            occ = grad_out[:, col : col + dim].index_select(0, bag)  # [n_occ, D]
            if ctx.mean:
                occ = occ / lengths.clamp_min(1).to(occ.dtype).index_select(0, bag).unsqueeze(1)
            if ctx.has_psw:
                occ = occ * psw[lo:hi].unsqueeze(1)
            ids, grads = per_table.setdefault(t, ([], []))
            ids.append(indices[lo:hi].long())
            grads.append(occ)
            col += dim
        for t, (ids, grads) in per_table.items():
            weight, updater, row_offset, group = tables[t]
            all_ids = torch.cat(ids)
            rows, inverse = torch.unique(all_ids, return_inverse=True)
            g = torch.zeros((len(rows), weight.shape[1]), dtype=torch.float64 if weight.dtype == torch.float64
                            else grad_out.dtype, device=weight.device)
            g.index_add_(0, inverse, torch.cat(grads).to(g.dtype))
            updater.apply(weight, rows, row_offset, g.to(weight.dtype), group)
        return None, None, None, None, None, None, None


def _anchor() -> torch.Tensor:
    return torch.zeros(0, requires_grad=True)


class BarrierEmbeddingBag(nn.Module):
    """Drop-in for one ``nn.EmbeddingBag`` of an unsharded EBC; keeps the same ``weight`` Parameter."""

    def __init__(self, bag: nn.EmbeddingBag, updater: RowUpdater) -> None:
        super().__init__()
        if bag.mode not in ("sum", "mean"):
            raise ValueError(f"pooling {bag.mode!r} is not supported by the barrier lookup (sum, mean)")
        self.weight = bag.weight
        self.mode = bag.mode
        self.updater = updater
        self.register_buffer("_anchor", _anchor(), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, input: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None):
        anchor = self._anchor if self._anchor.requires_grad else self._anchor.requires_grad_(True)
        if not torch.is_grad_enabled():
            return F.embedding_bag(input, self.weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                                   include_last_offset=True)
        return _FusedRowUpdate.apply(anchor, input, offsets, per_sample_weights,
                                     [(self.weight, self.updater, 0, None)], [0], self.mode == "mean")


class BarrierTBE(nn.Module):
    """Drop-in for a sharded lookup group's TBE module (``emb_module``), over the shard's weight views."""

    def __init__(self, tbe: nn.Module, updaters: list[RowUpdater], row_offsets: list[int],
                 feature_table_map: list[int], mean: bool, groups: list) -> None:
        super().__init__()
        self.base = tbe
        self.weights = list(tbe.split_embedding_weights())
        self.updaters = updaters
        self.row_offsets = row_offsets
        self.feature_table_map = list(feature_table_map)
        self.mean = mean
        self.groups = groups
        self._anchor = _anchor()

    def split_embedding_weights(self):
        return self.weights

    def flush(self) -> None:
        """Rows are written in place during backward: nothing is cached, nothing to flush."""

    def purge(self) -> None:
        """No cache to purge (see :meth:`flush`)."""

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        tables = [(w, u, o, g) for w, u, o, g in zip(self.weights, self.updaters, self.row_offsets, self.groups)]
        if not torch.is_grad_enabled():
            with torch.no_grad():
                return _FusedRowUpdate.forward(_Ctx(), self._anchor, indices, offsets, per_sample_weights, tables,
                                               self.feature_table_map, self.mean)
        return _FusedRowUpdate.apply(self._anchor, indices, offsets, per_sample_weights, tables,
                                     self.feature_table_map, self.mean)


class _Ctx:
    """Stand-in autograd context for inference calls of the fused lookup."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass
