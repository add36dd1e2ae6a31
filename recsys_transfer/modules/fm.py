"""Factorization-machine blocks shared by FM and DeepFM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.modules.embedding import lookup_column, make_ebc

#: fbgemm's fused TBE (the kernel DistributedModelParallel uses for model-parallel tables) needs widths divisible
#: by 4, so first-order weights live in 4-wide tables of which only column 0 is read (and, on the grouped lookup,
#: only column 0 is gathered: :func:`~recsys_transfer.modules.embedding.lookup_column`); columns 1-3 receive zero
#: gradient and never move from their zero init.
FIRST_ORDER_WIDTH = 4


def _second_order(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Eq. 5's value ``[B]``, ``s = sum_f v_f`` ``[B, k]``)."""
    s = v.sum(dim=1)
    flat = v.flatten(1)
    return 0.5 * ((s * s).sum(dim=1) - torch.linalg.vecdot(flat, flat)), s


class _SecondOrder(torch.autograd.Function):
    """Rendle 2010, Eq. 5, with its closed-form gradient ``d y / d v_fk = sum_j v_jk - v_fk`` (Sec. III-A, all
    x = 1): the backward is ONE pass over ``v`` (autograd through the pow/sum/sub graph makes ~5, and on CPU that
    was 2.2 of 0.6 ms for DeepFM's [1024, 39, 16] per step)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        y, s = _second_order(v)
        ctx.save_for_backward(v, s)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        v, s = ctx.saved_tensors
        return (s.unsqueeze(1) - v).mul_(grad.view(-1, 1, 1))


def fm_second_order(v: torch.Tensor) -> torch.Tensor:
    """``1/2 * sum_k [(sum_f v_fk)^2 - sum_f v_fk^2]`` for ``v: [B, F, k]`` -> ``[B]`` (Rendle 2010, Eq. 5).

    Differentiable once (the closed-form backward of :class:`_SecondOrder`)."""
    if v.requires_grad and torch.is_grad_enabled():
        return _SecondOrder.apply(v)
    return _second_order(v)[0]


class FirstOrder(nn.Module):
    """``sum_f w_f[x_f] + <w_d, dense>`` -> ``[B]``, with one (4-wide, column 0 used) table per vocabulary (a
    field sharing another's vocabulary shares its weights; a list field's term is its bag pooled by ``pooling``,
    :func:`~recsys_transfer.modules.embedding.make_ebc`), over ``fields`` (default every sparse field)."""

    def __init__(self, meta: DatasetMeta, pooling: dict[str, str] | None = None,
                 fields: Sequence[str] | None = None) -> None:
        super().__init__()
        self.tables = make_ebc(meta, FIRST_ORDER_WIDTH, pooling=pooling, fields=fields)
        for p in self.tables.parameters():
            nn.init.zeros_(p)
        self.dense = nn.Linear(len(meta.dense), 1, bias=False) if meta.dense else None

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        out = lookup_column(self.tables, sparse, 0).sum(dim=1)  # [B, F] -> [B]
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(1)
        return out
