"""PeterRec's networks (issue 14): the dilated residual block (Eq. 3-4), the model patch and its insertions
(Eq. 10-12), NextItNet / GRec pretraining outputs (Eq. 1-2), PeterRec's heads (Eq. 5-7) and variants.

References are written here in float64 from the equations (loops over positions and kernel taps, LayerNorm from its
definition), on tiny hand-made inputs; metas and batches are built by hand (the sequence data lands separately).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_transfer.data.prepared import DatasetMeta, SparseFieldMeta
from recsys_transfer.errors import UserError
from recsys_transfer.models.grec import GRec
from recsys_transfer.models.nextitnet import NextItNet
from recsys_transfer.models.peterrec import VARIANTS, PeterRec
from recsys_transfer.models.registry import build_model
from recsys_transfer.models.sequence import batch_log_q, sampled_scores
from recsys_transfer.modules.dilated_cnn import DilatedCNN, DilatedResidualBlock, left_padded, padding_mask
from recsys_transfer.modules.patches import ModelPatch, PatchedResidualBlock
from recsys_transfer.objectives import task_loss
from recsys_transfer.tasks import TaskSpec
from recsys_transfer.types import Batch, FactoredScores

NEXT = TaskSpec(name="next", label="next_item", kind="retrieval", candidates="sampled", loss="softmax")


# ------------------------------------------------------------------------------------------------------------
# hand-made metas and batches


def _field(name: str, vocab: int, vocab_of: str | None = None) -> SparseFieldMeta:
    return SparseFieldMeta(name=name, vocab_size=vocab, oov_index=0, hashed=False, min_count=1,
                           frequencies=[1] * vocab, head_ids=[], multi_valued=True, vocab_of=vocab_of)


def seq_meta(num_items: int = 12, fields=("items", "negatives", "targets"), tasks=(NEXT,)) -> DatasetMeta:
    """A sequence dataset's meta: ``items`` (own vocabulary of ``num_items`` ids, 0 / 1 reserved) and the other list
    fields sharing it."""
    sparse = [_field(f, num_items, None if f == "items" else "items") for f in fields]
    labels = sorted({t.label for t in tasks})
    return DatasetMeta(dataset="seq-test", sparse=sparse, dense=[], labels=labels, split={}, head_tail={},
                       split_rows={}, split_files={}, input_rows=0, skipped_rows=0, skip_reasons={}, source={},
                       tasks=tuple(tasks))


def seq_batch(rows: dict[str, list[list[int]]], labels: dict[str, list] | None = None) -> Batch:
    keys = list(rows)
    B = len(rows[keys[0]])
    lengths = torch.tensor([len(r) for k in keys for r in rows[k]])
    values = torch.tensor([v for k in keys for r in rows[k] for v in r], dtype=torch.long)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    return Batch(dense=torch.zeros(B, 0), sparse=kjt,
                 labels={k: torch.tensor(v, dtype=torch.float32) for k, v in (labels or {}).items()})


# ------------------------------------------------------------------------------------------------------------
# float64 references from the equations


def ref_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rate: int, causal: bool) -> torch.Tensor:
    """``x [L, C]`` (one unpadded sequence) -> ``[L, C]``: out[t] = b + sum_j W[:, :, j] x[t + (j - c) * rate], zero
    outside the sequence; c = kernel - 1 (causal: taps at t, t - rate, ...) or (kernel - 1) / 2 (centred)."""
    L, k = x.shape[0], weight.shape[2]
    centre = k - 1 if causal else (k - 1) // 2
    out = torch.zeros(L, weight.shape[0], dtype=x.dtype)
    for t in range(L):
        out[t] = bias
        for j in range(k):
            s = t + (j - centre) * rate
            if 0 <= s < L:
                out[t] += weight[:, :, j] @ x[s]
    return out


def ref_ln(x: torch.Tensor, ln) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_psi(block, which: int, x: torch.Tensor) -> torch.Tensor:
    conv = block.conv1 if which == 1 else block.conv2
    rate = block.dilation * (1 if which == 1 else 2)
    return ref_conv(x, conv.weight, conv.bias, rate, block.causal)


def ref_block(block, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3-4 on one sequence ``[L, C]``."""
    relu = torch.relu
    h = relu(ref_ln(ref_psi(block, 1, x), block.ln1))
    return x + relu(ref_ln(ref_psi(block, 2, h), block.ln2))


def ref_mp(mp: ModelPatch, x: torch.Tensor, shortcut: bool = True) -> torch.Tensor:
    """Eq. 10 with GELU (tanh form): x + W_up gelu(W_down x + b_down) + b_up."""
    z = x @ mp.down.weight.t() + mp.down.bias
    g = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    branch = g @ mp.up.weight.t() + mp.up.bias
    return x + branch if shortcut else branch


def ref_patched(pb: PatchedResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """Eq. 11-12 on one sequence ``[L, C]``."""
    blk, relu = pb.block, torch.relu
    if pb.insertion == "b":
        h = relu(ref_ln(ref_mp(pb.mp1, ref_psi(blk, 1, x)), blk.ln1))
        f = relu(ref_ln(ref_mp(pb.mp2, ref_psi(blk, 2, h)), blk.ln2))
    elif pb.insertion == "c":
        h = relu(ref_ln(ref_psi(blk, 1, x), blk.ln1))
        f = ref_mp(pb.mp, relu(ref_ln(ref_psi(blk, 2, h), blk.ln2)))
    elif pb.insertion == "d":
        e = relu(ref_ln(ref_mp(pb.mp1, x) + ref_psi(blk, 1, x), blk.ln1))
        f = relu(ref_ln(ref_mp(pb.mp2, e) + ref_psi(blk, 2, e), blk.ln2))
    else:
        e = ref_mp(pb.mp1, x) + relu(ref_ln(ref_psi(blk, 1, x), blk.ln1))
        f = ref_mp(pb.mp2, e) + relu(ref_ln(ref_psi(blk, 2, e), blk.ln2))
    return x + f


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and non-zero (LayerNorm gammas around 1), so no term of a formula hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # LayerNorm gamma
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def padded(seqs: list[torch.Tensor], L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[len_b, C]`` sequences to ``[B, L, C]`` (zeros) and their mask ``[B, L, 1]``."""
    lengths = torch.tensor([len(s) for s in seqs])
    x = left_padded(torch.cat(seqs), lengths, L)
    return x, padding_mask(lengths, L, x.dtype)


# ------------------------------------------------------------------------------------------------------------
# the dilated residual block (Eq. 3-4)


def test_left_padding_places_rows_at_the_end():
    x = left_padded(torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([2, 0, 4]))
    assert x.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [3, 4, 5, 6]]
    assert padding_mask(torch.tensor([2, 0, 4]), 4)[..., 0].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_dilated_block_matches_eq_3_4_on_padded_jagged_rows(causal, dilation):
    """Eq. 3-4 (rates d, 2d; LN; ReLU; shortcut), float64, on rows of different lengths left-padded together:
    every real position equals the reference on the unpadded sequence, padded positions stay zero."""
    torch.manual_seed(0)
    block = DilatedResidualBlock(4, dilation, kernel=3, causal=causal).double()
    randomize(block)
    seqs = [torch.randn(n, 4, dtype=torch.float64) for n in (7, 3, 1)]
    x, mask = padded(seqs, 8)
    out = block(x, mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b, 8 - len(s):], ref_block(block, s), rtol=1e-10, atol=1e-10)
        assert torch.equal(out[b, : 8 - len(s)], torch.zeros(8 - len(s), 4, dtype=torch.float64))


def test_block_dilation_rates_and_init_follow_the_official_code():
    block = DilatedResidualBlock(64, 4)
    assert block.conv1.dilation == (4,) and block.conv2.dilation == (8,) and block.conv1.kernel_size == (3,)
    w = block.conv1.weight
    assert w.abs().max() <= 0.04 and abs(float(w.detach().std()) - 0.0176) < 0.002  # cut at 2 std: std 0.88 * 0.02
    assert torch.equal(block.conv1.bias, torch.zeros(64)) and block.ln1.eps == 1e-8
    cnn = DilatedCNN(8)
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in cnn.blocks] == [(1, 2), (4, 8)] * 4


def test_causal_stack_output_at_t_reads_nothing_after_t():
    torch.manual_seed(1)
    cnn = DilatedCNN(4, (1, 4, 1), causal=True).double()
    randomize(cnn)
    x = torch.randn(1, 12, 4, dtype=torch.float64)
    base = cnn(x)
    for t in (0, 3, 10):
        y = x.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:])
        out = cnn(y)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
    noncausal = DilatedCNN(4, (1,), causal=False).double()
    y = x.clone()
    y[:, 5] += 1.0
    assert not torch.allclose(noncausal(y)[:, 4], noncausal(x)[:, 4])  # sees the future


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_padding_does_not_leak(causal):
    """The same sequence padded by 0, 3 or 9 positions -- padded positions even holding garbage -- gives the same
    outputs at its real positions (float64, exact up to rounding)."""
    torch.manual_seed(2)
    cnn = DilatedCNN(4, (1, 4), causal=causal).double()
    randomize(cnn)
    s = torch.randn(5, 4, dtype=torch.float64)
    outs = []
    for pad in (0, 3, 9):
        x, mask = padded([s], 5 + pad)
        x[:, :pad] = 7.0  # garbage in the padding is masked at the stack's input
        outs.append(cnn(x, mask)[0, pad:])
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0], ref_block(cnn.blocks[1], ref_block(cnn.blocks[0], s)), rtol=1e-10,
                               atol=1e-10)


# ------------------------------------------------------------------------------------------------------------
# the model patch and its insertions (Eq. 10-12)


def test_model_patch_is_the_identity_at_init_and_eq_10_after():
    torch.manual_seed(3)
    mp = ModelPatch(16, 2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.equal(mp(x), x)
    assert mp.down.weight.abs().sum() > 0 and torch.equal(mp.up.weight, torch.zeros(16, 2, dtype=torch.float64))
    randomize(mp)
    torch.testing.assert_close(mp(x), ref_mp(mp, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("insertion", ["b", "c", "d", "e"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_patched_block_matches_eq_12(insertion, causal):
    """Random non-zero patch and block weights, float64, jagged rows padded together."""
    torch.manual_seed(4)
    block = DilatedResidualBlock(8, 2, causal=causal).double()
    pb = PatchedResidualBlock(block, insertion, bottleneck=2).double()
    randomize(block, 5)
    randomize(pb, 6)
    seqs = [torch.randn(n, 8, dtype=torch.float64) for n in (6, 2)]
    x, mask = padded(seqs, 7)
    out = pb(x, mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b, 7 - len(s):], ref_patched(pb, s), rtol=1e-10, atol=1e-10)
    assert torch.equal(out[1, :5], torch.zeros(5, 8, dtype=torch.float64))


@pytest.mark.parametrize("insertion", ["b", "c", "d", "e"])
def test_patched_block_at_init(insertion):
    """Serial insertions (b, c) equal the pretrained block at init; parallel ones (d, e) do with the patch's branch
    only (parallel_shortcut=False), and with Eq. 12's shortcut they equal Eq. 12 with H_MP = identity."""
    torch.manual_seed(7)
    block = DilatedResidualBlock(8, 1).double()
    randomize(block)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    pb = PatchedResidualBlock(block, insertion, 2).double()
    if insertion in "bc":
        torch.testing.assert_close(pb(x), block(x), rtol=0, atol=0)
    else:
        assert not torch.allclose(pb(x), block(x))
        torch.testing.assert_close(pb(x)[0], ref_patched(pb, x[0]), rtol=1e-10, atol=1e-10)
        branch_only = PatchedResidualBlock(block, insertion, 2, parallel_shortcut=False).double()
        torch.testing.assert_close(branch_only(x), block(x), rtol=0, atol=0)


def test_patched_block_wraps_the_pretrained_weights_without_owning_them():
    block = DilatedResidualBlock(16, 1)
    pb = PatchedResidualBlock(block, "d")
    assert pb.block is block and pb.block.conv1.weight is block.conv1.weight
    assert sorted(n for n, _ in pb.named_parameters()) == [
        f"{mp}.{layer}.{p}" for mp in ("mp1", "mp2") for layer in ("down", "up") for p in ("bias", "weight")]
    assert pb.mp1.down.weight.shape == (2, 16)  # default bottleneck C / 8 (k = 8d)
    with pytest.raises(UserError, match="insertion"):
        PatchedResidualBlock(block, "a")


# ------------------------------------------------------------------------------------------------------------
# NextItNet / GRec pretraining outputs (Eq. 1-2)


def test_sampled_scores_and_accidental_hits():
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    pos = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = sampled_scores(q, pos, torch.tensor([5, 7]), neg, torch.tensor([7, 4, 5]))
    want = torch.tensor([[5.0, 1.0, 2.0, float("-inf")], [-1.0, float("-inf"), -1.0, -0.5]])
    assert torch.equal(s, want)
    loss = task_loss(NEXT, s, torch.zeros(2))
    torch.testing.assert_close(loss, -(torch.log_softmax(want, 1)[:, 0]).mean())


def test_sampled_scores_subtract_the_batch_log_q_from_every_logit():
    """A weighted batch (sampler popularity): each logit of id y loses log(S q(y)), the positive's too; the
    accidental hit stays -inf; the model strips the weights before its table lookup."""
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    pos = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    kjt = KeyedJaggedTensor(keys=["items", "negatives"], values=torch.tensor([5, 7, 7, 4, 5]),
                            lengths=torch.tensor([1, 1, 3, 0]), weights=torch.tensor([0.5, -1.0, -1.0, 2.0, 0.5]))
    log_q = batch_log_q(kjt, 9)
    assert log_q.tolist() == [0, 0, 0, 0, 2.0, 0.5, 0, -1.0, 0]
    s = sampled_scores(q, pos, torch.tensor([5, 7]), neg, torch.tensor([7, 4, 5]), log_q)
    want = torch.tensor([[5.0 - 0.5, 1.0 + 1.0, 2.0 - 2.0, float("-inf")], [-1.0 + 1.0, float("-inf"), -1.0 - 2.0,
                                                                          -0.5 - 0.5]])
    assert torch.equal(s, want)
    assert batch_log_q(KeyedJaggedTensor(keys=["items"], values=torch.tensor([3]), lengths=torch.tensor([1])),
                       9) is None
    # the model on a weighted batch: the unweighted scores minus log q of each column's id
    torch.manual_seed(2)
    model = NextItNet(seq_meta(12), embedding_dim=4, dilations=(1,))
    plain = seq_batch({"items": [[2, 3, 4], [5, 6]], "negatives": [[9, 3], [2]]})
    w = {2: -0.3, 3: 0.7, 4: 1.1, 5: -2.0, 6: 0.2, 9: 0.4}
    weighted = Batch(plain.dense, KeyedJaggedTensor(
        keys=plain.sparse.keys(), values=plain.sparse.values(), lengths=plain.sparse.lengths(),
        weights=torch.tensor([w[int(i)] for i in plain.sparse.values()])), plain.labels)
    a, b = model(plain)["next"], model(weighted)["next"]
    ids = torch.tensor([[3, 9, 3, 2], [4, 9, 3, 2], [6, 9, 3, 2]])  # column 0 = the positive, then the pool
    want = a - torch.tensor([[w[int(i)] for i in r] for r in ids])
    torch.testing.assert_close(b, want)
    assert torch.isinf(b[0, 2]) and not torch.isinf(b[1, 2])  # positive 3 drawn as a negative: an accidental hit


def test_nextitnet_training_scores_every_next_item_against_the_shared_pool():
    torch.manual_seed(8)
    meta = seq_meta(12)
    model = NextItNet(meta, embedding_dim=8, dilations=(1, 4))
    batch = seq_batch({"items": [[2, 3, 4, 5], [6, 7], [8]], "negatives": [[9, 3], [10], []]})
    out = model(batch)["next"]
    assert out.shape == (3 + 1 + 0, 1 + 3)  # M = sum(len - 1) positions, pool of 3 negatives
    table = model.table.weight.detach()
    x, mask = padded([table[torch.tensor(s)] for s in ([2, 3, 4, 5], [6, 7], [8])], 4)
    h = model.cnn(x, mask).detach()
    queries = [h[0, 0], h[0, 1], h[0, 2], h[1, 2]]
    positives = [3, 4, 5, 7]
    for m, (qv, p) in enumerate(zip(queries, positives)):
        torch.testing.assert_close(out[m, 0], qv @ table[p])
        for j, n in enumerate([9, 3, 10]):
            want = float("-inf") if n == p else qv @ table[n]
            torch.testing.assert_close(out[m, 1 + j], torch.as_tensor(want))
    assert out[0, 2] == float("-inf")  # row 0 predicts item 3 at its first position: the pool's 3 is masked
    model.eval()
    calls = _count_calls(model.embedding)
    with torch.no_grad():
        full = model(seq_batch({"items": [[2, 3, 4, 5], [6, 7]]}))["next"]  # no negatives in evaluation
    assert calls[0] == 1 and full.shape == (2, 12)  # every item's row came through the same one call
    assert (full[:, :2] == torch.finfo(full.dtype).min).all() and torch.isfinite(full).all()
    torch.testing.assert_close(full[:, 2:], h[:2, -1] @ table[2:].t())


def test_evaluation_reads_the_table_when_the_dataset_lists_no_negatives_feature():
    torch.manual_seed(16)
    model = NextItNet(seq_meta(12, fields=("items",)), embedding_dim=8, dilations=(1,)).eval()
    with torch.no_grad():
        full = model(seq_batch({"items": [[2, 3], [4]]}))["next"]
        x, mask = padded([model.table.weight[torch.tensor(s)] for s in ([2, 3], [4])], 2)
        torch.testing.assert_close(full[:, 2:], model.cnn(x, mask)[:, -1] @ model.table.weight[2:].t())


def test_grec_predicts_the_masked_positions_from_both_sides():
    torch.manual_seed(9)
    meta = seq_meta(12)
    model = GRec(meta, embedding_dim=8, dilations=(1,))
    items = [[2, 1, 4, 5], [1, 7]]  # 1 = [MASK]
    targets = [[0, 3, 0, 0], [6, 0]]
    out = model(seq_batch({"items": items, "targets": targets, "negatives": [[6], [9]]}))["next"]
    assert out.shape == (2, 3)
    table = model.table.weight.detach()
    x, mask = padded([table[torch.tensor(s)] for s in items], 4)
    h = model.cnn(x, mask).detach()
    torch.testing.assert_close(out[0, 0], h[0, 1] @ table[3])
    torch.testing.assert_close(out[1, 0], h[1, 2] @ table[6])
    assert out[1, 1] == float("-inf") and torch.isfinite(out[0, 1:]).all()
    model.eval()
    with torch.no_grad():
        full = model(seq_batch({"items": [[2, 3, 4]]}))["next"]
    x, mask = padded([table[torch.tensor([2, 3, 4, 1])]], 4)  # the [MASK] token appended
    torch.testing.assert_close(full[0, 2:], model.cnn(x, mask)[0, -1].detach() @ table[2:].t())
    with pytest.raises(UserError, match="targets"):
        GRec(seq_meta(12, fields=("items", "negatives")), embedding_dim=8)


def test_nextitnet_pretraining_loss_decreases():
    """A few plain Adam steps on a tiny hand-made batch (every parameter, the item table included)."""
    torch.manual_seed(10)
    model = build_model("nextitnet", seq_meta(20), embedding_dim=16, dilations=(1, 4))
    batch = seq_batch({"items": [[2, 3, 4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]],
                       "negatives": [list(range(2, 8)), list(range(8, 14)), list(range(14, 20))]},
                      labels={"next_item": [0, 0, 0]})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task_loss(NEXT, model(batch)["next"], batch.labels["next_item"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def test_sequence_models_refuse_wrong_data():
    with pytest.raises(UserError, match="items"):
        NextItNet(_meta_without_items())
    model = NextItNet(seq_meta(12), embedding_dim=8, dilations=(1,))
    with pytest.raises(UserError, match="negatives"):
        model(seq_batch({"items": [[2, 3]]}))
    with pytest.raises(UserError, match="negatives"):  # the datasets store the feature empty without sampling
        model(seq_batch({"items": [[2, 3]], "negatives": [[]]}))
    grec = GRec(seq_meta(12), embedding_dim=8, dilations=(1,))
    with pytest.raises(UserError, match="mask_rate"):
        grec(seq_batch({"items": [[2, 3]], "negatives": [[4]], "targets": [[0, 0]]}))
    with pytest.raises(UserError, match="retrieval"):
        NextItNet(seq_meta(12, tasks=(TaskSpec("age", kind="multiclass", num_classes=3),)))


def _meta_without_items() -> DatasetMeta:
    return DatasetMeta(dataset="x", sparse=[_field("hist", 5)], dense=[], labels=["next_item"], split={},
                       head_tail={}, split_rows={}, split_files={}, input_rows=0, skipped_rows=0, skip_reasons={},
                       source={}, tasks=(NEXT,))


# ------------------------------------------------------------------------------------------------------------
# PeterRec: heads (Eq. 5-7), variants, loading a pretrained network by name

AGE = TaskSpec(name="age", label="age", kind="multiclass", num_classes=7)
COLD = TaskSpec(name="cold", label="target_item", kind="retrieval", candidates="full")


def profile_meta(num_items: int = 12) -> DatasetMeta:
    return seq_meta(num_items, fields=("items",), tasks=(AGE, COLD))


@pytest.mark.parametrize(("backbone", "head"), [("nextitnet", "tcl"), ("grec", "first_last"), ("grec", "mean"),
                                                ("nextitnet", "mean")])
def test_peterrec_heads(backbone, head):
    torch.manual_seed(11)
    model = PeterRec(profile_meta(), backbone=backbone, head=head, embedding_dim=8, dilations=(1, 4),
                     label_vocab={"cold": 5})
    items = [[1, 2, 3, 4, 1], [1, 5, 1]]
    out = model(seq_batch({"items": items}))
    assert out["age"].shape == (2, 7) and out["cold"].shape == (2, 5)
    table = model.table.weight.detach()
    x, mask = padded([table[torch.tensor(s)] for s in items], 5)
    h = model.encode(x, mask).detach()
    u = {"tcl": h[:, -1], "first_last": torch.stack([h[0, 0] + h[0, 4], h[1, 2] + h[1, 4]]),
         "mean": torch.stack([h[0].mean(0), h[1, 2:].mean(0)])}[head]
    for task in ("age", "cold"):
        lin = model.heads[task]
        torch.testing.assert_close(out[task], u @ lin.weight.t() + lin.bias)


def test_peterrec_refuses_bad_settings():
    meta = profile_meta()
    with pytest.raises(UserError, match="first_last"):
        PeterRec(meta, backbone="nextitnet", head="first_last", label_vocab={"cold": 5})
    with pytest.raises(UserError, match="variant"):
        PeterRec(meta, variant="fine_some", label_vocab={"cold": 5})
    with pytest.raises(UserError, match="label vocabulary"):
        PeterRec(meta)
    cold = DatasetMeta(**{**meta.__dict__, "source": {"num_target_classes": 9}})  # what the cold dataset records
    assert PeterRec(cold, embedding_dim=8, dilations=(1,)).heads["cold"].out_features == 9
    with pytest.raises(UserError, match="unknown argument"):
        build_model("peterrec", meta, insertions="d")


def _numel(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_variants_train_their_parameter_sets():
    C, V, nb = 16, 30, 2  # 2 blocks; bottleneck 2
    meta = profile_meta(V)
    models = {v: PeterRec(meta, variant=v, embedding_dim=C, dilations=(1, 4), label_vocab={"cold": 5})
              for v in VARIANTS}
    conv = 3 * C * C + C  # one dilated conv (weight + bias)
    ln = 2 * C
    patch = 2 * (C * 2 + 2 + 2 * C + C)  # two patches per block
    heads = (C * 7 + 7) + (C * 5 + 5)
    table = V * C
    want = {
        "peterrec": nb * patch + heads + nb * 2 * ln,
        "fine_all": table + nb * 2 * (conv + ln) + heads,
        "fine_cls": heads,
        "fine_last1": heads + conv + ln,
        "fine_last2": heads + 2 * (conv + ln),
    }
    want["peter_zero"], want["fine_zero"] = want["peterrec"], want["fine_all"]
    for v, model in models.items():
        summary = model.parameter_summary()
        assert summary["trained"] == want[v], v
        assert summary["fine_all"] == want["fine_all"], v
        assert model.pretrained == (v not in ("peter_zero", "fine_zero"))
        names = set(model.trainable_parameters())
        table_trained = "embedding.embeddings.t_items.weight" in names
        assert table_trained == (v in ("fine_all", "fine_zero")) == model.table.weight.requires_grad
        assert summary["frozen_tables"] == ([] if table_trained else ["t_items"])
    last = "cnn.blocks.1."
    assert set(models["fine_last1"].trainable_parameters()) == {
        f"heads.{t}.{p}" for t in ("age", "cold") for p in ("weight", "bias")} | {
        last + f"{m}.{p}" for m in ("conv2", "ln2") for p in ("weight", "bias")}
    assert {n for n in models["peterrec"].trainable_parameters() if "conv" in n} == set()
    batch = seq_batch({"items": [[2, 3, 1], [4, 1]]})
    for v, model in models.items():  # a frozen table's rows are detached: FineCLS runs no backward below its heads
        x, _, mask = model.embed_items(*model.lookup(batch.sparse))
        assert x.requires_grad == (v in ("fine_all", "fine_zero")), v
        assert model.encode(x, mask).requires_grad == (v != "fine_cls"), v
    no_ln = PeterRec(meta, embedding_dim=C, dilations=(1, 4), tune_layernorm=False, label_vocab={"cold": 5})
    assert no_ln.parameter_summary()["trained"] == nb * patch + heads


def test_peterrec_trains_under_ten_percent_of_fine_all_at_a_realistic_size():
    """ML-1M-sized item vocabulary (3,708 items + 2 reserved), the official code's 64 channels and 8 blocks,
    k = 8d, the age task (7 classes): PeterRec (patches + LayerNorms + head) trains < 10% of FineAll."""
    meta = seq_meta(3710, fields=("items",), tasks=(AGE,))
    peter = PeterRec(meta, variant="peterrec", insertion="d").parameter_summary()
    fine_all = PeterRec(meta, variant="fine_all").parameter_summary()
    assert peter["fine_all"] == fine_all["trained"] == 3710 * 64 + 8 * 2 * (3 * 64 * 64 + 64 + 2 * 64) + 64 * 7 + 7
    assert peter["trained"] == 8 * 2 * (2 * 64 * 8 + 8 + 64) + 8 * 2 * 2 * 64 + 64 * 7 + 7
    assert peter["share_of_fine_all"] < 0.10 and peter["share_of_fine_all"] == peter["trained"] / fine_all["trained"]
    # even against FineAll's network without its item table, the patches stay under 10% of the convolutions
    assert 8 * 2 * (2 * 64 * 8 + 8 + 64) < 0.10 * 8 * 2 * (3 * 64 * 64 + 64)


def test_peterrec_loads_a_pretrained_network_by_name_and_keeps_it_bitwise_during_fine_tuning():
    torch.manual_seed(12)
    pre = NextItNet(seq_meta(12), embedding_dim=8, dilations=(1, 4))
    model = PeterRec(profile_meta(12), variant="peterrec", insertion="d", embedding_dim=8, dilations=(1, 4),
                     label_vocab={"cold": 5})
    missing, unexpected = model.load_state_dict(pre.state_dict(), strict=False)
    assert unexpected == [] and {k.split(".")[0] for k in missing} == {"patches", "heads"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "embedding.embeddings.t_items.weight" in frozen and "cnn.blocks.0.conv1.weight" in frozen
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = seq_batch({"items": [[2, 3, 4, 1], [5, 6, 1]]}, labels={"age": [3, 1], "target_item": [0, 4]})
    for _ in range(3):
        out = model(batch)
        loss = task_loss(AGE, out["age"], batch.labels["age"]) + task_loss(COLD, out["cold"],
                                                                           batch.labels["target_item"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p.grad is None, n
    assert model.patches[0].mp1.up.weight.abs().sum() > 0  # the patches did train


# ------------------------------------------------------------------------------------------------------------
# the row pipeline: the item table's rows are updated (or frozen) through the collection's one call per forward


def _count_calls(ec) -> list[int]:
    calls = [0]
    forward = ec.forward

    def counted(kjt):
        calls[0] += 1
        return forward(kjt)

    ec.forward = counted
    return calls


def test_pretraining_through_the_row_pipeline_updates_only_the_touched_rows():
    from recsys_transfer.config import RowsConfig
    from recsys_transfer.rows.lookup import attach_rows

    torch.manual_seed(13)
    model = NextItNet(seq_meta(40), embedding_dim=8, dilations=(1, 4))
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=1e-2))
    calls = _count_calls(model.embedding)
    dense = torch.optim.Adam(rows.dense_parameters(), lr=1e-2)
    batch = seq_batch({"items": [[2, 3, 4, 5], [6, 7, 8]], "negatives": [[9, 10], [11]]})
    before = model.table.weight.detach().clone()
    losses = []
    for _ in range(5):
        loss = task_loss(NEXT, model(batch)["next"], torch.zeros(2))
        dense.zero_grad(set_to_none=True)
        rows.begin(loss)
        loss.backward()
        rows.apply()
        dense.step()
        losses.append(float(loss.detach()))
    assert calls[0] == 5 and losses[-1] < losses[0]
    changed = (model.table.weight.detach() != before).any(dim=1).nonzero().view(-1).tolist()
    assert changed == list(range(2, 12))  # the sequences' items and the pool: nothing else
    assert model.table.weight.grad is None  # row updates, no dense table gradient


@pytest.mark.parametrize("variant", ["peterrec", "fine_all"])
def test_fine_tuning_through_the_row_pipeline_freezes_the_item_table_unless_fine_all(variant):
    from recsys_transfer.config import RowsConfig
    from recsys_transfer.rows.lookup import attach_rows

    torch.manual_seed(14)
    model = PeterRec(profile_meta(12), variant=variant, embedding_dim=8, dilations=(1,), label_vocab={"cold": 5})
    frozen_tables = tuple(model.parameter_summary()["frozen_tables"])
    rows = attach_rows(model, RowsConfig(optimizer="adam", lr=1e-2, freeze=frozen_tables))
    dense = torch.optim.Adam(rows.dense_parameters(), lr=1e-2)
    assert {id(p) for p in rows.dense_parameters()} == {
        id(p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("embedding.")}
    batch = seq_batch({"items": [[2, 3, 4, 1], [5, 6, 1]]}, labels={"age": [3, 1], "target_item": [0, 4]})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        out = model(batch)
        loss = task_loss(AGE, out["age"], batch.labels["age"]) + task_loss(COLD, out["cold"],
                                                                           batch.labels["target_item"])
        dense.zero_grad(set_to_none=True)
        rows.begin(loss)
        loss.backward()
        rows.apply()
        dense.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in model.trainable_parameters()), n


def test_the_collection_always_sees_the_models_fields_in_one_order():
    from recsys_transfer.models.sequence import with_keys

    batch = seq_batch({"eval_negatives": [[1], [2, 3]], "targets": [[0, 4], [5]], "items": [[2, 4], [5]]})
    kjt = with_keys(batch.sparse, ["items", "negatives", "targets"])
    assert kjt.keys() == ["items", "negatives", "targets"]
    assert kjt["items"].values().tolist() == [2, 4, 5] and kjt["targets"].lengths().tolist() == [2, 1]
    assert kjt["negatives"].lengths().tolist() == [0, 0]
    same = seq_batch({"items": [[2]], "negatives": [[3]]}).sparse
    assert with_keys(same, ["items", "negatives"]) is same


def test_full_softmax_option_is_the_cross_entropy_over_every_item():
    """softmax='full': the pool is every item 2..V-1 (the positive's own column at -inf), so the objective's
    sampled-softmax loss equals the full softmax over the items."""
    torch.manual_seed(15)
    model = NextItNet(seq_meta(12), embedding_dim=8, dilations=(1,), softmax="full")
    items = [[2, 3, 4], [5, 6]]
    out = model(seq_batch({"items": items, "negatives": [[9], []]}))["next"]  # the batch's pool is replaced
    assert isinstance(out, FactoredScores) and out.query.shape == (3, 8) and out.candidates.shape == (10, 8)
    assert out.positive.tolist() == [1, 2, 4]  # ids 3, 4, 6 among the items 2..11
    table = model.table.weight.detach()
    x, mask = padded([table[torch.tensor(s)] for s in items], 3)
    h = model.cnn(x, mask).detach()
    logits = torch.stack([h[0, 0], h[0, 1], h[1, 1]]) @ table[2:].t()  # [M, 10]
    positives = torch.tensor([3, 4, 6])
    want = F.cross_entropy(logits, positives - 2)
    torch.testing.assert_close(task_loss(NEXT, out, torch.zeros(2)), want)
    # and its gradient
    out = model(seq_batch({"items": items}))["next"]
    task_loss(NEXT, out, torch.zeros(2)).backward()
    got = model.table.weight.grad.clone()
    model.zero_grad()
    table = model.table.weight
    x, mask = padded([table[torch.tensor(s)] for s in items], 3)
    h = model.cnn(x, mask)
    F.cross_entropy(torch.stack([h[0, 0], h[0, 1], h[1, 1]]) @ table[2:].t(), positives - 2).backward()
    torch.testing.assert_close(got, model.table.weight.grad, rtol=1e-5, atol=1e-8)
    assert got[2:].abs().min() > 0  # every item row took a gradient (the pool is the whole table)
    with pytest.raises(UserError, match="softmax"):
        NextItNet(seq_meta(12), softmax="fuII")


@pytest.mark.parametrize("name", ["nextitnet", "grec", "peterrec"])
def test_registered_sequence_models_build_with_their_defaults(name):
    """The registry's defaults: 64 channels, blocks (1, 4) x 4 (conv rates 1, 2, 4, 8 four times), kernel 3."""
    tasks = (AGE,) if name == "peterrec" else (NEXT,)
    meta = seq_meta(30, tasks=tasks)
    model = build_model(name, meta).eval()
    assert model.dataset_id == meta.dataset_id and len(model.cnn.blocks) == 8
    with torch.no_grad():
        out = model(seq_batch({"items": [[2, 3, 4, 1], [5, 1]]}))
    assert out[tasks[0].name].shape == ((2, 7) if name == "peterrec" else (2, 30))


def test_model_patch_with_the_papers_relu():
    torch.manual_seed(17)
    mp = ModelPatch(8, 2, activation="relu").double()
    randomize(mp)
    x = torch.randn(4, 8, dtype=torch.float64)
    want = x + torch.relu(x @ mp.down.weight.t() + mp.down.bias) @ mp.up.weight.t() + mp.up.bias
    torch.testing.assert_close(mp(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(UserError, match="activation"):
        ModelPatch(8, 2, activation="tanh")


def test_a_copied_peterrec_patches_its_own_copy_of_the_pretrained_blocks():
    """deepcopy (best-model snapshots) keeps each patched block pointing at the copy's pretrained block."""
    import copy

    model = PeterRec(profile_meta(), embedding_dim=8, dilations=(1, 4), label_vocab={"cold": 5})
    twin = copy.deepcopy(model)
    for pb, block in zip(twin.patches, twin.cnn.blocks):
        assert pb.block is block and pb.block.conv1.weight is block.conv1.weight
    assert twin.patches[0].block is not model.cnn.blocks[0]
    with torch.no_grad():
        w = twin.cnn.blocks[0].conv1.weight
        w.add_(torch.randn_like(w))  # random: a constant shift of every output channel is undone by the LayerNorm
    batch = seq_batch({"items": [[2, 3, 1]]})
    assert not torch.allclose(twin(batch)["age"], model(batch)["age"])
