"""The barrier on the applied update (``transfer.barrier: applied``): the row optimizer's split update against a
float64 reference written out row by row here, the invariant on the update that is applied, for every row
optimizer; the paper's update under SGD; untouched rows and state; the pipeline on real ML-100K batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.flat import share_storage
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.objectives import Objective
from recsys_transfer.optim.rowwise import make_row_optimizer
from recsys_transfer.rows import pipeline as pipeline_mod
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.train.step import TrainStep
from recsys_transfer.transfer import barrier as barrier_mod
from recsys_transfer.transfer.barrier import AppliedBarrier, applied_barrier, transfer_transform
from recsys_transfer.transfer.domains import load_domains, select_command
from recsys_transfer.types import Batch

OPTIMIZERS = {  # name -> (make_row_optimizer name, kwargs)
    "sgd": ("sgd", {"lr": 0.1}),
    "momentum": ("momentum", {"lr": 0.1, "momentum": 0.9}),
    "nesterov": ("momentum", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "sgd_wd": ("sgd", {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1}),
    "adam": ("adam", {"lr": 0.01}),
    "adamw": ("adam", {"lr": 0.01, "weight_decay": 0.1}),
    "rowwise_adagrad": ("rowwise_adagrad", {"lr": 0.1, "weight_decay": 0.05}),
}


# -- the reference: each optimizer's update of ONE row, and the barrier, with plain Python floats -------------------
class RefRow:
    """One row's optimizer state for one direction (main or transfer), float64 lists."""

    def __init__(self, dim: int) -> None:
        self.buf = [0.0] * dim
        self.m = [0.0] * dim
        self.v = [0.0] * dim
        self.n = 0
        self.s = 0.0

    def update(self, kind: str, kw: dict, d: list[float], w: list[float], main: bool) -> list[float]:
        """The update ``delta`` (weights move by ``-delta``) of direction ``d`` at weights ``w``."""
        lr, wd = kw["lr"], kw.get("weight_decay", 0.0) if main else 0.0
        if kind in ("sgd", "momentum"):
            d = [x + wd * y for x, y in zip(d, w)]
            mom = kw.get("momentum", 0.9 if kind == "momentum" else 0.0)
            if mom:
                self.buf = [mom * b + x for b, x in zip(self.buf, d)]
                d = [x + mom * b for x, b in zip(d, self.buf)] if kw.get("nesterov") else list(self.buf)
            return [lr * x for x in d]
        if kind == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            self.m = [b1 * m + (1 - b1) * x for m, x in zip(self.m, d)]
            self.v = [b2 * v + (1 - b2) * x * x for v, x in zip(self.v, d)]
            self.n += 1
            return [lr * (m / (1 - b1 ** self.n)) / (math.sqrt(v / (1 - b2 ** self.n)) + eps)
                    for m, v in zip(self.m, self.v)]
        d = [x + wd * y for x, y in zip(d, w)]  # row-wise adagrad
        self.s += sum(x * x for x in d) / len(d)
        return [lr * x / (math.sqrt(self.s) + 1e-8) for x in d]


def ref_barrier(g, u, v, loss, alpha, max_ratio):
    """The applied barrier of one row (``applied_barrier``'s docstring), written out."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    if max_ratio is not None:
        nu, nv = math.sqrt(dot(u, u)), math.sqrt(dot(v, v))
        if nv > max_ratio * nu:
            v = [x * max_ratio * nu / nv for x in v]
    gg, ru, rv = dot(g, g), dot(g, u), dot(g, v)
    if ru > 0:
        phi = alpha * ru * min(1.0, loss / gg)
        lam = min(max((phi - rv) / ru, 0.0), alpha)
    else:
        phi, lam = ru, 1.0
    short = max(phi - rv - lam * ru, 0.0)
    s = short / gg if gg > 0 else 0.0
    return [a + lam * b + s * c for a, b, c in zip(v, u, g)], phi, lam, short


def _state_snapshot(opt) -> dict:
    return {(id(p), k): t.clone() for p, st in opt.state.items() for k, t in st.items()}


@pytest.mark.parametrize("max_ratio", [None, 0.5])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_split_update_matches_reference_and_the_invariant_holds(name, alpha, max_ratio):
    kind, kw = OPTIMIZERS[name]
    kind = {"momentum": "momentum", "sgd": "sgd"}.get(kind, kind)
    torch.manual_seed(0)
    dim, sizes = 3, (7, 5)
    tables = [torch.nn.Parameter(torch.randn(n, dim, dtype=torch.float64)) for n in sizes]
    opt = make_row_optimizer(kind, tables, names=["a", "b"], **kw)
    opt.enable_transfer_state(tables)
    ref = {(k, r): (RefRow(dim), RefRow(dim)) for k, n in enumerate(sizes) for r in range(n)}
    seen = {"ru<=0": 0, "lam=alpha": 0, "short>0": 0, "ratio": 0}
    for step in range(8):
        rows = [torch.sort(torch.randperm(n)[: n - 2]).values for n in sizes]  # 2 rows per table untouched
        g = [torch.randn(len(r), dim, dtype=torch.float64) * (0.2 if step % 3 == 2 else 1.0) for r in rows]
        t = [torch.randn(len(r), dim, dtype=torch.float64) * 2 for r in rows]
        loss = 0.7 if step % 2 else 0.05  # some rows with ||g||^2 > l_main
        before = [w.detach().clone() for w in tables]
        state_before = _state_snapshot(opt)
        combine = AppliedBarrier(torch.tensor(loss, dtype=torch.float64), alpha, max_ratio, [], [])
        opt.update_rows_split(list(tables), rows, g, t, combine)
        for k, (w, r) in enumerate(zip(tables, rows)):
            untouched = torch.ones(sizes[k], dtype=torch.bool)
            untouched[r] = False
            assert torch.equal(w.detach()[untouched], before[k][untouched])
            for key, st in opt.state[w].items():  # every state tensor, main and transfer_, untouched rows bitwise
                was = state_before.get((id(w), key), torch.zeros_like(st))  # state is created zero at first use
                assert torch.equal(st[untouched], was[untouched]), key
            for j, row in enumerate(r.tolist()):
                main, transfer = ref[(k, row)]
                wr = before[k][row].tolist()
                gi, ti = g[k][j].tolist(), t[k][j].tolist()
                u = main.update(kind, kw, gi, wr, main=True)
                v = transfer.update(kind, kw, ti, wr, main=False)
                if max_ratio is not None and math.dist(v, [0] * dim) > max_ratio * math.dist(u, [0] * dim):
                    seen["ratio"] += 1
                delta, phi, lam, short = ref_barrier(gi, u, v, loss, alpha, max_ratio)
                if kind == "adam" and kw.get("weight_decay"):
                    wr = [x * (1 - kw["lr"] * kw["weight_decay"]) for x in wr]  # decoupled decay, then the update
                expect = [x - d for x, d in zip(wr, delta)]
                got = w.detach()[row].tolist()
                assert got == pytest.approx(expect, rel=1e-11, abs=1e-13), (name, step, k, row)
                applied = [a - b for a, b in zip(wr, got)]  # the update that was applied (decay excluded)
                assert sum(x * y for x, y in zip(gi, applied)) >= phi - 1e-11 * (1 + abs(phi)), (name, step, row)
                ru = sum(x * y for x, y in zip(gi, u))
                seen["ru<=0"] += ru <= 0
                seen["lam=alpha"] += ru > 0 and lam == alpha
                seen["short>0"] += short > 0
    # the branches the invariant depends on were all exercised
    assert seen["lam=alpha"] > 0 and seen["short>0"] > 0, seen
    if name in ("momentum", "nesterov", "adam", "adamw", "sgd_wd"):
        assert seen["ru<=0"] > 0, seen  # B's own update ascends for some rows: not slower than it there
    if max_ratio is not None:
        assert seen["ratio"] > 0, seen


def test_applied_barrier_with_sgd_is_algorithm_1():
    """u = g, v = t, no trust bound: Eq. 6-7 (barrier_direction); bitwise where ||g||^2 <= l_main and
    <g, t> >= 0 (lambda <= alpha, no make-up along g), to rounding elsewhere."""
    torch.manual_seed(3)
    g = torch.randn(200, 8, dtype=torch.float64) * torch.rand(200, 1, dtype=torch.float64)
    t = torch.randn(200, 8, dtype=torch.float64)
    g[:5] = 0  # rows without main gradient: mu = t
    for loss in (1.5, 50.0):
        mu, lam = barrier_mod.barrier_direction(g, t, loss, 2.0)
        delta, lam2 = applied_barrier(g, g, t, loss, 2.0, None)
        same = ((g * g).sum(1) <= loss) & ((g * t).sum(1) >= 0)
        assert same.sum() > 20 and (~same).sum() > 20
        assert torch.equal(delta[same], mu[same])
        torch.testing.assert_close(delta, mu, rtol=1e-13, atol=1e-15)
        assert torch.equal(delta[:5], t[:5])


def test_split_state_round_trips_by_name():
    tables = [torch.nn.Parameter(torch.randn(n, 4, dtype=torch.float64)) for n in (6, 3)]
    opt = make_row_optimizer("adam", tables, names=["x", "y"], lr=0.01)
    opt.enable_transfer_state(tables)
    rows = [torch.tensor([0, 4]), torch.tensor([2])]
    combine = AppliedBarrier(torch.tensor(0.5, dtype=torch.float64), 1.0, 0.3, [], [])
    opt.update_rows_split(list(tables), rows, [torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)],
                          [torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)], combine)
    sd = opt.state_dict()
    assert set(sd["state"]["x"]) == {"exp_avg", "exp_avg_sq", "row_step", "transfer_exp_avg", "transfer_exp_avg_sq",
                                     "transfer_row_step"}
    assert int(sd["state"]["x"]["transfer_row_step"][4]) == 1 and int(sd["state"]["x"]["transfer_row_step"][1]) == 0
    other = [torch.nn.Parameter(t.detach().clone()) for t in reversed(tables)]
    opt2 = make_row_optimizer("adam", other, names=["y", "x"], lr=0.01)
    opt2.load_state_dict(sd)
    for name, p in (("x", other[1]), ("y", other[0])):
        for key, value in sd["state"][name].items():
            assert torch.equal(opt2.state[p][key], value)


def test_split_update_needs_enabled_tables():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = make_row_optimizer("sgd", [w], lr=0.1)
    with pytest.raises(ValueError, match="enable_transfer_state"):
        opt.update_rows_split([w], [torch.tensor([0])], [torch.ones(1, 2)], [torch.ones(1, 2)], lambda g, u, v: u)


def test_transfer_config_barrier_settings():
    assert TransferConfig(barrier="paper").barrier_alpha == 2.0
    assert TransferConfig(barrier="applied").barrier_alpha == 1.0
    assert TransferConfig(barrier="applied", alpha=1.5).barrier_alpha == 1.5
    with pytest.raises(ValueError, match="transfer.barrier"):
        TransferConfig(barrier="adam")
    with pytest.raises(ValueError, match="max_ratio"):
        TransferConfig(max_ratio=0.0)


# -- the pipeline on real ML-100K batches ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k_selected(ml100k_prepared):
    out, meta = ml100k_prepared
    select_command(out, ["zip", "user_id"], out / "selection_applied")
    return out, meta, load_domains(out / "selection_applied", ("zip", "user_id"), meta)


LIST_FIELDS = ("item", "tags")


@pytest.fixture(scope="module")
def lists_selected(lists_prepared):
    """tests/conftest.py's list dataset with the selective target domains of item (whose table t_item also serves
    the hist lists) and tags (a list field): the selection counts list fields' ids as co-occurrences."""
    out, meta = lists_prepared
    select_command(out, list(LIST_FIELDS), out / "selection_applied", top_k=50)
    return out, meta, load_domains(out / "selection_applied", LIST_FIELDS, meta)


def _deepfm_step(meta, domains, optimizer: str, barrier: str, max_ratio, lr: float, alpha: float | None = None,
                 fields=("zip", "user_id"), pooling=None):
    """DeepFM in float64 with +Ours (MMD) on ``fields`` (zip and user_id), the tables in one buffer per
    collection."""
    torch.manual_seed(5)
    model = DeepFM(meta, embedding_dim=8, hidden=(16,), pooling=pooling).double()
    for ebc in (model.embedding, model.linear.tables):  # .double() gave each table its own storage
        share_storage([bag.weight for bag in ebc.embedding_bags.values()])
    rows = attach_rows(model, RowsConfig(optimizer=optimizer, lr=lr))
    rows.add_transform(transfer_transform(rows, meta, TransferConfig(
        mode="+Ours", loss="mmd", fields=fields, barrier=barrier, max_ratio=max_ratio, alpha=alpha),
        domains))
    step = TrainStep(model, Objective(meta.tasks), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
    return model, step


def _batches(out, n: int, size: int = 512):
    for k, b in enumerate(BatchLoader(out, "train", size, shuffle=True, seed=1, prefetch=0)):
        if k == n:
            return
        yield Batch(b.dense.double(), b.sparse, {name: v.double() for name, v in b.labels.items()})


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_sgd_applied_equals_paper_and_adagrad_differs(ml100k_selected, optimizer):
    """Under SGD the applied barrier without its trust bound is the paper's update (whole DeepFM, 5 real batches,
    float64); under row-wise Adagrad the two barriers differ (the test would not notice a no-op)."""
    out, meta, domains = ml100k_selected
    models = {}
    for barrier in ("paper", "applied"):
        model, step = _deepfm_step(meta, domains, optimizer, barrier, None, 0.1, alpha=2.0)
        for batch in _batches(out, 5):
            step(batch)
        models[barrier] = model.state_dict()
    diffs = [float((models["paper"][k] - models["applied"][k]).abs().max()) for k in models["paper"]]
    if optimizer == "sgd":
        for k in models["paper"]:
            torch.testing.assert_close(models["applied"][k], models["paper"][k], rtol=1e-12, atol=1e-14)
    else:
        assert max(diffs) > 1e-4


@pytest.mark.parametrize("dataset", ["ml100k", "lists"])
def test_applied_update_on_real_batches(request, monkeypatch, dataset):
    """Adam rows, DeepFM on ML-100K (and on the list dataset: t_item serving item and the mean-pooled hist lists,
    tags a list field): for every touched row of the tables under transfer, (1) the main part ``u`` is exactly
    the update mode B's optimizer applies from the same state, (2) the row moved by exactly the barrier's
    ``delta``, (3) ``<g_i, applied update> >= phi_i``."""
    out, meta, domains = request.getfixturevalue(f"{dataset}_selected")
    lists = dataset == "lists"
    model, step = _deepfm_step(meta, domains, "adam", "applied", 0.3, 0.01, **(
        dict(fields=LIST_FIELDS, pooling={"hist": "mean"}) if lists else {}))
    seen = []
    run_split = pipeline_mod.RowPipeline._run_split

    def spy(self, call, split):
        tables = list(split.tables)
        rows = [t.rows.clone() for t in tables]
        weights = [t.weight for t in tables]
        before = [w.detach().clone() for w in weights]
        shadow_w = [w.detach().clone() for w in weights]  # B's optimizer, from the same main state
        shadow = make_row_optimizer("adam", shadow_w, lr=0.01)
        for p, q in zip(weights, shadow_w):
            shadow.state[q] = {k: v.clone() for k, v in self.optimizer.state[p].items() if not k.startswith("transfer_")}
        shadow.update_rows_many(shadow_w, rows, [g.clone() for g in split.grads])
        captured = {}
        combine = split.combine

        def capture(g, u, v):
            delta = combine(g, u, v)
            captured.update(g=g.clone(), u=u.clone(), v=v.clone(), delta=delta.clone())
            return delta

        split.combine = capture
        run_split(self, call, split)
        b_update = torch.cat([(b - s.detach()).index_select(0, r) for b, s, r in zip(before, shadow_w, rows)])
        applied = torch.cat([(b - w.detach()).index_select(0, r) for b, w, r in zip(before, weights, rows)])
        seen.append((captured, b_update, applied, float(combine.main_loss)))

    monkeypatch.setattr(pipeline_mod.RowPipeline, "_run_split", spy)
    for batch in _batches(out, 6, 256 if lists else 512):
        step(batch)
    assert len(seen) == 6
    for captured, b_update, applied, loss in seen:
        g, u = captured["g"], captured["u"]
        torch.testing.assert_close(u, b_update, rtol=1e-12, atol=1e-15)  # (1)
        torch.testing.assert_close(applied, captured["delta"], rtol=1e-12, atol=1e-15)  # (2)
        ru, gg = (g * u).sum(1), (g * g).sum(1)
        phi = torch.where(ru > 0, ru * torch.clamp(loss / gg, max=1.0), ru)
        assert bool(((g * applied).sum(1) >= phi - 1e-12 * (1 + phi.abs())).all())  # (3), alpha = 1
        assert len(g) > (50 if lists else 100)


# -- cost controls: transfer.max_rows, transfer.disc_every -------------------------------------------------------------
def test_subsample_slots_draws_each_side_uniformly():
    from recsys_transfer.transfer.barrier import subsample_slots

    gen = torch.Generator().manual_seed(0)
    src = torch.zeros(2, 30, dtype=torch.bool)
    tgt = torch.zeros(2, 30, dtype=torch.bool)
    src[0, :12], tgt[0, 12:20] = True, True  # table 0: 12 source rows (> k), 8 target rows
    src[1, :3], tgt[1, 3:25] = True, True  # table 1: 3 source rows (< k), 22 target rows
    k, draws = 5, 4000
    counts_src, counts_tgt = torch.zeros(2, 30), torch.zeros(2, 30)
    for _ in range(draws):
        pick, s, t = subsample_slots(src, tgt, k, gen)
        assert pick.shape == s.shape == t.shape == (2, 2 * k)
        assert s[:, k:].sum() == 0 and t[:, :k].sum() == 0  # each half keeps its own side only
        assert bool((s <= src.gather(1, pick)).all() and (t <= tgt.gather(1, pick)).all())
        for j in range(2):  # no row counted twice
            chosen = pick[j][s[j] | t[j]]
            assert len(chosen) == len(set(chosen.tolist()))
        assert s.sum(1).tolist() == [5, 3] and t.sum(1).tolist() == [5, 5]
        counts_src.scatter_add_(1, pick[:, :k], s[:, :k].double().float())
        counts_tgt.scatter_add_(1, pick[:, k:], t[:, k:].double().float())
    freq_s, freq_t = counts_src / draws, counts_tgt / draws
    torch.testing.assert_close(freq_s[0, :12], torch.full((12,), 5 / 12), atol=0.03, rtol=0)
    torch.testing.assert_close(freq_s[1, :3], torch.ones(3), atol=0, rtol=0)  # fewer than k: all of them, always
    torch.testing.assert_close(freq_t[0, 12:20], torch.full((8,), 5 / 8), atol=0.03, rtol=0)
    torch.testing.assert_close(freq_t[1, 3:25], torch.full((22,), 5 / 22), atol=0.03, rtol=0)
    assert subsample_slots(src[:, :5], tgt[:, :5], 5, gen) is None  # nothing to leave out


def test_max_rows_gives_an_unbiased_adversarial_row_gradient():
    """The mean over draws of the subsampled gradient (rows left out: zero) equals the full gradient (float64)."""
    from recsys_transfer.transfer.barrier import TransferTransform
    from recsys_transfer.transfer.losses import AdversarialLoss

    torch.manual_seed(0)
    loss = AdversarialLoss(2, 4, hidden=8, dtype=torch.float64, update_every=10 ** 9)  # frozen after its first call
    x = torch.randn(2, 40, 4, dtype=torch.float64)
    src = torch.zeros(2, 40, dtype=torch.bool)
    tgt = torch.zeros(2, 40, dtype=torch.bool)
    src[:, :15], tgt[:, 15:33] = True, True
    index = torch.tensor([0, 1])
    full_t = TransferTransform({}, {}, max_rows=None)
    full_t._loss_grad(loss, x, None, src, tgt, index, 4)  # the discriminators take their one step
    _, full = full_t._loss_grad(loss, x, None, src, tgt, index, 4)
    sampled = TransferTransform({}, {}, max_rows=6, seed=1)
    mean = torch.zeros_like(full)
    draws = 3000
    for _ in range(draws):
        _, g = sampled._loss_grad(loss, x, None, src, tgt, index, 4)
        assert int((g.abs().sum(1) > 0).sum()) <= 2 * 6  # only drawn target rows get a gradient
        mean += g / draws
    assert float(full.abs().sum()) > 0
    torch.testing.assert_close(mean, full, rtol=0, atol=0.08 * float(full.abs().max()))


def test_disc_every_steps_the_discriminators_on_every_kth_call():
    from recsys_transfer.transfer.losses import AdversarialLoss

    torch.manual_seed(0)
    x = torch.randn(1, 20, 4)
    src = torch.zeros(1, 20, dtype=torch.bool)
    tgt = torch.zeros(1, 20, dtype=torch.bool)
    src[0, :8], tgt[0, 8:] = True, True
    every = AdversarialLoss(1, 4, hidden=8, update_every=3)
    params = []
    for _ in range(7):
        params.append(every.w1.detach().clone())
        every.grad(x, src, tgt, torch.tensor([0]))
    moved = [not torch.equal(params[k], params[k + 1]) for k in range(6)]
    assert moved == [True, False, False, True, False, False]
    assert int(every._adam[2][0]) == 3  # three Adam steps in 7 calls (calls 0, 3, 6)
    with pytest.raises(ValueError, match="disc_every"):
        TransferConfig(loss="mmd", disc_every=2)
    with pytest.raises(ValueError, match="max_rows"):
        TransferConfig(max_rows=0)


@pytest.mark.parametrize("barrier", ["applied", "paper"])
def test_cost_controls_on_real_batches(ml100k_selected, barrier):
    """+Ours with max_rows and disc_every on ML-100K DeepFM: it trains, the loss sees at most max_rows rows per side
    (the statistics still count every domain row present), and it differs from the exact method."""
    out, meta, domains = ml100k_selected
    results = {}
    for name, extra in (("exact", {}), ("cheap", {"max_rows": 16, "disc_every": 2})):
        torch.manual_seed(5)
        model = DeepFM(meta, embedding_dim=8, hidden=(16,))
        rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01))
        transfer = transfer_transform(rows, meta, TransferConfig(mode="+Ours", loss="adversarial",
                                                                 fields=("zip", "user_id"), barrier=barrier, **extra),
                                      domains)
        rows.add_transform(transfer)
        step = TrainStep(model, Objective(meta.tasks), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
        for b in BatchLoader(out, "train", 512, shuffle=True, seed=1, prefetch=0):
            step(b)
            if transfer.losses[8].calls == 4:
                break
        results[name] = (model.state_dict(), transfer.stats())
    exact, cheap = results["exact"], results["cheap"]
    assert cheap[1]["embedding.t_user_id"]["target_rows"] > 16  # counted, although only 16 entered the loss
    assert cheap[1]["embedding.t_user_id"]["source_rows"] == exact[1]["embedding.t_user_id"]["source_rows"]
    w = "embedding.embedding_bags.t_user_id.weight"
    assert not torch.equal(exact[0][w], cheap[0][w])
