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
from collections.abc import Sequence
from typing import Any

import torch

from recsys_transfer.flat import LayoutCache, global_rows, join, share_storage

__all__ = ["RowOptimizer", "RowSGD", "RowAdam", "RowAdagrad", "make_row_optimizer"]


# -- functional kernels ---------------------------------------------------------------------------------------
# The ``*_many`` kernels update several tables at once: ``weights[k]`` [R_k, D] (same D and dtype), ``rows[k]``
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


@torch.no_grad()
def sgd_rows_many(weights: list[torch.Tensor], rows: "list[torch.Tensor] | _Rows", grads: list[torch.Tensor],
                  momentum_buffers: list[torch.Tensor] | None, *, lr: float, momentum: float, nesterov: bool,
                  weight_decay: float) -> None:
    at = rows if isinstance(rows, _Rows) else _Rows(rows)
    w = at.gather_weights(weights)
    grad = join(grads)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    if momentum != 0:
        assert momentum_buffers is not None
        buf = at.gather(momentum_buffers).mul_(momentum).add_(d)
        at.scatter(momentum_buffers, buf)
        d = d + momentum * buf if nesterov else buf
    at.scatter(weights, w.sub_(d, alpha=lr))


@torch.no_grad()
def adam_rows_many(weights: list[torch.Tensor], rows: "list[torch.Tensor] | _Rows", grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], row_steps: list[torch.Tensor], *,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    at = rows if isinstance(rows, _Rows) else _Rows(rows)
    w = at.gather_weights(weights)
    grad = join(grads)
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
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
    at.scatter(weights, w.sub_(lr * (m / bc1) / denom))


@torch.no_grad()
def rowwise_adagrad_rows_many(weights: list[torch.Tensor], rows: "list[torch.Tensor] | _Rows", grads: list[torch.Tensor],
                              sum_sqs: list[torch.Tensor], *, lr: float, eps: float, weight_decay: float) -> None:
    at = rows if isinstance(rows, _Rows) else _Rows(rows)
    w = at.gather_weights(weights)
    grad = join(grads)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    s = at.gather(sum_sqs).add_(d.pow(2).mean(dim=1))
    at.scatter(sum_sqs, s)
    at.scatter(weights, w.sub_(lr * d / (s.sqrt() + eps).unsqueeze(1)))


def adam_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, row_step: torch.Tensor, **kw: Any) -> None:
    """Lazy Adam on ``rows`` of one tensor (the discriminators of the adversarial loss use it)."""
    adam_rows_many([weight], [rows], [grad], [exp_avg], [exp_avg_sq], [row_step], **kw)


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
        one param group with the same row width and dtype share one run of the maths (see the ``*_many``
        kernels). What the caller may already have, saving its recomputation: ``buffer_rows``,
        ``cat(rows[k] + first_row[k])`` for params that are row blocks of one buffer (:mod:`recsys_transfer.flat`);
        ``current``, the rows' present values ``cat(params[k][rows[k]])`` (a tensor this call may overwrite;
        only used when all params form one batch). ``rows`` and ``mus`` may be lazy sequences
        (:class:`recsys_transfer.flat.Lazy`, :class:`~recsys_transfer.flat.Blocks`): an element is only asked for
        if the update cannot use ``buffer_rows`` (per-table rows) or the whole direction (per-table blocks)."""
        # batched by index: the elements of ``rows`` and ``mus`` are not looked at here
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
            self._update(group, list(params), _Rows(rows, known, current, caches), mus)
            return
        for group, ks in batches.values():
            self._update(group, [params[k] for k in ks], _Rows([rows[k] for k in ks], None, None, caches),
                         [mus[k] for k in ks])

    def _init_state(self, group: dict[str, Any], spec: dict[str, Any]) -> None:
        """Create the state of every parameter of ``group`` that has none (``spec``: key -> factory(param)), all
        at once and, per key, in one buffer (:func:`recsys_transfer.flat.share_storage`), so a later update of
        many tables gathers and scatters the state in one call."""
        fresh = [p for p in group["params"] if not self.state[p]]
        if not fresh:
            return
        for p in fresh:
            self.state[p].update({key: make(p) for key, make in spec.items()})
        for key in spec:
            share_storage([self.state[p][key] for p in fresh])

    @abc.abstractmethod
    def _update(self, group: dict[str, Any], params: list[torch.Tensor], rows: "_Rows",
                mus: list[torch.Tensor]) -> None:
        """One kernel call for parameters of one group with equal row shape and dtype."""

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

    def _update(self, g, params, rows, mus) -> None:
        bufs = None
        if g["momentum"] != 0:
            if any("momentum_buffer" not in self.state[p] for p in params):
                self._init_state(g, {"momentum_buffer": _zeros_like})
            bufs = [self.state[p]["momentum_buffer"] for p in params]
        sgd_rows_many([p.data for p in params], rows, mus, bufs, lr=g["lr"], momentum=g["momentum"],
                      nesterov=g["nesterov"], weight_decay=g["weight_decay"])


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

    def _update(self, g, params, rows, mus) -> None:
        if any(not self.state[p] for p in params):
            self._init_state(g, {"exp_avg": _zeros_like, "exp_avg_sq": _zeros_like,
                                 "row_step": lambda p: torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)})
        states = [self.state[p] for p in params]
        adam_rows_many([p.data for p in params], rows, mus, [st["exp_avg"] for st in states],
                       [st["exp_avg_sq"] for st in states], [st["row_step"] for st in states], lr=g["lr"],
                       beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"], weight_decay=g["weight_decay"])


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad (one accumulator per row), the fbgemm EXACT_ROWWISE_ADAGRAD update."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 names: Sequence[str] | None = None) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), names)

    def _update(self, g, params, rows, mus) -> None:
        if any(not self.state[p] for p in params):
            self._init_state(g, {"sum": lambda p: torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)})
        sums = [self.state[p]["sum"] for p in params]
        rowwise_adagrad_rows_many([p.data for p in params], rows, mus, sums, lr=g["lr"], eps=g["eps"],
                                  weight_decay=g["weight_decay"])


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

