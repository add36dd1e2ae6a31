"""GRec-style masked non-causal pretraining network (Yuan et al., WWW 2020), PeterRec's alternative pretraining
objective (PeterRec Sec. 3.2, Eq. 2-4).

    p(x_Delta^u) = prod_i p(x_{Delta_i} | x~^u)                                (Eq. 2)

``x~^u`` is the sequence with the masked positions replaced (the data's ``SequenceSampling``, ``mask_rate`` 0.3:
80% the token id 1, 10% a random item, 10% unchanged); the feature ``targets`` holds the original item at each
chosen position and 0 elsewhere. The non-causal dilated blocks (``phi`` of Eq. 4: symmetric padding) see both
sides; the hidden vector at a chosen position scores its original item. Outputs as
:class:`~recsys_transfer.models.nextitnet.NextItNet`'s:

* training: ``[M, 1 + S]`` over the M chosen positions of the batch (``targets != 0``): column 0 the original
  item, then the shared negative pool, accidental hits at ``-inf``;
* evaluation: ``[B, V]``: the token id 1 is appended to every row and its hidden vector scores every item (the
  item after the sequence, predicted as a masked position), reserved ids at the lowest finite score.

Departures: GRec's encoder-decoder (its projector network) is not built -- PeterRec pretrains the masked objective
"by directly adding a softmax layer on the encoder of GRec", which is what this is; tied output layer, masked
padding and the full-softmax option as NextItNet's. The evaluation's appended token is row 1 of the evaluation's
all-items lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.nextitnet import NextItNet
from recsys_transfer.models.sequence import ITEMS, PAD_ID, TARGETS, TOKEN_ID
from recsys_transfer.modules.dilated_cnn import left_padded
from recsys_transfer.tasks import TaskSpec


class GRec(NextItNet):
    causal = False

    def __init__(self, meta: DatasetMeta, embedding_dim: int = 64, dilations: Sequence[int] = (1, 4) * 4,
                 kernel: int = 3, softmax: str = "sampled", tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__(meta, embedding_dim, dilations, kernel, softmax, tasks)
        if TARGETS not in meta.sparse_names:
            raise UserError(f"GRec predicts masked items: the dataset needs the list field {TARGETS!r} "
                            "(vocab_of: items), written by sequence.mask_rate > 0")

    def predicted(self, kjt, rows, x, ids, mask, h):
        """The chosen positions (``targets != 0``; ``targets`` has the lengths of ``items``): their hidden vectors,
        original items' rows and ids."""
        lengths = kjt[ITEMS].lengths()
        target_rows = left_padded(rows[TARGETS].values(), lengths, x.shape[1])  # [B, L, C]
        target_ids = left_padded(kjt[TARGETS].values(), lengths, x.shape[1])  # [B, L]
        chosen = target_ids != PAD_ID  # [B, L]
        query = h[chosen]  # [M, C]
        if query.shape[0] == 0:
            raise UserError("GRec: no masked position in this batch (every target is 0): set sequence.mask_rate > 0")
        return query, target_rows[chosen], target_ids[chosen]

    def eval_hidden(self, x: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        token = table[TOKEN_ID].expand(x.shape[0], 1, -1)  # [B, 1, C]
        x = torch.cat([x, token], dim=1)  # [B, L + 1, C]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1, 1)], dim=1)  # [B, L + 1, 1]
        return self.cnn(x, mask)[:, -1]  # [B, C]

