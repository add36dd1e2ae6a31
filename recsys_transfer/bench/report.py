"""``OUT/results.md`` and ``OUT/plots/`` from ``OUT/results.csv`` and the runs' files.

Tables follow the paper's layout (Tables 6-8): one block per (dataset, extra); rows = model size (embedding dim
and #P), columns = model x mode, cells = mean ± std of test AUC over seeds. Then head/tail AUC per cell, and per
method vs B: the negative-transfer gap NTG = AUC(B) - AUC(method) (positive = the method hurt), mean ± std over
seeds paired by seed, and a paired bootstrap 95% CI of AUC(method) - AUC(B) on the same test rows (rows resampled
once per replicate and shared by every seed, so it measures test-set sampling noise of the seed-averaged
difference), plus how many seeds' own CIs lie entirely above / below 0. A multi-task grid adds per-task test AUC
and the negative-transfer gap of each task against the same model trained on that task alone
(:func:`task_stats`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_transfer.bench.plots import make_plots
from recsys_transfer.bench.runner import ALL_TASKS
from recsys_transfer.bench.spec import GridSpec, modes_in
from recsys_transfer.metrics.bootstrap import paired_bootstrap_auc_diff, paired_bootstrap_auc_diff_multi

def _fmt(mean: float, std: float, scale: float = 100.0) -> str:
    if mean is None or not np.isfinite(mean):
        return "–"
    return f"{mean * scale:.2f} ± {std * scale:.2f}" if np.isfinite(std) else f"{mean * scale:.2f}"


def _kparams(p) -> str:
    return f"{p / 1000:.1f}k" if p and np.isfinite(p) else "?"


def main_rows(df: pd.DataFrame, lam_main: float | None) -> pd.DataFrame:
    """Rows of the main tables: every mode, with +T restricted to lam_main (the sweep is reported apart)."""
    if lam_main is None or "+T" not in set(df["mode"]):
        return df
    keep = (df["mode"] != "+T") | np.isclose(df["lam"].astype(float), lam_main)
    return df[keep]


def _predictions(out: Path, run_id: str) -> tuple[np.ndarray, np.ndarray] | None:
    f = out / "runs" / run_id / "test_predictions.npz"
    if not f.is_file():
        return None
    z = np.load(f)
    return z["labels"], z["scores"]


def paired_stats(out: Path, df: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """One row per (dataset, extra, model, dim, method != B): NTG and bootstrap CIs vs B, paired by seed."""
    keys = ["dataset", "extra", "model", "dim"]
    rows = []
    for key, g in df.groupby(keys, sort=False):
        base = g[g["mode"] == "B"].set_index("seed")
        for mode in [m for m in modes_in(g) if m != "B"]:
            meth = g[g["mode"] == mode].set_index("seed")
            seeds = sorted(set(base.index) & set(meth.index))
            if not seeds:
                continue
            ntg = np.array([base.loc[s, "test_auc"] - meth.loc[s, "test_auc"] for s in seeds])
            ys, pa, pb, above, below = None, [], [], 0, 0
            for s in seeds:
                a = _predictions(out, meth.loc[s, "run_id"])
                b = _predictions(out, base.loc[s, "run_id"])
                if a is None or b is None or len(a[0]) != len(b[0]) or not np.array_equal(a[0], b[0]):
                    pa = None
                    break
                ys = a[0]
                pa.append(a[1])
                pb.append(b[1])
                _, lo, hi = paired_bootstrap_auc_diff(ys, a[1], b[1], n_boot=n_boot, seed=int(s))
                above += lo > 0
                below += hi < 0
            row = dict(zip(keys, key), method=mode, seeds=len(seeds), ntg_mean=float(ntg.mean()),
                       ntg_std=float(ntg.std(ddof=1)) if len(ntg) > 1 else float("nan"))
            if pa is not None:
                d, lo, hi = paired_bootstrap_auc_diff_multi(ys, np.stack(pa), np.stack(pb), n_boot=n_boot, seed=0)
                row.update(diff=d, ci_lo=lo, ci_hi=hi, seeds_ci_above0=int(above), seeds_ci_below0=int(below),
                           test_rows=int(len(ys)))
            rows.append(row)
    return pd.DataFrame(rows)


def _task_predictions(out: Path, run_id: str, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    f = out / "runs" / run_id / "test_predictions.npz"
    if not f.is_file():
        return None
    z = np.load(f)
    if f"labels/{task}" not in z.files:
        return None
    return z[f"labels/{task}"], z[f"scores/{task}"]


def task_stats(out: Path, df: pd.DataFrame, n_boot: int, references: dict[str, str] | None = None) -> pd.DataFrame:
    """Multi-task grids: one row per (dataset, extra, model, dim, mode, task) of the multi-task runs with that
    task's single-task reference (same dataset, model, dim; paired by seed): test AUC of both, the per-task
    negative-transfer gap NTG = AUC(single-task) - AUC(multi-task) (thesis Eq. 3.4; positive = multi-task
    training hurt the task), and a paired row-bootstrap 95% CI of Δ = AUC(multi) - AUC(single) over the
    seed-averaged difference, on the same test rows."""
    if "tasks" not in df.columns:
        return pd.DataFrame()
    single = df[df["tasks"] != ALL_TASKS]
    multi = df[df["tasks"] == ALL_TASKS]
    rows = []
    for key, g in multi.groupby(["dataset", "extra", "model", "dim", "mode"], sort=False):
        for task in dict.fromkeys(single["tasks"]):
            col = f"test/{task}/auc"
            ref_model = (references or {}).get(key[2]) or key[2]
            ref = single[(single["dataset"] == key[0]) & (single["model"] == ref_model) & (single["dim"] == key[3])
                         & (single["tasks"] == task)].set_index("seed")
            if col not in g.columns or not len(ref):
                continue
            mine = g.set_index("seed")
            seeds = sorted(set(ref.index) & set(mine.index))
            if not seeds:
                continue
            a_multi = np.array([mine.loc[s, col] for s in seeds], dtype=float)
            a_single = np.array([ref.loc[s, col] for s in seeds], dtype=float)
            ntg = a_single - a_multi
            sd = (lambda x: float(x.std(ddof=1)) if len(x) > 1 else float("nan"))
            row = dict(dataset=key[0], extra=key[1], model=key[2], dim=key[3], mode=key[4], task=task,
                       reference=ref_model, seeds=len(seeds), auc_multi=float(a_multi.mean()), auc_multi_std=sd(a_multi),
                       auc_single=float(a_single.mean()), auc_single_std=sd(a_single), ntg_mean=float(ntg.mean()),
                       ntg_std=sd(ntg))
            loss = f"test/{task}/logloss"
            if loss in g.columns and loss in ref.columns:
                l_multi = np.array([mine.loc[s, loss] for s in seeds], dtype=float)
                l_single = np.array([ref.loc[s, loss] for s in seeds], dtype=float)
                row.update(logloss_multi=float(l_multi.mean()), logloss_multi_std=sd(l_multi),
                           logloss_single=float(l_single.mean()), logloss_single_std=sd(l_single))
            pairs = [(_task_predictions(out, mine.loc[s, "run_id"], task),
                      _task_predictions(out, ref.loc[s, "run_id"], task)) for s in seeds]
            if all(a is not None and b is not None and np.array_equal(a[0], b[0]) for a, b in pairs):
                ys = pairs[0][0][0]
                if all(np.array_equal(a[0], ys) for a, _ in pairs):
                    d, lo, hi = paired_bootstrap_auc_diff_multi(ys, np.stack([a[1] for a, _ in pairs]),
                                                                np.stack([b[1] for _, b in pairs]), n_boot=n_boot,
                                                                seed=0)
                    row.update(diff=d, ci_lo=lo, ci_hi=hi, test_rows=int(len(ys)))
            rows.append(row)
    return pd.DataFrame(rows)


def _loss(r) -> str:
    if "logloss_multi" not in r or not np.isfinite(r["logloss_multi"]):
        return "–"
    return f"{_fmt(r['logloss_multi'], r['logloss_multi_std'])} / {_fmt(r['logloss_single'], r['logloss_single_std'])}"


def _task_section(stats: pd.DataFrame, n_boot: int) -> list[str]:
    md = ["## Multi-task: per-task test AUC and the negative-transfer gap vs single-task", "",
          "Each multi-task run against the same model trained on that task alone (extra `single-task`; a model "
          "that cannot train one task alone, e.g. ESMM, against the grid's `reference` model, named in the row), "
          "paired by seed. NTG = AUC(single-task) − AUC(multi-task), positive = multi-task training hurt the task (thesis "
          f"Eq. 3.4). Δ = AUC(multi) − AUC(single) averaged over seeds, paired row-bootstrap 95% CI ({n_boot} "
          "resamples). AUC ×100.", "",
          "| dataset | extra | model | dim | mode | task | multi-task AUC | single-task AUC | NTG | 95% CI of Δ | "
          "log loss multi / single (×100) | seeds |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in stats.iterrows():
        ci = (f"[{r['ci_lo'] * 100:+.3f}, {r['ci_hi'] * 100:+.3f}]" if "ci_lo" in r and np.isfinite(r["ci_lo"])
              else "no predictions")
        model = r["model"] if r.get("reference", r["model"]) == r["model"] else f"{r['model']} (vs {r['reference']})"
        md.append(f"| {r['dataset']} | {r['extra']} | {model} | {r['dim']} | {r['mode']} | {r['task']} | "
                  f"{_fmt(r['auc_multi'], r['auc_multi_std'])} | {_fmt(r['auc_single'], r['auc_single_std'])} | "
                  f"{_fmt(r['ntg_mean'], r['ntg_std'])} | {ci} | {_loss(r)} | {int(r['seeds'])} |")
    return md + [""]


def _table(df: pd.DataFrame, value: str, models: list[str], modes: list[str], head2: str = "") -> list[str]:
    cols = [(m, mo) for m in models for mo in modes]
    lines = ["| dim (#P) | " + " | ".join(f"{m} {mo}{head2}" for m, mo in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for dim, g in df.groupby("dim"):
        params = ", ".join(f"{m} {_kparams(g[g['model'] == m]['params'].astype(float).mean())}" for m in models)
        cells = []
        for m, mo in cols:
            v = g[(g["model"] == m) & (g["mode"] == mo)][value].astype(float).dropna()
            cells.append(_fmt(v.mean(), v.std(ddof=1) if len(v) > 1 else float("nan")) if len(v) else "–")
        lines.append(f"| {dim} ({params}) | " + " | ".join(cells) + " |")
    return lines


def write_report(out: str | Path, spec: GridSpec | None = None, command: str = "") -> Path:
    out = Path(out)
    df = pd.read_csv(out / "results.csv")
    n_boot = spec.n_boot if spec else 1000
    lam_main = spec.lam_main if spec and spec.lam_main is not None else None
    if lam_main is None and "+T" in set(df["mode"]) and len(df):
        lam_main = _base_lam(df)
    references = {m.column: m.reference for m in spec.models if m.reference} if spec else {}
    per_task = task_stats(out, df, n_boot, references) if len(df) else pd.DataFrame()
    if "tasks" in df.columns:  # the single-task references have their own section
        df = df[df["tasks"].fillna(ALL_TASKS) == ALL_TASKS]
    main = main_rows(df, lam_main)
    stats = paired_stats(out, main, n_boot) if len(main) else pd.DataFrame()
    md = [f"# Benchmark results{': ' + spec.name if spec else ''}", ""]
    if command:
        md += ["Command:", "", "```", command, "```", ""]
    commits = sorted(set(df["commit"].dropna().astype(str))) if len(df) else []
    md += [f"{len(df)} runs; git commit(s): {', '.join(c[:12] for c in commits) or '?'}; "
           f"+T column uses λ = {lam_main}. AUC ×100, mean ± std over seeds "
           f"(seeds: {sorted(df['seed'].unique().tolist()) if len(df) else []}).", ""]
    for (ds, ex), g in main.groupby(["dataset", "extra"], sort=False):
        models = list(dict.fromkeys(g["model"]))
        modes = modes_in(g)
        md += [f"## {ds} — {ex}", "", "### Test AUC", ""] + _table(g, "test_auc", models, modes) + [""]
        md += ["### Head / tail AUC (transfer field)", ""]
        md += _table(g, "head_auc", models, modes, " head") + [""] + _table(g, "tail_auc", models, modes, " tail")
        md += ["", "### Test log loss (×100)", ""] + _table(g, "test_logloss", models, modes) + [""]
        s = stats[(stats["dataset"] == ds) & (stats["extra"] == ex)] if len(stats) else stats
        if len(s):
            md += ["### Method vs B (paired by seed, same test rows)", "",
                   "NTG = AUC(B) − AUC(method), positive = the method hurt. Δ = AUC(method) − AUC(B) averaged over "
                   f"seeds, with a paired row-bootstrap 95% CI ({n_boot} resamples). 'seeds CI>0 / <0': seeds whose "
                   "own paired CI excludes 0.", "",
                   "| model | dim | method | NTG (×100) | Δ (×100) | 95% CI of Δ (×100) | seeds CI>0 / <0 | test rows |",
                   "|---|---|---|---|---|---|---|---|"]
            for _, r in s.iterrows():
                ci = (f"[{r['ci_lo'] * 100:+.3f}, {r['ci_hi'] * 100:+.3f}]" if "ci_lo" in r and np.isfinite(r["ci_lo"])
                      else "no predictions")
                d = f"{r['diff'] * 100:+.3f}" if "diff" in r and np.isfinite(r["diff"]) else "–"
                ab = (f"{int(r['seeds_ci_above0'])} / {int(r['seeds_ci_below0'])} of {int(r['seeds'])}"
                      if "seeds_ci_above0" in r and np.isfinite(r["seeds_ci_above0"]) else "–")
                rows_n = int(r["test_rows"]) if "test_rows" in r and np.isfinite(r["test_rows"]) else "–"
                md.append(f"| {r['model']} | {r['dim']} | {r['method']} | {_fmt(r['ntg_mean'], r['ntg_std'])} | {d} | "
                          f"{ci} | {ab} | {rows_n} |")
            md.append("")
    if len(per_task):
        md += _task_section(per_task, n_boot)
    sweep = df[df["mode"] == "+T"]
    if len(sweep) and sweep["lam"].nunique() > 1:
        md += ["## λ sweep (+T)", "", "NTG vs B paired by seed (positive = +T hurt); the transfer loss is the value at "
               "the last training step, mean over transferred tables and seeds.", "",
               "| dataset | extra | model | dim | λ | test AUC (×100) | NTG (×100) | final transfer loss |",
               "|---|---|---|---|---|---|---|---|"]
        for key, g in sweep.groupby(["dataset", "extra", "model", "dim", "lam"]):
            a = g["test_auc"].astype(float)
            tl = g["transfer_loss"].astype(float)
            b = df[(df["dataset"] == key[0]) & (df["extra"] == key[1]) & (df["model"] == key[2]) & (df["dim"] == key[3])
                   & (df["mode"] == "B")].set_index("seed")["test_auc"]
            ntg = np.array([b[s] - v for s, v in zip(g["seed"], a) if s in b.index])
            ntg_s = _fmt(ntg.mean(), ntg.std(ddof=1) if len(ntg) > 1 else float("nan")) if len(ntg) else "–"
            md.append(f"| {' | '.join(str(k) for k in key)} | {_fmt(a.mean(), a.std(ddof=1) if len(a) > 1 else float('nan'))} "
                      f"| {ntg_s} | {tl.mean():.4g} |")
        md.append("")
    plots = make_plots(out, df, main, lam_main)
    if plots:
        md += ["## Plots", ""] + [f"- `{p.relative_to(out)}`" for p in plots] + [""]
    path = out / "results.md"
    path.write_text("\n".join(md))
    if len(stats):
        stats.to_csv(out / "paired_stats.csv", index=False)
    if len(per_task):
        per_task.to_csv(out / "task_stats.csv", index=False)
    return path


def _base_lam(df: pd.DataFrame) -> float:
    """The λ the base config gives +T: the one of the +T runs without a transfer.lam override."""
    t = df[df["mode"] == "+T"]
    plain = t[~t["overrides"].astype(str).str.contains("transfer.lam=")]
    return float((plain if len(plain) else t)["lam"].iloc[0])
