"""Gradient surgery: PCGrad (Yu et al., NeurIPS 2020) and Gradient Vaccine (GradVac; Wang et al., ICLR 2021, the
thesis's Chapter 6: Eq. 6.2-6.3, Algorithm 2), over the shared dense parameters AND the touched embedding rows.

Algorithm 2, for one parameter group ``k`` with per-task gradients ``g_ik`` (one backward per task):

* every task ``i`` in the chosen set ``G`` (``multitask.tasks``) starts from ``g'_ik = g_ik``, and for every other
  task ``j`` of the step, in a random order: ``phi_ijk = cos(g'_ik, g_jk)``; if ``phi_ijk < target_ijk``,
  ``g'_ik += ||g'_ik|| (target sqrt(1 - phi^2) - phi sqrt(1 - target^2)) / (||g_jk|| sqrt(1 - target^2)) g_jk``
  (Eq. 6.2: after it, ``cos(g'_ik, g_jk) = target_ijk`` exactly); then the EMA ``target_ijk <- (1 - beta)
  target_ijk + beta phi_ijk`` (Eq. 6.3, with ``phi`` measured BEFORE the adjustment, ``target`` starting at 0);
* the group's update direction is ``sum_i g'_ik`` over ALL tasks: a task outside ``G`` keeps its gradient and
  serves only as the others' reference. This is the thesis's task choice (Table 6.2: ``LRL_only`` -- GradVac only
  on the low-resource languages, all languages' gradients still the references and still summed -- was best).

PCGrad is the same loop with the target fixed at 0 and no EMA: where ``g'_i . g_j < 0``,
``g'_i -= (g'_i . g_j) / ||g_j||^2 g_j``; the references ``g_j`` are the ORIGINAL gradients in both methods.

Departures, all where the paper's formulas are undefined: a pair with a zero gradient in a group (a task that
does not reach the group: a task tower, a table only one task reads) is skipped for that group (no adjustment, no
EMA update); ``phi`` is clipped to [-1, 1] and ``1 - target^2`` to at least the smallest normal float.

How it is computed: ``g'_ik`` stays a linear combination ``sum_m c_im g_mk`` of the original gradients, so every
cosine follows from the Gram matrix ``<g_mk, g_nk>`` (one pass over the gradients per pair of tasks, summed per
group by ``lengths``), the ``K (K - 1)`` adjustments are scalar work on ``[groups]`` tensors in float64, and the
result is ONE weighted sum ``sum_m (sum_i c_im) g_mk`` (:func:`gradvac`). The order of the ``j`` loop is drawn
once per step from the surgery's own seeded generator (:meth:`Surgery.new_step`), the same for every group, as in
LibMTL; it is part of the checkpointed state with the targets.

Where it runs in the one training step (:mod:`recsys_transfer.train.step`):

* rows: :class:`RowSurgery`, the ``surgery`` stage of the row pipeline (:mod:`recsys_transfer.rows.pipeline`),
  turns each lookup call's per-task row gradients (recorded by the core, one backward per task) into one
  ``g_main`` per touched row -- only rows in the batch: the records hold nothing else. Groups: one per table
  (``row_groups: table``) or one per lookup call, i.e. all tables of a collection together (``tables``);
* dense: :class:`DenseSurgery` after the row pipeline, before the dense optimizer step: per-task gradients of the
  parameters reached by at least two tasks, grouped as the whole model, per module (``layer``, the thesis's best
  ``all_layer``) or per parameter tensor (``parameter``, ``all_matrix``); parameters one task reaches keep that
  task's gradient.

Composition with harmless transfer (+Ours, lexico) on the same rows: surgery FIRST -- per-task main gradients ->
one ``g_main`` per row -- then the transfer stage's barrier on that ``g_main`` (the barrier reads ``TableRows.grad``
/ ``SharedRows.grad``, which this stage rewrites), with ``phi_i`` from ``l_main`` (the weighted task losses). The
barrier's guarantee ``<g_main_i, mu_i> >= phi_i`` is then with respect to the surgered ``g_main``, not the raw sum
of the task gradients (tested on real data in ``tests/test_surgery.py``).

Under torchrun (DistributedModelParallel) the result is the single-process one on the same global batch (tested
on 2 ranks, row-wise and table-wise, PCGrad and GradVac, both row groupings: final weights within 1e-7, the same
EMA targets on every rank: ``tests/test_surgery_distributed.py``):

* rows: a table's touched rows are split over the ranks (row-wise: each rank records its block's rows; table-wise:
  the owning rank records all of them for the global batch, the others none), and a ``tables`` group spans ranks
  and lookup calls. :meth:`RowSurgery.prepare` sums each rank's part of every group's Gram entries in ONE
  all-reduce of a ``[K * K + 1, groups]`` float64 tensor (with a flag per group recorded by two tasks or more),
  over every row group of the model in one order on every rank; every rank then runs Algorithm 2 on the global
  Gram matrices -- the same coefficients and EMA targets, of every group, on every rank (so the checkpointed
  surgery state is the same on every rank) -- and applies them to its own rows. The row gradients themselves are
  the global batch's (TorchRec divides them by the world size in each backward, one per task);
* dense: the step averages each task's dense gradients over the ranks before :class:`DenseSurgery` reads them
  (:mod:`recsys_transfer.train.step`: DDP averages only the first backward after a forward, so the model is
  sharded without it, ``shard_model(..., data_parallel=False)``, which the trainer does when there is surgery);
* the task orders: the generator is seeded by ``multitask.seed`` alone and drawn once per step on every rank (a
  skipped non-finite batch is skipped by every rank: its loss is all-reduced first), so every rank draws the same
  orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.config import DENSE_GROUPS, ROW_GROUPS, SURGERIES
from recsys_transfer.rows.pipeline import CallRows, RowTransform, StepContext

METHODS = tuple(s for s in SURGERIES if s != "none")


def _segment_sum(x: torch.Tensor, lengths: Sequence[int] | None) -> torch.Tensor:
    """``x`` (1-D) summed per consecutive segment of ``lengths`` (one segment: all of it), ``[G]``."""
    if lengths is None or len(lengths) == 1:
        return x.sum().reshape(1)
    return torch.segment_reduce(x, "sum", lengths=torch.tensor(list(lengths), device=x.device))


def _gram(flat: Sequence[torch.Tensor], lengths: Sequence[int] | None) -> torch.Tensor:
    """``[K, K, G]`` float64: ``<g_m, g_n>`` per group."""
    k = len(flat)
    groups = 1 if lengths is None else len(lengths)
    out = torch.empty((k, k, groups), dtype=torch.float64, device=flat[0].device)
    for m in range(k):
        for n in range(m, k):
            dot = _segment_sum(flat[m] * flat[n], lengths).to(torch.float64)
            out[m, n] = dot
            out[n, m] = dot
    return out


def surgery_coefficients(gram: torch.Tensor, targets: torch.Tensor | None, orders: Sequence[Sequence[int]],
                         chosen: Sequence[bool], beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Algorithm 2 on the Gram matrix ``gram`` ``[K, K, G]``: returns ``(c, targets')`` with ``g'_i = sum_m c[i, m]
    g_m`` per group (``c``: ``[K, K, G]`` float64) and the updated EMA targets (``targets`` ``[K, K, G]``; None:
    PCGrad, target 0 and no EMA). ``orders[i]``: the other tasks in the order task ``i`` meets them; ``chosen[i]``:
    task ``i`` is adjusted (else ``c[i] = e_i``)."""
    k, _, groups = gram.shape
    c = torch.eye(k, dtype=torch.float64, device=gram.device).unsqueeze(2).repeat(1, 1, groups)
    new = None if targets is None else targets.to(torch.float64).clone()
    tiny = torch.finfo(torch.float64).tiny
    for i in range(k):
        if not chosen[i]:
            continue
        for j in orders[i]:
            dot = (c[i] * gram[:, j]).sum(0)  # <g'_i, g_j>
            nii = (c[i].unsqueeze(1) * c[i].unsqueeze(0) * gram).sum((0, 1)).clamp_min(0.0).sqrt()  # ||g'_i||
            njj = gram[j, j].clamp_min(0.0).sqrt()
            valid = (nii > 0) & (njj > 0)
            phi = torch.where(valid, dot / (nii * njj).clamp_min(tiny), torch.zeros_like(dot)).clamp(-1.0, 1.0)
            if new is None:  # PCGrad: project out the conflicting component
                a = -dot / gram[j, j].clamp_min(tiny)
                adjust = valid & (phi < 0)
            else:
                target = new[i, j]
                room = (1.0 - target * target).clamp_min(tiny).sqrt()
                a = nii * (target * (1.0 - phi * phi).clamp_min(0.0).sqrt() - phi * room) / (njj.clamp_min(tiny) * room)
                adjust = valid & (phi < target)
                new[i, j] = torch.where(valid, (1.0 - beta) * target + beta * phi, target)
            c[i, j] += torch.where(adjust, a, torch.zeros_like(a))
    return c, new


def _combine(grads: Sequence[torch.Tensor], weights: torch.Tensor, lengths: Sequence[int] | None) -> torch.Tensor:
    """``sum_m weights[m, group] * g_m`` (``weights``: ``[K, G]``), in the gradients' dtype and shape."""
    out = None
    for m, g in enumerate(grads):
        w = weights[m].to(g.dtype)
        if lengths is None or len(lengths) == 1:
            term = g * w[0]
        else:
            term = (g.reshape(-1) * torch.repeat_interleave(w, torch.tensor(list(lengths), device=g.device),
                                                            output_size=g.numel())).view(g.shape)
        out = term if out is None else out + term
    return out


def _run(grads, targets, orders, chosen, beta, lengths):
    if len({tuple(g.shape) for g in grads}) != 1:
        raise ValueError(f"the tasks' gradients differ in shape: {[tuple(g.shape) for g in grads]}")
    if lengths is not None and sum(lengths) != grads[0].numel():
        raise ValueError(f"group lengths sum to {sum(lengths)}, the gradients have {grads[0].numel()} elements")
    k = len(grads)
    chosen = [True] * k if chosen is None else list(chosen)
    if orders is None:
        orders = [[j for j in range(k) if j != i] for i in range(k)]
    flat = [g.reshape(-1) for g in grads]
    c, new = surgery_coefficients(_gram(flat, lengths), targets, orders, chosen, beta)
    return _combine(grads, c.sum(0), lengths), new


def pcgrad(grads: Sequence[torch.Tensor], *, orders: Sequence[Sequence[int]] | None = None,
           chosen: Sequence[bool] | None = None, lengths: Sequence[int] | None = None) -> torch.Tensor:
    """PCGrad's combined gradient ``sum_i g'_i`` of the tasks' gradients ``grads`` (same shape; module docstring).
    ``orders[i]``: the order in which task ``i`` meets the others (default ascending); ``chosen``: the tasks that
    are projected (default all); ``lengths``: the elements of each group, consecutive in the flattened gradients
    (default one group)."""
    return _run(grads, None, orders, chosen, 0.0, lengths)[0]


def gradvac(grads: Sequence[torch.Tensor], targets: torch.Tensor, *, beta: float = 1e-2,
            orders: Sequence[Sequence[int]] | None = None, chosen: Sequence[bool] | None = None,
            lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac's combined gradient ``sum_i g'_i`` and the updated EMA targets (``targets``: ``[K, K, G]``, entry
    ``[i, j, k]`` the target of task ``i`` against ``j`` in group ``k``; zeros at the start). Arguments as
    :func:`pcgrad`."""
    return _run(grads, targets, orders, chosen, beta, lengths)


class Surgery:
    """The state of gradient surgery in one run: the method, the tasks (their order is the index of the targets),
    which are adjusted, ``beta``, the EMA targets of every group (``targets[group name]``: ``[K, K]`` float64) and
    the generator of the random task orders. ``state_dict`` / ``load_state_dict`` round-trip all of it (the
    train state saves it: :mod:`recsys_transfer.train.state`)."""

    def __init__(self, method: str, tasks: Sequence[str], chosen: Sequence[str] = (), beta: float = 1e-2,
                 seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"surgery must be one of {METHODS}, got {method!r}")
        unknown = sorted(set(chosen) - set(tasks))
        if unknown:
            raise ValueError(f"multitask.tasks names unknown task(s) {unknown}; tasks: {list(tasks)}")
        self.method, self.tasks, self.beta = method, tuple(tasks), float(beta)
        self.chosen = frozenset(chosen or tasks)
        self.targets: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(int(seed))
        self.orders: dict[str, list[str]] = {}
        self.steps = 0

    def new_step(self) -> None:
        """Draw this step's task orders (one permutation of the others per task; the same for every group)."""
        self.orders = {}
        for name in self.tasks:
            others = [t for t in self.tasks if t != name]
            perm = torch.randperm(len(others), generator=self.generator).tolist()
            self.orders[name] = [others[p] for p in perm]
        self.steps += 1

    def combine(self, names: Sequence[str], grads: Sequence[torch.Tensor], groups: Sequence[str],
                lengths: Sequence[int] | None = None) -> torch.Tensor:
        """``sum_i g'_i`` of the tasks ``names`` (a subset of :attr:`tasks`, the ones present) with gradients
        ``grads``, split into the groups ``groups`` (names, for the targets) of ``lengths`` elements each."""
        if not self.orders:
            self.new_step()
        if len(names) < 2:
            out = grads[0]
            for g in grads[1:]:
                out = out + g
            return out
        lengths = None if lengths is None or len(groups) == 1 else lengths
        c = self.coefficients(names, _gram([g.reshape(-1) for g in grads], lengths), groups)
        return _combine(grads, c.sum(0), lengths)

    def coefficients(self, names: Sequence[str], gram: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
        """Algorithm 2 for the tasks ``names`` (at least two) on their Gram matrix ``gram`` (``[K, K, G]``, one
        entry per group of ``groups``): ``c`` (``[K, K, G]``, ``g'_i = sum_m c[i, m] g_m``); GradVac's targets of
        these groups are updated (EMA)."""
        if not self.orders:
            self.new_step()
        index = {n: k for k, n in enumerate(names)}
        orders = [[index[o] for o in self.orders[n] if o in index] for n in names]
        chosen = [n in self.chosen for n in names]
        targets = pos = None
        if self.method == "gradvac":
            k, dev = len(self.tasks), gram.device
            pos = torch.tensor([self.tasks.index(n) for n in names], device=dev)
            full = torch.stack([self.targets[g].to(dev) if g in self.targets else
                                torch.zeros(k, k, dtype=torch.float64, device=dev) for g in groups], 2)
            targets = full if len(names) == k else full[pos.unsqueeze(1), pos.unsqueeze(0)]
        c, new = surgery_coefficients(gram, targets, orders, chosen, self.beta)
        if new is not None:  # back into each group's [K, K] (no host sync: the targets stay on the device)
            for group, sub in zip(groups, new.unbind(2)):
                if len(names) == len(self.tasks):
                    self.targets[group] = sub
                else:
                    full = self.targets.get(group)
                    full = (torch.zeros(len(self.tasks), len(self.tasks), dtype=torch.float64, device=sub.device)
                            if full is None else full.to(sub.device).clone())
                    full[pos.unsqueeze(1), pos.unsqueeze(0)] = sub
                    self.targets[group] = full
        return c

    def state_dict(self) -> dict:
        return {"method": self.method, "tasks": list(self.tasks), "beta": self.beta,
                "targets": {k: v.detach().cpu().clone() for k, v in self.targets.items()},
                "generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"surgery state of {state['method']} over {state['tasks']} does not fit {self.method} "
                             f"over {list(self.tasks)}")
        self.targets = {k: v.clone().to(torch.float64) for k, v in state["targets"].items()}
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        self.orders = {}


def _check_cover(tables, n_rows: int) -> None:
    """The spans of a shared call's tables (sorted) are consecutive and cover its rows (as the lookup records them)."""
    if not (tables[0].span[0] == 0 and tables[-1].span[1] == n_rows
            and all(a.span[1] == b.span[0] for a, b in zip(tables, tables[1:]))):
        raise RuntimeError("the tables of a shared lookup call do not cover its rows")


def _write_shared(call: CallRows) -> None:
    """Gather the tables' new gradients into the call's shared array (the later stages and the optimizer read the
    whole array) and make each table's gradient a view of it again."""
    if call.shared is None:
        return
    tables = sorted(call.tables, key=lambda t: t.span[0])
    _check_cover(tables, len(call.shared.rows))
    call.shared.grad = torch.cat([t.grad for t in tables])
    for t in call.tables:
        t.grad = call.shared.grad[t.span[0] : t.span[1]]


class RowSurgery(RowTransform):
    """Stage ``surgery`` of the row pipeline: each lookup call's per-task row gradients (``CallRows.task_grads``,
    recorded one backward per task) -> one ``g_main`` per touched row (module docstring). ``row_groups``: ``table``
    (one group per table, named by the table) or ``tables`` (one group per call: its collection's tables
    together). Gradients of slots that are not surgery tasks (model terms, ``aux/...``) are added unchanged."""

    stage = "surgery"

    def __init__(self, surgery: Surgery, row_groups: str = "table") -> None:
        if row_groups not in ROW_GROUPS:
            raise ValueError(f"row_groups must be one of {ROW_GROUPS}, got {row_groups!r}")
        self.surgery, self.row_groups = surgery, row_groups
        self._prepared = None  # under torchrun: this step's (group -> column, [K, groups] weights) (prepare)
        self._groups: list[str] | None = None  # under torchrun: every row group of the model (prepare)

    @torch.no_grad()
    def __call__(self, call: CallRows, context: StepContext) -> None:
        names = [n for n in self.surgery.tasks if n in call.task_grads]
        if len(names) < 2:
            return
        rest = [n for n in call.task_grads if n not in names]
        if self._prepared is not None:  # under torchrun: the coefficients of every group are ready (prepare)
            if call.tables:
                self._apply_prepared(call, names, rest)
            return
        if not call.tables:
            return
        if call.shared is not None and call.task_whole:
            self._shared(call, names, rest)
            return
        # every table's rows as one flat vector per task; groups: each table's span, or all of them
        per_task = [torch.cat([g.reshape(-1) for g in call.task_grads[n]]) for n in names]
        sizes = [t.grad.numel() for t in call.tables]
        if self.row_groups == "tables":
            out = self.surgery.combine(names, per_task, [self._call_group(call)])
        else:
            out = self.surgery.combine(names, per_task, [t.slot.name for t in call.tables], sizes)
        parts = out.split(sizes)
        for k, (t, part) in enumerate(zip(call.tables, parts)):
            g = part.view(t.grad.shape)
            for n in rest:
                g = g + call.task_grads[n][k]
            t.grad = g
        _write_shared(call)

    # -- under torchrun ---------------------------------------------------------------------------------------
    def prepare(self, calls: list[CallRows], pipeline) -> None:
        """Called by :meth:`RowPipeline.apply` with every recorded call of the step, before any is transformed.
        In one process: nothing (each call is done in :meth:`__call__`, as always). Under torchrun with sharded
        tables, a table's rows are split over ranks (row-wise: each rank records its own rows; table-wise: one
        rank records all of them, the others none) and a ``tables`` group (a collection) over ranks and lookup
        calls. So every rank sums its part of each group's Gram entries ``<g_m, g_n>`` (``[K, K]`` per group, the
        surgery's ``K`` tasks), over every group of the model -- known to all ranks, in one order -- with a flag
        per group that it was recorded with at least two surgery tasks; ONE all-reduce (sum) of that
        ``[K * K + 1, groups]`` float64 tensor over the world gives every rank the Gram matrices of the global
        batch's rows, as one process has them; every rank then runs Algorithm 2 on the same numbers (the same
        coefficients and EMA targets, of every group, on every rank) and applies the coefficients to its own rows
        (:meth:`__call__`). A task absent from a group (it does not read the table) has zero Gram entries there:
        Algorithm 2 skips its pairs, as it skips a zero gradient, which is what one process does without it."""
        self._prepared = None
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and any(pipeline.collections.values())):
            return
        tasks = self.surgery.tasks
        k = len(tasks)
        groups = self._all_groups(pipeline)
        column = {g: j for j, g in enumerate(groups)}
        device = next((s.weight.device for s in pipeline.slots), torch.device("cpu"))
        acc = torch.zeros((k * k + 1, len(groups)), dtype=torch.float64, device=device)
        for call in calls:
            names = [n for n in tasks if n in call.task_grads]
            if len(names) < 2 or not call.tables:
                continue
            pos = torch.tensor([tasks.index(n) for n in names], device=device)
            flat = [torch.cat([g.reshape(-1) for g in call.task_grads[n]]) for n in names]
            if self.row_groups == "tables":
                call_groups = [self._call_group(call)]
                gram = _gram(flat, None)
            else:
                call_groups = [t.slot.name for t in call.tables]
                sizes = [g.numel() for g in call.task_grads[names[0]]]
                gram = _gram(flat, sizes if len(sizes) > 1 else None)
            cols = torch.tensor([column[g] for g in call_groups], device=device)
            index = (pos.unsqueeze(1) * k + pos.unsqueeze(0)).reshape(-1)  # rows of acc of the names' pairs
            acc[index.unsqueeze(1), cols.unsqueeze(0)] += gram.reshape(len(names) * len(names), -1)
            acc[k * k, cols] = 1.0
        dist.all_reduce(acc)
        present = [j for j, flag in enumerate(acc[k * k].tolist()) if flag > 0]
        gram = acc[: k * k, present].reshape(k, k, len(present))
        weights = (self.surgery.coefficients(list(tasks), gram, [groups[j] for j in present]).sum(0)
                   if present else None)  # [K, present groups]
        self._prepared = ({groups[j]: c for c, j in enumerate(present)}, weights)

    def _all_groups(self, pipeline) -> list[str]:
        """Every row group of the model, in one order on every rank: each table (``table``; the union of every
        rank's tables, gathered once) or each collection (``tables``)."""
        if self._groups is None:
            if self.row_groups == "tables":
                self._groups = sorted("rows:" + c for c in pipeline.collections)
            else:
                names: list = [None] * dist.get_world_size()
                dist.all_gather_object(names, sorted(s.name for s in pipeline.slots))
                self._groups = sorted({n for part in names for n in part})
        return self._groups

    def _apply_prepared(self, call: CallRows, names: list[str], rest: list[str]) -> None:
        """``g_main`` of each table of ``call`` from the coefficients :meth:`prepare` computed for its group."""
        columns, weights = self._prepared
        pos = [self.surgery.tasks.index(n) for n in names]
        for j, t in enumerate(call.tables):
            group = self._call_group(call) if self.row_groups == "tables" else t.slot.name
            col = columns[group]
            g = _combine([call.task_grads[n][j] for n in names], weights[pos, col : col + 1], None)
            for n in rest:
                g = g + call.task_grads[n][j]
            t.grad = g
        _write_shared(call)

    @staticmethod
    def _call_group(call: CallRows) -> str:
        return "rows:" + ",".join(sorted({t.slot.collection for t in call.tables}))

    def _shared(self, call: CallRows, names: list[str], rest: list[str]) -> None:
        shared = call.shared
        tables = sorted(call.tables, key=lambda t: t.span[0])
        width = shared.grad.shape[1]
        if self.row_groups == "tables":
            groups, lengths = [self._call_group(call)], None
        else:
            groups = [t.slot.name for t in tables]
            lengths = [(t.span[1] - t.span[0]) * width for t in tables]
            _check_cover(tables, len(shared.rows))
        g = self.surgery.combine(names, [call.task_whole[n] for n in names], groups, lengths)
        for n in rest:
            g = g + call.task_whole[n]
        shared.grad = g
        for t in call.tables:
            t.grad = g[t.span[0] : t.span[1]]


class DenseSurgery:
    """Surgery over the dense parameters ``params`` (``{name: parameter}``), grouped by ``groups``: ``model`` (one
    group), ``layer`` (per module: the parameter name without its last part) or ``parameter``. Use:
    :meth:`collect` after each task's backward (takes the task's ``.grad`` away), :meth:`apply` once after all
    tasks (writes ``sum_i g'_i`` plus whatever the parameters accumulated after the last collect)."""

    GROUPINGS = DENSE_GROUPS

    def __init__(self, surgery: Surgery, params: dict[str, nn.Parameter], groups: str = "layer") -> None:
        if groups not in self.GROUPINGS:
            raise ValueError(f"groups must be one of {self.GROUPINGS}, got {groups!r}")
        self.surgery, self.params, self.groups = surgery, dict(params), groups
        self._grads: dict[str, dict[str, torch.Tensor]] = {}

    def group_of(self, name: str) -> str:
        if self.groups == "model":
            return "dense"
        if self.groups == "layer":
            return "dense:" + (name.rsplit(".", 1)[0] if "." in name else name)
        return "dense:" + name

    def collect(self, task: str) -> None:
        """Take task ``task``'s gradients (the ``.grad`` of its backward) out of the parameters."""
        grads = self._grads.setdefault(task, {})
        for name, p in self.params.items():
            if p.grad is not None:
                grads[name] = grads[name] + p.grad if name in grads else p.grad
                p.grad = None

    def pending(self) -> list[torch.Tensor]:
        """The gradients collected so far (every task's, in task then parameter order): under torchrun the step
        averages them over the ranks, in place, before :meth:`apply` (:mod:`recsys_transfer.train.step`)."""
        return [g for n in self.surgery.tasks if n in self._grads for g in self._grads[n].values()]

    @torch.no_grad()
    def apply(self) -> None:
        collected, self._grads = self._grads, {}
        names = [n for n in self.surgery.tasks if n in collected]
        reached: dict[str, list[str]] = {}
        for name in self.params:
            reached[name] = [n for n in names if name in collected[n]]
        shared: dict[str, list[str]] = {}  # group -> its parameters reached by >= 2 tasks, in parameter order
        for name, tasks in reached.items():
            if len(tasks) >= 2:
                shared.setdefault(self.group_of(name), []).append(name)
        out: dict[str, torch.Tensor] = {}
        for name, tasks in reached.items():  # one task (or none): its gradient as it is
            if len(tasks) == 1:
                out[name] = collected[tasks[0]][name]
        if shared:  # every group at once: one flat vector per task, groups consecutive
            members = [m for group in shared.values() for m in group]
            sizes = [self.params[m].numel() for m in members]
            per_task = [torch.cat([collected[n][m].reshape(-1) if m in collected[n] else
                                   torch.zeros(self.params[m].numel(), dtype=self.params[m].dtype,
                                               device=self.params[m].device) for m in members]) for n in names]
            lengths = [sum(self.params[m].numel() for m in group) for group in shared.values()]
            combined = self.surgery.combine(names, per_task, list(shared), lengths)
            for m, part in zip(members, combined.split(sizes)):
                out[m] = part.view(self.params[m].shape)
        for name, g in out.items():
            p = self.params[name]
            p.grad = g if p.grad is None else p.grad + g


__all__ = ["DenseSurgery", "METHODS", "RowSurgery", "Surgery", "gradvac", "pcgrad", "surgery_coefficients"]
