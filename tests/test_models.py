"""Models on real ML-100K batches: outputs, gradients, exact maths (float64 references), registry, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
from recsys_transfer.errors import UserError
from recsys_transfer.models.registry import (CTR_MODELS, MODELS, MULTITASK_MODELS, SEQUENCE_MODELS, build_model,
                                             model_arguments)
from recsys_transfer.modules.fm import FIRST_ORDER_WIDTH
from recsys_transfer.modules.interacting import InteractingLayer
from recsys_transfer.objectives import Objective
from recsys_transfer.train.evaluate import evaluate
from recsys_transfer.train.loop import train_epoch
from recsys_transfer.train.step import TrainStep
from recsys_transfer.types import Batch, split_output

# Every CTR model with its defaults, plus AutoInt with every optional branch switched on. The multi-task models
# (MULTITASK_MODELS) have the same checks on Adult's two tasks in tests/test_mtl_models.py (FDN returns auxiliary
# outputs and ESMM needs two tasks); their list-field case is below.
CASES = [(name, {}) for name in CTR_MODELS] + [
    ("autoint", {"first_order": True, "hidden": (32,), "scaled": True, "dropout": 0.4, "dnn_dropout": 0.2}),
]


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic dataset (4 sparse fields, dense fields) — the dense path, and a second dataset id."""
    out = tmp_path_factory.mktemp("synthetic") / "prepared"
    meta = prepare_synthetic(SyntheticConfig(rows=5000), out, split=SplitSpec(), head_tail=HeadTailSpec(),
                             progress=False)
    return out, meta


@pytest.fixture(params=["ml100k", "synthetic"])
def dataset(request, ml100k_prepared, synthetic_prepared):
    return ml100k_prepared if request.param == "ml100k" else synthetic_prepared


def first_batch(data_dir, meta, batch_size: int) -> Batch:
    return next(iter(BatchLoader(data_dir, "train", batch_size, meta=meta)))


def test_registry_lists_the_paper_models():
    assert set(CTR_MODELS) == {"lr", "fm", "deepfm", "autoint"}
    assert set(MODELS) == set(CTR_MODELS) | {"single_task", "shared_bottom", "mmoe", "cgc", "ple", "esmm", "fdn",
                                             "nextitnet", "grec", "peterrec"}
    assert set(MULTITASK_MODELS) == set(MODELS) - set(CTR_MODELS) - set(SEQUENCE_MODELS)
    assert set(SEQUENCE_MODELS) == {"nextitnet", "grec", "peterrec"}  # tests/test_sequence_models.py
    assert "embedding_dim" in model_arguments("deepfm") and "meta" not in model_arguments("deepfm")


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{'+' if k else ''}" for n, k in CASES])
def test_forward_backward_on_real_batch(name, kwargs, dataset):
    data_dir, meta = dataset
    torch.manual_seed(0)
    batch = first_batch(data_dir, meta, 256)
    model = build_model(name, meta, **kwargs)
    model.train()
    out = model(batch)
    assert set(out) == {meta.labels[0]}
    logits = out[meta.labels[0]]
    assert logits.shape == (batch.batch_size,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()

    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels[meta.labels[0]])
    loss.backward()
    ids = {f: batch.sparse[f].values() for f in meta.sparse_names}
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        if "embedding_bags" in pname:
            # Embedding tables: untouched rows get no gradient, rows used by exactly one example a non-zero one
            # (column 0 only for 4-wide first-order tables). Rows used several times may cancel exactly, e.g. in
            # LR at its all-zero init, where every example's gradient is +-1/(2B).
            table = pname.split("embedding_bags.")[1].split(".")[0]
            field = table[len("t_"):]
            uses = torch.bincount(ids[field], minlength=p.shape[0])
            touched, once = uses > 0, uses == 1
            g = p.grad
            if pname.startswith("linear."):
                assert p.shape[1] == FIRST_ORDER_WIDTH
                assert (g[:, 1:] == 0).all()
                g = g[:, :1]
            assert (g[~touched] == 0).all(), f"{name}: {pname} untouched rows got a gradient"
            assert (g[once].abs().sum(dim=1) > 0).all(), f"{name}: {pname} a row used once got no gradient"
            assert g[touched].abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"
        else:
            assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"
    if name != "lr":
        assert model.embedding.embedding_bags[f"t_{meta.sparse_names[0]}"].weight.shape[1] > FIRST_ORDER_WIDTH


# -- exact maths --------------------------------------------------------------------------------------------------
def reference_interacting(e, layer: InteractingLayer, scaled: bool, residual: bool) -> torch.Tensor:
    """Eq. 5-8 of AutoInt written out: explicit loops over heads, fields and an explicit softmax."""
    B, F, _ = e.shape
    H, d = layer.heads, layer.att_dim
    wq, wk, wv = layer.w_query.weight, layer.w_key.weight, layer.w_value.weight  # [H*d', in]
    out = torch.zeros(B, F, H * d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            for m in range(F):
                q = wq[rows] @ e[b, m]
                scores = torch.stack([(q @ (wk[rows] @ e[b, k])) for k in range(F)])
                if scaled:
                    scores = scores / math.sqrt(d)
                alpha = torch.exp(scores - scores.max())
                alpha = alpha / alpha.sum()
                out[b, m, rows] = sum(alpha[k] * (wv[rows] @ e[b, k]) for k in range(F))
    if residual:
        out = out + torch.einsum("oi,bfi->bfo", layer.w_res.weight, e)
    return torch.relu(out)


@pytest.mark.parametrize(("scaled", "residual"), [(False, True), (True, True), (False, False)])
def test_interacting_layer_matches_explicit_equations(scaled, residual):
    torch.manual_seed(1)
    layer = InteractingLayer(6, heads=2, att_dim=4, residual=residual, dropout=0.3, scaled=scaled).double().eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.7)  # large enough that attention is far from uniform
    e = torch.randn(3, 5, 6, dtype=torch.float64)
    got = layer(e)
    assert got.shape == (3, 5, 8)
    want = reference_interacting(e, layer, scaled, residual)
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()
    layer.train()  # attention dropout is active in training only
    assert not torch.allclose(layer(e), want)


def test_deepfm_matches_explicit_formula(ml100k_prepared):
    data_dir, meta = ml100k_prepared
    torch.manual_seed(2)
    batch = first_batch(data_dir, meta, 8)
    model = build_model("deepfm", meta, embedding_dim=4, hidden=(5, 3)).double().eval()
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.5)
        if "embedding_bags" in name:
            # TorchRec's EBC returns float32 whatever the weights' dtype (``.float()`` in its forward), so the FM
            # terms are computed in float32. Multiples of 1/16 in [-1, 1] make that cast and every float32 sum and
            # product of the FM terms exact; the MLP runs in float64.
            p.data = torch.randint(-16, 17, p.shape, dtype=torch.float64) / 16
    got = model(Batch(batch.dense.double(), batch.sparse, batch.labels))["label"]

    fields = meta.sparse_names
    ids = {f: batch.sparse[f].values() for f in fields}
    emb = {f: model.embedding.embedding_bags[f"t_{f}"].weight.detach() for f in fields}
    lin = {f: model.linear.tables.embedding_bags[f"t_{f}"].weight.detach() for f in fields}
    layers = [m for m in model.dnn if isinstance(m, torch.nn.Linear)]
    want = torch.zeros(batch.batch_size, dtype=torch.float64)
    for b in range(batch.batch_size):
        v = [emb[f][ids[f][b]] for f in fields]
        first = sum(lin[f][ids[f][b], 0] for f in fields)
        second = sum(v[i] @ v[j] for i in range(len(v)) for j in range(i + 1, len(v)))  # Rendle Eq. 1
        h = torch.cat(v)  # no dense fields in ML-100K
        for k, layer in enumerate(layers):
            h = layer.weight.detach() @ h + layer.bias.detach()
            if k < len(layers) - 1:
                h = torch.relu(h)
        want[b] = model.bias.detach()[0] + first + second + h[0]
    assert torch.allclose(got, want, rtol=0, atol=1e-10), (got - want).abs().max()
    assert want.abs().min() > 1e-3  # the check is not vacuous



def test_fm_second_order_value_and_closed_form_gradient_float64():
    """fm_second_order (closed-form backward) against Rendle's pairwise definition and its autograd gradient."""
    from recsys_transfer.modules.fm import fm_second_order

    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    pairwise = sum((v[:, i] * v[:, j]).sum(1) for i in range(6) for j in range(i + 1, 6))  # Eq. 1
    (want,) = torch.autograd.grad((pairwise * w).sum(), v)
    got_value = fm_second_order(v)
    (got,) = torch.autograd.grad((got_value * w).sum(), v)
    torch.testing.assert_close(got_value, pairwise.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fm_second_order, (v[:2, :4].detach().clone().requires_grad_(True),))
    with torch.no_grad():
        torch.testing.assert_close(fm_second_order(v), pairwise.detach(), rtol=0, atol=1e-12)

# -- user errors --------------------------------------------------------------------------------------------------
def test_build_model_rejects_unknown_name_and_arguments(ml100k_prepared):
    _, meta = ml100k_prepared
    with pytest.raises(UserError, match="unknown model 'deepfmm'.*did you mean 'deepfm'") as err:
        build_model("deepfmm", meta)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown argument 'embeding_dim'.*did you mean 'embedding_dim'") as err:
        build_model("deepfm", meta, embeding_dim=16)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown argument 'hidden'"):
        build_model("lr", meta, hidden=(10,))
    with pytest.raises(UserError, match="dropout"):
        build_model("autoint", meta, dropout=1.5)


def test_model_refuses_another_dataset(ml100k_prepared, synthetic_prepared):
    _, meta = ml100k_prepared
    other_dir, other_meta = synthetic_prepared
    assert other_meta.dataset_id != meta.dataset_id
    model = build_model("fm", meta)
    loader = BatchLoader(other_dir, "test", 512)
    step = TrainStep(model, Objective(meta.tasks), torch.optim.Adam(model.parameters()))
    with pytest.raises(UserError, match="does not match the model"):
        train_epoch(step, BatchLoader(other_dir, "train", 512))


# -- real training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kwargs", "epochs"), [
    ("deepfm", {"embedding_dim": 16, "hidden": (100, 100)}, 3),
    ("autoint", {"embedding_dim": 16}, 1),  # ~10 s/epoch on one CPU thread; 3 epochs reach ~0.84 (see report)
])
def test_short_training_run_learns_ml100k(name, kwargs, epochs, ml100k_prepared):
    data_dir, meta = ml100k_prepared
    torch.manual_seed(0)
    train = BatchLoader(data_dir, "train", 1024, shuffle=True, seed=0, meta=meta)
    test = BatchLoader(data_dir, "test", 4096, meta=meta)
    model = build_model(name, meta, **kwargs)
    step = TrainStep(model, Objective(meta.tasks), torch.optim.Adam(model.parameters(), lr=1e-3))  # dense tables
    losses = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        losses.append(train_epoch(step, train, epoch=epoch).loss)
    metrics = evaluate(model, test, meta.tasks)["label"]
    print(f"{name}: {epochs} epochs, train loss {losses}, test {metrics}")
    assert np.isfinite(losses).all() and losses == sorted(losses, reverse=True)
    assert metrics["auc"] > 0.75, metrics


@pytest.mark.parametrize("pooling,weighted,same_dim,multi", [
    ("SUM", False, True, True), ("MEAN", False, True, True), ("SUM", True, True, True), ("SUM", True, False, True),
    ("MEAN", False, False, True), ("SUM", False, True, False), ("SUM", True, True, False)])
def test_grouped_lookup_equals_torchrec_forward_and_gradients(ml100k_prepared, pooling, weighted, same_dim, multi):
    """make_ebc's grouped lookup gives TorchRec's own EBC output and table gradients, on a real ML-100K batch
    (single-valued fields) plus a multi-valued field with empty bags, for sum, mean and weighted sum pooling; the
    tables' gradient on every row (touched or not) is compared, and a deepcopy looks up its own tables. Same-width
    tables share one buffer (one embedding_bag, one index_put_); mixed widths take the per-table path."""
    import copy

    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_transfer.modules.embedding import use_grouped_lookup

    data, meta = ml100k_prepared
    batch = next(iter(BatchLoader(data, "train", 64)))
    fields = ["zip", "item_id", "user_id"]
    kjt = batch.sparse
    rng = np.random.default_rng(0)
    # a multi-valued "bag" feature with empty bags, on the zip table (or a single-valued one: the sample-major path)
    multi_len = rng.integers(0, 4, 64) if multi else np.ones(64, dtype=np.int64)
    keys = fields + ["bag"]
    values = [kjt[f].values() for f in fields] + [torch.from_numpy(rng.integers(0, 50, int(multi_len.sum())))]
    lengths = [kjt[f].lengths() for f in fields] + [torch.from_numpy(multi_len).to(torch.int32)]
    cat_values = torch.cat(values)
    weights = torch.from_numpy(rng.random(len(cat_values)).astype(np.float32)) if weighted else None
    features = KeyedJaggedTensor(keys=keys, values=cat_values, lengths=torch.cat(lengths), weights=weights)
    configs = [EmbeddingBagConfig(name="t_zip", embedding_dim=8, num_embeddings=meta.field("zip").vocab_size,
                                  feature_names=["zip", "bag"], pooling=PoolingType[pooling]),
               EmbeddingBagConfig(name="t_item_id", embedding_dim=8 if same_dim else 4,
                                  num_embeddings=meta.field("item_id").vocab_size,
                                  feature_names=["item_id"], pooling=PoolingType[pooling]),
               EmbeddingBagConfig(name="t_user_id", embedding_dim=8, num_embeddings=meta.field("user_id").vocab_size,
                                  feature_names=["user_id"], pooling=PoolingType[pooling])]
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(tables=configs, is_weighted=weighted)
    grouped = copy.deepcopy(ref)
    assert use_grouped_lookup(grouped) is grouped and "forward" in vars(grouped)
    from recsys_transfer.modules.embedding import flat_tables

    tables = [bag.weight for bag in grouped.embedding_bags.values()]
    assert (flat_tables(tables) is not None) == same_dim
    for a, b in zip(tables, ref.embedding_bags.values()):
        assert torch.equal(a, b.weight)  # moved into the shared buffer with their values
    coef = torch.randn(64, sum(c.embedding_dim * len(c.feature_names) for c in configs))
    outs = {}
    for name, ebc in (("ref", ref), ("grouped", grouped)):
        for scale in (1.0, 3.0):  # the second backward accumulates into the first one's gradients
            kt = ebc(features)
            (kt.values() * coef * scale).sum().backward()
        outs[name] = (kt.keys(), kt.values().detach(), [p.grad.clone() for p in ebc.parameters()])
        for p in ebc.parameters():
            p.grad = None
        (ebc(features).values() * coef).sum().backward()  # after set-to-none: the reused buffer gives one step's grad
        for p, g2 in zip(ebc.parameters(), outs[name][2]):
            torch.testing.assert_close(4 * p.grad, g2, rtol=1e-5, atol=1e-6)
    assert outs["ref"][0] == outs["grouped"][0]
    torch.testing.assert_close(outs["grouped"][1], outs["ref"][1], rtol=1e-5, atol=1e-6)
    for g_ref, g_grouped in zip(outs["ref"][2], outs["grouped"][2]):
        assert bool((g_ref != 0).any())
        torch.testing.assert_close(g_grouped, g_ref, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(grouped)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert not torch.allclose(twin(features).values(), grouped(features).values())


@pytest.mark.parametrize("pooling,weighted,multi,column", [
    ("SUM", False, False, 0), ("SUM", True, False, 2), ("SUM", True, True, 0), ("MEAN", False, True, 1)])
def test_lookup_column_equals_full_lookup_sliced_float64(ml100k_prepared, pooling, weighted, multi, column):
    """lookup_column (FirstOrder's lookup: one column of 4-wide tables) gives the full TorchRec lookup's column and
    the same dense table gradients (zero outside the column), in float64, on a real ML-100K batch plus a
    multi-valued feature with empty bags; the grouped EBC takes the column path (its own autograd node) and the
    plain TorchRec EBC the sliced full lookup."""
    import copy

    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_transfer.modules.embedding import lookup_column, use_grouped_lookup

    data, meta = ml100k_prepared
    kjt = next(iter(BatchLoader(data, "train", 64))).sparse
    rng = np.random.default_rng(1)
    fields = ["zip", "item_id", "user_id"]
    multi_len = rng.integers(0, 4, 64) if multi else np.ones(64, dtype=np.int64)
    values = torch.cat([kjt[f].values() for f in fields] + [torch.from_numpy(rng.integers(0, 50, int(multi_len.sum())))])
    lengths = torch.cat([kjt[f].lengths() for f in fields] + [torch.from_numpy(multi_len).to(torch.int32)])
    weights = torch.from_numpy(rng.random(len(values))) if weighted else None
    features = KeyedJaggedTensor(keys=fields + ["bag"], values=values, lengths=lengths, weights=weights)
    configs = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=meta.field(f).vocab_size,
                                  feature_names=[f] + (["bag"] if f == "zip" else []), pooling=PoolingType[pooling])
               for f in fields]
    torch.manual_seed(0)
    plain = EmbeddingBagCollection(tables=configs, is_weighted=weighted).double()  # TorchRec's forward (float32 out)
    full = use_grouped_lookup(copy.deepcopy(plain))  # its column is the reference, in float64
    grouped = use_grouped_lookup(copy.deepcopy(plain))  # (a deepcopy of full would not share one buffer)
    coef = torch.randn(64, 4, dtype=torch.float64)
    expect = full(features).values().view(64, 4, 4)[:, :, column]  # feature k's 4 columns, column `column`
    (expect * coef).sum().backward()
    got = {}
    for name, ebc in (("plain", plain), ("grouped", grouped)):
        out = lookup_column(ebc, features, column)
        assert ("_ColumnLookup" in type(out.grad_fn).__name__) == (name == "grouped")
        (out * coef).sum().backward()
        got[name] = (out.detach(), [p.grad.clone() for p in ebc.parameters()])
    torch.testing.assert_close(got["grouped"][0], expect.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["plain"][0], expect.detach().float(), rtol=1e-6, atol=1e-6)
    for g_full, g_plain, g_col in zip([p.grad for p in full.parameters()], got["plain"][1], got["grouped"][1]):
        assert bool((g_full[:, column] != 0).any())
        assert not bool(g_col[:, [c for c in range(4) if c != column]].any())
        torch.testing.assert_close(g_col, g_full, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_plain, g_full, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# list fields and a table shared by several features (tests/conftest.py's lists dataset)


def test_tables_one_per_vocabulary_and_pooling_per_table(lists_prepared):
    from recsys_transfer.modules.embedding import table_configs

    _, meta = lists_prepared
    configs = table_configs(meta, 8, pooling={"hist": "mean"})
    assert [(c.name, c.feature_names, c.pooling.name) for c in configs] == [
        ("t_user", ["user"], "SUM"), ("t_item", ["item", "hist"], "MEAN"), ("t_tags", ["tags"], "SUM")]
    assert configs[1].num_embeddings == meta.field("item").vocab_size == meta.field("hist").vocab_size
    assert [c.feature_names for c in table_configs(meta, 8, fields=["hist", "user"])] == [["hist"], ["user"]]
    assert table_configs(meta, 8, fields=["hist"])[0].name == "t_item"
    with pytest.raises(UserError, match=r"share the table t_item .* TorchRec pools per table"):
        table_configs(meta, 8, pooling={"hist": "mean", "item": "sum"})
    with pytest.raises(UserError, match="must be one of"):
        table_configs(meta, 8, pooling={"hist": "max"})
    with pytest.raises(UserError, match="not a sparse field"):
        table_configs(meta, 8, pooling={"histo": "sum"})


@pytest.mark.parametrize("pooling", [{}, {"hist": "mean", "tags": "mean"}])
def test_make_ebc_on_list_batches_equals_torchrec_and_an_explicit_bag_sum(lists_prepared, pooling):
    """make_ebc's grouped lookup on loader batches with list fields (empty bags, repeated ids, a table serving
    item and hist) equals TorchRec's own EBC forward and table gradients, and each feature's output (keyed by its
    name) is its bag of rows pooled by hand, in float64."""
    import copy

    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys_transfer.modules.embedding import make_ebc, table_configs, use_grouped_lookup

    data, meta = lists_prepared
    batch = first_batch(data, meta, 128)
    torch.manual_seed(0)
    ref = EmbeddingBagCollection(tables=table_configs(meta, 8, pooling=pooling))
    grouped = use_grouped_lookup(copy.deepcopy(ref))
    assert [type(m) for m in (make_ebc(meta, 8, pooling=pooling),)] == [type(ref)]
    coef = torch.randn(128, 8 * len(meta.sparse_names))
    got = {}
    for name, ebc in (("ref", ref), ("grouped", grouped)):
        kt = ebc(batch.sparse)
        (kt.values() * coef).sum().backward()
        got[name] = (kt, [p.grad.clone() for p in ebc.parameters()])
    assert got["ref"][0].keys() == got["grouped"][0].keys() == ["user", "item", "hist", "tags"]
    torch.testing.assert_close(got["grouped"][0].values(), got["ref"][0].values(), rtol=1e-5, atol=1e-6)
    for a, b in zip(got["grouped"][1], got["ref"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tables = {n: b.weight.detach().double() for n, b in ref.embedding_bags.items()}
    pooled = got["grouped"][0].to_dict()
    for f in meta.sparse_names:
        table = tables[f"t_{meta.field(f).table_field}"]
        jt = batch.sparse[f]
        mean = pooling.get(f) == "mean" or (f == "item" and pooling.get("hist") == "mean")
        rows = []
        for ids in torch.split(jt.values(), jt.lengths().tolist()):
            bag = table[ids].sum(0) if len(ids) else torch.zeros(8, dtype=torch.float64)
            rows.append(bag / max(len(ids), 1) if mean else bag)
        torch.testing.assert_close(pooled[f].double(), torch.stack(rows), rtol=1e-5, atol=1e-6)


def test_make_ec_gives_each_features_rows_and_torchrec_gradients(lists_prepared):
    """make_ec: TorchRec's EmbeddingCollection, one table per vocabulary (t_item serves item and hist); the lookup
    is {feature: JaggedTensor} of the rows of the feature's ids with the KJT's lengths."""
    from recsys_transfer.modules.embedding import make_ec

    data, meta = lists_prepared
    batch = first_batch(data, meta, 64)
    torch.manual_seed(0)
    ec = make_ec(meta, 8, ["item", "hist"])
    assert [(c.name, c.feature_names) for c in ec.embedding_configs()] == [("t_item", ["item", "hist"])]
    out = ec(batch.sparse)
    assert sorted(out) == ["hist", "item"]
    weight = ec.embeddings["t_item"].weight
    for f in ("item", "hist"):
        assert torch.equal(out[f].lengths(), batch.sparse[f].lengths())
        assert torch.equal(out[f].values(), weight.detach()[batch.sparse[f].values()])
    (out["item"].values().sum() + 2 * out["hist"].values().sum()).backward()
    want = torch.zeros_like(weight)
    want.index_add_(0, batch.sparse["item"].values(), torch.ones(64, 8))
    hist = batch.sparse["hist"].values()
    want.index_add_(0, hist, 2 * torch.ones(len(hist), 8))
    torch.testing.assert_close(weight.grad, want)


# esmm needs two tasks; the sequence models need a sequence dataset (tests/test_sequence_models.py)
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"esmm"} - set(SEQUENCE_MODELS)))
def test_every_model_trains_on_list_fields_and_a_shared_table(name, lists_prepared):
    data, meta = lists_prepared
    torch.manual_seed(0)
    model = build_model(name, meta, pooling={"hist": "mean"})
    batch = first_batch(data, meta, 200)
    out = split_output(model(batch))[0]["label"]
    assert out.shape == (200,) and torch.isfinite(out).all()
    out.sum().backward()
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        assert list(embedding.embedding_bags) == ["t_user", "t_item", "t_tags"]
        grad = embedding.embedding_bags["t_item"].weight.grad
        only_hist = set(batch.sparse["hist"].values().tolist()) - set(batch.sparse["item"].values().tolist())
        assert only_hist and all(bool(grad[i].abs().sum() > 0) for i in only_hist)  # hist reaches t_item
