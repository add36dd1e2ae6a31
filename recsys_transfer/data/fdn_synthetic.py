"""The synthetic multi-task benchmark of FDN (Zhou et al., "Feature Decomposition for Reducing Negative Transfer",
Sec. 4 and the Appendix, Eq. 5-11): two regression tasks sharing a component, and three datasets built from the
same draws -- Dataset-A and Dataset-B (one task each, features without the other task's component: the
single-task "oracles") and Dataset-I (both tasks, features mixing all three components).

Generative model (``p = cfg``; every draw from ``np.random.default_rng``, see "Determinism")
------------------------------------------------------------------------------------------
Parameters, drawn once per seed from ``default_rng([seed, 0])`` in this order:

* Eq. 5: unit vectors ``u_1, u_2, u_s in R^d`` (``d = p.dim``): each a standard normal vector divided by its L2
  norm (uniform on the sphere; the paper asks only for unit norm -- MMoE's generator, which FDN says inspired it,
  makes its two vectors orthogonal; these are independent, nearly orthogonal in d = 100).
* ``alpha_i ~ N(0, p.alpha_std^2)``, ``beta_i ~ N(0, p.beta_std^2)``, ``i = 1..m`` (``m = p.num_sines``): the sine
  shapes of Eq. 7-8 (the paper: "given" constants; one set shared by ``y_1``, ``y_2`` and ``s``, as it writes).
* ``delta_i ~ U(p.delta_range)``, then ``gamma_i``, ``i = 1..d``: the per-dimension frequency and phase of Eq. 9-11
  (one set shared by the three feature maps, as the paper writes them). ``p.phase = "steepest"``:
  ``gamma_i = -pi/4 + pi b_i`` with ``b_i ~ Bernoulli(1/2)``, so ``F_i(z) = +-sqrt(2) sin(delta_i z)``;
  ``"uniform"``: ``gamma_i ~ U(0, 2 pi)``.
* Eq. 6: ``w_1 = c_1 u_1``, ``w_2 = c_2 u_2``, ``w_s = c_s u_s``.

Rows (step 3-5 of the Appendix, repeated; one draw serves all three datasets, so Dataset-A's ``y1`` is Dataset-I's
``y1`` row for row, and the same split seed puts the same rows in each split of A, B and I):

* step 3: ``x_1^i ~ N(-1, p.x_task_std^2)``, ``x_2^i ~ N(1, p.x_task_std^2)``, ``x_s^i ~ N(0, p.x_shared_std^2)``.
* Eq. 7-8, with ``S(t) = sum_{i=1..m} sin(alpha_i t + beta_i)``::

      s   = w_s^T x_s + S(w_s^T x_s)
      y_1 = s + w_1^T x_1 + S(w_1^T x_1) + eps_1,      eps_1, eps_2 ~ N(0, p.label_noise_std^2) i.i.d.
      y_2 = s + w_2^T x_2 + S(w_2^T x_2) + eps_2

* Eq. 9-11, per dimension ``i = 1..d``, with ``F_i(z) = sin(delta_i z + gamma_i) + cos(delta_i z + gamma_i)`` and
  ``eps ~ N(0, p.feature_noise_std^2)`` i.i.d. per element and per dataset::

      Dataset-A (Eq. 9):  X_1i = F_i(u_1^i x_1^i + u_s^i x_s^i) + eps
      Dataset-B (Eq. 10): X_2i = F_i(u_2^i x_2^i + u_s^i x_s^i) + eps
      Dataset-I (Eq. 11): X_i  = F_i(u_1^i x_1^i + u_2^i x_2^i + u_s^i x_s^i) + eps

Note the features use the unit vectors ``u`` (not ``w``), as Eq. 9-11 write; the labels use ``w``.

What each dataset holds (what "the oracle sees", Sec. 4): Dataset-A: features ``X_1`` (shared + task-A components),
label ``y1``; Dataset-B: ``X_2``, ``y2``; Dataset-I: ``X``, labels ``y1`` and ``y2``. Every label is a
``regression`` task (MSE) of the same name in ``meta.json``, so ``test/y1/mse`` of an oracle on A and of a
multi-task model on I are the same quantity on the same test rows.

Notation and the constants the paper leaves open
------------------------------------------------
``N(mu, v)``: the Appendix writes ``N(-1, 0.1)``, ``N(1, 0.1)``, ``N(0, 1)`` and noises ``N(0, 0.01)``. We read the
second argument as the STANDARD DEVIATION, numpy's ``normal(loc, scale)`` (the numbers read like its arguments;
``N(0, 1)`` is the same either way): ``x_task_std = 0.1``, ``label_noise_std = feature_noise_std = 0.01``. The usual
``N(mu, sigma^2)`` reading is ``--gen x_task_std=0.3162 --gen label_noise_std=0.1 --gen feature_noise_std=0.1``
(``benchmarks/fdn_synthetic.py``). Why this reading and the phases below (DeepFM as oracle on A/B and as the
multi-task model on I, 100k rows, 5 epochs, seeds 0-2: ``benchmarks/results/fdn_synthetic_constants.md``): with the
variance reading and/or uniform phases the oracle explains only about half of the labels' variance (MSE / Var(y)
0.29-0.59), and with uniform phases the multi-task model on Dataset-I even beats the oracle (gap +11 % on both
tasks), so the gap does not measure negative transfer. Two losses cause it: Eq. 9-11 mix the latents of a dimension
(``u_1^i x_1^i + u_s^i x_s^i``), so the sine terms of Eq. 7 cannot be told apart beyond the spread of ``w_1^T x_1``
(std ``c_1 x_task_std``); and a feature whose phase sits near an extremum of ``F_i`` folds (loses the sign of its
latent). At the defaults the oracle's MSE is 7-8 % of Var(y) and the multi-task DeepFM is worse than the oracle on
both tasks, Table 1's premise.

* ``d = 100``, ``m = 10``, ``c_1 = c_2 = c_s = 1``: our choice (unit weights: the three components on one scale; the
  constants play the roles they have in MMoE's generator, Ma et al. 2018, which FDN names as its inspiration; we did
  not have MMoE's values at hand to copy).
* ``alpha_i, beta_i ~ N(0, 1)``: unit-scale sine frequencies and phases, so ``S`` is a visible non-linearity over
  ``w_s^T x_s ~ N(0, c_s^2 x_shared_std^2)``.
* ``delta_i ~ U(1, 3)``, ``phase = "steepest"``: each ``F_i`` is centred on a steepest (monotone) stretch of the wave
  at ``z = 0``; with d = 100 the argument ``z_i`` has a spread of about ``|u_s^i| ~ 1/sqrt(d) = 0.1`` around a shift
  ``-u_1^i`` / ``+u_2^i`` of the same size, so ``|delta_i z_i| < pi/2`` (no fold) for almost every row, and the slope
  ``sqrt(2) delta_i`` keeps the signal well above the feature noise.
* rows: the paper does not say; 100,000 by default (split 0.8 / 0.1 / 0.1 by the prepare options).

Option (framework, not paper): with ``constant_field`` (default off) the prepared data also has one sparse field
``const`` whose value is the same in every row. It carries no information; it is for this framework's CTR models
(lr, fm, deepfm, autoint), which read at least one embedding table (they have no path for a dataset of dense
fields only; the multi-task models in ``models/multitask.py`` and ``single_task`` do). Its embedding enters a model
as a constant input, i.e. one more bias of the first layers.

Features are continuous (Eq. 9-11), so they are stored as ``d`` dense float32 fields ``x_000 .. x_{d-1}``, raw (no
fill or normalization: ``|X_i| <= sqrt(2) + noise``), and the prepared dataset has no sparse field: nothing to embed,
so the paper's "embedding size 32" has no object here (the multi-task models feed the dense features to their
experts directly). Values are computed in float64 and stored as float32.

Determinism. Parameters: ``default_rng([seed, 0])`` (above). Rows come in fixed blocks of ``BLOCK_ROWS``; in block
``b`` (``n`` rows) each latent has its own stream, ``default_rng([seed, 1, b, q])`` with ``q`` = 0 for ``x_1 [n, d]``,
1 ``x_2 [n, d]``, 2 ``x_s [n, d]``, 3 ``eps_1 [n]``, 4 ``eps_2 [n]`` (one ``rng.normal(mean, std, shape)``
each); the feature noise of variant ``k`` (A 0, B 1, I 2) from ``default_rng([seed, 2, k, b])`` as one ``[n, d]``
draw. So the rows do not depend on ``chunk_rows``, the first N rows of a longer run are the N rows of a shorter one
(a quick run is a prefix of the full one), and A, B and I share their latents exactly. Same config -> the same rows
and the same prepared bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_transfer.data.prepared import (ROW_COL, BuildReport, DatasetMeta, Schema, SparseSpec, build_prepared,
                                           rechunked)
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec

DATASET = "fdn-synthetic"
VARIANTS = ("A", "B", "I")
#: the labels each variant holds (Sec. 4: Dataset-A [[task A], ...], Dataset-B [[task B], ...], Dataset-I both)
VARIANT_LABELS = {"A": ("y1",), "B": ("y2",), "I": ("y1", "y2")}
BLOCK_ROWS = 65_536  # generation unit; fixed, so rows do not depend on cfg.chunk_rows
CONST_FIELD = "const"
X1_MEAN, X2_MEAN, XS_MEAN = -1.0, 1.0, 0.0  # Appendix step 3
PHASES = ("steepest", "uniform")


@dataclass(frozen=True)
class FdnSyntheticConfig:
    """The generator of the module docstring; the defaults are the choices documented there."""

    variant: str = "I"
    rows: int = 100_000
    seed: int = 0
    dim: int = 100  # d
    num_sines: int = 10  # m
    c1: float = 1.0
    c2: float = 1.0
    cs: float = 1.0
    x_task_std: float = 0.1  # x_1^i ~ N(-1, .^2), x_2^i ~ N(1, .^2)
    x_shared_std: float = 1.0  # x_s^i ~ N(0, .^2)
    label_noise_std: float = 0.01  # eps_1, eps_2 of Eq. 7-8
    feature_noise_std: float = 0.01  # eps of Eq. 9-11
    alpha_std: float = 1.0
    beta_std: float = 1.0
    delta_range: tuple[float, float] = (1.0, 3.0)
    phase: str = "steepest"  # gamma_i: steepest (-pi/4 + pi Bernoulli(1/2)) | uniform (U(0, 2 pi))
    constant_field: bool = False  # a constant sparse field for the CTR models (module docstring)
    chunk_rows: int = BLOCK_ROWS

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta_range", tuple(float(v) for v in self.delta_range))

        def bad(msg: str) -> None:
            raise UserError(f"fdn-synthetic config: {msg}")

        if self.variant not in VARIANTS:
            bad(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 0:
            bad(f"rows must be an integer >= 0, got {self.rows!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.dim < 1 or self.num_sines < 0 or self.chunk_rows < 1:
            bad(f"dim and chunk_rows must be >= 1 and num_sines >= 0, got {self.dim}, {self.chunk_rows}, "
                f"{self.num_sines}")
        for name in ("x_task_std", "x_shared_std", "label_noise_std", "feature_noise_std", "alpha_std", "beta_std"):
            if not getattr(self, name) >= 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("c1", "c2", "cs"):
            if not math.isfinite(getattr(self, name)):
                bad(f"{name} must be finite, got {getattr(self, name)}")
        if len(self.delta_range) != 2 or not self.delta_range[0] <= self.delta_range[1]:
            bad(f"delta_range must be [low, high] with low <= high, got {self.delta_range}")
        if self.phase not in PHASES:
            bad(f"phase must be one of {PHASES}, got {self.phase!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        return VARIANT_LABELS[self.variant]

    @property
    def dense_names(self) -> tuple[str, ...]:
        width = max(3, len(str(self.dim - 1)))
        return tuple(f"x_{i:0{width}d}" for i in range(self.dim))

    def schema(self) -> Schema:
        return Schema(sparse=(SparseSpec(CONST_FIELD),) if self.constant_field else (), dense=self.dense_names,
                      labels=self.labels, tasks=tuple(TaskSpec(y, kind="regression") for y in self.labels))

    def to_json(self) -> dict:
        d = asdict(self)
        d["delta_range"] = list(self.delta_range)
        return d


@dataclass(frozen=True)
class Parameters:
    """The per-seed constants of the generator (module docstring), float64."""

    u1: np.ndarray  # [d], Eq. 5
    u2: np.ndarray  # [d]
    us: np.ndarray  # [d]
    alpha: np.ndarray  # [m]
    beta: np.ndarray  # [m]
    delta: np.ndarray  # [d]
    gamma: np.ndarray  # [d]
    w1: np.ndarray  # [d], Eq. 6
    w2: np.ndarray  # [d]
    ws: np.ndarray  # [d]


def parameters(cfg: FdnSyntheticConfig) -> Parameters:
    """The seed's constants: Eq. 5 (unit vectors), the sine shapes, Eq. 9-11's delta and gamma, Eq. 6 (weights)."""
    rng = np.random.default_rng([cfg.seed, 0])
    d, m = cfg.dim, cfg.num_sines

    def unit() -> np.ndarray:
        v = rng.standard_normal(d)
        return v / np.linalg.norm(v)  # Eq. 5: ||u||_2 = 1

    u1, u2, us = unit(), unit(), unit()
    alpha = rng.normal(0.0, cfg.alpha_std, m)
    beta = rng.normal(0.0, cfg.beta_std, m)
    delta = rng.uniform(*cfg.delta_range, d)
    if cfg.phase == "steepest":  # sin(a - pi/4) + cos(a - pi/4) = sqrt(2) sin(a); + pi flips the sign
        gamma = -math.pi / 4 + math.pi * rng.integers(0, 2, d)
    else:
        gamma = rng.uniform(0.0, 2 * math.pi, d)
    return Parameters(u1, u2, us, alpha, beta, delta, gamma, cfg.c1 * u1, cfg.c2 * u2, cfg.cs * us)  # Eq. 6


def _sines(t: np.ndarray, p: Parameters) -> np.ndarray:
    """``S(t) = sum_{i=1..m} sin(alpha_i t + beta_i)`` for ``t: [n]`` -> ``[n]`` (the sums of Eq. 7-8)."""
    return np.sin(t[:, None] * p.alpha + p.beta).sum(axis=1)  # [n, m] -> [n]


def _feature_map(z: np.ndarray, p: Parameters) -> np.ndarray:
    """``F_i(z_i) = sin(delta_i z_i + gamma_i) + cos(delta_i z_i + gamma_i)`` for ``z: [n, d]`` (Eq. 9-11)."""
    a = z * p.delta + p.gamma  # [n, d]
    return np.sin(a) + np.cos(a)


def generate_block(cfg: FdnSyntheticConfig, p: Parameters, b: int) -> dict[str, np.ndarray]:
    """Block ``b`` of the row stream, float64: ``X [n, d]`` (the variant's features) and its labels ``[n]``."""
    n = min(BLOCK_ROWS, cfg.rows - b * BLOCK_ROWS)
    d = cfg.dim

    def draw(q: int, mean: float, std: float, shape) -> np.ndarray:
        return np.random.default_rng([cfg.seed, 1, b, q]).normal(mean, std, shape)

    x1 = draw(0, X1_MEAN, cfg.x_task_std, (n, d))  # step 3
    x2 = draw(1, X2_MEAN, cfg.x_task_std, (n, d))
    xs = draw(2, XS_MEAN, cfg.x_shared_std, (n, d))
    eps1 = draw(3, 0.0, cfg.label_noise_std, n)
    eps2 = draw(4, 0.0, cfg.label_noise_std, n)
    out: dict[str, np.ndarray] = {}
    ts = xs @ p.ws  # w_s^T x_s  [n]
    s = ts + _sines(ts, p)  # shared component of Eq. 7-8
    if "y1" in cfg.labels:
        t1 = x1 @ p.w1
        out["y1"] = s + t1 + _sines(t1, p) + eps1  # Eq. 7
    if "y2" in cfg.labels:
        t2 = x2 @ p.w2
        out["y2"] = s + t2 + _sines(t2, p) + eps2  # Eq. 8
    k = VARIANTS.index(cfg.variant)
    noise = np.random.default_rng([cfg.seed, 2, k, b]).normal(0.0, cfg.feature_noise_std, (n, d))
    z = xs * p.us  # u_s^i x_s^i  [n, d]
    if cfg.variant in ("A", "I"):
        z = z + x1 * p.u1
    if cfg.variant in ("B", "I"):
        z = z + x2 * p.u2
    out["X"] = _feature_map(z, p) + noise  # Eq. 9 (A), Eq. 10 (B), Eq. 11 (I)
    return out


def _frame(cfg: FdnSyntheticConfig, block: dict[str, np.ndarray], first_row: int) -> pl.DataFrame:
    n = len(block["X"])
    cols: dict[str, pl.Series] = {}
    if cfg.constant_field:
        cols[CONST_FIELD] = pl.Series(CONST_FIELD, np.zeros(n, dtype=np.int64))
    x = block["X"].astype(np.float32)
    for i, name in enumerate(cfg.dense_names):
        cols[name] = pl.Series(name, x[:, i])
    for y in cfg.labels:
        cols[y] = pl.Series(y, block[y].astype(np.float32))
    cols[ROW_COL] = pl.Series(ROW_COL, np.arange(first_row, first_row + n, dtype=np.uint64))
    return pl.DataFrame(cols)


def generate_chunks(cfg: FdnSyntheticConfig) -> Iterator[pl.DataFrame]:
    """Raw rows in frames of ``cfg.chunk_rows``: ``const`` (Int64 0, with ``constant_field``), ``x_000..`` float32,
    the variant's labels float32 and ``__row`` (UInt64). The rows do not depend on ``chunk_rows``."""
    p = parameters(cfg)
    blocks = (_frame(cfg, generate_block(cfg, p, b), b * BLOCK_ROWS) for b in range(-(-cfg.rows // BLOCK_ROWS)))
    yield from rechunked(blocks, cfg.chunk_rows, empty=lambda: _frame(
        cfg, {"X": np.zeros((0, cfg.dim)), **{y: np.zeros(0) for y in cfg.labels}}, 0))


def prepare_fdn_synthetic(
    cfg: FdnSyntheticConfig,
    output: str | Path,
    *,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    progress: bool = True,
    overwrite: bool = False,
    allow_degenerate: bool = False,
) -> DatasetMeta:
    """Generate ``cfg.rows`` rows of ``cfg.variant`` and write the prepared dataset (dataset ``fdn-synthetic``; the
    config, variant included, is recorded in ``meta.json``'s ``source``)."""
    return build_prepared(
        lambda: generate_chunks(cfg),
        cfg.schema(),
        Path(output),
        dataset=DATASET,
        split=split,
        head_tail=head_tail,
        report=BuildReport(input_rows=cfg.rows),
        source={"generator": "recsys_transfer.data.fdn_synthetic", "config": cfg.to_json()},
        progress=progress,
        overwrite=overwrite,
        allow_degenerate=allow_degenerate,
    )


__all__ = [
    "BLOCK_ROWS",
    "CONST_FIELD",
    "DATASET",
    "VARIANTS",
    "VARIANT_LABELS",
    "FdnSyntheticConfig",
    "Parameters",
    "generate_block",
    "generate_chunks",
    "parameters",
    "prepare_fdn_synthetic",
]
