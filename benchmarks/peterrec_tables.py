"""PeterRec's Tables 2, 3, 5 and 7 on MovieLens (issue 14, section 4): pretrained vs from scratch, PeterRec vs FineAll
vs FineCLS vs FineLast, the DeepFM baseline of cold-user recommendation, and the patch insertions, on the user-profile
tasks (gender, age, occupation) and cold-user recommendation, with each run's trained parameters and their share of
FineAll's.

Every run is ``recsys-transfer train`` with a shipped pipeline and ``--set`` overrides (the command of each run is
in the results file), into ``WORKDIR/runs/<name>``; a finished run (``metrics.json`` completed) is not run again, so
the script resumes. Stage 1 pretrains one network per backbone (``pipelines/peterrec-pretrain.yaml`` NextItNet,
``peterrec-pretrain-grec.yaml`` GRec; seed 0); stage 2 fine-tunes every (table, variant, task) for every seed
(``pipelines/peterrec-profile.yaml`` with ``tasks=[{name: T}]``, ``peterrec-cold.yaml``), loading the pretrained
network by name (``model.init_from``) unless the variant starts from a random one (PeterZero, FineZero). Stage 2 also
trains the DeepFM baseline on the cold task for every seed (``pipelines/peterrec-cold-deepfm.yaml``: the cold users'
source-domain items as features, every target item scored; from scratch, no pretrained network; embedding width
``--dim`` as the pretraining's, at most ``--epochs`` epochs as the fine-tuning runs; ``--baseline-set`` adds
overrides to these runs only, ``--finetune-set`` does not reach them).

* Table 2 analog (the paper's Table 2, causal CNN): FineZero, FineAll, PeterRec, PeterZero;
* Table 3 analog: FineCLS, FineLast1, FineLast2, FineAll, PeterRec (the paper's Table 3 uses the non-causal CNN;
  here the causal one, so FineAll and PeterRec are Table 2's runs; ``--grec`` adds FineAll and PeterRec on the GRec
  network: the paper's RQ4, causal vs non-causal);
* Table 5 analog (the paper's RQ3: "the interacted items in S are treated as features" of DeepFM): DeepFM vs
  PeterRec vs FineAll on cold-user recommendation, with the trained parameters of each;
* Table 7 analog: PeterRec's insertions (b) (c) (d) (e) on the age task.

Metrics (test split, mean +- std over seeds): profile tasks accuracy; cold task HR@5 and MRR@5 of the true item
among its 99 stored sampled negatives (the paper's protocol) and, because sampled metrics are known to misstate
full-ranking ones, HR@10 / NDCG@10 over all target items.

Usage::

    python benchmarks/peterrec_tables.py --workdir runs/peterrec-tables --seeds 0 1 2 --jobs 2
    python benchmarks/peterrec_tables.py --smoke   # ML-100K, tiny network, one seed, one epoch (the test's)

Results: ``benchmarks/results/peterrec_tables[_TAG].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, as the runs (``python -m`` in ROOT) use
PROFILE_TASKS = ("gender", "age", "occupation")
TASKS = (*PROFILE_TASKS, "cold")
LABELS = {"fine_zero": "FineZero", "fine_all": "FineAll", "peterrec": "PeterRec", "peter_zero": "PeterZero",
          "fine_cls": "FineCLS", "fine_last1": "FineLast1", "fine_last2": "FineLast2", "deepfm": "DeepFM"}
TABLE2 = ("fine_zero", "fine_all", "peterrec", "peter_zero")
TABLE3 = ("fine_cls", "fine_last1", "fine_last2", "fine_all", "peterrec")
INSERTIONS = ("b", "c", "d", "e")
PRETRAIN = {"nextitnet": "peterrec-pretrain.yaml", "grec": "peterrec-pretrain-grec.yaml"}
BASELINE = ("deepfm", "deepfm", "-")  # the DeepFM runs' (backbone, variant, insertion) in the results' cell keys


@dataclass(frozen=True)
class Run:
    name: str
    pipeline: str
    overrides: tuple[str, ...]
    after: str | None = None  # the pretraining run it loads
    cell: tuple[str, str, str, str, int] | None = None  # (backbone, variant, insertion, task, seed) of a stage-2 run

    def command(self, workdir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "recsys_transfer", "train", "--config", str(ROOT / "pipelines" / self.pipeline),
               "--output", str(workdir / "runs" / self.name)]
        for o in self.overrides:
            cmd += ["--set", o]
        return cmd


def _data_overrides(args, workdir: Path, task: str) -> list[str]:
    return [f"data.path={workdir / 'data' / task}", f"data.prepare.input=[{args.input}]"]


def plan(args, workdir: Path) -> tuple[list[Run], list[Run]]:
    """(pretraining runs, fine-tuning runs)."""
    net = [f"model.params.embedding_dim={args.dim}", f"model.params.dilations={json.dumps(args.dilations)}",
           "train.progress=false"]
    pre = []
    backbones = ["nextitnet", "grec"] if args.grec else ["nextitnet"]
    for b in backbones:
        softmax = ([f"model.params.softmax={args.pretrain_softmax}",
                    f"sequence.negatives={args.pretrain_negatives if args.pretrain_softmax == 'sampled' else 0}"]
                   if b == "nextitnet" else [])
        pre.append(Run(f"pretrain-{b}", PRETRAIN[b], tuple(
            _data_overrides(args, workdir, "pretrain") + net + softmax + [f"train.epochs={args.pretrain_epochs}",
                                                                          f"train.seed={args.pretrain_seed}"]
            + args.pretrain_set)))
    cells: list[tuple[str, str, str, str]] = []  # (backbone, variant, insertion, task)
    for v in dict.fromkeys(TABLE2 + TABLE3):
        cells += [("nextitnet", v, "d", t) for t in TASKS]
    cells += [("nextitnet", "peterrec", ins, "age") for ins in INSERTIONS if ins != "d"]
    if args.grec:
        cells += [("grec", v, "d", t) for v in ("fine_all", "peterrec") for t in TASKS]
    fine = []
    for backbone, variant, insertion, task in cells:
        for seed in args.seeds:
            pipeline = "peterrec-cold.yaml" if task == "cold" else "peterrec-profile.yaml"
            ov = _data_overrides(args, workdir, "cold" if task == "cold" else "profile") + net + [
                f"model.params.backbone={backbone}", f"model.params.variant={variant}",
                f"model.params.insertion={insertion}", f"train.epochs={args.epochs}", f"train.seed={seed}"]
            if task != "cold":
                ov += [f"tasks=[{{name: {task}}}]", f"train.monitor=valid/{task}/accuracy"]
            if backbone == "grec":
                ov += ["sequence.token=both", "model.params.head=first_last"]  # Eq. 6, Fig. 2 (c)
            after = None
            if variant in ("peter_zero", "fine_zero"):
                ov.append("model.init_from=null")
            else:
                after = f"pretrain-{backbone}"
                ov.append(f"model.init_from={workdir / 'runs' / after}")
            name = f"{backbone}-{variant}-{insertion}-{task}-s{seed}"
            fine.append(Run(name, pipeline, tuple(ov + args.finetune_set), after,
                            (backbone, variant, insertion, task, seed)))
    for seed in args.seeds:  # Table 5's DeepFM: from scratch, the pretraining's embedding width
        ov = _data_overrides(args, workdir, "cold") + [
            f"model.params.embedding_dim={args.dim}", "train.progress=false", f"train.epochs={args.epochs}",
            f"train.seed={seed}"]
        fine.append(Run(f"deepfm-cold-s{seed}", "peterrec-cold-deepfm.yaml", tuple(ov + args.baseline_set),
                        cell=(*BASELINE, "cold", seed)))
    return pre, fine


def _done(workdir: Path, run: Run) -> bool:
    m = workdir / "runs" / run.name / "metrics.json"
    return m.is_file() and json.loads(m.read_text()).get("status") == "completed"


def execute(runs: list[Run], workdir: Path, jobs: int, threads: int) -> None:
    todo = [r for r in runs if not _done(workdir, r)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}

    def one(r: Run) -> None:
        t = time.perf_counter()
        log = workdir / "logs" / f"{r.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            rc = subprocess.run(r.command(workdir) + ["--overwrite"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT).returncode
        status = "done" if rc == 0 else f"FAILED (exit {rc}, log {log})"
        print(f"  {r.name}: {status} in {time.perf_counter() - t:.0f}s", flush=True)
        if rc != 0:
            raise SystemExit(f"run {r.name} failed: see {log}")

    print(f"{len(todo)} of {len(runs)} runs to train", flush=True)
    # every data directory is prepared here, once, before runs that share it start in parallel
    from recsys_transfer.config import load_config
    from recsys_transfer.train.run import ensure_prepared

    seen: set[str] = set()
    for r in todo:
        cfg = load_config(ROOT / "pipelines" / r.pipeline, list(r.overrides))
        if cfg.data.path not in seen:
            seen.add(cfg.data.path)
            ensure_prepared(cfg)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))


def _metrics(workdir: Path, run: Run) -> dict:
    m = json.loads((workdir / "runs" / run.name / "metrics.json").read_text())
    return m


def _fmt(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}"


def collect(args, workdir: Path, pre: list[Run], fine: list[Run]) -> dict:
    out: dict = {"pretrain": {}, "cells": {}}
    for r in pre:
        m = _metrics(workdir, r)
        out["pretrain"][r.name] = {"valid_mrr@5": m["valid_best"]["next"]["mrr@5"],
                                   "test_mrr@5": m["test"]["next"]["mrr@5"], "epochs_run": m["epochs_run"],
                                   "best_epoch": m["best_epoch"], "wall_seconds": m["wall_seconds"],
                                   "parameters": m["parameters"], "command": r.command(workdir)}
    for r in fine:
        backbone, variant, insertion, task, seed = r.cell
        m = _metrics(workdir, r)
        test = m["test"][task]
        keys = ("accuracy", "macro_f1") if task in PROFILE_TASKS else (
            "sampled_hr@5", "sampled_mrr@5", "hr@10", "ndcg@10")
        cell = out["cells"].setdefault(f"{backbone}/{variant}/{insertion}/{task}", {"runs": []})
        cell["runs"].append({"seed": seed, **{k: test[k] for k in keys},
                             "trained": m["parameters"]["trained"], "best_epoch": m["best_epoch"],
                             "wall_seconds": m["wall_seconds"], "command": r.command(workdir)})
    return out


def _cell(out: dict, backbone: str, variant: str, insertion: str, task: str, key: str) -> list[float]:
    cell = out["cells"].get(f"{backbone}/{variant}/{insertion}/{task}")
    return [r[key] for r in cell["runs"]] if cell else []


def _share(out: dict, backbone: str, variant: str, insertion: str, task: str) -> str:
    mine = _cell(out, backbone, variant, insertion, task, "trained")
    full = _cell(out, backbone, "fine_all", "d", task, "trained")
    if not mine or not full:
        return "-"
    return f"{mine[0]:,} ({100 * mine[0] / full[0]:.2f}%)"


def report(args, out: dict, seconds: float) -> str:
    main = {t: ("accuracy" if t in PROFILE_TASKS else "sampled_hr@5") for t in TASKS}
    lines = [
        "# PeterRec Tables 2, 3, 5 and 7 analogs on MovieLens (`benchmarks/peterrec_tables.py`)", "",
        f"Command: `{' '.join(['python', 'benchmarks/peterrec_tables.py'] + sys.argv[1:])}`; commit "
        f"{_commit()}; {seconds:.0f} s on {os.uname().machine}, {args.jobs} job(s) x {args.threads} thread(s).", "",
        f"Data: `{args.input}` (recsys_transfer/data/sequences.py: target domain Documentary + Horror; profile rows = "
        f"users with a source-domain rating, split 70/3/27; cold rows = (user, target item) of users with 1-3 target "
        f"ratings, split 70/3/27). Network: embedding = channels {args.dim}, blocks {args.dilations} (each block's "
        f"convs at d and 2d), kernel 3; pretraining seed {args.pretrain_seed}, at most {args.pretrain_epochs} epochs, "
        f"NextItNet's output {args.pretrain_softmax} softmax"
        f"{f' ({args.pretrain_negatives} shared negatives)' if args.pretrain_softmax == 'sampled' else ''} "
        f"(best validation MRR@5); fine-tuning seeds {args.seeds}, at most {args.epochs} epochs each (best validation "
        f"epoch); other settings as the pipelines.", "",
        "Metrics ×100 (test split, mean ± std over fine-tuning seeds): gender / age / occupation accuracy; cold HR@5 "
        "(and MRR@5) among the 99 stored sampled negatives; full: HR@10 over all 421 target items. "
        "\"trained\": parameters the run updates (its share of FineAll's on the same network).", ""]
    lines += ["## Pretraining", "", "| network | valid MRR@5 (whole pool) | test MRR@5 | epochs (best) | seconds |",
              "|---|---:|---:|---:|---:|"]
    for name, p in out["pretrain"].items():
        lines.append(f"| {name} | {100 * p['valid_mrr@5']:.2f} | {100 * p['test_mrr@5']:.2f} | "
                     f"{p['epochs_run']} ({p['best_epoch']}) | {p['wall_seconds']:.0f} |")

    def table(title: str, variants, backbone: str = "nextitnet") -> None:
        lines.extend(["", f"## {title}", "",
                      "| model | gender | age | occupation | cold HR@5 | cold MRR@5 | cold full HR@10 | trained (age) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"])
        for v in variants:
            row = [_fmt(_cell(out, backbone, v, "d", t, main[t])) for t in TASKS]
            row += [_fmt(_cell(out, backbone, v, "d", "cold", "sampled_mrr@5")),
                    _fmt(_cell(out, backbone, v, "d", "cold", "hr@10")), _share(out, backbone, v, "d", "age")]
            lines.append(f"| {LABELS[v]} | " + " | ".join(row) + " |")

    table("Table 2 analog: impact of pretraining (causal CNN, NextItNet)", TABLE2)
    table("Table 3 analog: PeterRec vs FineAll vs FineCLS vs FineLast (causal CNN)", TABLE3)
    if args.grec:
        table("Non-causal CNN (GRec, [TCS] at both ends, Eq. 6): FineAll and PeterRec", ("fine_all", "peterrec"),
              "grec")
    lines += ["", "## Table 5 analog: DeepFM vs PeterRec vs FineAll on cold-user recommendation", "",
              "DeepFM (pipelines/peterrec-cold-deepfm.yaml): the user's source-domain items as one mean-pooled field, "
              "every target item one more FM field, trained from scratch (no pretrained network); PeterRec and "
              "FineAll: the causal network of Table 2.", "",
              "| model | cold HR@5 | cold MRR@5 | cold full HR@10 | trained (cold) |", "|---|---:|---:|---:|---:|"]
    for backbone, variant, insertion in (BASELINE, ("nextitnet", "peterrec", "d"), ("nextitnet", "fine_all", "d")):
        row = [_fmt(_cell(out, backbone, variant, insertion, "cold", k)) for k in ("sampled_hr@5", "sampled_mrr@5",
                                                                                   "hr@10")]
        trained = _cell(out, backbone, variant, insertion, "cold", "trained")
        row.append(f"{trained[0]:,}" if trained else "-")
        lines.append(f"| {LABELS[variant]} | " + " | ".join(row) + " |")
    lines += ["", "## Table 7 analog: insertions on the age task (PeterRec, causal CNN)", "",
              "| insertion | age accuracy | trained |", "|---|---:|---:|"]
    for ins in INSERTIONS:
        lines.append(f"| ({ins}) | {_fmt(_cell(out, 'nextitnet', 'peterrec', ins, 'age', 'accuracy'))} | "
                     f"{_share(out, 'nextitnet', 'peterrec', ins, 'age')} |")
    lines += ["", "## Claims under test", ""]
    for t in TASKS:
        k = main[t]
        pr, fa, fc = (statistics.fmean(_cell(out, "nextitnet", v, "d", t, k) or [float("nan")])
                      for v in ("peterrec", "fine_all", "fine_cls"))
        lines.append(f"- {t}: PeterRec {100 * pr:.2f}, FineAll {100 * fa:.2f}, FineCLS {100 * fc:.2f} ({k}).")
    dfm = statistics.fmean(_cell(out, *BASELINE, "cold", "sampled_hr@5") or [float("nan")])
    pr = statistics.fmean(_cell(out, "nextitnet", "peterrec", "d", "cold", "sampled_hr@5") or [float("nan")])
    lines.append(f"- cold (Table 5): PeterRec {100 * pr:.2f} {'>=' if pr >= dfm else '<'} DeepFM {100 * dfm:.2f} "
                 "(sampled_hr@5).")
    d, e = (statistics.fmean(_cell(out, "nextitnet", "peterrec", i, "age", "accuracy") or [float("nan")])
            for i in ("d", "e"))
    lines.append(f"- parallel (d) {'>=' if d >= e else '<'} (e) on age: {100 * d:.2f} vs {100 * e:.2f}.")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=None, help="MovieLens directory (default: RECSYS_DATA_DIR's ML-1M-partial)")
    p.add_argument("--workdir", default="runs/peterrec-tables")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dilations", type=int, nargs="+", default=[1, 4, 1, 4])
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--pretrain-softmax", choices=("sampled", "full"), default="full",
                   help="NextItNet's pretraining output (default full, the pipeline's: it pretrains better on "
                        "ML-1M-partial than 1024 uniform negatives, nextitnet_softmax_ablation.md)")
    p.add_argument("--pretrain-negatives", type=int, default=1024, help="shared negatives per batch when sampled")
    p.add_argument("--grec", action="store_true", help="also pretrain GRec and fine-tune FineAll / PeterRec on it")
    p.add_argument("--pretrain-set", action="append", default=[], help="extra --set for pretraining runs")
    p.add_argument("--finetune-set", action="append", default=[], help="extra --set for fine-tuning runs")
    p.add_argument("--baseline-set", action="append", default=[], help="extra --set for the DeepFM runs")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--smoke", action="store_true", help="ML-100K, a tiny network, one seed, one epoch")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    data = Path(os.environ.get("RECSYS_DATA_DIR", ROOT.parent / "shared" / "data"))
    if args.smoke:
        args.input = args.input or str(data / "movielens-100k")
        args.seeds, args.dim, args.dilations = [0], 8, [1]
        args.pretrain_epochs = args.epochs = 1
        args.pretrain_set = args.pretrain_set + ["sequence.negatives=32", "train.batch_size=64"]
        args.finetune_set = args.finetune_set + ["train.batch_size=64"]
        args.baseline_set = args.baseline_set + ["train.batch_size=64", "model.params.hidden=[16]"]
    args.input = str(Path(args.input or data / "movielens-1m-partial").resolve())
    if not Path(args.input).is_dir():
        print(f"peterrec_tables: {args.input}: no such directory (set RECSYS_DATA_DIR or --input)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    t0 = time.perf_counter()
    pre, fine = plan(args, workdir)
    print("stage 1: pretraining", flush=True)
    execute(pre, workdir, min(args.jobs, len(pre)), args.threads)
    print("stage 2: fine-tuning", flush=True)
    execute(fine, workdir, args.jobs, args.threads)
    out = collect(args, workdir, pre, fine)
    text = report(args, out, time.perf_counter() - t0)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = "peterrec_tables" + (f"_{args.tag}" if args.tag else "")
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
