"""Train rows/s of 1 vs 2 processes at the same GLOBAL batch, and the wall time one fault costs (issue 11, section 7).

Everything runs through the CLI a user runs, on a prepared synthetic dataset (``recsys-transfer prepare --dataset
synthetic --rows 200000``, the selective target domain selected once up front, so no run pays for it):

* ``1p``: ``recsys-transfer train`` with ``train.batch_size=B`` (4096), one torch thread;
* ``1p-2threads``: the same with ``train.threads=2`` (the same two cores as two processes: the fair peer here);
* ``2p``: ``recsys-transfer launch --standalone --nproc-per-node 2 -- train`` with ``train.batch_size=B/2`` per
  process (gloo, the planner's sharding), one thread each: the same global batch;
* ``2p-fault``: the same job with ``--max-restarts 1`` and ``RECSYS_TRANSFER_FAULT_STEP=k``: rank 0 is killed with
  SIGKILL before global step ``k`` (default: the middle of the last epoch); torchrun restarts both workers, which
  resume from the newest checkpoint (``checkpoint.every_steps``, default a quarter epoch, so one exists before the
  fault) and finish the job.

The model is the pipeline's config (``pipelines/synthetic.yaml``) with ``--set`` overrides (default: DeepFM, MLP
400-400-400, +Ours with the adversarial loss, so the checkpoints hold the discriminators and the row state's
``transfer_`` copies), ``train.progress=false``, ``train.epochs`` (2). Every job uses the same checkpoint settings.
Reported: ``train_rows_per_s`` from each run's ``metrics.json`` (training time only), each job's wall time (the
whole command: process start, data, training, validation, test), and the time lost to the fault: the faulted job's
wall time minus the uninterrupted 2-process job's of the same repeat (median over repeats), as a fraction of one
epoch's wall time (the uninterrupted 2-process job's ``train/seconds`` per epoch from ``epochs.jsonl``; the
validation pass after it is not counted). The faulted jobs' test metrics are checked to equal the uninterrupted
jobs' (the resume is exact at the same world size).

On a 2-core machine shared with other jobs 2 processes cannot be faster than the two cores allow: no scaling can
show here, the number is still the record. ``--repeats`` (3) rounds of the four jobs, the order rotating from
round to round; results go to ``benchmarks/results/scaling.{json,md}``.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --rows 50000 --epochs 1 --repeats 1 --no-record     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SETS = ("model.name=deepfm", "model.params={embedding_dim: 16, hidden: [400, 400, 400]}",
                "transfer.mode=+Ours", "transfer.loss=adversarial")


def prepare_data(path: Path, rows: int, config: Path, overrides: list[str]) -> dict:
    """The synthetic dataset in ``path`` (kept when it is already there) and the selective target domain of the
    run config's transfer fields. Returns the split sizes."""
    from recsys_transfer.config import PrepareConfig, load_config
    from recsys_transfer.data.prepare import prepare
    from recsys_transfer.data.prepared import DatasetMeta
    from recsys_transfer.transfer.domains import load_domains, select_command

    if not (path / "meta.json").is_file():
        prepare(PrepareConfig(dataset="synthetic", rows=rows), path, progress=False)
    meta = DatasetMeta.load(path)
    cfg = load_config(config, [*overrides, f"data.path={path}"])
    if cfg.transfer.mode in ("+Ours", "select"):
        fields = cfg.transfer.transfer_fields(meta)
        try:
            load_domains(path / "selection", fields, meta)
        except Exception:  # noqa: BLE001 - none yet (or another one): select as the run would
            select_command(path, fields, path / "selection", top_k=cfg.data.select_top_k,
                           quantile=cfg.data.select_quantile, meta=meta)
    return dict(meta.split_rows)


def train_command(procs: int, restarts: int, config: Path, sets: list[str], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "recsys_transfer"]
    if procs > 1:
        cmd += ["launch", "--standalone", "--nproc-per-node", str(procs), "--max-restarts", str(restarts), "--"]
    cmd += ["train", "--config", str(config), "--output", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


#: the jobs of one repeat: name -> (processes, torch threads per process, faulted)
JOBS = {"1p": (1, 1, False), "1p-2threads": (1, 2, False), "2p": (2, 1, False), "2p-fault": (2, 1, True)}


def run_job(name: str, kind: str, args, data: Path, out: Path, fault: int) -> dict:
    procs, threads, faulted = JOBS[kind]
    batch = args.batch // procs
    sets = [*DEFAULT_SETS, *args.set, f"data.path={data}", f"train.batch_size={batch}", "train.progress=false",
            f"train.epochs={args.epochs}", f"checkpoint.every_steps={args.every_steps}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    if threads != 1:
        sets.append(f"train.threads={threads}")
    env.pop("RECSYS_TRANSFER_FAULT_STEP", None)
    if faulted:
        env.update(RECSYS_TRANSFER_FAULT_STEP=str(fault), RECSYS_TRANSFER_FAULT_RANK="0")
    cmd = train_command(procs, 1 if faulted else 0, args.config, sets, out)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    if r.returncode != 0 or metrics.get("status") != "completed":
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name} failed (exit {r.returncode})")
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    return {"name": name, "kind": kind, "procs": procs, "threads": threads, "batch_per_proc": batch,
            "global_batch": batch * procs, "wall_s": wall, "run_wall_s": metrics["wall_seconds"],
            "train_s": sum(e["train/seconds"] for e in epochs), "train_rows_per_s": metrics["train_rows_per_s"],
            "epochs": len(epochs), "epoch_train_s": [e["train/seconds"] for e in epochs], "test": metrics["test"],
            "valid_best": metrics["valid_best"],
            "resumed_from": [Path(x["checkpoint"]).name for x in run.get("resumed_from", [])],
            "fault_seen": "fault injection: killing rank" in r.stderr,
            "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())}


def steps_per_epoch(train_rows: int, procs: int, batch: int) -> int:
    """Batches per rank and epoch (several processes drop the last, partial batch: the loader's drop_last)."""
    per_rank = train_rows // procs if procs > 1 else train_rows
    return per_rank // batch if procs > 1 else -(-per_rank // batch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "pipelines" / "synthetic.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides, after the defaults (" + "; ".join(DEFAULT_SETS) + ")")
    p.add_argument("--data", type=Path, default=None, help="prepared synthetic dataset (made here when absent; "
                                                           "default: a scratch directory)")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows when preparing")
    p.add_argument("--batch", type=int, default=4096, help="global batch (2 processes: half each)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every-steps", type=int, default=0, help="checkpoint.every_steps (default: a quarter epoch)")
    p.add_argument("--fault-step", type=int, default=0,
                   help="global step before which rank 0 is killed (default: the middle of the last epoch)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the four jobs (the order rotates)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="scaling_"))
    data = args.data or scratch / "data"
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        split = prepare_data(data, args.rows, args.config, [*DEFAULT_SETS, *args.set])
        prep_s = time.perf_counter() - t0
        steps = steps_per_epoch(split["train"], 2, args.batch // 2)
        args.every_steps = args.every_steps or max(1, steps // 4)
        fault = args.fault_step or (args.epochs - 1) * steps + steps // 2
        print(f"data {data}: {split['train']:,} train rows ({prep_s:.0f} s); 2 processes: {steps} steps per epoch, "
              f"checkpoint every {args.every_steps} steps, fault before global step {fault}", flush=True)
        runs: list[dict] = []
        kinds = list(JOBS)
        for k in range(args.repeats):
            for kind in kinds[k % len(kinds):] + kinds[:k % len(kinds)]:  # the order rotates
                name = f"{kind}-{k}"
                r = run_job(name, kind, args, data, scratch / name, fault)
                runs.append(r)
                print(f"  {name:<15} {r['procs']} x batch {r['batch_per_proc']}, {r['threads']} thread(s): "
                      f"{r['train_rows_per_s']:9,.0f} rows/s, wall {r['wall_s']:5.1f} s (train {r['train_s']:5.1f} s)"
                      + (f", resumed from {r['resumed_from']}" if r["resumed_from"] else ""), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the runs, and the data unless --data named it

    med = statistics.median
    by = {kind: [r for r in runs if r["kind"] == kind] for kind in JOBS}
    rps = {kind: med(r["train_rows_per_s"] for r in rs) for kind, rs in by.items()}
    wall = {kind: med(r["wall_s"] for r in rs) for kind, rs in by.items()}
    epoch_s = med(s for r in by["2p"] for s in r["epoch_train_s"])
    # the time one fault costs: each faulted job against the uninterrupted 2-process job of the same repeat
    lost = [f["wall_s"] - u["wall_s"] for f, u in zip(by["2p-fault"], by["2p"])]
    lost_s = med(lost)
    ref = by["2p"][0]
    equal_test = all(r["test"] == ref["test"] for r in by["2p"] + by["2p-fault"])
    all_resumed = all(r["resumed_from"] and r["fault_seen"] for r in by["2p-fault"])
    summary = {
        "rows_per_s": rps, "wall_s": wall, "ratio_2p_over_1p": rps["2p"] / rps["1p"],
        "ratio_2p_over_1p_2threads": rps["2p"] / rps["1p-2threads"],
        "lost_s_runs": lost, "lost_s": lost_s, "epoch_s": epoch_s, "lost_epochs": lost_s / epoch_s,
        "fault_step": fault, "every_steps": args.every_steps, "steps_per_epoch_2p": steps,
        "resumed_from": [r["resumed_from"] for r in by["2p-fault"]], "every_fault_resumed": all_resumed,
        "test_equal": equal_test, "test_2p": ref["test"], "test_1p": by["1p"][0]["test"],
    }
    lines = ["| job | processes x batch, threads | train rows/s | wall s (whole command) | train s |",
             "|---|---|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['procs']} x {r['batch_per_proc']}, {r['threads']} | "
                     f"{r['train_rows_per_s']:,.0f} | {r['wall_s']:.1f} | {r['train_s']:.1f} |")
    auc = {k: round(v["auc"], 6) for k, v in ref["test"].items() if "auc" in v}
    notes = [
        f"train rows/s at global batch {args.batch} (medians of {args.repeats}): 1 process {rps['1p']:,.0f}, "
        f"1 process with 2 threads {rps['1p-2threads']:,.0f}, 2 processes {rps['2p']:,.0f}: 2 processes / 1 process "
        f"{rps['2p'] / rps['1p']:.2f}, / 1 process with 2 threads {rps['2p'] / rps['1p-2threads']:.2f}. This "
        f"machine has {os.cpu_count()} cores shared with other jobs: 2 processes cannot be faster than the cores "
        "allow (one process with 2 threads uses the same 2 cores), so no scaling can show here and the numbers are "
        "noisy; they are still the record",
        f"one fault (rank 0 killed with SIGKILL before global step {fault} of {args.epochs * steps}, checkpoints "
        f"every {args.every_steps} steps, {steps} steps per epoch; torchrun --max-restarts 1 restarted both workers, "
        f"which resumed from {summary['resumed_from'][0]}): {lost_s:+.1f} s of wall time (median of the faulted "
        f"job minus the uninterrupted one in the same repeat: {[round(x, 1) for x in lost]} s) = "
        f"{lost_s / epoch_s:.2f} of one epoch's wall time ({epoch_s:.1f} s, the 2-process epoch's train/seconds; "
        f"its validation pass over {split['valid']:,} rows is not counted)",
        f"faulted jobs' test metrics equal the uninterrupted 2-process jobs': {equal_test} (test AUC {auc}); every "
        f"faulted job was killed and resumed: {all_resumed}",
    ]
    print("\n".join(lines))
    print("\n".join(notes))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        import torch

        meta = {"command": " ".join(["python benchmarks/scaling.py"] + sys.argv[1:]), "commit": commit,
                "machine": f"shared {os.cpu_count()}-core CPU box (other jobs running), no GPU",
                "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
                "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS", "1"),
                "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
                "sets": [*DEFAULT_SETS, *args.set], "rows": args.rows, "split_rows": split, "epochs": args.epochs,
                "global_batch": args.batch, "repeats": args.repeats}
        (RESULTS / "scaling.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary,
                                                          "notes": notes}, indent=1) + "\n")
        (RESULTS / "scaling.md").write_text(
            "# scaling\n\n"
            f"`{meta['command']}` at {commit[:10]}; {meta['machine']}, load {meta['loadavg'][0]:.1f}; torch "
            f"{meta['torch']}, OMP_NUM_THREADS={meta['omp_threads']}; `{meta['config']}` with "
            + ", ".join(f"`{s}`" for s in meta["sets"]) + f"; synthetic {args.rows:,} rows "
            f"({split['train']:,} train), {args.epochs} epochs, global batch {args.batch}.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
