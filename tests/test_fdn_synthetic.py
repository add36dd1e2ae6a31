"""FDN's synthetic benchmark generator (recsys_transfer/data/fdn_synthetic.py): the rows against a float64 reference
written from the Appendix's equations, determinism, the label statistics the construction implies, and the prepared
dataset's meta."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.cli import main
from recsys_transfer.config import PrepareConfig
from recsys_transfer.data.fdn_synthetic import (
    BLOCK_ROWS,
    FdnSyntheticConfig,
    generate_block,
    generate_chunks,
    parameters,
)
from recsys_transfer.data.prepare import prepare
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError

SMALL = FdnSyntheticConfig(rows=40, seed=7, dim=6, num_sines=3)


def _rows(cfg: FdnSyntheticConfig) -> pl.DataFrame:
    return pl.concat(list(generate_chunks(cfg)))


def _reference(cfg: FdnSyntheticConfig, n_rows: int) -> dict[str, list]:
    """The first ``n_rows`` rows from the Appendix, scalar by scalar in float64 (``math``), drawing the random numbers
    in the order the module docstring documents (the generator's contract)."""
    d, m = cfg.dim, cfg.num_sines
    rng = np.random.default_rng([cfg.seed, 0])
    u = []
    for _ in range(3):  # Eq. 5: u_1, u_2, u_s, unit vectors
        g = rng.standard_normal(d)
        norm = math.sqrt(sum(float(v) ** 2 for v in g))
        u.append([float(v) / norm for v in g])
    u1, u2, us = u
    alpha = rng.normal(0.0, cfg.alpha_std, m).tolist()
    beta = rng.normal(0.0, cfg.beta_std, m).tolist()
    delta = rng.uniform(*cfg.delta_range, d).tolist()
    if cfg.phase == "steepest":
        gamma = [-math.pi / 4 + math.pi * int(b) for b in rng.integers(0, 2, d)]
    else:
        gamma = rng.uniform(0.0, 2 * math.pi, d).tolist()
    w1, w2, ws = ([c * v for v in vec] for c, vec in ((cfg.c1, u1), (cfg.c2, u2), (cfg.cs, us)))  # Eq. 6

    n = min(BLOCK_ROWS, cfg.rows)

    def lat(q):
        return np.random.default_rng([cfg.seed, 1, 0, q])

    x1 = lat(0).normal(-1.0, cfg.x_task_std, (n, d))  # step 3
    x2 = lat(1).normal(1.0, cfg.x_task_std, (n, d))
    xs = lat(2).normal(0.0, cfg.x_shared_std, (n, d))
    eps1 = lat(3).normal(0.0, cfg.label_noise_std, n)
    eps2 = lat(4).normal(0.0, cfg.label_noise_std, n)
    k = "ABI".index(cfg.variant)
    eps = np.random.default_rng([cfg.seed, 2, k, 0]).normal(0.0, cfg.feature_noise_std, (n, d))

    def dot(w, x) -> float:
        return sum(wi * float(xi) for wi, xi in zip(w, x))

    def sines(t: float) -> float:
        return sum(math.sin(alpha[i] * t + beta[i]) for i in range(m))

    out: dict[str, list] = {"X": [], "y1": [], "y2": [], "s": []}
    for r in range(n_rows):
        t_s = dot(ws, xs[r])
        s = t_s + sines(t_s)
        t1, t2 = dot(w1, x1[r]), dot(w2, x2[r])
        out["s"].append(s)
        out["y1"].append(s + t1 + sines(t1) + float(eps1[r]))  # Eq. 7
        out["y2"].append(s + t2 + sines(t2) + float(eps2[r]))  # Eq. 8
        row = []
        for i in range(d):
            z = us[i] * float(xs[r, i])
            if cfg.variant in "AI":
                z += u1[i] * float(x1[r, i])
            if cfg.variant in "BI":
                z += u2[i] * float(x2[r, i])
            a = delta[i] * z + gamma[i]
            row.append(math.sin(a) + math.cos(a) + float(eps[r, i]))  # Eq. 9 / 10 / 11
        out["X"].append(row)
    return out


@pytest.mark.parametrize("variant", ["A", "B", "I"])
@pytest.mark.parametrize("dim, sines, phase", [(6, 3, "uniform"), (100, 10, "steepest")])
def test_rows_match_a_float64_reference_of_the_equations(variant, dim, sines, phase):
    cfg = replace(SMALL, variant=variant, dim=dim, num_sines=sines, phase=phase)
    ref = _reference(cfg, 5)
    p = parameters(cfg)
    block = generate_block(cfg, p, 0)
    np.testing.assert_allclose(block["X"][:5], np.array(ref["X"]), rtol=0, atol=1e-12)
    for y in cfg.labels:
        np.testing.assert_allclose(block[y][:5], ref[y], rtol=1e-12, atol=1e-12)
    assert set(block) == {"X", *cfg.labels}
    for vec in (p.u1, p.u2, p.us):  # Eq. 5
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-12)
    rows = _rows(cfg)  # the stored frame: float32 of the same values
    assert rows.columns == [*cfg.dense_names, *cfg.labels, "__row"]
    with_const = _rows(replace(cfg, constant_field=True))
    assert with_const.columns[0] == "const" and with_const["const"].unique().to_list() == [0]
    assert with_const.drop("const").equals(rows)
    stored = rows.select(cfg.dense_names).to_numpy()
    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored[:5], np.array(ref["X"]), rtol=1e-6, atol=1e-6)
    for y in cfg.labels:
        assert rows[y].dtype == pl.Float32
        np.testing.assert_allclose(rows[y].to_numpy()[:5], ref[y], rtol=1e-6, atol=1e-6)


def test_same_seed_same_rows_any_chunking_other_seed_other_rows():
    a = _rows(SMALL)
    assert a.equals(_rows(SMALL))
    assert a.equals(_rows(replace(SMALL, chunk_rows=7)))  # the frame size does not change the rows
    assert a["__row"].to_list() == list(range(40))
    other = _rows(replace(SMALL, seed=8))
    assert not np.allclose(a["y1"].to_numpy(), other["y1"].to_numpy())
    assert len(_rows(replace(SMALL, rows=0))) == 0


def test_rows_span_blocks_and_prefixes_agree():
    """A longer stream starts with the shorter one's rows (fixed blocks, one stream per latent)."""
    cfg = FdnSyntheticConfig(rows=BLOCK_ROWS + 5, seed=3, dim=2, num_sines=1, chunk_rows=30_000)
    long = _rows(cfg)
    assert len(long) == BLOCK_ROWS + 5
    short = _rows(replace(cfg, rows=100))
    assert long.head(100).equals(short)


def test_variants_share_the_draws():
    """A, B and I come from one draw: A's y1 and B's y2 are I's, row for row; the features differ (Eq. 9-11)."""
    cfg = replace(SMALL, rows=300)
    a, b, i = (_rows(replace(cfg, variant=v)) for v in "ABI")
    assert a["y1"].equals(i["y1"]) and b["y2"].equals(i["y2"])
    assert "y2" not in a.columns and "y1" not in b.columns
    xa, xi = a.select(cfg.dense_names).to_numpy(), i.select(cfg.dense_names).to_numpy()
    assert not np.allclose(xa, xi)
    # with no feature noise and a constant task-B latent (variance 0), Dataset-I's features are Dataset-A's with
    # u_2^i x_2^i = u_2^i added inside F_i: Eq. 11 vs Eq. 9
    quiet = replace(cfg, x_task_std=0.0, feature_noise_std=0.0)
    p = parameters(quiet)
    za = generate_block(replace(quiet, variant="A"), p, 0)["X"]
    zi = generate_block(replace(quiet, variant="I"), p, 0)["X"]
    assert not np.allclose(za, zi)
    xs = np.random.default_rng([quiet.seed, 1, 0, 2]).normal(0.0, 1.0, (300, cfg.dim))
    base = xs * p.us - p.u1  # x_1 = -1 exactly

    def f(z):
        return np.sin(z * p.delta + p.gamma) + np.cos(z * p.delta + p.gamma)

    np.testing.assert_allclose(za, f(base), atol=1e-12)
    np.testing.assert_allclose(zi, f(base + p.u2), atol=1e-12)


def test_label_statistics_follow_from_the_shared_component():
    """cov(y1, y2) = Var(s): the task components and noises are independent of s and of each other; the same holds
    for A's y1 against B's y2 (the same rows). Without the shared component (c_s = 0) the tasks are uncorrelated."""
    cfg = FdnSyntheticConfig(rows=20_000, seed=11, dim=20, num_sines=4)
    p = parameters(cfg)
    i = generate_block(cfg, p, 0)
    y1, y2 = i["y1"], i["y2"]
    xs = np.random.default_rng([cfg.seed, 1, 0, 2]).normal(0.0, 1.0, (cfg.rows, cfg.dim))
    ts = xs @ p.ws
    s = ts + np.sin(ts[:, None] * p.alpha + p.beta).sum(axis=1)
    assert np.cov(y1, y2)[0, 1] == pytest.approx(s.var(ddof=1), rel=0.05)
    corr = np.corrcoef(y1, y2)[0, 1]
    assert corr == pytest.approx(s.var() / math.sqrt(y1.var() * y2.var()), abs=0.02)
    assert corr > 0.9  # the shared component dominates at the default c_s = c_1 = c_2 (x_s has 10x the std)
    a = generate_block(replace(cfg, variant="A"), p, 0)["y1"]
    b = generate_block(replace(cfg, variant="B"), p, 0)["y2"]
    assert np.corrcoef(a, b)[0, 1] == pytest.approx(corr, abs=1e-12)
    # without the sines (m = 0): y_1 - y_2 = w_1^T x_1 - w_2^T x_2 + eps_1 - eps_2, whose mean is
    # -c_1 sum(u_1) - c_2 sum(u_2) and variance (c_1^2 + c_2^2) x_task_std^2 + 2 label_noise_std^2 (s cancels)
    linear = replace(cfg, num_sines=0, c1=2.0, c2=0.5, x_task_std=0.3, label_noise_std=0.1)
    q, k = parameters(linear), generate_block(linear, parameters(linear), 0)
    diff = k["y1"] - k["y2"]
    assert diff.mean() == pytest.approx(-2.0 * q.u1.sum() - 0.5 * q.u2.sum(), abs=0.02)
    assert diff.var() == pytest.approx((4.0 + 0.25) * 0.09 + 2 * 0.01, rel=0.05)
    no_shared = replace(cfg, cs=0.0)
    j = generate_block(no_shared, parameters(no_shared), 0)
    assert abs(np.corrcoef(j["y1"], j["y2"])[0, 1]) < 0.05


def test_config_is_validated():
    with pytest.raises(UserError, match="variant must be one of"):
        FdnSyntheticConfig(variant="C")
    with pytest.raises(UserError, match="x_task_std must be >= 0"):
        FdnSyntheticConfig(x_task_std=-1.0)
    with pytest.raises(UserError, match="phase must be one of"):
        FdnSyntheticConfig(phase="random")
    with pytest.raises(UserError, match="delta_range"):
        FdnSyntheticConfig(delta_range=(2.0, 1.0))
    assert PrepareConfig(dataset="fdn-synthetic").variant == "I"
    with pytest.raises(ValueError, match="variant must be one of"):
        PrepareConfig(dataset="fdn-synthetic", variant="X")
    with pytest.raises(ValueError, match="variant: an fdn-synthetic option"):
        PrepareConfig(dataset="synthetic", variant="A")


def test_prepared_meta_and_splits(tmp_path: Path):
    metas = {v: prepare(PrepareConfig(dataset="fdn-synthetic", variant=v, rows=400, seed=5), tmp_path / v,
                        progress=False) for v in "ABI"}
    for v, meta in metas.items():
        labels = {"A": ["y1"], "B": ["y2"], "I": ["y1", "y2"]}[v]
        assert meta.dataset == "fdn-synthetic"
        assert meta.labels == labels
        assert [(t.name, t.label, t.kind) for t in meta.tasks] == [(y, y, "regression") for y in labels]
        assert meta.dense == list(FdnSyntheticConfig().dense_names) and len(meta.dense) == 100
        assert meta.sparse_names == []  # continuous features only (Eq. 9-11)
        assert meta.total_rows == meta.input_rows == 400 and meta.skipped_rows == 0
        assert meta.source["config"]["variant"] == v and meta.source["config"]["seed"] == 5
        assert DatasetMeta.load(tmp_path / v).dataset_id == meta.dataset_id
    assert metas["A"].split_rows == metas["B"].split_rows == metas["I"].split_rows  # the same split of the same rows
    assert len({m.dataset_id for m in metas.values()}) == 3
    test = {v: pl.concat([pl.read_parquet(tmp_path / v / f) for f in metas[v].split_files["test"]]) for v in "ABI"}
    assert test["A"]["y1"].equals(test["I"]["y1"]) and test["B"]["y2"].equals(test["I"]["y2"])
    assert test["I"].schema["x_000"] == pl.Float32 and test["I"].schema["y2"] == pl.Float32
    with pytest.raises(UserError, match="takes no input"):
        prepare(PrepareConfig(dataset="fdn-synthetic", input=("x",)), tmp_path / "bad", progress=False)


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "b"
    assert main(["prepare", "--dataset", "fdn-synthetic", "--variant", "B", "--rows", "200", "--seed", "3",
                 "--output", str(out), "--no-progress"]) == 0
    meta = DatasetMeta.load(out)
    assert meta.labels == ["y2"] and meta.total_rows == 200 and meta.source["config"]["seed"] == 3
    assert "fdn-synthetic" in capsys.readouterr().out
    assert main(["prepare", "--dataset", "synthetic", "--variant", "A", "--rows", "100", "--output",
                 str(tmp_path / "s"), "--no-progress"]) == 2


def test_steepest_phases_keep_the_features_monotone_in_their_latent():
    """phase 'steepest': gamma_i in {-pi/4, 3pi/4}, so F_i(z) = +-sqrt(2) sin(delta_i z); at the defaults (d = 100,
    delta_i in [1, 3]) the argument of almost every feature of Dataset-I stays in (-pi/2, pi/2), where F_i is monotone
    (the module docstring's claim)."""
    cfg = FdnSyntheticConfig(rows=2000, seed=4)
    p = parameters(cfg)
    assert set(np.round(p.gamma, 12)) <= {round(-math.pi / 4, 12), round(3 * math.pi / 4, 12)}
    z = np.linspace(-0.5, 0.5, 11)[:, None]
    np.testing.assert_allclose(np.sin(z * p.delta + p.gamma) + np.cos(z * p.delta + p.gamma),
                               np.sign(np.cos(p.gamma + math.pi / 4)) * math.sqrt(2) * np.sin(z * p.delta), atol=1e-12)
    lat = [np.random.default_rng([cfg.seed, 1, 0, q]).normal(mu, sd, (2000, cfg.dim))
           for q, mu, sd in ((0, -1.0, 0.1), (1, 1.0, 0.1), (2, 0.0, 1.0))]
    arg = (lat[0] * p.u1 + lat[1] * p.u2 + lat[2] * p.us) * p.delta
    assert np.mean(np.abs(arg) < math.pi / 2) > 0.99
    uniform = parameters(replace(cfg, phase="uniform"))
    assert not np.allclose(uniform.gamma % (math.pi / 2), math.pi / 4 % (math.pi / 2))
