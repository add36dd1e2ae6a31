"""Benchmark harness: grid -> runs -> results.csv / results.md / plots; paired bootstrap; resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from recsys_transfer.bench.report import write_report
from recsys_transfer.bench.runner import expand, run_grid
from recsys_transfer.bench.spec import load_grid
from recsys_transfer.errors import UserError
from recsys_transfer.metrics.bootstrap import paired_bootstrap_auc_diff

ROOT = Path(__file__).resolve().parents[1]


def _grid(tmp: Path, data: Path, modes=("B", "+Ours"), seeds=(0, 1), extra: str = "") -> Path:
    g = tmp / "grid.yaml"
    g.write_text(f"""
name: tiny
base: {ROOT / 'pipelines' / 'synthetic.yaml'}
overrides: [data.path={data}, data.prepare.rows=20000, train.epochs=1, train.progress=false]
datasets: [synthetic20k]
models: [fm]
modes: [{', '.join(modes)}]
dims: [16]
seeds: [{', '.join(str(s) for s in seeds)}]
allow_few_seeds: true
n_boot: 200
{extra}
""")
    return g


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    spec = load_grid(_grid(tmp, tmp / "data"))
    out = tmp / "out"
    res = run_grid(spec, out, log=lambda *_: None)
    write_report(out, spec)
    return spec, out, res


def test_grid_produces_csv_report_plots(tiny_run):
    spec, out, res = tiny_run
    assert len(res["ran"]) == 4 and not res["skipped"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    assert {(r["mode"], r["seed"]) for r in rows} == {("B", "0"), ("B", "1"), ("+Ours", "0"), ("+Ours", "1")}
    for r in rows:
        assert 0.0 < float(r["test_auc"]) < 1 and int(r["params"]) > 0 and r["head_auc"] and r["tail_auc"]
        d = out / "runs" / r["run_id"]
        z = np.load(d / "test_predictions.npz")
        m = json.loads((d / "metrics.json").read_text())
        from recsys_transfer.metrics import auc

        assert auc(z["labels"], z["scores"]) == pytest.approx(m["test"]["label"]["auc"], abs=1e-9)  # same model, same rows
    md = (out / "results.md").read_text()
    assert "Test AUC" in md and "NTG" in md and "95% CI" in md and "fm +Ours" in md
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert any(p.startswith("auc_") for p in pngs) and any(p.startswith("curves_") for p in pngs)


def test_resume_redoes_only_interrupted_run(tiny_run, tmp_path):
    spec, out, _ = tiny_run
    runs = sorted((out / "runs").iterdir())
    victim = runs[1]
    mtimes = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in runs}
    (victim / "metrics.json").unlink()  # a run killed mid-training has no metrics.json
    (out / "results.csv").unlink()
    res = run_grid(spec, out, log=lambda *_: None)
    assert res["ran"] == [victim.name]
    assert len(res["skipped"]) == 3
    for d in runs:
        same = (d / "metrics.json").stat().st_mtime_ns == mtimes[d.name]
        assert same == (d != victim)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["run_id"] for r in rows) == sorted(mtimes)


def test_run_ids_are_stable_and_distinct(tmp_path):
    spec = load_grid(_grid(tmp_path, tmp_path / "data", modes=("B", "+T"), seeds=(0, 1, 2),
                           extra="lambdas: [0.001, 0.01]\nlam_main: 0.01"))
    a = [r.run_id for r in expand(spec)]
    b = [r.run_id for r in expand(spec)]
    assert a == b and len(set(a)) == len(a)
    # B x 3 seeds, +T at the base lambda (0.01) and 0.001 (0.01 deduplicated) x 3 seeds
    assert len(a) == 3 + 6


def test_grid_rejects_unknown_keys(tmp_path):
    g = _grid(tmp_path, tmp_path / "data", extra="sedes: [1]")
    with pytest.raises(UserError, match=r"grid.yaml.*unknown key.*sedes"):
        load_grid(g)
    g.write_text(g.read_text().replace("sedes: [1]", "datasets: [{name: x, overide: []}]").replace(
        "datasets: [synthetic20k]\n", ""))
    with pytest.raises(UserError, match=r"grid.yaml.datasets.*overide"):
        load_grid(g)
    few = tmp_path / "few.yaml"
    few.write_text(_grid(tmp_path, tmp_path / "data").read_text().replace("allow_few_seeds: true", ""))
    with pytest.raises(UserError, match="at least 3"):
        load_grid(few)


def _binormal(rng, n, d_a, d_b, rho=0.5):
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = d_a * y + np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=n)
    b = d_b * y + np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.normal(size=n)
    return y, a, b


def test_bootstrap_ci_covers_true_difference():
    d_a, d_b = 1.0, 0.8
    true = norm.cdf(d_a / np.sqrt(2)) - norm.cdf(d_b / np.sqrt(2))  # binormal AUC, unit noise per class
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(20):
        y, a, b = _binormal(rng, 3000, d_a, d_b)
        diff, lo, hi = paired_bootstrap_auc_diff(y, a, b, n_boot=500, seed=rep)
        assert lo <= diff <= hi
        hits += lo <= true <= hi
    assert hits >= 16


def test_bootstrap_ci_narrower_for_larger_n():
    # (it used to assert a wall-clock bound too: timing belongs in benchmarks, and it failed on a loaded machine)
    rng = np.random.default_rng(2)
    widths = []
    for n in (1000, 10000):
        y, a, b = _binormal(rng, n, 1.0, 0.8)
        _, lo, hi = paired_bootstrap_auc_diff(y, a, b, n_boot=2000 if n == 10000 else 500, seed=0)
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]


def test_cli_parser_and_dry_run(tmp_path, capsys):
    import argparse

    from recsys_transfer.bench.cli import add_bench_parser, cmd_bench

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    g = _grid(tmp_path, tmp_path / "data")
    args = parser.parse_args(["bench", "--config", str(g), "--output", str(tmp_path / "o"), "--dry-run",
                              "--set", "train.epochs=2"])
    assert cmd_bench(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("todo ") for line in lines)


def test_methods_are_columns_with_their_own_overrides(tmp_path):
    extra = ('methods:\n  - {name: "+Ours paper", mode: +Ours, overrides: [transfer.barrier=paper]}\n'
             '  - {name: "+Ours r0.3", mode: +Ours, overrides: [transfer.max_ratio=0.3]}')
    spec = load_grid(_grid(tmp_path, tmp_path / "data", modes=("B", "+Ours"), seeds=(0, 1, 2), extra=extra))
    runs = expand(spec)
    by = {}
    for r in runs:
        by.setdefault(r.mode, []).append(r)
    assert sorted(by) == sorted(["B", "+Ours", "+Ours paper", "+Ours r0.3"]) and all(len(v) == 3 for v in by.values())
    assert {(r.cfg.transfer.mode, r.cfg.transfer.barrier, r.cfg.transfer.max_ratio) for r in by["+Ours paper"]} == \
        {("+Ours", "paper", 0.1)}
    assert {(r.cfg.transfer.barrier, r.cfg.transfer.max_ratio) for r in by["+Ours r0.3"]} == {("applied", 0.3)}
    assert len({r.run_id for r in runs}) == len(runs) == 12
    bad = _grid(tmp_path, tmp_path / "data", extra='methods:\n  - {name: "+Ours", mode: +Ours}')
    with pytest.raises(UserError, match="name of its own"):
        load_grid(bad)
    bad.write_text(bad.read_text().replace('{name: "+Ours", mode: +Ours}', '{name: x, mode: "+Best"}'))
    with pytest.raises(UserError, match="unknown mode"):
        load_grid(bad)


def test_shards_split_the_runs_and_each_trains_only_its_own(tmp_path, monkeypatch):
    import argparse

    import recsys_transfer.train.run as run_module
    from recsys_transfer.bench.cli import add_bench_parser, cmd_bench

    spec = load_grid(_grid(tmp_path, tmp_path / "data", seeds=(0, 1, 2)))
    ids = [r.run_id for r in expand(spec)]
    trained = []

    class Stop(Exception):
        pass

    def first_run_only(cfg, out, overwrite):  # which run a shard starts with; no training
        trained.append(Path(out).name)
        raise Stop

    monkeypatch.setattr(run_module, "run_training", first_run_only)
    for k in range(3):
        with pytest.raises(Stop):
            run_grid(spec, tmp_path / "o", shard=(k, 3), log=lambda *_: None)
    assert trained == ids[:3]  # shard k starts with run k (then k + 3, ...)
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--config", str(_grid(tmp_path, tmp_path / "data")), "--output",
                              str(tmp_path / "o2"), "--shard", "2/2"])
    with pytest.raises(UserError, match="--shard"):
        cmd_bench(args)


def test_multitask_grid_reports_per_task_ntg_against_single_task_runs(adult_dir, tmp_path):
    """A two-task grid on the real Adult data: each model also trains on each task alone; the report's per-task
    NTG equals AUC(single) - AUC(multi) from the runs' own metrics, and the CI pairs the same test rows."""
    import pandas as pd

    g = tmp_path / "grid.yaml"
    g.write_text(f"""
name: adult-mtl
base: {ROOT / 'pipelines' / 'adult-census.yaml'}
overrides: [data.path={tmp_path / 'data'}, "data.prepare.input=[{adult_dir / 'adult.data'}, {adult_dir / 'adult.test'}]",
            data.prepare.schema={ROOT / 'pipelines' / 'datasets' / 'adult-census.yaml'}, train.epochs=1,
            train.progress=false, "model.params.hidden=[16]"]
datasets: [adult]
models: [deepfm]
modes: [B]
dims: [8]
seeds: [0, 1]
allow_few_seeds: true
single_task: [{{name: income}}, {{name: never_married}}]
n_boot: 100
""")
    spec = load_grid(g)
    runs = expand(spec)
    assert [(r.extra, r.tasks) for r in runs] == [("default", "all")] * 2 + [("single-task", "income")] * 2 + \
        [("single-task", "never_married")] * 2
    out = tmp_path / "out"
    run_grid(spec, out, log=lambda *_: None)
    write_report(out, spec)
    stats = pd.read_csv(out / "task_stats.csv")
    assert sorted(stats["task"]) == ["income", "never_married"] and (stats["seeds"] == 2).all()
    for _, row in stats.iterrows():
        multi = [json.loads((out / "runs" / r.run_id / "metrics.json").read_text())["test"][row["task"]]["auc"]
                 for r in runs if r.tasks == "all"]
        single = [json.loads((out / "runs" / r.run_id / "metrics.json").read_text())["test"][row["task"]]["auc"]
                  for r in runs if r.tasks == row["task"]]
        assert row["ntg_mean"] == pytest.approx(np.mean(single) - np.mean(multi), abs=1e-12)
        assert row["ci_lo"] <= -row["ntg_mean"] <= row["ci_hi"] and row["test_rows"] == 4_915
    md = (out / "results.md").read_text()
    assert "negative-transfer gap vs single-task" in md and "| adult | default | deepfm | 8 | B | income |" in md


def test_a_model_that_cannot_train_one_task_takes_another_models_references(tmp_path):
    g = tmp_path / "g.yaml"
    body = f"""
name: conv
base: {ROOT / 'pipelines' / 'synthetic-conversion.yaml'}
datasets: [syn]
models: [{{name: esmm, params: {{}}, reference: REF}}, {{name: shared_bottom, params: {{}}}}]
modes: [B]
dims: [8]
seeds: [0]
allow_few_seeds: true
single_task: [{{name: label}}, {{name: purchase}}]
"""
    g.write_text(body.replace("REF", "shared_bottom"))
    runs = expand(load_grid(g))
    assert sorted((r.model, r.tasks) for r in runs) == [("esmm", "all"), ("shared_bottom", "all"),
                                                        ("shared_bottom", "label"), ("shared_bottom", "purchase")]
    g.write_text(body.replace("REF", "mmoe"))
    with pytest.raises(UserError, match="takes its reference from 'mmoe'"):
        load_grid(g)


def test_run_ids_survive_config_keys_added_later():
    """Ids recorded with the code of 3e02fa3, before data.prepare gained schema / genres / history / conversion /
    variant and the multitask section: a run that uses none of them keeps its id, so a grid resumes its runs."""
    from recsys_transfer.bench.runner import run_id_of
    from recsys_transfer.config import load_config

    recorded = {("synthetic.yaml", ("train.seed=1",)): "x-0d98fcf666",
                ("movielens100k.yaml", ("transfer.mode=+Ours", "train.seed=0")): "x-e8209ebe85",
                ("criteo8k.yaml", ()): "x-262f0a8560",
                # recorded at 0d9ee3f, before the sequence section gained sampler / sampler_power
                ("peterrec-pretrain.yaml", ()): "x-540138c544"}
    for (pipeline, overrides), rid in recorded.items():
        assert run_id_of(load_config(ROOT / "pipelines" / pipeline, list(overrides)), "x") == rid
    moved = load_config(ROOT / "pipelines" / "movielens100k.yaml",
                        ["transfer.mode=+Ours", "train.seed=0", "data.prepare.history=3"])
    assert run_id_of(moved, "x") != "x-e8209ebe85"
    popular = load_config(ROOT / "pipelines" / "peterrec-pretrain.yaml", ["sequence.sampler=popularity"])
    assert run_id_of(popular, "x") != "x-540138c544"
