"""The shared prepared-dataset builder and split rules, on small constructed inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data.prepared import (
    BuildReport,
    DatasetMeta,
    Schema,
    SparseSpec,
    build_prepared,
    chunked,
    stable_hash,
)
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec, splitmix64
from recsys_transfer.errors import UserError


def _frame(n: int = 5000, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.zipf(1.5, n) % 300
    return pl.DataFrame({
        "a": [f"v{x}" for x in a],
        "b": rng.choice(["x", "y", None], n).tolist(),
        "d": rng.normal(size=n).astype(np.float32),
        "label": (rng.random(n) < 0.3).astype(np.float32),
    })


SCHEMA = Schema(sparse=(SparseSpec("a", min_count=3), SparseSpec("b"), SparseSpec("h", hash_size=11)), dense=("d",))


def _build(df: pl.DataFrame, out: Path, chunk: int) -> DatasetMeta:
    df = df.with_columns(pl.col("a").alias("h"))
    return build_prepared(chunked(df, chunk), SCHEMA, out, dataset="toy", split=SplitSpec(), head_tail=HeadTailSpec(),
                          report=BuildReport(input_rows=len(df)), source={"input": "mem"}, progress=False)


def _all(out: Path, meta: DatasetMeta) -> dict[str, pl.DataFrame]:
    return {s: pl.concat([pl.read_parquet(out / f) for f in fs]) for s, fs in meta.split_files.items()}


def test_chunking_does_not_change_output(tmp_path: Path):
    df = _frame()
    m1 = _build(df, tmp_path / "one", 10_000)
    m2 = _build(df, tmp_path / "many", 333)
    assert m1.dataset_id == m2.dataset_id and m1.sparse == m2.sparse
    a, b = _all(tmp_path / "one", m1), _all(tmp_path / "many", m2)
    assert all(a[s].equals(b[s]) for s in a)


def test_vocab_min_count_oov_and_frequencies(tmp_path: Path):
    df = _frame()
    meta = _build(df, tmp_path / "p", 1000)
    codes = SplitSpec().assign_random(np.arange(len(df)))
    train_a = df.filter(pl.Series(codes == 0))["a"].value_counts()
    kept = train_a.filter(pl.col("count") >= 3)
    f = meta.field("a")
    assert f.vocab_size == len(kept) + 1
    assert f.frequencies[0] == int(train_a.filter(pl.col("count") < 3)["count"].sum())  # OOV row counts rare values
    assert sorted(f.frequencies[1:], reverse=True) == f.frequencies[1:]
    assert sum(f.frequencies) == meta.split_rows["train"]
    # nulls map to OOV: b's OOV count equals the number of training nulls
    assert meta.field("b").frequencies[0] == int(df.filter(pl.Series(codes == 0))["b"].null_count())
    h = meta.field("h")
    assert h.hashed and h.vocab_size == 11 and sum(h.frequencies) == meta.split_rows["train"]
    assert h.frequencies[0] == 0  # no null in the hashed column
    data = _all(tmp_path / "p", meta)
    assert data["train"]["h"].min() >= 1 and data["train"]["h"].max() <= 10


def test_stable_hash_pinned_values():
    """The hash is part of the prepared format: these values must never change across versions."""
    got = stable_hash(pl.Series(["", "a", "68fd1e64", None])).tolist()
    # FNV-1a("a") = 0xAF63DC4C8601EC8C, xor the length, then the SplitMix64 finalizer
    assert got[1] == int(splitmix64(np.array([0xAF63DC4C8601EC8C ^ 1], dtype=np.uint64))[0])
    assert got == [14087677454934409008, 13906159068427031964, 1239981691331894341, 14087677454934409008]


def test_random_split_fractions_and_independence():
    spec = SplitSpec(fractions=(0.8, 0.1, 0.1), seed=5)
    idx = np.arange(200_000)
    codes = spec.assign_random(idx)
    frac = np.bincount(codes, minlength=3) / len(idx)
    assert np.allclose(frac, [0.8, 0.1, 0.1], atol=0.005)
    assert np.array_equal(codes[1000:2000], spec.assign_random(idx[1000:2000]))  # chunk-independent
    assert not np.array_equal(codes, SplitSpec(seed=6).assign_random(idx))


def test_temporal_split_with_ties():
    ts = np.array([5, 1, 1, 3, 2, 2, 9, 8, 7, 4])
    codes = SplitSpec("temporal", (0.6, 0.2, 0.2)).assign_temporal(ts)
    order = np.argsort(ts, kind="stable")
    assert codes[order].tolist() == [0] * 6 + [1] * 2 + [2] * 2


def test_validation_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="sum"):
        SplitSpec(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="head fraction"):
        HeadTailSpec(fraction=1.5)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(UserError, match="refusing to overwrite"):
        _build(_frame(100), tmp_path / "junk", 50)
