"""Train throughput (rows/s) and per-task test AUC of our MMoE and PLE against torch-rechub's, side by side; and the
cost per step of gradient surgery (GradVac) on our MMoE.

The implementations train on the SAME prepared rows (UCI Adult, ``pipelines/datasets/adult-census.yaml``: two
binary tasks, income and never_married; 8 sparse fields, 5 dense), with the same batch size (512, as
``pipelines/adult-mtl.yaml``), Adam lr 1e-3 over every parameter and no weight decay, the same epochs, and the same
dimensions (our models' defaults): embedding dim 16 per sparse field, the dense columns appended to the
concatenated embeddings; MMoE 8 experts of (128, 64), one linear softmax gate per task, towers (64,) + a 1-unit
output; PLE 2 levels, 2 specific experts per task and 2 shared per level, experts (128, 64), linear gates, towers
(64,):

* ``ours-mmoe`` / ``ours-ple``: ``recsys_transfer.models.mmoe.MMoE`` / ``ple.PLE`` with ``batch_norm=True`` (BatchNorm
  after every expert and tower layer, as torch-rechub's MLPs have), trained by the step ``recsys-transfer train``
  runs in mode B (``compose_step`` -> ``TrainStep``; embedding rows by row-wise Adam in the row pipeline, the rest
  by the trainer's fused Adam) on ``BatchLoader`` batches read from the parquet shards every epoch;
* ``rechub-mmoe`` / ``rechub-ple``: ``torch_rechub.models.multi_task.MMOE`` / ``PLE`` (``pip install torch-rechub
  --no-deps``), one ``SparseFeature(embed_dim=16, initializer=RandomNormal(0, 0.01))`` per sparse field (our
  ``init_std``) and one ``DenseFeature`` per dense column, ``expert_params={"dims": [128, 64]}``,
  ``tower_params_list=[{"dims": [64]}] * 2``; trained by its own ``MTLTrainer.train_one_epoch`` (Adam, lr 1e-3,
  ``weight_decay=0`` -- its default is 1e-5) on its own ``TorchDataset`` in a ``DataLoader(batch_size=512,
  shuffle=True)``, as its examples do, over numpy arrays loaded once outside the timers.

Departures we cannot remove without editing one side (recorded in the notes): torch-rechub's gates are
``Linear -> BatchNorm -> softmax`` (ours: ``Linear -> softmax``); its models end with a sigmoid and train with
``BCELoss``, averaged over the tasks (ours: logits, BCE with logits, summed over the tasks -- Adam is nearly
scale-invariant); its embeddings are one ``nn.Embedding`` per field, ours one TorchRec EmbeddingBagCollection.

Timing is INTERLEAVED in one process with ``throughput_vs_peers.interleave``: each epoch is cut into ``--chunks``
pieces of whole batches; for piece k every implementation trains on its next piece, in an order rotating from
piece to piece, so background load on a shared machine hits all alike. Only training is timed (ours includes the
parquet reading; torch-rechub includes its per-row ``TorchDataset`` + default collation and its trainer's tqdm).

Where the time goes (``--parts-rounds``, after the test scores): ms per step of each model's forward + backward
alone and of its whole optimizer step, on batches already in memory (ours: BatchLoader batches; torch-rechub:
tensors sliced from the arrays, without its DataLoader), interleaved; the rows/s above add the data path.

Surgery (``--surgery none,gradvac``): when ``recsys_transfer.multitask`` is importable (gradient surgery), our MMoE
step is composed once per choice (``compose_step(..., multitask=MultitaskConfig(surgery=S))``; ``per-task``: no
surgery but one backward per task, ``rows.per_task``, which surgery turns on by itself) and timed in ms per step on
the same pre-loaded batches, interleaved in rounds; otherwise a line says it is not available and nothing is timed.

Usage::

    python benchmarks/mtl_throughput.py                              # Adult x5 epochs, MMoE and PLE, surgery
    python benchmarks/mtl_throughput.py --models mmoe --epochs 2 --surgery none

Results go to ``benchmarks/results/mtl_throughput.{json,md}`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput_vs_peers import (  # noqa: E402  (shared with the DeepFM comparison)
    PeerEpochs, TrainerPieces, interleave, load_split, log, machine_record, piece_rows)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ADULT_RAW = Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "data")) / "adult-census"
MODELS = ("mmoe", "ple")
SIDES = ("ours", "rechub")
SURGERY = ("none", "per-task", "pcgrad", "gradvac")


def have_rechub() -> bool:
    return importlib.util.find_spec("torch_rechub") is not None


def have_surgery() -> bool:
    return importlib.util.find_spec("recsys_transfer.multitask") is not None


def prepare_adult(work: Path, raw: Path = ADULT_RAW) -> Path:
    from recsys_transfer.config import PrepareConfig
    from recsys_transfer.data.prepare import prepare

    out = work / "adult-census"
    if not (out / "meta.json").is_file():
        prepare(PrepareConfig(schema=str(REPO / "pipelines" / "datasets" / "adult-census.yaml"),
                              input=(str(raw / "adult.data"), str(raw / "adult.test"))), out, progress=False)
    return out


def model_params(model: str, args) -> dict:
    """Our model's keyword arguments for ``--dim`` and the widths (torch-rechub's are derived from the same)."""
    common = {"embedding_dim": args.dim, "expert_hidden": tuple(args.expert_hidden),
              "tower_hidden": tuple(args.tower_hidden), "batch_norm": True}
    if model == "mmoe":
        return common | {"num_experts": args.experts}
    return common | {"num_levels": args.levels, "specific_experts": args.specific, "shared_experts": args.shared}


# -- implementations -------------------------------------------------------------------------------------------


class Ours(TrainerPieces):
    def __init__(self, model: str, data_dir: Path, meta, args) -> None:
        import torch

        from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
        from recsys_transfer.data.loader import BatchLoader
        from recsys_transfer.models.registry import build_model
        from recsys_transfer.train.compose import compose_step

        torch.manual_seed(args.seed)
        self.meta = meta
        self.model = build_model(model, meta, **model_params(model, args))
        self.loader = BatchLoader(data_dir, "train", args.batch_size, shuffle=True, seed=args.seed, meta=meta)
        self.test = BatchLoader(data_dir, "test", 8192, shuffle=False, meta=meta)
        self.step = compose_step(self.model, meta, rows=RowsConfig(optimizer="adam", lr=args.lr),
                                 transfer=TransferConfig(mode="B"), train=TrainConfig(optimizer="adam", lr=args.lr))
        self._it = None

    def parts(self, n: int) -> dict:
        """Callables timing pieces of a step on ``n`` batches read beforehand: the model's forward + backward (BCE
        with logits per task, summed) and the whole trainer step."""
        import torch.nn.functional as F

        self.loader.set_epoch(10_000)
        batches = [b for _, b in zip(range(n), self.loader)]

        def fwd_bwd():
            for b in batches:
                out = self.model(b)
                sum(F.binary_cross_entropy_with_logits(v, b.labels[t].float()) for t, v in out.items()).backward()
            self.model.zero_grad(set_to_none=True)

        def step():
            for b in batches:
                self.step(b)

        return {"fwd+bwd": fwd_bwd, "step": step}

    def test_scores(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per task, the labels and the predicted probabilities of the test rows, in the split's row order."""
        from recsys_transfer.train.evaluate import predict

        preds = predict(self.model, self.test, self.meta.tasks)
        return ({t: p.labels for t, p in preds.tasks.items()},
                {t: p.values.astype(np.float64) for t, p in preds.tasks.items()})


class RecHub(PeerEpochs):
    def __init__(self, model: str, meta, args, train, test) -> None:
        import torch
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.basic.initializers import RandomNormal
        from torch_rechub.models.multi_task import MMOE, PLE
        from torch_rechub.trainers import MTLTrainer

        torch.manual_seed(args.seed)
        self.tasks = [t.name for t in meta.tasks]
        features = [SparseFeature(f, vocab_size=meta.field(f).vocab_size, embed_dim=args.dim,
                                  initializer=RandomNormal(0.0, 0.01)) for f in meta.sparse_names]
        features += [DenseFeature(d) for d in meta.dense]
        experts = {"dims": list(args.expert_hidden)}
        towers = [{"dims": list(args.tower_hidden)} for _ in self.tasks]
        types = ["classification"] * len(self.tasks)
        if model == "mmoe":
            self.model = MMOE(features, types, args.experts, experts, towers)
        else:
            self.model = PLE(features, types, args.levels, args.specific, args.shared, experts, towers)
        # model_path: only fit() saves there; train_one_epoch, all we call, writes nothing
        self.trainer = MTLTrainer(self.model, types, optimizer_params={"lr": args.lr, "weight_decay": 0.0},
                                  n_epoch=1, device="cpu", model_path=tempfile.gettempdir())
        self.batch_size, self.seed = args.batch_size, args.seed
        self.train_x, self.train_y = train
        self.test_x, self.test_y = test

    def train_piece(self, rows: int) -> tuple[int, float, float]:
        from torch.utils.data import DataLoader
        from torch_rechub.utils.data import TorchDataset

        idx = self.next_rows(rows)
        x = {n: v[idx] for n, v in self.train_x.items()}  # gathered outside the timer
        y = self.train_y[idx]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            t0 = time.perf_counter()
            loader = DataLoader(TorchDataset(x, y), batch_size=self.batch_size, shuffle=True)
            losses = self.trainer.train_one_epoch(loader)  # per task, the mean over batches
            dt = time.perf_counter() - t0
        return len(idx), dt, float(sum(losses))

    def parts(self, n: int) -> dict:
        """As ``Ours.parts``, on ``n`` batches of tensors cut beforehand (no DataLoader): forward + backward of its
        loss (BCELoss per task, averaged), and that plus its Adam step (the step its trainer runs)."""
        import torch
        import torch.nn.functional as F

        rows = n * self.batch_size
        x = {k: torch.from_numpy(np.ascontiguousarray(v[:rows])) for k, v in self.train_x.items()}
        y = torch.from_numpy(np.ascontiguousarray(self.train_y[:rows]))
        batches = [({k: v[i:i + self.batch_size] for k, v in x.items()}, y[i:i + self.batch_size])
                   for i in range(0, rows, self.batch_size)]
        self.model.train()

        def loss(xb, yb):
            p = self.model(xb)  # [B, T] probabilities
            return sum(F.binary_cross_entropy(p[:, k], yb[:, k]) for k in range(p.shape[1])) / p.shape[1]

        def fwd_bwd():
            for xb, yb in batches:
                loss(xb, yb).backward()
            self.model.zero_grad(set_to_none=True)

        def step():
            for xb, yb in batches:
                self.model.zero_grad()
                loss(xb, yb).backward()
                self.trainer.optimizer.step()

        return {"fwd+bwd": fwd_bwd, "step": step}

    def test_scores(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        import torch

        self.model.eval()
        with torch.no_grad():
            p = self.model({n: torch.from_numpy(v) for n, v in self.test_x.items()}).numpy().astype(np.float64)
        return ({t: self.test_y[:, k] for k, t in enumerate(self.tasks)},
                {t: p[:, k] for k, t in enumerate(self.tasks)})


# -- where the time goes ---------------------------------------------------------------------------------------


def time_parts(impls: dict, args) -> dict:
    """ms per step of each implementation's ``parts`` (after training and the test scores, so the recorded AUCs
    are untouched), on ``--parts-steps`` batches in memory, in ``--parts-rounds`` interleaved rounds after one
    untimed round; the median round."""
    fns = {f"{k} {part}": f for k, impl in impls.items() for part, f in impl.parts(args.parts_steps).items()}
    for f in fns.values():
        f()
    rounds = {k: [] for k in fns}
    order = list(fns)
    for r in range(args.parts_rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            fns[k]()
            rounds[k].append(1e3 * (time.perf_counter() - t0) / args.parts_steps)
    out = {k: statistics.median(v) for k, v in rounds.items()}
    log("parts: " + ", ".join(f"{k} {v:.2f} ms" for k, v in out.items()))
    return out


# -- surgery ---------------------------------------------------------------------------------------------------


def time_surgery(data_dir: Path, args) -> dict:
    """ms per step of our MMoE (the MMoE widths) through ``compose_step`` with each ``--surgery`` choice, on the
    same ``--surgery-steps`` pre-loaded batches, after one untimed round, in ``--surgery-rounds`` interleaved rounds
    (each round runs every choice over all the batches once, rotating the order); the median round per choice."""
    import torch

    from recsys_transfer.config import MultitaskConfig, RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.train.compose import compose_step

    meta = DatasetMeta.load(data_dir)
    loader = BatchLoader(data_dir, "train", args.batch_size, shuffle=True, seed=args.seed, meta=meta)
    batches = [b for _, b in zip(range(args.surgery_steps), loader)]
    steps = {}
    for choice in args.surgery:
        torch.manual_seed(args.seed)
        model = build_model("mmoe", meta, **model_params("mmoe", args))
        per_task = choice == "per-task"  # one backward per task, no surgery: what surgery's own combine adds
        steps[choice] = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=args.lr, per_task=per_task),
                                     transfer=TransferConfig(mode="B"),
                                     train=TrainConfig(optimizer="adam", lr=args.lr),
                                     multitask=MultitaskConfig(surgery="none" if per_task else choice))
        for b in batches:  # one untimed round: lazy optimizer state, and GradVac's EMA targets leave 0 (from 0 it
            steps[choice](b)  # alters only conflicting pairs; the first rounds were ~40% cheaper than the later)
    rounds = {c: [] for c in args.surgery}
    order = list(args.surgery)
    for r in range(args.surgery_rounds):
        rot = order[r % len(order):] + order[:r % len(order)]
        for c in rot:
            t0 = time.perf_counter()
            for b in batches:
                steps[c](b)
            rounds[c].append(1e3 * (time.perf_counter() - t0) / len(batches))
    out = {"model": "mmoe", "steps_per_round": len(batches), "rounds": args.surgery_rounds,
           "ms_per_step": {c: statistics.median(v) for c, v in rounds.items()},
           "ms_per_step_rounds": {c: [round(x, 3) for x in v] for c, v in rounds.items()}}
    if "none" in out["ms_per_step"]:
        out["ratio_vs_none"] = {c: v / out["ms_per_step"]["none"] for c, v in out["ms_per_step"].items()}
    log("surgery: " + ", ".join(f"{c} {v:.2f} ms/step" for c, v in out["ms_per_step"].items()))
    return out


# -- driver ----------------------------------------------------------------------------------------------------


def run(args) -> dict:
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.metrics import auc
    from recsys_transfer.metrics.bootstrap import paired_bootstrap_auc_diff

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_adult(work, Path(args.raw))
    meta = DatasetMeta.load(data_dir)
    tasks = tuple(t.name for t in meta.tasks)
    train, test = load_split(data_dir, meta, "train", tasks), load_split(data_dir, meta, "test", tasks)
    n_train = len(train[1])
    log(f"Adult: {n_train} train / {len(test[1])} test rows, tasks {list(tasks)}, {len(meta.sparse_names)} sparse "
        f"fields (total vocab {sum(meta.field(f).vocab_size for f in meta.sparse_names)}), {len(meta.dense)} dense")
    impls = {}
    for model in args.models:
        for side in args.sides:
            impls[f"{side}-{model}"] = (Ours(model, data_dir, meta, args) if side == "ours"
                                        else RecHub(model, meta, args, train, test))
    pieces = piece_rows(n_train, args.batch_size, args.chunks)
    stats, loads = interleave("Adult", impls, args.epochs, pieces)
    scores = {}
    for k, impl in impls.items():
        labels, scores[k] = impl.test_scores()
        for t in tasks:  # every implementation scores the same rows in the same order
            if not np.array_equal(np.asarray(labels[t], dtype=np.float64), test[1][:, tasks.index(t)]):
                sys.exit(f"{k}: test rows of task {t} not in the split's order")
        stats[k]["test_auc"] = {t: float(auc(test[1][:, j], scores[k][t])) for j, t in enumerate(tasks)}
        stats[k]["parameters"] = sum(p.numel() for p in impl.model.parameters())
        log(f"{k}: test AUC " + ", ".join(f"{t} {v:.4f}" for t, v in stats[k]["test_auc"].items()))
    parts = time_parts(impls, args) if args.parts_rounds else {}
    out = {"dataset": "Adult", "data_dir": str(data_dir), "dataset_id": meta.dataset_id, "tasks": list(tasks),
           "train_rows": n_train, "test_rows": int(len(test[1])), "sparse_fields": len(meta.sparse_names),
           "dense_fields": len(meta.dense), "epochs": args.epochs, "pieces_per_epoch": len(pieces),
           "load_avg_during": {"min": min(loads), "max": max(loads), "mean": float(np.mean(loads))},
           "impls": stats, "parts_ms_per_step": parts, "comparison": {}}
    for model in args.models:
        a, b = stats.get(f"ours-{model}"), stats.get(f"rechub-{model}")
        if a and b:
            ci = {t: paired_bootstrap_auc_diff(test[1][:, j], scores[f"ours-{model}"][t],
                                               scores[f"rechub-{model}"][t], n_boot=args.n_boot, seed=args.seed)
                  for j, t in enumerate(tasks)}
            out["comparison"][model] = {
                "ratio": a["rows_per_s"] / b["rows_per_s"],
                "auc_diff": {t: a["test_auc"][t] - b["test_auc"][t] for t in tasks},
                "auc_diff_ci95": {t: [ci[t][1], ci[t][2]] for t in tasks},
                "equal_auc": all(abs(a["test_auc"][t] - b["test_auc"][t]) <= args.auc_tol or ci[t][1] <= 0 <= ci[t][2]
                                 for t in tasks)}
    return out


def render_md(rec: dict) -> str:
    c, d = rec["config"], rec["result"]
    lines = ["# MMoE / PLE train throughput: ours vs torch-rechub", "",
             f"Command: `{rec['command']}`  ",
             f"Commit: `{rec['git_commit']}` (working tree dirty: {rec['git_dirty']})  ",
             f"Machine: {rec['cpu_count']} CPUs, {rec['platform']}; torch {rec['torch']} (threads="
             f"{rec['torch_threads']}, interop={rec['torch_interop_threads']}), torch-rechub {rec['torch_rechub']}  ",
             f"Load average at start {rec['load_avg_start']}, at end {rec['load_avg_end']} (shared machine)  ",
             f"Adult ({d['train_rows']:,} train / {d['test_rows']:,} test rows, tasks {', '.join(d['tasks'])}), "
             f"{d['epochs']} epochs, batch {c['batch_size']}, dim {c['dim']}, experts {c['expert_hidden']}, towers "
             f"{c['tower_hidden']}, MMoE {c['experts']} experts, PLE {c['levels']} levels x ({c['specific']} "
             f"specific per task + {c['shared']} shared); Adam lr {c['lr']}; timing interleaved in one process "
             f"({d['pieces_per_epoch']} pieces per epoch, rotating order).", ""]
    tasks = d["tasks"]
    lines += ["| impl | parameters | train rows/s | " + " | ".join(f"test AUC {t}" for t in tasks)
              + " | final train loss (sum of tasks) |",
              "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"]
    for k, s in d["impls"].items():
        lines.append(f"| {k} | {s['parameters']:,} | {s['rows_per_s']:,.0f} | "
                     + " | ".join(f"{s['test_auc'][t]:.4f}" for t in tasks) + f" | {s['losses'][-1]:.4f} |")
    lines.append("")
    for model, cmp in d["comparison"].items():
        lines.append(f"- {model}: ratio ours/rechub = **{cmp['ratio']:.2f}x** rows/s; test AUC ours - rechub "
                     + ", ".join(f"{t} {v:+.4f} (paired bootstrap 95% CI {lo:+.4f}, {hi:+.4f})"
                                 for (t, v), (lo, hi) in zip(cmp["auc_diff"].items(), cmp["auc_diff_ci95"].values()))
                     + f"; equal AUC (|diff| <= {c['auc_tol']} or the CI holds 0 on every task): "
                     + ("yes" if cmp["equal_auc"] else "**no**"))
    lines.append(f"- load avg during training {d['load_avg_during']['min']:.2f}-{d['load_avg_during']['max']:.2f}; "
                 "per-epoch rows/s: " + "; ".join(
                     f"{k} " + ", ".join(f"{v:,.0f}" for v in s["epoch_rows_per_s"]) for k, s in d["impls"].items()))
    lines.append("- per-piece rows/s (interleaved, in time order): " + "; ".join(
        f"{k} " + ", ".join(f"{v:,}" for v in s["piece_rows_per_s"]) for k, s in d["impls"].items()))
    if d.get("parts_ms_per_step"):
        lines += ["", "## Where the time goes: ms per step on batches in memory", "",
                  f"{c['parts_steps']} batches read beforehand (ours: BatchLoader batches; torch-rechub: tensors "
                  f"sliced from the arrays, no DataLoader), one untimed round, {c['parts_rounds']} interleaved "
                  "rounds, the median; `fwd+bwd`: the model and its loss only; `step`: ours the trainer's step "
                  "(row-wise Adam on touched rows + fused Adam), torch-rechub that plus its Adam over all "
                  "parameters. The train rows/s above also hold the data path (BatchLoader / its DataLoader).", "",
                  "| impl | fwd+bwd ms | step ms | train ms per batch (from rows/s) |", "|---|---:|---:|---:|"]
        for k, s in d["impls"].items():
            pm = d["parts_ms_per_step"]
            lines.append(f"| {k} | {pm.get(f'{k} fwd+bwd', float('nan')):.2f} | {pm.get(f'{k} step', float('nan')):.2f}"
                         f" | {1e3 * c['batch_size'] / s['rows_per_s']:.2f} |")
    lines += ["", "## Gradient surgery: our MMoE step, ms per step", ""]
    sg = rec["surgery"]
    if "ms_per_step" not in sg:
        lines.append(sg["status"])
    else:
        lines += [f"MMoE as above, {sg['steps_per_round']} pre-loaded batches of {c['batch_size']} per round, "
                  f"one untimed round, then {sg['rounds']} interleaved rounds; the median round. `per-task`: one "
                  "backward per task without surgery (what GradVac turns on).", "",
                  "| surgery | ms/step | vs none |", "|---|---:|---:|"]
        for s_, ms in sg["ms_per_step"].items():
            ratio = sg.get("ratio_vs_none", {}).get(s_)
            lines.append(f"| {s_} | {ms:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
        lines.append("")
        lines.append("Per round: " + "; ".join(f"{s_} " + ", ".join(f"{v:.2f}" for v in r)
                                               for s_, r in sg["ms_per_step_rounds"].items()))
    lines += ["", "Notes:", ""] + [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "Timed: training only. Ours includes BatchLoader parquet reading each epoch; torch-rechub includes building "
    "its DataLoader over its TorchDataset (one dict of row values per __getitem__, default collation) and its "
    "trainer's tqdm bar (to a discarded stream), excludes loading parquet into numpy (once, untimed).",
    "Same widths on both sides; torch-rechub's gates have a BatchNorm before the softmax (ours none), and every "
    "torch-rechub MLP layer has a Dropout(p=0) module (a no-op call). Ours has BatchNorm after every expert and "
    "tower layer (batch_norm=True) to match its MLPs; our models' default is no BatchNorm.",
    "Loss: torch-rechub sigmoid + BCELoss, averaged over the two tasks; ours BCE with logits, summed (Adam is "
    "nearly scale-invariant). Weight decay 0 on both (torch-rechub's default 1e-5 overridden).",
    "Embeddings: torch-rechub one nn.Embedding per field (dense gradients, Adam over the whole table); ours one "
    "TorchRec EmbeddingBagCollection whose touched rows get row-wise Adam in the row pipeline (mode B).",
    "torch-rechub's train_one_epoch is called once per interleaving piece on a slice of a per-epoch permutation "
    "(its DataLoader shuffles within the slice); ours iterates one BatchLoader epoch across the pieces.",
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mmoe,ple", help="comma list of mmoe, ple")
    ap.add_argument("--sides", default="ours,rechub", help="comma list of ours, rechub (rechub: torch-rechub)")
    ap.add_argument("--surgery", default="none,gradvac",
                    help="comma list of none, per-task (one backward per task, no surgery), pcgrad, gradvac; "
                         "empty: skip")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8, help="MMoE experts")
    ap.add_argument("--levels", type=int, default=2, help="PLE levels")
    ap.add_argument("--specific", type=int, default=2, help="PLE experts per task per level")
    ap.add_argument("--shared", type=int, default=2, help="PLE shared experts per level")
    ap.add_argument("--expert-hidden", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--tower-hidden", type=int, nargs="+", default=[64])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--chunks", type=int, default=4, help="interleaving pieces per epoch")
    ap.add_argument("--surgery-steps", type=int, default=40, help="batches per surgery timing round")
    ap.add_argument("--surgery-rounds", type=int, default=5)
    ap.add_argument("--parts-steps", type=int, default=20, help="batches per round of the time breakdown")
    ap.add_argument("--parts-rounds", type=int, default=5, help="rounds of the time breakdown; 0: skip it")
    ap.add_argument("--auc-tol", type=float, default=0.005,
                    help="equal AUC: |ours - rechub| <= this on every task, or the paired 95%% CI holds 0")
    ap.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples of the test rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw", default=str(ADULT_RAW), help="directory holding adult.data and adult.test")
    ap.add_argument("--work-dir", default="/tmp/mtl_throughput")
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.sides = [s for s in args.sides.split(",") if s]
    args.surgery = [s for s in args.surgery.split(",") if s]
    if set(args.models) - set(MODELS) or set(args.sides) - set(SIDES) or set(args.surgery) - set(SURGERY):
        ap.error(f"--models takes {MODELS}, --sides {SIDES}, --surgery {SURGERY}")
    if "rechub" in args.sides and not have_rechub():
        log("torch-rechub is not installed (`pip install torch-rechub --no-deps`, the bench extra): ours only")
        args.sides = [s for s in args.sides if s != "rechub"]

    import torch

    torch.set_num_threads(args.threads)
    if torch.get_num_interop_threads() != 1:  # settable once per process (a second main() in tests keeps it)
        torch.set_num_interop_threads(1)
    load_start = [round(v, 2) for v in os.getloadavg()]
    log(f"torch {torch.__version__} threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    result = run(args)
    if not args.surgery:
        surgery = {"status": "not run (--surgery empty)"}
    elif not have_surgery():
        surgery = {"status": "gradient surgery is not available yet: recsys_transfer.multitask is not importable "
                             "(branch `surgery` not merged); rerun after the merge"}
        log(surgery["status"])
    else:
        surgery = time_surgery(Path(result["data_dir"]), args)
    rechub_version = None
    if have_rechub():
        from importlib.metadata import version

        rechub_version = version("torch-rechub")
    rec = {"command": " ".join([".venv/bin/python", *(sys.argv if argv is None else ["benchmarks/mtl_throughput.py",
                                                                                        *argv])]),
           **machine_record(), "torch_rechub": rechub_version,
           "load_avg_start": load_start, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
           "config": {k: v for k, v in vars(args).items()}, "result": result, "surgery": surgery, "notes": NOTES}
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "mtl_throughput" + (f"_{args.tag}" if args.tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(render_md(rec))

    print()
    print(f"{'impl':<13} {'train rows/s':>13} " + " ".join(f"{'AUC ' + t:>20}" for t in result["tasks"]))
    for k, s in result["impls"].items():
        print(f"{k:<13} {s['rows_per_s']:>13,.0f} " + " ".join(f"{s['test_auc'][t]:>20.4f}" for t in result["tasks"]))
    for model, cmp in result["comparison"].items():
        print(f"{model}: ours/rechub = {cmp['ratio']:.2f}x rows/s; AUC diff "
              + ", ".join(f"{t} {v:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                          for (t, v), (lo, hi) in zip(cmp["auc_diff"].items(), cmp["auc_diff_ci95"].values()))
              + f"; equal AUC: {cmp['equal_auc']}")
    if "ms_per_step" in surgery:
        print("surgery ms/step: " + ", ".join(f"{c} {v:.2f}" for c, v in surgery["ms_per_step"].items()))
    print(f"load avg start {load_start} end {rec['load_avg_end']}; wrote {out_dir / stem}.{{json,md}}")
    return rec


if __name__ == "__main__":
    main()
