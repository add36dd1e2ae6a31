"""Row-wise (sparse) optimizers for embedding tables, driven from inside backward.

They follow the ``torch.optim`` contract — hyper-parameters validated in ``__init__`` and read from
``param_groups`` at every update (so LR schedulers work), state created lazily per parameter, maths in functional
kernels, ``state_dict`` / ``load_state_dict`` round-trip — with one difference: the update is not applied by
``step()`` (a no-op, like TorchRec's fused optimizers) but by :meth:`RowOptimizer.update_rows`, which the
transfer plug-in's backward hook calls with the touched rows of one table and their update direction ``mu``
(for the barrier, ``mu_i`` of Algorithm 1), or by :meth:`RowOptimizer.update_rows_many` for several tables in one
run of the maths. Only those rows of the weight and of the state are read or written;
untouched rows stay bitwise unchanged.

Lazy semantics (documented because they differ from dense optimizers):

* SGD with momentum: a row's momentum buffer decays only when the row is touched (``buf = m * buf + mu``),
  as in TensorFlow's and fbgemm's sparse momentum.
* Adam: moments of a row are updated only when it is touched, and bias correction uses the row's own step
  count (how many times the row was updated), not a global step. A rare row's first update is therefore a
  proper Adam first step (``lr * sign(mu)``-sized), instead of the ``~3 lr``-sized overshoot that a global step
  produces with TF's LazyAdam or torch's SparseAdam for a row first seen late in training.
* Row-wise Adagrad: one accumulator per row, ``s += mean(mu**2)`` (fbgemm's EXACT_ROWWISE_ADAGRAD).
* Weight decay (if any) is applied to touched rows only (decoupled, AdamW-style, for Adam).
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch

from recsys_transfer.flat import LayoutCache, global_rows, join, share_storage

__all__ = ["RowOptimizer", "RowSGD", "RowAdam", "RowAdagrad", "make_row_optimizer"]


# -- functional kernels ---------------------------------------------------------------------------------------
# The kernels update several tables at once: ``weights[k]`` [R_k, D] (same D and dtype), ``rows[k]``
# int64 [U_k] (unique), ``grads[k]`` [U_k, D]. Touched rows (and their state) are gathered per table -- or in ONE
# call when the tables share a buffer (see _Rows) -- the maths runs ONCE on the concatenation, and the results are
# written back the same way: on CPU the per-op dispatch cost, not the arithmetic, dominates for ~1k rows. One table
# is the one-element case (same results).


class _LayoutCaches:
    """An optimizer's remembered buffer layouts (:class:`recsys_transfer.flat.LayoutCache`), one per list of tensors
    it updates every step (the weights, each state tensor), told apart by the list's first tensor and length. A
    bounded handful: forgotten wholesale if tensors keep moving, so no old buffer is kept alive for long."""

    def __init__(self) -> None:
        self._caches: dict[tuple[int, int], LayoutCache] = {}

    def __deepcopy__(self, memo: dict) -> "_LayoutCaches":
        return _LayoutCaches()

    def layout(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
        key = (tensors[0].data_ptr(), len(tensors))
        cache = self._caches.get(key)
        if cache is None:
            if len(self._caches) >= 16:
                self._caches.clear()
            cache = self._caches[key] = LayoutCache()
        return cache.get(tensors)


class _Rows:
    """The touched rows of several tables, gathered from / scattered to each table's tensors. When a list of
    tensors is the row blocks of one buffer (:mod:`recsys_transfer.flat`: tables moved there by the EBC, state
    allocated there by the optimizers), it is ONE index_select / index_copy_ on the buffer with global row ids
    (computed once per layout), instead of one per table."""

    def __init__(self, rows: Sequence[torch.Tensor], known: tuple[tuple[int, ...], torch.Tensor] | None = None,
                 current: torch.Tensor | None = None, caches: "_LayoutCaches | None" = None) -> None:
        self.rows = rows
        self.current = current  # the weights' touched rows, if the caller already gathered them (used up)
        self._caches = caches if caches is not None else _LayoutCaches()
        self._global: dict[tuple[int, ...], torch.Tensor] = dict([known]) if known is not None else {}
        self._layouts: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def _flat(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if len(tensors) == 1:
            return None
        if id(tensors) in self._layouts:  # the same list is gathered, then scattered
            return self._layouts[id(tensors)][1]
        flat = self._caches.layout(tensors)
        found = None
        if flat is not None:
            base, firsts = flat
            key = tuple(firsts)
            if key not in self._global:
                self._global[key] = self._shifted(key)
            found = (base, self._global[key])
        self._layouts[id(tensors)] = (tensors, found)  # keeps the list alive while its id is a key
        return found

    def _shifted(self, firsts: tuple[int, ...]) -> torch.Tensor:
        """``global_rows(self.rows, firsts)``: one add to the rows already known for a layout whose blocks all
        start ``c`` rows before these (``cat(rows[k] + f[k] + c) == known + c``), instead of a slice and an add
        per table. E.g. Adam's ``row_step`` state is one buffer for every table of its group, the first-order
        tables after the embedding tables, while their weights have a buffer of their own."""
        for known_firsts, known in self._global.items():
            if len(known_firsts) == len(firsts) and known_firsts:
                c = firsts[0] - known_firsts[0]
                if all(f - k == c for f, k in zip(firsts, known_firsts)):
                    return known + c if c else known
        return global_rows(self.rows, firsts)

    def gather(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = self._flat(tensors)
        if flat is not None:
            return flat[0].index_select(0, flat[1])
        if len(tensors) == 1:
            return tensors[0].index_select(0, self.rows[0])
        return torch.cat([t.index_select(0, r) for t, r in zip(tensors, self.rows)])

    def gather_weights(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`gather` of the weights, or the rows the caller passed (they are updated in place)."""
        if self.current is not None:
            w, self.current = self.current, None
            return w
        return self.gather(weights)

    def scatter(self, tensors: list[torch.Tensor], values: torch.Tensor) -> None:
        flat = self._flat(tensors)
        if flat is not None:
            flat[0].index_copy_(0, flat[1], values)
        elif len(tensors) == 1:
            tensors[0].index_copy_(0, self.rows[0], values)
        else:
            for t, r, v in zip(tensors, self.rows, values.split([len(r) for r in self.rows])):
                t.index_copy_(0, r, v)


# Each optimizer's maths is split in two: ``*_delta`` turns one direction into the row update (committing the state
# it reads: momentum buffers, moments, accumulators) and returns ``(delta, alpha)``, the update being
# ``w - alpha * delta``; the ``*_rows_many`` kernels apply it. The split update (:meth:`RowOptimizer.update_rows_split`)
# runs ``*_delta`` twice, on the main direction with the main state and on the transfer direction with a second
# copy of the state, and combines the two deltas. (``alpha`` is the learning rate for SGD, whose update has always
# been ``w.sub_(d, alpha=lr)``, one fused multiply-add; 1 for Adam and Adagrad, whose delta includes ``lr``: each
# kernel keeps the exact operations it always had, so B and the paper's barrier are bitwise what they were.)


def sgd_delta(at: "_Rows", w: torch.Tensor, grad: torch.Tensor, momentum_buffers: list[torch.Tensor] | None, *,
              lr: float, momentum: float, nesterov: bool, weight_decay: float) -> tuple[torch.Tensor, float]:
    d = grad if weight_decay == 0 else grad + weight_decay * w
    if momentum != 0:
        assert momentum_buffers is not None
        buf = at.gather(momentum_buffers).mul_(momentum).add_(d)
        at.scatter(momentum_buffers, buf)
        d = d + momentum * buf if nesterov else buf
    return d, lr


def adam_delta(at: "_Rows", grad: torch.Tensor, exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
               row_steps: list[torch.Tensor], *, lr: float, beta1: float, beta2: float,
               eps: float) -> tuple[torch.Tensor, float]:
    m = at.gather(exp_avgs).mul_(beta1).add_(grad, alpha=1 - beta1)
    v = at.gather(exp_avg_sqs).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = at.gather(row_steps).add_(1)
    at.scatter(exp_avgs, m)
    at.scatter(exp_avg_sqs, v)
    at.scatter(row_steps, t)
    tf = t.to(grad.dtype).unsqueeze(1)  # [U, 1]
    bc1 = 1 - torch.pow(torch.as_tensor(beta1, dtype=grad.dtype), tf)
    bc2 = 1 - torch.pow(torch.as_tensor(beta2, dtype=grad.dtype), tf)
    denom = (v / bc2).sqrt_().add_(eps)
    return lr * (m / bc1) / denom, 1.0


def rowwise_adagrad_delta(at: "_Rows", w: torch.Tensor, grad: torch.Tensor, sum_sqs: list[torch.Tensor], *,
                          lr: float, eps: float, weight_decay: float) -> tuple[torch.Tensor, float]:
    d = grad if weight_decay == 0 else grad + weight_decay * w
    # mean(d^2) per row as a product and a matrix-vector product (a reduction over a short row is ~2x slower on
    # CPU), and one pass for the update itself (d times a per-row factor)
    mean_sq = torch.mul(d, d) @ torch.full((d.shape[1],), 1.0 / d.shape[1], dtype=d.dtype, device=d.device)
    s = at.gather(sum_sqs).add_(mean_sq)
    at.scatter(sum_sqs, s)
    return d * (lr / (s.sqrt() + eps)).unsqueeze(1), 1.0


@torch.no_grad()
def adam_rows_many(weights: list[torch.Tensor], rows: "list[torch.Tensor] | _Rows", grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], row_steps: list[torch.Tensor], *,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    at = rows if isinstance(rows, _Rows) else _Rows(rows)
    w = at.gather_weights(weights)
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    delta, _ = adam_delta(at, join(grads), exp_avgs, exp_avg_sqs, row_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    at.scatter(weights, w.sub_(delta))


def adam_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, row_step: torch.Tensor, **kw: Any) -> None:
    """Lazy Adam on ``rows`` of one tensor (the discriminators of the adversarial loss use it)."""
    adam_rows_many([weight], [rows], [grad], [exp_avg], [exp_avg_sq], [row_step], **kw)


Combine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _zeros_like(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p, memory_format=torch.contiguous_format)


# -- optimizer classes ------------------------------------------------------------------------------------------


class RowOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class: ``update_rows(param, rows, mu)`` applies one update to ``rows`` of ``param``.

    ``names``: one name per parameter (the table names of :class:`recsys_transfer.rows.pipeline.RowPipeline`).
    With names, :meth:`state_dict` keys the state and the param groups by name, not by position, so a state saved
    from one model loads into a model whose tables are listed in another order (and a missing or extra table is an
    error naming it)."""

    def __init__(self, params, defaults: dict[str, Any], names: Sequence[str] | None = None) -> None:
        super().__init__(params, defaults)
        ordered = [p for g in self.param_groups for p in g["params"]]
        if names is not None:
            names = list(names)
            if len(names) != len(ordered) or len(set(names)) != len(names):
                raise ValueError(f"names: need {len(ordered)} unique names, one per parameter, got {len(names)}")
        self.names = names

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.names is None:
            return sd
        return {"state": {self.names[i]: v for i, v in sd["state"].items()},
                "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in sd["param_groups"]]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (matched by name when this optimizer has names: groups by the tables they
        hold, whatever the order). Hyper-parameters come from the saved groups; each state tensor list is moved
        into one buffer per group (:func:`recsys_transfer.flat.share_storage`), as the optimizer allocates it."""
        if self.names is None:
            super().load_state_dict(state_dict)
        else:
            params = dict(zip(self.names, (p for g in self.param_groups for p in g["params"])))
            saved = [n for g in state_dict["param_groups"] for n in g["params"]]
            missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
            if missing or extra:
                raise ValueError(f"row optimizer state does not match the tables: missing {missing}, unknown {extra}")
            names_of = {id(p): n for n, p in params.items()}
            mine = {frozenset(names_of[id(p)] for p in g["params"]): g for g in self.param_groups}
            for saved_group in state_dict["param_groups"]:
                group = mine.get(frozenset(saved_group["params"]))
                if group is None:
                    raise ValueError(f"row optimizer state has a param group {saved_group['params']} this one has not")
                group.update({k: v for k, v in saved_group.items() if k != "params"})
            self.state = collections.defaultdict(dict)
            for name, entry in state_dict["state"].items():
                p = params[name]
                self.state[p] = {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)).clone()
                                 for k, v in entry.items()}
        self.__dict__.pop("_groups", None)
        for group in self.param_groups:
            for key in {k for p in group["params"] for k in self.state[p]}:
                share_storage([self.state[p][key] for p in group["params"] if key in self.state[p]])

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        # an id -> (param, group) map instead of scanning every group per parameter (quadratic in the number of
        # tables); rebuilt when the group dicts change (add_param_group, load_state_dict makes new ones) or on a miss
        groups = tuple(map(id, self.param_groups))
        cached = self.__dict__.get("_groups")
        entry = cached[1].get(id(param)) if cached is not None and cached[0] == groups else None
        if entry is None or entry[0] is not param:
            cached = self.__dict__["_groups"] = (groups, {id(p): (p, g) for g in self.param_groups
                                                          for p in g["params"]})
            entry = cached[1].get(id(param))
            if entry is None or entry[0] is not param:
                raise KeyError("parameter is not managed by this optimizer")
        return entry[1]

    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        """Apply one update with direction ``mu`` [U, D] to the unique ``rows`` [U] of ``param``."""
        self.update_rows_many([param], [rows], [mu])

    def update_rows_many(self, params: list[torch.Tensor], rows: list[torch.Tensor], mus: list[torch.Tensor],
                         buffer_rows: torch.Tensor | None = None, current: torch.Tensor | None = None) -> None:
        """:meth:`update_rows` for several parameters at once (the same result as one call each); parameters of
        one param group with the same row width and dtype share one run of the maths (see the ``*_delta``
        kernels). What the caller may already have, saving its recomputation: ``buffer_rows``,
        ``cat(rows[k] + first_row[k])`` for params that are row blocks of one buffer (:mod:`recsys_transfer.flat`);
        ``current``, the rows' present values ``cat(params[k][rows[k]])`` (a tensor this call may overwrite;
        only used when all params form one batch). ``rows`` and ``mus`` may be lazy sequences
        (:class:`recsys_transfer.flat.Lazy`, :class:`~recsys_transfer.flat.Blocks`): an element is only asked for
        if the update cannot use ``buffer_rows`` (per-table rows) or the whole direction (per-table blocks)."""
        self._batched(params, rows, buffer_rows, current, lambda ks: ([mus[k] for k in ks] if ks is not None else mus))

    def enable_transfer_state(self, params: Sequence[torch.Tensor]) -> None:
        """Let :meth:`update_rows_split` update ``params`` (the tables under transfer): they get a second copy of the
        optimizer state for the transfer direction, keys prefixed ``transfer_`` (saved and loaded with the rest),
        allocated at their first split update in one buffer per key."""
        self.__dict__.setdefault("_transfer_params", set()).update(map(id, params))

    def update_rows_split(self, params: list[torch.Tensor], rows: list[torch.Tensor], grads: Sequence[torch.Tensor],
                          transfers: Sequence[torch.Tensor], combine: Combine, buffer_rows: torch.Tensor | None = None,
                          current: torch.Tensor | None = None) -> None:
        """One update of ``rows`` from two directions, each through its own optimizer state: the main gradient
        ``grads`` with the state :meth:`update_rows_many` keeps (so the main part is exactly the update mode B
        applies from that state) and the transfer gradient ``transfers`` with the ``transfer_`` state
        (:meth:`enable_transfer_state`). ``combine(g, u, v)`` gets the concatenated main gradient and the two
        updates (``u`` from ``g``, ``v`` from the transfer gradient; both ``[U, D]``, in the same units) and returns
        the update applied, ``w <- w - alpha * combine(g, u, v)`` (see ``*_delta``). Weight decay, if any, is part
        of the main update. Other arguments as :meth:`update_rows_many`."""
        known = self.__dict__.get("_transfer_params", set())
        if not all(id(p) in known for p in params):
            raise ValueError("update_rows_split: call enable_transfer_state() for these tables first")

        def split(ks):
            if ks is None:
                return grads, transfers
            return [grads[k] for k in ks], [transfers[k] for k in ks]

        self._batched(params, rows, buffer_rows, current, split, combine)

    def _batched(self, params, rows, buffer_rows, current, directions, combine: Combine | None = None) -> None:
        """Run the maths once per (param group, row shape, dtype, device) batch; ``directions(ks)``: the directions
        of params ``ks`` (None: all), one list or, for a split update (``combine`` given), a (main, transfer) pair.
        Batched by index: the elements of ``rows`` and of the directions are not looked at here."""
        batches: dict[tuple, tuple[dict[str, Any], list[int]]] = {}
        for k, p in enumerate(params):
            group = self._group_of(p)
            batches.setdefault((id(group), p.shape[1:], p.dtype, p.device), (group, []))[1].append(k)
        caches = self.__dict__.setdefault("_layout_caches", _LayoutCaches())  # per optimizer, across steps
        known = None
        if buffer_rows is not None and len(batches) == 1:
            flat = caches.layout(params)
            if flat is not None:
                known = (tuple(flat[1]), buffer_rows)
        if len(batches) == 1:
            group, _ = next(iter(batches.values()))
            jobs = [(group, list(params), _Rows(rows, known, current, caches), directions(None))]
        else:
            jobs = [(group, [params[k] for k in ks], _Rows([rows[k] for k in ks], None, None, caches), directions(ks))
                    for group, ks in batches.values()]
        for group, ps, at, dirs in jobs:
            self._init_state(group, self._state_spec(group))
            if combine is not None:
                self._update_split(group, ps, at, dirs[0], dirs[1], combine)
            else:
                self._update(group, ps, at, dirs)

    def _init_state(self, group: dict[str, Any], spec: dict[str, Any], prefix: str = "",
                    among: set[int] | None = None) -> None:
        """Create the state ``prefix + key`` of every parameter of ``group`` (of those in ``among``, if given) that
        lacks it (``spec``: key -> factory(param)), all at once and, per key, in one buffer
        (:func:`recsys_transfer.flat.share_storage`), so a later update of many tables gathers and scatters the
        state in one call."""
        if not spec:
            return
        first = prefix + next(iter(spec))
        fresh = [p for p in group["params"] if first not in self.state[p] and (among is None or id(p) in among)]
        if not fresh:
            return
        for p in fresh:
            self.state[p].update({prefix + key: make(p) for key, make in spec.items()})
        for key in spec:
            share_storage([self.state[p][prefix + key] for p in fresh])

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], at: "_Rows",
                mus: Sequence[torch.Tensor]) -> None:
        weights = [p.data for p in params]
        w = at.gather_weights(weights)
        self._decay(group, w)
        delta, alpha = self._delta(group, params, at, w, join(mus), "")
        at.scatter(weights, w.sub_(delta, alpha=alpha) if alpha != 1 else w.sub_(delta))

    def _update_split(self, group: dict[str, Any], params: list[torch.Tensor], at: "_Rows",
                      grads: Sequence[torch.Tensor], transfers: Sequence[torch.Tensor], combine: Combine) -> None:
        self._init_state(group, self._state_spec(group), "transfer_", self.__dict__["_transfer_params"])
        weights = [p.data for p in params]
        w = at.gather_weights(weights)
        self._decay(group, w)
        g = join(grads)
        u, alpha = self._delta(group, params, at, w, g, "")
        v, _ = self._delta(group, params, at, w, join(transfers), "transfer_")
        delta = combine(g, u, v)
        at.scatter(weights, w.sub_(delta, alpha=alpha) if alpha != 1 else w.sub_(delta))

    @abc.abstractmethod
    def _state_spec(self, group: dict[str, Any]) -> dict[str, Any]:
        """The per-parameter state of ``group``'s settings: key -> factory(param)."""

    @abc.abstractmethod
    def _delta(self, group: dict[str, Any], params: list[torch.Tensor], at: "_Rows", w: torch.Tensor,
               grad: torch.Tensor, prefix: str) -> tuple[torch.Tensor, float]:
        """The update ``(delta, alpha)`` for direction ``grad`` of the rows ``at`` (present values ``w``), reading
        and committing the state ``prefix + key``; weight decay only in the main update (``prefix == ""``)."""

    def _decay(self, group: dict[str, Any], w: torch.Tensor) -> None:
        """Decoupled weight decay applied to the rows before the update (Adam); nothing by default."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        """No-op: rows are updated inside backward by the transfer plug-in (see module docstring)."""
        return closure() if closure is not None else None


class RowSGD(RowOptimizer):
    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, names: Sequence[str] | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov requires momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), names)

    def _state_spec(self, g):
        return {"momentum_buffer": _zeros_like} if g["momentum"] != 0 else {}

    def _delta(self, g, params, at, w, grad, prefix):
        bufs = [self.state[p][prefix + "momentum_buffer"] for p in params] if g["momentum"] != 0 else None
        return sgd_delta(at, w, grad, bufs, lr=g["lr"], momentum=g["momentum"], nesterov=g["nesterov"],
                         weight_decay=0.0 if prefix else g["weight_decay"])


class RowAdam(RowOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, names: Sequence[str] | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps <= 0:
            raise ValueError(f"invalid eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), names)

    def _state_spec(self, g):
        return {"exp_avg": _zeros_like, "exp_avg_sq": _zeros_like,
                "row_step": lambda p: torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)}

    def _decay(self, g, w):
        if g["weight_decay"] != 0:
            w.mul_(1 - g["lr"] * g["weight_decay"])

    def _delta(self, g, params, at, w, grad, prefix):
        states = [self.state[p] for p in params]
        return adam_delta(at, grad, [st[prefix + "exp_avg"] for st in states],
                          [st[prefix + "exp_avg_sq"] for st in states], [st[prefix + "row_step"] for st in states],
                          lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"])


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad (one accumulator per row), the fbgemm EXACT_ROWWISE_ADAGRAD update."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 names: Sequence[str] | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), names)

    def _state_spec(self, g):
        return {"sum": lambda p: torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)}

    def _delta(self, g, params, at, w, grad, prefix):
        return rowwise_adagrad_delta(at, w, grad, [self.state[p][prefix + "sum"] for p in params], lr=g["lr"],
                                     eps=g["eps"], weight_decay=0.0 if prefix else g["weight_decay"])


def make_row_optimizer(name: str, params, **kwargs: Any) -> RowOptimizer:
    """``sgd`` | ``momentum`` (SGD, momentum 0.9 unless given) | ``adam`` | ``rowwise_adagrad``; ``kwargs``: the
    optimizer's hyper-parameters and ``names`` (one per parameter)."""
    name = name.lower()
    if name == "sgd":
        return RowSGD(params, **kwargs)
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
        return RowSGD(params, **kwargs)
    if name == "adam":
        return RowAdam(params, **kwargs)
    if name in ("rowwise_adagrad", "adagrad"):
        return RowAdagrad(params, **kwargs)
    raise ValueError(f"unknown row optimizer {name!r}: sgd, momentum, adam, rowwise_adagrad")

