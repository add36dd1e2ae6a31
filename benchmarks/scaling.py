"""Train rows/s of 1 vs 2 processes at the same GLOBAL batch, and the wall time one fault costs (issue 11, section 7).

Everything runs through the CLI a user runs, on a prepared synthetic dataset (``recsys-transfer prepare --dataset
synthetic --rows 200000``, the selective target domain selected once up front, so no run pays for it):

* ``1 process``: ``recsys-transfer train`` with ``train.batch_size=B`` (4096);
* ``2 processes``: ``recsys-transfer launch --standalone --nproc-per-node 2 -- train`` with ``train.batch_size=B/2``
  per process (gloo, the planner's sharding), the same global batch;
* ``2 processes, one fault``: the same job with ``--max-restarts 1`` and ``RECSYS_TRANSFER_FAULT_STEP=k``: rank 0 is
  killed with SIGKILL before global step ``k`` (default: the middle of the last epoch); torchrun restarts both
  workers, which resume from the newest checkpoint (``checkpoint.every_steps``, default a quarter epoch, so one
  exists before the fault) and finish the job.

The model is the pipeline's config (``pipelines/synthetic.yaml``) with ``--set`` overrides (default: DeepFM, MLP
400-400-400, +Ours with the adversarial loss, so the checkpoints hold the discriminators and the row state's
``transfer_`` copies), ``train.progress=false``, ``train.epochs`` (2). Every run uses the same checkpoint settings.
Reported: ``train_rows_per_s`` from each run's ``metrics.json`` (training time only), each job's wall time (the
whole command: process start, data, training, validation, test), and the time lost to the fault: wall time of the
faulted job minus the uninterrupted 2-process job's (median of ``--repeats``), as a fraction of one epoch's wall
time (the uninterrupted 2-process job's ``train/seconds`` per epoch from ``epochs.jsonl``; the validation pass after
it is not counted). The faulted job's test metrics are checked to equal the uninterrupted job's (the resume is
exact at the same world size).

On a 2-core machine shared with other jobs two processes cannot be faster than one: the number is still the record.
The 1- and 2-process runs alternate, ``--repeats`` (2) each; results go to ``benchmarks/results/scaling.{json,md}``.

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


def run_job(name: str, procs: int, batch: int, args, data: Path, out: Path, fault: int | None = None) -> dict:
    sets = [*DEFAULT_SETS, *args.set, f"data.path={data}", f"train.batch_size={batch}", "train.progress=false",
            f"train.epochs={args.epochs}", f"checkpoint.every_steps={args.every_steps}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("RECSYS_TRANSFER_FAULT_STEP", None)
    if fault is not None:
        env.update(RECSYS_TRANSFER_FAULT_STEP=str(fault), RECSYS_TRANSFER_FAULT_RANK="0")
    cmd = train_command(procs, 1 if fault is not None else 0, args.config, sets, out)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    if r.returncode != 0 or metrics.get("status") != "completed":
        print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{name} failed (exit {r.returncode})")
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    train_s = sum(e["train/seconds"] for e in epochs)
    res = {"name": name, "procs": procs, "batch_per_proc": batch, "global_batch": batch * procs, "wall_s": wall,
           "run_wall_s": metrics["wall_seconds"], "train_s": train_s,
           "train_rows_per_s": metrics["train_rows_per_s"], "epochs": len(epochs),
           "epoch_train_s": [e["train/seconds"] for e in epochs], "test": metrics["test"],
           "valid_best": metrics["valid_best"], "resumed_from": run.get("resumed_from", []),
           "fault_seen": "fault injection: killing rank" in r.stderr,
           "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir())}
    return res


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
    p.add_argument("--repeats", type=int, default=2, help="uninterrupted 1- and 2-process runs each, alternating")
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
        for k in range(args.repeats):
            order = [(1, args.batch), (2, args.batch // 2)]
            for procs, batch in (order if k % 2 == 0 else order[::-1]):
                name = f"{procs}p-{k}"
                runs.append(run_job(name, procs, batch, args, data, scratch / name))
                r = runs[-1]
                print(f"  {procs} process(es), batch {batch} each: {r['train_rows_per_s']:9,.0f} rows/s, wall "
                      f"{r['wall_s']:5.1f} s (train {r['train_s']:5.1f} s)", flush=True)
        faulted = run_job("2p-fault", 2, args.batch // 2, args, data, scratch / "2p-fault", fault=fault)
        print(f"  2 processes, fault before step {fault}: wall {faulted['wall_s']:5.1f} s, resumed from "
              f"{[Path(x['checkpoint']).name for x in faulted['resumed_from']]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the runs, and the data unless --data named it

    med = statistics.median
    one = [r for r in runs if r["procs"] == 1]
    two = [r for r in runs if r["procs"] == 2]
    rps1, rps2 = med(r["train_rows_per_s"] for r in one), med(r["train_rows_per_s"] for r in two)
    wall2 = med(r["wall_s"] for r in two)
    ref = min(two, key=lambda r: abs(r["wall_s"] - wall2))  # the run at the median wall time
    epoch_s = med(s for r in two for s in r["epoch_train_s"])
    lost_s = faulted["wall_s"] - wall2
    equal_test = faulted["test"] == ref["test"] and all(r["test"] == ref["test"] for r in two)
    resumed = [Path(x["checkpoint"]).name for x in faulted["resumed_from"]]
    summary = {
        "rows_per_s_1p": rps1, "rows_per_s_2p": rps2, "ratio_2p_over_1p": rps2 / rps1,
        "wall_s_1p": med(r["wall_s"] for r in one), "wall_s_2p": wall2, "wall_s_2p_fault": faulted["wall_s"],
        "lost_s": lost_s, "epoch_s": epoch_s, "lost_epochs": lost_s / epoch_s,
        "fault_step": fault, "every_steps": args.every_steps, "steps_per_epoch_2p": steps,
        "resumed_from": resumed, "fault_seen": faulted["fault_seen"], "test_equal": equal_test,
        "test_2p": ref["test"], "test_2p_fault": faulted["test"],
        "test_1p": one[0]["test"],
    }
    lines = ["| job | processes x batch | train rows/s | wall s (whole command) | train s |",
             "|---|---|---:|---:|---:|"]
    for r in runs + [faulted]:
        lines.append(f"| {r['name']} | {r['procs']} x {r['batch_per_proc']} | {r['train_rows_per_s']:,.0f} | "
                     f"{r['wall_s']:.1f} | {r['train_s']:.1f} |")
    auc = {k: v.get("auc") for k, v in ref["test"].items()}
    notes = [
        f"2 processes / 1 process, train rows/s at global batch {args.batch}: {rps2 / rps1:.2f} ({rps2:,.0f} vs "
        f"{rps1:,.0f}, medians of {args.repeats}); on a shared 2-core machine 2 processes cannot be faster than one "
        "(each process already has one core's worth of threads, and other jobs use the cores too): the number is "
        "still the record",
        f"one fault (rank 0 killed before global step {fault}, checkpoints every {args.every_steps} steps, "
        f"{steps} steps per epoch; resumed from {resumed}): {lost_s:+.1f} s of wall time "
        f"({faulted['wall_s']:.1f} vs {wall2:.1f} s) = {lost_s / epoch_s:.2f} of one epoch's wall time "
        f"({epoch_s:.1f} s, the 2-process epoch's train/seconds; its validation pass over "
        f"{split['valid']:,} rows is not counted)",
        f"faulted job's test metrics equal the uninterrupted 2-process job's: {equal_test} (test AUC {auc})",
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
        (RESULTS / "scaling.json").write_text(json.dumps({"meta": meta, "runs": runs + [faulted], "summary": summary,
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
