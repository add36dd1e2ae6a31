"""Plots (matplotlib, Agg) into ``OUT/plots/``:

* ``auc_<dataset>_<extra>.png`` — test AUC per mode per (model, dim) cell, mean with std error bars;
* ``lambda_<dataset>_<extra>_<model>_d<dim>.png`` — Figure 2 analog: final transfer loss vs test AUC for +T at
  each λ, with the +Ours point and the B level;
* ``curves_<dataset>_<extra>_<model>_d<dim>.png`` — Figure 4 analog: valid AUC and log loss per epoch (from
  ``epochs.jsonl``, mean over seeds) for B vs +Ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_transfer.bench.spec import modes_in


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(text) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text).replace("+", "p"))


def _epochs(out: Path, run_id: str, task: str) -> pd.DataFrame | None:
    """A run's per-epoch validation AUC and log loss of ``task`` (columns ``valid_auc``, ``valid_logloss``)."""
    f = out / "runs" / run_id / "epochs.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    return pd.DataFrame({"epoch": [r["epoch"] for r in rows],
                         "valid_auc": [r.get(f"valid/{task}/auc") for r in rows],
                         "valid_logloss": [r.get(f"valid/{task}/logloss") for r in rows]}).astype(float)


def make_plots(out: Path, df: pd.DataFrame, main: pd.DataFrame, lam_main) -> list[Path]:
    plt = _plt()
    pdir = out / "plots"
    pdir.mkdir(exist_ok=True)
    made = []
    for (ds, ex), g in main.groupby(["dataset", "extra"], sort=False):
        modes = modes_in(g)
        cells = list(dict.fromkeys(zip(g["model"], g["dim"])))
        fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(cells) * len(modes) / 2), 3.8))
        width = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            means, stds = [], []
            for m, d in cells:
                v = g[(g["model"] == m) & (g["dim"] == d) & (g["mode"] == mode)]["test_auc"].astype(float)
                means.append(v.mean() if len(v) else np.nan)
                stds.append(v.std(ddof=1) if len(v) > 1 else 0.0)
            x = np.arange(len(cells)) + (k - (len(modes) - 1) / 2) * width
            ax.errorbar(x, means, yerr=stds, fmt="o", capsize=3, label=mode)
        ax.set_xticks(np.arange(len(cells)), [f"{m}\nd={d}" for m, d in cells])
        ax.set_ylabel("test AUC")
        ax.set_title(f"{ds} / {ex}: test AUC (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=8)
        made.append(_save(fig, pdir / f"auc_{_safe(ds)}_{_safe(ex)}.png"))
    for key, g in df.groupby(["dataset", "extra", "model", "dim"], sort=False):
        t = g[g["mode"] == "+T"]
        if len(t):
            fig, ax = plt.subplots(figsize=(5, 3.6))
            agg = t.groupby("lam").agg(loss=("transfer_loss", "mean"), auc=("test_auc", "mean"),
                                       sd=("test_auc", "std")).reset_index().sort_values("lam")
            ax.errorbar(agg["loss"], agg["auc"], yerr=agg["sd"].fillna(0), fmt="o-", capsize=3, label="+T (λ grid)")
            for _, r in agg.iterrows():
                ax.annotate(f"λ={r['lam']:g}", (r["loss"], r["auc"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            o = g[g["mode"] == "+Ours"]
            if len(o):
                ax.errorbar([o["transfer_loss"].mean()], [o["test_auc"].mean()],
                            yerr=[o["test_auc"].std() if len(o) > 1 else 0], fmt="*", ms=12, capsize=3, label="+Ours")
            b = g[g["mode"] == "B"]
            if len(b):
                ax.axhline(b["test_auc"].mean(), color="gray", ls="--", label="B")
            ax.set_xlabel("final transfer loss (mean over transferred tables)")
            ax.set_ylabel("test AUC")
            ax.set_title(" / ".join(str(k) for k in key), fontsize=9)
            ax.legend(fontsize=8)
            made.append(_save(fig, pdir / f"lambda_{'_'.join(_safe(k) for k in key)}.png"))
    for key, g in main.groupby(["dataset", "extra", "model", "dim"], sort=False):
        modes = [m for m in ("B", "+Ours") if m in set(g["mode"])] or list(dict.fromkeys(g["mode"]))[:2]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        for mode in modes:
            sel = g[g["mode"] == mode]
            frames = [e for e in (_epochs(out, r, t) for r, t in zip(sel["run_id"], sel["task"])) if e is not None]
            if not frames:
                continue
            e = pd.concat(frames).groupby("epoch")[["valid_auc", "valid_logloss"]].mean()
            axes[0].plot(e.index, e["valid_auc"], "o-", label=mode)
            axes[1].plot(e.index, e["valid_logloss"], "o-", label=mode)
        axes[0].set_ylabel("valid AUC")
        axes[1].set_ylabel("valid log loss")
        for a in axes:
            a.set_xlabel("epoch")
            a.legend(fontsize=8)
        fig.suptitle(" / ".join(str(k) for k in key) + " (mean over seeds)", fontsize=9)
        made.append(_save(fig, pdir / f"curves_{'_'.join(_safe(k) for k in key)}.png"))
    return made
