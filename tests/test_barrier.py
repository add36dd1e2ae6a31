"""Algorithm 1 (item-wise dynamic barrier) against a plain dense float64 reference, on real ML-100K batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.models.fm import FIRST_ORDER_WIDTH, FM
from recsys_transfer.transfer import barrier as barrier_mod
from recsys_transfer.transfer.barrier import barrier_direction
from recsys_transfer.config import RowsConfig, TransferConfig
from recsys_transfer.transfer.plugin import TransferPlugin

DIM = 4
FIELDS = ("zip", "user_id")
LR = 0.05
ALPHA = 2.0


# ---------------------------------------------------------------------------------------------------------
# the reference: dense float64 tables, full autograd, explicit formulas


def ref_moment(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||mean_S - mean_T||^2 + ||Cov_S - Cov_T||_F^2 / (4 d^2), covariances with the n-1 normalizer."""
    if len(source) == 0 or len(target) == 0:
        return torch.zeros((), dtype=torch.float64)
    d = source.shape[1]
    ms, mt = source.mean(0), target.mean(0)
    out = ((ms - mt) ** 2).sum()
    if len(source) >= 2 and len(target) >= 2:
        cs = (source - ms).T @ (source - ms) / (len(source) - 1)
        ct = (target - mt).T @ (target - mt) / (len(target) - 1)
        out = out + ((cs - ct) ** 2).sum() / (4 * d * d)
    return out


def pool(table: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, mean: bool) -> torch.Tensor:
    """Each bag's rows summed (or averaged; an empty bag gives 0), written out with one index_add: ``[B, D]``."""
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths.long())
    out = torch.zeros(len(lengths), table.shape[1], dtype=table.dtype).index_add(0, bag, table[ids])
    return out / lengths.clamp_min(1).unsqueeze(1).to(table.dtype) if mean else out


def fm_logits(tables: dict[str, torch.Tensor], bias: torch.Tensor, bags: dict, table_of: dict[str, str],
              mean: set[str]) -> torch.Tensor:
    """FM over bags: ``bags[f] = (ids, lengths)``; feature ``f`` reads the tables of its vocabulary owner
    ``table_of[f]``."""
    v = torch.stack([pool(tables[f"embedding.{table_of[f]}"], *bags[f], f in mean) for f in bags], dim=1)  # [B, F, k]
    first = sum(pool(tables[f"linear.{table_of[f]}"], *bags[f], f in mean)[:, 0] for f in bags)
    return bias + first + 0.5 * (v.sum(1) ** 2 - (v ** 2).sum(1)).sum(1)


class Reference:
    """Dense float64 tables (one per vocabulary owner, as make_ebc's), full autograd, Algorithm 1 row by row."""

    def __init__(self, model: FM, meta, optimizer: str, mode: str, fields=FIELDS, mean: set[str] = frozenset()) -> None:
        sd = model.state_dict()
        self.table_of = {f: meta.field(f).table_field for f in meta.sparse_names}
        self.owners = sorted(set(self.table_of.values()))
        self.tables = {}
        for f in self.owners:
            self.tables[f"embedding.{f}"] = sd[f"embedding.embedding_bags.t_{f}.weight"].double().clone()
            self.tables[f"linear.{f}"] = sd[f"linear.tables.embedding_bags.t_{f}.weight"].double().clone()
        self.bias = sd["bias"].double().clone()
        self.meta = meta
        self.optimizer = optimizer
        self.mode = mode
        self.fields = fields
        self.mean = set(mean)
        self.state = {k: {"m": torch.zeros_like(t), "v": torch.zeros_like(t), "n": torch.zeros(len(t))}
                      for k, t in self.tables.items()}

    def step(self, bags: dict, labels: torch.Tensor) -> None:
        leaves = {k: t.clone().requires_grad_(True) for k, t in self.tables.items()}
        bias = self.bias.clone().requires_grad_(True)
        logits = fm_logits(leaves, bias, bags, self.table_of, self.mean)
        loss = F.binary_cross_entropy_with_logits(logits, labels.double())
        grads = torch.autograd.grad(loss, list(leaves.values()) + [bias])
        full = dict(zip(leaves, grads[:-1]))
        for key, table in self.tables.items():
            owner = key.split(".", 1)[1]
            # the touched rows: every id of every feature the table serves
            touched = torch.unique(torch.cat([bags[f][0] for f in bags if self.table_of[f] == owner]))
            g = full[key][touched]
            mu = g
            if key.startswith("embedding.") and owner in self.fields and self.mode != "B":
                fm = self.meta.field(owner)
                head = torch.from_numpy(fm.head_mask())[touched]
                tail = torch.from_numpy(fm.tail_mask())[touched]
                leaf = table.clone().requires_grad_(True)
                lt = ref_moment(leaf[touched[head]], leaf[touched[tail]])
                t = (torch.autograd.grad(lt, leaf)[0][touched] if lt.requires_grad
                     else torch.zeros_like(g))
                if self.mode == "+T":
                    mu = g + 0.5 * t
                else:  # lexico: Algorithm 1 written out row by row
                    mu = torch.empty_like(g)
                    for r in range(len(touched)):
                        gi, ti = g[r], t[r]
                        gg = float(gi @ gi)
                        phi = ALPHA * min(gg, float(loss.detach()))
                        lam = max((phi - float(ti @ gi)) / gg, 0.0) if gg > 0 else 0.0
                        mu[r] = ti + lam * gi
            self._update(key, touched, mu)
        self.bias = self.bias - LR * grads[-1]

    def _update(self, key: str, rows: torch.Tensor, mu: torch.Tensor) -> None:
        w, st = self.tables[key], self.state[key]
        if self.optimizer == "sgd":
            w[rows] -= LR * mu
            return
        b1, b2, eps = 0.9, 0.999, 1e-8
        st["m"][rows] = b1 * st["m"][rows] + (1 - b1) * mu
        st["v"][rows] = b2 * st["v"][rows] + (1 - b2) * mu * mu
        st["n"][rows] += 1
        n = st["n"][rows].unsqueeze(1)
        mhat = st["m"][rows] / (1 - b1 ** n)
        vhat = st["v"][rows] / (1 - b2 ** n)
        w[rows] -= LR * mhat / (vhat.sqrt() + eps)


def _train_steps(model, plugin, out, steps: int, seed: int) -> list[dict]:
    """``steps`` shuffled batches of 256: SGD (lr 0.05) on the dense part, the plug-in on the rows; returns
    ``plugin.stats()`` after each step."""
    dense = torch.optim.SGD(plugin.dense_parameters(), lr=0.05)
    stats = []
    for step, batch in enumerate(BatchLoader(out, "train", 256, shuffle=True, seed=seed)):
        if step == steps:
            break
        dense.zero_grad()
        plugin.backward(F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"]))
        dense.step()
        stats.append(plugin.stats())
    return stats


def _ids(batch) -> dict[str, torch.Tensor]:
    return {k: batch.sparse[k].values() for k in batch.sparse.keys()}


def _bags(batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (batch.sparse[k].values(), batch.sparse[k].lengths()) for k in batch.sparse.keys()}


def _make(meta, optimizer: str, mode: str, fields=FIELDS, pooling: dict | None = None):
    torch.manual_seed(1)
    model = FM(meta, embedding_dim=DIM, pooling=pooling)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.startswith("linear.tables"):
                p[:, 1:] = 0
        if model.linear.dense is not None:  # the list dataset's dense x: the reference has no dense term
            model.linear.dense.weight.zero_()
            model.linear.dense.weight.requires_grad_(False)
    mean = {f for f in meta.sparse_names if (pooling or {}).get(f) == "mean"}
    mean |= {f for f in meta.sparse_names if meta.field(f).table_field in {meta.field(m).table_field for m in mean}}
    ref = Reference(model, meta, optimizer, mode, fields, mean)
    plugin = TransferPlugin(model, meta, TransferConfig(mode=mode, loss="moment", fields=fields, lam=0.5, alpha=ALPHA,
                                                        barrier="paper"),
                            RowsConfig(optimizer=optimizer, lr=LR))
    dense = torch.optim.SGD(plugin.dense_parameters(), lr=LR)
    return model, ref, plugin, dense


#: the list dataset (tests/conftest.py): transfer on t_item, which serves item and the hist lists (empty bags,
#: repeated ids), and on tags, a list field with its own table; hist mean-pooled with Adam (then t_item pools by
#: mean, item is unchanged by it), sum with SGD (the shared-buffer path)
LIST_FIELDS = ("item", "tags")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["lexico", "+T", "B"])
@pytest.mark.parametrize("dataset", ["ml100k", "lists"])
def test_matches_dense_float64_reference(ml100k_prepared, lists_prepared, dataset, optimizer, mode):
    out, meta = ml100k_prepared if dataset == "ml100k" else lists_prepared
    fields = FIELDS if dataset == "ml100k" else LIST_FIELDS
    pooling = {"hist": "mean"} if dataset == "lists" and optimizer == "adam" else None
    model, ref, plugin, dense = _make(meta, optimizer, mode, fields, pooling)
    for step, batch in enumerate(BatchLoader(out, "train", 256, shuffle=True, seed=4)):
        if step == 5:
            break
        loss = F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"])
        dense.zero_grad()
        plugin.backward(loss)
        dense.step()
        ref.step(_bags(batch), batch.labels["label"])
    sd = model.state_dict()
    for f in ref.owners:
        for kind in ("embedding", "linear.tables"):
            got = sd[f"{kind}.embedding_bags.t_{f}.weight"].double()
            want = ref.tables[f"{kind.split('.')[0]}.{f}"]
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5, msg=f"{kind}.{f}")
    torch.testing.assert_close(sd["bias"].double(), ref.bias, rtol=1e-4, atol=1e-6)
    # the comparison is not vacuous: the transfer term changes the transfer rows relative to plain training
    if mode != "B":
        _, ref_b, _, _ = _make(meta, optimizer, "B", fields, pooling)
        for step, batch in enumerate(BatchLoader(out, "train", 256, shuffle=True, seed=4)):
            if step == 5:
                break
            ref_b.step(_bags(batch), batch.labels["label"])
        for f in fields:
            delta = (ref_b.tables[f"embedding.{f}"] - ref.tables[f"embedding.{f}"]).abs().max()
            assert delta > 5e-5, f  # well above the comparison tolerance


def test_untouched_rows_and_state_bitwise_unchanged(ml100k_prepared):
    out, meta = ml100k_prepared
    model, _, plugin, dense = _make(meta, "adam", "lexico")
    batches = iter(BatchLoader(out, "train", 128, shuffle=True, seed=9))
    first = next(batches)  # one step so every optimizer state exists
    plugin.backward(F.binary_cross_entropy_with_logits(model(first)["label"], first.labels["label"]))
    batch = next(batches)
    before_w = {k: v.clone() for k, v in model.state_dict().items()}
    before_s = {id(p): {k: v.clone() for k, v in plugin.optimizer.state[p].items()} for p in plugin.table_weights}
    plugin.backward(F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"]))
    ids = _ids(batch)
    checked = 0
    for f in meta.sparse_names:
        for kind in ("embedding", "linear.tables"):
            key = f"{kind}.embedding_bags.t_{f}.weight"
            param = dict(model.named_parameters())[key]
            untouched = torch.ones(len(param), dtype=torch.bool)
            untouched[torch.unique(ids[f])] = False
            assert torch.equal(param.detach()[untouched], before_w[key][untouched])
            for name, value in plugin.optimizer.state[param].items():
                assert torch.equal(value[untouched], before_s[id(param)][name][untouched]), (key, name)
            assert not torch.equal(param.detach()[~untouched], before_w[key][~untouched])  # touched rows moved
            assert param.grad is None  # no dense table gradient, ever
            checked += int(untouched.sum())
    assert checked > 1000


@pytest.mark.parametrize("dataset", ["ml100k", "lists"])
def test_barrier_constraint_on_real_zip_batches(ml100k_prepared, lists_prepared, monkeypatch, dataset):
    """<g_i, mu_i> >= phi_i for every touched row, on real batches, with a transfer loss that conflicts: the zip
    rows of ML-100K, and on the list dataset the rows of t_item (item and the hist lists: empty bags, repeated
    ids) and of tags (a list field with its own table)."""
    out, meta = ml100k_prepared if dataset == "ml100k" else lists_prepared
    fields, steps, size, min_rows = (("zip",), 20, 512, 100) if dataset == "ml100k" else (LIST_FIELDS, 12, 128, 40)
    torch.manual_seed(0)
    model = FM(meta, embedding_dim=8)
    plugin = TransferPlugin(model, meta, TransferConfig(mode="lexico", loss="mmd", fields=fields, barrier="paper"),
                            RowsConfig(lr=1e-2))
    dense = torch.optim.Adam(plugin.dense_parameters(), lr=1e-2)
    seen = []
    original = barrier_mod.barrier_direction

    def spy(g_main, g_transfer, main_loss, alpha):
        mu, lam = original(g_main, g_transfer, main_loss, alpha)
        seen.append((g_main.double(), mu.double(), float(main_loss)))
        return mu, lam

    monkeypatch.setattr(barrier_mod, "barrier_direction", spy)
    for step, batch in enumerate(BatchLoader(out, "train", size, shuffle=True, seed=2)):
        if step == steps:
            break
        loss = F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"])
        dense.zero_grad()
        plugin.backward(loss)
        dense.step()
    assert len(seen) == steps
    rows = active = 0
    for g, mu, main in seen:
        gg = (g * g).sum(1)
        phi = ALPHA * torch.minimum(gg, torch.tensor(main, dtype=torch.float64))
        inner = (g * mu).sum(1)
        assert bool((inner >= phi - 1e-6 * (1 + phi.abs())).all())
        rows += len(g)
        active += int(((inner - phi).abs() <= 1e-6 * (1 + phi)).sum())  # constraint binding (lambda_i > 0)
    assert rows > steps * min_rows
    assert active > 0  # the barrier was actually exercised, not only satisfied by the transfer gradient
    if dataset == "lists":
        stats = plugin.stats()
        assert set(stats) == {"embedding.t_item", "embedding.t_tags"} and stats["embedding.t_item"]["rows"] > 0


def test_barrier_direction_closed_form():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([[-2.0, 1.0], [0.5, 0.5], [0.3, 0.4]], dtype=torch.float64)
    mu, lam = barrier_direction(g, t, main_loss=0.7, alpha=2.0)
    # row 0: ||g||^2 = 1, phi = 2 * min(1, 0.7) = 1.4, t.g = -2 -> lambda = 3.4
    # row 1: g = 0 -> lambda = 0, mu = t
    # row 2: ||g||^2 = 25, phi = 1.4, t.g = 2.5 >= phi -> lambda = 0
    assert lam.tolist() == pytest.approx([3.4, 0.0, 0.0])
    assert torch.allclose(mu, torch.tensor([[1.4, 1.0], [0.5, 0.5], [0.3, 0.4]], dtype=torch.float64))
    assert math.isclose(float((g[0] * mu[0]).sum()), 1.4)


def test_first_order_padding_columns_never_move(ml100k_prepared):
    out, meta = ml100k_prepared
    torch.manual_seed(0)
    model = FM(meta, embedding_dim=8)
    plugin = TransferPlugin(model, meta, TransferConfig(mode="B"), RowsConfig(optimizer="adam", lr=1e-2))
    for step, batch in enumerate(BatchLoader(out, "train", 512)):
        if step == 3:
            break
        plugin.backward(F.binary_cross_entropy_with_logits(model(batch)["label"], batch.labels["label"]))
    for f in meta.sparse_names:
        w = dict(model.named_parameters())[f"linear.tables.embedding_bags.t_{f}.weight"]
        assert w.shape[1] == FIRST_ORDER_WIDTH
        assert torch.count_nonzero(w[:, 1:]) == 0
        assert torch.count_nonzero(w[:, 0]) > 0


def test_embedding_collection_path_equals_bag_path(ml100k_prepared):
    """Sequence tables (EmbeddingCollection) get exactly the updates of pooled tables computing the same function."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "workers"))
    from seq_model import BagModel, SeqModel

    out, meta = ml100k_prepared
    torch.manual_seed(0)
    seq, bag = SeqModel(meta), BagModel(meta)
    with torch.no_grad():
        for f in meta.sparse_names:
            w = torch.randn_like(seq.embedding.embeddings[f"t_{f}"].weight) * 0.1
            seq.embedding.embeddings[f"t_{f}"].weight.copy_(w)
            bag.embedding.embedding_bags[f"t_{f}"].weight.copy_(w)
        bag.out.load_state_dict(seq.out.state_dict())
    runs = []
    for model in (seq, bag):
        plugin = TransferPlugin(model, meta, TransferConfig(mode="lexico", loss="moment", fields=FIELDS),
                                RowsConfig(optimizer="adam", lr=0.05))
        _train_steps(model, plugin, out, steps=3, seed=1)
        runs.append(plugin)
    for f in meta.sparse_names:
        a = seq.embedding.embeddings[f"t_{f}"].weight
        b = bag.embedding.embedding_bags[f"t_{f}"].weight
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert runs[0].stats()["embedding.t_zip"]["target_rows"] > 0


@pytest.mark.parametrize("mode,loss,fields,barrier", [
    ("+Ours", "adversarial", None, "applied"),  # every table under transfer: the loss sees all touched rows in one span
    ("+Ours", "adversarial", None, "paper"),
    ("lexico", "adversarial", FIELDS, "applied"),  # some tables: the transfer rows are gathered from several spans
    ("lexico", "adversarial", FIELDS, "paper"),
    ("+T", "cosreg", None, "applied"),  # a loss over every touched row
    ("select", "moment", FIELDS, "applied"),
])
def test_flat_path_equals_general_path(ml100k_prepared, monkeypatch, mode, loss, fields, barrier):
    """The whole-array update of tables that share one buffer (TransferTransform._shared) gives the per-table
    path's weights, row-optimizer state, discriminators and step statistics."""
    import numpy as np

    out, meta = ml100k_prepared
    rng = np.random.default_rng(0)
    domains = {f.name: f.tail_mask() & (rng.random(f.vocab_size) >= 0.2) for f in meta.sparse}
    runs, taken = [], []
    shared_step = barrier_mod.TransferTransform._shared
    for flat in (True, False):
        def spy(self, call, transfer, context, flat=flat):
            if not flat:
                return False
            taken.append(shared_step(self, call, transfer, context))
            return taken[-1]

        monkeypatch.setattr(barrier_mod.TransferTransform, "_shared", spy)
        torch.manual_seed(3)  # not a deepcopy: that gives each table its own storage, and the general path
        model = FM(meta, embedding_dim=DIM)
        config = TransferConfig(mode=mode, loss=loss, fields=tuple(fields or meta.sparse_names), lam=0.5,
                                barrier=barrier)
        plugin = TransferPlugin(model, meta, config, RowsConfig(optimizer="adam", lr=0.05), domains=domains)
        runs.append((model, plugin, _train_steps(model, plugin, out, steps=4, seed=6)))
    (m_flat, p_flat, s_flat), (m_gen, p_gen, s_gen) = runs
    assert len(taken) == 4 and all(taken)  # 4 steps x the embedding call (first-order tables: mode B), all flat
    for (name, a), b in zip(m_flat.state_dict().items(), m_gen.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for wa, wb in zip(p_flat.table_weights, p_gen.table_weights):
        for key, value in p_flat.optimizer.state[wa].items():
            torch.testing.assert_close(value, p_gen.optimizer.state[wb][key], rtol=1e-5, atol=1e-6)
    for la, lb in zip(p_flat.losses.values(), p_gen.losses.values()):
        for a, b in zip(la.parameters(), lb.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = 0
    for sa, sb in zip(s_flat, s_gen):
        assert sa.keys() == sb.keys() and len(sa) == len(fields or meta.sparse_names)
        for key in sa:
            assert {k: sa[key][k] for k in ("rows", "source_rows", "target_rows")} == \
                   {k: sb[key][k] for k in ("rows", "source_rows", "target_rows")}, key
            assert sa[key]["transfer_loss"] == pytest.approx(sb[key]["transfer_loss"], rel=1e-4, abs=1e-7)
            assert sa[key]["mean_lambda"] == pytest.approx(sb[key]["mean_lambda"], rel=1e-4, abs=1e-7)
            moved += sa[key]["transfer_loss"] != 0
    assert moved > 0  # the transfer term was live


def test_a_transfer_field_names_its_vocabularys_table(lists_prepared):
    """hist shares item's vocabulary and table: naming it is transfer on t_item with item's domains; naming both is
    refused; the default fields are vocabulary owners only; a table serving two vocabularies is refused."""
    from torch import nn
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recsys_transfer.errors import UserError
    from recsys_transfer.rows.lookup import attach_rows
    from recsys_transfer.transfer.barrier import transfer_transform

    _, meta = lists_prepared
    assert TransferConfig(mode="+T", fields=("hist",)).transfer_fields(meta) == ["item"]
    assert TransferConfig(mode="+T", min_vocab=50).transfer_fields(meta) == ["user", "item"]  # not hist (179 ids)
    with pytest.raises(UserError, match="'item' and 'hist' both name the table t_item"):
        TransferConfig(mode="+T", fields=("item", "hist")).transfer_fields(meta)
    model = FM(meta, embedding_dim=4)
    plugin = TransferPlugin(model, meta, TransferConfig(mode="+T", loss="moment", fields=("hist",)))
    rule = plugin.transfer.rules["embedding.t_item"]
    assert list(plugin.transfer.rules) == ["embedding.t_item"] and rule.loss_index == meta.sparse_names.index("item")
    assert torch.equal(rule.source_mask, torch.from_numpy(meta.field("item").head_mask()))
    odd = nn.Module()
    odd.embedding = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_mixed", embedding_dim=4, num_embeddings=200, feature_names=["user", "item"])])
    with pytest.raises(UserError, match="t_mixed serves fields of different vocabularies"):
        transfer_transform(attach_rows(odd), meta, TransferConfig(mode="+T", fields=("item",)))
