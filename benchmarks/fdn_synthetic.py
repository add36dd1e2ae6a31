"""FDN's synthetic benchmark, Table 1 protocol (Zhou et al., Sec. 4; issue 13 section 3).

Per seed: prepare Dataset-A, -B and -I (:mod:`recsys_transfer.data.fdn_synthetic`, the same draws, the same split);
train the single-task oracle(s) on A (task y1) and on B (task y2), and every multi-task model on I (y1 and y2), each
with :func:`recsys_transfer.train.run.run_training` on ``pipelines/fdn-synthetic.yaml`` (embedding 32, 8 experts --
FDN 4 pairs --, experts [128, 64], 5 epochs, as the paper) with ``data.path``, ``model`` (``MODEL_PARAMS``) and
``train.seed`` replaced. Each run tests its best-validation epoch (``valid/mean/mse``) on the test split; A, B and I
share their test rows, so the MSEs are paired.

    gap_k = (MSE_oracle,k - MSE_model,k) / MSE_oracle,k        (Table 1's sign: negative = worse than the oracle)

per seed and task, then mean +- std (sample std) over seeds. Oracle per seed and task: of the ``--oracles`` models
trained on A (resp. B), the one with the lowest validation MSE (one oracle: that one). Table 1's claim is the ordering
FDN > PLE > CGC > MMoE of the gap (FDN closest to the oracle) on both tasks; since every model of a seed is compared
with the same oracle MSE, the gap ordering is the MSE ordering, so the script also reports the paired differences
of gap between the models in the claim's order and the number of seeds in which the full ordering holds.

    python benchmarks/fdn_synthetic.py                                   # 5 seeds x 100k rows, fdn,ple,cgc,mmoe
    python benchmarks/fdn_synthetic.py --models mmoe --seeds 0 --rows 20000 --tag smoke

Writes ``benchmarks/results/fdn_synthetic[_TAG].{json,md}`` with the command, the commit and every run's MSEs.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PIPELINE = ROOT / "pipelines" / "fdn-synthetic.yaml"
TASKS = ("y1", "y2")
VARIANT_OF_TASK = {"y1": "A", "y2": "B"}
CLAIM = ("fdn", "ple", "cgc", "mmoe")  # Table 1: gap FDN > PLE > CGC > MMoE (closest to the oracle first)

#: ``model.params`` per registry name (Sec. 4: "embedding size 32 ... the number of experts 8 (FDN has 4 pairs of
#: DCPs) ... two fully-connected layers (128 units and 64 units)"). The data has no sparse field, so embedding_dim
#: has nothing to embed (kept for the record). Expert counts, all 8 per extraction level: MMoE 8 shared experts;
#: CGC and PLE 2 task-specific experts per task + 4 shared (PLE: 2 levels, its default, as the paper's PLE on Ali-CCP:
#: "2 layers and 16 experts"); FDN "4 pairs" read as 4 pairs in all = 8 experts, i.e. ``num_pairs: 2`` per task
#: (models/fdn.py counts pairs per task; the other reading, 4 per task = 16 experts, is ``num_pairs: 4``). Towers:
#: the models' defaults (MMoE/CGC/PLE one 64-unit layer; FDN none, as the paper). The oracle: ``single_task``, one
#: [128, 64] expert and the output layer.
MODEL_PARAMS: dict[str, dict] = {
    "fdn": {"embedding_dim": 32, "num_pairs": 2, "expert_hidden": [128, 64]},
    "ple": {"embedding_dim": 32, "specific_experts": 2, "shared_experts": 4, "expert_hidden": [128, 64]},
    "cgc": {"embedding_dim": 32, "specific_experts": 2, "shared_experts": 4, "expert_hidden": [128, 64]},
    "mmoe": {"embedding_dim": 32, "num_experts": 8, "expert_hidden": [128, 64]},
    "single_task": {"embedding_dim": 32, "expert_hidden": [128, 64]},
    "deepfm": {"embedding_dim": 32, "hidden": [128, 64]},  # needs --gen constant_field=true (a sparse field)
}


def _pipeline() -> dict:
    return yaml.safe_load(PIPELINE.read_text())


def params_of(model: str, base: dict) -> dict:
    if model in MODEL_PARAMS:
        return copy.deepcopy(MODEL_PARAMS[model])
    return copy.deepcopy(base["model"].get("params", {})) if model == base["model"]["name"] else {}


def check_models(names: list[str], base: dict) -> None:
    """Fail before any training when a model is unknown or ``MODEL_PARAMS`` names an argument it does not take."""
    from recsys_transfer.models.registry import MODELS, model_arguments

    for name in names:
        if name not in MODELS:
            raise SystemExit(f"model {name!r} is not registered (registered: {sorted(MODELS)})")
        unknown = sorted(set(params_of(name, base)) - set(model_arguments(name)))
        if unknown:
            raise SystemExit(f"MODEL_PARAMS[{name!r}] has {unknown}, which {name} does not take; it takes "
                             f"{model_arguments(name)} (edit MODEL_PARAMS in {Path(__file__).name})")


def generator_overrides(assignments: list[str]) -> dict:
    """``--gen key=value`` -> ``{key: value}`` (values parsed as YAML) for :class:`FdnSyntheticConfig` fields."""
    from dataclasses import fields

    from recsys_transfer.data.fdn_synthetic import FdnSyntheticConfig

    known = {f.name for f in fields(FdnSyntheticConfig)} - {"variant", "rows", "seed", "chunk_rows"}
    out = {}
    for a in assignments:
        key, sep, text = a.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--gen {a!r}: expected KEY=VALUE with KEY one of {sorted(known)}")
        value = yaml.safe_load(text)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def prepare_seed(workdir: Path, seed: int, rows: int, gen: dict) -> dict[str, Path]:
    """Dataset-A, -B and -I of ``seed`` (the prepare command's split options; ``gen``: generator constants)."""
    from recsys_transfer.config import PrepareConfig
    from recsys_transfer.data.fdn_synthetic import FdnSyntheticConfig, prepare_fdn_synthetic
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec

    options = PrepareConfig(dataset="fdn-synthetic", rows=rows, seed=seed)
    split = SplitSpec(options.split, tuple(options.split_fractions), options.seed)
    head_tail = HeadTailSpec(options.head_rule, options.head_fraction, options.head_min_count)
    paths = {}
    for variant in ("A", "B", "I"):
        path = paths[variant] = workdir / f"seed{seed}" / f"data_{variant}"
        cfg = FdnSyntheticConfig(variant=variant, rows=rows, seed=seed, **gen)
        prepare_fdn_synthetic(cfg, path, split=split, head_tail=head_tail, progress=False)
    return paths


def label_variance(data_i: Path) -> dict[str, float]:
    """Variance of y1 and y2 over Dataset-I's test rows (the rows every MSE here is measured on)."""
    import polars as pl

    from recsys_transfer.data.prepared import DatasetMeta

    meta = DatasetMeta.load(data_i)
    test = pl.concat([pl.read_parquet(data_i / f, columns=list(TASKS)) for f in meta.split_files["test"]])
    return {t: float(test[t].cast(pl.Float64).var(ddof=0)) for t in TASKS}


def train_one(base: dict, data: Path, model: str, seed: int, out: Path, threads: int, epochs: int | None) -> dict:
    """``{task: {"test": mse, "valid": mse}}`` of one run, plus its wall time and epochs."""
    from recsys_transfer.config import RunConfig, build
    from recsys_transfer.train.run import run_training

    tree = copy.deepcopy(base)
    tree["data"] = {"path": str(data)}
    tree["model"] = {"name": model, "params": params_of(model, base)}
    tree.setdefault("train", {})["seed"] = seed
    if threads:
        tree["train"]["threads"] = threads
    if epochs is not None:
        tree["train"]["epochs"] = epochs
    metrics = run_training(build(RunConfig, tree, str(PIPELINE)), out, overwrite=True)
    res = {t: {"test": metrics["test"][t]["mse"], "valid": metrics["valid_best"][t]["mse"]} for t in metrics["test"]}
    return {"mse": res, "seconds": metrics["wall_seconds"], "best_epoch": metrics["best_epoch"],
            "device": metrics["device"]}


def generator_config(gen: dict) -> dict:
    """The generator constants of the run (variant, rows and seed vary per dataset)."""
    from recsys_transfer.data.fdn_synthetic import FdnSyntheticConfig

    d = FdnSyntheticConfig(**gen).to_json()
    for key in ("variant", "rows", "seed", "chunk_rows"):
        d.pop(key)
    return d


def train_repeated(base: dict, data: Path, model: str, seed: int, out: Path, threads: int, epochs: int | None,
                   repeats: int) -> dict:
    """:func:`train_one` ``repeats`` times with ``train.seed = seed + 1000 k`` (k = 0: the seed itself); the MSEs are
    the means over the repeats, ``repeats`` keeps each run's, ``test_rel_std`` the spread of the test MSE (the
    training noise a gap has to exceed)."""
    each = [train_one(base, data, model, seed + 1000 * k, out.with_name(f"{out.name}_r{k}"), threads, epochs)
            for k in range(repeats)]
    tasks = list(each[0]["mse"])
    res = {"mse": {t: {w: statistics.mean(e["mse"][t][w] for e in each) for w in ("test", "valid")} for t in tasks},
           "seconds": sum(e["seconds"] for e in each), "device": each[0]["device"]}
    if repeats > 1:
        res["repeats"] = each
        res["test_rel_std"] = {t: statistics.stdev(e["mse"][t]["test"] for e in each) / res["mse"][t]["test"]
                               for t in tasks}
    return res


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict, seeds: list[int], models: list[str], oracles: list[str]) -> dict:
    """Gaps per seed and task against the best-validation oracle, their mean and std, and the claim's check.
    ``runs[seed][("oracle", name, task) | ("model", name)]`` hold :func:`train_one`'s results."""
    per_seed: dict = {}
    for seed in seeds:
        r = runs[seed]
        entry = per_seed[seed] = {"oracle": {}, "gap": {m: {} for m in models}, "mse": {m: {} for m in models},
                                  "label_variance": r.get(("label_variance",))}
        for task in TASKS:
            best = min(oracles, key=lambda o: r[("oracle", o, task)]["mse"][task]["valid"])
            mse_o = r[("oracle", best, task)]["mse"][task]["test"]
            entry["oracle"][task] = {"model": best, "mse": mse_o}
            for m in models:
                mse_m = r[("model", m)]["mse"][task]["test"]
                entry["mse"][m][task] = mse_m
                entry["gap"][m][task] = (mse_o - mse_m) / mse_o
    table = {}
    for m in models:
        table[m] = {}
        for task in TASKS:
            gaps = [per_seed[s]["gap"][m][task] for s in seeds]
            mses = [per_seed[s]["mse"][m][task] for s in seeds]
            table[m][task] = {"gap_mean": _mean_std(gaps)[0], "gap_std": _mean_std(gaps)[1],
                              "mse_mean": _mean_std(mses)[0], "mse_std": _mean_std(mses)[1], "gaps": gaps}
    oracle = {task: {"mse_mean": _mean_std([per_seed[s]["oracle"][task]["mse"] for s in seeds])[0],
                     "mse_std": _mean_std([per_seed[s]["oracle"][task]["mse"] for s in seeds])[1],
                     "models": [per_seed[s]["oracle"][task]["model"] for s in seeds]} for task in TASKS}
    if all(per_seed[s]["label_variance"] for s in seeds):
        oracle["label_variance"] = {t: _mean_std([per_seed[s]["label_variance"][t] for s in seeds]) for t in TASKS}
        oracle["mse_over_variance"] = {t: _mean_std([per_seed[s]["oracle"][t]["mse"] / per_seed[s]["label_variance"][t]
                                                     for s in seeds]) for t in TASKS}
    claim = None
    if all(m in models for m in CLAIM):
        pairs = {}
        for a, b in zip(CLAIM, CLAIM[1:]):  # gap(a) - gap(b) per seed: > 0 where a is closer to the oracle
            for task in TASKS:
                d = [per_seed[s]["gap"][a][task] - per_seed[s]["gap"][b][task] for s in seeds]
                pairs[f"{a}-{b}/{task}"] = {"mean": _mean_std(d)[0], "std": _mean_std(d)[1],
                                            "seeds_positive": sum(x > 0 for x in d)}
        holds_mean = all(table[a][t]["gap_mean"] > table[b][t]["gap_mean"]
                         for a, b in zip(CLAIM, CLAIM[1:]) for t in TASKS)
        holds_seeds = sum(all(per_seed[s]["gap"][a][t] > per_seed[s]["gap"][b][t]
                              for a, b in zip(CLAIM, CLAIM[1:]) for t in TASKS) for s in seeds)
        claim = {"order": list(CLAIM), "holds_on_means": holds_mean, "seeds_where_it_holds": holds_seeds,
                 "pairs": pairs}
    spreads = {t: [v["test_rel_std"][t] for s in seeds for k, v in runs[s].items()
                   if k[0] in ("oracle", "model") and t in v.get("test_rel_std", {})] for t in TASKS}
    noise = {t: statistics.mean(v) for t, v in spreads.items() if v}
    return {"per_seed": per_seed, "table": table, "oracle": oracle, "claim": claim, "training_noise": noise}


def render(summary: dict, models: list[str], header: list[str]) -> list[str]:
    lines = header + ["", "gap = (MSE_oracle - MSE_model) / MSE_oracle, in %, mean ± std over seeds (Table 1's sign: "
                      "negative = worse than the oracle); MSE on the test split, mean ± std.", "",
                      "| model | task y1 gap | task y2 gap | MSE y1 | MSE y2 |", "|---|---:|---:|---:|---:|"]
    o = summary["oracle"]
    lines.append(f"| oracle ({', '.join(sorted(set(o['y1']['models'] + o['y2']['models'])))}) | 0 | 0 | "
                 f"{o['y1']['mse_mean']:.4f} ± {o['y1']['mse_std']:.4f} | {o['y2']['mse_mean']:.4f} ± "
                 f"{o['y2']['mse_std']:.4f} |")
    if "label_variance" in o:
        v, q = o["label_variance"], o["mse_over_variance"]
        lines.append("| Var(y) of the test rows | | | " + " | ".join(f"{v[t][0]:.4f} ± {v[t][1]:.4f}" for t in TASKS)
                     + " |")
        lines.append("| oracle MSE / Var(y) | | | " + " | ".join(f"{q[t][0]:.4f} ± {q[t][1]:.4f}" for t in TASKS)
                     + " |")
    for m in models:
        t = summary["table"][m]
        lines.append(f"| {m} | " + " | ".join(f"{100 * t[k]['gap_mean']:+.3f}% ± {100 * t[k]['gap_std']:.3f}%"
                                              for k in TASKS)
                     + " | " + " | ".join(f"{t[k]['mse_mean']:.4f} ± {t[k]['mse_std']:.4f}" for k in TASKS) + " |")
    noise = summary.get("training_noise")
    if noise:
        lines += ["", "Training noise (same data, other train seeds): relative std of one run's test MSE, mean over "
                  "seeds and models: " + ", ".join(f"{t} {100 * noise[t]:.2f}%" for t in TASKS)
                  + f" (the std of a mean of K runs is that / sqrt(K))."]
    claim = summary["claim"]
    if claim is not None:
        lines += ["", f"Claim (Table 1): gap {' > '.join(claim['order'])} on both tasks. On the means: "
                  f"{'holds' if claim['holds_on_means'] else 'does not hold'}; in "
                  f"{claim['seeds_where_it_holds']} of {len(summary['per_seed'])} seeds the full ordering holds.", "",
                  "| pair / task | gap difference (pp), mean ± std | seeds > 0 |", "|---|---:|---:|"]
        for key, p in claim["pairs"].items():
            lines.append(f"| {key} | {100 * p['mean']:+.3f} ± {100 * p['std']:.3f} | {p['seeds_positive']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(CLAIM), help="multi-task models trained on Dataset-I (registry "
                   "names, comma-separated; default fdn,ple,cgc,mmoe)")
    p.add_argument("--oracles", default="single_task", help="single-task models trained on Dataset-A and -B; per "
                   "seed and task the one with the lowest validation MSE is the oracle (default single_task)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rows", type=int, default=100_000, help="rows per dataset (the paper does not say)")
    p.add_argument("--gen", action="append", default=[], metavar="KEY=VALUE",
                   help="a generator constant (FdnSyntheticConfig field), e.g. --gen feature_noise_std=0.1")
    p.add_argument("--epochs", type=int, default=None, help="override the pipeline's 5 epochs (quick runs)")
    p.add_argument("--train-repeats", type=int, default=1, metavar="K",
                   help="train every model K times per seed (train.seed = seed + 1000 k) and use the mean MSE; "
                        "also reports the training noise (relative std of the test MSE over the K runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--workdir", type=Path, default=None, help="prepared data and runs (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="results file suffix: fdn_synthetic_TAG.{json,md}")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    oracles = [m for m in args.oracles.split(",") if m]
    base = _pipeline()
    check_models(sorted(set(models + oracles)), base)
    gen = generator_overrides(args.gen)

    t0 = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fdn_synthetic_"))
    runs: dict = {}
    try:
        for seed in args.seeds:
            data = prepare_seed(workdir, seed, args.rows, gen)
            r = runs[seed] = {("label_variance",): label_variance(data["I"])}
            for task in TASKS:
                for o in oracles:
                    v = VARIANT_OF_TASK[task]
                    r[("oracle", o, task)] = res = train_repeated(base, data[v], o, seed, workdir / f"seed{seed}" /
                                                                  f"oracle_{o}_{v}", args.threads, args.epochs,
                                                                  args.train_repeats)
                    print(f"seed {seed} oracle {o} on {v}: test mse {task} {res['mse'][task]['test']:.4f} "
                          f"({res['seconds']:.0f} s)", flush=True)
            for m in models:
                r[("model", m)] = res = train_repeated(base, data["I"], m, seed, workdir / f"seed{seed}" /
                                                       f"model_{m}", args.threads, args.epochs, args.train_repeats)
                print(f"seed {seed} {m} on I: test mse " + " ".join(f"{t} {res['mse'][t]['test']:.4f}" for t in TASKS)
                      + f" ({res['seconds']:.0f} s)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs, args.seeds, models, oracles)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip())
    command = "python benchmarks/fdn_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = next(v["device"] for v in runs[args.seeds[0]].values() if "device" in v)
    seconds = time.perf_counter() - t0
    header = [f"# FDN synthetic benchmark, Table 1 protocol (`benchmarks/fdn_synthetic.py`)", "",
              f"Command: `{command.rstrip()}`; commit {commit}{' (uncommitted changes)' if dirty else ''}; "
              f"{len(args.seeds)} seed(s) {args.seeds}, {args.rows:,} rows per dataset; device {device}; "
              f"{seconds:.0f} s on {platform.machine()}.",
              f"Models on Dataset-I: {', '.join(models)}; oracles on Dataset-A/-B: {', '.join(oracles)}; "
              f"pipeline {PIPELINE.relative_to(ROOT)}" + (f", epochs {args.epochs}" if args.epochs else "")
              + (f", each model trained {args.train_repeats} times per seed (mean MSE)"
                 if args.train_repeats > 1 else "")
              + "; "
              f"generator {'defaults' if not gen else 'defaults but ' + json.dumps(gen)}."]
    lines = render(summary, models, header)
    tag = f"_{args.tag}" if args.tag else ""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"fdn_synthetic{tag}"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    record = {"command": command.rstrip(), "commit": commit, "dirty": dirty, "seeds": args.seeds, "rows": args.rows,
              "models": models, "oracles": oracles, "epochs": args.epochs,
              "train_repeats": args.train_repeats, "device": device, "seconds": seconds,
              "pipeline": _pipeline(), "generator": generator_config(gen),
              "model_params": {m: params_of(m, base) for m in models + oracles},
              "runs": {str(s): {"/".join(k): v for k, v in r.items()} for s, r in runs.items()},
              **{k: v for k, v in summary.items() if k != "per_seed"},
              "per_seed": {str(s): v for s, v in summary["per_seed"].items()}}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
