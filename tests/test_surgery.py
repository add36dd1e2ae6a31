"""Gradient surgery (PCGrad, GradVac) and loss weighting (:mod:`recsys_transfer.multitask`): the kernels against a
float64 reference written out here (Algorithm 2 of the thesis, loop by loop, on hand-made gradients), the row
surgery on real two-task data (Adult, DeepFM: only batch rows change; ``g_main`` is the kernel's combination of the
recorded per-task row gradients), +Ours with GradVac (the barrier's invariant on the surgered ``g_main``), the
weightings, the config section and the checkpointed state."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys_transfer.config import MultitaskConfig, RowsConfig, TransferConfig, build, load_config
from recsys_transfer.errors import UserError
from recsys_transfer.multitask.surgery import Surgery, gradvac, pcgrad
from recsys_transfer.multitask.weighting import make_weighting
from recsys_transfer.objectives import Objective
from recsys_transfer.tasks import TaskSpec

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# the reference: Algorithm 2 (GradVac) and PCGrad's Algorithm 1, one pair at a time, float64


def ref_surgery(grads, targets=None, beta=0.01, orders=None, chosen=None):
    """``(sum_i g'_i, new targets)`` for ONE group. ``targets`` None: PCGrad."""
    k = len(grads)
    orders = orders or [[j for j in range(k) if j != i] for i in range(k)]
    chosen = chosen if chosen is not None else [True] * k
    new = None if targets is None else targets.clone()
    out = []
    for i in range(k):
        gi = grads[i].clone()
        if chosen[i]:
            for j in orders[i]:
                gj = grads[j]
                if targets is None:  # PCGrad: project g'_i onto the normal plane of g_j if they conflict
                    dot = gi @ gj
                    if dot < 0:
                        gi = gi - dot / (gj @ gj) * gj
                    continue
                phi = (gi @ gj) / (gi.norm() * gj.norm())
                t = new[i, j]
                if phi < t:  # Eq. 6.2
                    gi = gi + gi.norm() * (t * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - t ** 2)) / (
                        gj.norm() * math.sqrt(1 - t ** 2)) * gj
                new[i, j] = (1 - beta) * t + beta * phi  # Eq. 6.3, with phi from before the adjustment
        out.append(gi)
    return sum(out), new


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_pcgrad_removes_the_conflicting_component():
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    g2 = torch.tensor([-1.0, 1.0, 0.0], dtype=F64)  # g1 . g2 = -1 < 0
    out = pcgrad([g1, g2])
    # by hand: g1' = g1 - (-1/2) g2 = [0.5, 0.5, 2]; g2' = g2 - (-1/5) g1 = [-0.8, 1, 0.4]
    g1p, g2p = torch.tensor([0.5, 0.5, 2.0], dtype=F64), torch.tensor([-0.8, 1.0, 0.4], dtype=F64)
    torch.testing.assert_close(out, g1p + g2p, rtol=1e-14, atol=1e-15)
    assert abs(float(g1p @ g2)) < 1e-15 and abs(float(g2p @ g1)) < 1e-15  # no component against the other
    torch.testing.assert_close(out, ref_surgery([g1, g2])[0], rtol=1e-14, atol=1e-15)


def test_pcgrad_leaves_gradients_without_conflict_unchanged():
    g1 = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    g2 = torch.tensor([0.5, 1.0, -0.1], dtype=F64)  # g1 . g2 = 0.3 > 0
    assert torch.equal(pcgrad([g1, g2]), g1 + g2)
    assert torch.equal(pcgrad([g1, torch.tensor([0.0, 1.0, 0.0], dtype=F64)]), g1 + torch.tensor([0.0, 1.0, 0.0],
                                                                                                    dtype=F64))


def test_gradvac_reaches_the_target_cosine_exactly_and_updates_the_ema():
    g1 = torch.tensor([1.0, 0.2, -0.3, 0.5], dtype=F64)
    g2 = torch.tensor([0.1, 1.0, 0.4, -0.2], dtype=F64)
    phi = cos(g1, g2)  # ~0.04: positive, so PCGrad would leave it alone
    target = torch.zeros(2, 2, 1, dtype=F64)
    target[0, 1, 0], target[1, 0, 0] = 0.5, 0.01  # task 0 is below its target, task 1 above
    beta = 0.1
    out, new = gradvac([g1, g2], target, beta=beta)
    # task 0 moved to the target cosine exactly (Eq. 6.2), along g2 only (a1 = 1)
    g1p = out - g2  # task 1 was not adjusted (phi > 0.01)
    assert cos(g1p, g2) == pytest.approx(0.5, abs=1e-12)
    residual = g1p - g1
    assert abs(cos(residual, g2)) == pytest.approx(1.0, abs=1e-12)
    # the EMA (Eq. 6.3) with phi measured before the adjustment, for both pairs
    assert float(new[0, 1, 0]) == pytest.approx((1 - beta) * 0.5 + beta * phi, abs=1e-15)
    assert float(new[1, 0, 0]) == pytest.approx((1 - beta) * 0.01 + beta * phi, abs=1e-15)
    ref, ref_new = ref_surgery([g1, g2], target[:, :, 0], beta)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(new[:, :, 0], ref_new, rtol=1e-13, atol=1e-15)


def test_gradvac_with_zero_targets_is_pcgrad():
    torch.manual_seed(0)
    grads = [torch.randn(7, dtype=F64) for _ in range(3)]
    out, _ = gradvac(grads, torch.zeros(3, 3, 1, dtype=F64), beta=0.3)
    torch.testing.assert_close(out, pcgrad(grads), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_groups_orders_and_chosen_tasks_match_the_reference(method):
    """Three tasks, three groups of different sizes, a random order per task, and GradVac on two tasks only (the
    thesis's LRL_only): the third task's gradient is used unchanged and serves only as a reference."""
    torch.manual_seed(1)
    lengths = [5, 3, 8]
    grads = [torch.randn(sum(lengths), dtype=F64) for _ in range(3)]
    grads[2][:5] = -grads[0][:5] + 0.1 * torch.randn(5, dtype=F64)  # a conflict in group 0
    orders = [[2, 1], [0, 2], [1, 0]]
    chosen = [True, True, False]
    targets = torch.rand(3, 3, 3, dtype=F64) * 0.6 - 0.1
    if method == "pcgrad":
        out = pcgrad(grads, orders=orders, chosen=chosen, lengths=lengths)
        new = None
    else:
        out, new = gradvac(grads, targets, beta=0.2, orders=orders, chosen=chosen, lengths=lengths)
    start = 0
    for k, n in enumerate(lengths):
        part = [g[start : start + n] for g in grads]
        ref, ref_new = ref_surgery(part, None if method == "pcgrad" else targets[:, :, k], 0.2, orders, chosen)
        torch.testing.assert_close(out[start : start + n], ref, rtol=1e-12, atol=1e-13)
        if new is not None:
            torch.testing.assert_close(new[:, :, k], ref_new, rtol=1e-12, atol=1e-14)
        start += n
    if new is not None:
        assert torch.equal(new[2], targets[2])  # a task outside G has no EMA of its own
    assert not torch.equal(out, sum(grads))  # the surgery did something


def test_a_zero_gradient_pair_is_skipped():
    g1 = torch.tensor([1.0, -2.0], dtype=F64)
    zero = torch.zeros(2, dtype=F64)
    target = torch.full((2, 2, 1), 0.3, dtype=F64)
    out, new = gradvac([g1, zero], target)
    assert torch.equal(out, g1) and torch.equal(new, target)
    assert torch.equal(pcgrad([g1, zero]), g1)


def test_surgery_state_round_trips_and_orders_are_seeded():
    a = Surgery("gradvac", ["x", "y", "z"], seed=3)
    b = Surgery("gradvac", ["x", "y", "z"], seed=3)
    torch.manual_seed(2)
    for _ in range(4):
        grads = [torch.randn(6, dtype=F64) for _ in range(3)]
        a.new_step()
        b.new_step()
        assert a.orders == b.orders
        torch.testing.assert_close(a.combine(["x", "y", "z"], grads, ["g0", "g1"], [2, 4]),
                                   b.combine(["x", "y", "z"], grads, ["g0", "g1"], [2, 4]), rtol=0, atol=0)
    assert set(a.targets) == {"g0", "g1"} and bool((a.targets["g0"] != 0).any())
    c = Surgery("gradvac", ["x", "y", "z"], seed=99)
    c.load_state_dict(a.state_dict())
    a.new_step()
    c.new_step()
    assert a.orders == c.orders and all(torch.equal(a.targets[g], c.targets[g]) for g in a.targets)
    with pytest.raises(ValueError):
        Surgery("pcgrad", ["x", "y", "z"]).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="unknown task"):
        Surgery("gradvac", ["x", "y"], chosen=["w"])


# ---------------------------------------------------------------------------------------------------------
# weighting


def _objective():
    return Objective((TaskSpec("a"), TaskSpec("b", kind="regression", weight=2.0)))


def test_fixed_weights_scale_the_losses():
    losses = {"a": torch.tensor(0.7), "b": torch.tensor(1.5)}
    terms, reg = make_weighting("fixed", _objective(), {"a": 3.0}).terms(losses)
    assert reg is None and float(terms["a"]) == pytest.approx(2.1) and float(terms["b"]) == pytest.approx(3.0)
    terms, _ = make_weighting("equal", _objective()).terms(losses)
    assert float(terms["a"]) == pytest.approx(0.7) and float(terms["b"]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown task"):
        make_weighting("fixed", _objective(), {"c": 1.0})


def test_uncertainty_gradient_on_the_log_variances_matches_its_formula():
    w = make_weighting("uncertainty", _objective())
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.3, -0.4]))
    la = torch.tensor(0.7, requires_grad=True)
    lb = torch.tensor(1.5, requires_grad=True)
    terms, reg = w.terms({"a": la, "b": lb})
    (sum(terms.values()) + reg).backward()
    # the formula written out: binary exp(-s) l + s/2, regression (weight 2) 1/2 exp(-s) 2 l + s/2
    s = torch.tensor([0.3, -0.4], dtype=F64, requires_grad=True)
    ref = torch.exp(-s[0]) * 0.7 + s[0] / 2 + 0.5 * torch.exp(-s[1]) * 2.0 * 1.5 + s[1] / 2
    ref.backward()
    torch.testing.assert_close(w.log_vars.grad.double(), s.grad, rtol=1e-6, atol=1e-7)
    assert float(la.grad) == pytest.approx(math.exp(-0.3), rel=1e-6)
    assert float(lb.grad) == pytest.approx(math.exp(0.4), rel=1e-6)
    assert set(w.parameters()) == {"multitask.log_vars"}


# ---------------------------------------------------------------------------------------------------------
# config


def test_multitask_config_is_strict(tmp_path):
    cfg = build(MultitaskConfig, {"surgery": "gradvac", "beta": "1e-2", "tasks": ["income"]}, "multitask")
    assert cfg.beta == 0.01 and cfg.tasks == ("income",) and cfg.groups == "layer" and cfg.row_groups == "table"
    for raw, msg in [({"surgery": "mgda"}, "surgery"), ({"beta": 0.0}, "beta"), ({"groups": "matrix"}, "groups"),
                     ({"weights": {"a": 1.0}}, "fixed"), ({"tasks": ["a"]}, "surgery"), ({"betta": 0.1}, "unknown"),
                     ({"weighting": "fixed", "weights": {"a": -1}}, ">= 0"), ({"row_groups": "row"}, "row_groups")]:
        with pytest.raises(UserError, match=msg):
            build(MultitaskConfig, raw, "multitask")
    p = tmp_path / "c.yaml"
    p.write_text("data: {path: x}\nmultitask: {surgery: pcgrad, groups: model}\n")
    assert load_config(p).multitask.surgery == "pcgrad"
    p.write_text("data: {path: x}\nmultitask: {surgery: pcgrad, group: model}\n")
    with pytest.raises(UserError, match="unknown key"):
        load_config(p)


# ---------------------------------------------------------------------------------------------------------
# real two-task data: Adult with DeepFM (income, never_married)

FIELDS = ("native-country", "occupation")


@pytest.fixture(scope="module")
def adult(adult_prepared, tmp_path_factory):
    from recsys_transfer.transfer.domains import load_domains, select_command

    out, meta = adult_prepared
    selection = tmp_path_factory.mktemp("adult_selection") / "selection"  # the shared prepared dir stays read-only
    select_command(out, list(FIELDS), selection, top_k=5)
    return out, meta, load_domains(selection, FIELDS, meta)


def _batches(out, n: int, size: int = 512):
    from recsys_transfer.data.loader import BatchLoader

    for k, b in enumerate(BatchLoader(out, "train", size, shuffle=True, seed=1, prefetch=0)):
        if k == n:
            return
        yield b


def _step(meta, domains=None, transfer=TransferConfig(), **multitask):
    from recsys_transfer.models.deepfm import DeepFM
    from recsys_transfer.train.compose import compose_step

    torch.manual_seed(0)
    model = DeepFM(meta, embedding_dim=8, hidden=(32, 32))
    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-2), transfer=transfer,
                        domains=domains, multitask=MultitaskConfig(**multitask))
    return model, step


def _batch_rows(batch, meta) -> dict[str, set[int]]:
    return {f.name: set(batch.sparse[f.name].values().tolist()) for f in meta.sparse}


@pytest.mark.parametrize("row_groups", ["table", "tables"])
def test_row_surgery_combines_recorded_task_gradients_and_touches_only_batch_rows(adult, monkeypatch, row_groups):
    """One GradVac step with a hand-set target (so rows are adjusted): the ``g_main`` the row optimizer receives is
    the kernel's combination of the per-task row gradients the core recorded, and only rows in the batch move."""
    from recsys_transfer.multitask import surgery as surgery_mod
    from recsys_transfer.rows import pipeline as pipeline_mod

    out, meta, _ = adult
    model, step = _step(meta, surgery="gradvac", row_groups=row_groups)
    state = step.surgery.surgery
    seen = []
    original = surgery_mod.RowSurgery.__call__

    def spy(self, call, context):
        tasks = {n: [g.clone() for g in gs] for n, gs in call.task_grads.items()}
        original(self, call, context)
        seen.append((tasks, [(t.slot.name, t.grad.clone()) for t in call.tables]))

    monkeypatch.setattr(surgery_mod.RowSurgery, "__call__", spy)
    for batch in _batches(out, 2):
        if seen:  # second step: targets of 0.6 on every row group (cosines are lower: every row gets adjusted)
            for group in list(state.targets):
                if not group.startswith("dense"):
                    state.targets[group] = torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=F64)
            seen.clear()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        step(batch)
    after = model.state_dict()
    assert len(seen) == 2  # the embedding call and the first-order call
    changed_any = False
    for tasks, combined in seen:
        assert set(tasks) == {"income", "never_married"}
        names = [n for n, _ in combined]
        if row_groups == "table":
            for k, (name, g) in enumerate(combined):
                ref, _ = ref_surgery([tasks["income"][k].double().reshape(-1),
                                      tasks["never_married"][k].double().reshape(-1)],
                                     torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=F64), 0.01)
                torch.testing.assert_close(g.double().reshape(-1), ref, rtol=1e-4, atol=1e-7)
        else:
            flat = [torch.cat([g.double().reshape(-1) for g in tasks[n]]) for n in ("income", "never_married")]
            ref, _ = ref_surgery(flat, torch.tensor([[0.0, 0.6], [0.6, 0.0]], dtype=F64), 0.01)
            torch.testing.assert_close(torch.cat([g.double().reshape(-1) for _, g in combined]), ref, rtol=1e-4,
                                       atol=1e-7)
        raw = torch.cat([(tasks["income"][k] + tasks["never_married"][k]).reshape(-1) for k in range(len(names))])
        changed_any |= not torch.allclose(torch.cat([g.reshape(-1) for _, g in combined]), raw)
    assert changed_any  # the surgery changed g_main
    rows = _batch_rows(batch, meta)
    moved = 0
    for key, value in after.items():
        if "embedding_bags" not in key:
            continue
        table = key.split("embedding_bags.")[1].split(".")[0]  # t_<field>
        changed = (value != before[key]).any(1).nonzero().flatten().tolist()
        assert set(changed) <= rows[table[2:]], key
        moved += len(changed)
    assert moved > 20


@pytest.mark.parametrize("barrier", ["paper", "applied"])
def test_ours_and_gradvac_together(adult, monkeypatch, barrier):
    """+Ours (MMD on native-country and occupation) with GradVac on real two-task batches: finite losses, only batch
    rows change, the barrier receives the surgered g_main, and its invariant holds on that g_main."""
    from recsys_transfer.multitask import surgery as surgery_mod
    from recsys_transfer.transfer import barrier as barrier_mod

    out, meta, domains = adult
    model, step = _step(meta, domains, TransferConfig(mode="+Ours", loss="mmd", fields=FIELDS, barrier=barrier),
                        surgery="gradvac", weighting="uncertainty")
    surgered, checked = [], []
    original = surgery_mod.RowSurgery.__call__

    def spy_surgery(self, call, context):
        original(self, call, context)
        surgered.append({t.slot.name: t.grad.clone() for t in call.tables})

    monkeypatch.setattr(surgery_mod.RowSurgery, "__call__", spy_surgery)
    if barrier == "paper":
        direction = barrier_mod.barrier_direction

        def spy(g, t, main_loss, alpha):
            mu, lam = direction(g, t, main_loss, alpha)
            gd, md = g.double(), mu.double()
            phi = alpha * torch.minimum((gd * gd).sum(1), torch.as_tensor(main_loss, dtype=F64))
            checked.append(((gd * md).sum(1) - phi, g.clone()))
            return mu, lam

        monkeypatch.setattr(barrier_mod, "barrier_direction", spy)
    else:
        call = barrier_mod.AppliedBarrier.__call__

        def spy(self, g, u, v):
            delta = call(self, g, u, v)
            gd, ud = g.double(), u.double()
            ru, gg = (gd * ud).sum(1), (gd * gd).sum(1)
            phi = torch.where(ru > 0, ru * torch.clamp(float(self.main_loss) / gg, max=1.0), ru)
            checked.append(((gd * delta.double()).sum(1) - phi, g.clone()))
            return delta

        monkeypatch.setattr(barrier_mod.AppliedBarrier, "__call__", spy)
    losses = []
    for batch in _batches(out, 6):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        surgered.clear()
        losses.append(step(batch).loss)
        after = model.state_dict()
        rows = _batch_rows(batch, meta)
        for key, value in after.items():
            if "embedding_bags" in key:
                changed = (value != before[key]).any(1).nonzero().flatten().tolist()
                assert set(changed) <= rows[key.split("embedding_bags.")[1].split(".")[0][2:]], key
    assert all(math.isfinite(x) for x in losses)
    assert len(checked) >= 6
    for slack, g in checked:
        assert bool((slack >= -1e-5 * (1 + slack.abs())).all())
    # the barrier's g_main is the surgery's output (last step: the rows of the transfer tables, in table order)
    last = next(s for s in surgered if "embedding.t_occupation" in s)
    order = [f.name for f in meta.sparse]
    transfer_rows = torch.cat([last[f"embedding.t_{f}"] for f in sorted(FIELDS, key=order.index)])
    assert torch.equal(checked[-1][1].reshape(transfer_rows.shape), transfer_rows)
    targets = step.surgery.surgery.targets
    assert any(g.startswith("dense") for g in targets) and "embedding.t_occupation" in targets
    assert float(step.weighting.log_vars.detach().abs().sum()) > 0


def test_no_multitask_section_keeps_the_plain_step(adult):
    out, meta, _ = adult
    _, step = _step(meta)
    assert step.weighting is None and step.surgery is None and not step.per_task
    assert [t.stage for t in step.rows.transforms] == []


# ---------------------------------------------------------------------------------------------------------
# checkpointed state


def test_train_state_round_trips_surgery_and_weighting(adult, tmp_path):
    """Train 3 steps, save the train state, continue 3 steps; a fresh run loading the checkpoint and doing the same
    3 steps ends bitwise equal (GradVac targets, task-order generator, uncertainty log-variances and their Adam
    state all restored)."""
    import torch.distributed.checkpoint as dcp

    from recsys_transfer.train.loop import FitResult
    from recsys_transfer.train.state import TrainState

    out, meta, _ = adult
    batches = list(_batches(out, 6))
    cfg = dict(surgery="gradvac", weighting="uncertainty", groups="parameter", beta=0.3)
    model, step = _step(meta, **cfg)
    for b in batches[:3]:
        step(b)
    state = TrainState(model, step, None, FitResult(), meta={"run_id": "t"})
    dcp.save(state.state_dict(), checkpoint_id=str(tmp_path / "ck"))
    for b in batches[3:]:
        step(b)
    model2, step2 = _step(meta, **cfg)
    TrainState(model2, step2, None, FitResult(), meta={"run_id": "t"}).load(tmp_path / "ck")
    model4, step4 = _step(meta, **cfg)  # the control: the same checkpoint without GradVac's targets
    TrainState(model4, step4, None, FitResult(), meta={"run_id": "t"}).load(tmp_path / "ck")
    assert step4.surgery.surgery.targets
    step4.surgery.surgery.targets.clear()
    for b in batches[3:]:
        step2(b)
        step4(b)
    assert not all(torch.equal(v, v4) for v, v4 in zip(model.state_dict().values(), model4.state_dict().values()))
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    assert torch.equal(step.weighting.log_vars, step2.weighting.log_vars)
    s1, s2 = step.surgery.surgery, step2.surgery.surgery
    assert s1.targets.keys() == s2.targets.keys() and all(torch.equal(s1.targets[g], s2.targets[g]) for g in s1.targets)
    assert torch.equal(s1.generator.get_state(), s2.generator.get_state())
    # a run without surgery refuses the checkpoint
    model3, step3 = _step(meta, weighting="uncertainty")
    with pytest.raises(UserError, match="surgery"):
        TrainState(model3, step3, None, FitResult(), meta={"run_id": "t"}).load(tmp_path / "ck")


@pytest.mark.slow
def test_killed_run_with_gradvac_resumes_bitwise(adult, tmp_path):
    """`recsys-transfer train` with GradVac and uncertainty weighting, killed after a mid-epoch checkpoint and
    resumed, ends with every checkpointed tensor, the epoch records and the surgery state equal to an uninterrupted
    run's."""
    import pickle

    import torch.distributed.checkpoint as dcp

    out, _, _ = adult
    cfg = tmp_path / "mt.yaml"
    cfg.write_text(f"""data: {{path: {out}}}
model: {{name: deepfm, params: {{embedding_dim: 8, hidden: [32]}}}}
rows: {{optimizer: adam, lr: 1.0e-2}}
multitask: {{weighting: uncertainty, surgery: gradvac, beta: 0.1, groups: layer}}
train: {{epochs: 2, batch_size: 4096, lr: 1.0e-3, progress: false}}
checkpoint: {{every_steps: 4, keep: 2}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def train(run: Path, fault: int | None = None) -> subprocess.CompletedProcess:
        fault_env = {"RECSYS_TRANSFER_FAULT_STEP": str(fault), "RECSYS_TRANSFER_FAULT_RANK": "0"} if fault else {}
        e = {**env, **fault_env}
        return subprocess.run([sys.executable, "-m", "recsys_transfer", "train", "--config", str(cfg), "--output",
                               str(run)], capture_output=True, text=True, timeout=600, env=e)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(whole).returncode == 0
    killed = train(cut, fault=14)  # 10 batches per epoch: epoch 1, 2 steps after the checkpoint of step 12
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = train(cut)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]

    def final(run: Path):
        path = sorted((run / "checkpoints").glob("step-*"))[-1]
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items()
                   if hasattr(m, "size")}
        blob = {"rank0": b""}
        dcp.load(tensors, checkpoint_id=str(path))
        dcp.load(blob, checkpoint_id=str(path))
        return tensors, pickle.loads(blob["rank0"])["surgery"]

    (ta, sa), (tb, sb) = final(whole), final(cut)
    assert ta.keys() == tb.keys() and "multitask.log_vars" in ta and "dense.multitask.log_vars.exp_avg" in ta
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert sa["targets"].keys() == sb["targets"].keys() and len(sa["targets"]) > 2
    assert all(torch.equal(sa["targets"][g], sb["targets"][g]) for g in sa["targets"])
    assert torch.equal(sa["generator"], sb["generator"])
    timing = ("train/seconds", "train/rows_per_s")
    records = [[{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (r / "epochs.jsonl").read_text().splitlines()] for r in (whole, cut)]
    assert records[0] == records[1] and len(records[0]) == 2


def test_the_readme_example_loads_and_trains(adult, tmp_path):
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if b.startswith("multitask:")]
    assert len(blocks) == 1
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: runs/x}\n" + blocks[0])
    mt = load_config(path).multitask
    assert (mt.weighting, mt.surgery, mt.groups, mt.row_groups, mt.beta, mt.tasks) == (
        "uncertainty", "gradvac", "layer", "table", 0.01, ("never_married",))
    out, meta, _ = adult
    model, step = _step(meta, **{k: getattr(mt, k) for k in ("weighting", "surgery", "groups", "row_groups", "beta",
                                                              "tasks", "seed")})
    assert step.per_task
    for batch in _batches(out, 3):
        assert math.isfinite(step(batch).loss)
    targets = step.surgery.surgery.targets
    assert targets and all(bool((t[0] == 0).all()) for t in targets.values())  # income (not chosen) has no EMA


@pytest.mark.parametrize("row_groups", ["table", "tables"])
def test_row_surgery_whole_array_path_equals_per_table_path(adult, monkeypatch, row_groups):
    """Tables sharing one buffer take the whole-array path (one segmented combine over the call's rows); without
    the whole arrays (sharded tables, mixed widths) the per-table path: the same weights after 4 GradVac steps."""
    from recsys_transfer.multitask import surgery as surgery_mod

    out, meta, _ = adult
    original = surgery_mod.RowSurgery.__call__
    states, taken = [], []
    for path in ("whole", "per_table", "unshared"):  # unshared: as a sharded call, no shared view at all
        def spy(self, call, context, path=path):
            taken.append(bool(call.task_whole))
            if path != "whole":
                call.task_whole = {}
            if path == "unshared":
                call.shared = None
            original(self, call, context)

        monkeypatch.setattr(surgery_mod.RowSurgery, "__call__", spy)
        model, step = _step(meta, surgery="gradvac", beta=0.5, row_groups=row_groups)
        for batch in _batches(out, 4):
            step(batch)
        states.append((model.state_dict(), step.surgery.surgery.targets))
    assert all(taken) and len(taken) == 24
    (a, ta) = states[0]
    for b, tb in states[1:]:
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
        assert ta.keys() == tb.keys()
        for g in ta:
            torch.testing.assert_close(ta[g], tb[g], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "fdn"])
def test_surgery_trains_the_multi_task_models(adult, name):
    """GradVac with uncertainty weighting on the multi-task models (FDN's model terms are not surgery tasks: their
    gradients are added unchanged): finite losses, targets for the shared experts and the rows, none for the task
    towers (one task reaches each)."""
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.train.compose import compose_step

    out, meta, _ = adult
    torch.manual_seed(0)
    model = build_model(name, meta)
    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-3),
                        multitask=MultitaskConfig(surgery="gradvac", weighting="uncertainty"))
    losses = [step(batch).loss for batch in _batches(out, 3, 256)]
    assert all(math.isfinite(x) for x in losses)
    groups = step.surgery.surgery.targets
    assert any(g.startswith("embedding.") for g in groups) and any(g.startswith("dense:") for g in groups)
    assert not any("tower" in g for g in groups)
