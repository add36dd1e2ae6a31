"""DeepFM scoring every candidate of a full-vocabulary retrieval task (PeterRec's cold-user task, the paper's Table 5
baseline): the ``[B, |Y|]`` scores and their gradients against a float64 DeepFM written here pair by pair, with the
candidate's embedding concatenated as one more field; the feature fields and the refusals. On real data (ML-100K,
through the shipped pipeline): tests/test_peterrec_pipeline.py."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_transfer.data.prepared import DatasetMeta, SparseFieldMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.models.registry import build_model, model_arguments
from recsys_transfer.objectives import task_loss
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch

Y = 6  # candidates (target classes)
COLD = TaskSpec(name="cold", label="target_item", kind="retrieval", candidates="full", loss="bpr",
                eval_negatives="eval_negatives")


def _field(name: str, vocab: int, vocab_of: str | None = None) -> SparseFieldMeta:
    return SparseFieldMeta(name=name, vocab_size=vocab, oov_index=0, hashed=False, min_count=1,
                           frequencies=[1] * vocab, head_ids=[], multi_valued=True, vocab_of=vocab_of)


def cold_meta(tasks=(COLD,), dense=("x",), source=None) -> DatasetMeta:
    """A cold dataset's fields (``items``; ``negatives`` sharing its vocabulary; ``eval_negatives`` over the Y
    classes) plus ``tags`` (a list field of its own vocabulary) and a dense field, so F = 2 user fields and d = 1."""
    sparse = [_field("items", 12), _field("tags", 5), _field("negatives", 12, "items"), _field("eval_negatives", Y)]
    source = {"num_target_classes": Y} if source is None else dict(source)
    return DatasetMeta(dataset="cold-test", sparse=sparse, dense=list(dense), labels=sorted({t.label for t in tasks}),
                       split={}, head_tail={}, split_rows={}, split_files={}, input_rows=0, skipped_rows=0,
                       skip_reasons={}, source=source, tasks=tuple(tasks))


ROWS = {"items": [[2, 5, 5, 7], [3], [11, 2]], "tags": [[1, 4], [], [2]], "negatives": [[], [], []],
        "eval_negatives": [[0, 2], [1, 5], [3, 4]]}
DENSE = [[0.5], [-1.25], [2.0]]


def cold_batch(dtype=torch.float64) -> Batch:
    keys = list(ROWS)
    lengths = torch.tensor([len(r) for k in keys for r in ROWS[k]])
    values = torch.tensor([v for k in keys for r in ROWS[k] for v in r], dtype=torch.long)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    return Batch(dense=torch.tensor(DENSE, dtype=dtype), sparse=kjt,
                 labels={"target_item": torch.tensor([4.0, 0.0, 2.0])})


def reference_scores(model: DeepFM) -> torch.Tensor:
    """``[B, Y]``: for every row and candidate, DeepFM (Guo et al. 2017) on the fields {items (mean), tags (sum),
    y}: b + sum of first-order weights + w_d x + Rendle's pairwise sum over the three fields + the DNN on
    ``[v_items; v_tags; x; v_y]`` with its full first Linear -- no broadcasting, no split weights."""
    emb = {f: model.embedding.embedding_bags[f"t_{f}"].weight for f in ("items", "tags")}
    lin = {f: model.linear.tables.embedding_bags[f"t_{f}"].weight[:, 0] for f in ("items", "tags")}
    layers = [m for m in model.dnn if isinstance(m, torch.nn.Linear)]
    rows = []
    for b in range(len(DENSE)):
        items, tags = torch.tensor(ROWS["items"][b]), torch.tensor(ROWS["tags"][b], dtype=torch.long)
        x = torch.tensor(DENSE[b], dtype=torch.float64)
        v_user = [emb["items"][items].mean(0), emb["tags"][tags].sum(0)]  # an empty bag sums to 0
        first_user = lin["items"][items].mean() + lin["tags"][tags].sum() + model.linear.dense.weight[0] @ x
        scores = []
        for y in range(Y):
            v = v_user + [model.candidate_embedding[y]]
            second = sum(v[i] @ v[j] for i in range(3) for j in range(i + 1, 3))  # Rendle 2010, Eq. 1
            h = torch.cat([v[0], v[1], x, v[2]])
            for k, layer in enumerate(layers):
                h = layer.weight @ h + layer.bias
                if k < len(layers) - 1:
                    h = torch.relu(h)
            scores.append(model.bias[0] + first_user + model.candidate_weight[y] + second + h[0])
        rows.append(torch.stack(scores))
    return torch.stack(rows)


def _model(**kwargs) -> DeepFM:
    torch.manual_seed(4)
    model = DeepFM(cold_meta(), embedding_dim=3, hidden=(5, 4), fields=["items", "tags"],
                   pooling={"items": "mean"}, **kwargs).double()
    for p in model.parameters():  # away from the zero / tiny initializations, so every term counts
        torch.nn.init.normal_(p, std=0.5)
    return model


def test_candidate_scores_and_gradients_equal_a_per_pair_deepfm_float64():
    model = _model().eval()
    got = model(cold_batch())["cold"]
    want = reference_scores(model)
    assert got.shape == (3, Y) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert want.std() > 0.1 and (want[:, 1:] - want[:, :-1]).abs().min() > 1e-4  # not vacuous: distinct scores
    w = torch.randn(3, Y, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters()]
    got_grads = torch.autograd.grad((got * w).sum(), params)
    want_grads = torch.autograd.grad((want * w).sum(), params)
    for (name, _), g, r in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=name)
    names = dict(zip([n for n, _ in model.named_parameters()], got_grads))
    assert names["candidate_embedding"].abs().min() > 0 and names["candidate_weight"].abs().min() > 0


def test_candidate_scores_train_with_bpr_and_dropout_draws_per_pair():
    model = _model(dropout=0.5).train()
    out = model(cold_batch())["cold"]
    loss = task_loss(COLD, out, cold_batch().labels["target_item"])
    loss.backward()
    assert torch.isfinite(loss) and model.candidate_embedding.grad is not None
    torch.manual_seed(0)
    a = model(cold_batch())["cold"]
    model.eval()
    b = model(cold_batch())["cold"]
    assert not torch.allclose(a, b)  # dropout acts in training only
    torch.testing.assert_close(b, reference_scores(model), rtol=0, atol=1e-12)


def test_fields_select_the_features_and_the_label_vocabulary_sets_the_candidates():
    assert {"fields", "label_vocab"} <= set(model_arguments("deepfm"))
    meta = cold_meta(source={})
    model = build_model("deepfm", meta, embedding_dim=4, hidden=(8,), fields=["items"], label_vocab={"cold": 9})
    assert model.candidate_embedding.shape == (9, 4) and model.candidate_weight.shape == (9,)
    assert [c.feature_names for c in model.embedding.embedding_bag_configs()] == [["items"]]
    assert model.dnn[0].in_features == 4 + 1 + 4  # v_items, the dense field, v_y
    assert model(cold_batch(torch.float32))["cold"].shape == (3, 9)  # the batch's other fields are not read


def test_refusals_are_one_line_user_errors():
    meta = cold_meta()
    cases = [
        (dict(fields=["items", "eval_negatives"]), "'eval_negatives' holds the held-out negatives"),
        (dict(), "'eval_negatives' holds the held-out negatives"),  # default: every sparse field
        (dict(fields=["items", "genre"]), r"unknown: \['genre'\]"),
        (dict(fields=[]), "fields must be distinct sparse fields"),
        (dict(fields=["items"], batch_norm=True), "batch_norm is refused when scoring candidates"),
        (dict(fields=["items"], pooling={"tags": "mean"}), "pooling: 'tags' is not a sparse field"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match) as err:
            build_model("deepfm", meta, embedding_dim=4, hidden=(8,), **kwargs)
        assert "\n" not in str(err.value)
    binary = TaskSpec(name="click", label="click")
    with pytest.raises(UserError, match="one retrieval task, alone"):
        DeepFM(cold_meta(tasks=(COLD, binary)), fields=["items"])
    with pytest.raises(UserError, match="no output for the retrieval task 'cold' with candidates: sampled"):
        DeepFM(cold_meta(tasks=(TaskSpec(name="cold", label="target_item", kind="retrieval"),)), fields=["items"])
    with pytest.raises(UserError, match="needs the size of its label vocabulary"):
        DeepFM(cold_meta(source={}), fields=["items"])
    with pytest.raises(UserError, match="label_vocab is for a retrieval task"):
        DeepFM(cold_meta(tasks=(binary,)), fields=["items"], label_vocab={"click": 3})


def test_row_scoring_reads_only_the_chosen_fields():
    """A binary task on the same meta: ``fields=[items, tags]`` is the DeepFM of those two fields (the float64
    per-row formula), whatever else the batch holds."""
    binary = TaskSpec(name="click", label="target_item")
    torch.manual_seed(4)
    model = DeepFM(cold_meta(tasks=(binary,)), embedding_dim=3, hidden=(5,), fields=["items", "tags"],
                   pooling={"items": "mean"}).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    got = model(cold_batch())["click"]
    emb = {f: model.embedding.embedding_bags[f"t_{f}"].weight for f in ("items", "tags")}
    lin = {f: model.linear.tables.embedding_bags[f"t_{f}"].weight[:, 0] for f in ("items", "tags")}
    first_layer, out_layer = [m for m in model.dnn if isinstance(m, torch.nn.Linear)]
    for b in range(3):
        items, tags = torch.tensor(ROWS["items"][b]), torch.tensor(ROWS["tags"][b], dtype=torch.long)
        x = torch.tensor(DENSE[b], dtype=torch.float64)
        vi, vt = emb["items"][items].mean(0), emb["tags"][tags].sum(0)
        h = torch.relu(first_layer.weight @ torch.cat([vi, vt, x]) + first_layer.bias)
        want = (model.bias[0] + lin["items"][items].mean() + lin["tags"][tags].sum()
                + model.linear.dense.weight[0] @ x + vi @ vt + out_layer.weight[0] @ h + out_layer.bias[0])
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-12)
