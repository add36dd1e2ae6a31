"""The embedded default dataset: a seeded synthetic CTR log with a planted long tail (no download).

Why it exists: the paper's selective target domain (Sec. 3.1, Eq. 3) keeps a rare item only if its
co-occurrence vector looks like the one of some frequent item. To *test* that selection we need data where we
know which rare items resemble a frequent item ("twins") and which resemble none ("orphans"). This module
generates such data, records the truth, and also emits a raw Criteo-format TSV for scale tests of that path.

Generative model (all randomness from ``np.random.default_rng``; see "Determinism" below)
------------------------------------------------------------------------------------------
Fields. ``cfg.fields`` names the sparse fields (default ``item, user, context, region`` with vocabularies
5000/2000/300/60). The FIRST field is the *target field* ("item"): it carries the planted twin/orphan
structure. The other fields are *context fields*.

Base popularity. In every field ``g`` with vocabulary ``V_g`` the value of base rank ``r`` (0-based) has base
probability ``z_g(r) ∝ (r + 1) ** -cfg.zipf_exponent``. Raw ids are ``0..V_g-1`` and the rank -> raw id map is a
seeded random permutation, so a raw id says nothing about popularity.

Target field (item). Items are drawn i.i.d. from ``z_item``. The frequent items are the generative top
``n_freq = ceil(cfg.frequent_fraction * V)`` ranks (the Pareto head, as the paper's S); the rest are rare.
Exactly ``n_orphan = round(cfg.orphan_fraction * (V - n_freq))`` rare items are *orphans*, a seeded random
subset of the ranks ``>= min(2 * n_freq, V - n_orphan)`` (kept away from the head boundary: an orphan that
sampling noise pushed into the empirical head would be a "frequent item" its orphan siblings resemble);
every other rare item is a *twin* of a frequent *parent* chosen uniformly at random.

Context clusters. There are ``K_s = cfg.num_shared_clusters`` shared clusters and ``K_o =
cfg.num_orphan_clusters`` orphan clusters (``K = K_s + K_o``). Every frequent item gets a uniform random shared
cluster (each shared cluster at least one), every twin inherits its parent's cluster, every orphan gets a
uniform random orphan cluster -- no frequent item is ever in an orphan cluster. Let ``π_c`` be the item mass
of cluster ``c``. In each context field ``g`` every cluster owns ``m_g = max(1, min(cfg.signature_size,
floor(frequent_fraction * V_g) // K))`` *signature values*, disjoint across clusters: the base ranks
``0 .. K*m_g - 1`` are dealt round-robin to the clusters in order of decreasing ``π_c`` (so the signature
values fit in the popular part of the field, heavy clusters getting the most popular ones). Values beyond
that belong to no cluster (``cluster = -1``).

Rows. A row is generated item-first: draw item ``i ~ z_item`` and let ``c = cluster(i)``; then for every
context field independently, with probability ``α = cfg.context_strength`` draw the value uniformly from
``c``'s signature values, otherwise from the background ``z_g``. The conditional distribution of the other
fields given the item depends on the item only through its cluster: a twin's row context is drawn from
exactly its parent's distribution, while an orphan puts mass ``α`` on signature values that no frequent item's
cluster owns (frequent items reach them only through the background ``1-α``). The marginal of a context
field is ``p_g(v) = (1-α) z_g(v) + α π_{cluster(v)} / m_g`` (second term 0 for unclustered values): a
plateau of signature values over a Zipf tail; the ground truth records this exact marginal and ranks by it.

What Eq. 3 sees (and how ``tests/test_synthetic.py`` measures it). For an item ``i`` let ``s_i`` be the
vector of counts of rows in which ``i`` co-occurs with each *frequent value of the other fields* (the top
``frequent_fraction`` of each context field by count, concatenated); item-item co-occurrence is impossible as
each row has one item, so the coordinates are context values, and an item is compared by cosine with the
frequent items *of the same field* (top ``frequent_fraction`` by count) over those same coordinates.
``E[s_i] ∝ (1-α) z + α unif(signature(c(i)))``: twins point where their parent points; orphans point to
orphan-cluster coordinates no frequent item uses, so ``max_j cos(s_i, s_j)`` is lower for orphans. At the
default size (200k rows, α = 0.6) the AUC of separating orphans from twins by that score is ~0.99 (median
score ~0.87 for twins vs ~0.29 for orphans); lowering ``context_strength`` makes the task harder.

Latent vectors (dimension ``d = cfg.latent_dim``, scale ``σ = d ** -0.25`` so a dot product of two
independent latents has unit variance). Each shared cluster has a centre ``~ N(0, σ²I)``; each orphan cluster
a centre ``~ N(μ_o, σ²I)`` with ``μ_o = cfg.orphan_shift * σ * sqrt(d) * e`` (``e`` a random unit vector), so
orphans live in a different region of latent space and *should* be embedded differently. Frequent item:
``sqrt(ρ) * centre + sqrt(1-ρ) * N(0, σ²I)`` with ``ρ = cfg.cluster_share``; orphan: the same around its
orphan centre; twin: ``parent latent + cfg.twin_noise * N(0, σ²I)``. Context-field values: ``N(0, σ²I)``.

Label. ``logit = cfg.label_bias + cfg.interaction_scale * Σ_{a<b} <v_a, v_b> / sqrt(#pairs)
+ Σ_k w_k dense_k + cfg.noise * N(0,1)`` over all field pairs, with ``w_k = 0.6, -0.4, 0.6, ...``;
``label ~ Bernoulli(sigmoid(logit))`` (positive rate 0.24-0.28 at defaults, depending on the seed). Dense
features ``dense_k ~ N(0,1)`` (float32), correlated with the label through ``w``. With ``conversion`` a second
label ``purchase`` exists only after a click (ESMM's setting: CTR = label, CTCVR = purchase over all impressions,
CVR = purchase on the clicked rows); see :meth:`_Model.conversions`.

Ground truth (:func:`prepare_synthetic` writes ``DIR/ground_truth/<field>.parquet``; read with
:func:`load_ground_truth`): ``raw`` (the raw id in the generated rows), ``id`` (the prepared id from
``DIR/vocab/<field>.parquet``, 0 if the value never occurred in train), ``rank`` (0-based rank by generative
probability), ``prob`` (generative marginal probability), ``is_frequent`` (generative top ``frequent_fraction``),
``is_orphan``, ``parent`` (raw id of a twin's frequent parent, null otherwise), ``cluster`` and ``latent``
(list of float32). Only the target field has orphans/parents; context fields record ``is_orphan = False``,
``parent = null``.

Determinism and chunking. Model parameters come from ``default_rng([seed, 0])``. Rows are generated in fixed
blocks of ``BLOCK_ROWS`` (65,536) rows, block ``b`` from ``default_rng([seed, 1, b])``, fully vectorized.
``generate_chunks`` re-slices the block stream into frames of ``cfg.chunk_rows``, so the generated rows are
identical for every ``chunk_rows`` (it only sets the frame size, memory is bounded by it plus vocab×dim).
Same config -> identical rows and identical prepared bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_transfer.data.prepared import (
    ROW_COL,
    BuildReport,
    DatasetMeta,
    Schema,
    SparseSpec,
    build_prepared,
    rechunked,
)
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec, splitmix64
from recsys_transfer.errors import UserError

BLOCK_ROWS = 65_536  # generation unit; fixed, so rows do not depend on cfg.chunk_rows
LABEL = "label"
CONVERSION = "purchase"  # the post-click conversion label (SyntheticConfig.conversion)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generative model in the module docstring. The first field is the target field."""

    rows: int = 200_000
    seed: int = 0
    fields: tuple[str, ...] = ("item", "user", "context", "region")
    vocab_sizes: tuple[int, ...] = (5000, 2000, 300, 60)
    zipf_exponent: float = 1.1
    latent_dim: int = 8
    frequent_fraction: float = 0.2
    orphan_fraction: float = 0.2
    num_shared_clusters: int = 32
    num_orphan_clusters: int = 8
    context_strength: float = 0.6
    signature_size: int = 4
    cluster_share: float = 0.5
    twin_noise: float = 0.1
    orphan_shift: float = 1.0
    num_dense: int = 2
    label_bias: float = -1.4
    interaction_scale: float = 1.0
    noise: float = 0.5
    chunk_rows: int = 500_000
    conversion: bool = False  # add a post-click conversion label ``purchase`` (ESMM's CTR / CVR / CTCVR setting)
    conversion_bias: float = -1.0
    conversion_scale: float = 1.0

    def __post_init__(self) -> None:
        # tolerate lists (e.g. from YAML/JSON) by normalising to tuples
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in self.vocab_sizes))
        n_clusters = self.num_shared_clusters + self.num_orphan_clusters

        def bad(msg: str) -> None:
            raise UserError(f"synthetic config: {msg}")

        if self.rows < 0:
            bad(f"rows must be >= 0, got {self.rows}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if len(self.fields) < 2:
            bad("need at least 2 sparse fields (a target field and a context field)")
        if len(set(self.fields)) != len(self.fields) or any(not f or f.startswith("__") for f in self.fields):
            bad(f"field names must be unique, non-empty and not start with '__': {self.fields}")
        reserved = {LABEL, CONVERSION, *self.dense_names}
        if reserved & set(self.fields):
            bad(f"field names clash with {sorted(reserved)}")
        if len(self.vocab_sizes) != len(self.fields):
            bad(f"{len(self.vocab_sizes)} vocab_sizes for {len(self.fields)} fields")
        if self.vocab_sizes[0] < 10:
            bad(f"target field vocabulary must be >= 10, got {self.vocab_sizes[0]}")
        if any(v < n_clusters for v in self.vocab_sizes[1:]):
            bad(f"context field vocabularies must be >= num_shared_clusters + num_orphan_clusters = {n_clusters}")
        if not self.zipf_exponent > 0:
            bad(f"zipf_exponent must be > 0, got {self.zipf_exponent}")
        if self.latent_dim < 1:
            bad(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not 0 < self.frequent_fraction < 1:
            bad(f"frequent_fraction must be in (0, 1), got {self.frequent_fraction}")
        if not 0 <= self.orphan_fraction <= 1:
            bad(f"orphan_fraction must be in [0, 1], got {self.orphan_fraction}")
        if self.num_shared_clusters < 1 or self.num_orphan_clusters < 1:
            bad("num_shared_clusters and num_orphan_clusters must be >= 1")
        if self.num_shared_clusters > math.ceil(self.frequent_fraction * self.vocab_sizes[0]):
            bad("num_shared_clusters must not exceed the number of frequent target items")
        for name in ("context_strength", "cluster_share"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("twin_noise", "orphan_shift", "interaction_scale", "noise"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.signature_size < 1:
            bad(f"signature_size must be >= 1, got {self.signature_size}")
        if self.num_dense < 0:
            bad(f"num_dense must be >= 0, got {self.num_dense}")
        if self.chunk_rows < 1:
            bad(f"chunk_rows must be >= 1, got {self.chunk_rows}")

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def target_field(self) -> str:
        return self.fields[0]

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(f"dense_{k}" for k in range(self.num_dense))

    @property
    def num_frequent(self) -> int:
        """Generative head size of the target field: ceil(frequent_fraction * V), as HeadTailSpec's pareto rule."""
        return math.ceil(self.frequent_fraction * self.vocab_sizes[0])

    @property
    def num_orphans(self) -> int:
        """Exact number of planted orphans: round(orphan_fraction * number of rare target items)."""
        return int(round(self.orphan_fraction * (self.vocab_sizes[0] - self.num_frequent)))

    @property
    def labels(self) -> tuple[str, ...]:
        return (LABEL, CONVERSION) if self.conversion else (LABEL,)

    def schema(self) -> Schema:
        return Schema(sparse=tuple(SparseSpec(f) for f in self.fields), dense=self.dense_names, labels=self.labels)

    def to_json(self) -> dict:
        d = asdict(self)
        if not self.conversion:  # datasets without the conversion label keep the ids they had before it existed
            for key in ("conversion", "conversion_bias", "conversion_scale"):
                d.pop(key)
        d["fields"] = list(self.fields)
        d["vocab_sizes"] = list(self.vocab_sizes)
        return d


# ----------------------------------------------------------------------------------------------------------
# model parameters


def _zipf(v: int, s: float) -> np.ndarray:
    p = np.arange(1, v + 1, dtype=np.float64) ** -s
    return p / p.sum()


def _cdf(p: np.ndarray) -> np.ndarray:
    c = np.cumsum(p)
    c /= c[-1]
    c[-1] = 1.0
    return c


@dataclass
class _Field:
    """Everything about one field, indexed by *base rank* (0 = most probable under the base Zipf)."""

    name: str
    size: int
    raw_of_rank: np.ndarray  # int64[V]: raw id of each base rank
    base_cdf: np.ndarray  # float64[V]
    cluster: np.ndarray  # int64[V]
    latent: np.ndarray  # float32[V, d]
    marginal: np.ndarray  # float64[V]: generative marginal probability
    # target field only
    is_orphan: np.ndarray | None = None
    parent_rank: np.ndarray | None = None  # int64[V], -1 if none
    # context fields only: sig_table[c] = the base ranks of cluster c's signature values
    sig_table: np.ndarray | None = None


class _Model:
    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 0])
        d = cfg.latent_dim
        sigma = d**-0.25
        ks, ko = cfg.num_shared_clusters, cfg.num_orphan_clusters
        kc = ks + ko

        # -- target field --------------------------------------------------------------------------------
        v = cfg.vocab_sizes[0]
        z = _zipf(v, cfg.zipf_exponent)
        raw_of_rank = rng.permutation(v).astype(np.int64)
        n_freq, n_orph = cfg.num_frequent, cfg.num_orphans
        rare = np.arange(n_freq, v)
        candidates = np.arange(self.orphan_min_rank(cfg), v)
        orphan_ranks = np.sort(rng.choice(candidates, size=n_orph, replace=False)) if n_orph else np.zeros(0, np.int64)
        is_orphan = np.zeros(v, dtype=bool)
        is_orphan[orphan_ranks] = True
        twins = rare[~is_orphan[rare]]
        cluster = np.empty(v, dtype=np.int64)
        # every shared cluster gets at least one frequent item, the rest uniform
        cluster[:n_freq] = rng.permutation(np.concatenate([np.arange(ks), rng.integers(0, ks, n_freq - ks)]))
        parent = np.full(v, -1, dtype=np.int64)
        parent[twins] = rng.integers(0, n_freq, len(twins))
        cluster[twins] = cluster[parent[twins]]
        cluster[orphan_ranks] = ks + rng.integers(0, ko, n_orph)

        centres = rng.standard_normal((kc, d)) * sigma
        e = rng.standard_normal(d)
        e /= np.linalg.norm(e)
        centres[ks:] += cfg.orphan_shift * sigma * math.sqrt(d) * e
        rho = cfg.cluster_share
        latent = np.empty((v, d), dtype=np.float64)
        own = np.flatnonzero(parent < 0)  # frequent + orphans
        latent[own] = math.sqrt(rho) * centres[cluster[own]] + math.sqrt(1 - rho) * sigma * rng.standard_normal((len(own), d))
        latent[twins] = latent[parent[twins]] + cfg.twin_noise * sigma * rng.standard_normal((len(twins), d))
        self.target = _Field(
            name=cfg.fields[0],
            size=v,
            raw_of_rank=raw_of_rank,
            base_cdf=_cdf(z),
            cluster=cluster,
            latent=latent.astype(np.float32),
            marginal=z,
            is_orphan=is_orphan,
            parent_rank=parent,
        )
        pi = np.bincount(cluster, weights=z, minlength=kc)  # item mass per cluster

        # -- context fields ------------------------------------------------------------------------------
        alpha = cfg.context_strength
        self.context: list[_Field] = []
        cluster_order = np.lexsort((np.arange(kc), -pi))  # clusters by item mass, heaviest first
        for name, vg in zip(cfg.fields[1:], cfg.vocab_sizes[1:]):
            zg = _zipf(vg, cfg.zipf_exponent)
            raw = rng.permutation(vg).astype(np.int64)
            m = self.signature_size(cfg, vg)
            sig = np.empty((kc, m), dtype=np.int64)
            dealt = np.arange(kc * m)  # base ranks dealt round-robin, heaviest cluster first
            sig[cluster_order[dealt % kc], dealt // kc] = dealt
            cl = np.full(vg, -1, dtype=np.int64)
            cl[sig.ravel()] = np.repeat(np.arange(kc), m)
            marginal = (1 - alpha) * zg
            marginal[sig.ravel()] += alpha * np.repeat(pi, m) / m
            self.context.append(
                _Field(
                    name=name,
                    size=vg,
                    raw_of_rank=raw,
                    base_cdf=_cdf(zg),
                    cluster=cl,
                    latent=(rng.standard_normal((vg, d)) * sigma).astype(np.float32),
                    marginal=marginal / marginal.sum(),
                    sig_table=sig,
                )
            )
        self.dense_w = np.array([0.6 if k % 2 == 0 else -0.4 for k in range(cfg.num_dense)], dtype=np.float64)

    @staticmethod
    def orphan_min_rank(cfg: SyntheticConfig) -> int:
        """Orphans are drawn from ranks >= this (2x the head size when possible), so that sampling noise does
        not push an orphan into the empirical head, where it would be a "frequent item" its orphan siblings
        resemble."""
        return min(2 * cfg.num_frequent, cfg.vocab_sizes[0] - cfg.num_orphans)

    @staticmethod
    def signature_size(cfg: SyntheticConfig, vocab_size: int) -> int:
        """Signature values per cluster in a context field: as many as fit in its frequent part, capped."""
        kc = cfg.num_shared_clusters + cfg.num_orphan_clusters
        return max(1, min(cfg.signature_size, math.floor(cfg.frequent_fraction * vocab_size) // kc))

    @property
    def fields(self) -> list[_Field]:
        return [self.target, *self.context]

    # -- one block of rows ---------------------------------------------------------------------------------
    def block(self, b: int) -> pl.DataFrame:
        cfg = self.cfg
        start = b * BLOCK_ROWS
        n = min(BLOCK_ROWS, cfg.rows - start)
        rng = np.random.default_rng([cfg.seed, 1, b])
        t = self.target
        item = np.minimum(np.searchsorted(t.base_cdf, rng.random(n), side="right"), t.size - 1)
        c = t.cluster[item]
        ranks = [item]
        for f in self.context:
            use_sig = rng.random(n) < cfg.context_strength
            u = rng.random(n)
            bg = np.minimum(np.searchsorted(f.base_cdf, u, side="right"), f.size - 1)
            m = f.sig_table.shape[1]
            sig = f.sig_table[c, np.minimum((u * m).astype(np.int64), m - 1)]
            ranks.append(np.where(use_sig, sig, bg))
        dense = rng.standard_normal((n, cfg.num_dense))
        noise = rng.standard_normal(n)
        coin = rng.random(n)

        lat = [f.latent[r] for f, r in zip(self.fields, ranks)]
        inter = np.zeros(n, dtype=np.float64)
        pairs = 0
        for a in range(len(lat)):
            for bb in range(a + 1, len(lat)):
                inter += np.einsum("ij,ij->i", lat[a], lat[bb], dtype=np.float64)
                pairs += 1
        logit = cfg.label_bias + cfg.interaction_scale * inter / math.sqrt(pairs) + dense @ self.dense_w + cfg.noise * noise
        label = (coin < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

        cols = {f.name: pl.Series(f.name, f.raw_of_rank[r], dtype=pl.Int64) for f, r in zip(self.fields, ranks)}
        for k, name in enumerate(cfg.dense_names):
            cols[name] = pl.Series(name, dense[:, k].astype(np.float32))
        cols[LABEL] = pl.Series(LABEL, label)
        if cfg.conversion:
            cols[CONVERSION] = pl.Series(CONVERSION, self.conversions(b, n, lat, dense, label))
        cols[ROW_COL] = pl.Series(ROW_COL, np.arange(start, start + n, dtype=np.uint64))
        return pl.DataFrame(cols)

    def conversions(self, b: int, n: int, lat: list[np.ndarray], dense: np.ndarray, click: np.ndarray) -> np.ndarray:
        """``purchase`` of one block: 0 without a click; after a click ``~ Bernoulli(sigmoid(cvr_logit))`` with
        ``cvr_logit = conversion_bias + conversion_scale * Σ_{b>0} <v_item, v_b> / sqrt(F - 1) - dense @ w +
        noise * N(0, 1)``: the item's affinity with each context value alone (CTR uses every pair), and the dense
        features pull the other way, so CVR is related to CTR but not the same task. Drawn from its own stream
        ``default_rng([seed, 4, b])``, so the other columns are the rows without the conversion label."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 4, b])
        noise, coin = rng.standard_normal(n), rng.random(n)
        item = np.zeros(n, dtype=np.float64)
        for other in lat[1:]:
            item += np.einsum("ij,ij->i", lat[0], other, dtype=np.float64)
        logit = (cfg.conversion_bias + cfg.conversion_scale * item / math.sqrt(len(lat) - 1) - dense @ self.dense_w
                 + cfg.noise * noise)
        return (click * (coin < 1.0 / (1.0 + np.exp(-logit)))).astype(np.float32)

    # -- ground truth --------------------------------------------------------------------------------------
    def truth(self, f: _Field) -> pl.DataFrame:
        """One row per value, ordered by generative rank (marginal probability desc, raw id asc)."""
        order = np.lexsort((f.raw_of_rank, -f.marginal))
        rank = np.empty(f.size, dtype=np.int64)
        rank[order] = np.arange(f.size)
        n_freq = math.ceil(self.cfg.frequent_fraction * f.size)
        is_orphan = f.is_orphan if f.is_orphan is not None else np.zeros(f.size, dtype=bool)
        if f.parent_rank is not None:
            parent = pl.Series("parent", np.where(f.parent_rank >= 0, f.raw_of_rank[np.maximum(f.parent_rank, 0)], 0))
            parent = pl.select(pl.when(pl.Series(f.parent_rank >= 0)).then(parent).otherwise(None)).to_series()
        else:
            parent = pl.Series("parent", [None] * f.size, dtype=pl.Int64)
        latent = pl.Series("latent", f.latent).cast(pl.List(pl.Float32))
        df = pl.DataFrame(
            {
                "raw": pl.Series(f.raw_of_rank, dtype=pl.Int64),
                "rank": pl.Series(rank, dtype=pl.Int64),
                "prob": pl.Series(f.marginal, dtype=pl.Float64),
                "is_frequent": pl.Series(rank < n_freq),
                "is_orphan": pl.Series(is_orphan),
                "parent": parent.alias("parent").cast(pl.Int64),
                "cluster": pl.Series(f.cluster, dtype=pl.Int64),
                "latent": latent,
            }
        )
        return df.sort("rank")


# ----------------------------------------------------------------------------------------------------------
# public API


def generate_chunks(cfg: SyntheticConfig) -> Iterator[pl.DataFrame]:
    """Raw rows in frames of ``cfg.chunk_rows``: one Int64 raw-id column per field, ``dense_k`` float32,
    ``label`` float32 (0/1) and ``__row`` (UInt64). The rows do not depend on ``chunk_rows``."""
    model = _Model(cfg)
    blocks = (model.block(b) for b in range(-(-cfg.rows // BLOCK_ROWS)))
    yield from rechunked(blocks, cfg.chunk_rows, empty=lambda: pl.DataFrame(schema=_raw_polars_schema(cfg)))


def _raw_polars_schema(cfg: SyntheticConfig) -> dict:
    d: dict = {name: pl.Int64 for name in cfg.fields}
    d.update({name: pl.Float32 for name in cfg.dense_names})
    d.update({name: pl.Float32 for name in cfg.labels})
    d[ROW_COL] = pl.UInt64
    return d


def ground_truth(cfg: SyntheticConfig) -> dict[str, pl.DataFrame]:
    """Generative truth per field (without prepared ids), see the module docstring."""
    model = _Model(cfg)
    return {f.name: model.truth(f) for f in model.fields}


def prepare_synthetic(
    cfg: SyntheticConfig,
    output: str | Path,
    *,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    progress: bool = True,
    overwrite: bool = False,
    allow_degenerate: bool = False,
) -> DatasetMeta:
    """Generate ``cfg.rows`` rows, write the prepared dataset with :func:`build_prepared` (dataset
    ``synthetic``), then ``output/ground_truth/<field>.parquet`` with the prepared ids filled in."""
    out = Path(output)
    report = BuildReport(input_rows=cfg.rows)
    meta = build_prepared(
        lambda: generate_chunks(cfg),
        cfg.schema(),
        out,
        dataset="synthetic",
        split=split,
        head_tail=head_tail,
        report=report,
        source={"generator": "recsys_transfer.data.synthetic", "config": cfg.to_json()},
        progress=progress,
        overwrite=overwrite,
        allow_degenerate=allow_degenerate,
    )
    gt_dir = out / "ground_truth"
    gt_dir.mkdir(exist_ok=True)
    for name, truth in ground_truth(cfg).items():
        vocab = pl.read_parquet(out / "vocab" / f"{name}.parquet")
        vocab = vocab.select(pl.col(name).cast(pl.Int64).alias("raw"), pl.col("id").cast(pl.Int64))
        table = truth.join(vocab, on="raw", how="left", maintain_order="left").with_columns(pl.col("id").fill_null(0))
        cols = ["raw", "id"] + [c for c in truth.columns if c != "raw"]
        table.select(cols).write_parquet(gt_dir / f"{name}.parquet")
    return meta


def load_ground_truth(prepared_dir: str | Path, field: str) -> pl.DataFrame:
    """The ground-truth table of one field of a synthetic prepared dataset (see the module docstring)."""
    path = Path(prepared_dir) / "ground_truth" / f"{field}.parquet"
    if not path.is_file():
        meta = DatasetMeta.load(prepared_dir)
        if meta.dataset != "synthetic":
            raise UserError(f"{prepared_dir}: dataset {meta.dataset!r} is not synthetic; it has no ground truth")
        raise UserError(f"{path}: no ground truth for field {field!r}; fields are {meta.sparse_names}")
    return pl.read_parquet(path)


# ----------------------------------------------------------------------------------------------------------
# raw Criteo Kaggle TSV


# (vocabulary size, missing rate) per categorical field, shaped after the Criteo Kaggle training set; the
# largest real vocabularies (millions) are capped at a few hundred thousand to keep memory bounded.
CRITEO_CAT_FIELDS: tuple[tuple[int, float], ...] = (
    (1460, 0.0), (583, 0.0), (400_000, 0.03), (200_000, 0.03), (305, 0.0), (24, 0.12), (12_517, 0.0),
    (633, 0.0), (3, 0.0), (93_145, 0.0), (5683, 0.0), (350_000, 0.03), (3194, 0.0), (27, 0.0),
    (14_992, 0.0), (300_000, 0.03), (10, 0.0), (5652, 0.0), (2173, 0.44), (4, 0.44), (300_000, 0.03),
    (18, 0.0), (15, 0.0), (286_181, 0.44), (105, 0.0), (142_572, 0.44),
)
# (log-normal mu, sigma, missing rate, may be negative) per integer field
CRITEO_INT_FIELDS: tuple[tuple[float, float, float, bool], ...] = (
    (0.5, 1.2, 0.45, False), (2.0, 2.0, 0.0, True), (1.5, 1.5, 0.21, False), (1.5, 1.0, 0.22, False),
    (7.5, 2.0, 0.03, False), (3.5, 1.8, 0.22, False), (1.5, 1.6, 0.04, False), (2.3, 1.0, 0.0, False),
    (3.5, 1.5, 0.04, False), (0.3, 0.6, 0.45, False), (1.0, 1.1, 0.04, False), (0.2, 0.8, 0.77, False),
    (2.0, 1.3, 0.22, False),
)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_tokens(seed: int, field_index: int, size: int) -> pa.Array:
    """``size`` distinct lowercase 8-hex-digit tokens: a seeded bijection of uint32 applied to 0..size-1."""
    key = splitmix64(np.array([seed * 1000 + field_index], dtype=np.uint64))[0]
    a = np.uint32((int(key) & 0xFFFFFFFF) | 1)  # odd multiplier -> bijection mod 2**32
    b = np.uint32(int(key) >> 32)
    with np.errstate(over="ignore"):
        x = np.arange(size, dtype=np.uint32) * a + b
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    chars = _HEX[(x[:, None] >> shifts) & np.uint32(15)]
    offsets = np.arange(0, 8 * size + 1, 8, dtype=np.int32)
    return pa.StringArray.from_buffers(size, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars).ravel()))


def _zipf_ranks(rng: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """Approximate Zipf(s) ranks in [0, size) by inverting the continuous power-law CDF (fast, vectorized)."""
    u = rng.random(n)
    if abs(s - 1.0) < 1e-9:
        r = np.exp(u * np.log(size + 1.0))
    else:
        q = 1.0 - s
        r = (u * ((size + 1.0) ** q - 1.0) + 1.0) ** (1.0 / q)
    return np.minimum(r.astype(np.int64) - 1, size - 1).clip(0)


def write_criteo_tsv(
    path: str | Path,
    rows: int,
    seed: int = 0,
    *,
    block_rows: int = 262_144,
    zipf_exponent: float = 1.05,
    positive_rate_bias: float = -1.25,
) -> int:
    """Write ``rows`` synthetic records in the raw Criteo Kaggle ``train.txt`` layout and return ``rows``.

    Each line: ``label`` (0/1), ``I1..I13`` (integers, some empty, ``I2`` sometimes negative), ``C1..C26``
    (lowercase 8-hex-digit tokens, some empty), tab-separated, no header. Categorical values are Zipf-like
    (exponent ``zipf_exponent``) over per-field vocabularies of 3 to 400,000 tokens (:data:`CRITEO_CAT_FIELDS`);
    the label depends on I1, I6 and C1/C9/C20 so it is learnable. Output is a function of (rows, seed,
    block_rows, zipf_exponent, positive_rate_bias): block ``b`` is drawn from ``default_rng([seed, 2, b])``.
    Streamed block by block, so memory is bounded by ``block_rows`` plus the token tables.
    """
    if rows < 0 or block_rows < 1:
        raise UserError(f"write_criteo_tsv: rows must be >= 0 and block_rows >= 1 (got {rows}, {block_rows})")
    tokens = [  # per field: its distinct tokens, plus a final null used for missing values
        pl.Series(f"C{j + 1}", _hex_tokens(seed, j, size)).extend(pl.Series([None], dtype=pl.Utf8))
        for j, (size, _) in enumerate(CRITEO_CAT_FIELDS)
    ]
    prng = np.random.default_rng([seed, 3])
    effects = {j: prng.normal(0.0, 0.7, CRITEO_CAT_FIELDS[j][0]) for j in (0, 8, 19)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for b in range(-(-rows // block_rows)):
            n = min(block_rows, rows - b * block_rows)
            rng = np.random.default_rng([seed, 2, b])
            logit = np.full(n, positive_rate_bias)
            ints = []
            for k, (mu, sd, miss, neg) in enumerate(CRITEO_INT_FIELDS):
                val = np.maximum(np.floor(np.exp(rng.normal(mu, sd, n))).astype(np.int64) - 1, 0)
                if neg:
                    val = np.where(rng.random(n) < 0.08, -rng.integers(1, 4, n), val)
                missing = rng.random(n) < miss
                if k in (0, 5):
                    logit += np.where(missing, 0.0, 0.25 * (np.log1p(np.maximum(val, 0)) - mu))
                ints.append(pl.Series(f"I{k + 1}", pa.array(val, mask=missing)))
            cats = []
            for j, (size, miss) in enumerate(CRITEO_CAT_FIELDS):
                idx = _zipf_ranks(rng, n, size, zipf_exponent)
                missing = rng.random(n) < miss
                if j in effects:
                    logit += np.where(missing, 0.0, effects[j][idx])
                cats.append(tokens[j].gather(np.where(missing, size, idx)))  # row `size` is null
            label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
            cols = [pl.Series("label", label), *ints, *cats]
            pl.DataFrame(cols).write_csv(fh, separator="\t", include_header=False, null_value="", quote_style="never")
    return rows


__all__ = [
    "BLOCK_ROWS",
    "CRITEO_CAT_FIELDS",
    "CRITEO_INT_FIELDS",
    "SyntheticConfig",
    "generate_chunks",
    "ground_truth",
    "load_ground_truth",
    "prepare_synthetic",
    "write_criteo_tsv",
]
