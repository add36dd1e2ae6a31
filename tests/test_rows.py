"""The row pipeline's stages on real ML-100K batches: per-task recording, freezing, clipping, stage order, row
optimizer state keyed by table name, and the step's non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch

from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.errors import UserError
from recsys_transfer.flat import share_storage
from recsys_transfer.models.deepfm import DeepFM
from recsys_transfer.objectives import Objective
from recsys_transfer.optim.rowwise import make_row_optimizer
from recsys_transfer.rows.lookup import attach_rows
from recsys_transfer.rows.pipeline import ClipRowNorm, FreezeTables, RowTransform
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.train.step import NonFiniteLoss, TrainStep
from recsys_transfer.transfer.barrier import transfer_transform

TASKS = (TaskSpec("click", label="label"), TaskSpec("score", label="label", kind="regression", weight=0.3))


def _model(meta, double: bool = True) -> DeepFM:
    torch.manual_seed(11)
    model = DeepFM(meta, embedding_dim=4, hidden=(8,), tasks=TASKS)
    if double:
        model = model.double()
        for ebc in (model.embedding, model.linear.tables):
            share_storage([bag.weight for bag in ebc.embedding_bags.values()])
    return model


def _batches(out, meta, n: int, size: int = 256):
    from recsys_transfer.types import Batch

    got = []
    for k, b in enumerate(BatchLoader(out, "train", size, shuffle=True, seed=3, meta=meta, prefetch=0)):
        if k == n:
            break
        got.append(Batch(b.dense.double(), b.sparse, {n_: v.double() for n_, v in b.labels.items()}))
    return got


class Spy(RowTransform):
    """Keeps what the surgery stage sees: the per-task row gradients and the combined one."""

    stage = "surgery"

    def __init__(self) -> None:
        self.seen = []

    def __call__(self, call, context) -> None:
        self.seen.append(({k: [g.clone() for g in v] for k, v in call.task_grads.items()},
                          [t.grad.clone() for t in call.tables]))


@pytest.mark.parametrize("mode", ["B", "+Ours"])
def test_per_task_recording_equals_one_backward_and_sums_to_it(ml100k_prepared, mode):
    out, meta = ml100k_prepared
    batches = _batches(out, meta, 4)
    rng = torch.Generator().manual_seed(0)
    domains = {f: (torch.rand(meta.field(f).vocab_size, generator=rng) > 0.3).numpy() & meta.field(f).tail_mask()
               for f in ("zip", "user_id")}
    runs = []
    for per_task in (False, True):
        model = _model(meta)
        rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01, per_task=per_task))
        transfer = transfer_transform(rows, meta, TransferConfig(mode=mode, loss="moment", fields=("zip", "user_id")),
                                      domains)
        if transfer is not None:
            rows.add_transform(transfer)
        spy = Spy()
        rows.add_transform(spy)
        step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows,
                         per_task=per_task)
        losses = [step(b).loss for b in batches]
        runs.append((model, rows, spy, losses))
    (m1, r1, s1, l1), (m2, r2, s2, l2) = runs
    assert l1 == pytest.approx(l2, rel=1e-12)
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert len(s1.seen) == len(s2.seen) == 8  # 4 steps x (embedding, first-order) calls
    assert all(not tg for tg, _ in s1.seen)  # one backward: no per-task slots
    moved = 0.0
    for (task_grads, combined), (_, joint) in zip(s2.seen, s1.seen):
        assert sorted(task_grads) == ["click", "score"]
        for k, g in enumerate(combined):
            torch.testing.assert_close(task_grads["click"][k] + task_grads["score"][k], g, rtol=0, atol=0)
            torch.testing.assert_close(g, joint[k], rtol=1e-10, atol=1e-13)
            moved += float(task_grads["score"][k].abs().sum())
    assert moved > 0  # the second task's slot is not empty


def test_frozen_tables_never_change_and_the_others_do(ml100k_prepared):
    out, meta = ml100k_prepared
    batches = _batches(out, meta, 3)
    model = _model(meta)
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01, freeze=("embedding.t_zip", "t_user_id")))
    rows.add_transform(transfer_transform(rows, meta, TransferConfig(mode="lexico", loss="mmd", fields=("zip",))))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
    for b in batches:
        step(b)
    after = model.state_dict()
    frozen = {f"{c}.embedding_bags.t_{f}.weight" for c in ("embedding", "linear.tables") for f in ("user_id",)}
    frozen.add("embedding.embedding_bags.t_zip.weight")
    for key in frozen:
        assert torch.equal(after[key], before[key]), key
        param = dict(model.named_parameters())[key]
        assert all(p is not param for g in rows.optimizer.param_groups for p in g["params"]), key  # no state either
    assert not torch.equal(after["linear.tables.embedding_bags.t_zip.weight"], before["linear.tables.embedding_bags.t_zip.weight"])
    assert not torch.equal(after["embedding.embedding_bags.t_item_id.weight"], before["embedding.embedding_bags.t_item_id.weight"])
    assert rows.stats()["embedding.t_zip"]["target_rows"] > 0  # the frozen table still fed the transfer loss
    with pytest.raises(UserError, match=r"rows.freeze: unknown table\(s\) \['t_nope'\]"):
        FreezeTables(("t_nope",), rows.slots)


def test_a_table_with_requires_grad_false_is_frozen_like_rows_freeze(ml100k_prepared):
    """A model keeps a table fixed (PeterRec's pretrained item table) by requires_grad=False on its weight: the row
    pipeline then never updates it and keeps no optimizer state for it, exactly as rows.freeze names it."""
    out, meta = ml100k_prepared
    batches = _batches(out, meta, 2)
    model = _model(meta)
    key = "embedding.embedding_bags.t_zip.weight"
    dict(model.named_parameters())[key].requires_grad_(False)
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01))
    assert [t.stage for t in rows.transforms] == ["freeze"] and rows.transforms[0].names == {"embedding.t_zip"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
    for b in batches:
        step(b)
    after = model.state_dict()
    assert torch.equal(after[key], before[key])
    assert all(p is not dict(model.named_parameters())[key] for g in rows.optimizer.param_groups for p in g["params"])
    assert not torch.equal(after["linear.tables.embedding_bags.t_zip.weight"], before["linear.tables.embedding_bags.t_zip.weight"])


def test_clipping_bounds_every_applied_row_update(ml100k_prepared):
    out, meta = ml100k_prepared
    batch = _batches(out, meta, 1, size=512)[0]
    deltas = []
    for clip in (None, 0.02):
        model = _model(meta)
        rows = attach_rows(model, RowsConfig(optimizer="sgd", lr=1.0, clip_norm=clip))  # update = -direction
        before = {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" in k}
        TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.0), rows)(batch)
        deltas.append({k: before[k] - v for k, v in model.state_dict().items() if k in before})
    clipped = unclipped = 0
    for key, d in deltas[1].items():
        norm = torch.linalg.vector_norm(d, dim=1)
        free = torch.linalg.vector_norm(deltas[0][key], dim=1)
        assert bool((norm <= 0.02 * (1 + 1e-12)).all()), key
        big = free > 0.02
        torch.testing.assert_close(norm[big], torch.full_like(norm[big], 0.02))  # scaled onto the ball
        torch.testing.assert_close(d[~big], deltas[0][key][~big], rtol=0, atol=0)  # within it: unchanged
        clipped += int(big.sum())
        unclipped += int(((free > 0) & ~big).sum())
    assert clipped > 0 and unclipped > 0
    with pytest.raises(ValueError):
        ClipRowNorm(0.0)


def test_clipping_with_the_applied_barrier_bounds_both_inputs_and_the_other_tables(ml100k_prepared, monkeypatch):
    """Under ``transfer.barrier: applied`` the optimizer combines g and t itself: the clip stage bounds both of them
    for the tables under transfer, and the directions of the call's other tables."""
    from recsys_transfer.flat import join
    from recsys_transfer.rows import pipeline as pipeline_mod

    out, meta = ml100k_prepared
    batch = _batches(out, meta, 1, size=512)[0]
    model = _model(meta)
    clip = 1e-5
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01, clip_norm=clip))
    rows.add_transform(transfer_transform(rows, meta, TransferConfig(mode="lexico", loss="moment", fields=("zip",),
                                                                     barrier="applied")))
    seen = []
    original = pipeline_mod.RowPipeline._run_split

    def spy(self, call, split):
        ids = {id(t) for t in split.tables}
        others = [d for t, d in zip(call.tables, call.directions()) if id(t) not in ids]
        seen.append((join(split.grads), join(split.transfers), others, [t.grad for t in split.tables],
                     [t.grad for t in call.tables if id(t) not in ids]))
        return original(self, call, split)

    monkeypatch.setattr(pipeline_mod.RowPipeline, "_run_split", spy)
    TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.0), rows)(batch)
    assert len(seen) == 1
    g, t, others, raw_split, raw_others = seen[0]
    for x in [g, t, *others]:
        assert bool((torch.linalg.vector_norm(x, dim=1) <= clip * (1 + 1e-12)).all())
    assert len(others) == len(meta.sparse_names) - 1  # every embedding table but zip's, clipped too
    # the clip did something, on the split table and on the others
    assert all(bool((torch.linalg.vector_norm(r, dim=1) > clip).any()) for r in raw_split)
    assert any(bool((torch.linalg.vector_norm(r, dim=1) > clip).any()) for r in raw_others)
    assert float(torch.linalg.vector_norm(t, dim=1).max()) > 0


def test_stages_run_in_the_documented_order(ml100k_prepared):
    out, meta = ml100k_prepared
    model = _model(meta, double=False)
    rows = attach_rows(model, RowsConfig(clip_norm=1.0, freeze=("t_zip",)))
    rows.add_transform(transfer_transform(rows, meta, TransferConfig(mode="+T", loss="moment", fields=("zip",))))
    rows.add_transform(Spy())
    assert [t.stage for t in rows.transforms] == ["surgery", "transfer", "freeze", "clip"]
    bad = Spy()
    bad.stage = "later"
    with pytest.raises(ValueError, match="unknown stage"):
        rows.add_transform(bad)


def test_row_optimizer_state_is_keyed_by_table_name(ml100k_prepared):
    """A state saved from one pipeline loads into an optimizer whose tables are listed in another order; both
    then take the same next step."""
    out, meta = ml100k_prepared
    batches = _batches(out, meta, 3)
    model = _model(meta)
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01))
    step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
    for b in batches[:2]:
        step(b)
    saved = rows.optimizer.state_dict()
    assert sorted(saved["state"]) == sorted(s.name for s in rows.slots if rows.optimizer.state[s.weight])
    assert saved["param_groups"][0]["params"] == [s.name for s in rows.slots]

    twin = _model(meta)
    twin.load_state_dict(model.state_dict())
    twin_rows = attach_rows(twin, RowsConfig(optimizer="adam", lr=0.01))
    reordered = list(reversed(twin_rows.slots))
    twin_rows.optimizer = make_row_optimizer("adam", [s.weight for s in reordered], names=[s.name for s in reordered],
                                             lr=0.5)
    twin_rows.optimizer.load_state_dict(saved)
    assert twin_rows.optimizer.param_groups[0]["lr"] == 0.01  # hyper-parameters come from the saved groups
    for slot in twin_rows.slots:
        mine = rows.optimizer.state[rows.by_name[slot.name].weight]
        for key, value in twin_rows.optimizer.state[slot.weight].items():
            assert torch.equal(value, mine[key]), (slot.name, key)
    twin_step = TrainStep(twin, Objective(TASKS), torch.optim.SGD(twin_rows.dense_parameters(), lr=0.05), twin_rows)
    twin_step.dense.load_state_dict(step.dense.state_dict())
    step(batches[2])
    twin_step(batches[2])
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    broken = {**saved, "param_groups": [{**saved["param_groups"][0], "params": saved["param_groups"][0]["params"][1:]}]}
    with pytest.raises(ValueError, match="missing \\['embedding.t_user_id'\\]"):
        twin_rows.optimizer.load_state_dict(broken)


def test_a_plain_backward_outside_a_phase_still_updates_the_rows(ml100k_prepared):
    out, meta = ml100k_prepared
    batch = _batches(out, meta, 1)[0]
    model = _model(meta)
    rows = attach_rows(model, RowsConfig(optimizer="sgd", lr=0.1))
    before = model.embedding.embedding_bags["t_zip"].weight.detach().clone()
    Objective(TASKS).total(Objective(TASKS).losses(model(batch), {}, batch)).backward()
    assert not torch.equal(model.embedding.embedding_bags["t_zip"].weight.detach(), before)
    assert model.embedding.embedding_bags["t_zip"].weight.grad is None  # never a dense table gradient


@pytest.mark.parametrize("skip", [False, True])
def test_a_non_finite_loss_moves_nothing(ml100k_prepared, skip):
    out, meta = ml100k_prepared
    batch = _batches(out, meta, 1)[0]
    model = _model(meta)
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01))
    with torch.no_grad():
        model.bias[1] = math.inf  # the regression task's loss is infinite
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, Objective(TASKS), torch.optim.Adam(rows.dense_parameters(), lr=0.01), rows,
                     skip_nonfinite=skip)
    if skip:
        result = step(batch)
        assert result.skipped and math.isinf(result.loss)
    else:
        with pytest.raises(NonFiniteLoss, match=r"training loss is inf \(click [0-9.]+, score inf\)"):
            step(batch)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not any(rows.optimizer.state[w] for w in rows.table_weights)


class _ReadsRows(RowTransform):
    """A no-op stage that reads every table's rows: the lookups must then take their full (all-column) path."""

    stage = "clip"

    def __call__(self, call, context) -> None:
        pass

    def reads_rows(self, slot) -> bool:
        return True


@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad", "momentum"])
def test_one_column_path_equals_the_full_lookup_bitwise(ml100k_prepared, monkeypatch, optimizer):
    """The first-order tables' one-column path (RecordingColumnLookup: only column 0 gathered and summed) gives
    bitwise the weights, row-optimizer state and losses of the full 4-wide lookup sliced (row-wise Adagrad
    included: its accumulator still averages mu^2 over all 4 columns); it is taken whenever no stage reads the
    rows, and never when one does."""
    import recsys_transfer.rows.lookup as lookup_module

    out, meta = ml100k_prepared
    batches = _batches(out, meta, 4)
    taken = []

    class Counted(lookup_module.RecordingColumnLookup):
        @classmethod
        def apply(cls, *args):
            taken.append(True)
            return super().apply(*args)

    monkeypatch.setattr(lookup_module, "RecordingColumnLookup", Counted)
    runs = []
    for column_path in (True, False):
        model = _model(meta)
        with torch.no_grad():
            model.linear.tables.embedding_bags["t_zip"].weight[:, 0].normal_(0, 0.3)  # columns 1-3 stay 0
        rows = attach_rows(model, RowsConfig(optimizer=optimizer, lr=0.05))
        if not column_path:
            rows.add_transform(_ReadsRows())
        step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
        before = len(taken)
        losses = [step(b).loss for b in batches]
        assert len(taken) - before == (4 if column_path else 0)
        runs.append((model, rows, losses))
    (m_col, r_col, l_col), (m_full, r_full, l_full) = runs
    assert l_col == l_full
    for (name, a), b in zip(m_col.state_dict().items(), m_full.state_dict().values()):
        assert torch.equal(a, b), name
    for wa, wb in zip(r_col.table_weights, r_full.table_weights):
        for key, value in r_col.optimizer.state[wa].items():
            assert torch.equal(value, r_full.optimizer.state[wb][key]), key
    first_order = m_col.linear.tables.embedding_bags["t_zip"].weight
    assert torch.count_nonzero(first_order[:, 1:]) == 0 and torch.count_nonzero(first_order[:, 0]) > 0


@pytest.mark.parametrize("n_rows,n_occ", [(50, 400), (3000, 400), (1, 5), (10, 0)])
def test_unique_rows_equals_torch_unique(n_rows, n_occ):
    """The dense-mark unique of the recording backward gives torch.unique's rows and inverse (and falls back to
    it when the buffer is large next to the occurrences)."""
    from recsys_transfer.rows.lookup import unique_rows

    ids = torch.randint(0, n_rows, (n_occ,), generator=torch.Generator().manual_seed(n_rows))
    rows, inverse = unique_rows(ids, n_rows)
    want_rows, want_inverse = torch.unique(ids, return_inverse=True)
    assert torch.equal(rows, want_rows) and torch.equal(inverse, want_inverse)
    assert rows.dtype == want_rows.dtype and inverse.dtype == want_inverse.dtype


def test_the_second_lookup_over_the_same_ids_reuses_the_first_ones_rows(ml100k_prepared, monkeypatch):
    """DeepFM's embedding and first-order lookups read one KJT: their occurrence rows and unique rows are computed
    once per step (SameIds), and a different batch is never served the last one's."""
    import recsys_transfer.rows.pipeline as pipeline_module

    out, meta = ml100k_prepared
    batches = _batches(out, meta, 2)
    calls = {"occurrence_rows": 0, "unique_rows": 0}
    for name in calls:
        original = getattr(pipeline_module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipeline_module, name, counted)
    model = _model(meta)
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=0.01))
    step = TrainStep(model, Objective(TASKS), torch.optim.SGD(rows.dense_parameters(), lr=0.05), rows)
    for b in batches:
        step(b)
    assert calls == {"occurrence_rows": 2, "unique_rows": 2}  # once per step, not once per lookup


# ---------------------------------------------------------------------------------------------------------
# list fields and a table serving several features (tests/conftest.py's lists dataset)


class Capture(RowTransform):
    """Keeps every recorded table's rows and row gradients."""

    stage = "surgery"

    def __init__(self) -> None:
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, call, context) -> None:
        for t in call.tables:
            assert t.slot.name not in self.rows
            self.rows[t.slot.name] = (t.rows.clone(), t.grad.clone())


def _assert_rows_are_the_gradient(capture: Capture, collection: str, tables: dict[str, torch.Tensor]) -> None:
    """The recorded rows are exactly the rows with a nonzero autograd gradient, and their gradients equal it."""
    assert set(capture.rows) == {f"{collection}.{n}" for n in tables}
    for name, grad in tables.items():
        rows, g = capture.rows[f"{collection}.{name}"]
        assert torch.equal(rows, torch.unique(rows))
        assert torch.equal(rows, grad.abs().sum(1).nonzero().view(-1)), name
        torch.testing.assert_close(g, grad[rows], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pooling", [{}, {"hist": "mean"}, {"user": "mean", "hist": "mean", "tags": "mean"}],
                         ids=["sum-one-buffer", "mixed-per-table", "mean-one-buffer"])
def test_recorded_row_gradients_on_bags_equal_autograd_on_torchrec_float64(lists_prepared, pooling):
    """Bags with empty lists and repeated ids, a table (t_item) serving item and hist: the recording lookup's row
    gradients (the rows' occurrences summed over every feature of the table) equal autograd's table gradient on
    TorchRec's own EmbeddingBagCollection, in float64, for sum and mean pooling (one shared buffer, and the
    per-table path for mixed poolings)."""
    import copy

    from torch import nn
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys_transfer.modules.embedding import table_configs, use_grouped_lookup

    data, meta = lists_prepared
    batch = next(iter(BatchLoader(data, "train", 150, meta=meta, prefetch=0)))
    lengths = batch.sparse["hist"].lengths()
    assert (lengths == 0).any() and (lengths > 3).any()
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(tables=table_configs(meta, 4, pooling=pooling)).double()
    for p in ref.parameters():
        nn.init.normal_(p)
    model = nn.Module()
    model.embedding = use_grouped_lookup(copy.deepcopy(ref))
    share_storage([b.weight for b in model.embedding.embedding_bags.values()])
    coef = torch.randn(150, 4 * len(meta.sparse_names)).float()  # float32 values: TorchRec's output is float32
    kt = ref(batch.sparse)
    (kt.values() * coef).sum().backward()
    pipeline = attach_rows(model, RowsConfig(optimizer="sgd", lr=1.0))
    capture = Capture()
    pipeline.add_transform(capture)
    out = model.embedding(batch.sparse)
    assert out.keys() == kt.keys() and out.values().dtype == torch.float64
    torch.testing.assert_close(out.values().float(), kt.values())
    pipeline.begin()
    (out.values() * coef.double()).sum().backward()
    pipeline.apply()
    _assert_rows_are_the_gradient(capture, "embedding", {n: b.weight.grad for n, b in ref.embedding_bags.items()})
    # the SGD step (lr 1) moved exactly the recorded rows by their gradient
    for name, bag in ref.embedding_bags.items():
        after = model.embedding.embedding_bags[name].weight.detach()
        torch.testing.assert_close(after, bag.weight.detach() - bag.weight.grad, rtol=1e-12, atol=1e-14)


def test_recorded_row_gradients_on_an_embedding_collection_equal_autograd_float64(lists_prepared):
    """make_ec's EmbeddingCollection (unpooled lookups; t_item serves item and hist): the recording lookup's rows
    and gradients equal autograd's on TorchRec's own forward, in float64."""
    import copy

    from torch import nn

    from recsys_transfer.modules.embedding import make_ec

    data, meta = lists_prepared
    batch = next(iter(BatchLoader(data, "train", 100, meta=meta, prefetch=0)))
    torch.manual_seed(0)
    ref = make_ec(meta, 4, ["item", "hist", "tags"]).double()
    for p in ref.parameters():
        nn.init.normal_(p)
    model = nn.Module()
    model.seq = copy.deepcopy(ref)
    coefs = {f: torch.randn(len(batch.sparse[f].values()), 4).float() for f in ("item", "hist", "tags")}
    out = ref(batch.sparse)
    sum((out[f].values() * c).sum() for f, c in coefs.items()).backward()
    pipeline = attach_rows(model, RowsConfig(optimizer="sgd", lr=1.0))
    capture = Capture()
    pipeline.add_transform(capture)
    got = model.seq(batch.sparse)
    for f in coefs:
        assert torch.equal(got[f].lengths(), out[f].lengths())
        torch.testing.assert_close(got[f].values().float(), out[f].values())
    pipeline.begin()
    sum((got[f].values() * c.double()).sum() for f, c in coefs.items()).backward()
    pipeline.apply()
    _assert_rows_are_the_gradient(capture, "seq", {n: e.weight.grad for n, e in ref.embeddings.items()})
