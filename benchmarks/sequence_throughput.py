"""Pretraining throughput (sequences/s) and validation MRR@5 of our NextItNet against RecBole's NextItNet, side by
side on the SAME sequences, dimensions and batches (issue 14, section 5).

Data (built in memory, seeded; no prepared directory is needed):

* ``ml1m``: ``../shared/data/movielens-1m-partial`` (``ratings_part1.tsv`` + ``ratings_part2.tsv``, tab-separated
  ``user_id movie_id rating timestamp``; every rating is an interaction): each user's items in time order (ties by
  movie id), the LAST ``--seq-len`` kept; users with fewer than 2 items dropped. Item ids: ``0`` padding, ``1`` the
  special token (never in a sequence here), ``2..`` the movies by descending frequency (ties by movie id), as the
  shared PeterRec interface reserves them.
* ``synthetic``: the same schema at scale (``--syn-users`` x ``--seq-len``, ``--syn-items`` items): every item is
  drawn from a Zipf(``--syn-zipf``) long tail, except that with probability ``--syn-follow`` the next item is the
  fixed successor of the previous one (a seeded random map), so next-item models have something to learn and a
  validation MRR@5 separates a trained model from popularity.

Split 90/10 by user (seeded, as the interface's ``task: pretrain``). Training: every train sequence, left-padded
with 0 to ``--seq-len`` (the official code's zero padding at the beginning), gives input ``x = s[:-1]`` and targets
``y = s[1:]``; every position whose input and target are both items is predicted (``len - 1`` targets per
sequence). Validation: for each validation user, the last item is held out and ranked against the WHOLE item pool
(ids 2.., padding and the special token excluded; pessimistic ties, ``recsys_transfer.metrics.ranking``) from the
scores after the preceding items: MRR@5 (and HR@5, NDCG@10, MRR@10); also MRR@5 / HR@5 with the user's own input
items excluded too (a MovieLens user rates a movie once, so the held-out item is never among them).

The network is the same on both sides: embedding 64 (``--dim``), RecBole's default ``block_num: 5`` with
``dilations: [1, 4]`` (10 residual blocks, convolution rates 1,2 / 4,8 repeated 5 times; our
``dilations=(1, 4) * 5``), kernel 3, Adam lr 1e-3 (RecBole's ``learning_rate``, no weight decay), batch
``--batch-size`` sequences, ``--epochs`` epochs; each epoch's order is one seeded permutation that every
implementation follows, and every implementation trains on the identical ``[B, n-1]`` tensors of each step.

Implementations (``--impls``):

* ``recbole``: ``recbole.model.sequential_recommender.NextItNet`` (``pip install recbole==1.2.1 --no-deps``, see the
  Makefile), built from a plain config dict and a one-method dataset stub (its ``__init__`` reads only
  ``dataset.num(item_field)``), its own initialisation, layers and loss terms (``loss_type: CE``, ``reg_weight``
  1e-5 on the item table, the output layer and the residual blocks' weights), trained by ``torch.optim.Adam`` as its
  Trainer does. RecBole's ``forward`` returns only the LAST position (its data pipeline instead turns every prefix
  of a sequence into a row), so to train every position of the same batch we run its layers without that slice:
  ``final_layer(residual_blocks(item_embedding(x)))`` -> ``[B, n-1, 64]``, CE over ALL items (its only softmax) at
  the predicted positions. Validation uses its own ``full_sort_predict(Interaction)``.
* ``recbole-last``: the same model through its unchanged ``calculate_loss(Interaction)`` (one target per row: the
  last item), on the same batches; throughput of its public API path. One target per sequence instead of
  ``len - 1``: its validation MRR is that of a model trained on far fewer targets, not a like-for-like quality
  point; to cover every position RecBole's pipeline feeds ``len - 1`` prefix rows per sequence, so its sequences/s
  on that path is about its rows/s divided by the targets per sequence (the table's last column).
* ``ours``: ``recsys_transfer.models.nextitnet.NextItNet`` -- see ``Ours`` (skipped with a line when our model is not
  importable yet).

Padding: we left-pad (the NextItNet convention: a causal model's last position is the last item). RecBole's own
``SequentialDataset`` right-pads and its NextItNet still reads position -1; left padding is what its model needs.

Timing is INTERLEAVED in one process: for every step each implementation trains on the same batch, in an order
rotating from step to step, so background load on the shared machine hits all alike; each step (forward, loss,
backward, optimizer step) is timed on its own, batches are built outside the timers. Per epoch, sequences/s =
batch size / the median step time over the epoch's steps after ``--warmup`` steps; reported: the median over the
epochs (repeats) and their range, and the plain total (sequences / summed step time).

Usage::

    python benchmarks/sequence_throughput.py --dataset ml1m                       # the recorded comparison
    python benchmarks/sequence_throughput.py --dataset synthetic --epochs 1 --max-steps 60   # throughput at scale

Results go to ``benchmarks/results/sequence_throughput_<dataset>.{json,md}`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput_vs_peers import log, machine_record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "data"))
ML1M_RAW = DATA / "movielens-1m-partial"
IMPLS = ("ours", "ours-dense", "recbole", "recbole-last")
PAD, SPECIAL, FIRST_ITEM = 0, 1, 2


def have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def have_recbole() -> bool:
    return have("recbole")


def have_ours() -> bool:
    return have("recsys_transfer.models.nextitnet")


def ours_source() -> dict | None:
    """Where our NextItNet was imported from (its files' sha256 and their checkout's commit): while the model is
    on another branch, a run may put that checkout first on PYTHONPATH, and the record must say so."""
    if not have_ours():
        return None
    import hashlib
    import subprocess

    import recsys_transfer

    root = Path(recsys_transfer.__file__).resolve().parent
    files = ["models/nextitnet.py", "models/sequence.py", "modules/dilated_cnn.py"]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if os.environ.get("OURS_FROM"):  # a snapshot outside git (e.g. `git archive` of the model's branch): say which
        git = os.environ["OURS_FROM"]
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *files], capture_output=True,
                           text=True).stdout.strip()
    return {"package": str(root), "commit": git, "model_files_uncommitted": bool(dirty),
            "sha256": {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:16] for f in files
                       if (root / f).is_file()}}


# -- data ------------------------------------------------------------------------------------------------------


def ml1m_sequences(raw: Path, seq_len: int) -> tuple[list[np.ndarray], int, dict]:
    """Per user (ascending user id), the last ``seq_len`` items in time order, ids remapped to 2.. by descending
    frequency; users with < 2 items dropped. Returns (sequences, vocabulary size incl. 0 and 1, info)."""
    parts = sorted(raw.glob("ratings_part*.tsv"))
    if not parts:
        raise FileNotFoundError(f"no ratings_part*.tsv under {raw}")
    arr = np.concatenate([np.loadtxt(p, delimiter="\t", skiprows=1, dtype=np.int64) for p in parts])
    user, movie, ts = arr[:, 0], arr[:, 1], arr[:, 3]
    movies, counts = np.unique(movie, return_counts=True)
    rank = np.lexsort((movies, -counts))  # most frequent first, ties by movie id
    ids = np.empty(len(movies), dtype=np.int64)
    ids[rank] = np.arange(FIRST_ITEM, FIRST_ITEM + len(movies))
    item = ids[np.searchsorted(movies, movie)]
    order = np.lexsort((movie, ts, user))
    user, item = user[order], item[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], len(user)]
    seqs = [item[max(s, e - seq_len):e] for s, e in zip(starts, ends) if e - s >= 2]
    info = {"source": str(raw), "files": [p.name for p in parts], "interactions": int(len(arr)),
            "users": int(len(starts)), "users_kept": len(seqs), "items": int(len(movies))}
    return seqs, FIRST_ITEM + len(movies), info


def synthetic_sequences(users: int, seq_len: int, items: int, zipf: float, follow: float,
                        seed: int) -> tuple[list[np.ndarray], int, dict]:
    """``users`` sequences of exactly ``seq_len`` items from ``items`` items: Zipf(``zipf``) popularity over a
    seeded random item order; with probability ``follow`` the next item is the previous one's fixed successor."""
    rng = np.random.default_rng([seed, 17])
    p = 1.0 / np.arange(1, items + 1) ** zipf
    p /= p.sum()
    popular = rng.permutation(items)  # item of popularity rank r
    succ = rng.permutation(items)
    draws = popular[rng.choice(items, size=(users, seq_len), p=p)]
    follows = rng.random((users, seq_len)) < follow
    seq = draws.copy()
    for t in range(1, seq_len):
        seq[:, t] = np.where(follows[:, t], succ[seq[:, t - 1]], draws[:, t])
    seq += FIRST_ITEM
    info = {"source": "synthetic", "users": users, "items": items, "zipf": zipf, "follow": follow, "seed": seed,
            "distinct_items_used": int(len(np.unique(seq)))}
    return list(seq), FIRST_ITEM + items, info


def split_users(n: int, valid_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 90]).permutation(n)
    n_valid = max(1, int(round(n * valid_frac)))
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def left_pad(seqs: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-width:]
        out[i, width - len(s):] = s
    return out


class TrainBatch(NamedTuple):
    """``x``/``y`` ``[b, n-1]`` (inputs, targets; 0 = padding / not predicted), ``full [b, n]`` the left-padded
    sequences they come from, ``key`` (seed, epoch, step) seeding anything a side draws for the batch."""

    x: object  # torch.Tensor (torch is imported lazily)
    y: object
    full: object
    key: tuple


class Sequences:
    """The train tensors ``x``/``y`` ([N, n-1], left-padded; ``y`` = 0 where not predicted) and the validation
    inputs/targets, with one seeded batch order per epoch shared by every implementation."""

    def __init__(self, seqs: list[np.ndarray], vocab: int, seq_len: int, valid_frac: float, seed: int) -> None:
        import torch

        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed
        train_idx, valid_idx = split_users(len(seqs), valid_frac, seed)
        full = left_pad([seqs[i] for i in train_idx], seq_len)
        x, y = full[:, :-1], full[:, 1:].copy()
        y[x == PAD] = PAD
        self.full = torch.from_numpy(full)
        self.x, self.y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        self.targets = int((y != PAD).sum())
        self.valid_x = torch.from_numpy(left_pad([seqs[i][:-1] for i in valid_idx], seq_len - 1))
        self.valid_y = np.array([seqs[i][-1] for i in valid_idx], dtype=np.int64)

    @property
    def n_train(self) -> int:
        return self.x.shape[0]

    def batches(self, epoch: int, batch_size: int):
        """``TrainBatch`` es of one epoch: the same rows in the same order for every implementation."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train)
        for k, s in enumerate(range(0, self.n_train, batch_size)):
            idx = perm[s:s + batch_size]
            yield TrainBatch(self.x[idx], self.y[idx], self.full[idx], (self.seed, epoch, k))


def validation_metrics(score_fn, data: Sequences, batch_size: int = 1024) -> dict:
    """Full-pool ranking of each validation user's held-out last item; ``score_fn(x [b, n-1]) -> [b, V]``."""
    import torch

    from recsys_transfer.metrics.ranking import full_ranking_ranks, ranking_metrics

    ranks, ranks_nh = [], []
    with torch.no_grad():
        for s in range(0, len(data.valid_y), batch_size):
            x = data.valid_x[s:s + batch_size]
            scores = score_fn(x).float().numpy()
            exclude = np.zeros_like(scores, dtype=bool)
            exclude[:, :FIRST_ITEM] = True
            ranks.append(full_ranking_ranks(scores, data.valid_y[s:s + batch_size], exclude))
            rows = np.repeat(np.arange(len(x)), x.shape[1])
            exclude[rows, x.numpy().ravel()] = True  # + the items of the user's own input sequence
            ranks_nh.append(full_ranking_ranks(scores, data.valid_y[s:s + batch_size], exclude))
    ranks, ranks_nh = np.concatenate(ranks), np.concatenate(ranks_nh)
    nh = ranking_metrics(ranks_nh, ks=(5, 10))
    return {**ranking_metrics(ranks, ks=(5, 10)), "mrr@5_excl_history": nh["mrr@5"],
            "hr@5_excl_history": nh["hr@5"], "ranks": ranks.tolist()}


def paired_bootstrap_mrr5(ranks_a, ranks_b, n_boot: int, seed: int) -> list[float]:
    """95% CI of MRR@5(a) - MRR@5(b) over the same validation users, resampled together."""
    rr = lambda r: np.where(np.asarray(r) <= 5, 1.0 / np.asarray(r), 0.0)  # noqa: E731
    diff = rr(ranks_a) - rr(ranks_b)
    idx = np.random.default_rng([seed, 5]).integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


# -- implementations -------------------------------------------------------------------------------------------


class RecBole:
    """RecBole's NextItNet (see the module docstring); ``all_positions=False`` is ``recbole-last``."""

    ITEM, SEQ, LEN = "item_id", "item_id_list", "item_length"

    def __init__(self, vocab: int, args, all_positions: bool = True) -> None:
        import torch
        from recbole.model.sequential_recommender.nextitnet import NextItNet

        # importing RecBole's sequential models runs sine.py's module-level torch.autograd.set_detect_anomaly(True)
        # (recbole 1.2.1): every later backward, ours included, would check each gradient for NaN (measured: ~25%
        # of a RecBole step, more of ours, which has more autograd nodes). Neither side asked for it: off.
        torch.autograd.set_detect_anomaly(False)
        class _Dataset:  # all SequentialRecommender.__init__ reads from a dataset
            def num(self, field: str) -> int:
                assert field == RecBole.ITEM, field
                return vocab

        config = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": self.ITEM, "LIST_SUFFIX": "_list",
                  "ITEM_LIST_LENGTH_FIELD": self.LEN, "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": args.seq_len - 1,
                  "device": torch.device("cpu"), "embedding_size": args.dim, "block_num": args.blocks,
                  "dilations": list(args.dilations), "kernel_size": 3, "reg_weight": args.reg_weight,
                  "loss_type": "CE"}
        torch.manual_seed(args.seed)
        self.model = NextItNet(config, _Dataset())
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.all_positions = all_positions
        self.targets_per_step: list[int] = []

    def interaction(self, x, y=None):
        from recbole.data.interaction import Interaction

        d = {self.SEQ: x, self.LEN: (x != PAD).sum(1)}
        if y is not None:
            d[self.ITEM] = y
        return Interaction(d)

    def loss(self, x, y):
        import torch

        m = self.model
        if not self.all_positions:
            return m.calculate_loss(self.interaction(x, y[:, -1])), x.shape[0]
        out = m.final_layer(m.residual_blocks(m.item_embedding(x)))  # its forward() without the [:, -1] slice
        mask = y != PAD
        logits = torch.matmul(out[mask], m.item_embedding.weight.transpose(0, 1))
        loss = m.loss_fct(logits, y[mask])
        reg = m.reg_loss([m.item_embedding.weight, m.final_layer.weight])
        return loss + m.reg_weight * reg + m.reg_loss_rb(), int(mask.sum())

    def prepare(self, batch: TrainBatch):
        return batch.x, batch.y

    def step(self, prepared) -> tuple[float, int]:
        x, y = prepared
        self.model.train()
        self.opt.zero_grad()
        loss, n = self.loss(x, y)
        loss.backward()
        self.opt.step()
        return float(loss.detach()), n

    def scores(self, x):
        self.model.eval()
        return self.model.full_sort_predict(self.interaction(x))

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class Ours:
    """Our NextItNet (``recsys_transfer.models.nextitnet.NextItNet``) on the same rows. Everything specific to our
    model is in this class.

    The model is built on an in-memory :class:`DatasetMeta` of a sequence dataset (list field ``items`` of
    vocabulary V, ids 0 / 1 reserved; ``negatives`` sharing it; task ``next``: retrieval, sampled softmax), with
    ``embedding_dim=args.dim``, ``dilations=tuple(args.dilations) * args.blocks``, kernel 3. Each step's batch is
    a TorchRec ``KeyedJaggedTensor``: ``items`` = each row's sequence (jagged, no padding: the model left-pads and
    masks), ``negatives`` = the batch's shared pool of ``--negatives`` ids drawn uniformly from 2..V-1 (seeded by the
    step; spread over the rows as the data side does), built outside the timer like RecBole's tensors. The model
    predicts the same positions (``len - 1`` per sequence) and its output ``[M, 1 + S]`` goes through
    ``objectives.task_loss`` (cross entropy, the positive in column 0).

    ``trainer=True`` (``ours``): the step ``recsys-transfer train`` runs (``compose_step`` -> ``TrainStep``, mode B:
    the item table by row-wise Adam on the rows the batch touched through the row pipeline, the CNN by the fused
    dense Adam), lr ``args.lr``. ``trainer=False`` (``ours-dense``): ``torch.optim.Adam`` over every parameter with
    the table's dense gradient, as the RecBole side (isolates the model from the row pipeline)."""

    TASK = "next"

    def __init__(self, vocab: int, args, trainer: bool = True) -> None:
        import torch

        from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
        from recsys_transfer.data.prepared import DatasetMeta, SparseFieldMeta
        from recsys_transfer.models.nextitnet import NextItNet
        from recsys_transfer.objectives import task_loss
        from recsys_transfer.tasks import TaskSpec
        from recsys_transfer.train.compose import compose_step

        self.vocab = vocab
        self.softmax = args.softmax
        self.negatives = args.negatives if args.negatives >= 0 else max(1, round(0.2 * (vocab - FIRST_ITEM)))
        if self.softmax == "full":  # the model's pool is every item: no batch draws (the field stays in the meta)
            self.negatives = 0
        task = TaskSpec(name=self.TASK, label="next_item", kind="retrieval", candidates="sampled", loss="softmax")

        self.sampler = args.sampler
        counts = getattr(args, "train_counts", None)  # popularity: the items' training counts (load_data's)

        def field(name, vocab_of=None):
            return SparseFieldMeta(name=name, vocab_size=vocab, oov_index=0, hashed=False, min_count=1,
                                   frequencies=list(counts) if counts is not None else [1] * vocab, head_ids=[],
                                   multi_valued=True, vocab_of=vocab_of)

        fields = [field("items")] + ([field("negatives", "items")] if self.negatives or self.softmax == "full" else [])
        self.meta = DatasetMeta(dataset="sequence-throughput", sparse=fields, dense=[], labels=["next_item"],
                                split={}, head_tail={}, split_rows={}, split_files={}, input_rows=0, skipped_rows=0,
                                skip_reasons={}, source={}, tasks=(task,))
        self.task, self.task_loss = task, task_loss
        self.pool_transform = None
        if self.sampler == "popularity" and self.negatives:  # the library's draw and log-Q weights, as `train` does
            from recsys_transfer.config import SequenceConfig
            from recsys_transfer.data.sequences import SequenceSampling

            self.pool_transform = SequenceSampling(
                SequenceConfig(negatives=self.negatives, sampler="popularity", sampler_power=args.sampler_power,
                               seed=args.seed), self.meta, split="train")
        torch.manual_seed(args.seed)
        self.model = NextItNet(self.meta, embedding_dim=args.dim, dilations=tuple(args.dilations) * args.blocks,
                               kernel=3, softmax=self.softmax, tasks=(task,))
        self.trainer = trainer
        if trainer:
            self.step_fn = compose_step(self.model, self.meta, rows=RowsConfig(optimizer="adam", lr=args.lr),
                                        transfer=TransferConfig(mode="B"),
                                        train=TrainConfig(optimizer="adam", lr=args.lr))
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=0.0)

    def batch(self, full, key=None):
        """``full [b, w]`` left-padded -> a ``Batch`` (``items`` jagged; ``negatives`` drawn from ``key``)."""
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from recsys_transfer.types import Batch

        b = full.shape[0]
        lengths = (full != PAD).sum(1)
        values = full[full != PAD]  # row-major: each row's items in order
        keys = ["items"]
        if key is not None and self.negatives and self.pool_transform is None:
            rng = np.random.default_rng(list(key) + [7])
            neg = torch.from_numpy(rng.integers(FIRST_ITEM, self.vocab, size=self.negatives))
            share = torch.full((b,), self.negatives // b, dtype=torch.long)
            share[: self.negatives % b] += 1
            values, lengths, keys = torch.cat([values, neg]), torch.cat([lengths, share]), keys + ["negatives"]
        if key is not None and self.pool_transform is not None:  # an empty feature the transform fills
            lengths, keys = torch.cat([lengths, torch.zeros(b, dtype=lengths.dtype)]), keys + ["negatives"]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        batch = Batch(dense=torch.zeros(b, 0), sparse=kjt, labels={"next_item": torch.zeros(b)})
        if key is not None and self.pool_transform is not None:
            batch = self.pool_transform(batch, epoch=key[1], index=key[2])
        return batch

    def prepare(self, batch: TrainBatch):
        return self.batch(batch.full, batch.key), int((batch.y != PAD).sum())

    def step(self, prepared) -> tuple[float, int]:
        batch, targets = prepared
        self.model.train()
        if self.trainer:
            return float(self.step_fn(batch).loss), targets
        self.opt.zero_grad()
        out = self.model(batch)[self.TASK]
        assert len(out.query if isinstance(out, tuple) else out) == targets, targets
        loss = self.task_loss(self.task, out, batch.labels["next_item"])
        loss.backward()
        self.opt.step()
        return float(loss.detach()), targets

    def scores(self, x):
        self.model.eval()
        return self.model(self.batch(x))[self.TASK]

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build(name: str, vocab: int, args):
    if name in ("ours", "ours-dense"):
        return Ours(vocab, args, trainer=name == "ours")
    if name == "recbole":
        return RecBole(vocab, args, all_positions=True)
    if name == "recbole-last":
        return RecBole(vocab, args, all_positions=False)
    raise ValueError(name)


# -- fine-tuning step time: PeterRec vs FineAll ----------------------------------------------------------------


def finetune_times(data: Sequences, args, pretrained=None) -> dict:
    """ms per fine-tuning step of each ``--finetune`` variant of ``recsys_transfer.models.peterrec.PeterRec``
    (backbone nextitnet with the pretraining dims, insertion ``--ft-insertion``, head ``tcl``: the data appends
    [TCL] = id 1 to every sequence) on a multiclass task of ``--ft-classes`` classes (seeded random labels: the
    step's cost does not depend on them), trained by the step ``recsys-transfer train`` runs (``compose_step``:
    row-wise Adam for the item table unless frozen, fused Adam for the trainable dense parameters), batch
    ``--ft-batch-size`` sequences. ``pretrained``: our trained NextItNet, whose weights every variant loads by
    name first (not needed for timing; keeps the patched network's activations realistic). Interleaved: one
    untimed round, then ``--ft-rounds`` rounds of ``--ft-steps`` pre-built batches per variant, order rotating;
    the median round."""
    import torch

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.data.prepared import DatasetMeta, SparseFieldMeta
    from recsys_transfer.models.peterrec import PeterRec
    from recsys_transfer.tasks import TaskSpec
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.types import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    task = TaskSpec(name="profile", label="profile", kind="multiclass", num_classes=args.ft_classes)
    items = SparseFieldMeta(name="items", vocab_size=data.vocab, oov_index=0, hashed=False, min_count=1,
                            frequencies=[1] * data.vocab, head_ids=[], multi_valued=True)
    meta = DatasetMeta(dataset="sequence-throughput-ft", sparse=[items], dense=[], labels=["profile"], split={},
                       head_tail={}, split_rows={}, split_files={}, input_rows=0, skipped_rows=0, skip_reasons={},
                       source={}, tasks=(task,))
    rng = np.random.default_rng([args.seed, 55])
    batches = []
    for k in range(args.ft_steps):
        idx = rng.choice(data.n_train, size=min(args.ft_batch_size, data.n_train), replace=False)
        full = data.full[idx]
        lengths = (full != PAD).sum(1) + 1
        values = torch.cat([torch.cat([r[r != PAD], torch.tensor([SPECIAL])]) for r in full])  # + [TCL]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["items"], values=values, lengths=lengths)
        labels = torch.from_numpy(rng.integers(0, args.ft_classes, size=len(idx))).float()
        batches.append(Batch(dense=torch.zeros(len(idx), 0), sparse=kjt, labels={"profile": labels}))
    steps, params = {}, {}
    for v in args.finetune:
        torch.manual_seed(args.seed)
        model = PeterRec(meta, backbone="nextitnet", variant=v, insertion=args.ft_insertion, head="tcl",
                         embedding_dim=args.dim, dilations=tuple(args.dilations) * args.blocks, tasks=(task,))
        if pretrained is not None:
            missing, unexpected = model.load_state_dict(pretrained.state_dict(), strict=False)
            assert not unexpected, unexpected
        params[v] = model.parameter_summary()
        frozen = tuple(params[v]["frozen_tables"])
        steps[v] = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=args.lr, freeze=frozen),
                                transfer=TransferConfig(mode="B"), train=TrainConfig(optimizer="adam", lr=args.lr))
        steps[v].model_ref = model
    names = list(steps)
    rounds = {v: [] for v in names}
    for r in range(args.ft_rounds + 1):
        for v in names[r % len(names):] + names[:r % len(names)]:
            steps[v].model_ref.train()
            t0 = time.perf_counter()
            for b in batches:
                steps[v](b)
            dt = (time.perf_counter() - t0) / len(batches)
            if r:
                rounds[v].append(dt * 1e3)
    med = {v: statistics.median(rounds[v]) for v in names}
    base = med.get("fine_all")
    out = {"variants": {v: {"ms_per_step": med[v], "rounds_ms": rounds[v], **params[v],
                            "vs_fine_all": (med[v] / base) if base else None} for v in names},
           "batch_size": min(args.ft_batch_size, data.n_train), "steps": args.ft_steps, "rounds": args.ft_rounds,
           "insertion": args.ft_insertion, "classes": args.ft_classes,
           "loaded_pretrained": pretrained is not None}
    for v in names:
        log(f"fine-tune {v}: {med[v]:.1f} ms/step, trains {params[v]['trained']:,} parameters "
            f"({params[v]['share_of_fine_all']:.1%} of FineAll's)")
    return out


# -- the run ---------------------------------------------------------------------------------------------------


def train_interleaved(impls: dict, data: Sequences, args) -> dict:
    """Every implementation trains on every step's batch, order rotating per step; each step timed alone."""
    stats = {n: {"epochs": [], "losses": [], "valid": []} for n in impls}
    names = list(impls)
    step_no = 0
    for epoch in range(args.epochs):
        times = {n: [] for n in names}
        seqs = {n: 0 for n in names}
        targets = {n: 0 for n in names}
        loss_sum = {n: 0.0 for n in names}
        load0 = os.getloadavg()[0]
        for k, batch in enumerate(data.batches(epoch, args.batch_size)):
            if args.max_steps and k >= args.max_steps:
                break
            r = step_no % len(names)
            for n in names[r:] + names[:r]:
                prepared = impls[n].prepare(batch)  # untimed: each side's input objects from the same rows
                t0 = time.perf_counter()
                loss, t = impls[n].step(prepared)
                dt = time.perf_counter() - t0
                times[n].append(dt)
                seqs[n] += batch.x.shape[0]
                targets[n] += t
                loss_sum[n] += loss
            step_no += 1
        load1 = os.getloadavg()[0]
        for n in names:
            warm = args.warmup if epoch == 0 else 0
            timed = times[n][warm:] or times[n]
            med = statistics.median(timed)
            stats[n]["epochs"].append({"steps": len(times[n]), "sequences": seqs[n], "targets": targets[n],
                                       "median_step_s": med, "seq_per_s_median": args.batch_size / med,
                                       "seq_per_s_total": seqs[n] / sum(times[n]), "step_s": times[n],
                                       "train_loss": loss_sum[n] / max(1, len(times[n])),
                                       "load": [load0, load1]})
            if not args.no_eval and (epoch == args.epochs - 1 or args.eval_every_epoch):
                stats[n]["valid"].append({"epoch": epoch + 1, **validation_metrics(impls[n].scores, data)})
            log(f"epoch {epoch + 1} {n}: {args.batch_size / med:,.0f} seq/s (median step {med * 1e3:.1f} ms), "
                f"loss {stats[n]['epochs'][-1]['train_loss']:.4f}"
                + (f", valid MRR@5 {stats[n]['valid'][-1]['mrr@5']:.4f}" if stats[n]["valid"]
                   and stats[n]["valid"][-1]["epoch"] == epoch + 1 else ""))
    return stats


def summarize(stats: dict, impls: dict) -> dict:
    out = {}
    for n, s in stats.items():
        per_epoch = [e["seq_per_s_median"] for e in s["epochs"]]
        steps = sum(e["steps"] for e in s["epochs"])
        out[n] = {"parameters": impls[n].parameters(), "steps": steps,
                  "seq_per_s": statistics.median(per_epoch), "seq_per_s_epochs": per_epoch,
                  "seq_per_s_total": sum(e["sequences"] for e in s["epochs"])
                  / sum(sum(e["step_s"]) for e in s["epochs"]),
                  "targets_per_seq": sum(e["targets"] for e in s["epochs"]) / sum(e["sequences"]
                                                                                   for e in s["epochs"]),
                  "final_train_loss": s["epochs"][-1]["train_loss"],
                  "valid": s["valid"][-1] if s["valid"] else None, "valid_epochs": [{k: v for k, v in e.items() if k != "ranks"} for e in s["valid"]]}
    return out


def compare(summary: dict, mrr_tolerance: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """``"<ours>/<peer>"`` for each of our variants against each RecBole one: the sequences/s ratio, the MRR@5
    difference with its paired bootstrap 95% CI over the validation users, and whether ours counts as equal: at
    most ``mrr_tolerance`` below, or the CI holds 0."""
    out = {}
    for mine in ("ours", "ours-dense"):
        for peer in ("recbole", "recbole-last"):
            if mine not in summary or peer not in summary:
                continue
            o, p = summary[mine], summary[peer]
            d = {"ratio": o["seq_per_s"] / p["seq_per_s"]}
            if o["valid"] and p["valid"]:
                d["mrr5_diff"] = o["valid"]["mrr@5"] - p["valid"]["mrr@5"]
                d["mrr5_diff_ci95"] = paired_bootstrap_mrr5(o["valid"]["ranks"], p["valid"]["ranks"], n_boot, seed)
                lo, hi = d["mrr5_diff_ci95"]
                d["equal_mrr5"] = bool(d["mrr5_diff"] >= -mrr_tolerance or lo <= 0 <= hi)
            out[f"{mine}/{peer}"] = d
    return out


def load_data(args) -> tuple[Sequences, dict]:
    if args.dataset == "ml1m":
        seqs, vocab, info = ml1m_sequences(Path(args.raw or ML1M_RAW), args.seq_len)
    else:
        seqs, vocab, info = synthetic_sequences(args.syn_users, args.seq_len, args.syn_items, args.syn_zipf,
                                                args.syn_follow, args.seed)
    data = Sequences(seqs, vocab, args.seq_len, args.valid_frac, args.seed)
    info |= {"vocab": vocab, "train_sequences": data.n_train, "valid_sequences": len(data.valid_y),
             "train_targets_per_epoch": data.targets, "mean_length": float(np.mean([len(s) for s in seqs]))}
    return data, info


def fmt(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def write_markdown(path: Path, rec: dict) -> None:
    a, m, info, res = rec["config"], rec["machine"], rec["data"], rec["result"]
    lines = ["# NextItNet pretraining throughput: ours vs RecBole", "",
             f"Command: `{rec['command']}`  ",
             f"Commit: `{m['git_commit']}` (working tree dirty: {m['git_dirty']})  ",
             f"Machine: {m['cpu_count']} CPUs, {m['platform']}; torch {m['torch']} (threads={m['torch_threads']}, "
             f"interop={m['torch_interop_threads']}), recbole {rec.get('recbole_version')}  ",
             *([f"Our model imported from `{rec['ours_source']['package']}` (commit "
                f"`{rec['ours_source']['commit']}`, model files uncommitted there: "
                f"{rec['ours_source']['model_files_uncommitted']}; sha256 "
                + ", ".join(f"{k} {v}" for k, v in rec["ours_source"]["sha256"].items()) + ")  "]
              if rec.get("ours_source") else []),
             *([f"Comparisons recomputed from the recorded ranks by `{rec['rerendered']['by']}` at commit "
                f"`{rec['rerendered']['commit']}` (the run's numbers unchanged)  "] if rec.get("rerendered") else []),
             f"Load average at start {rec['load_start']}, at end {rec['load_end']} (shared machine)  ",
             f"Data `{a['dataset']}`: {info['train_sequences']:,} train / {info['valid_sequences']:,} validation "
             f"sequences (split by user, seed {a['seed']}), vocabulary {info['vocab']:,} (items + padding + "
             f"special), mean length {info['mean_length']:.1f} (max {a['seq_len']}), "
             f"{info['train_targets_per_epoch']:,} train targets per epoch  ",
             f"Network: embedding {a['dim']}, {a['blocks']} x dilations {a['dilations']} "
             f"({a['blocks'] * len(a['dilations'])} residual blocks, kernel 3); batch {a['batch_size']} sequences; "
             f"Adam lr {a['lr']}; {a['epochs']} epoch(s)"
             + (f", at most {a['max_steps']} steps each" if a["max_steps"] else "")
             + f"; timing interleaved per step, first {a['warmup']} steps of epoch 1 untimed for the median.  ",
             "Ours' softmax: " + ("full (every item a candidate, as RecBole's CE)" if a.get("softmax") == "full" else
                                  f"sampled, a shared uniform pool of {a['negatives']} negatives per batch "
                                  "(-1: 0.2 x items)"), ""]
    if rec["skipped"]:
        lines += [f"Not run: {k}: {v}" for k, v in rec["skipped"].items()] + [""]
    lines += ["| impl | parameters | sequences/s (median step) | per epoch | sequences/s (total) | "
              "targets per sequence | valid MRR@5 | HR@5 | NDCG@10 | MRR@5 / HR@5 excl. own history | final train loss |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for n, s in res["impls"].items():
        v = s["valid"] or {}
        lines.append(f"| {n} | {s['parameters']:,} | {s['seq_per_s']:,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in s['seq_per_s_epochs'])} | {s['seq_per_s_total']:,.0f} | "
                     f"{s['targets_per_seq']:.1f} | {fmt(v.get('mrr@5'))} | {fmt(v.get('hr@5'))} | "
                     f"{fmt(v.get('ndcg@10'))} | {fmt(v.get('mrr@5_excl_history'))} / "
                     f"{fmt(v.get('hr@5_excl_history'))} | {s['final_train_loss']:.4f} |")
    lines.append("")
    for pair, c in res["comparison"].items():
        mine, peer = pair.split("/")
        lines.append(f"- {mine} / {peer}: **{c['ratio']:.2f}x** sequences/s"
                     + (f"; MRR@5 {mine} - {peer} {c['mrr5_diff']:+.4f} (paired bootstrap 95% CI "
                        f"{c['mrr5_diff_ci95'][0]:+.4f}, {c['mrr5_diff_ci95'][1]:+.4f}; equal -- at most "
                        f"{a['mrr_tolerance']} below or the CI holds 0: {'yes' if c['equal_mrr5'] else 'no'})"
                        if "mrr5_diff" in c else ""))
    if "recbole-last" in res["impls"]:
        s = res["impls"]["recbole-last"]
        tps = info["train_targets_per_epoch"] / info["train_sequences"]
        lines.append(f"- recbole-last trains one target per sequence; covering every position as RecBole's "
                     f"pipeline does ({tps:.1f} prefix rows per sequence) would give about "
                     f"{s['seq_per_s'] / tps:,.0f} sequences/s")
    for n, s in res["impls"].items():
        if len(s["valid_epochs"]) > 1:
            lines.append(f"- {n} valid MRR@5 per epoch (excl. own history): "
                         + ", ".join(f"{e['epoch']}: {e['mrr@5']:.4f} ({e['mrr@5_excl_history']:.4f})"
                                     for e in s["valid_epochs"]))
    ft = rec.get("finetune")
    if ft:
        lines += ["", "## Fine-tuning step time: PeterRec vs FineAll", "",
                  f"PeterRec on the pretraining network (nextitnet, same dims), insertion {ft['insertion']}, head "
                  f"tcl ([TCL] appended), a {ft['classes']}-class task with random labels (cost only), batch "
                  f"{ft['batch_size']}, the trainer's step (row-wise Adam on the item table unless frozen, fused "
                  f"Adam on the trainable dense parameters); {ft['steps']} pre-built batches per round, one untimed "
                  f"round, {ft['rounds']} interleaved rounds, the median; pretrained weights loaded: "
                  f"{ft['loaded_pretrained']}.", "",
                  "| variant | ms/step | vs fine_all | trained parameters | share of FineAll's | frozen tables |",
                  "|---|---:|---:|---:|---:|---|"]
        for v, d in ft["variants"].items():
            lines.append(f"| {v} | {d['ms_per_step']:.1f} | "
                         + (f"{d['vs_fine_all']:.2f}x" if d["vs_fine_all"] else "-")
                         + f" | {d['trained']:,} | {d['share_of_fine_all']:.1%} | "
                         f"{', '.join(d['frozen_tables']) or '-'} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def rerender(path: Path) -> dict:
    """``--report``: the comparisons recomputed from a recorded run's validation ranks (this checkout's
    :func:`compare`) and its markdown written again; the run's numbers are unchanged, the file says so."""
    rec = json.loads(path.read_text())
    cfg = rec["config"]
    rec["result"]["comparison"] = compare(rec["result"]["impls"], cfg["mrr_tolerance"], seed=cfg["seed"])
    rec["rerendered"] = {"by": "python benchmarks/sequence_throughput.py --report " + path.name,
                         "commit": machine_record()["git_commit"]}
    path.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    write_markdown(path.with_suffix(".md"), rec)
    return rec


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("ml1m", "synthetic"), default="ml1m")
    p.add_argument("--raw", default=None, help="ML-1M-partial directory (default ../shared/data/...)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--valid-frac", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 4])
    p.add_argument("--negatives", type=int, default=-1,
                   help="ours: sampled negatives per batch (shared pool); -1: 0.2 x items, the official code's")
    p.add_argument("--softmax", choices=("sampled", "full"), default="sampled",
                   help="ours: the model's softmax option (full: every item is a candidate, as RecBole's CE)")
    p.add_argument("--sampler", choices=("uniform", "popularity"), default="uniform",
                   help="ours, sampled softmax: how the pool is drawn (popularity: (count+1)^power with the log-Q "
                        "correction; recsys_transfer.data.sequences.popularity_distribution)")
    p.add_argument("--sampler-power", type=float, default=1.0)
    p.add_argument("--reg-weight", type=float, default=1e-5, help="RecBole's reg_weight (its default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=0, help="steps per epoch at most (0: the whole epoch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-every-epoch", action="store_true")
    p.add_argument("--mrr-tolerance", type=float, default=0.005,
                   help="ours counts as equal in MRR@5 when at most this much below")
    p.add_argument("--finetune", default="peterrec,fine_all",
                   help="PeterRec variants whose fine-tuning step is timed after pretraining ('' to skip)")
    p.add_argument("--ft-batch-size", type=int, default=512, help="fine-tuning batch (FACTS.md: 512)")
    p.add_argument("--ft-steps", type=int, default=10)
    p.add_argument("--ft-rounds", type=int, default=5)
    p.add_argument("--ft-insertion", default="d")
    p.add_argument("--ft-classes", type=int, default=7, help="the profile task's classes (7: age brackets)")
    p.add_argument("--syn-users", type=int, default=100_000)
    p.add_argument("--syn-items", type=int, default=20_000)
    p.add_argument("--syn-zipf", type=float, default=1.0)
    p.add_argument("--syn-follow", type=float, default=0.5)
    p.add_argument("--report", default=None, metavar="JSON",
                   help="only re-render JSON's markdown beside it, recomputing the comparisons from its ranks")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    args.finetune = [s for s in args.finetune.split(",") if s]
    bad = set(args.impls) - set(IMPLS)
    if bad:
        p.error(f"unknown --impls {sorted(bad)}; choose from {IMPLS}")
    return args


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    if args.report:
        return rerender(Path(args.report))
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None
    load_start = [round(v, 2) for v in os.getloadavg()]
    machine = machine_record()  # at the start: the commit that runs
    t0 = time.perf_counter()
    data, info = load_data(args)
    args.train_counts = np.bincount(data.full.numpy().ravel(), minlength=data.vocab)  # popularity sampler's counts
    args.train_counts[PAD] = 0
    log(f"{args.dataset}: {info['train_sequences']} train / {info['valid_sequences']} valid sequences, vocab "
        f"{info['vocab']}, {info['train_targets_per_epoch']} targets/epoch ({time.perf_counter() - t0:.1f}s, untimed)")
    impls, skipped = {}, {}
    for n in args.impls:
        if n.startswith("recbole") and not have_recbole():
            skipped[n] = "recbole not installed (pip install recbole==1.2.1 --no-deps, see the Makefile)"
            continue
        impls[n] = build(n, data.vocab, args)
    for n, why in skipped.items():
        log(f"skipping {n}: {why}")
    if not impls and not args.finetune:
        raise SystemExit("no implementation to run")
    stats = train_interleaved(impls, data, args) if impls else {}
    summary = summarize(stats, impls)
    finetune = None
    if args.finetune:
        pre = impls.get("ours") or impls.get("ours-dense")
        try:
            finetune = finetune_times(data, args, pre.model if pre is not None else None)
        except Exception as e:  # noqa: BLE001 -- the pretraining results are still recorded
            skipped["finetune"] = f"failed: {type(e).__name__}: {e}"
            log(f"fine-tuning timing {skipped['finetune']}")
    rec = {"command": "python benchmarks/sequence_throughput.py " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:]),
           "config": {k: v for k, v in vars(args).items() if k != "train_counts"}, "machine": machine, "data": info, "skipped": skipped,
           "recbole_version": __import__("recbole").__version__ if have_recbole() else None,
           "ours_source": ours_source() if any(n.startswith("ours") for n in impls) else None,
           "load_start": load_start, "load_end": [round(v, 2) for v in os.getloadavg()],
           "result": {"impls": summary, "comparison": compare(summary, args.mrr_tolerance, seed=args.seed)},
           "finetune": finetune,
           "per_epoch": {n: [{k: v for k, v in e.items() if k != "step_s"} for e in s["epochs"]]
                         for n, s in stats.items()}}
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sequence_throughput_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    write_markdown(out / f"{stem}.md", rec)
    log(f"wrote {out / stem}.{{json,md}}")
    return rec


if __name__ == "__main__":
    main()
