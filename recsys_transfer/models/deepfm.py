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

``fields``: the sparse fields that are features (default every sparse field of ``meta``; F = their number). A field
that a task's evaluation ranks against (``eval_negatives``) is refused as a feature: the model would see the
held-out negatives.

Candidate scoring (one retrieval task with ``candidates: full``, alone: sampled candidates or other tasks next to it
are refused; e.g. PeterRec's cold-user task,
:mod:`recsys_transfer.data.sequences`): the candidate item ``y`` (a class id in ``0..|Y|-1``, |Y| from
``label_vocab`` or ``meta.source["num_target_classes"]``) is one more FM field with its own k-wide embedding ``v_y``
and first-order weight ``w_y``, and every row is scored against every candidate with the paper's DeepFM on the
fields {the row's fields, y}:

    logit(u, y) = b + FM_first(x_u) + w_y + FM_second(v_1..v_F) + <sum_f v_f, v_y> + DNN([v_1; ...; v_F; dense; v_y])

computed for all candidates at once: Rendle's second-order term over F + 1 fields is the row's own plus the
candidate's pairs with every field, ``<sum_f v_f, v_y>``; the DNN's first Linear ``W [H, F k + d + k]`` is split
into its user block and its candidate block, so its output is ``[B, 1, H] + [1, |Y|, H]`` by broadcasting, and the
rest of the DNN runs on ``[B |Y|, H]``. Output ``{task: [B, |Y|]}``, the scores the objective (BPR or softmax
over the full vocabulary) and the evaluation (full and ``sampled_`` ranking metrics) read. This is the DeepFM
baseline of PeterRec (Yuan et al., SIGIR 2020) Sec. 4, RQ3 and Table 5 ("the interacted items in S are treated as
features"): the user's source-domain items are one list field (``fields: [items]``), pooled by ``pooling``
(``mean`` recommended for histories: a sum grows with the history's length), where the paper does not say how its
DeepFM encodes a variable-length set of items -- a departure to state. Departures of candidate mode: ``v_y`` and
``w_y`` are plain dense parameters (``[|Y|, k]``, ``[|Y|]``), updated by the dense optimizer, not a TorchRec table
under the row pipeline (full scoring touches every row each step anyway); ``batch_norm`` is refused (BatchNorm's
statistics over the ``B |Y|`` pairs of a batch, every candidate of every row, are not those of the paper's per-pair
model trained on its batches of sampled pairs); memory and time grow as ``B |Y| H`` (keep
``train.eval_batch_size`` modest: ``pipelines/peterrec-cold-deepfm.yaml``). Dropout draws one mask per (row,
candidate), as the per-pair model would.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.modules.embedding import make_ebc, output_keys, values_in_order
from recsys_transfer.modules.fm import FirstOrder, fm_second_order
from recsys_transfer.modules.heads import TaskColumns, full_candidates
from recsys_transfer.modules.mlp import MLP
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch


def feature_fields(meta: DatasetMeta, fields: Sequence[str] | None, tasks: Sequence[TaskSpec],
                   model: str) -> list[str]:
    """The sparse fields a model reads as features: ``fields`` (default every sparse field), checked -- known,
    distinct, non-empty, and none of them a task's ``eval_negatives`` (:class:`UserError`, one line)."""
    chosen = list(meta.sparse_names if fields is None else fields)
    unknown = [f for f in chosen if f not in meta.sparse_names]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise UserError(f"{model}: fields must be distinct sparse fields of the dataset {list(meta.sparse_names)}, "
                        f"got {chosen}" + (f" (unknown: {unknown})" if unknown else ""))
    leaks = [(t.name, t.eval_negatives) for t in tasks if t.eval_negatives and t.eval_negatives in chosen]
    if leaks:
        name, field = leaks[0]
        raise UserError(f"{model}: field {field!r} holds the held-out negatives that evaluation ranks task {name!r} "
                        f"against; as a feature it would leak them into the model: set model.params.fields without "
                        f"it (e.g. {[f for f in chosen if f != field][:1] or ['items']})")
    return chosen


class DeepFM(nn.Module):
    def __init__(self, meta: DatasetMeta, embedding_dim: int = 16, hidden: tuple[int, ...] = (100, 100),
                 dropout: float = 0.0, batch_norm: bool = False, init_std: float = 1e-2,
                 pooling: dict[str, str] | None = None, fields: Sequence[str] | None = None,
                 label_vocab: dict[str, int] | None = None, tasks: tuple[TaskSpec, ...] | None = None) -> None:
        super().__init__()
        self.dataset_id = meta.dataset_id
        tasks = tuple(tasks or meta.tasks)
        names = feature_fields(meta, fields, tasks, "deepfm")
        self.task: TaskSpec | None = None  # the retrieval task of candidate mode
        num_candidates = 0
        if any(t.kind == "retrieval" for t in tasks):
            if len(tasks) != 1:
                raise UserError(f"deepfm scores the candidates of one retrieval task, alone; got tasks "
                                f"{[(t.name, t.kind) for t in tasks]}")
            self.task = tasks[0]
            if self.task.candidates != "full":
                raise UserError(f"deepfm has no output for the retrieval task {self.task.name!r} with candidates: "
                                "sampled; it scores every item of a task's label vocabulary (candidates: full)")
            num_candidates = full_candidates(self.task, meta, label_vocab, "deepfm")
            if self.task.eval_candidates != "full":
                raise UserError(f"deepfm: retrieval task {self.task.name!r} is scored on its full label vocabulary; "
                                "eval_candidates: sampled does not apply")
            if batch_norm:
                raise UserError("deepfm: batch_norm is refused when scoring candidates: its statistics over every "
                                "(row, candidate) pair of a batch are not the per-pair model's")
            self.columns = None
            width = 1
        else:
            if label_vocab:
                raise UserError("deepfm: label_vocab is for a retrieval task (candidate scoring); the tasks are "
                                f"{[(t.name, t.kind) for t in tasks]}")
            self.columns = TaskColumns(tasks, "deepfm")
            width = self.columns.width
        fields = None if fields is None else names  # None: every field, as the collections' own default
        self.num_fields = len(names)
        self.embedding = make_ebc(meta, embedding_dim, pooling=pooling, fields=fields)
        self._keys = output_keys(self.embedding)  # its column order (sharded: values_in_order)
        self.linear = FirstOrder(meta, pooling, fields)
        user_width = self.num_fields * embedding_dim + len(meta.dense)
        self.dnn = MLP(user_width + (embedding_dim if self.task else 0), hidden, width, dropout, batch_norm)
        self.bias = nn.Parameter(torch.zeros(width))
        for p in self.embedding.parameters():
            nn.init.normal_(p, std=init_std)
        if self.task is not None:  # the candidate field: v_y [|Y|, k] and w_y [|Y|], dense parameters
            self.candidate_embedding = nn.Parameter(torch.empty(num_candidates, embedding_dim))
            nn.init.normal_(self.candidate_embedding, std=init_std)
            self.candidate_weight = nn.Parameter(torch.zeros(num_candidates))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        B = batch.batch_size
        flat = values_in_order(self.embedding(batch.sparse), self._keys)  # [B, F * k]
        v = flat.view(B, self.num_fields, -1)  # [B, F, k]
        if self.task is not None:
            return {self.task.name: self._candidate_scores(flat, v, batch)}
        deep = self.dnn(torch.cat([flat, batch.dense], dim=1))  # [B, W]
        first = self.linear(batch.sparse, batch.dense).unsqueeze(1)  # [B, 1]
        logits = self.bias + first + fm_second_order(v).unsqueeze(1) + deep  # [B, W]
        return self.columns.split(logits)

    def _candidate_scores(self, flat: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[B, |Y|]``: every row's DeepFM logit with each candidate as field F + 1 (module docstring)."""
        B, Y = flat.shape[0], self.candidate_embedding.shape[0]
        vy = self.candidate_embedding  # [Y, k]
        user = torch.cat([flat, batch.dense], dim=1)  # [B, F k + d]
        n = user.shape[1]
        first_layer = self.dnn[0]  # Linear over [v_1; ...; v_F; dense; v_y]
        h = (F.linear(user, first_layer.weight[:, :n], first_layer.bias).unsqueeze(1)  # [B, 1, H]
             + F.linear(vy, first_layer.weight[:, n:]).unsqueeze(0))  # [1, Y, H] -> [B, Y, H]
        h = h.view(B * Y, -1)  # [B Y, H]
        for layer in islice(self.dnn, 1, None):
            h = layer(h)
        deep = h.view(B, Y)  # [B Y, 1] -> [B, Y]
        second = fm_second_order(v).unsqueeze(1) + v.sum(dim=1) @ vy.t()  # [B, 1] + [B, Y]: pairs of F + 1 fields
        first = self.linear(batch.sparse, batch.dense).unsqueeze(1) + self.candidate_weight  # [B, 1] + [Y]
        return self.bias + first + second + deep  # [B, Y]
