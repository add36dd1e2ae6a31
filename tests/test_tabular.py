"""``prepare --schema``: schema files, the streaming table reader and the shipped recipes (adult-census,
movielens-multitask, movielens-1m-partial on the real files; bad rows, compression and formats on small files)."""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.schema import compile_expr, load_schema
from recsys_transfer.data.splits import SPLITS, HeadTailSpec, SplitSpec
from recsys_transfer.data.compressed import detect_compression
from recsys_transfer.data.tabular import prepare_tabular, read_cells
from recsys_transfer.errors import DataError, UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pipelines" / "datasets"


def _prepare(schema, inputs, out, **kw):
    kw.setdefault("split", SplitSpec())
    return prepare_tabular(schema if not isinstance(schema, (str, Path)) else load_schema(schema),
                           [Path(p) for p in inputs], out, head_tail=HeadTailSpec(), progress=False, **kw)


def _rows(out: Path, meta: DatasetMeta, split: str | None = None) -> pl.DataFrame:
    splits = [split] if split else list(SPLITS)
    return pl.concat([pl.read_parquet(out / f) for s in splits for f in meta.split_files[s]])


def _train_mask(n: int) -> np.ndarray:
    return SplitSpec().assign_random(np.arange(n, dtype=np.uint64)) == 0


def _write_schema(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------
# the recipes on the real files


@pytest.fixture(scope="module")
def adult(adult_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("adult") / "p"
    meta = _prepare(RECIPES / "adult-census.yaml", [adult_dir / "adult.data", adult_dir / "adult.test"], out)
    return out, meta


def _adult_rows(adult_dir: Path) -> list[list[str]]:
    rows = []
    for name in ("adult.data", "adult.test"):
        lines = (adult_dir / name).read_text().splitlines()[1:]  # the header line the shared copy added
        rows += [line.split(", ") for line in lines if line]
    return rows


def test_adult_recipe_counts_vocabularies_and_dense_statistics(adult_dir: Path, adult):
    out, meta = adult
    raw = _adult_rows(adult_dir)
    assert len(raw) == 48_842 == meta.total_rows == meta.input_rows and meta.skipped_rows == 0
    income = [r[14].rstrip(".") == ">50K" for r in raw]
    married = [r[5] == "Never-married" for r in raw]
    assert sum(income) == 7_841 + 3_846 and sum(married) == 10_683 + 5_434  # the data README's counts
    for label, truth in (("income", income), ("never_married", married)):
        assert sum(meta.label_counts[s][label]["1"] for s in SPLITS) == sum(truth)
    assert [t.name for t in meta.tasks] == ["income", "never_married"] and meta.labels == ["income", "never_married"]
    train = _train_mask(len(raw))
    for field, col in (("workclass", 1), ("education", 3), ("occupation", 6), ("native-country", 13)):
        values = Counter(r[col] for r, t in zip(raw, train) if t and r[col] != "?")
        assert meta.field(field).vocab_size == len(values) + 1, field
        missing = sum(1 for r, t in zip(raw, train) if t and r[col] == "?")
        assert meta.field(field).frequencies[0] == missing, field  # "?" maps to the OOV row
    assert "marital-status" not in meta.sparse_names  # a task is made from it: never a feature
    ages = np.array([float(r[0]) for r, t in zip(raw, train) if t])
    stats = meta.dense_stats["age"]
    assert stats["count"] == train.sum() and stats["mean"] == pytest.approx(ages.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(ages.std(), rel=1e-9)
    gains = np.log1p(np.maximum([float(r[10]) for r in raw], 0))
    rows = _rows(out, meta)
    order = np.concatenate([np.flatnonzero(SplitSpec().assign_random(np.arange(len(raw), dtype=np.uint64)) == c)
                            for c in range(3)])
    ref = (gains - gains[train].mean()) / gains[train].std()
    np.testing.assert_allclose(rows["capital-gain"].to_numpy(), ref[order], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows["income"].to_numpy(), np.array(income, np.float32)[order])


def test_ml100k_multitask_recipe_joins_flags_and_derived_labels(ml100k_dir: Path, tmp_path: Path):
    meta = _prepare(RECIPES / "movielens-multitask.yaml", [ml100k_dir / "u.data"], tmp_path / "p")
    ratings = [line.split("\t") for line in (ml100k_dir / "u.data").read_text().splitlines()]
    assert meta.total_rows == len(ratings) == 100_000
    for label, rule in (("like", lambda r: r >= 4), ("love", lambda r: r == 5)):
        assert sum(meta.label_counts[s][label]["1"] for s in SPLITS) == sum(rule(int(r[2])) for r in ratings)
    users = {u[0]: u for u in (line.split("|") for line in (ml100k_dir / "u.user").read_text().splitlines())}
    items = {i[0]: i for i in (line.split("|") for line in
                               (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines())}
    genre_names = [g.split("|")[0] for g in (ml100k_dir / "u.genre").read_text().splitlines() if g] \
        if (ml100k_dir / "u.genre").exists() else None
    vocab = {f: dict(pl.read_parquet(tmp_path / "p" / "vocab" / f"{f}.parquet").select(f, "id").iter_rows())
             for f in ("gender", "genres", "year", "zip")}
    rows = _rows(tmp_path / "p", meta, "train")
    train = np.flatnonzero(_train_mask(len(ratings)))
    flags = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    assert genre_names is None or genre_names == flags
    for pos in (0, 1, 777, len(train) - 1):
        r = ratings[train[pos]]
        row = rows.row(pos, named=True)
        assert row["gender"] == vocab["gender"][users[r[0]][2]] and row["zip"] == vocab["zip"][users[r[0]][4]]
        item = items[r[1]]
        assert sorted(row["genres"]) == sorted(vocab["genres"][g] for g, f in zip(flags, item[5:]) if f == "1")
        assert row["year"] == vocab["year"].get(item[2][-4:], 0)
    lengths = rows["genres"].list.len().to_numpy()
    truth = [sum(f == "1" for f in items[ratings[k][1]][5:]) for k in train]
    np.testing.assert_array_equal(lengths, truth)


def test_ml1m_partial_recipe_is_not_single_class(ml1m_partial_dir: Path, tmp_path: Path):
    parts = [ml1m_partial_dir / "ratings_part1.tsv", ml1m_partial_dir / "ratings_part2.tsv"]
    meta = _prepare(RECIPES / "movielens-1m-partial.yaml", parts, tmp_path / "p")
    ratings = [line.split("\t") for p in parts for line in p.read_text().splitlines()[1:]]
    assert meta.total_rows == len(ratings) == 299_418
    assert sum(meta.label_counts[s]["love"]["1"] for s in SPLITS) == 68_430
    train = _train_mask(len(ratings))
    assert meta.field("user_id").vocab_size == len({r[0] for r, t in zip(ratings, train) if t}) + 1
    assert meta.field("movie_id").vocab_size == len({r[1] for r, t in zip(ratings, train) if t}) + 1
    assert meta.group == "user_id" and meta.field("genres").multi_valued


# ----------------------------------------------------------------------------------------------------------
# formats


TOY = """
name: toy
format: {delimiter: ",", header: true}
columns:
  - {name: user, kind: categorical}
  - {name: tags, kind: multi_categorical, separator: "|"}
  - {name: price, kind: dense, fill: mean}
  - {name: clicked, kind: label}
"""


def _toy_rows(n: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = ["user,tags,price,clicked"]
    for k in range(n):
        tags = "|".join(f"t{x}" for x in rng.integers(0, 5, int(rng.integers(0, 3))))
        price = "" if k % 7 == 0 else f"{rng.normal(10, 3):.3f}"
        lines.append(f"u{rng.integers(0, 30)},{tags},{price},{int(rng.random() < 0.3)}")
    return lines


@pytest.mark.parametrize("codec", ["gzip", "bz2", "xz"])
def test_compressed_inputs_are_found_by_magic_bytes(tmp_path: Path, codec: str):
    schema = _write_schema(tmp_path, TOY)
    text = ("\n".join(_toy_rows()) + "\n").encode()
    (tmp_path / "plain.csv").write_bytes(text)
    packed = tmp_path / "data.csv"  # the name says nothing
    packed.write_bytes({"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](text))
    assert detect_compression(packed) == codec and detect_compression(tmp_path / "plain.csv") == "none"
    a = _prepare(schema, [tmp_path / "plain.csv"], tmp_path / "a")
    b = _prepare(schema, [packed], tmp_path / "b", chunk_rows=37)  # blocks straddle the decompressed reads
    assert a.dataset_id == b.dataset_id and _rows(tmp_path / "a", a).equals(_rows(tmp_path / "b", b))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(text)[:200])
    with pytest.raises(DataError, match=r"cut.gz: cannot decompress"):
        _prepare(schema, [tmp_path / "cut.gz"], tmp_path / "c")


def test_parquet_and_other_delimiters_quotes_and_encodings_read_alike(tmp_path: Path):
    lines = _toy_rows(300)
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    a = _prepare(_write_schema(tmp_path, TOY), [tmp_path / "a.csv"], tmp_path / "pa")
    frame = pl.read_csv(tmp_path / "a.csv", schema={c: pl.String for c in lines[0].split(",")})
    frame.write_parquet(tmp_path / "a.parquet")
    b = _prepare(tmp_path / "schema.yaml", [tmp_path / "a.parquet"], tmp_path / "pb")
    # "::" as delimiter, no header (names given), latin-1 with CRLF line ends
    (tmp_path / "c.dat").write_bytes(("\r\n".join(line.replace(",", "::") for line in lines[1:]) + "\r\n")
                                     .encode("latin-1"))
    other = TOY.replace('format: {delimiter: ",", header: true}',
                        'format: {delimiter: "::", header: false, names: [user, tags, price, clicked], '
                        'encoding: latin-1}')
    c = _prepare(_write_schema(tmp_path, other), [tmp_path / "c.dat"], tmp_path / "pc")
    # quoted cells holding the delimiter (and a doubled quote): the users become "u1,x" etc.
    quoted = [lines[0]] + [f'"{line.split(",")[0]},x""q",' + line.split(",", 1)[1] for line in lines[1:]]
    (tmp_path / "d.csv").write_text("\n".join(quoted) + "\n")
    d = _prepare(_write_schema(tmp_path, TOY), [tmp_path / "d.csv"], tmp_path / "pd")
    ref = _rows(tmp_path / "pa", a)
    for meta, out in ((b, "pb"), (c, "pc"), (d, "pd")):
        assert meta.split_rows == a.split_rows and _rows(tmp_path / out, meta).equals(ref), out
    users = pl.read_parquet(tmp_path / "pd" / "vocab" / "user.parquet")["user"].to_list()
    assert all(u.endswith(',x"q') for u in users)


def test_temporal_split_orders_by_the_timestamp_column(tmp_path: Path):
    rng = np.random.default_rng(3)
    stamps = rng.integers(14102100, 14103023, 500)
    stamps = [f"{s // 100}{min(s % 100, 23):02d}" for s in stamps]
    lines = ["hour,site,click"] + [f"{h},s{rng.integers(0, 9)},{k % 2}" for k, h in enumerate(stamps)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    schema = _write_schema(tmp_path, """
name: hours
format: {header: true}
columns:
  - {name: hour, kind: timestamp, format: "%y%m%d%H"}
  - {name: hour_of_day, source: hour, kind: categorical, time_part: hour}
  - {name: weekday, source: hour, kind: categorical, time_part: weekday}
  - {name: site, kind: categorical}
  - {name: click, kind: label}
""")
    meta = _prepare(schema, [tmp_path / "t.csv"], tmp_path / "p", split=SplitSpec("temporal"))
    assert meta.split_rows == {"train": 400, "valid": 50, "test": 50}
    hours = pl.read_parquet(tmp_path / "p" / "vocab" / "hour_of_day.parquet")
    assert set(hours["hour_of_day"].to_list()) <= {str(h) for h in range(24)}
    days = set(pl.read_parquet(tmp_path / "p" / "vocab" / "weekday.parquet")["weekday"].to_list())
    assert days <= {"0", "1", "2", "3", "4", "5", "6"} and "1" in days  # 2014-10-21 was a Tuesday (1)
    with pytest.raises(UserError, match="no timestamp column"):
        _prepare(RECIPES / "adult-census.yaml", [tmp_path / "t.csv"], tmp_path / "q", split=SplitSpec("temporal"))


# ----------------------------------------------------------------------------------------------------------
# bad rows and bad schemas


@pytest.mark.parametrize("line,match,reason", [
    ("u1,t1,3.5", r"bad.csv:4: expected 4 fields separated by ',', found 3", "wrong field count"),
    ("u1,t1,abc,1", r"bad.csv:4: column 'price': expected a number, got 'abc'", "price: not a number"),
    ("u1,t1,1.0,", r"bad.csv:4: column 'clicked': expected a label, got None", "clicked: missing label"),
    ("u1,t1,1.0,2", r"bad.csv:4: column 'clicked': expected a number \(0 or 1\), got '2'", "clicked: bad label"),
    ('"u1,t1,1.0,1', r"bad.csv:4: bad quoting", "bad quoting"),
])
def test_a_bad_row_names_file_and_line_or_is_counted(tmp_path: Path, line: str, match: str, reason: str):
    schema = _write_schema(tmp_path, TOY)
    good = _toy_rows(30)
    (tmp_path / "bad.csv").write_text("\n".join(good[:3] + [line] + good[3:]) + "\n\n")
    with pytest.raises(DataError, match=match):
        _prepare(schema, [tmp_path / "bad.csv"], tmp_path / "p", allow_degenerate=True)
    meta = _prepare(schema, [tmp_path / "bad.csv"], tmp_path / "p", on_bad_row="skip", allow_degenerate=True)
    assert meta.skip_reasons == {reason: 1, "blank line": 1} and meta.total_rows == 30
    assert meta.input_rows == 32


def test_invalid_utf8_and_header_mismatch(tmp_path: Path):
    schema = _write_schema(tmp_path, TOY)
    good = _toy_rows(10)
    (tmp_path / "a.csv").write_bytes(("\n".join(good[:5]) + "\n").encode() + b"u\xff,t,1,0\n")
    with pytest.raises(DataError, match=r"a.csv:6: bytes that are not valid utf-8"):
        _prepare(schema, [tmp_path / "a.csv"], tmp_path / "p")
    (tmp_path / "b.csv").write_text("user,tags,cost,clicked\nu,t,1,0\n")
    (tmp_path / "c.csv").write_text("\n".join(good) + "\n")
    with pytest.raises(DataError, match=r"b.csv:1: header .* differs from the first input's"):
        _prepare(schema, [tmp_path / "c.csv", tmp_path / "b.csv"], tmp_path / "p")


def test_filters_are_counted_skip_reasons(tmp_path: Path):
    (tmp_path / "r.tsv").write_text("".join(f"{u}\t{i}\t{r}\n" for u, i, r in
                                            [(1, 1, 5), (1, 2, 3), (2, 1, 4), (2, 3, 3), (3, 2, 1)] * 20))
    schema = _write_schema(tmp_path, """
name: ratings
format: {delimiter: "\\t", header: false, names: [user, item, rating]}
columns:
  - {name: user, kind: categorical}
  - {name: item, kind: categorical}
  - {name: rating, kind: drop, type: int}
labels:
  - {name: like, expr: "rating > 3"}
filters:
  - {expr: "rating != 3", reason: "rating == 3 (neutral)"}
""")
    meta = _prepare(schema, [tmp_path / "r.tsv"], tmp_path / "p")
    assert meta.skip_reasons == {"rating == 3 (neutral)": 40} and meta.total_rows == 60
    assert sum(meta.label_counts[s]["like"]["1"] for s in SPLITS) == 40


@pytest.mark.parametrize("body,match", [
    ("columns:\n  - {name: a, kind: categorical, colour: red}", r"columns\[0\]: unknown key\(s\) \['colour'\]"),
    ("columns:\n  - {name: a, kind: dense, min_count: 3}", r"'min_count' does not apply to kind 'dense'"),
    ("columns:\n  - {name: a, kind: label}\nlabels:\n  - {name: b, expr: 'a == \"x\"'}", r"compares num with str"),
    ("columns:\n  - {name: a, kind: label}\nlabels:\n  - {name: b, expr: 'nope > 1'}", r"unknown column 'nope'"),
    ("columns:\n  - {name: a, kind: label}\nlabels:\n  - {name: b, expr: '__import__(\"os\")'}", r"unsupported part"),
    ("columns:\n  - {name: a, kind: categorical}", r"no label"),
])
def test_schema_mistakes_are_one_line_errors(tmp_path: Path, body: str, match: str):
    with pytest.raises(UserError, match=match):
        load_schema(_write_schema(tmp_path, f"name: s\nformat: {{header: true}}\n{body}\n"))


def test_every_input_column_must_be_described(tmp_path: Path):
    (tmp_path / "a.csv").write_text("user,tags,price,clicked,extra\nu,t,1,0,x\n")
    with pytest.raises(UserError, match=r"column\(s\) \['extra'\] of the input are not described"):
        _prepare(_write_schema(tmp_path, TOY), [tmp_path / "a.csv"], tmp_path / "p")
    (tmp_path / "b.csv").write_text("user,tags,clicked\nu,t,0\n")
    with pytest.raises(UserError, match=r"column\(s\) \['price'\] not in the input"):
        _prepare(tmp_path / "schema.yaml", [tmp_path / "b.csv"], tmp_path / "p")


def test_expressions_match_a_python_reference():
    frame = pl.DataFrame({"r": [1, 3, 4, 5, None], "g": ["a", "b", "a", "c", None]})
    types = {"r": "num", "g": "str"}
    cases = {
        "r >= 4 and g in ['a', 'c']": [False, False, True, True, None],
        "not (r == 3) or g == 'b'": [True, True, True, True, None],
        "1 < r * 2 - 1 <= 7": [False, True, True, False, None],
        "is_null(g)": [False, False, False, False, True],
        "g not in ['a']": [False, True, False, True, None],
    }
    for text, want in cases.items():
        got = frame.select(compile_expr(text, types)).to_series().to_list()
        assert got[:4] == want[:4], text


def test_cli_prepare_schema_bad_row_is_one_line_exit_2(tmp_path: Path):
    _write_schema(tmp_path, TOY)
    (tmp_path / "a.csv").write_text("user,tags,price,clicked\nu,t,1,0\nu,t,1\n")
    proc = subprocess.run([sys.executable, "-m", "recsys_transfer", "prepare", "--schema", str(tmp_path / "schema.yaml"),
                           "--input", str(tmp_path / "a.csv"), "--output", str(tmp_path / "p"), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'a.csv'}:3: expected 4 fields")


def test_read_cells_marks_missing_cells(tmp_path: Path):
    (tmp_path / "a.csv").write_text("a,b\n1,?\n,x\n")
    frame = pl.concat(list(read_cells([tmp_path / "a.csv"], load_schema(_write_schema(tmp_path, """
name: s
format: {header: true, na_values: ["?"]}
columns:
  - {name: a, kind: label}
  - {name: b, kind: categorical}
""")).format)))
    assert frame["a"].to_list() == ["1", None] and frame["b"].to_list() == [None, "x"]
    assert frame["__line"].to_list() == [2, 3]


def test_python_csv_agrees_on_the_adult_header(adult_dir: Path):
    with open(adult_dir / "adult.data", newline="") as f:
        header = next(csv.reader(f, skipinitialspace=True))
    schema = load_schema(RECIPES / "adult-census.yaml")
    assert sorted(header) == sorted({s for c in schema.columns for s in c.sources})


def test_adult_pipeline_prepares_and_trains_two_tasks(adult_dir: Path, tmp_path: Path):
    """The recipe's training config end to end: the schema is named in data.prepare, both tasks are learned (AUC
    well above chance after one epoch), and a dataset's group column is the group-AUC field by default."""
    from recsys_transfer.config import load_config
    from recsys_transfer.train.run import run_training

    cfg = load_config(REPO / "pipelines" / "adult-census.yaml", [
        f"data.path={tmp_path / 'data'}", f"data.prepare.schema={RECIPES / 'adult-census.yaml'}",
        f"data.prepare.input=[{adult_dir / 'adult.data'}, {adult_dir / 'adult.test'}]",
        "train.epochs=1", "train.progress=false"])
    metrics = run_training(cfg, tmp_path / "run")
    test = metrics["test"]
    assert test["income"]["auc"] > 0.85 and test["never_married"]["auc"] > 0.9, test
    assert "gauc" not in test["income"]  # adult has no group column


def test_movielens_list_options_reach_prepare_from_a_config(ml100k_dir: Path, tmp_path: Path):
    from recsys_transfer.config import PrepareConfig
    from recsys_transfer.data.prepare import prepare

    meta = prepare(PrepareConfig(dataset="movielens", input=(str(ml100k_dir),), genres="bag", history=3),
                   tmp_path / "p", progress=False)
    assert meta.field("genres").multi_valued and meta.field("history").vocab_of == "item_id"
    assert meta.field("history").vocab_size == meta.field("item_id").vocab_size
    with pytest.raises(ValueError, match="MovieLens options"):
        PrepareConfig(dataset="criteo", history=3)
    with pytest.raises(ValueError, match="either dataset"):
        PrepareConfig(dataset="movielens", schema="x.yaml")
