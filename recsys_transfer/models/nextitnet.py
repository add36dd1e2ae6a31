"""NextItNet (Yuan et al., WSDM 2019) as PeterRec's causal pretraining network (PeterRec Sec. 3.2, Eq. 1, 3-4).

    p(x^u) = prod_i p(x_i | x_1 .. x_{i-1})                                  (Eq. 1)

Item embeddings ``E [B, L, C]`` of the user's sequence go through the causal dilated residual blocks
(:class:`recsys_transfer.modules.dilated_cnn.DilatedCNN`, Eq. 3-4); the hidden vector ``h_t`` at position t scores
the item at position t + 1. Output for the one retrieval task (``{task name: scores}``):

* training: ``[M, 1 + S]`` over the M positions t of the batch with a next item (every real position but each
  row's last): column 0 ``<h_t, e_{x_{t+1}}>``, then ``<h_t, e_s>`` for the batch's shared pool of S sampled
  negatives (feature ``negatives``), ``-inf`` where a negative equals the positive. The objective's sampled
  softmax (``candidates: sampled``, ``loss: softmax``) is then the cross entropy of Eq. 1 over the sampled
  candidates. The pool is uniform over items and shared by the batch (FACTS.md: the official code samples
  ``0.2 x items`` per step through TF's sampled softmax). A uniform pool needs no log-Q correction; a pool drawn by
  popularity (``sequence.sampler: popularity``) comes with the batch's ``log(S q)`` weights, which
  :func:`~recsys_transfer.models.sequence.sampled_scores` subtracts from every logit.
* evaluation: ``[B, V]``: ``<h_L, e_v>`` for every item v (all ids looked up as the ``negatives`` feature in the
  collection's one call, so a sharded table serves them) from the last position (the item after the whole
  sequence; the validation row's label is that held-out item), reserved ids 0 / 1 at the lowest finite score.

Departures: the output layer is TIED to the item table (the TF code has a separate ``softmax_w``; RecBole's port
ties it too), so the pool's rows and the positives' rows are looked up through the same collection call as the
input and the row pipeline updates them; padding is masked instead of embedded (modules/dilated_cnn.py); the
sequences are not cut to a fixed length here (the data keeps the last n).

``softmax="full"`` (the issue's option): the pool is every item ``2..V-1`` instead of the batch's sampled
negatives, looked up through the same collection call (so the row pipeline records every row: costly for large
V), and the training output is :class:`~recsys_transfer.types.FactoredScores` ``(query [M, C], the items' rows
[V - 2, C], positive = id - 2)``: the objective computes the full softmax over the items from them chunk by
chunk, never the ``[M, V - 2]`` logits (2x faster on CPU than materializing them, and the memory of a chunk, not
of the whole matrix). Training with ``softmax="sampled"`` and no ``negatives`` feature is refused.

Which softmax (measured, ML-1M-partial: 3,527 items, 5,179 train / 576 validation users, embedding 64,
5 x [1, 4] blocks, batch 256, torch Adam 1e-3 on every parameter, one seed): the uniform pool is what separates our
pretraining from RecBole's NextItNet, not the network. With the full softmax this network (our blocks, truncated
normal 0.02 init, masked padding, tied output, LayerNorm eps 1e-8) follows RecBole's curve (validation cross
entropy over every item, all positions, epochs 5-8: 7.15 / 7.00 / 6.88 / 6.75 vs RecBole's 7.12 / 7.03 / 6.90 /
6.82; all-position MRR@5 0.012 / 0.015 / 0.017 / 0.022 vs 0.012 / 0.013 / 0.016 / 0.020); with 705 uniform
negatives (0.2 x items) the same network reaches 7.49 and 0.005 after 8 epochs (benchmarks/
nextitnet_softmax_ablation.py, results/nextitnet_softmax_ablation.md). A likely reading, not measured: a uniform
pool is mostly rare items, which the positive soon beats, so the ranking among popular items (what decides MRR@5
on the whole pool) gets little gradient. (3,527 uniform draws WITH replacement are not the full softmax: ~37% of
the items are missing from each pool.) So prefer ``softmax="full"`` wherever the whole table fits a step (ML-1M;
pipelines/peterrec-pretrain.yaml does); the sampled pool is for large vocabularies, and stays the default (the
paper's reading). The real model with ``softmax="full"`` on sequence_throughput.py's setting, 10 epochs, the
trainer's step: validation MRR@5 0.0280 vs RecBole's 0.0277 (paired 95% CI of the difference -0.0098, +0.0115) at
1.51x RecBole's sequences/s (528 vs 350, one thread; benchmarks/results/sequence_throughput_ml1m_full.md), from the
2-D convolution path of the blocks (modules/dilated_cnn.py) and the chunked full softmax (FactoredScores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.sequence import (FIRST_ITEM, ITEMS, NEGATIVES, TARGETS, SequenceBackbone,
                                             batch_log_q, sampled_scores)
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch, FactoredScores


def retrieval_task(tasks: tuple[TaskSpec, ...], model: str) -> TaskSpec:
    """The one retrieval task a pretraining network predicts."""
    if len(tasks) != 1 or tasks[0].kind != "retrieval":
        raise UserError(f"{model} predicts the next/masked item: it takes exactly one retrieval task, got "
                        f"{[(t.name, t.kind) for t in tasks]}")
    return tasks[0]


class NextItNet(SequenceBackbone):
    causal = True

    def __init__(self, meta: DatasetMeta, embedding_dim: int = 64, dilations: Sequence[int] = (1, 4) * 4,
                 kernel: int = 3, softmax: str = "sampled", tasks: tuple[TaskSpec, ...] | None = None) -> None:
        name = type(self).__name__
        if softmax not in ("sampled", "full"):
            raise UserError(f"{name}: softmax must be 'sampled' or 'full', got {softmax!r}")
        super().__init__(meta, name, embedding_dim, dilations, kernel, self.causal, [ITEMS, NEGATIVES, TARGETS])
        self.task = retrieval_task(tuple(tasks or meta.tasks), name)
        self.softmax = softmax
        if softmax == "full" and NEGATIVES not in self.fields:
            raise UserError(f"{name}: softmax 'full' looks the item pool up as the feature {NEGATIVES!r}, which the "
                            "dataset's meta does not list (the sequence datasets do)")

    def predicted(self, kjt, rows, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, h: torch.Tensor):
        """``(query [M, C], positive rows [M, C], positive ids [M])`` of the training positions: position t
        predicts the item at t + 1 (left padding: t real => t + 1 real; the row's last item predicts nothing)."""
        valid = mask[:, :-1, 0].bool()  # [B, L - 1]
        return h[:, :-1][valid], x[:, 1:][valid], ids[:, 1:][valid]

    def eval_hidden(self, x: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: the hidden vector that scores the item after the sequence."""
        return self.cnn(x, mask)[:, -1]  # left padding: position L - 1 is every row's last item

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.training:  # full scores over every item: the pool is the whole table
            kjt, rows, table = self.item_rows(batch.sparse)
            x, _, mask = self.embed_items(kjt, rows)  # [B, L, C], [B, L, 1]
            return {self.task.name: self.full_scores(self.eval_hidden(x, mask, table), table)}  # [B, V]
        pool = None
        if self.softmax == "full":  # the pool: every item
            pool = torch.arange(FIRST_ITEM, self.num_items, device=batch.sparse.values().device)
        kjt, rows = self.lookup(batch.sparse, pool)  # the collection's one call
        x, ids, mask = self.embed_items(kjt, rows)  # [B, L, C], [B, L], [B, L, 1]
        if NEGATIVES not in self.fields or rows[NEGATIVES].values().shape[0] == 0:  # a shape, no sync
            raise UserError(f"{type(self).__name__} trains on the batch's sampled negatives (feature {NEGATIVES!r}), "
                            "and this batch has none: set sequence.negatives > 0 (or softmax: full)")
        h = self.cnn(x, mask)  # [B, L, C]
        query, positive, positive_ids = self.predicted(kjt, rows, x, ids, mask, h)  # [M, C], [M, C], [M]
        if pool is None:
            scores = sampled_scores(query, positive, positive_ids, rows[NEGATIVES].values(), kjt[NEGATIVES].values(),
                                    batch_log_q(batch.sparse, self.num_items))
        else:
            scores = FactoredScores(query, rows[NEGATIVES].values(), positive_ids - FIRST_ITEM)  # pool = ids 2..V-1
        return {self.task.name: scores}  # [M, 1 + S], or the factored [M, V - 2] of the full softmax
