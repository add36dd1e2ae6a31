"""Criteo Kaggle TSV -> prepared dataset: real 8k sample, bad input, CRLF, hashing, streaming."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data.criteo import (
    CAT_FIELDS,
    DENSE_FIELDS,
    INT_FIELDS,
    RAW_COLUMNS,
    dense_transform,
    log_square_bucket,
    prepare_criteo,
    read_criteo,
)
from recsys_transfer.data.prepared import BuildReport, DatasetMeta
from recsys_transfer.data.splits import SPLITS, HeadTailSpec, SplitSpec
from recsys_transfer.errors import DataError

FILES = ("train.tsv", "dev.tsv", "test.tsv")
FILE_LINES = (7200, 409, 391)
SPLIT = SplitSpec(seed=2022)
HT = HeadTailSpec()


# ----------------------------------------------------------------------------------------------------------
# helpers


def _inputs(criteo8k_dir: Path) -> list[Path]:
    return [criteo8k_dir / f for f in FILES]


def _plain_rows(paths: list[Path]) -> list[list[str]]:
    """The independent reference: open() + split('\\t'), no polars."""
    rows = []
    for p in paths:
        with open(p, encoding="utf-8", newline="") as f:
            for line in f:
                rows.append(line.rstrip("\n").rstrip("\r").split("\t"))
    return rows


def _load(out: Path, split: str | None = None) -> pl.DataFrame:
    splits = [split] if split else list(SPLITS)
    return pl.concat([pl.read_parquet(out / s) for s in splits])


def _good_line(rng: np.random.Generator | None = None, label: str = "0") -> str:
    ints = ["1", "", "-2", "5", "100", "", "7", "0", "3", "", "12", "", "4"]
    cats = [f"{i:08x}" for i in range(26)]
    cats[3] = ""
    return "\t".join([label, *ints, *cats])


def _write(path: Path, lines: list[str], eol: str = "\n") -> Path:
    path.write_bytes("".join(line + eol for line in lines).encode())
    return path


def write_synthetic(path: Path, rows: int, seed: int = 0) -> Path:
    """Vectorized Criteo-schema TSV: labels, ints with empties and negatives, Zipf-like 8-hex tokens."""
    rng = np.random.default_rng(seed)
    cols: dict[str, pl.Series] = {"label": pl.Series((rng.random(rows) < 0.25).astype(np.int64))}
    for name in INT_FIELDS:
        v = np.floor(np.exp(rng.normal(2.0, 1.5, rows))).astype(np.int64)
        v[rng.random(rows) < 0.03] *= -1
        cols[name] = pl.Series(v).scatter(np.flatnonzero(rng.random(rows) < 0.2), None)
    for name in CAT_FIELDS:
        k = int(rng.integers(3, 3000))
        pool = pl.Series([f"{x:08x}" for x in rng.integers(0, 2**32, size=k, dtype=np.uint64)])
        s = pool.gather(np.minimum((k * rng.random(rows) ** 3).astype(np.int64), k - 1))
        cols[name] = s.scatter(np.flatnonzero(rng.random(rows) < 0.15), None)
    pl.DataFrame({n: cols[n].alias(n) for n in RAW_COLUMNS}).write_csv(
        path, separator="\t", include_header=False, quote_style="never", null_value=""
    )
    return path


# ----------------------------------------------------------------------------------------------------------
# the real 8k sample


@pytest.fixture(scope="module")
def plain(criteo8k_dir: Path) -> list[list[str]]:
    return _plain_rows(_inputs(criteo8k_dir))


@pytest.fixture(scope="module")
def prepared_min1(criteo8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetMeta]:
    out = tmp_path_factory.mktemp("criteo") / "min1"
    meta = prepare_criteo(_inputs(criteo8k_dir), out, split=SPLIT, head_tail=HT, min_count=1, progress=False)
    return out, meta


@pytest.fixture(scope="module")
def prepared_min10(criteo8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetMeta]:
    out = tmp_path_factory.mktemp("criteo") / "min10"
    meta = prepare_criteo(_inputs(criteo8k_dir), out, split=SPLIT, head_tail=HT, progress=False)
    return out, meta


def test_all_8000_rows_parsed(criteo8k_dir: Path, plain: list[list[str]], prepared_min10) -> None:
    assert [sum(1 for _ in open(criteo8k_dir / f, "rb")) for f in FILES] == list(FILE_LINES)
    assert len(plain) == 8000 and all(len(r) == 40 for r in plain)
    out, meta = prepared_min10
    assert meta.input_rows == 8000 and meta.skipped_rows == 0 and meta.skip_reasons == {}
    assert meta.total_rows == 8000 and len(_load(out)) == 8000
    codes = SPLIT.assign_random(np.arange(8000, dtype=np.uint64))
    assert meta.split_rows == {name: int((codes == i).sum()) for i, name in enumerate(SPLITS)}
    assert meta.sparse_names == [*INT_FIELDS, *CAT_FIELDS]
    assert meta.dense == list(DENSE_FIELDS) and meta.labels == ["label"]
    assert DatasetMeta.load(out) == meta


def test_null_counts_match_plain_python(criteo8k_dir: Path, plain: list[list[str]]) -> None:
    raw = pl.concat(list(read_criteo(_inputs(criteo8k_dir), chunk_rows=1000)))
    assert len(raw) == 8000
    assert raw["__row"].to_list() == list(range(8000))
    for j, name in enumerate(RAW_COLUMNS[1:], start=1):
        expected = sum(1 for r in plain if r[j] == "")
        assert raw[name].null_count() == expected, name
    # values, not just nulls: integers and tokens round-trip exactly
    assert raw["I5"].to_list() == [int(r[5]) if r[5] else None for r in plain]
    assert raw["C7"].to_list() == [r[20] or None for r in plain]


def test_label_mean(prepared_min10) -> None:
    out, _ = prepared_min10
    labels = _load(out)["label"]
    assert labels.dtype == pl.Float32
    assert int(labels.sum()) == 1728
    assert labels.mean() == pytest.approx(1728 / 8000)


@pytest.mark.parametrize("min_count", [1, 10])
def test_vocab_sizes_match_counter_on_train_rows(plain, prepared_min1, prepared_min10, min_count: int) -> None:
    out, meta = prepared_min1 if min_count == 1 else prepared_min10
    train = SPLIT.assign_random(np.arange(len(plain), dtype=np.uint64)) == 0
    for name in ("C1", "C3", "C9", "C16", "C26"):
        j = RAW_COLUMNS.index(name)
        counts = Counter(r[j] for r, t in zip(plain, train) if t and r[j] != "")
        kept = {v: c for v, c in counts.items() if c >= min_count}
        field = meta.field(name)
        assert field.vocab_size == len(kept) + 1, name  # + the OOV row
        assert not field.hashed and field.min_count == min_count
        # ids in frequency order (ties by raw value) and the OOV row counts what was dropped or missing
        vocab = pl.read_parquet(out / "vocab" / f"{name}.parquet")
        expected_order = sorted(kept, key=lambda v: (-kept[v], v))
        assert vocab.sort("id")[name].to_list() == expected_order
        n_train_missing = sum(1 for r, t in zip(plain, train) if t and r[j] == "")
        dropped = sum(c for c in counts.values() if c < min_count)
        assert field.frequencies[0] == n_train_missing + dropped
        assert field.frequencies[1:] == [kept[v] for v in expected_order]


def test_ids_in_range_and_missing_maps_to_oov(plain, prepared_min1) -> None:
    out, meta = prepared_min1
    data = _load(out)
    for f in meta.sparse:
        col = data[f.name]
        assert col.dtype == pl.Int64 and 0 <= col.min() and col.max() < f.vocab_size
    # row order inside the splits is input order: train rows of the file, in order
    train = SPLIT.assign_random(np.arange(len(plain), dtype=np.uint64)) == 0
    train_rows = [r for r, t in zip(plain, train) if t]
    ids = pl.read_parquet(out / "train")["C3"].to_list()
    vocab = dict(pl.read_parquet(out / "vocab" / "C3.parquet").select("C3", "id").iter_rows())
    assert ids == [vocab[r[16]] if r[16] else 0 for r in train_rows]
    dense = pl.read_parquet(out / "train")["dense_I2"].to_list()
    expected = [math.log1p(max(int(r[2]), 0)) if r[2] else 0.0 for r in train_rows]
    assert dense == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# transformations


def test_log_square_bucketing_table() -> None:
    # hand computed: ln(3)^2 = 1.207, ln(4)^2 = 1.922, ln(10)^2 = 5.302, ln(100)^2 = 21.21,
    # ln(1000)^2 = 47.72, ln(65535)^2 = 122.99; v <= 2 (negatives included) is its own bucket
    table = {-5: -5, -1: -1, 0: 0, 1: 1, 2: 2, 3: 1, 4: 1, 7: 3, 8: 4, 10: 5, 100: 21, 1000: 47, 65535: 122}
    s = pl.DataFrame({"v": [*table, None]}, schema={"v": pl.Int64})
    got = s.select(log_square_bucket(pl.col("v")))["v"].to_list()
    assert got == [*table.values(), None]
    dense = s.select(dense_transform(pl.col("v")))["v"].to_list()
    assert dense == pytest.approx([math.log1p(max(v, 0)) for v in table] + [0.0], rel=1e-6)


def test_hashing_mode_bounded_ids(criteo8k_dir: Path, tmp_path: Path) -> None:
    meta = prepare_criteo(
        _inputs(criteo8k_dir), tmp_path / "h", split=SPLIT, head_tail=HT, hash_size=64, progress=False
    )
    data = _load(tmp_path / "h")
    for name in CAT_FIELDS:
        f = meta.field(name)
        assert f.hashed and f.vocab_size == 64
        assert data[name].min() >= 0 and data[name].max() < 64
        assert not (tmp_path / "h" / "vocab" / f"{name}.parquet").exists()
    assert not meta.field("I1").hashed  # bucketed integers keep their (tiny) vocabulary
    # missing tokens hash to the OOV row 0, present tokens never do
    raw = pl.concat(list(read_criteo(_inputs(criteo8k_dir))))
    codes = SPLIT.assign_random(raw["__row"].to_numpy())
    train_c3 = pl.read_parquet(tmp_path / "h" / "train")["C3"]
    assert ((train_c3 == 0).to_numpy() == raw.filter(pl.Series(codes == 0))["C3"].is_null().to_numpy()).all()


def test_options_int_and_dense_off(criteo8k_dir: Path, tmp_path: Path) -> None:
    meta = prepare_criteo(
        _inputs(criteo8k_dir), tmp_path / "c", split=SPLIT, head_tail=HT, int_as_categorical=False, dense=False,
        progress=False,
    )
    assert meta.sparse_names == list(CAT_FIELDS) and meta.dense == []
    assert _load(tmp_path / "c").columns == [*CAT_FIELDS, "label"]


# ----------------------------------------------------------------------------------------------------------
# bad input


def _prep(paths: list[Path], out: Path, **kw) -> DatasetMeta:
    """A few hand-written rows (parsing tests): their splits may be empty, which ``prepare`` refuses by default."""
    return prepare_criteo(paths, out, split=SPLIT, head_tail=HT, min_count=1, progress=False, allow_degenerate=True,
                          **kw)


def _expect_error(paths: list[Path], out: Path, where: str, words: str) -> None:
    with pytest.raises(DataError) as info:
        _prep(paths, out)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(where + ": "), msg
    assert words in msg, msg


GOOD = [_good_line(label=str(i % 2)) for i in range(6)]


@pytest.mark.parametrize(
    "bad_line, words, reason",
    [
        ("\t".join(_good_line().split("\t")[:39]), "expected 40 tab-separated fields", "wrong column count"),
        (_good_line() + "\textra", "got 41", "wrong column count"),
        ("", "empty line", "empty line"),
        (_good_line().replace("\t-2\t", "\tabc\t", 1), "I3 must be an integer", "non-integer field"),
        (_good_line().replace("\t-2\t", "\t2.5\t", 1), "I3 must be an integer", "non-integer field"),
        (_good_line().replace("\t-2\t", "\t99999999999999999999\t", 1), "I3 must be an integer", "non-integer field"),
        ("2" + _good_line()[1:], "label must be 0 or 1", "invalid label"),
        ("x" + _good_line()[1:], "label must be 0 or 1", "invalid label"),
        ("\t" + _good_line()[2:], "label must be 0 or 1", "invalid label"),
        ("\t".join(RAW_COLUMNS), "header row not expected", "header row"),
        ("a\rb" + _good_line()[1:], "carriage return", "stray carriage return"),
    ],
)
def test_bad_line_error_and_skip(tmp_path: Path, bad_line: str, words: str, reason: str) -> None:
    path = _write(tmp_path / "bad.tsv", GOOD[:3] + [bad_line] + GOOD[3:])
    _expect_error([path], tmp_path / "out", f"{path}:4", words)
    meta = _prep([path], tmp_path / "out", on_bad_row="skip")
    assert meta.input_rows == 7 and meta.skipped_rows == 1 and meta.skip_reasons == {reason: 1}
    assert meta.total_rows == 6


def test_header_row_on_line_1_of_a_later_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.tsv", GOOD)
    b = _write(tmp_path / "b.tsv", ["label\t" + "\t".join(RAW_COLUMNS[1:])] + GOOD)
    _expect_error([a, b], tmp_path / "out", f"{b}:1", "header row not expected")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.tsv"
    lines = [line.encode() for line in GOOD]
    lines.insert(2, _good_line().replace("00000005", "0000\xff05").encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    _expect_error([path], tmp_path / "out", f"{path}:3", "invalid UTF-8")
    meta = _prep([path], tmp_path / "out", on_bad_row="skip")
    assert meta.skip_reasons == {"invalid UTF-8": 1} and meta.total_rows == 6


def test_compensating_column_counts_are_caught(tmp_path: Path) -> None:
    """39 + 41 fields on two lines keep the block's total tab count right; the 41-field line must still fail."""
    short = "\t".join(_good_line().split("\t")[:39])
    path = _write(tmp_path / "c.tsv", GOOD[:2] + [short, _good_line() + "\tx"] + GOOD[2:])
    _expect_error([path], tmp_path / "out", f"{path}:3", "got 39")
    meta = _prep([path], tmp_path / "out", on_bad_row="skip")
    assert meta.skip_reasons == {"wrong column count": 2} and meta.input_rows == 8


def test_missing_and_empty_file(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.tsv", GOOD)
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match=f"^{missing}: no such file"):
        _prep([good, missing], tmp_path / "out")
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=f"^{empty}: empty file"):
            _prep([good, empty], tmp_path / "out", on_bad_row=mode)
    assert not (tmp_path / "out").exists()


def test_error_line_numbers_across_chunks_and_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.tsv", [_good_line()] * 1000)
    lines = [_good_line()] * 500
    lines[437] = lines[437].replace("\t-2\t", "\tnan\t", 1)
    b = _write(tmp_path / "b.tsv", lines)
    with pytest.raises(DataError, match=rf"^{b}:438: I3 must be an integer"):
        prepare_criteo([a, b], tmp_path / "out", split=SPLIT, head_tail=HT, chunk_rows=64, progress=False,
                       allow_degenerate=True)


def test_skip_keeps_the_split_of_good_rows(tmp_path: Path) -> None:
    """__row numbers kept records only: a file with bad lines inserted prepares exactly like the clean one."""
    clean = write_synthetic(tmp_path / "clean.tsv", 3000, seed=3)
    lines = clean.read_text().splitlines()
    dirty_lines = list(lines)
    for at, bad in [(0, "\t".join(RAW_COLUMNS)), (100, "1\tx"), (2000, ""), (2999, "7" + lines[5][1:])]:
        dirty_lines.insert(at, bad)
    dirty = _write(tmp_path / "dirty.tsv", dirty_lines)
    m1 = _prep([clean], tmp_path / "o1", chunk_rows=700)
    m2 = _prep([dirty], tmp_path / "o2", on_bad_row="skip", chunk_rows=700)
    assert m2.input_rows == 3004 and m2.skipped_rows == 4
    assert m2.skip_reasons == {"header row": 1, "wrong column count": 1, "empty line": 1, "invalid label": 1}
    assert m1.split_rows == m2.split_rows  # (dataset_id differs: on_bad_row is part of the source)
    assert [f.frequencies for f in m1.sparse] == [f.frequencies for f in m2.sparse]
    for s in SPLITS:
        assert _load(tmp_path / "o1", s).equals(_load(tmp_path / "o2", s))


def test_crlf_equals_lf(criteo8k_dir: Path, tmp_path: Path) -> None:
    lf_paths, crlf_paths = [], []
    for name in FILES:
        data = (criteo8k_dir / name).read_bytes()
        assert b"\r" not in data
        lf_paths.append(criteo8k_dir / name)
        crlf = tmp_path / name
        crlf.write_bytes(data.replace(b"\n", b"\r\n"))
        crlf_paths.append(crlf)
    m1 = _prep(lf_paths, tmp_path / "lf", chunk_rows=3000)
    m2 = _prep(crlf_paths, tmp_path / "crlf", chunk_rows=3000)
    assert m1.total_rows == m2.total_rows == 8000
    assert [f.frequencies for f in m1.sparse] == [f.frequencies for f in m2.sparse]
    for s in SPLITS:
        assert _load(tmp_path / "lf", s).equals(_load(tmp_path / "crlf", s))
    for name in CAT_FIELDS[:5]:
        v1 = pl.read_parquet(tmp_path / "lf" / "vocab" / f"{name}.parquet")
        v2 = pl.read_parquet(tmp_path / "crlf" / "vocab" / f"{name}.parquet")
        assert v1.equals(v2)


def test_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "nonl.tsv"
    path.write_bytes(("\n".join(GOOD)).encode())
    assert _prep([path], tmp_path / "out").total_rows == 6


# ----------------------------------------------------------------------------------------------------------
# streaming


def test_streaming_200k_rows_small_chunks(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path / "s.tsv", 200_000, seed=1)
    report = BuildReport()
    sizes = [len(c) for c in read_criteo([path], chunk_rows=20_000, report=report)]
    assert sum(sizes) == 200_000 and report.input_rows == 200_000
    assert len(sizes) >= 8 and max(sizes) <= 30_000  # about chunk_rows per chunk, never the whole file
    small = _prep([path], tmp_path / "small", chunk_rows=20_000)
    big = _prep([path], tmp_path / "big", chunk_rows=500_000)
    assert small.input_rows == small.total_rows == 200_000
    assert small.split_rows == big.split_rows
    assert [f.frequencies for f in small.sparse] == [f.frequencies for f in big.sparse]
    for s in SPLITS:
        assert _load(tmp_path / "small", s).equals(_load(tmp_path / "big", s))


def test_spill_dir_is_used_and_cleaned(criteo8k_dir: Path, tmp_path: Path, prepared_min1) -> None:
    """The TSV is parsed once; the spill goes to spill_dir and is removed; the output does not depend on it."""
    spill = tmp_path / "spill"
    meta = _prep(_inputs(criteo8k_dir), tmp_path / "s", spill_dir=spill, chunk_rows=1500)
    assert spill.is_dir() and not any(spill.iterdir())
    ref_dir, ref = prepared_min1
    assert meta.dataset_id == ref.dataset_id and meta.sparse == ref.sparse
    for s in SPLITS:
        assert _load(tmp_path / "s", s).equals(_load(ref_dir, s))
    for name in (*INT_FIELDS, *CAT_FIELDS):
        v1 = pl.read_parquet(tmp_path / "s" / "vocab" / f"{name}.parquet")
        v2 = pl.read_parquet(ref_dir / "vocab" / f"{name}.parquet")
        assert v1.equals(v2), name


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
def test_compressed_day_files_read_like_plain_ones(criteo8k_dir: Path, prepared_min10, tmp_path: Path, codec: str) -> None:
    """A terabyte-log ``day_N.gz`` (or bz2) is read through its magic bytes (the names here say nothing), in
    blocks smaller than the file so lines straddle the decompressed blocks, and prepares exactly as the plain TSVs."""
    import bz2
    import gzip

    opener = {"gzip": gzip.open, "bz2": bz2.open}[codec]
    packed = []
    for k, path in enumerate(_inputs(criteo8k_dir)):
        packed.append(tmp_path / f"day_{k}")
        with opener(packed[-1], "wb") as f:
            f.write(path.read_bytes())
    raw = pl.concat(list(read_criteo(packed, chunk_rows=333)))
    assert raw.drop("__row").equals(pl.concat(list(read_criteo(_inputs(criteo8k_dir)))).drop("__row"))
    out, meta = prepared_min10
    again = prepare_criteo(packed, tmp_path / "out", split=SPLIT, head_tail=HT, progress=False)
    assert again.dataset_id == meta.dataset_id and again.split_rows == meta.split_rows
    for split in SPLITS:
        a = pl.concat([pl.read_parquet(out / f) for f in meta.split_files[split]])
        b = pl.concat([pl.read_parquet(tmp_path / "out" / f) for f in again.split_files[split]])
        assert a.equals(b)


def test_truncated_gzip_is_one_line_error(criteo8k_dir: Path, tmp_path: Path) -> None:
    import gzip

    data = gzip.compress((criteo8k_dir / "train.tsv").read_bytes())
    (tmp_path / "day_0.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="day_0.gz: cannot decompress"):
        list(read_criteo([tmp_path / "day_0.gz"]))
