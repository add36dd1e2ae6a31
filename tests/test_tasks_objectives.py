"""Task specs, objectives by task kind (float64 references), models with several tasks, evaluation per kind, the
monitor -- on real ML-100K batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError
from recsys_transfer.metrics import ranking
from recsys_transfer.models.registry import build_model
from recsys_transfer import objectives
from recsys_transfer.objectives import Objective, task_loss
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.train.evaluate import TaskPredictions, _rank_values, evaluate, predict, task_metrics
from recsys_transfer.train.loop import resolve_monitor
from recsys_transfer.types import Batch, FactoredScores, ModelOutput

BINARY = TaskSpec("click", label="label")
SCORE = TaskSpec("score", label="label", kind="regression", weight=0.5)
TWO_CLASS = TaskSpec("cls", label="label", kind="multiclass", num_classes=2, weight=2.0)


def test_task_spec_validation():
    assert TaskSpec("label").label == "label" and TaskSpec("label").width == 1
    assert TWO_CLASS.width == 2 and TaskSpec("r", kind="retrieval").width is None
    for bad in (dict(name="a/b"), dict(name="mean"), dict(name="x", kind="ranking"), dict(name="x", weight=-1.0),
                dict(name="x", kind="multiclass"), dict(name="x", num_classes=3),
                dict(name="x", kind="retrieval", eval_candidates="all"),
                dict(name="x", eval_candidates="full"), dict(name="x", eval_negatives="negs"),
                dict(name="x", kind="retrieval", eval_negatives="negs")):
        with pytest.raises(ValueError):
            TaskSpec(**bad)


def test_meta_json_carries_tasks_and_old_datasets_get_one_binary_task(ml100k_prepared, tmp_path):
    out, meta = ml100k_prepared
    doc = json.loads((out / "meta.json").read_text())
    assert doc["tasks"] == [{"name": "label", "label": "label", "kind": "binary", "weight": 1.0, "num_classes": None,
                             "candidates": "sampled", "loss": "softmax"}]
    # exact counts of the real file: 100,000 ratings, 27,145 neutral (3) dropped, the rest split 80/10/10
    counts = doc["label_counts"]
    assert sum(c["label"]["0"] + c["label"]["1"] for c in counts.values()) == 72_855
    assert counts["train"]["label"]["0"] + counts["train"]["label"]["1"] == meta.split_rows["train"]
    old = tmp_path / "old"
    old.mkdir()
    for key in ("tasks", "label_counts"):
        doc.pop(key)
    (old / "meta.json").write_text(json.dumps(doc))
    assert DatasetMeta.load(old).tasks == (TaskSpec("label", "label", "binary"),)
    doc["tasks"] = [{"name": "x", "label": "rating"}]
    (old / "meta.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=r"label column\(s\) \['rating'\] not in the dataset's labels"):
        DatasetMeta.load(old)


def test_task_losses_equal_float64_references():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(6, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.float32)
    p = 1 / (1 + torch.exp(-logit))
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert float(task_loss(BINARY, logit, y)) == pytest.approx(float(bce), rel=1e-12)
    assert float(task_loss(SCORE, logit, y)) == pytest.approx(float(((logit - y) ** 2).mean()), rel=1e-12)
    logits = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ce = -(logits.gather(1, y.long().unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, 1)).mean()
    assert float(task_loss(TWO_CLASS, logits, y)) == pytest.approx(float(ce), rel=1e-12)
    scores = torch.randn(4, 5, generator=g, dtype=torch.float64)  # positive in column 0, 4 negatives
    sampled = -(scores[:, 0] - torch.logsumexp(scores, 1)).mean()
    assert float(task_loss(TaskSpec("r", kind="retrieval"), scores, torch.zeros(4))) == pytest.approx(float(sampled))
    bpr = sum(math.log1p(math.exp(float(scores[b, j] - scores[b, 0]))) for b in range(4) for j in range(1, 5)) / 16
    assert float(task_loss(TaskSpec("r", kind="retrieval", loss="bpr"), scores, torch.zeros(4))) == pytest.approx(bpr)
    items = torch.tensor([3, 0, 4, 1])
    full = -(scores.gather(1, items.unsqueeze(1)).squeeze(1) - torch.logsumexp(scores, 1)).mean()
    got = task_loss(TaskSpec("r", kind="retrieval", candidates="full"), scores, items.float())
    assert float(got) == pytest.approx(float(full), rel=1e-12)


def test_objective_is_the_weighted_sum_plus_model_terms():
    y = torch.tensor([1.0, 0.0, 1.0])
    outputs = {"click": torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64),
               "score": torch.tensor([0.9, 0.1, 0.4], dtype=torch.float64),
               "cls": torch.tensor([[0.1, 0.5], [0.3, -0.4], [1.2, 0.2]], dtype=torch.float64)}
    batch = Batch(torch.zeros(3, 0), None, {"label": y})
    aux = {"penalty": torch.tensor(0.25, dtype=torch.float64),
           "heads": {"click": [torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)]}}
    obj = Objective((BINARY, SCORE, TWO_CLASS), aux_weights={"penalty": 4.0, "heads": 0.5})
    losses = obj.losses(outputs, aux, batch)
    assert sorted(losses) == ["aux/heads", "aux/penalty", "click", "cls", "score"]
    want = (task_loss(BINARY, outputs["click"], y) + 0.5 * task_loss(SCORE, outputs["score"], y)
            + 2.0 * task_loss(TWO_CLASS, outputs["cls"], y) + 4.0 * 0.25 + 0.5 * math.log(2))
    assert float(obj.total(losses)) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(UserError, match="no loss term named 'orthogonal'"):
        obj.losses(outputs, {"orthogonal/1": torch.tensor(1.0)}, batch)
    with pytest.raises(UserError, match="no output for task 'cls'"):
        obj.losses({"click": outputs["click"], "score": outputs["score"]}, {}, batch)


def test_models_output_every_task_and_refuse_what_they_cannot_predict(ml100k_prepared):
    out, meta = ml100k_prepared
    batch = next(iter(BatchLoader(out, "train", 64, meta=meta)))
    for name in ("deepfm", "autoint"):
        torch.manual_seed(0)
        model = build_model(name, meta, tasks=(BINARY, SCORE, TWO_CLASS), embedding_dim=4)
        got = model(batch)
        assert {k: tuple(v.shape) for k, v in got.items()} == {"click": (64,), "score": (64,), "cls": (64, 2)}
        loss = Objective((BINARY, SCORE, TWO_CLASS)).total(Objective((BINARY, SCORE, TWO_CLASS)).losses(got, {}, batch))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    for name in ("fm", "lr"):
        with pytest.raises(UserError, match="takes exactly one binary or regression task"):
            build_model(name, meta, tasks=(BINARY, SCORE))
        assert set(build_model(name, meta, tasks=(SCORE,))(batch)) == {"score"}
    with pytest.raises(UserError, match="no output for the retrieval task"):
        build_model("deepfm", meta, tasks=(TaskSpec("next", label="label", kind="retrieval"),))


def test_one_task_model_equals_the_same_task_among_several(ml100k_prepared):
    """DeepFM's column for a task is the single-task model's logit when the weights are copied (no hidden
    coupling between task columns in the forward)."""
    out, meta = ml100k_prepared
    batch = next(iter(BatchLoader(out, "train", 128, meta=meta)))
    torch.manual_seed(1)
    multi = build_model("deepfm", meta, tasks=(BINARY, SCORE), embedding_dim=4, hidden=(8,))
    single = build_model("deepfm", meta, tasks=(BINARY,), embedding_dim=4, hidden=(8,))
    state = {k: v.clone() for k, v in multi.state_dict().items()}
    state["bias"] = state["bias"][:1]
    state["dnn.2.weight"], state["dnn.2.bias"] = state["dnn.2.weight"][:1], state["dnn.2.bias"][:1]
    single.load_state_dict(state)
    # equal up to the GEMM's rounding (a 2-column output layer sums in another order)
    torch.testing.assert_close(single(batch)["click"], multi(batch)["click"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(multi(batch)["click"], multi(batch)["score"])


def test_evaluate_reports_every_kind_on_real_test_rows(ml100k_prepared):
    out, meta = ml100k_prepared
    torch.manual_seed(0)
    tasks = (BINARY, SCORE, TWO_CLASS)
    model = build_model("deepfm", meta, tasks=tasks, embedding_dim=4, hidden=(8,))
    test = BatchLoader(out, "test", 1000, meta=meta)
    m = evaluate(model, test, tasks, meta, transfer_field="zip", group_field="user_id")
    preds = predict(model, test, tasks, fields=("zip",))
    y = preds.tasks["click"].labels
    assert m["click"]["rows"] == len(y) == meta.split_rows["test"] and m["click"]["positives"] == int(y.sum())
    p = preds.tasks["click"].values
    assert m["click"]["logloss"] == pytest.approx(float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))), rel=1e-9)
    assert m["click"]["calibration"] == pytest.approx(float(p.sum() / y.sum()), rel=1e-12)
    head = meta.field("zip").head_mask()[preds.fields["zip"]]
    assert m["click"]["head_rows"] == int(head.sum()) and m["click"]["head_rows"] + m["click"]["tail_rows"] == len(y)
    assert set(m["score"]) == {"rows", "mse", "mae", "rmse"}
    assert m["score"]["rmse"] == pytest.approx(math.sqrt(m["score"]["mse"]))
    cls = preds.tasks["cls"].values
    assert m["cls"]["accuracy"] == pytest.approx(float((cls == y).mean()))
    # an empty subset is a null metric, not a crash
    empty = task_metrics(BINARY, preds.tasks["click"], head=np.ones(len(y), dtype=bool))
    assert empty["tail_rows"] == 0 and empty["tail_auc"] is None and empty["head_auc"] == m["click"]["auc"]
    from recsys_transfer.train.evaluate import TASK_METRICS

    for task in tasks:  # what the monitor may name is what evaluate reports
        assert set(TASK_METRICS[task.kind]) <= set(m[task.name]), task.kind
    nan = task_metrics(BINARY, TaskPredictions(y, np.where(np.arange(len(y)) == 3, np.nan, p), 1))
    assert nan["nonfinite_predictions"] == 1 and nan["auc"] is None and nan["logloss"] is None


def test_retrieval_ranks_equal_the_metrics_module():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 4, (50, 8), generator=g).double()  # many ties
    sampled = _rank_values(TaskSpec("r", kind="retrieval"), scores, torch.zeros(50))
    want = ranking.positive_ranks(scores[:, 0].numpy(), scores[:, 1:].numpy())
    assert sampled.numpy().tolist() == want.tolist()
    items = torch.randint(0, 8, (50,), generator=g)
    full = _rank_values(TaskSpec("r", kind="retrieval", candidates="full"), scores, items.float())
    assert full.numpy().tolist() == ranking.full_ranking_ranks(scores.numpy(), items.numpy()).tolist()


def test_sampled_ranks_among_fixed_negatives_equal_the_metrics_module():
    """eval_negatives: the positive ranked among the row's own fixed negative ids only (jagged: any count per row),
    read from the full scores, against ranking.positive_ranks row by row; the metrics come out prefixed."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from recsys_transfer.train.evaluate import TaskPredictions, _sampled_ranks, task_metrics

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (30, 12), generator=g).double()  # ties
    label = torch.randint(0, 12, (30,), generator=g)
    lengths = torch.randint(0, 6, (30,), generator=g)
    ids = torch.randint(0, 12, (int(lengths.sum()),), generator=g)
    got = _sampled_ranks(scores, label, JaggedTensor(values=ids, lengths=lengths)).numpy()
    lo = 0
    for b in range(30):
        negs = ids[lo: lo + lengths[b]].numpy()
        lo += int(lengths[b])
        want = ranking.positive_ranks(scores[b, label[b]].numpy()[None], scores[b, negs].numpy()[None])
        assert got[b] == want[0], b
    task = TaskSpec("cold", label="y", kind="retrieval", candidates="full", loss="bpr", eval_negatives="negs")
    full = _rank_values(task, scores, label.float()).numpy()
    m = task_metrics(task, TaskPredictions(label.numpy().astype(float), full.astype(float), 0, got))
    assert m["sampled_hr@5"] == pytest.approx(float(np.mean(got <= 5)))
    assert m["hr@5"] == pytest.approx(float(np.mean(full <= 5))) and m["sampled_hr@5"] >= m["hr@5"]
    assert resolve_monitor("valid/cold/sampled_mrr@5", (task,)).maximize
    with pytest.raises(UserError, match="has no metric 'sampled_mrr@5'"):
        resolve_monitor("valid/r/sampled_mrr@5", (TaskSpec("r", kind="retrieval"),))
    assert "eval_negatives" not in TaskSpec("r", kind="retrieval").to_json()  # records of older tasks unchanged
    assert task.to_json()["eval_negatives"] == "negs"


def test_full_candidates_bpr_draws_one_other_label_per_row():
    """PeterRec Eq. 8: softplus(o_y- - o_y) with y- uniform over Y \\ y: equal to a float64 reference drawn from the
    same generator state, and over many rows the mean of the three other labels' terms (never the label's own)."""
    task = TaskSpec("cold", label="y", kind="retrieval", candidates="full", loss="bpr")
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(64, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (64,), generator=g)
    torch.manual_seed(11)
    got = task_loss(task, scores, y.float())
    torch.manual_seed(11)
    neg = (y + torch.randint(1, 7, y.shape)) % 7
    want = np.mean([np.log1p(np.exp(scores[b, neg[b]].item() - scores[b, y[b]].item())) for b in range(64)])
    assert float(got) == pytest.approx(want, rel=1e-12) and bool((neg != y).all())
    many = torch.arange(4, dtype=torch.float64).repeat(40000, 1)  # o_j = j, label 0
    torch.manual_seed(0)
    mean = float(task_loss(task, many, torch.zeros(40000)))
    sp = [float(np.log1p(np.exp(j))) for j in range(4)]
    assert mean == pytest.approx(sum(sp[1:]) / 3, rel=5e-3)


def test_monitor_resolution():
    tasks = (BINARY, SCORE)
    assert resolve_monitor("auto", tasks).key == "valid/click/auc"
    m = resolve_monitor("valid/score/mse", tasks)
    assert not m.maximize and m.better(0.1, 0.2) and not m.better(0.3, 0.2)
    mean = resolve_monitor("valid/mean/auc", (BINARY, TaskSpec("like", label="label")))
    assert mean.value({"click": {"auc": 0.7}, "like": {"auc": 0.8}}) == pytest.approx(0.75)
    assert mean.value({"click": {"auc": 0.7}, "like": {"auc": None}}) is None
    for bad, msg in (("valid/nope/auc", "unknown task 'nope'"), ("valid/score/auc", "has no metric 'auc'"),
                     ("valid/mean/mse", "has no metric 'mse'"), ("valid/click/calibration", "no better direction")):
        with pytest.raises(UserError, match=msg):
            resolve_monitor(bad, tasks)


def test_model_output_with_aux_is_read_by_the_step(ml100k_prepared):
    """A model returning :class:`ModelOutput` trains with its auxiliary term in the loss."""
    from torch import nn

    from recsys_transfer.train.step import TrainStep

    out, meta = ml100k_prepared
    batch = next(iter(BatchLoader(out, "train", 64, meta=meta)))

    class WithPenalty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model("lr", meta)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, b):
            return ModelOutput(self.inner(b), {"penalty": self.scale ** 2})

    torch.manual_seed(0)
    model = WithPenalty()
    step = TrainStep(model, Objective(meta.tasks, {"penalty": 0.5}), torch.optim.SGD(model.parameters(), lr=0.1))
    result = step(batch)
    want = F.binary_cross_entropy_with_logits(torch.zeros(64), batch.labels["label"]) + 0.5 * 4.0
    assert result.loss == pytest.approx(float(want), rel=1e-6)
    assert float(model.scale.detach()) == pytest.approx(2.0 - 0.1 * 0.5 * 2 * 2.0)  # d(0.5 s^2)/ds = s


@pytest.mark.parametrize("chunk_logits", [1 << 20, 7 * 5])  # one chunk; chunks of 5 rows (the last one short)
def test_factored_scores_softmax_equals_the_materialized_cross_entropy(monkeypatch, chunk_logits):
    """The chunked full softmax of FactoredScores: loss and both gradients equal cross_entropy(q @ C.T, y) in
    float64, whatever the chunking; a repeated positive and the positive at the first and last columns included."""
    monkeypatch.setattr(objectives, "CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, 3, 3, 1, 2, 5, 4, 0, 6, 2, 1, 3])
    task = TaskSpec(name="next", kind="retrieval")
    got = task_loss(task, FactoredScores(q, c, y), torch.zeros(2))
    (2.5 * got).backward()
    gq, gc = q.grad.clone(), c.grad.clone()
    q.grad = c.grad = None
    want = F.cross_entropy(q @ c.t(), y)
    (2.5 * want).backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gq, q.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gc, c.grad, rtol=1e-12, atol=1e-12)
    assert float(want) > 0.5  # random scores: far from a zero loss, so equality means something


def test_factored_scores_bpr_is_one_uniform_other_candidate_per_row():
    g = torch.Generator().manual_seed(4)
    q, c = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    task = TaskSpec(name="next", kind="retrieval", loss="bpr")
    torch.manual_seed(9)
    got = task_loss(task, FactoredScores(q, c, y), torch.zeros(1))
    torch.manual_seed(9)
    shift = torch.randint(1, 5, y.shape)
    s = q @ c.t()
    neg = (y + shift) % 5
    assert (neg != y).all()
    want = F.softplus(s[torch.arange(6), neg] - s[torch.arange(6), y]).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
