"""What the sequence models (NextItNet, GRec, PeterRec) share: the item table, the dilated CNN over the user's item
sequence, and the sampled-softmax scores.

Data contract (docs: PETERREC_INTERFACE.md; the sequence datasets' ``meta.json``): the list field ``items`` holds
each user's items in time order (jagged; no padding stored); optional list fields ``negatives`` (the batch's shared
pool of sampled negative ids, spread over the rows) and ``targets`` (same lengths as ``items``: the original id at
masked positions, 0 elsewhere) share its vocabulary (``vocab_of: items``). Reserved ids: 0 = padding / "not
predicted" (never inside ``items``), 1 = the special token ([MASK] = [TCS] = [TCL], the paper's footnote 1), items
from 2.

Shapes: B rows, L = the longest row of the batch, C = ``embedding_dim`` (the paper's k), V = ``vocab_size`` of
``items``, S = the pool of negatives, M = the predicted positions of the batch.

Parameter names are the same in every sequence model (``embedding.embeddings.t_items.weight``,
``cnn.blocks.<i>.{conv1,ln1,conv2,ln2}.*``), so a fine-tuning model loads a pretraining run's weights by name.
The item table lives in ONE TorchRec EmbeddingCollection (``self.embedding``, built by
:func:`recsys_transfer.modules.embedding.make_ec`, one table ``t_items`` serving every field of its vocabulary) that
each forward calls once with the batch's KeyedJaggedTensor, so the row pipeline records (or freezes) its rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.modules.dilated_cnn import DilatedCNN, init_truncated_normal, left_padded, padding_mask
from recsys_transfer.modules.embedding import make_ec, table_name

ITEMS, NEGATIVES, TARGETS = "items", "negatives", "targets"
PAD_ID, TOKEN_ID, FIRST_ITEM = 0, 1, 2


def with_keys(kjt: KeyedJaggedTensor, keys: Sequence[str]) -> KeyedJaggedTensor:
    """A KJT holding exactly ``keys``, in that order: ``kjt`` itself when it already does; else its features among
    ``keys`` and each missing key as an empty feature (length 0 on every row: an evaluation batch has no
    ``negatives`` or ``targets``), other keys dropped. One fixed key list per model, so a sharded collection (whose
    input split is set up from the first batch's keys) sees the same keys in every batch."""
    if kjt.keys() == list(keys):
        return kjt
    B = kjt.stride()
    present = set(kjt.keys())
    values, lengths = [], []
    for k in keys:
        if k in present:
            jt = kjt[k]
            values.append(jt.values())
            lengths.append(jt.lengths())
        else:
            lengths.append(kjt.lengths().new_zeros(B))
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.cat(values) if values else
                                               kjt.values()[:0], lengths=torch.cat(lengths))


def with_pool(kjt: KeyedJaggedTensor, keys: Sequence[str], pool_key: str, pool: torch.Tensor) -> KeyedJaggedTensor:
    """:func:`with_keys` with feature ``pool_key`` replaced by the ids ``pool [S]``, all on the first row (the pool
    is the batch's, shared by every row)."""
    kjt = with_keys(kjt, keys)
    B = kjt.stride()
    values, lengths = [], []
    for k in keys:
        if k == pool_key:
            values.append(pool.to(kjt.values().dtype))
            n = kjt.lengths().new_zeros(B)
            n[0] = len(pool)
            lengths.append(n)
        else:
            jt = kjt[k]
            values.append(jt.values())
            lengths.append(jt.lengths())
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.cat(values), lengths=torch.cat(lengths))


def batch_log_q(kjt: KeyedJaggedTensor, vocab_size: int) -> torch.Tensor | None:
    """``[V]``: the log-Q correction of each id the batch holds (the KJT's weights, written by
    :class:`recsys_transfer.data.sequences.SequenceSampling` with ``sampler: popularity``: ``log(S q(id))``, the
    log of the id's expected count in the pool), 0 for ids it does not hold; None for an unweighted batch (a
    uniform pool: the correction is a constant)."""
    weights = kjt.weights_or_none()
    if weights is None:
        return None
    log_q = weights.new_zeros(vocab_size)
    log_q[kjt.values().long()] = weights  # one value per id: every occurrence carries the same weight
    return log_q


def sampled_scores(query: torch.Tensor, positive: torch.Tensor, positive_ids: torch.Tensor,
                   negatives: torch.Tensor, negative_ids: torch.Tensor,
                   log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled-softmax logits over a shared negative pool: ``query [M, C]``, the positive items' rows
    ``positive [M, C]`` (ids ``positive_ids [M]``) and the pool's rows ``negatives [S, C]`` (ids
    ``negative_ids [S]``) -> ``[M, 1 + S]``: ``<q_m, e_pos>`` in column 0, ``<q_m, e_s>`` after it, and ``-inf``
    where a negative IS the positive (an accidental hit: the data does not remove them). With ``log_q [V]``
    (:func:`batch_log_q`: a pool drawn from a non-uniform ``q``) every logit of id ``y`` is ``<q_m, e_y> -
    log(S q(y))``, the positive's too (Jean et al. 2015, Eq. 9-10; Bengio and Senecal 2008): the sampled softmax
    then estimates the full one without the pool's bias toward popular items."""
    pos = (query * positive).sum(dim=1, keepdim=True)  # [M, 1]
    neg = query @ negatives.t()  # [M, S]
    if log_q is not None:
        pos = pos - log_q[positive_ids].unsqueeze(1)
        neg = neg - log_q[negative_ids].unsqueeze(0)
    neg = neg.masked_fill(negative_ids.unsqueeze(0) == positive_ids.unsqueeze(1), float("-inf"))  # [M, S]
    return torch.cat([pos, neg], dim=1)  # [M, 1 + S]


class SequenceBackbone(nn.Module):
    """The item table and the dilated CNN (module docstring); subclasses add the outputs.

    ``fields``: the list fields of ``items``' vocabulary the collection serves (those present in ``meta``).
    """

    def __init__(self, meta: DatasetMeta, model: str, embedding_dim: int, dilations: Sequence[int], kernel: int,
                 causal: bool, fields: Sequence[str]) -> None:
        super().__init__()
        if ITEMS not in meta.sparse_names or not meta.field(ITEMS).multi_valued:
            raise UserError(f"{model}: needs the list field {ITEMS!r} of a sequence dataset (prepare it with the "
                            f"movielens-sequences recipe); this dataset has {meta.sparse_names}")
        if embedding_dim < 1:
            raise UserError(f"{model}: embedding_dim must be >= 1, got {embedding_dim}")
        for f in fields:
            if f in meta.sparse_names and meta.field(f).table_field != ITEMS:
                raise UserError(f"{model}: field {f!r} must share the vocabulary of {ITEMS!r} (vocab_of: {ITEMS})")
        self.dataset_id = meta.dataset_id
        self.num_items = meta.field(ITEMS).vocab_size  # V, reserved ids included
        self.fields = [ITEMS] + [f for f in fields if f != ITEMS and f in meta.sparse_names]
        self.embedding = make_ec(meta, embedding_dim, self.fields)
        init_truncated_normal(self.table.weight)  # the official code's item embedding init
        self.cnn = DilatedCNN(embedding_dim, tuple(dilations), kernel, causal)
        self.table_frozen = False  # a flag, not the weight's requires_grad: a sharded collection has no .weight

    @property
    def table(self) -> nn.Embedding:
        return self.embedding.embeddings[table_name(ITEMS)]

    def lookup(self, kjt: KeyedJaggedTensor, pool: torch.Tensor | None = None) -> tuple[KeyedJaggedTensor, dict]:
        """The collection's ONE call per forward: ``(the KJT looked up, {field: JaggedTensor of [n, C] rows})``.
        ``pool``: item ids looked up as the ``negatives`` feature instead of the batch's (every item, for the full
        softmax and the evaluation's full scores: through the collection, so a sharded table serves them too)."""
        kjt = with_keys(kjt, self.fields) if pool is None else with_pool(kjt, self.fields, NEGATIVES, pool)
        if kjt.weights_or_none() is not None:  # the log-Q weights are the model's (batch_log_q), not the table's
            kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), stride=kjt.stride())
        return kjt, self.embedding(kjt)

    def embed_items(self, kjt: KeyedJaggedTensor, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x [B, L, C], ids [B, L], mask [B, L, 1])``: the left-padded rows of ``items`` (zero vectors and id 0
        at padding), their ids, and the padding mask. A frozen item table (``self.table_frozen``, set with
        ``requires_grad=False`` on its weight by the fine-tuning variants that keep it) gives DETACHED rows: no
        backward reaches the lookup (the row pipeline would drop its rows anyway), and a network frozen below the
        head (FineCLS) runs no backward through the CNN."""
        lengths = kjt[ITEMS].lengths()
        values = rows[ITEMS].values()  # [N, C]
        if self.table_frozen:
            values = values.detach()
        x = left_padded(values, lengths)  # [B, L, C]
        ids = left_padded(kjt[ITEMS].values(), lengths, x.shape[1])  # [B, L]
        return x, ids, padding_mask(lengths, x.shape[1], x.dtype)  # mask [B, L, 1]

    def item_rows(self, kjt: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, dict, torch.Tensor]:
        """For evaluation: ``(kjt, rows, table [V, C])``, every item's row (ids 0..V-1) looked up with the batch in
        the collection's one call; the table's weight itself when the dataset lists no ``negatives`` feature."""
        if NEGATIVES not in self.fields:
            kjt, rows = self.lookup(kjt)
            return kjt, rows, self.table.weight
        kjt, rows = self.lookup(kjt, torch.arange(self.num_items, device=kjt.values().device))
        return kjt, rows, rows[NEGATIVES].values()

    @staticmethod
    def full_scores(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``h [B, C]``, ``table [V, C]`` -> ``[B, V]``: the score of every item (tied to the item table), the
        lowest finite value at the reserved ids 0 and 1 (never a next item; finite because the evaluation counts a
        row holding a non-finite score as failed)."""
        scores = h @ table.t()  # [B, V]
        scores[:, :FIRST_ITEM] = torch.finfo(scores.dtype).min
        return scores
