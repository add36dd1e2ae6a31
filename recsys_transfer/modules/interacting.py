"""Multi-head self-attentive interacting layer of AutoInt (Song et al., CIKM 2019, Sec. 4.3, Eq. 5-8).

For a field ``m`` with input vector ``e_m`` (dim ``d``) and head ``h`` (``H`` heads, each ``d'`` wide)::

    psi_h(e_m, e_k)  = <W_Q^h e_m, W_K^h e_k>                               (Eq. 6)
    alpha_h[m, k]    = softmax_k psi_h(e_m, e_k)                            (Eq. 5)
    e~_m^h           = sum_k alpha_h[m, k] W_V^h e_k                        (Eq. 5)
    e~_m             = e~_m^1 ⊕ ... ⊕ e~_m^H              (dim H*d')         (Eq. 7)
    e_m^Res          = ReLU(e~_m + W_Res e_m)                               (Eq. 8)

``W_Q^h, W_K^h, W_V^h`` are ``d' x d`` and ``W_Res`` is ``(H d') x d``, all without bias, as in the paper. Shapes:
``[B, F, d] -> [B, F, H * d']`` (``B`` batch, ``F`` fields).

Choices (documented departures / options):

* Scaling. Eq. 6 is the plain inner product, with no ``1/sqrt(d')``; that is the default (``scaled=False``).
  ``scaled=True`` divides by ``sqrt(d')`` like the authors' TensorFlow release and ``nn.MultiheadAttention`` (which
  the learnable-embed-sizes code used by the harmless-transfer paper builds on). The kernel is
  :func:`torch.nn.functional.scaled_dot_product_attention` with an explicit ``scale`` (``1.0`` or
  ``1/sqrt(d')``), so it computes exactly Eq. 5-7; ``tests/test_models.py`` checks it against an explicit loop.
* Dropout ``p`` (not in the paper's equations) drops attention weights ``alpha`` in training, as the attention
  dropout (``att_dropout``) of ``nn.MultiheadAttention`` in the learnable-embed-sizes code does.
* ``residual=False`` drops the ``W_Res e_m`` term of Eq. 8 but keeps the ReLU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InteractingLayer(nn.Module):
    """One AutoInt interacting layer: ``[B, F, in_dim] -> [B, F, heads * att_dim]`` (see module docstring).

    ``att_dim`` is the per-head width ``d'``; the output width is ``heads * att_dim`` (:attr:`out_dim`).
    """

    def __init__(self, in_dim: int, heads: int = 2, att_dim: int = 32, residual: bool = True,
                 dropout: float = 0.0, scaled: bool = False) -> None:
        super().__init__()
        if in_dim < 1 or heads < 1 or att_dim < 1:
            raise ValueError(f"in_dim, heads and att_dim must be >= 1, got {in_dim}, {heads}, {att_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.heads = heads
        self.att_dim = att_dim
        self.out_dim = heads * att_dim
        self.dropout = dropout
        self.scale = 1.0 / math.sqrt(att_dim) if scaled else 1.0
        # All heads in one matrix: rows [h*d', (h+1)*d') are W^h of the paper.
        self.w_query = nn.Linear(in_dim, self.out_dim, bias=False)
        self.w_key = nn.Linear(in_dim, self.out_dim, bias=False)
        self.w_value = nn.Linear(in_dim, self.out_dim, bias=False)
        self.w_res = nn.Linear(in_dim, self.out_dim, bias=False) if residual else None

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        B, num_fields, _ = e.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, num_fields, self.heads, self.att_dim).transpose(1, 2)  # [B, H, F, d']

        q, k, v = split_heads(self.w_query(e)), split_heads(self.w_key(e)), split_heads(self.w_value(e))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)  # [B, H, F, d']
        out = out.transpose(1, 2).reshape(B, num_fields, self.out_dim)  # [B, F, H*d'] (heads concatenated, Eq. 7)
        if self.w_res is not None:
            out = out + self.w_res(e)
        return torch.relu(out)
