"""Row-wise (sparse) optimizers for embedding tables, driven from inside backward.

They follow the ``torch.optim`` contract — hyper-parameters validated in ``__init__`` and read from
``param_groups`` at every update (so LR schedulers work), state created lazily per parameter, maths in functional
kernels, ``state_dict`` / ``load_state_dict`` round-trip — with one difference: the update is not applied by
``step()`` (a no-op, like TorchRec's fused optimizers) but by :meth:`RowOptimizer.update_rows`, which the
transfer plug-in's backward hook calls with the touched rows of one table and their update direction ``mu``
(for the barrier, ``mu_i`` of Algorithm 1). Only those rows of the weight and of the state are read or written;
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


# -- functional kernels (rows: int64 [U], unique; grad: [U, D]) -----------------------------------------------


@torch.no_grad()
def sgd_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
             *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> None:
    w = weight.index_select(0, rows)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    if momentum != 0:
        assert momentum_buffer is not None
        buf = momentum_buffer.index_select(0, rows).mul_(momentum).add_(d)
        momentum_buffer.index_copy_(0, rows, buf)
        d = d + momentum * buf if nesterov else buf
    weight.index_copy_(0, rows, w.sub_(d, alpha=lr))


@torch.no_grad()
def adam_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, row_step: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float) -> None:
    w = weight.index_select(0, rows)
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m = exp_avg.index_select(0, rows).mul_(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = row_step.index_select(0, rows).add_(1)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    row_step.index_copy_(0, rows, t)
    tf = t.to(grad.dtype).unsqueeze(1)  # [U, 1]
    bc1 = 1 - torch.pow(torch.as_tensor(beta1, dtype=grad.dtype), tf)
    bc2 = 1 - torch.pow(torch.as_tensor(beta2, dtype=grad.dtype), tf)
    denom = (v / bc2).sqrt_().add_(eps)
    weight.index_copy_(0, rows, w.sub_(lr * (m / bc1) / denom))


@torch.no_grad()
def rowwise_adagrad_rows(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, sum_sq: torch.Tensor, *,
                         lr: float, eps: float, weight_decay: float) -> None:
    w = weight.index_select(0, rows)
    d = grad if weight_decay == 0 else grad + weight_decay * w
    s = sum_sq.index_select(0, rows).add_(d.pow(2).mean(dim=1))
    sum_sq.index_copy_(0, rows, s)
    weight.index_copy_(0, rows, w.sub_(lr * d / (s.sqrt() + eps).unsqueeze(1)))


# -- optimizer classes ------------------------------------------------------------------------------------------


class RowOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base class: ``update_rows(param, rows, mu)`` applies one update to ``rows`` of ``param``."""

    def _group_of(self, param: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    @abc.abstractmethod
    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        """Apply one update with direction ``mu`` [U, D] to the unique ``rows`` [U] of ``param``."""

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

    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        g = self._group_of(param)
        buf = None
        if g["momentum"] != 0:
            st = self.state[param]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            buf = st["momentum_buffer"]
        sgd_rows(param.data, rows, mu, buf, lr=g["lr"], momentum=g["momentum"], nesterov=g["nesterov"],
                 weight_decay=g["weight_decay"])


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

    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        g = self._group_of(param)
        st = self.state[param]
        if not st:
            st["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            st["row_step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
        adam_rows(param.data, rows, mu, st["exp_avg"], st["exp_avg_sq"], st["row_step"], lr=g["lr"],
                  beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"], weight_decay=g["weight_decay"])


class RowAdagrad(RowOptimizer):
    """Row-wise Adagrad (one accumulator per row), the fbgemm EXACT_ROWWISE_ADAGRAD update."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor) -> None:
        g = self._group_of(param)
        st = self.state[param]
        if not st:
            st["sum"] = torch.zeros(param.shape[0], dtype=param.dtype, device=param.device)
        rowwise_adagrad_rows(param.data, rows, mu, st["sum"], lr=g["lr"], eps=g["eps"], weight_decay=g["weight_decay"])


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

