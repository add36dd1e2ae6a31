"""Multi-task models (issue 13, models) on real Adult batches: outputs per task, gradients, parameter counts by hand,
FDN's loss terms against float64 references, CGC gates, ESMM's product, one-epoch training through the trainer
(every model, the single-task restriction, the row pipeline with transfer mode +Ours), and a dense-only dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_transfer.config import load_config
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.errors import UserError
from recsys_transfer.models.esmm import product_logit
from recsys_transfer.models.fdn import FDN
from recsys_transfer.models.registry import MULTITASK_MODELS, build_model, parameter_counts, parameter_line
from recsys_transfer.modules.experts import CGC, Gate, mix
from recsys_transfer.objectives import Objective
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.train.run import run_training
from recsys_transfer.types import ModelOutput, split_output

REPO = Path(__file__).resolve().parents[1]
TASKS = ("income", "never_married")

#: small experts so one epoch on Adult takes seconds
SMALL = {
    "single_task": {"embedding_dim": 8, "expert_hidden": [32]},
    "shared_bottom": {"embedding_dim": 8, "bottom": [32], "tower_hidden": [16]},
    "mmoe": {"embedding_dim": 8, "num_experts": 3, "expert_hidden": [32], "tower_hidden": [16]},
    "cgc": {"embedding_dim": 8, "specific_experts": 1, "shared_experts": 1, "expert_hidden": [32],
            "tower_hidden": [16]},
    "ple": {"embedding_dim": 8, "specific_experts": 1, "shared_experts": 1, "expert_hidden": [32],
            "tower_hidden": [16]},
    "esmm": {"embedding_dim": 8, "tower_hidden": [32]},
    "fdn": {"embedding_dim": 8, "num_pairs": 2, "expert_hidden": [32]},
}


@pytest.fixture(scope="session")
def adult(adult_prepared):
    return adult_prepared


def first_batch(data_dir, meta, batch_size: int = 256):
    return next(iter(BatchLoader(data_dir, "train", batch_size, meta=meta)))


def test_every_multitask_model_is_registered():
    assert set(MULTITASK_MODELS) == {"single_task", "shared_bottom", "mmoe", "cgc", "ple", "esmm", "fdn"}
    assert set(SMALL) == set(MULTITASK_MODELS)


@pytest.mark.parametrize("name", sorted(MULTITASK_MODELS))
def test_outputs_per_task_and_every_parameter_learns(name, adult):
    data, meta = adult
    torch.manual_seed(0)
    batch = first_batch(data, meta)
    model = build_model(name, meta)  # the defaults
    model.train()
    out = model(batch)
    outputs, aux = split_output(out)
    assert set(outputs) == set(TASKS) == {t.name for t in meta.tasks}
    for logit in outputs.values():
        assert logit.shape == (batch.batch_size,) and logit.dtype == torch.float32 and torch.isfinite(logit).all()
    assert (set(aux) == {"penalty/orth", "heads/aux"}) if name == "fdn" else (aux == {})
    objective = Objective(meta.tasks)
    objective.total(objective.losses(outputs, aux, batch)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"
    assert [c.name for c in model.embedding.embedding_bag_configs()] == [f"t_{f}" for f in meta.sparse_names]
    model.eval()
    assert set(split_output(model(batch))[1]) == set()  # auxiliary outputs in training only


# -- parameter counts by hand -------------------------------------------------------------------------------------
def linear(i: int, o: int) -> int:
    return i * o + o


def test_parameter_counts_equal_hand_formulas(adult):
    _, meta = adult
    k, F, D = 4, len(meta.sparse_names), len(meta.dense)
    n = F * k + D
    rows = sum(f.vocab_size for f in meta.sparse)
    towers = 2 * (linear(5, 2) + linear(2, 1))  # tower_hidden (2,) then the task's logit, per task

    mmoe = build_model("mmoe", meta, embedding_dim=k, num_experts=3, expert_hidden=(5,), tower_hidden=(2,))
    want = 3 * linear(n, 5) + 2 * linear(n, 3) + towers  # experts, one gate per task, towers
    assert parameter_counts(mmoe) == {"dense": want, "tables": rows * k, "table_rows": rows, "embedding_dims": [k],
                                      "trained": want + rows * k}

    ple = build_model("ple", meta, embedding_dim=k, num_levels=2, specific_experts=1, shared_experts=2,
                      expert_hidden=(5,), tower_hidden=(2,))
    level1 = 4 * linear(n, 5) + 2 * linear(n, 1 + 2) + linear(n, 2 * 1 + 2)  # 2 specific + 2 shared; gates; shared gate
    level2 = 4 * linear(5, 5) + 2 * linear(5, 1 + 2)  # the last level has no shared gate
    assert parameter_counts(ple)["dense"] == level1 + level2 + towers
    cgc = build_model("cgc", meta, embedding_dim=k, specific_experts=1, shared_experts=2, expert_hidden=(5,),
                      tower_hidden=(2,))
    assert parameter_counts(cgc)["dense"] == 4 * linear(n, 5) + 2 * linear(n, 3) + towers

    M, d = 2, 5
    fdn = build_model("fdn", meta, embedding_dim=k, num_pairs=M, expert_hidden=(d,))
    experts = 2 * 2 * M * linear(n, d)  # K*M specific + K*M shared
    assert parameter_counts(fdn)["dense"] == experts + 2 * linear((M + 2 * M) * d, 1) + 2 * M * linear(d, 1)
    no_aux_private = build_model("fdn", meta, embedding_dim=k, num_pairs=M, expert_hidden=(d,), aux=False,
                                 shared=False)
    assert parameter_counts(no_aux_private)["dense"] == experts + 2 * linear(2 * M * d, 1)
    line = parameter_line("mmoe", parameter_counts(mmoe))
    assert line == f"model mmoe: {want:,} dense parameters, {rows} embedding rows x {k} ({rows * k:,} table parameters)"


# -- FDN ----------------------------------------------------------------------------------------------------------
def test_fdn_orthogonal_term_and_aux_heads_against_float64_references(adult):
    data, meta = adult
    torch.manual_seed(0)
    batch = first_batch(data, meta, 200)
    model: FDN = build_model("fdn", meta, num_pairs=3, expert_hidden=(16, 8))
    model.train()
    seen: dict[str, list[torch.Tensor]] = {"p": [], "s": []}
    hooks = [e.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach()))
             for key, experts in (("p", model.specific), ("s", model.shared_experts)) for e in experts]
    out = model(batch)
    for h in hooks:
        h.remove()
    assert isinstance(out, ModelOutput) and len(seen["p"]) == len(seen["s"]) == 2 * 3
    B = batch.batch_size
    # Eq. 2 literally, in float64: sum over tasks and pairs of ||(f^s)^T f^p||_F^2; the model's term is it / B^2
    eq2 = sum(float(torch.linalg.matrix_norm(s.double().T @ p.double(), "fro") ** 2)
              for s, p in zip(seen["s"], seen["p"]))
    assert eq2 > 0
    assert math.isclose(out.aux["penalty/orth"].item() * B * B, eq2, rel_tol=1e-4)
    # one auxiliary head per task-specific expert, reading that expert's features (Eq. 4)
    heads = out.aux["heads/aux"]
    assert set(heads) == set(TASKS) and all(len(v) == 3 for v in heads.values())
    for k, task in enumerate(TASKS):
        for m in range(3):
            head = model.aux_heads[k * 3 + m]
            want = seen["p"][k * 3 + m].double() @ head.weight.double().T + head.bias.double()
            torch.testing.assert_close(heads[task][m].double(), want.squeeze(1), rtol=1e-5, atol=1e-6)
    # prediction layer of task k: concatenation of its specific features and every pair's shared features
    g0 = torch.cat([seen["p"][0], seen["p"][1], seen["p"][2], *seen["s"]], dim=1).double()
    want0 = g0 @ model.predict[0].weight.double().T + model.predict[0].bias.double()
    torch.testing.assert_close(out.tasks["income"].double(), want0.squeeze(1), rtol=1e-5, atol=1e-6)
    # the losses the objective makes of them: Eq. 3's mean over the K*M heads, the aux weights
    objective = Objective(meta.tasks, {"penalty/orth": 2.0, "heads/aux": 0.5})
    losses = objective.losses(out.tasks, out.aux, batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    aux_want = np.mean([float(bce(h.detach(), batch.labels[t])) for t in TASKS for h in heads[t]])
    assert math.isclose(losses["aux/heads/aux"].item(), aux_want, rel_tol=1e-5)
    total = float((losses["income"] + losses["never_married"] + 2.0 * losses["aux/penalty/orth"]
                  + 0.5 * losses["aux/heads/aux"]).detach())
    assert math.isclose(objective.total(losses).item(), total, rel_tol=1e-6)


def test_fdn_ablation_switches(adult):
    data, meta = adult
    batch = first_batch(data, meta, 64)
    for kwargs, keys in (({"orth": False}, {"heads/aux"}), ({"aux": False}, {"penalty/orth"}),
                         ({"orth": False, "aux": False}, set())):
        model = build_model("fdn", meta, **kwargs).train()
        assert set(model(batch).aux) == keys
        assert (model.aux_heads is None) == (not kwargs.get("aux", True))
    # without task-shared features: task k's logit depends on its own pairs only
    for shared in (True, False):
        model = build_model("fdn", meta, shared=shared, num_pairs=2).train()
        model(batch).tasks["income"].sum().backward()
        other = [p.grad for e in model.shared_experts[2:] for p in e.parameters()]  # task 2's shared experts
        reached = [g is not None and bool(g.abs().sum() > 0) for g in other]
        assert all(reached) if shared else not any(reached)


# -- CGC / PLE ------------------------------------------------------------------------------------------------------
def test_cgc_gates_sum_to_one_and_mix_their_experts(adult):
    data, meta = adult
    torch.manual_seed(0)
    batch = first_batch(data, meta, 128)
    model = build_model("ple", meta, num_levels=2, specific_experts=2, shared_experts=3, expert_hidden=(8,))
    x = model.inputs(batch)
    level = model.levels[0]
    weights = level.gate_weights([x, x], x)
    assert [w.shape for w in weights] == [(128, 5), (128, 5), (128, 2 * 2 + 3)]
    for w in weights:
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones(128))
    task_out, shared_out = level([x, x], x)
    own = torch.stack([e(x) for e in level.task_experts[1]], dim=1)
    shared = torch.stack([e(x) for e in level.shared_experts], dim=1)
    want = (weights[1].unsqueeze(2) * torch.cat([own, shared], dim=1)).sum(dim=1)  # [B, E, 1] * [B, E, d]
    torch.testing.assert_close(task_out[1], want)
    assert shared_out.shape == (128, 8)
    assert model.levels[1].shared_gate is None and model.levels[0].shared_gate is not None
    # the module docstring's example
    block = CGC(in_dim=32, num_tasks=2, specific=1, shared=2, hidden=(16,), shared_gate=True)
    z = torch.randn(4, 32)
    outs, shared_z = block([z, z], z)
    assert [o.shape for o in outs] == [(4, 16), (4, 16)] and shared_z.shape == (4, 16)
    w = Gate(3, 4)(torch.randn(5, 3))
    torch.testing.assert_close(mix(w, torch.ones(5, 4, 2)), torch.ones(5, 2))


# -- ESMM ---------------------------------------------------------------------------------------------------------
def test_esmm_ctcvr_is_the_product_of_ctr_and_cvr(adult):
    data, meta = adult
    torch.manual_seed(0)
    batch = first_batch(data, meta, 256)
    model = build_model("esmm", meta)
    assert (model.ctr_task, model.ctcvr_task) == TASKS
    a, b = model.parts(batch)
    out = model(batch)
    torch.testing.assert_close(out["income"], a)
    torch.testing.assert_close(torch.sigmoid(out["never_married"].double()),
                               torch.sigmoid(a.double()) * torch.sigmoid(b.double()), rtol=1e-5, atol=1e-7)
    # exact and finite where the probabilities round to 0 or 1
    a = torch.tensor([0.0, 3.0, -2.0, 30.0, -30.0, 100.0, -100.0, 200.0])
    b = torch.tensor([0.0, -1.0, 4.0, 30.0, 20.0, 100.0, -100.0, 200.0])
    got = product_logit(a, b)
    assert torch.isfinite(got).all()
    pa, pb = torch.sigmoid(a[:3].double()), torch.sigmoid(b[:3].double())
    torch.testing.assert_close(got[:3].double(), torch.log(pa * pb) - torch.log1p(-pa * pb))  # moderate: naive f64
    # saturated: logit -> a + b - log(2) ... closed forms: p -> 1 gives -log(e^-a + e^-b), p -> 0 gives a + b
    want = torch.tensor([30.0 - math.log(2.0), -30.0, 100.0 - math.log(2.0), -200.0, 200.0 - math.log(2.0)])
    torch.testing.assert_close(got[3:], want)
    # ESMM's task mapping: two binary tasks; explicit names may swap them
    swapped = build_model("esmm", meta, ctr_task="never_married", ctcvr_task="income")
    assert set(swapped(batch)) == set(TASKS)
    with pytest.raises(UserError, match="exactly two binary tasks"):
        build_model("esmm", meta, tasks=(TaskSpec("income"),))
    with pytest.raises(UserError, match="must name the two tasks"):
        build_model("esmm", meta, ctr_task="click")


def test_models_refuse_bad_arguments(adult):
    _, meta = adult
    with pytest.raises(UserError, match="expert_hidden"):
        build_model("mmoe", meta, expert_hidden=())
    with pytest.raises(UserError, match="num_pairs"):
        build_model("fdn", meta, num_pairs=0)
    with pytest.raises(UserError, match="unknown argument '_name'"):
        build_model("cgc", meta, _name="x")
    with pytest.raises(UserError, match="unknown argument 'num_levels'"):
        build_model("cgc", meta, num_levels=2)


# -- training through the trainer ---------------------------------------------------------------------------------
def train_adult(data: Path, out: Path, name: str, *extra: str) -> dict:
    overrides = [f"data.path={data}", f"model.name={name}", "train.epochs=1", "train.progress=false",
                 "train.batch_size=256"]
    overrides += [f"model.params.{k}={json.dumps(v)}" for k, v in SMALL[name].items()]
    return run_training(load_config(REPO / "pipelines" / "adult-mtl.yaml", overrides + list(extra)), out)


@pytest.mark.parametrize("name", sorted(MULTITASK_MODELS))
def test_one_epoch_on_adult_learns_both_tasks(name, adult, tmp_path):
    data, _ = adult
    metrics = train_adult(data, tmp_path / "run", name)
    test = metrics["test"]
    print(f"{name}: test AUC income {test['income']['auc']:.4f} never_married {test['never_married']['auc']:.4f}; "
          f"{parameter_line(name, metrics['parameters'])}")
    assert set(test) == set(TASKS)
    # ESMM's product pCTCVR = pCTR * pCVR <= pCTR assumes the second task's positives are among the first's (a
    # conversion follows a click); on Adult never_married is not nested in income, so its loss pulls on pCTR
    floor = 0.7 if name == "esmm" else 0.8
    assert test["income"]["auc"] > floor and test["never_married"]["auc"] > floor, test
    assert metrics["parameters"]["dense"] > 0 and metrics["parameters"]["table_rows"] > 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["parameters"] == metrics["parameters"]
    if name == "fdn":
        epoch = json.loads((tmp_path / "run" / "epochs.jsonl").read_text().splitlines()[0])
        assert {"train/aux/penalty/orth", "train/aux/heads/aux"} <= set(epoch), sorted(epoch)


def test_single_task_baseline_is_a_run_restricted_to_one_task(adult, tmp_path, capsys):
    data, _ = adult
    metrics = train_adult(data, tmp_path / "run", "single_task", "tasks=[{name: never_married}]",
                          "train.progress=true")
    assert set(metrics["test"]) == {"never_married"} and metrics["test"]["never_married"]["auc"] > 0.8
    assert [t["name"] for t in metrics["tasks"]] == ["never_married"]
    printed = capsys.readouterr().out
    assert parameter_line("single_task", metrics["parameters"]) in printed


def test_row_pipeline_and_transfer_ours_with_fdn(adult, tmp_path):
    data, _ = adult
    metrics = train_adult(data, tmp_path / "run", "fdn", "transfer.mode=+Ours", "transfer.fields=[native-country]",
                          "train.aux_weights={penalty/orth: 0.5, heads/aux: 0.5}", "rows.optimizer=adam")
    stats = metrics["transfer"]["embedding.t_native-country"]  # the barrier ran on the shared table
    assert metrics["status"] == "completed" and stats["rows"] > 0 and stats["target_rows"] > 0, stats
    test = metrics["test"]
    assert test["income"]["auc"] > 0.8 and test["never_married"]["auc"] > 0.8, test


# -- a dense-only dataset (no sparse field: no embedding collection) -------------------------------------------------
@pytest.fixture(scope="module")
def dense_only(tmp_path_factory):
    """Two regression tasks over 6 dense features (no sparse field), like the FDN paper's synthetic data."""
    import polars as pl

    from recsys_transfer.data.prepared import BuildReport, Schema, build_prepared, chunked
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec

    rng = np.random.default_rng(0)
    n = 3000
    x = rng.normal(size=(n, 6))
    frame = {f"x{i}": x[:, i] for i in range(6)}
    frame["y1"] = (np.sin(x[:, 0]) + x[:, 1] + 0.1 * rng.normal(size=n)).astype(np.float32)
    frame["y2"] = (np.cos(x[:, 0]) - x[:, 2] + 0.1 * rng.normal(size=n)).astype(np.float32)
    schema = Schema(sparse=(), dense=tuple(f"x{i}" for i in range(6)), labels=("y1", "y2"),
                    tasks=(TaskSpec("y1", kind="regression"), TaskSpec("y2", kind="regression")))
    out = tmp_path_factory.mktemp("dense_only") / "prepared"
    meta = build_prepared(chunked(pl.DataFrame(frame), 1000), schema, out, dataset="dense-only", split=SplitSpec(),
                          head_tail=HeadTailSpec(), report=BuildReport(input_rows=n), source={}, progress=False)
    return out, meta


@pytest.mark.parametrize("name", sorted(set(MULTITASK_MODELS) - {"esmm"}))
def test_dense_only_regression(name, dense_only):
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.evaluate import evaluate
    from recsys_transfer.train.loop import train_epoch

    data, meta = dense_only
    torch.manual_seed(0)
    model = build_model(name, meta)
    assert model.embedding is None and parameter_counts(model)["table_rows"] == 0
    step = compose_step(model, meta)
    train = BatchLoader(data, "train", 128, shuffle=True, seed=0, meta=meta)
    test = BatchLoader(data, "test", 1024, meta=meta)
    before = evaluate(model, test, meta.tasks)
    for epoch in range(3):
        train.set_epoch(epoch)
        train_epoch(step, train, epoch=epoch)
    after = evaluate(model, test, meta.tasks)
    for task in ("y1", "y2"):
        assert after[task]["mse"] < 0.5 * before[task]["mse"], (name, task, before[task], after[task])


@pytest.mark.parametrize("name", sorted(set(MULTITASK_MODELS) - {"esmm"}))
def test_multiclass_and_regression_tasks_get_their_widths(name, adult):
    data, meta = adult
    batch = first_batch(data, meta, 32)
    tasks = (TaskSpec("income", kind="multiclass", num_classes=2), TaskSpec("never_married", kind="regression"))
    model = build_model(name, meta, tasks=tasks).train()
    out, aux = split_output(model(batch))
    assert out["income"].shape == (32, 2) and out["never_married"].shape == (32,)
    objective = Objective(tasks)
    losses = objective.losses(out, aux, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    if name == "fdn":
        assert [h.shape for h in aux["heads/aux"]["income"]] == [(32, 2), (32, 2)]
