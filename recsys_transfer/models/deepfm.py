"""DeepFM (Guo et al., IJCAI 2017) over TorchRec tables.

    logit = b + FM_first(x) + FM_second(v) + DNN([v_1; ...; v_F; dense])

The FM component and the deep component share the field embeddings ``v_f = E_f[x_f]`` (Sec. 2.1 of the paper:
"the FM component and the deep component share the same feature embedding"). Dense features enter the
first-order term linearly and the DNN input as raw values (FuxiCTR/DeepCTR feed numeric fields the same way to
the DNN). Departure for TorchRec: first-order weights live in 4-wide tables (see
:data:`recsys_transfer.modules.fm.FIRST_ORDER_WIDTH`). Output: raw logits ``{task: [B]}`` (``[B, C]`` for a
multiclass task). With several tasks (an extension; the paper has one), the FM part is shared and each task has its
own bias and its own output units of the DNN's last layer: ``logit_k = b_k + FM(x) + DNN_k(...)``.

List fields (an extension): ``v_f`` is the field's bag of rows pooled by ``pooling`` (``{field: 'sum' | 'mean'}``,
default sum; an empty list gives ``v_f = 0``), and ``FM_first`` adds the bag's pooled first-order weights; a field
sharing another's vocabulary (a history of items) reads that field's table, a feature of its own in ``v``.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.modules.embedding import make_ebc, output_keys, values_in_order
from recsys_transfer.modules.fm import FirstOrder, fm_second_order
from recsys_transfer.modules.heads import TaskColumns
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


class DeepFM(nn.Module):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, hidden: tuple[int, ...] = (100, 100),
                 dropout: float = 0.0, batch_norm: bool = False, init_std: float = 1e-2,
                 pooling: dict[str, str] | None = None, tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__()
        self.dataset_id = meta.dataset_id
        self.columns = TaskColumns(tuple(tasks or meta.tasks), "deepfm")
        self.num_fields = len(meta.sparse_names)
        self.embedding = make_ebc(meta, embedding_dim, pooling=pooling)
        self._keys = output_keys(self.embedding)  # its column order (sharded: values_in_order)
        self.linear = FirstOrder(meta, pooling)
        self.dnn = MLP(self.num_fields * embedding_dim + len(meta.dense), hidden, self.columns.width, dropout,
                       batch_norm)
        self.bias = nn.Parameter(torch.zeros(self.columns.width))
        for p in self.embedding.parameters():
            nn.init.normal_(p, std=init_std)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        B = batch.batch_size
        flat = values_in_order(self.embedding(batch.sparse), self._keys)  # [B, F * k]
        v = flat.view(B, self.num_fields, -1)  # [B, F, k]
        deep = self.dnn(torch.cat([flat, batch.dense], dim=1))  # [B, W]
        first = self.linear(batch.sparse, batch.dense).unsqueeze(1)  # [B, 1]
        logits = self.bias + first + fm_second_order(v).unsqueeze(1) + deep  # [B, W]
        return self.columns.split(logits)
