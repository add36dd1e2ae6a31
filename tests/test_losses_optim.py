"""Transfer losses (batched over tables) against plain per-table formulas; row optimizers against torch.optim."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from recsys_transfer.optim.rowwise import RowAdagrad, RowAdam, RowSGD
from recsys_transfer.transfer.losses import AdversarialLoss, CosRegLoss, MMDLoss, MomentLoss


def _case(seed: int = 0, tables: int = 3, n: int = 9, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tables, n, d, generator=g, dtype=torch.float64)
    src = torch.rand(tables, n, generator=g) < 0.4
    tgt = ~src & (torch.rand(tables, n, generator=g) < 0.8)
    src[:, -1] = tgt[:, -1] = False  # padding row
    src[2] = False  # table 2 has no source rows: loss 0, gradient 0
    return x, src, tgt


def test_cosreg_matches_pairwise_loop():
    x, src, tgt = _case()
    got = CosRegLoss(3)(x, src, tgt, torch.arange(3))
    for t in range(3):
        rows = x[t][src[t] | tgt[t]]
        pairs = [F.cosine_similarity(rows[i], rows[j], dim=0) for i, j in itertools.permutations(range(len(rows)), 2)]
        assert torch.isclose(got[t], torch.stack(pairs).mean(), atol=1e-12)


def test_mmd_matches_explicit_kernel_sums():
    x, src, tgt = _case()
    got = MMDLoss(3)(x, src, tgt, torch.arange(3))
    for t in range(2):
        s, q = x[t][src[t]], x[t][tgt[t]]
        z = torch.cat([s, q])
        d2 = torch.tensor([[float((a - b).pow(2).sum()) for b in z] for a in z], dtype=torch.float64)
        n = len(z)
        base = d2.sum() / (n * n - n)
        k = sum(torch.exp(-d2 / (2 * m * base)) for m in (0.25, 0.5, 1.0, 2.0, 4.0))
        ns = len(s)
        want = k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()
        assert torch.isclose(got[t], want, atol=1e-12)
    assert got[2] == 0


def test_batched_equals_one_table_at_a_time_and_gradients():
    x, src, tgt = _case(seed=3)
    for loss in (MomentLoss(3), CosRegLoss(3), MMDLoss(3)):
        values, grad = loss.grad(x, src, tgt, torch.arange(3))
        for t in range(3):
            v1, g1 = loss.grad(x[t : t + 1], src[t : t + 1], tgt[t : t + 1], torch.tensor([t]))
            assert torch.allclose(values[t], v1[0]) and torch.allclose(grad[t], g1[0])
        outside = ~(src | tgt)
        if not isinstance(loss, CosRegLoss):
            assert (grad[outside.unsqueeze(-1).expand_as(grad)] == 0).all()
        assert (grad[2] == 0).all() or isinstance(loss, CosRegLoss)


def test_adversarial_discriminators_are_per_table_and_learn():
    x, src, tgt = _case(seed=5)
    x[:, :, 0] += 3.0 * src.double()  # a separable source/target shift
    a = AdversarialLoss(3, 4, hidden=8, lr=0.05, seed=1, dtype=torch.float64)
    b = AdversarialLoss(3, 4, hidden=8, lr=0.05, seed=1, dtype=torch.float64)
    before = a.discriminator_loss(x, src, tgt, torch.arange(3)).detach()
    for _ in range(30):
        a.grad(x, src, tgt, torch.arange(3))
        b.grad(x[1:2], src[1:2], tgt[1:2], torch.tensor([1]))  # table 1 alone, in another grouping
    after = a.discriminator_loss(x, src, tgt, torch.arange(3)).detach()
    assert after[0] < before[0] - 0.1 and after[1] < before[1] - 0.1
    assert after[2] == before[2] == 0  # no source rows in table 2: nothing learned, nothing changed
    assert torch.allclose(a.w1[1], b.w1[1]) and torch.allclose(a.b2[1], b.b2[1])  # grouping does not matter
    assert torch.equal(b.w1[0], AdversarialLoss(3, 4, hidden=8, seed=1, dtype=torch.float64).w1[0])  # untouched


@pytest.mark.parametrize("make_row,make_dense", [
    (lambda p: RowSGD([p], lr=0.1, momentum=0.9), lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9)),
    (lambda p: RowSGD([p], lr=0.1, momentum=0.9, nesterov=True),
     lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True)),
    (lambda p: RowAdam([p], lr=0.01), lambda p: torch.optim.Adam([p], lr=0.01)),
])
def test_row_optimizers_equal_torch_when_every_row_is_touched(make_row, make_dense):
    """With all rows touched every step, lazy per-row state is exactly the dense optimizer's."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    row, dense = make_row(a), make_dense(b)
    rows = torch.arange(6)
    for _ in range(7):
        grad = torch.randn(6, 3, generator=g, dtype=torch.float64)
        row.update_rows(a, rows, grad)
        b.grad = grad.clone()
        dense.step()
    assert torch.allclose(a, b, atol=1e-12)


def test_rowwise_adagrad_formula_and_laziness():
    w = torch.nn.Parameter(torch.ones(4, 2, dtype=torch.float64))
    opt = RowAdagrad([w], lr=0.5, eps=0.0)
    opt.update_rows(w, torch.tensor([1, 3]), torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.float64))
    # s_1 = mean(9, 16) = 12.5; w_1 = 1 - 0.5 * g / sqrt(12.5)
    assert torch.allclose(w[1], 1 - 0.5 * torch.tensor([3.0, 4.0], dtype=torch.float64) / 12.5 ** 0.5)
    assert torch.equal(w[0], torch.ones(2, dtype=torch.float64)) and torch.equal(w[2], w[0])
    assert opt.state[w]["sum"].tolist() == [0.0, 12.5, 0.0, 1.0]
    state = opt.state_dict()
    fresh = RowAdagrad([w], lr=0.5, eps=0.0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state[w]["sum"], opt.state[w]["sum"])


def test_row_optimizer_validation():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="learning rate"):
        RowSGD([p], lr=0)
    with pytest.raises(ValueError, match="nesterov"):
        RowSGD([p], nesterov=True)


def test_row_optimizer_reads_the_live_param_groups():
    """Hyper-parameters come from the optimizer's current group dicts: after load_state_dict (which builds new
    ones) an lr set on them takes effect, and a parameter added by add_param_group gets its own group's lr."""
    from recsys_transfer.optim.rowwise import make_row_optimizer

    a, b = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3, 2))
    opt = make_row_optimizer("sgd", [a], lr=0.5)
    rows, mu = torch.tensor([1]), torch.ones(1, 2)
    opt.update_rows(a, rows, mu)
    assert float(a.detach()[1, 0]) == 0.5
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.0
    opt.update_rows(a, rows, mu)
    assert float(a.detach()[1, 0]) == 0.5  # lr 0 from the new group dict, not the cached old one
    opt.add_param_group({"params": [b], "lr": 0.25})
    opt.update_rows_many([a, b], [rows, rows], [mu, mu])
    assert (float(a.detach()[1, 0]), float(b.detach()[1, 0])) == (0.5, 0.75)
    with pytest.raises(KeyError, match="not managed"):
        opt.update_rows(torch.nn.Parameter(torch.ones(3, 2)), rows, mu)


def test_adversarial_manual_gradients_match_autograd():
    """The hand-written backward of AdversarialLoss.grad equals autograd through the same discriminator."""
    x, src, tgt = _case(seed=7, tables=4, n=11)
    tables = torch.tensor([3, 0, 2, 1])
    manual = AdversarialLoss(4, 4, hidden=6, lr=0.01, seed=3, dtype=torch.float64)
    auto = AdversarialLoss(4, 4, hidden=6, lr=0.01, seed=3, dtype=torch.float64)
    values, gx = manual.grad(x, src, tgt, tables)
    leaf = x.clone().requires_grad_(True)
    want_values = auto(leaf, src, tgt, tables)
    (want_gx,) = torch.autograd.grad(want_values.sum(), leaf)
    assert torch.allclose(values, want_values.detach(), atol=1e-12)
    assert torch.allclose(gx, want_gx, atol=1e-12)
    params = [auto.w1, auto.b1, auto.w2, auto.b2]
    disc = auto.discriminator_loss(x, src, tgt, tables).sum()
    grads = torch.autograd.grad(disc, params)
    # replay one lazy Adam step with autograd's gradients and compare the updated discriminators
    from recsys_transfer.optim.rowwise import adam_rows

    active = src.any(1) & tgt.any(1)
    rows = tables[active]
    for p, g in zip(auto.parameters(), grads):  # lazy Adam per parameter, from fresh state
        w = p.data.reshape(4, -1).clone()
        m, v, step = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(4, dtype=torch.int64)
        adam_rows(w, rows, g.reshape(4, -1).index_select(0, rows), m, v, step, lr=0.01, beta1=0.5,
                  beta2=0.999, eps=1e-8, weight_decay=0.0)
        p.data.copy_(w.view_as(p))
    for a, b in zip(manual.parameters(), auto.parameters()):
        assert torch.allclose(a, b, atol=1e-12)
    assert not torch.equal(manual.w1[3], AdversarialLoss(4, 4, hidden=6, seed=3, dtype=torch.float64).w1[3])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "rowwise_adagrad"])
def test_update_rows_many_on_a_shared_buffer_equals_one_table_at_a_time(name):
    """Tables moved into one buffer (recsys_transfer.flat) are updated with one gather/scatter per tensor; the
    result must equal updating each table alone, state included, and the state must live in one buffer."""
    from recsys_transfer.flat import rows_of_one_buffer, share_storage
    from recsys_transfer.optim.rowwise import make_row_optimizer

    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 4), (3, 4), (11, 4)]
    flat = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in flat]
    share_storage(flat)
    assert rows_of_one_buffer(flat) is not None and rows_of_one_buffer(alone) is None
    opt_flat, opt_alone = make_row_optimizer(name, flat, lr=0.1), make_row_optimizer(name, alone, lr=0.1)
    for step in range(3):
        rows = [torch.tensor(r) for r in ([0, 5, 6], [2], [1, 3, 10])[: 3 - step % 2]]  # a table left out on odd steps
        mus = [torch.randn(len(r), 4, generator=gen, dtype=torch.float64) for r in rows]
        with torch.profiler.profile() as prof:
            opt_flat.update_rows_many(flat[: len(rows)], rows, mus)
        # one gather and one scatter per tensor list (weights, then each state: [R, D] moments, [R] steps or sums)
        calls = {e.key: e.count for e in prof.key_averages()}
        lists = 1 + len(opt_flat.state[flat[0]])
        assert (calls.get("aten::index_select", 0), calls.get("aten::index_copy_", 0)) == (lists, lists), calls
        for p, r, m in zip(alone, rows, mus):
            opt_alone.update_rows(p, r, m)
    for a, b in zip(flat, alone):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
        for key, value in opt_alone.state[b].items():
            torch.testing.assert_close(opt_flat.state[a][key], value, rtol=0, atol=1e-12)
    for key in opt_flat.state[flat[0]]:
        assert rows_of_one_buffer([opt_flat.state[p][key] for p in flat]) is not None


def test_adversarial_parameters_are_views_of_one_buffer_and_survive_conversion():
    """The four discriminator parameters view one [T, K] buffer (one Adam call updates them); after .double()
    (which gives them their own storage) the loss re-packs them and keeps training them."""
    import copy

    x, src, tgt = _case(seed=2)
    loss = AdversarialLoss(3, 4, hidden=8, lr=0.05, seed=1)
    assert set(loss.state_dict()) == {"w1", "b1", "w2", "b2"}
    ptrs = {p.untyped_storage().data_ptr() for p in loss.parameters()}
    assert len(ptrs) == 1
    twin = copy.deepcopy(loss)  # Parameter.__deepcopy__ clones each parameter: the twin re-packs on first use
    twin.grad(x.float(), src, tgt, torch.arange(3))
    assert len({p.untyped_storage().data_ptr() for p in twin.parameters()}) == 1
    assert twin.w1.untyped_storage().data_ptr() not in ptrs
    assert not torch.equal(twin.w1, loss.w1)  # trained apart from the original
    loss = loss.double()
    before = [p.detach().clone() for p in loss.parameters()]
    loss.grad(x, src, tgt, torch.arange(3))
    assert all(p.dtype == torch.float64 for p in loss.parameters())
    assert len({p.untyped_storage().data_ptr() for p in loss.parameters()}) == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, loss.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adam", "rowwise_adagrad"])
def test_update_rows_many_with_the_callers_current_rows(name):
    """Passing the rows' present values (``current``, as the fused step does) gives the same update as letting
    the optimizer gather them."""
    from recsys_transfer.flat import share_storage
    from recsys_transfer.optim.rowwise import make_row_optimizer

    gen = torch.Generator().manual_seed(1)
    runs = []
    for hint in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64))
                  for s in (5, 8)]
        share_storage(params)
        opt = make_row_optimizer(name, params, lr=0.1)
        for _ in range(3):
            rows = [torch.tensor([0, 3]), torch.tensor([1, 2, 7])]
            mus = [torch.randn(len(r), 3, generator=gen, dtype=torch.float64) for r in rows]
            current = torch.cat([p.detach()[r] for p, r in zip(params, rows)]) if hint else None
            opt.update_rows_many(params, rows, mus, current=current)
        runs.append(torch.cat([p.detach() for p in params]))
        gen.manual_seed(1)
    assert torch.equal(runs[0], runs[1])


def test_join_is_a_view_of_adjacent_blocks_and_a_copy_otherwise():
    from recsys_transfer.flat import join

    t = torch.arange(24.0).view(8, 3)
    joined = join([t[0:2], t[2:5], t[5:8]])
    assert joined.data_ptr() == t.data_ptr() and torch.equal(joined, t)
    gap = join([t[0:2], t[3:5]])
    assert gap.data_ptr() != t.data_ptr() and torch.equal(gap, torch.cat([t[0:2], t[3:5]]))
    swapped = join([t[2:4], t[0:2]])
    assert torch.equal(swapped, torch.cat([t[2:4], t[0:2]]))


def test_update_rows_many_with_lazy_rows_and_direction_blocks():
    """What the row pipeline passes (the rows as a lazy sequence, the directions as row blocks of one tensor, the
    buffer rows) gives the update of plain lists, without making the per-table rows or slicing the directions."""
    from recsys_transfer.flat import Blocks, Lazy, join, share_storage
    from recsys_transfer.optim.rowwise import make_row_optimizer

    gen = torch.Generator().manual_seed(2)
    sizes, firsts = (5, 8, 6), (0, 5, 13)
    runs = []
    for lazy in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, 3, generator=torch.Generator().manual_seed(s))) for s in sizes]
        share_storage(params)
        opt = make_row_optimizer("adam", params, lr=0.1)
        for _ in range(3):
            rows = [torch.tensor([0, 3]), torch.tensor([1, 2, 7]), torch.tensor([4])]
            mu = torch.randn(6, 3, generator=gen)
            spans = [(0, 2), (2, 5), (5, 6)]
            buffer_rows = torch.cat([r + f for r, f in zip(rows, firsts)])
            made = []
            if lazy:
                lazy_rows = Lazy(3, lambda k: made.append(k) or rows[k])
                opt.update_rows_many(params, lazy_rows, Blocks(mu, spans), buffer_rows=buffer_rows)
            else:
                opt.update_rows_many(params, rows, [mu[lo:hi] for lo, hi in spans], buffer_rows=buffer_rows)
            assert made == []
        gen.manual_seed(2)
        runs.append([torch.cat([p.detach() for p in params])] + [v.clone() for p in params
                                                               for v in opt.state[p].values()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    t = torch.arange(12.0).view(6, 2)
    assert join(Blocks(t, [(0, 2), (2, 6)])) is t
    assert torch.equal(join(Blocks(t, [(2, 6), (0, 2)])), torch.cat([t[2:6], t[0:2]]))
    assert torch.equal(join(Blocks(t, [(0, 2), (3, 6)])), torch.cat([t[0:2], t[3:6]]))


def test_per_row_state_of_two_widths_found_by_one_shift():
    """Adam's row_step of tables of two widths is one buffer; an update of the second width's tables finds its rows
    there by shifting the buffer rows (no per-table rows made), and counts the right rows."""
    from recsys_transfer.flat import Blocks, Lazy, share_storage
    from recsys_transfer.optim.rowwise import make_row_optimizer

    wide = [torch.nn.Parameter(torch.randn(s, 4)) for s in (7, 9)]
    narrow = [torch.nn.Parameter(torch.randn(s, 2)) for s in (7, 9)]
    share_storage(wide)
    share_storage(narrow)
    opt = make_row_optimizer("adam", wide + narrow, lr=0.1)
    rows = [torch.tensor([1, 6]), torch.tensor([0, 8])]
    made = []
    lazy = Lazy(2, lambda k: made.append(k) or rows[k])
    buffer_rows = torch.cat([rows[0], rows[1] + 7])
    opt.update_rows_many(wide, lazy, Blocks(torch.randn(4, 4), [(0, 2), (2, 4)]), buffer_rows=buffer_rows)
    opt.update_rows_many(narrow, lazy, Blocks(torch.randn(4, 2), [(0, 2), (2, 4)]), buffer_rows=buffer_rows)
    assert made == []
    for p, r in zip(narrow, rows):
        want = torch.zeros(len(p), dtype=torch.int64)
        want[r] = 1
        assert torch.equal(opt.state[p]["row_step"], want)
