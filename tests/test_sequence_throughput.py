"""benchmarks/sequence_throughput.py (NextItNet pretraining, ours vs RecBole): the data it builds and, on tiny
settings, that the RecBole side trains through RecBole's own model (no timing claims)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sequence_throughput", BENCH / "sequence_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dataset", "synthetic", "--syn-users", "300", "--syn-items", "60", "--seq-len", "12", "--dim", "8",
        "--blocks", "1", "--batch-size", "64", "--epochs", "2", "--warmup", "1", "--lr", "0.01"]


def test_synthetic_sequences_and_the_train_targets():
    b = _bench()
    seqs, vocab, info = b.synthetic_sequences(50, 10, 30, 1.0, 0.5, seed=3)
    assert vocab == 32 and len(seqs) == 50 and all(len(s) == 10 for s in seqs)
    assert min(s.min() for s in seqs) >= 2 and max(s.max() for s in seqs) < vocab
    again, _, _ = b.synthetic_sequences(50, 10, 30, 1.0, 0.5, seed=3)
    assert all((s == t).all() for s, t in zip(seqs, again))
    short = [np.array([5, 6]), np.array([7, 8, 9, 10])]
    data = b.Sequences(short * 10, vocab=12, seq_len=4, valid_frac=0.1, seed=0)
    assert data.n_train == 18 and len(data.valid_y) == 2
    x, y = data.x.numpy(), data.y.numpy()
    rows = {tuple(r) for r in np.concatenate([x, y], axis=1)}
    # left-padded; a position is predicted only when its input and its target are both items
    assert rows == {(0, 0, 5, 0, 0, 6), (7, 8, 9, 8, 9, 10)}
    assert data.targets == int((y != 0).sum()) == sum(1 if r[0] == 0 else 3 for r in x)
    for vx, vy in zip(data.valid_x.numpy(), data.valid_y):
        assert (vy, tuple(vx)) in {(6, (0, 0, 5)), (10, (7, 8, 9))}
    e0 = [bt.x.numpy().tolist() for bt in data.batches(0, 5)]
    assert e0 == [bt.x.numpy().tolist() for bt in data.batches(0, 5)]  # every impl sees the same order
    assert e0 != [bt.x.numpy().tolist() for bt in data.batches(1, 5)]
    for bt in data.batches(0, 5):  # x / y are the full sequences shifted
        assert (bt.full[:, :-1] == bt.x).all() and ((bt.full[:, 1:] == bt.y) | (bt.y == 0)).all()


def test_ml1m_partial_sequences(ml1m_partial_dir):
    b = _bench()
    seqs, vocab, info = b.ml1m_sequences(ml1m_partial_dir, 50)
    assert info["interactions"] == 299_418 and info["users"] == 5755
    assert vocab == info["items"] + 2 and max(len(s) for s in seqs) == 50 and min(len(s) for s in seqs) >= 2
    counts = np.bincount(np.concatenate(seqs), minlength=vocab)
    assert counts[0] == counts[1] == 0 and counts[2] > 0


def test_recbole_side_trains_on_tiny_synthetic(tmp_path):
    pytest.importorskip("recbole")
    b = _bench()
    rec = b.main([*TINY, "--impls", "recbole,recbole-last", "--syn-follow", "0.9", "--eval-every-epoch",
                  "--finetune", "",
                  "--results-dir", str(tmp_path), "--tag", "t"])
    impls = rec["result"]["impls"]
    assert list(impls) == ["recbole", "recbole-last"] and rec["result"]["comparison"] == {}
    steps = -(-rec["data"]["train_sequences"] // 64) * 2
    for name, s in impls.items():
        assert s["steps"] == steps and s["seq_per_s"] > 0 and s["parameters"] == impls["recbole"]["parameters"]
        assert len(s["valid_epochs"]) == 2 and 0 <= s["valid"]["mrr@5"] <= 1
    assert impls["recbole"]["targets_per_seq"] == pytest.approx(11.0) and impls["recbole-last"]["targets_per_seq"] == 1
    # every position trained: the successor map is learnt well beyond chance (1/60) within two epochs
    assert impls["recbole"]["valid"]["hr@5"] > 0.2
    md = (tmp_path / "sequence_throughput_synthetic_t.md").read_text()
    assert "| recbole |" in md and "| recbole-last |" in md
    assert json.loads((tmp_path / "sequence_throughput_synthetic_t.json").read_text())["config"]["seq_len"] == 12


def test_recbole_loss_is_its_calculate_loss_at_the_last_position():
    """The all-positions loss runs RecBole's own layers: restricted to the last position (and without its reg
    terms) it equals its calculate_loss(Interaction) on the same batch."""
    pytest.importorskip("recbole")
    import torch

    b = _bench()
    args = b.parse_args(["--dim", "8", "--blocks", "1", "--seq-len", "6", "--reg-weight", "0"])
    r = b.RecBole(20, args)
    x = torch.tensor([[0, 0, 3, 4, 5], [2, 3, 4, 5, 6]])
    y = torch.tensor([[0, 0, 0, 0, 7], [0, 0, 0, 0, 8]])
    loss, n = r.loss(x, y)
    assert n == 2
    ref = r.model.calculate_loss(r.interaction(x, y[:, -1]))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert r.scores(x).shape == (2, 20)


def test_paired_bootstrap_of_the_mrr5_difference():
    b = _bench()
    same = [1, 2, 7, 3] * 50
    assert b.paired_bootstrap_mrr5(same, same, 200, 0) == [0.0, 0.0]
    lo, hi = b.paired_bootstrap_mrr5([1] * 200, [6] * 100 + [1] * 100, 200, 0)
    assert 0.4 < lo <= 0.5 <= hi < 0.6


def test_unknown_impl_is_an_error():
    with pytest.raises(SystemExit):
        _bench().parse_args(["--impls", "recbole,nope"])


def test_ours_against_recbole_when_our_model_is_importable(tmp_path):
    """Both sides on the same batches: the same predicted positions per step, comparisons in the record."""
    pytest.importorskip("recbole")
    b = _bench()
    rec = b.main([*TINY, "--impls", "ours,ours-dense,recbole", "--negatives", "20", "--finetune", "",
                  "--results-dir", str(tmp_path)])
    impls = rec["result"]["impls"]
    assert impls["ours"]["targets_per_seq"] == impls["recbole"]["targets_per_seq"] == pytest.approx(11.0)
    # the same network: ours and RecBole's differ only in RecBole's output layer (final_layer, C x C + C)
    assert impls["recbole"]["parameters"] - impls["ours"]["parameters"] == 8 * 8 + 8
    assert set(rec["result"]["comparison"]) == {"ours/recbole", "ours-dense/recbole"}
    c = rec["result"]["comparison"]["ours/recbole"]
    lo, hi = c["mrr5_diff_ci95"]
    assert lo <= c["mrr5_diff"] <= hi

    # --report: the comparison again from the recorded ranks, here with a tolerance that decides on the CI alone
    path = tmp_path / "sequence_throughput_synthetic.json"
    saved = json.loads(path.read_text())
    saved["config"]["mrr_tolerance"] = -1.0
    path.write_text(json.dumps(saved))
    again = b.main(["--report", str(path)])["result"]["comparison"]["ours/recbole"]
    assert again["mrr5_diff_ci95"] == [lo, hi] and again["equal_mrr5"] == (lo <= 0 <= hi)
    assert "Comparisons recomputed" in path.with_suffix(".md").read_text()
    assert rec["ours_source"]["sha256"]
    assert "ours / recbole" in (tmp_path / "sequence_throughput_synthetic.md").read_text()


def test_ours_with_the_full_softmax(tmp_path):
    """``--softmax full``: our model's candidates are every item (RecBole's CE), no negatives drawn; recorded."""
    b = _bench()
    rec = b.main([*TINY, "--impls", "ours", "--softmax", "full", "--epochs", "1", "--finetune", "",
                  "--results-dir", str(tmp_path)])
    assert rec["config"]["softmax"] == "full"
    assert rec["result"]["impls"]["ours"]["targets_per_seq"] == pytest.approx(11.0)
    assert "Ours' softmax: full" in (tmp_path / "sequence_throughput_synthetic.md").read_text()


def test_finetune_step_time_of_peterrec_and_fine_all(tmp_path):
    b = _bench()
    rec = b.main([*TINY, "--impls", "ours", "--epochs", "1", "--negatives", "20", "--ft-steps", "2",
                  "--ft-rounds", "2", "--ft-batch-size", "32", "--results-dir", str(tmp_path)])
    ft = rec["finetune"]["variants"]
    assert list(ft) == ["peterrec", "fine_all"] and rec["finetune"]["loaded_pretrained"]
    assert ft["fine_all"]["vs_fine_all"] == 1.0 and ft["peterrec"]["ms_per_step"] > 0
    assert ft["peterrec"]["frozen_tables"] == ["t_items"] and ft["peterrec"]["share_of_fine_all"] < 0.5
    assert "## Fine-tuning step time" in (tmp_path / "sequence_throughput_synthetic.md").read_text()
