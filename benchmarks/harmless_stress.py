"""Harmlessness stress test on synthetic long-tail data, per row optimizer and barrier (issue 10's evidence).

The data and model of ``tests/test_harmless.py`` and ``make demo``: 200k synthetic rows (seed 0, the generator's
planted long tail), FM dim 16, 2 epochs, batch 1024, dense part Adam 1e-2, transfer on ``item`` and ``user`` with
the selective domain. Per setting and seed: B, +T at a harmful fixed lambda, +Ours with the paper's barrier
(Algorithm 1 on the direction, alpha 2) and +Ours with the barrier on the applied update (alpha 1) at several trust
bounds ``max_ratio`` (``none`` = no bound). Settings: Adam rows (lr 1e-2) with MMD at lambda 1 and with the
adversarial loss at lambda 10; SGD + 0.9 momentum rows (lr 0.5) with MMD at lambda 100 (the paper's Table 8
optimizer), plus B at lr 1.0 there (is the gain a transfer or a larger effective step?).

Prints a table (test AUC, delta vs B) and writes ``benchmarks/results/harmless_stress.{json,md}``.

    python benchmarks/harmless_stress.py                   # 3 seeds, ~4 min on 1 core
    python benchmarks/harmless_stress.py --seeds 0 --settings adam_mmd
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIELDS = ("item", "user")

#: name -> (row optimizer, row lr, transfer loss, lambda of +T)
SETTINGS = {
    "adam_mmd": ("adam", 1e-2, "mmd", 1.0),
    "adam_adversarial": ("adam", 1e-2, "adversarial", 10.0),
    "momentum_mmd": ("momentum", 0.5, "mmd", 100.0),
}
#: column -> TransferConfig overrides (mode first)
METHODS = {
    "B": {"mode": "B"},
    "+T": {"mode": "+T"},
    "+Ours paper": {"mode": "+Ours", "barrier": "paper"},
    "+Ours applied r=none": {"mode": "+Ours", "barrier": "applied", "max_ratio": None},
    "+Ours applied r=0.3": {"mode": "+Ours", "barrier": "applied", "max_ratio": 0.3},
    "+Ours applied r=0.1": {"mode": "+Ours", "barrier": "applied", "max_ratio": 0.1},
    "+Ours applied r=0.1 alpha=2": {"mode": "+Ours", "barrier": "applied", "max_ratio": 0.1, "alpha": 2.0},
}


def run_one(data: Path, meta, domains, optimizer: str, lr: float, loss: str, lam: float, method: dict,
            seed: int) -> float:
    import torch

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.models.fm import FM
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.evaluate import evaluate
    from recsys_transfer.train.loop import train_epoch

    torch.manual_seed(seed)
    model = FM(meta, embedding_dim=16)
    step = compose_step(model, meta, rows=RowsConfig(optimizer=optimizer, lr=lr),
                        transfer=TransferConfig(loss=loss, fields=FIELDS, lam=lam, seed=seed, **method),
                        domains=domains, train=TrainConfig(optimizer="adam", lr=1e-2))
    train = BatchLoader(data, "train", 1024, shuffle=True, seed=seed, meta=meta)
    for epoch in range(2):
        train.set_epoch(epoch)
        train_epoch(step, train, epoch=epoch)
    return float(evaluate(model, BatchLoader(data, "test", 8192, meta=meta), meta.tasks)["label"]["auc"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--output", type=Path, default=RESULTS / "harmless_stress")
    args = p.parse_args(argv)

    import torch

    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
    from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
    from recsys_transfer.transfer.domains import load_domains, select_command

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "syn"
        meta = prepare_synthetic(SyntheticConfig(rows=200_000, seed=0), data, split=SplitSpec(),
                                 head_tail=HeadTailSpec(), progress=False)
        select_command(data, list(FIELDS))
        domains = load_domains(data / "selection", FIELDS, meta)
        for name in args.settings:
            optimizer, lr, loss, lam = SETTINGS[name]
            methods = dict(METHODS)
            if optimizer == "momentum":
                methods["B lr x2"] = {"mode": "B"}
            block = results[name] = {}
            for method, overrides in methods.items():
                row_lr = lr * 2 if method == "B lr x2" else lr
                block[method] = [run_one(data, meta, domains, optimizer, row_lr, loss, lam, overrides, s)
                                 for s in args.seeds]
                print(f"{name:18s} {method:30s} " + " ".join(f"{a:.4f}" for a in block[method]), flush=True)
    lines = [f"# Harmlessness stress test (`benchmarks/harmless_stress.py`)", "",
             f"Command: `python benchmarks/harmless_stress.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             .rstrip() + "; seeds " + ", ".join(map(str, args.seeds)) + f"; {time.perf_counter() - t0:.0f} s.", "",
             "Test AUC per seed; Δ = mean over seeds of (method − B), paired by seed; min Δ = the worst seed.", ""]
    for name, block in results.items():
        optimizer, lr, loss, lam = SETTINGS[name]
        lines += [f"## {name}: rows {optimizer} lr {lr:g}, {loss}, +T lambda {lam:g}", "",
                  "| method | AUC per seed | mean | Δ vs B | min Δ |", "|---|---|---:|---:|---:|"]
        base = block["B"]
        for method, aucs in block.items():
            d = [a - b for a, b in zip(aucs, base)]
            lines.append(f"| {method} | {' / '.join(f'{a:.4f}' for a in aucs)} | {statistics.mean(aucs):.4f} | "
                         f"{statistics.mean(d):+.4f} | {min(d):+.4f} |")
        lines.append("")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines += [f"Machine: {platform.processor() or platform.machine()}, 1 torch thread; commit {commit}."]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.output.with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "settings": {
        k: dict(zip(("optimizer", "lr", "loss", "lam"), SETTINGS[k])) for k in results}, "auc": results,
        "commit": commit, "seconds": time.perf_counter() - t0}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
