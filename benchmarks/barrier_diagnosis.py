"""Why +Ours with the paper's barrier loses under Adam (issue 10's AutoInt question), measured per row.

Trains AutoInt (or DeepFM) on ML-100K with Adam rows and +Ours (transfer on zip, adversarial loss), once with the
paper's barrier and once with the barrier on the applied update, and follows every touched zip row of every step.
Next to the real row optimizer runs a SHADOW Adam state that only ever sees the main gradient ``g_i`` (what mode B's
optimizer would hold on this trajectory), giving ``u_i``, B's update from that state. Per row and step:

    descent ratio  r_i = <g_i, applied update_i> / <g_i, u_i>      (rows with <g_i, u_i> > 0)

the main loss's first-order decrease the applied update buys, relative to B's. ``r_i < 1``: the row's main loss
went down slower than under B. Reported per epoch and per domain (source S = head ids, target T'_eta, other):
median ``r``, the share of rows with ``r < 0.5``, the mean ``lambda_i`` of the paper's barrier, and the test AUC.

    python benchmarks/barrier_diagnosis.py                    # AutoInt, seed 0, 8 epochs, ~6 min on 1 core
    python benchmarks/barrier_diagnosis.py --model deepfm --epochs 4

Writes ``benchmarks/results/barrier_diagnosis_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIELD = "zip"


def run(data: Path, meta, domains, model_name: str, barrier: str, epochs: int, seed: int) -> list[dict]:
    import numpy as np
    import torch

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.optim.rowwise import make_row_optimizer
    from recsys_transfer.rows import pipeline as pipeline_mod
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.evaluate import evaluate
    from recsys_transfer.train.loop import train_epoch
    from recsys_transfer.transfer import barrier as barrier_mod

    torch.manual_seed(seed)
    model = build_model(model_name, meta, embedding_dim=16)
    step = compose_step(model, meta, rows=RowsConfig(optimizer="adam", lr=1e-3),
                        transfer=TransferConfig(mode="+Ours", loss="adversarial", fields=(FIELD,), barrier=barrier,
                                                seed=seed),
                        domains=domains, train=TrainConfig(optimizer="adam", lr=1e-3))
    pipeline = step.rows
    slot = next(s for s in pipeline.slots if FIELD in s.features and s.collection.endswith("embedding"))
    shadow_w = torch.zeros_like(slot.weight.detach())
    shadow = make_row_optimizer("adam", [shadow_w], lr=1e-3)  # the main-gradient-only state
    source = torch.from_numpy(meta.field(FIELD).head_mask())
    target = torch.from_numpy(np.asarray(domains[FIELD], dtype=bool)) & ~source
    lams: list[float] = []
    epoch_rows: dict[str, list[torch.Tensor]] = {"source": [], "target": [], "other": []}
    original_run = pipeline_mod.RowPipeline._run
    original_barrier = barrier_mod.barrier_direction

    def spy_barrier(g_main, g_transfer, main_loss, alpha):
        mu, lam = original_barrier(g_main, g_transfer, main_loss, alpha)
        lams.append(float(lam.mean()))
        return mu, lam

    def spy_run(self, call):
        table = next((t for t in call.tables if t.slot is slot), None)
        if table is None:
            return original_run(self, call)
        rows, g = table.rows.clone(), table.grad.detach().clone()
        before = slot.weight.detach().index_select(0, rows).clone()
        original_run(self, call)
        applied = before - slot.weight.detach().index_select(0, rows)
        s_before = shadow_w.index_select(0, rows).clone()
        shadow.update_rows_many([shadow_w], [rows], [g])
        u = s_before - shadow_w.index_select(0, rows)
        ru = (g.double() * u.double()).sum(1)
        ratio = (g.double() * applied.double()).sum(1) / ru
        keep = ru > 0
        for name, mask in (("source", source[rows]), ("target", target[rows]), ("other", ~(source | target)[rows])):
            epoch_rows[name].append(ratio[keep & mask])

    pipeline_mod.RowPipeline._run = spy_run
    barrier_mod.barrier_direction = spy_barrier
    out = []
    try:
        train = BatchLoader(data, "train", 1024, shuffle=True, seed=seed, meta=meta)
        test = BatchLoader(data, "test", 8192, meta=meta)
        for epoch in range(epochs):
            train.set_epoch(epoch)
            lams.clear()
            for v in epoch_rows.values():
                v.clear()
            train_epoch(step, train, epoch=epoch)
            auc = evaluate(model, test, meta.tasks)[meta.tasks[0].name]["auc"]
            row = {"epoch": epoch, "test_auc": float(auc), "mean_lambda": float(np.mean(lams)) if lams else None}
            for name, parts in epoch_rows.items():
                r = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
                row[name] = {"rows": len(r), "median_ratio": float(r.median()) if len(r) else None,
                             "share_below_half": float((r < 0.5).double().mean()) if len(r) else None,
                             "share_below_099": float((r < 0.99).double().mean()) if len(r) else None}
            out.append(row)
            print(barrier, json.dumps(row), flush=True)
    finally:
        pipeline_mod.RowPipeline._run = original_run
        barrier_mod.barrier_direction = original_barrier
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="autoint")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=Path("../shared/data/movielens-100k"))
    args = p.parse_args(argv)

    import torch

    from recsys_transfer.data.movielens import prepare_movielens
    from recsys_transfer.transfer.domains import load_domains, select_command

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ml100k"
        meta = prepare_movielens(args.data, data, progress=False)
        select_command(data, [FIELD])
        domains = load_domains(data / "selection", (FIELD,), meta)
        for barrier in ("paper", "applied"):
            results[barrier] = run(data, meta, domains, args.model, barrier, args.epochs, args.seed)
    lines = [f"# Per-row main-loss descent of +Ours under Adam rows: {args.model}, ML-100K, zip, seed {args.seed}", "",
             f"Command: `python benchmarks/barrier_diagnosis.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
             f" ({time.perf_counter() - t0:.0f} s). r = <g, applied update> / <g, B's update from a main-only Adam "
             "state>, over every touched zip row of the epoch with <g, u> > 0; S source, T target (T'_eta), O other.",
             "(The applied update is read back as a difference of float32 weights, so r carries ~1e-4 of rounding.)",
             "", "| barrier | epoch | test AUC | mean lambda | median r S / T / O | share r < 0.5 S / T / O | "
             "share r < 0.99 S / T / O |", "|---|---:|---:|---:|---|---|---|"]
    for barrier, rows in results.items():
        for r in rows:
            def cell(key, fmt="{:.2f}"):
                return " / ".join("–" if r[d][key] is None else fmt.format(r[d][key])
                                  for d in ("source", "target", "other"))
            lam = "–" if r["mean_lambda"] is None else f"{r['mean_lambda']:.2f}"
            lines.append(f"| {barrier} | {r['epoch']} | {r['test_auc']:.4f} | {lam} | {cell('median_ratio')} | "
                         f"{cell('share_below_half')} | {cell('share_below_099')} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines += ["", f"commit {commit}; mean lambda: the paper barrier's lambda_i over touched zip rows (the applied "
              "barrier's lambda is in update units and not comparable)."]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"barrier_diagnosis_{args.model}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"data": str(args.data)},
                                                     "results": results, "commit": commit}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
