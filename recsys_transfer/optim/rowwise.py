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
from typing import Any

import torch

__all__ = ["RowOptimizer", "RowSGD", "RowAdam", "RowAdagrad", "make_row_optimizer"]


# -- functional kernels ---------------------------------------------------------------------------------------
# The ``*_many`` kernels update several tables at once: ``weights[k]`` [R_k, D] (same D and dtype), ``rows[k]``
# int64 [U_k] (unique), ``grads[k]`` [U_k, D]. Touched rows (and their state) are gathered per table, the maths
# runs ONCE on the concatenation, and the results are written back per table: on CPU the per-op dispatch cost, not
# the arithmetic, dominates for ~1k rows, so 2 ops per tensor per table replace ~20 per table. The single-table
# kernels are the one-element case, so both give identical results.


def _gather(tensors: list[torch.Tensor], rows: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].index_select(0, rows[0])
    return torch.cat([t.index_select(0, r) for t, r in zip(tensors, rows)])


def _scatter(tensors: list[torch.Tensor], rows: list[torch.Tensor], values: torch.Tensor) -> None:
    if len(tensors) == 1:
        tensors[0].index_copy_(0, rows[0], values)
        return
    for t, r, v in zip(tensors, rows, values.split([len(r) for r in rows])):
        t.index_copy_(0, r, v)


def _cat(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.cat(values)


@torch.no_grad()
def sgd_rows_many(weights: list[torch.Tensor], rows: list[torch.Tensor], grads: list[torch.Tensor],
                  momentum_buffers: list[torch.Tensor] | None, *, lr: float, momentum: float, nesterov: bool,
                  weight_decay: float) -> None:
    w = _gather(weights, rows)
    grad = _cat(grads)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    if momentum != 0:
        assert momentum_buffers is not None
        buf = _gather(momentum_buffers, rows).mul_(momentum).add_(d)
        _scatter(momentum_buffers, rows, buf)
        d = d + momentum * buf if nesterov else buf
    _scatter(weights, rows, w.sub_(d, alpha=lr))


@torch.no_grad()
def adam_rows_many(weights: list[torch.Tensor], rows: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], row_steps: list[torch.Tensor], *,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    w = _gather(weights, rows)
    grad = _cat(grads)
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m = _gather(exp_avgs, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
    v = _gather(exp_avg_sqs, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = _gather(row_steps, rows).add_(1)
    _scatter(exp_avgs, rows, m)
    _scatter(exp_avg_sqs, rows, v)
    _scatter(row_steps, rows, t)
    tf = t.to(grad.dtype).unsqueeze(1)  # [U, 1]
    bc1 = 1 - torch.pow(torch.as_tensor(beta1, dtype=grad.dtype), tf)
    bc2 = 1 - torch.pow(torch.as_tensor(beta2, dtype=grad.dtype), tf)
    denom = (v / bc2).sqrt_().add_(eps)
    _scatter(weights, rows, w.sub_(lr * (m / bc1) / denom))


@torch.no_grad()
def rowwise_adagrad_rows_many(weights: list[torch.Tensor], rows: list[torch.Tensor], grads: list[torch.Tensor],
                              sum_sqs: list[torch.Tensor], *, lr: float, eps: float, weight_decay: float) -> None:
    w = _gather(weights, rows)
    grad = _cat(grads)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    s = _gather(sum_sqs, rows).add_(d.pow(2).mean(dim=1))
    _scatter(sum_sqs, rows, s)
    _scatter(weights, rows, w.sub_(lr * d / (s.sqrt() + eps).unsqueeze(1)))


def sgd_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
             **kw: Any) -> None:
    sgd_rows_many([weight], [rows], [grad], None if momentum_buffer is None else [momentum_buffer], **kw)


def adam_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, row_step: torch.Tensor, **kw: Any) -> None:
    adam_rows_many([weight], [rows], [grad], [exp_avg], [exp_avg_sq], [row_step], **kw)


def rowwise_adagrad_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, sum_sq: torch.Tensor,
                         **kw: Any) -> None:
    rowwise_adagrad_rows_many([weight], [rows], [grad], [sum_sq], **kw)


# -- optimizer classes ------------------------------------------------------------------------------------------


class RowOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class: ``update_rows(param, rows, mu)`` applies one update to ``rows`` of ``param``."""

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        """Apply one update with direction ``mu`` [U, D] to the unique ``rows`` [U] of ``param``."""
        self.update_rows_many([param], [rows], [mu])

    def update_rows_many(self, params: list[torch.Tensor], rows: list[torch.Tensor], mus: list[torch.Tensor]) -> None:
        """:meth:`update_rows` for several parameters at once (the same result as one call each); parameters of
        one param group with the same row width and dtype share one run of the maths (see the ``*_many``
        kernels)."""
        batches: dict[tuple, tuple[dict[str, Any], list, list, list]] = {}
        for p, r, mu in zip(params, rows, mus):
            group = self._group_of(p)
            key = (id(group), p.shape[1:], p.dtype, p.device)
            _, ps, rs, ms = batches.setdefault(key, (group, [], [], []))
            ps.append(p)
            rs.append(r)
            ms.append(mu)
        for group, ps, rs, ms in batches.values():
            self._update(group, ps, rs, ms)

    @abc.abstractmethod
    def _update(self, group: dict[str, Any], params: list[torch.Tensor], rows: list[torch.Tensor],
                mus: list[torch.Tensor]) -> None:
        """One kernel call for parameters of one group with equal row shape and dtype."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch.optim signature
        """No-op: rows are updated inside backward by the transfer plug-in (see module docstring)."""
        return closure() if closure is not None else None


class RowSGD(RowOptimizer):
    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov requires momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def _update(self, g, params, rows, mus) -> None:
        bufs = None
        if g["momentum"] != 0:
            bufs = []
            for param in params:
                st = self.state[param]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                bufs.append(st["momentum_buffer"])
        sgd_rows_many([p.data for p in params], rows, mus, bufs, lr=g["lr"], momentum=g["momentum"],
                      nesterov=g["nesterov"], weight_decay=g["weight_decay"])


class RowAdam(RowOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps <= 0:
            raise ValueError(f"invalid eps {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _update(self, g, params, rows, mus) -> None:
        states = []
        for param in params:
            st = self.state[param]
            if not st:
                st["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                st["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                st["row_step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
            states.append(st)
        adam_rows_many([p.data for p in params], rows, mus, [st["exp_avg"] for st in states],
                       [st["exp_avg_sq"] for st in states], [st["row_step"] for st in states], lr=g["lr"],
                       beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"], weight_decay=g["weight_decay"])


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad (one accumulator per row), the fbgemm EXACT_ROWWISE_ADAGRAD update."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def _update(self, g, params, rows, mus) -> None:
        sums = []
        for param in params:
            st = self.state[param]
            if not st:
                st["sum"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)
            sums.append(st["sum"])
        rowwise_adagrad_rows_many([p.data for p in params], rows, mus, sums, lr=g["lr"], eps=g["eps"],
                                  weight_decay=g["weight_decay"])


def make_row_optimizer(name: str, params, **kwargs: Any) -> RowOptimizer:
    """``sgd`` | ``momentum`` (SGD, momentum 0.9 unless given) | ``adam`` | ``rowwise_adagrad``."""
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

