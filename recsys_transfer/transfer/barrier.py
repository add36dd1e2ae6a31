"""Item-wise dynamic barrier (paper Sec. 3.2.1, Algorithm 1) and the other transfer modes, as the ``transfer`` stage
of the row pipeline (:mod:`recsys_transfer.rows.pipeline`).

:class:`TransferTransform` receives what a lookup call recorded -- per table, the touched rows and their main-loss
gradient ``g_i`` -- and sets each row's update direction:

1. the transfer loss of every table under transfer is evaluated in ONE batched call (rows of all tables padded to
   ``[T, N, D]``, :mod:`recsys_transfer.transfer.losses`) on the touched rows (source rows vs target rows present
   in the batch), giving ``t_i = dl_transfer/de_i``;
2. the direction is combined per row according to the training mode: ``+T`` / ``select``:
   ``mu_i = g_i + lam t_i`` (Eq. 1, ``l_main + lam l_transfer``); ``+Ours`` / ``lexico``: the barrier of
   Algorithm 1 (:func:`barrier_direction`), ``mu_i = t_i + lambda_i g_i``, evaluated for the rows of all tables
   at once.

The row optimizer then applies ``mu`` (the pipeline's last step). Extra memory is ``O(U x D)`` per table and
step, independent of the table size.

When the call's tables are row blocks of one buffer, steps 1-2 run on whole arrays (:meth:`TransferTransform._shared`):
the touched rows of every table under transfer are gathered from the buffer ONCE (the loss reads them, and the
optimizer updates them and writes them back: ``SharedRows.current``), placed in the padded layout by one index,
and the barrier runs once over all rows; per-table work is only Python bookkeeping. Sharded tables and calls
mixing loss settings take the per-table path (same results, tested against each other).

Under DistributedModelParallel, on row-wise shards the touched rows of a table are all-gathered over its process
group, so the transfer loss is the one the single-process run computes, and ``l_main`` (for ``phi_i``) is the
all-reduced global-batch loss (:meth:`recsys_transfer.rows.pipeline.RowPipeline.begin`). The same code path runs
with nccl.

The barrier under any row optimizer (``transfer.barrier``)
----------------------------------------------------------
Algorithm 1 guarantees ``<g_i, mu_i> >= phi_i`` for the DIRECTION ``mu_i``. The paper's analysis is for gradient
steps ``e_i <- e_i - eps mu_i``, where that is the main loss's first-order decrease. A row optimizer with state
applies something else: momentum adds the buffer of earlier directions; Adam divides every coordinate by the RMS
of ``mu`` (which the transfer term dominates on rare rows), and row-wise Adagrad's accumulator grows with
``||mu||^2``, so the main part of the applied step shrinks. Measured (``tests/test_harmless.py``): with Adam rows
the paper's barrier loses 0.010 AUC to B where +T loses 0.013.

``barrier: applied`` (:func:`applied_barrier`) puts the constraint on the update the optimizer applies. Write the
optimizer's update of one row as a map ``U_S(d)`` from a direction ``d`` and a state ``S`` (weights move by
``-U``). The row optimizer keeps TWO states per row under transfer
(:meth:`recsys_transfer.optim.rowwise.RowOptimizer.update_rows_split`): the main state ``S``, which only ever sees
``g_i``, and a transfer state ``S_T`` (keys ``transfer_*``), which only sees ``t_i``. Then

* ``u_i = U_S(g_i)`` is exactly the update mode B would apply from the same state (tested against B's optimizer);
* ``v_i = U_{S_T}(t_i)``, bounded per row by ``||v_i|| <= max_ratio ||u_i||`` (``transfer.max_ratio``, a trust
  region: the transfer may move a row at most ``max_ratio`` times as far as the main loss does);
* the applied update is ``delta_i = v_i + lambda_i u_i + s_i g_i`` with Eq. 6's form and Eq. 7's rule in the
  optimizer's units: ``phi_i = alpha <g_i, u_i> min(1, l_main / ||g_i||^2)``,
  ``lambda_i = min(max((phi_i - <g_i, v_i>) / <g_i, u_i>, 0), alpha)``, and ``s_i >= 0`` the least make-up along
  ``g_i`` that meets the barrier when ``lambda_i`` stops at ``alpha`` (``||s_i g_i|| <= ||v_i||``);
* where B's own update does not descend (``<g_i, u_i> <= 0``, momentum or Adam carrying earlier steps),
  ``lambda_i = 1`` and ``phi_i = <g_i, u_i>``: the row is never slower than B's step; the transfer update is
  projected onto ``<g_i, .> >= 0``.

Invariant (tested for SGD, momentum, Nesterov, Adam, AdamW, row-wise Adagrad, against a reference written out row
by row): ``<g_i, delta_i> >= phi_i`` for every touched row, ``delta_i`` being the update applied. With
``alpha = 1`` (this barrier's default) the first-order decrease of the main loss is at least that of B's update
whenever ``||g_i||^2 <= l_main``. With SGD ``u_i = eps g_i`` and ``v_i = eps t_i``, and without the trust bound
(``max_ratio: null``) this IS Algorithm 1 (``lambda_i + s_i`` is Eq. 7's lambda). Memory: one more copy of the
optimizer state for the tables under transfer only (Adam: two ``[R, D]`` tensors and a ``[R]`` step count;
momentum: one ``[R, D]``; row-wise Adagrad: one ``[R]``; SGD: none).

Candidates measured on the Adam stress test (``tests/test_harmless.py``'s data; B 0.7524, +T 0.7398, paper barrier
0.7420 on seed 0; ``benchmarks/results/harmless_candidates.md``, and the kept ones on 3 seeds in
``harmless_stress.md``): (1) the transfer gradient in the main preconditioner's metric (``v_i = lr m_t /
sqrt(v_main)``, the issue's first candidate) diverges: rare rows have a tiny main second moment, so their transfer
step is unbounded (AUC 0.53); (2) separate statistics combined by Eq. 7 in update units, without a cap on
``lambda_i``: 0.7416 -- where ``<g, u>`` is small but positive ``lambda_i`` reached 836 (B's step multiplied);
(3) with ``lambda_i <= alpha`` and the make-up along ``g``: 0.7489 (alpha 1) / 0.7475 (alpha 2: the main step
doubled on a tuned Adam overshoots, as B at 2x lr does, 0.7458); (4) the transfer preconditioned by the joint
main+transfer second moment: 0.7491, no better than (3); (5) = (3) with the trust bound: 0.7516 (``max_ratio``
0.3), 0.7527 (0.1; 3 seeds: +0.0001 to +0.0004 over B). The first-order guarantee alone is not enough under Adam:
an Adam-normalized transfer step moves a rare row as far as the main step, whatever the size of ``t_i``, and the
main loss pays at second order; the trust bound is what keeps that in check.

Rows with zero main gradient
----------------------------
A touched row whose main gradient is exactly zero (e.g. its examples' output gradients cancel) has
``phi_i = alpha * min(0, l_main) = 0`` and the constraint ``<0, nu> >= 0`` holds for every ``nu``, so
``lambda_i = 0`` and ``mu_i = t_i``: the row follows the transfer gradient alone. Rows not in the batch are not
touched at all (no transfer gradient either, because the transfer loss only sees batch rows).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from recsys_transfer.config import BARRIER_MODES, BARRIERS, SELECTIVE_MODES, TRAINING_MODES, TransferConfig
from recsys_transfer.errors import UserError
from recsys_transfer.flat import Blocks, rows_of_one_buffer
from recsys_transfer.rows.pipeline import (CallRows, RowTransform, SharedRows, SplitUpdate, StepContext, TableRows,
                                            TableSlot)
from recsys_transfer.transfer.losses import TransferLoss, make_transfer_loss

MODES = TRAINING_MODES


def barrier_direction(g_main: torch.Tensor, g_transfer: torch.Tensor, main_loss: torch.Tensor | float,
                      alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1, per row ``i`` (rows of ``[U, D]`` inputs):

    ``phi_i = alpha * min(||g_i||^2, l_main)``,
    ``lambda_i = max((phi_i - t_i . g_i) / ||g_i||^2, 0)`` (0 where ``g_i = 0``),
    ``mu_i = t_i + lambda_i g_i`` (Eq. 6-7 applied item-wise). Returns ``(mu, lambda)``.

    The row dot products are a product then a matrix-vector product with ones (``[U, D] @ [D]``): on CPU the
    reduction over a short inner dimension (``.sum(1)`` of D = 16) takes ~2x longer than the GEMV (~1 ms of the
    barrier's ~3 ms at 79k rows). Sums in another order than ``.sum(1)``: equal up to float rounding.
    """
    ones = torch.ones(g_main.shape[1], dtype=g_main.dtype, device=g_main.device)
    gg = torch.mul(g_main, g_main) @ ones
    dot = torch.mul(g_transfer, g_main) @ ones
    phi = alpha * torch.minimum(gg, torch.as_tensor(main_loss, dtype=gg.dtype, device=gg.device))
    lam = ((phi - dot) / gg.clamp_min(torch.finfo(gg.dtype).tiny)).clamp_min_(0.0).masked_fill_(gg == 0, 0.0)
    return torch.addcmul(g_transfer, lam.unsqueeze(1), g_main), lam


def applied_barrier(g_main: torch.Tensor, u: torch.Tensor, v: torch.Tensor, main_loss: torch.Tensor | float,
                    alpha: float, max_ratio: float | None = None,
                    workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The barrier on the applied update (module docstring, *The barrier under any row optimizer*), per row ``i``
    of ``[U, D]`` inputs: ``g`` the main gradient, ``u`` the row optimizer's update from ``g`` with the main state
    (mode B's update), ``v`` its update from the transfer gradient with the transfer state, both in one unit::

        v      <- v * min(1, max_ratio ||u|| / ||v||)                       (trust bound; none if max_ratio is None)
        r_u = <g, u>,  r_v = <g, v>
        phi    = alpha r_u min(1, l_main / ||g||^2)  where r_u > 0,  r_u otherwise
        lambda = min(max((phi - r_v) / r_u, 0), alpha)  where r_u > 0,  1 otherwise
        delta  = v + lambda u + s g,   s = max(phi - r_v - lambda r_u, 0) / ||g||^2

    so that ``<g, delta> >= phi`` for every row (``s`` makes up what ``lambda <= alpha`` leaves, along ``g``; it
    is at most ``|r_v| / ||g||^2``, so ``||s g|| <= ||v||``). Returns ``(delta, lambda)``. With SGD (``u = g``,
    ``v = t``) and no trust bound, ``lambda + s`` is Eq. 7's lambda and ``delta`` Eq. 6's direction (bitwise
    :func:`barrier_direction`'s where ``||g||^2 <= l_main`` and ``<g, t> >= 0``; to rounding elsewhere).

    ``workspace``: a ``[U, D]`` buffer (of ``g``'s dtype and device) for the row products, reused across steps: a
    fresh 5 MB product per dot is page-faulted in on every call on CPU. Row dot products are a product and a
    matrix-vector product with ones, as in :func:`barrier_direction`."""
    ws = workspace if workspace is not None and workspace.shape == g_main.shape else torch.empty_like(g_main)
    ones = torch.ones(g_main.shape[1], dtype=g_main.dtype, device=g_main.device)
    gg = torch.mul(g_main, g_main, out=ws) @ ones
    ru = torch.mul(g_main, u, out=ws) @ ones
    rv = torch.mul(g_main, v, out=ws) @ ones
    scale = None
    if max_ratio is not None:
        uu = torch.mul(u, u, out=ws) @ ones
        vv = torch.mul(v, v, out=ws) @ ones
        over = vv > (max_ratio * max_ratio) * uu
        scale = torch.where(over, max_ratio * torch.sqrt(uu / vv.where(over, 1.0)), 1.0)
        rv = rv * scale
    loss = torch.as_tensor(main_loss, dtype=gg.dtype, device=gg.device)
    tiny = torch.finfo(gg.dtype).tiny
    descends = ru > 0
    cap = torch.where(gg <= loss, torch.ones_like(gg), loss / gg.clamp_min(tiny))  # min(1, l_main / ||g||^2)
    phi = torch.where(descends, alpha * ru * cap, ru)
    lam = torch.where(descends, ((phi - rv) / ru.where(descends, 1.0)).clamp_(0.0, alpha), 1.0)
    # where lambda < alpha the barrier is met by lambda alone (no make-up: its rounding residue is left out)
    short = (phi - rv - lam * ru).clamp_min_(0.0).masked_fill_(descends & (lam < alpha), 0.0)
    delta = torch.addcmul(v, lam.unsqueeze(1), u) if scale is None else \
        torch.mul(v, scale.unsqueeze(1)).addcmul_(lam.unsqueeze(1), u)
    return delta.addcmul_((short / gg.clamp_min(tiny)).unsqueeze(1), g_main), lam


class AppliedBarrier:
    """``combine`` of :meth:`recsys_transfer.optim.rowwise.RowOptimizer.update_rows_split` for the tables of one
    split update: :func:`applied_barrier` with this step's ``l_main``; :meth:`done` records each table's mean
    lambda (``sizes``: the tables' row counts, in order)."""

    def __init__(self, main_loss: torch.Tensor, alpha: float, max_ratio: float | None, rules: list["TransferRule"],
                 sizes: list[int], workspaces: dict | None = None) -> None:
        self.main_loss, self.alpha, self.max_ratio, self.rules, self.sizes = main_loss, alpha, max_ratio, rules, sizes
        self.lams: list[torch.Tensor] = []
        self.workspaces = workspaces if workspaces is not None else {}  # (dtype, device) -> buffer, across steps

    def __call__(self, g: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (g.dtype, g.device)
        ws = self.workspaces.get(key)
        if ws is None or ws.numel() < g.numel():
            ws = self.workspaces[key] = torch.empty(g.numel() * 5 // 4 + 64, dtype=g.dtype, device=g.device)
        delta, lam = applied_barrier(g, u, v, self.main_loss, self.alpha, self.max_ratio,
                                     ws[: g.numel()].view(g.shape))
        self.lams.append(lam)
        return delta

    def done(self) -> None:
        lam = torch.cat(self.lams) if len(self.lams) > 1 else (self.lams[0] if self.lams else torch.zeros(0))
        if len(lam) != sum(self.sizes) or not len(lam):  # several batches (tables of other widths): one mean
            mean = float(lam.mean()) if len(lam) else 0.0
            means = [mean] * len(self.rules)
        else:  # one reduction and one host copy for every table (not a mean and a float() each)
            lengths = torch.tensor(self.sizes, device=lam.device)
            means = torch.segment_reduce(lam, "mean", lengths=lengths).nan_to_num_(0.0).tolist()
        for rule, m in zip(self.rules, means):
            rule.stats.mean_lambda = m
        self.lams = []


@dataclass
class StepStats:
    """What the last update of a table did (for logging and tests)."""

    rows: int = 0
    source_rows: int = 0
    target_rows: int = 0
    transfer_loss: float = 0.0
    mean_lambda: float = 0.0


class TransferRule:
    """How one table under transfer is treated: mode, domains, its slot in the shared (batched) transfer loss.

    ``source_mask`` / ``target_mask``: bool ``[num_embeddings]`` over *global* row ids (S and T or T'_eta).
    ``loss_index``: this table's slot in ``loss`` (its own discriminator, for the adversarial loss).
    """

    def __init__(self, name: str, mode: str, *, loss: TransferLoss, loss_index: int, source_mask: torch.Tensor,
                 target_mask: torch.Tensor, lam: float = 1e-2, alpha: float = 2.0, barrier: str = "paper",
                 max_ratio: float | None = None) -> None:
        if mode not in MODES or mode == "B":
            raise ValueError(f"a transfer rule's mode must be one of {MODES[1:]}, got {mode!r}")
        self.name = name
        self.mode = mode
        self.loss = loss
        self.loss_index = loss_index
        self.source_mask = source_mask
        self.target_mask = target_mask
        self.lam = lam
        self.alpha = alpha
        if barrier not in BARRIERS:
            raise ValueError(f"barrier must be one of {BARRIERS}, got {barrier!r}")
        self.barrier = barrier
        self.max_ratio = max_ratio
        self.stats = StepStats()

    @property
    def uses_barrier(self) -> bool:
        return self.mode in BARRIER_MODES

    @property
    def applied(self) -> bool:
        """The barrier is applied by the row optimizer to its updates (``transfer.barrier: applied``)."""
        return self.uses_barrier and self.barrier == "applied"

    def masks_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The source and target masks on ``device`` (moved there once, on first use)."""
        if self.source_mask.device != device:
            self.source_mask, self.target_mask = self.source_mask.to(device), self.target_mask.to(device)
        return self.source_mask, self.target_mask


def subsample_slots(src: torch.Tensor, tgt: torch.Tensor, k: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``transfer.max_rows``: per table (row of the ``[T, N]`` masks), at most ``k`` source and ``k`` target slots
    drawn uniformly without replacement. Returns ``(pick, src_k, tgt_k)``: slot indices ``[T, 2k]`` (the first
    ``k`` drawn from the source side, then ``k`` from the target side; where a side has fewer than ``k`` rows, all
    of them, the rest of its half filled with other slots) and their masks ``[T, 2k]`` (a filler is in neither
    side, so no row counts twice). None when no table has more than ``k`` rows on a side (nothing to leave out).

    A loss that is a mean over each side's rows (the adversarial loss) then has an unbiased loss and row gradient:
    a row is drawn with probability ``k / n`` and its gradient in the subsampled mean is ``n / k`` times its share
    of the full one. For MMD and moment matching the subsample gives the same statistic on fewer rows."""
    n = src.shape[1]
    if n <= k or not bool(((src.sum(1) > k) | (tgt.sum(1) > k)).any()):
        return None
    keys = torch.rand(src.shape, generator=generator, device=src.device)
    picks = [torch.topk(torch.where(side, keys, keys + 2.0), k, dim=1, largest=False).indices for side in (src, tgt)]
    pick = torch.cat(picks, 1)
    first = (torch.arange(2 * k, device=src.device) < k).unsqueeze(0)
    return pick, src.gather(1, pick) & first, tgt.gather(1, pick) & ~first


def _on(loss: TransferLoss, device: torch.device) -> TransferLoss:
    """``loss`` with its parameters (a discriminator's) on ``device``, where the rows are."""
    p = next(loss.parameters(), None)
    if p is not None and p.device != device:
        loss.to(device)
    return loss


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


def _domain_rows(table: TableRows):
    """(global ids, current rows, index of this rank's rows or None), gathered over a row-wise table's group."""
    slot = table.slot
    ids = table.rows + slot.row_offset
    cur = slot.weight.detach().index_select(0, table.rows)
    if slot.group is not None and dist.get_world_size(slot.group) > 1:
        return _all_gather_rows(ids, cur, slot.group)
    return ids, cur, None


class TransferTransform(RowTransform):
    """The ``transfer`` stage: the mode's direction for the touched rows of every table under transfer (module
    docstring). Build it with :func:`transfer_transform`; ``rules``: table name -> :class:`TransferRule`."""

    stage = "transfer"

    def __init__(self, rules: dict[str, TransferRule], losses: dict[int, TransferLoss], max_rows: int | None = None,
                 seed: int = 0) -> None:
        self.rules = rules
        self.losses = losses
        self.max_rows = max_rows  # transfer.max_rows (subsample_slots)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._workspaces: dict = {}  # the applied barrier's row-product buffer (AppliedBarrier)
        self.needs_main_loss = any(r.uses_barrier for r in rules.values())
        self._buffer_masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self) -> dict[str, dict]:
        return {name: vars(rule.stats) for name, rule in self.rules.items()}

    def local_state(self) -> dict:
        """What this stage keeps that a checkpoint must hold per rank (the learned per-table state is saved by
        table instead, :meth:`~recsys_transfer.transfer.losses.TransferLoss.table_state`): the subsample
        generators' states (``transfer.max_rows``), the discriminators' call counters (``transfer.disc_every``)
        and the last step's statistics of each table."""
        return {"generators": {str(dev): g.get_state() for dev, g in self._generators.items()},
                "calls": {dim: getattr(loss, "calls", 0) for dim, loss in self.losses.items()},
                "stats": {name: dict(vars(rule.stats)) for name, rule in self.rules.items()}}

    def load_local_state(self, state: dict) -> None:
        """Restore what :meth:`local_state` returned (tables this rank does not hold are passed over)."""
        for dev, gen_state in state["generators"].items():
            self._generator(torch.device(dev)).set_state(gen_state)
        for dim, calls in state["calls"].items():
            if dim in self.losses and hasattr(self.losses[dim], "calls"):
                self.losses[dim].calls = calls
        for name, stats in state["stats"].items():
            if name in self.rules:
                vars(self.rules[name].stats).update(stats)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self._seed * 1_000_003 + 17)
        return gen

    def _loss_grad(self, loss: TransferLoss, x: torch.Tensor | None, rows_of, src: torch.Tensor, tgt: torch.Tensor,
                   index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``loss.grad`` on the padded ``[T, N]`` layout, or on a subsample of it (``transfer.max_rows``): then only
        the drawn rows are gathered (``rows_of(flat slot ids) -> [K, D]`` values) and the gradient is scattered back
        (rows left out get zero). Returns (per-table losses, ``[T * N, D]`` gradient)."""
        n_tab, n_max = src.shape
        drawn = None if self.max_rows is None else subsample_slots(src, tgt, self.max_rows,
                                                                   self._generator(src.device))
        if drawn is None:
            xs = x if x is not None else rows_of(None).view(n_tab, n_max, dim)
            values, gx = _on(loss, src.device).grad(xs, src, tgt, index)
            return values, gx.reshape(n_tab * n_max, dim)
        pick, src_k, tgt_k = drawn
        slots = (torch.arange(n_tab, device=src.device).unsqueeze(1) * n_max + pick).reshape(-1)
        xs = (x.reshape(n_tab * n_max, dim).index_select(0, slots) if x is not None else rows_of(slots))
        values, gx = _on(loss, src.device).grad(xs.view(n_tab, pick.shape[1], dim), src_k, tgt_k, index)
        full = torch.zeros((n_tab * n_max, dim), dtype=gx.dtype, device=gx.device)
        # a slot drawn twice (once on its side, once as filler of the other side, masked there) adds zero once
        return values, full.index_add_(0, slots, gx.reshape(-1, dim))

    def reads_rows(self, slot: TableSlot) -> bool:
        return slot.name in self.rules  # the transfer loss reads the rows of the tables under transfer

    @torch.no_grad()
    def __call__(self, call: CallRows, context: StepContext) -> None:
        transfer = [t for t in call.tables if t.slot.name in self.rules]
        for t in transfer:
            self.rules[t.slot.name].stats = StepStats(rows=len(t))
        if not transfer:
            return
        if call.shared is not None and self._shared(call, transfer, context):
            return
        self._per_table(call, transfer, context)

    # -- the per-table path ------------------------------------------------------------------------------------
    def _transfer_grads(self, tables: list[TableRows]) -> list[torch.Tensor]:
        """``t_i`` for every table, one batched loss call per shared loss object.

        Every touched row of every table of a bucket is packed into one padded ``[T, N, D]`` call, with its source
        and target masks; rows in neither domain (and padding) have both masks False, so the loss gives them zero
        gradient (CosReg, which regularizes every touched row, marks them all as "source"). Passing them instead of
        compacting the domain rows costs a few more rows in the loss but no per-table gather and scatter.
        """
        out: list[torch.Tensor | None] = [None] * len(tables)
        buckets: dict[int, list[int]] = {}
        for k, t in enumerate(tables):
            buckets.setdefault(id(self.rules[t.slot.name].loss), []).append(k)
        for ks in buckets.values():
            loss = self.rules[tables[ks[0]].slot.name].loss
            parts, xs, srcs, tgts = [], [], [], []
            for k in ks:
                rule = self.rules[tables[k].slot.name]
                ids, cur, mine = _domain_rows(tables[k])
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
            index = torch.tensor([self.rules[tables[k].slot.name].loss_index for k in ks], dtype=torch.int64,
                                 device=x.device)
            values, gx = self._loss_grad(loss, x, None, src, tgt, index, x.shape[2])
            gx = gx.view(x.shape)
            n_src, n_tgt, vals = src.sum(1).tolist(), tgt.sum(1).tolist(), values.tolist()
            for j, (k, (n_all, mine)) in enumerate(zip(ks, parts)):
                t = gx[j, :n_all]
                out[k] = t if mine is None else t.index_select(0, mine)
                st = self.rules[tables[k].slot.name].stats
                st.source_rows, st.target_rows, st.transfer_loss = n_src[j], n_tgt[j], vals[j]
        return out  # type: ignore[return-value]

    def _per_table(self, call: CallRows, transfer: list[TableRows], context: StepContext) -> None:
        t_grads = self._transfer_grads(transfer)
        barrier = []
        for table, t in zip(transfer, t_grads):
            rule = self.rules[table.slot.name]
            if rule.uses_barrier:
                barrier.append((table, t))
            else:
                table.direction = table.grad + rule.lam * t.to(table.grad.dtype)  # Eq. 1: l_main + lam l_transfer
        applied = [(table, t) for table, t in barrier if self.rules[table.slot.name].applied]
        if applied:
            self._split(call, [table for table, _ in applied], [table.grad for table, _ in applied],
                        [t.to(table.grad.dtype) for table, t in applied], context)
            barrier = [(table, t) for table, t in barrier if not self.rules[table.slot.name].applied]
        if barrier:
            sizes = [len(table) for table, _ in barrier]
            g = torch.cat([table.grad for table, _ in barrier])
            t = torch.cat([t.to(g.dtype) for _, t in barrier])
            alpha = torch.cat([torch.full((n,), self.rules[table.slot.name].alpha, dtype=g.dtype, device=g.device)
                               for (table, _), n in zip(barrier, sizes)])
            mu, lam = barrier_direction(g, t, _main_loss(context), alpha)
            for (table, _), m, lk in zip(barrier, mu.split(sizes), lam.split(sizes)):
                table.direction = m
                self.rules[table.slot.name].stats.mean_lambda = float(lk.mean()) if len(lk) else 0.0

    def _split(self, call: CallRows, tables: list[TableRows], grads, transfers, context: StepContext,
               rows: torch.Tensor | None = None, current: torch.Tensor | None = None) -> None:
        """Hand the barrier tables' main and transfer gradients (one per table, or Blocks of one array) to the row
        optimizer (``transfer.barrier: applied``): ``call.split``, combined by :class:`AppliedBarrier`."""
        rules = [self.rules[table.slot.name] for table in tables]
        settings = {(r.alpha, r.max_ratio) for r in rules}
        if len(settings) != 1:
            raise ValueError(f"the applied barrier needs one (alpha, max_ratio) for the tables of a lookup call, got "
                             f"{sorted(settings, key=str)}")
        combine = AppliedBarrier(_main_loss(context), rules[0].alpha, rules[0].max_ratio, rules,
                                 [len(table) for table in tables], self._workspaces)
        call.split = SplitUpdate(tables, grads, transfers, combine, rows=rows, current=current, done=combine.done)

    # -- the whole-array path ----------------------------------------------------------------------------------
    def buffer_masks(self, base: torch.Tensor, firsts: list[int],
                     slots: list[TableSlot]) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and target masks over every row of the buffer ``base`` whose tables start at ``firsts`` (False in
        tables without transfer), so the rows of all tables are classified by one index each. Built once per
        layout (:func:`transfer_transform` builds them at setup); each rule's masks then become views of them, so
        they are not held twice."""
        key = (base.untyped_storage().data_ptr(), len(base), tuple(firsts), tuple(map(id, slots)))
        masks = self._buffer_masks.get(key)
        if masks is None:
            src = torch.zeros(len(base), dtype=torch.bool, device=base.device)
            tgt = torch.zeros(len(base), dtype=torch.bool, device=base.device)
            for first, slot in zip(firsts, slots):
                rule = self.rules.get(slot.name)
                if rule is None:
                    continue
                source, target = rule.masks_on(src.device)
                n = len(source)
                src[first : first + n] = source
                tgt[first : first + n] = target
                rule.source_mask, rule.target_mask = src[first : first + n], tgt[first : first + n]
            masks = self._buffer_masks[key] = (src, tgt)
        return masks

    def _shared(self, call: CallRows, transfer: list[TableRows], context: StepContext) -> bool:
        """The transfer stage for a call whose tables share a buffer, on whole arrays: one gather of the transfer
        rows, one padded loss call, one barrier over every row. Returns False (nothing done) when the tables under
        transfer do not share one loss object and setting (then the per-table path runs)."""
        shared: SharedRows = call.shared
        rules = [self.rules[t.slot.name] for t in transfer]
        rule0 = rules[0]
        if any(r.loss is not rule0.loss or r.mode != rule0.mode or r.alpha != rule0.alpha or r.lam != rule0.lam
               or r.barrier != rule0.barrier or r.max_ratio != rule0.max_ratio for r in rules):
            return False
        spans = [t.span for t in transfer]
        sizes = [hi - lo for lo, hi in spans]
        whole = spans[0][0] == 0 and spans[-1][1] == len(shared.rows) and all(
            spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
        dev = shared.rows.device
        sel = (torch.arange(len(shared.rows), device=dev) if whole else
               torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in spans]))
        rows = shared.rows if whole else shared.rows.index_select(0, sel)
        g = shared.grad if whole else shared.grad.index_select(0, sel)
        # padded layout [T, N]: row j of table k sits at slot k * N + j; a padding slot repeats a real row, with
        # both masks False (so the loss gives it no gradient)
        n_tab, n_max, m = len(transfer), max(sizes), len(rows)
        size_t = torch.tensor(sizes, device=dev)
        tix = torch.repeat_interleave(torch.arange(n_tab, device=dev), size_t, output_size=m)
        shift = torch.arange(n_tab, device=dev) * n_max - (torch.cumsum(size_t, 0) - size_t)  # slot - position
        pidx = torch.arange(m, device=dev).add_(shift.index_select(0, tix))
        # the rows' present values, gathered ONCE from the (large) buffer: the loss reads them, the optimizer
        # updates them in place and writes them back
        current = shared.base.index_select(0, shared.rows)
        at = torch.zeros(n_tab * n_max, dtype=torch.int64, device=dev).index_copy_(0, pidx, sel)  # slot -> position
        if rule0.loss.uses_all_rows:
            src = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev).index_fill_(0, pidx, True)
            tgt = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
        else:
            src_all, tgt_all = self.buffer_masks(shared.base, shared.firsts, shared.slots)
            src = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
            tgt = torch.zeros(n_tab * n_max, dtype=torch.bool, device=dev)
            src.index_copy_(0, pidx, src_all.index_select(0, rows))
            tgt.index_copy_(0, pidx, tgt_all.index_select(0, rows))
        src, tgt = src.view(n_tab, n_max), tgt.view(n_tab, n_max)
        index = torch.tensor([r.loss_index for r in rules], dtype=torch.int64, device=dev)
        rows_of = lambda slots: current.index_select(0, at if slots is None else at.index_select(0, slots))  # noqa: E731
        values, gx = self._loss_grad(rule0.loss, None, rows_of, src, tgt, index, current.shape[1])
        t = gx.index_select(0, pidx).to(g.dtype)  # [M, D], in the rows' order
        if rule0.applied:  # the optimizer combines its two updates (AppliedBarrier)
            starts = list(itertools.accumulate(sizes, initial=0))
            spans = list(zip(starts[:-1], starts[1:]))
            self._split(call, transfer, Blocks(g, spans), Blocks(t, spans), context,
                        rows=shared.rows if whole else shared.rows.index_select(0, sel),
                        current=current if whole else current.index_select(0, sel))
            self._record_stats(rules, src, tgt, values, None)
            return True
        if rule0.uses_barrier:
            mu, lam = barrier_direction(g, t, _main_loss(context), rule0.alpha)
            lam_means = torch.segment_reduce(lam, "mean", lengths=size_t).tolist()
        else:
            mu, lam_means = g + rule0.lam * t, [0.0] * n_tab  # Eq. 1: l_main + lam l_transfer
        if whole:
            shared.direction = mu
        else:
            direction = shared.grad.clone()
            direction[sel] = mu
            shared.direction = direction
        shared.current = current
        self._record_stats(rules, src, tgt, values, lam_means)
        return True

    @staticmethod
    def _record_stats(rules: list[TransferRule], src: torch.Tensor, tgt: torch.Tensor, values: torch.Tensor,
                      lam_means: list[float] | None) -> None:
        n_src, n_tgt, vals = src.sum(1).tolist(), tgt.sum(1).tolist(), values.tolist()
        for j, rule in enumerate(rules):
            st = rule.stats
            st.source_rows, st.target_rows, st.transfer_loss = n_src[j], n_tgt[j], vals[j]
            if lam_means is not None:
                st.mean_lambda = lam_means[j]


def _main_loss(context: StepContext) -> torch.Tensor:
    if context.main_loss is None:
        raise RuntimeError("the main loss is unknown: open the step with pipeline.begin(loss) (or use "
                           "TransferPlugin.backward(loss)) instead of a bare loss.backward()")
    return context.main_loss


def transfer_transform(pipeline, meta, config: TransferConfig,
                       domains: dict[str, np.ndarray] | None = None) -> TransferTransform | None:
    """The transfer stage for ``config`` over the tables of ``pipeline`` (a
    :class:`~recsys_transfer.rows.pipeline.RowPipeline`) in the collection ``config.embedding_module`` whose
    field is under transfer (None in mode B). A table's field is the vocabulary owner of the features it serves
    (``t_item_id`` serving ``item_id`` and ``history`` is ``item_id``'s table; transfer fields name owners:
    :meth:`~recsys_transfer.config.TransferConfig.candidate_fields`); its rows' gradients sum every feature's
    occurrences, and the barrier (per row) is unchanged. Source = the field's head ids from ``meta.json``; target = its
    tail ids, or for ``+Ours`` / ``select`` the selective target domain T'_eta (``domains[field]``, a bool array
    over ids: :func:`recsys_transfer.transfer.domains.load_domains`). Under sharding, the rules cover this rank's
    tables."""
    fields = config.transfer_fields(meta)
    if not fields:
        return None
    if config.mode in SELECTIVE_MODES:
        missing = [f for f in fields if not domains or f not in domains]
        if missing:
            raise UserError(f"mode {config.mode!r} needs the selective target domain of {missing}: run "
                            "`recsys-transfer select` (or pass domains=)")
    slots = pipeline.slots
    named = [c for c in pipeline.collections if _in_collection(c, config.embedding_module)]
    if not named:
        raise UserError(f"the model has no embedding collection named {config.embedding_module!r} "
                        f"(collections: {sorted(pipeline.collections)})")
    eligible = [s for s in slots if _in_collection(s.collection, config.embedding_module)]
    losses: dict[int, TransferLoss] = {}
    rules: dict[str, TransferRule] = {}
    owner_of = {s.name: _table_field(s, meta) for s in eligible}
    for slot in eligible:
        field = owner_of[slot.name]
        if field not in fields:
            continue
        if slot.dim not in losses:
            kwargs = dict(config.loss_kwargs)
            kwargs.setdefault("seed", config.seed)
            if config.disc_every != 1:
                kwargs["update_every"] = config.disc_every
            losses[slot.dim] = make_transfer_loss(config.loss, len(meta.sparse_names), slot.dim, **kwargs)
        f = meta.field(field)
        source = torch.from_numpy(f.head_mask())
        target = (torch.from_numpy(np.asarray(domains[field], dtype=bool)) if config.mode in SELECTIVE_MODES
                  else torch.from_numpy(f.tail_mask()))
        if len(target) != f.vocab_size:
            raise UserError(f"target domain of {field!r} has {len(target)} entries, the field has "
                            f"{f.vocab_size} ids")
        rules[slot.name] = TransferRule(slot.name, config.mode, loss=losses[slot.dim],
                                        loss_index=meta.sparse_names.index(field), source_mask=source,
                                        target_mask=target & ~source, lam=config.lam,
                                        alpha=config.barrier_alpha, barrier=config.barrier,
                                        max_ratio=config.max_ratio if config.barrier == "applied" else None)
    absent = sorted(set(fields) - set(owner_of.values()))
    if absent and not any(pipeline.collections[c] for c in named):  # a shard may hold only some of the tables
        raise UserError(f"transfer fields {absent} have no table in the collection {config.embedding_module!r}")
    transform = TransferTransform(rules, losses, max_rows=config.max_rows, seed=config.seed)
    if pipeline.optimizer is not None and any(r.applied for r in rules.values()):
        pipeline.optimizer.enable_transfer_state([pipeline.by_name[name].weight for name in rules])
    by_collection: dict[str, list[TableSlot]] = {}
    for s in slots:
        by_collection.setdefault(s.collection, []).append(s)
    for group in by_collection.values():  # the buffer-wide masks now, at setup (not at the first step)
        if any(s.name in rules for s in group) and all(s.group is None for s in group):
            layout = rows_of_one_buffer([s.weight for s in group])
            if layout is not None:
                transform.buffer_masks(layout[0], list(layout[1]), group)
    return transform


def _table_field(slot: TableSlot, meta) -> str | None:
    """The vocabulary owner of the fields ``slot``'s table serves (``item_id`` for a table serving ``item_id`` and
    a ``history`` list of its items); None for a table serving no field of ``meta``. A table serving fields of
    different vocabularies has no one domain: :class:`UserError`."""
    known = set(meta.sparse_names)
    owners = sorted({meta.field(f).table_field for f in slot.features if f in known})
    if len(owners) > 1:
        raise UserError(f"table {slot.name} serves fields of different vocabularies ({owners}): the transfer "
                        "domains are per vocabulary; give each vocabulary its own table")
    return owners[0] if owners else None


def _in_collection(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


__all__ = ["AppliedBarrier", "MODES", "StepStats", "applied_barrier", "TransferRule", "TransferTransform", "barrier_direction", "transfer_transform"]
