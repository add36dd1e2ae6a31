"""AutoInt (Song et al., CIKM 2019) over TorchRec tables.

    e_f      = E_f[x_f]                        sparse field f                      (Eq. 2, one-hot case)
    e_d      = x_d * v_d                       dense field d, learnable v_d        (Eq. 4)
    e^(l)    = InteractingLayer_l(e^(l-1))     l = 1..L, e^(0) = [e_1; ...; e_M]   (Eq. 5-8)
    logit    = w^T (e_1^(L) ⊕ ... ⊕ e_M^(L)) + b                                    (Eq. 9, before the sigmoid)
             [+ FM_first(x)]     if first_order
             [+ DNN(e^(0) flat)] if hidden (AutoInt+, Sec. 5.5 of the paper)

Defaults follow the harmless-transfer paper's Sec. 5.3 setting as run by the learnable-embed-sizes code it builds on
(L = 3 layers, H = 2 heads, 64 attention units per field = 2 heads x ``att_dim`` 32, residual connections); the
0.4 attention dropout of that setting is a config value, the default here is 0.

Departures and options:

* ``att_dim`` is the per-head width ``d'`` of the paper; the layer output is ``heads * att_dim`` per field.
* Each layer has its own residual ``W_Res`` (Eq. 8, the paper). The learnable-embed-sizes code instead projects the
  embeddings to the attention width once, stacks ``nn.MultiheadAttention`` layers and adds one residual after the
  last; we follow the paper.
* Attention scores are the plain inner product of Eq. 6 by default (``scaled=False``); ``scaled=True`` divides by
  ``sqrt(d')`` as ``nn.MultiheadAttention`` does (see :mod:`recsys_transfer.modules.interacting`).
* ``first_order=True`` adds the FM first-order term (FirstOrder, 4-wide TorchRec tables, see
  :data:`recsys_transfer.modules.fm.FIRST_ORDER_WIDTH`). Neither the paper (Eq. 9) nor the learnable-embed-sizes
  AutoInt uses it (its ``forward`` never calls the linear part), so the default is ``False``.
* List fields (an extension): ``e_f`` is the field's bag pooled by ``pooling`` (``{field: 'sum' | 'mean'}``,
  default sum), one attention field per feature; a field sharing another's vocabulary reads that field's table.
* ``hidden`` non-empty adds a DNN on the flattened input embeddings (AutoInt+; the learnable-embed-sizes run uses
  ``full_part=True`` with an MLP of 100-100); default ``()`` is plain AutoInt.

Output: raw logits ``{task: [B]}`` (``[B, C]`` for a multiclass task); no sigmoid or loss here. With several tasks
(an extension), the interacting layers are shared and the output layer (and the DNN's, for AutoInt+) has units per
task.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.modules.embedding import make_ebc, output_keys, values_in_order
from recsys_transfer.modules.fm import FirstOrder
from recsys_transfer.modules.heads import TaskColumns
from recsys_transfer.modules.interacting import InteractingLayer
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class AutoInt(nn.Module):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, num_layers: int = 3, heads: int = 2,
                 att_dim: int = 32, residual: bool = True, dropout: float = 0.0, scaled: bool = False,
                 first_order: bool = False, hidden: tuple[int, ...] = (), dnn_dropout: float = 0.0,
                 batch_norm: bool = False, init_std: float = 1e-2, pooling: dict[str, str] | None = None,
                 tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__()
        if embedding_dim < 1 or num_layers < 1 or heads < 1 or att_dim < 1:
            raise UserError(f"autoint: embedding_dim, num_layers, heads, att_dim must be >= 1, got "
                            f"{embedding_dim}, {num_layers}, {heads}, {att_dim}")
        if not 0.0 <= dropout < 1.0 or not 0.0 <= dnn_dropout < 1.0:
            raise UserError(f"autoint: dropout and dnn_dropout must be in [0, 1), got {dropout}, {dnn_dropout}")
        self.dataset_id = meta.dataset_id
        self.columns = TaskColumns(tuple(tasks or meta.tasks), "autoint")
        self.num_sparse = len(meta.sparse_names)
        self.num_fields = self.num_sparse + len(meta.dense)
        self.embedding = make_ebc(meta, embedding_dim, pooling=pooling)
        self._keys = output_keys(self.embedding)  # its column order (sharded: values_in_order)
        # One learnable vector v_d per dense field (Eq. 4); None when the dataset has no dense fields.
        self.dense_embedding = nn.Parameter(torch.empty(len(meta.dense), embedding_dim)) if meta.dense else None
        dims = [embedding_dim] + [heads * att_dim] * num_layers
        self.layers = nn.ModuleList(
            InteractingLayer(dims[i], heads, att_dim, residual, dropout, scaled) for i in range(num_layers))
        self.out = nn.Linear(self.num_fields * heads * att_dim, self.columns.width)
        self.linear = FirstOrder(meta, pooling) if first_order else None
        self.dnn = MLP(self.num_fields * embedding_dim, hidden, self.columns.width, dnn_dropout, batch_norm) if hidden else None
        for p in self.embedding.parameters():
            nn.init.normal_(p, std=init_std)
        if self.dense_embedding is not None:
            nn.init.normal_(self.dense_embedding, std=init_std)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        B = batch.batch_size
        e = values_in_order(self.embedding(batch.sparse), self._keys).view(B, self.num_sparse, -1)  # [B, F_sparse, k]
        if self.dense_embedding is not None:
            e_dense = batch.dense.unsqueeze(2) * self.dense_embedding  # [B, D, 1] * [D, k] -> [B, D, k]
            e = torch.cat([e, e_dense], dim=1)  # [B, F, k], F = F_sparse + D
        h = e
        for layer in self.layers:
            h = layer(h)  # [B, F, H*d']
        logits = self.out(h.flatten(1))  # [B, F*H*d'] -> [B, W]
        if self.linear is not None:
            logits = logits + self.linear(batch.sparse, batch.dense).unsqueeze(1)
        if self.dnn is not None:
            logits = logits + self.dnn(e.flatten(1))  # [B, F*k] -> [B, W]
        return self.columns.split(logits)
