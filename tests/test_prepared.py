"""The shared prepared-dataset builder and split rules, on small constructed inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data.prepared import (
    ROW_COL,
    BuildReport,
    DatasetMeta,
    DenseSpec,
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


def test_vocab_ties_by_raw_value_for_string_and_int_fields(tmp_path: Path):
    """Temporary ids are first-seen order; final ids must still be (count desc, raw value asc) in the raw dtype."""
    # every value seen twice -> all tied; first-seen order is the reverse of the raw order
    s = ["zz", "b", "a10", "a9", None] * 2
    i = [30, 4, -7, 100, None] * 2
    df = pl.DataFrame({"s": s, "i": i, "label": [0.0] * 10}, schema={"s": pl.String, "i": pl.Int64, "label": pl.Float32})
    schema = Schema(sparse=(SparseSpec("s"), SparseSpec("i")))
    meta = build_prepared(chunked(df, 3), schema, tmp_path / "p", dataset="ties", split=SplitSpec(fractions=(1.0, 0.0, 0.0)),
                          head_tail=HeadTailSpec(), report=BuildReport(input_rows=10), source={}, progress=False,
                          allow_degenerate=True)
    vs = pl.read_parquet(tmp_path / "p" / "vocab" / "s.parquet")
    vi = pl.read_parquet(tmp_path / "p" / "vocab" / "i.parquet")
    assert vs["s"].to_list() == ["a10", "a9", "b", "zz"] and vs["id"].to_list() == [1, 2, 3, 4]
    assert vi["i"].to_list() == [-7, 4, 30, 100] and vi["i"].dtype == pl.Int64  # numeric, not string, order
    assert meta.field("s").frequencies == [2, 2, 2, 2, 2]  # OOV row counts the missing values
    data = pl.read_parquet(tmp_path / "p" / "train")
    assert data["s"].to_list() == [4, 3, 1, 2, 0] * 2 and data["i"].to_list() == [3, 2, 1, 4, 0] * 2


def test_source_read_once_and_spill_removed(tmp_path: Path):
    df = _frame(2000)
    calls = []
    base = chunked(df.with_columns(pl.col("a").alias("h")), 300)

    def source():
        calls.append(1)
        return base()

    spill = tmp_path / "spill"
    meta = build_prepared(source, SCHEMA, tmp_path / "p", dataset="toy", split=SplitSpec(), head_tail=HeadTailSpec(),
                          report=BuildReport(input_rows=len(df)), source={}, progress=False, spill_dir=spill)
    assert len(calls) == 1  # pass 2 reads the spill, not the source
    assert spill.is_dir() and not any(spill.iterdir())  # our spill subdirectory is gone
    assert not (tmp_path / "p" / "_spill").exists() and not (tmp_path / "p.tmp").exists()
    # the default spill location (inside <output>.tmp) gives the same dataset
    again = _build(df, tmp_path / "q", 300)
    assert again.dataset_id == meta.dataset_id and again.sparse == meta.sparse
    a, b = _all(tmp_path / "p", meta), _all(tmp_path / "q", again)
    assert all(a[s].equals(b[s]) for s in a)


def test_spill_removed_when_the_source_fails(tmp_path: Path):
    df = _frame(1000).with_columns(pl.col("a").alias("h"))

    def failing():
        yield from chunked(df, 300)()
        raise ValueError("source broke")

    spill = tmp_path / "spill"
    with pytest.raises(ValueError, match="source broke"):
        build_prepared(failing, SCHEMA, tmp_path / "p", dataset="toy", split=SplitSpec(), head_tail=HeadTailSpec(),
                       report=BuildReport(input_rows=len(df)), source={}, progress=False, spill_dir=spill)
    assert not any(spill.iterdir())
    assert not (tmp_path / "p").exists()


def test_all_null_chunk_before_typed_chunks(tmp_path: Path):
    """A chunk whose column is all-null (dtype Null) must not fix the field's dtype."""
    first = pl.DataFrame({"s": [None, None], "i": [None, None], "label": [0.0, 1.0]},
                         schema={"s": pl.Null, "i": pl.Null, "label": pl.Float32})
    rest = pl.DataFrame({"s": ["x", "y", "x"], "i": [5, 6, 5], "label": [0.0, 1.0, 0.0]},
                        schema={"s": pl.String, "i": pl.Int64, "label": pl.Float32})

    def source():
        yield first.with_columns(pl.Series(ROW_COL, [0, 1], dtype=pl.UInt64))
        yield rest.with_columns(pl.Series(ROW_COL, [2, 3, 4], dtype=pl.UInt64))

    schema = Schema(sparse=(SparseSpec("s"), SparseSpec("i")))
    meta = build_prepared(source, schema, tmp_path / "p", dataset="nulls", split=SplitSpec(fractions=(1.0, 0.0, 0.0)),
                          head_tail=HeadTailSpec(), report=BuildReport(input_rows=5), source={}, progress=False,
                          allow_degenerate=True)
    assert meta.field("s").frequencies == [2, 2, 1] and meta.field("i").frequencies == [2, 2, 1]
    data = pl.read_parquet(tmp_path / "p" / "train")
    assert data["s"].to_list() == [0, 0, 1, 2, 1] and data["i"].to_list() == [0, 0, 1, 2, 1]


def _expected_ids(values: pl.Series, train: np.ndarray, min_count: int) -> np.ndarray:
    """Reference: final id of every row (count desc, raw value asc over train rows; 0 = rare/missing/unseen)."""
    counts = values.filter(pl.Series(train)).drop_nulls().value_counts(name="n")
    kept = counts.filter(pl.col("n") >= min_count).sort(["n", values.name], descending=[True, False])
    lut = dict(zip(kept[values.name].to_list(), range(1, len(kept) + 1)))
    return np.array([lut.get(v, 0) for v in values.to_list()], dtype=np.int64)


def test_integer_encoders_and_parallel_pass2_keep_ids_and_row_order(tmp_path: Path, monkeypatch):
    """Integer fields through the dense lookup array (range growing down and up across chunks), through the
    switch to the join table once the range is too wide, and through the join table (UInt64), against a
    reference; pass 2 writes each split with several workers, and the split's files read in the listed order
    give its rows in input order (checked with a dense column holding the input row number)."""
    import recsys_transfer.data.prepared as prepared

    monkeypatch.setattr(prepared, "_LUT_MAX_RANGE", 1000)
    rng = np.random.default_rng(3)
    n = 3000
    small = rng.integers(0, 40, n)
    small[n // 2 :] -= 25  # negatives appear only in later chunks: the array grows downward
    small[-200:] += 60  # and upward at the end
    wide = rng.integers(0, 30, n)
    wide[2000:2010] = 10**9  # too wide a range from chunk 7 on: moves to the join table mid-stream
    df = pl.DataFrame({
        "small": pl.Series(small).set(pl.Series(rng.random(n) < 0.1), None),
        "wide": wide,
        "u64": pl.Series(rng.integers(0, 50, n), dtype=pl.UInt64),
        "row": np.arange(n, dtype=np.float32),
        "label": np.zeros(n, dtype=np.float32),
    })
    schema = Schema(sparse=(SparseSpec("small", min_count=2), SparseSpec("wide", min_count=2), SparseSpec("u64")),
                    dense=("row",))
    meta = build_prepared(chunked(df, 256), schema, tmp_path / "p", dataset="ints", split=SplitSpec(),
                          head_tail=HeadTailSpec(), report=BuildReport(input_rows=n), source={}, progress=False,
                          allow_degenerate=True)
    codes = SplitSpec().assign_random(np.arange(n, dtype=np.uint64))
    train = codes == 0
    data = _all(tmp_path / "p", meta)
    for code, split in enumerate(("train", "valid", "test")):
        rows = np.flatnonzero(codes == code)
        got = data[split]
        assert got["row"].to_numpy().astype(np.int64).tolist() == rows.tolist()  # input order across shards
        assert len(meta.split_files[split]) >= 2  # two pass-2 workers each wrote part of the split
        for name, min_count in (("small", 2), ("wide", 2), ("u64", 1)):
            want = _expected_ids(df[name], train, min_count)[rows]
            np.testing.assert_array_equal(got[name].to_numpy(), want, err_msg=f"{split}/{name}")
    vocab = pl.read_parquet(tmp_path / "p" / "vocab" / "wide.parquet")
    assert vocab["wide"].dtype == pl.Int64 and 10**9 in vocab["wide"].to_list()


def _lists_frame(n: int = 3000, seed: int = 1) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    items = [f"i{x}" for x in rng.zipf(1.6, n) % 200]
    hist = [[f"i{x}" for x in rng.zipf(1.6, int(k)) % 250] for k in rng.integers(0, 5, n)]  # empty lists too
    hist[3] = None  # a null list is an empty list
    dense = rng.normal(3.0, 2.0, n)
    dense[rng.random(n) < 0.1] = np.nan
    return pl.DataFrame({
        "item": items,
        "hist": pl.Series(hist, dtype=pl.List(pl.String)),
        "tags": pl.Series([[f"t{x}" for x in rng.integers(0, 6, int(k))] for k in rng.integers(0, 4, n)],
                          dtype=pl.List(pl.String)),
        "x": pl.Series(dense, dtype=pl.Float64).fill_nan(None),
        "label": (rng.random(n) < 0.4).astype(np.float32),
    })


LIST_SCHEMA = Schema(
    sparse=(SparseSpec("item", min_count=2), SparseSpec("hist", min_count=2, multi_valued=True, vocab="item"),
            SparseSpec("tags", multi_valued=True, hash_size=5)),
    dense=(DenseSpec("x", fill="mean", normalize="standard"),), group="item")


def test_list_fields_shared_vocabulary_and_fitted_dense_against_a_reference(tmp_path: Path):
    df = _lists_frame()
    meta = build_prepared(chunked(df, 700), LIST_SCHEMA, tmp_path / "p", dataset="toy", split=SplitSpec(),
                          head_tail=HeadTailSpec(), report=BuildReport(input_rows=len(df)), source={},
                          progress=False)
    train = SplitSpec().assign_random(np.arange(len(df), dtype=np.uint64)) == 0
    items_py, hist_py, tags_py = df["item"].to_list(), df["hist"].to_list(), df["tags"].to_list()
    # the shared vocabulary: training occurrences of item AND hist, min_count 2, ids by (count desc, value asc)
    occ: dict[str, int] = {}
    for k in np.flatnonzero(train):
        for v in [items_py[k], *(hist_py[k] or [])]:
            occ[v] = occ.get(v, 0) + 1
    kept = sorted((v for v, c in occ.items() if c >= 2), key=lambda v: (-occ[v], v))
    ids = {v: i + 1 for i, v in enumerate(kept)}
    item, hist, tags = meta.field("item"), meta.field("hist"), meta.field("tags")
    assert item.vocab_size == hist.vocab_size == len(kept) + 1 and hist.vocab_of == "item" and hist.multi_valued
    assert hist.table_field == "item" and item.table_field == "item" and not item.multi_valued
    assert tags.multi_valued and tags.hashed and tags.vocab_size == 5 and meta.group == "item"
    own_item = np.zeros(item.vocab_size, np.int64)
    own_hist = np.zeros(item.vocab_size, np.int64)
    for k in np.flatnonzero(train):
        own_item[ids.get(items_py[k], 0)] += 1
        for v in hist_py[k] or []:
            own_hist[ids.get(v, 0)] += 1
    assert item.frequencies == own_item.tolist() and hist.frequencies == own_hist.tolist()
    rows = pl.concat([pl.read_parquet(tmp_path / "p" / f) for s in ("train", "valid", "test")
                      for f in meta.split_files[s]])
    assert rows.schema["hist"] == pl.List(pl.Int64) and rows.schema["tags"] == pl.List(pl.Int64)
    order = np.concatenate([np.flatnonzero(SplitSpec().assign_random(np.arange(len(df), dtype=np.uint64)) == c)
                            for c in range(3)])
    for out_row, k in zip(rows.iter_rows(named=True), order[:400]):
        assert out_row["item"] == ids.get(items_py[k], 0)
        assert out_row["hist"] == [ids.get(v, 0) for v in (hist_py[k] or [])]
        assert len(out_row["tags"]) == len(tags_py[k])
    assert sum(len(h or []) for h in hist_py) == rows["hist"].list.len().sum()
    # dense: fill with the training mean of present values, then (x - mean) / std (float64 reference)
    x = df["x"].to_numpy().astype(np.float64)
    present = x[train & ~np.isnan(x)]
    mean, std = present.mean(), present.std()
    ref = (np.where(np.isnan(x), mean, x) - mean) / std
    np.testing.assert_allclose(rows["x"].to_numpy(), ref[order].astype(np.float32), rtol=1e-6, atol=1e-6)
    assert meta.dense_stats["x"]["count"] == len(present)
    again = DatasetMeta.load(tmp_path / "p")
    assert again.field("hist").vocab_of == "item" and again.dense_stats == meta.dense_stats


def test_schema_refuses_a_bad_shared_vocabulary():
    with pytest.raises(ValueError, match="must name another sparse field"):
        Schema(sparse=(SparseSpec("h", vocab="nope"),))
    with pytest.raises(ValueError, match="takes its min_count"):
        Schema(sparse=(SparseSpec("a", min_count=3), SparseSpec("h", vocab="a")))
    with pytest.raises(ValueError, match="normalize must be"):
        DenseSpec("x", normalize="zscore")
