"""The dataset recipes in pipelines/datasets/ (Criteo CSV and TSV, Avazu, Ali-CCP) and their training configs:
the Criteo recipes against ``prepare_criteo`` on the real 8k sample, Avazu and Ali-CCP on files of their exact
layouts (tests/layouts.py) against counts made here, independently, from the written file."""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from layouts import (
    ALI_CCP_DENSE,
    ALI_CCP_SPARSE,
    AVAZU_HEADER,
    criteo_tsv_to_csv,
    write_ali_ccp,
    write_avazu,
)

from recsys_transfer.config import load_config
from recsys_transfer.data.criteo import prepare_criteo
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.schema import load_schema
from recsys_transfer.data.splits import SPLITS, HeadTailSpec, SplitSpec
from recsys_transfer.data.tabular import prepare_tabular
from recsys_transfer.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "pipelines" / "datasets"
CRITEO_FILES = ("train.tsv", "dev.tsv", "test.tsv")
SPLIT = SplitSpec(seed=2022)
HT = HeadTailSpec()


def _prepare(recipe: str, inputs: list[Path], out: Path, split: SplitSpec = SPLIT) -> DatasetMeta:
    return prepare_tabular(load_schema(RECIPES / f"{recipe}.yaml"), inputs, out, split=split, head_tail=HT,
                           progress=False)


def _rows(out: Path, split: str) -> pl.DataFrame:
    meta = json.loads((out / "meta.json").read_text())
    return pl.concat([pl.read_parquet(out / f) for f in meta["split_files"][split]])


def _assert_same_dataset(out_a: Path, a: DatasetMeta, out_b: Path, b: DatasetMeta) -> None:
    """Same rows per split, fields, vocabulary sizes and vocabularies, and the same ids / dense values / labels on
    every row of every split (the column order too)."""
    assert a.split_rows == b.split_rows
    assert [(f.name, f.vocab_size) for f in a.sparse] == [(f.name, f.vocab_size) for f in b.sparse]
    assert a.dense == b.dense and a.labels == b.labels
    for f in a.sparse:
        assert pl.read_parquet(out_a / "vocab" / f"{f.name}.parquet").equals(
            pl.read_parquet(out_b / "vocab" / f"{f.name}.parquet")), f.name
    for split in SPLITS:
        x, y = _rows(out_a, split), _rows(out_b, split)
        assert x.columns == y.columns and x.schema == y.schema, split
        assert x.equals(y), split


# ----------------------------------------------------------------------------------------------------------
# every recipe and training config parses strictly


def test_recipes_and_their_training_configs_load():
    for path in sorted(RECIPES.glob("*.yaml")):
        load_schema(path)
    for name in ("criteo-tsv", "criteo-csv", "avazu", "ali-ccp"):
        cfg = load_config(ROOT / "pipelines" / f"{name}.yaml")
        assert cfg.data.prepare.schema == f"pipelines/datasets/{name}.yaml" and cfg.model.name == "deepfm"
        assert (ROOT / cfg.data.prepare.schema).is_file()
        assert "recsys-transfer prepare --schema" in (ROOT / "pipelines" / f"{name}.yaml").read_text()


# ----------------------------------------------------------------------------------------------------------
# Criteo: the CSV and TSV recipes give exactly prepare_criteo's dataset


@pytest.fixture(scope="module")
def criteo_reference(criteo8k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetMeta]:
    out = tmp_path_factory.mktemp("criteo") / "reference"
    meta = prepare_criteo([criteo8k_dir / f for f in CRITEO_FILES], out, split=SPLIT, head_tail=HT, progress=False)
    return out, meta


def test_criteo_csv_recipe_equals_prepare_criteo(criteo8k_dir: Path, criteo_reference, tmp_path: Path):
    ref_out, ref = criteo_reference
    csv_path = tmp_path / "train.csv"
    assert criteo_tsv_to_csv([criteo8k_dir / f for f in CRITEO_FILES], csv_path) == 8000
    assert csv_path.read_text().splitlines()[0].startswith("Id,Label,I1,I2,")
    meta = _prepare("criteo-csv", [csv_path], tmp_path / "csv")
    assert meta.total_rows == 8000 and meta.input_rows == 8000 and meta.skipped_rows == 0
    assert meta.sparse_names == [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    assert meta.dense == [f"dense_I{i}" for i in range(1, 14)] and meta.labels == ["label"]
    assert meta.sparse[0].min_count == 10
    _assert_same_dataset(ref_out, ref, tmp_path / "csv", meta)


def test_criteo_tsv_recipe_plain_and_gzip_equal_prepare_criteo(criteo8k_dir: Path, criteo_reference,
                                                                tmp_path: Path):
    """The TSV recipe on the plain files, and on each file gzipped (as the terabyte day files come), gives
    prepare_criteo's dataset, with the same dataset id for plain and gzip (the input is not part of it)."""
    ref_out, ref = criteo_reference
    plain = [criteo8k_dir / f for f in CRITEO_FILES]
    gz = []
    for p in plain:
        gz.append(tmp_path / f"{p.stem}.gz")
        with p.open("rb") as src, gzip.open(gz[-1], "wb") as dst:
            shutil.copyfileobj(src, dst)
    a = _prepare("criteo-tsv", plain, tmp_path / "plain")
    b = _prepare("criteo-tsv", gz, tmp_path / "gz")
    _assert_same_dataset(ref_out, ref, tmp_path / "plain", a)
    _assert_same_dataset(tmp_path / "plain", a, tmp_path / "gz", b)
    assert a.dataset_id == b.dataset_id and a.split_files == b.split_files


# ----------------------------------------------------------------------------------------------------------
# Avazu


AVAZU_ROWS = 5000


@pytest.fixture(scope="module")
def avazu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DatasetMeta]:
    d = tmp_path_factory.mktemp("avazu")
    raw = write_avazu(d / "train.csv", AVAZU_ROWS, seed=7)
    return raw, d / "out", _prepare("avazu", [raw], d / "out")


def _raw(path: Path) -> pl.DataFrame:
    """The file's cells as text, read by polars (not the reader under test), plus the hour parsed by datetime."""
    df = pl.read_csv(path, infer_schema=False)
    stamps = [datetime.strptime(h, "%y%m%d%H").replace(tzinfo=timezone.utc) for h in df["hour"]]
    return df.with_columns(pl.Series("hour_of_day", [str(t.hour) for t in stamps]),
                           pl.Series("weekday", [str(t.weekday()) for t in stamps]),
                           pl.Series("__ts", [int(t.timestamp()) for t in stamps]))


def _vocab_size(values: pl.Series, min_count: int) -> int:
    """1 (the OOV row) + the values seen at least ``min_count`` times (missing cells are not values)."""
    counts = values.drop_nulls().value_counts()
    return 1 + int((counts["count"] >= min_count).sum())


def _decode(out: Path, split: str, fields: list[str]) -> pl.DataFrame:
    """The raw values of ``fields`` on the split's rows (id -> value by the vocabulary; OOV -> null)."""
    rows = _rows(out, split)
    cols = []
    for f in fields:
        vocab = pl.read_parquet(out / "vocab" / f"{f}.parquet")
        lookup = dict(zip(vocab["id"].to_list(), vocab[f].cast(pl.String).to_list()))
        cols.append(pl.Series(f, [lookup.get(i) for i in rows[f].to_list()], dtype=pl.String))
    return pl.DataFrame(cols)


def test_avazu_rows_vocabularies_and_labels(avazu):
    raw_path, out, meta = avazu
    raw = _raw(raw_path)
    assert raw.columns[:24] == AVAZU_HEADER and len(raw) == AVAZU_ROWS
    assert raw["hour"].min() == "14102100" and raw["hour"].max() <= "14103023"
    codes = SPLIT.assign_random(np.arange(len(raw), dtype=np.uint64))
    assert meta.input_rows == AVAZU_ROWS and meta.skipped_rows == 0
    assert meta.split_rows == {s: int((codes == k).sum()) for k, s in enumerate(SPLITS)}
    features = ["hour_of_day", "weekday", *[c for c in AVAZU_HEADER if c not in ("id", "click", "hour")]]
    assert meta.sparse_names == features and meta.dense == [] and meta.labels == ["click"]
    train = raw.filter(pl.Series(codes == 0))
    for f in meta.sparse:
        assert f.min_count == 2
        assert f.vocab_size == _vocab_size(train[f.name], 2), f.name
    for k, split in enumerate(SPLITS):
        clicks = raw["click"].filter(pl.Series(codes == k)).cast(pl.Int64)
        assert meta.label_counts[split]["click"] == {"0": int((clicks == 0).sum()), "1": int(clicks.sum())}


def test_avazu_hour_of_day_and_weekday(avazu):
    raw_path, out, meta = avazu
    raw = _raw(raw_path)
    codes = SPLIT.assign_random(np.arange(len(raw), dtype=np.uint64))
    train = raw.filter(pl.Series(codes == 0))
    got = _decode(out, "train", ["hour_of_day", "weekday", "site_id"])
    # every training row: the prepared hour of day and weekday are the parsed hour's (both fields keep every value)
    assert got["hour_of_day"].equals(train["hour_of_day"]) and got["weekday"].equals(train["weekday"])
    known = {"14102100": ("0", "1"), "14102523": ("23", "5"), "14102607": ("7", "6"), "14102715": ("15", "0")}
    for hour, (hod, wd) in known.items():  # 2014-10-21 was a Tuesday (weekday 1; 0 = Monday)
        rows = (train["hour"] == hour).to_numpy()
        if rows.any():
            assert set(got["hour_of_day"].filter(pl.Series(rows))) == {hod}
            assert set(got["weekday"].filter(pl.Series(rows))) == {wd}
    seen = {h for h in train["hour"] if h in known}
    assert len(seen) >= 3
    # a value kept by min_count decodes to itself; a rarer one is OOV (null here)
    kept = train["site_id"].is_in(pl.read_parquet(out / "vocab" / "site_id.parquet")["site_id"].implode())
    assert got["site_id"].filter(kept).equals(train["site_id"].filter(kept))
    assert got["site_id"].filter(~kept).is_null().all() and (~kept).sum() > 0


def test_avazu_temporal_split(tmp_path: Path):
    """With the rows shuffled, the temporal split still puts the earliest 80% of the hours in train, then valid,
    then test (ties in file order), and each split's shards keep the file order."""
    path = write_avazu(tmp_path / "sorted.csv", 2000, seed=3)
    lines = path.read_text().splitlines()
    body = lines[1:]
    np.random.default_rng(0).shuffle(body)
    shuffled = tmp_path / "train.csv"
    shuffled.write_text("\n".join([lines[0], *body]) + "\n")
    meta = _prepare("avazu", [shuffled], tmp_path / "out", split=SplitSpec(kind="temporal"))
    assert meta.split_rows == {"train": 1600, "valid": 200, "test": 200}
    raw = _raw(shuffled)
    order = np.argsort(raw["__ts"].to_numpy(), kind="stable")
    codes = np.empty(len(raw), dtype=np.uint8)
    codes[order[:1600]], codes[order[1600:1800]], codes[order[1800:]] = 0, 1, 2
    for k, split in enumerate(SPLITS):
        part = raw.filter(pl.Series(codes == k))
        got = _decode(tmp_path / "out", split, ["hour_of_day", "weekday"])
        assert got["hour_of_day"].equals(part["hour_of_day"]) and got["weekday"].equals(part["weekday"]), split
    stamps = [raw["__ts"].filter(pl.Series(codes == k)) for k in range(3)]
    assert stamps[0].max() <= stamps[1].min() and stamps[1].max() <= stamps[2].min()


def test_avazu_bad_hour_is_named_by_file_and_line(tmp_path: Path):
    path = write_avazu(tmp_path / "train.csv", 50, seed=1)
    lines = path.read_text().splitlines()
    cells = lines[7].split(",")
    cells[2] = "14102125"  # hour 25
    lines[7] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.csv:8: column 'hour': expected a time in the format '%y%m%d%H', "
                                         r"got '14102125'"):
        _prepare("avazu", [path], tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Ali-CCP


def test_ali_ccp_two_tasks_rows_vocabularies_and_dense(tmp_path: Path):
    files = [write_ali_ccp(tmp_path / f"ali_ccp_{s}_sample.csv", n, seed=k)
             for k, (s, n) in enumerate([("train", 3000), ("val", 1000), ("test", 1000)])]
    meta = _prepare("ali-ccp", files, tmp_path / "out")
    raw = pl.concat([pl.read_csv(f, infer_schema=False) for f in files])
    assert raw.columns == ["click", "purchase", *ALI_CCP_SPARSE, *ALI_CCP_DENSE] and len(raw) == 5000
    codes = SPLIT.assign_random(np.arange(len(raw), dtype=np.uint64))
    assert meta.input_rows == 5000 and meta.skipped_rows == 0
    assert meta.split_rows == {s: int((codes == k).sum()) for k, s in enumerate(SPLITS)}
    assert meta.sparse_names == ALI_CCP_SPARSE and meta.dense == ALI_CCP_DENSE
    assert meta.labels == ["click", "purchase"] and [t.kind for t in meta.tasks] == ["binary", "binary"]
    train = raw.filter(pl.Series(codes == 0))
    for f in meta.sparse:
        assert f.vocab_size == _vocab_size(train[f.name], 1), f.name
    for k, split in enumerate(SPLITS):
        part = raw.filter(pl.Series(codes == k))
        for task in ("click", "purchase"):
            y = part[task].cast(pl.Int64)
            assert meta.label_counts[split][task] == {"0": int((y == 0).sum()), "1": int(y.sum())}
        rows = _rows(tmp_path / "out", split)
        for d in ALI_CCP_DENSE:  # already scaled upstream: the values pass unchanged (float32)
            assert np.array_equal(rows[d].to_numpy(), part[d].cast(pl.Float32).to_numpy()), (split, d)
        # purchase only on clicked rows, as in the upstream data: kept as is, nothing dropped or relabelled
        assert (rows.filter(pl.col("purchase") == 1)["click"] == 1).all()
    assert meta.label_counts["train"]["purchase"]["1"] > 0


# ----------------------------------------------------------------------------------------------------------
# the training configs run on their recipes' layouts


@pytest.mark.parametrize("name, writer", [("avazu", write_avazu), ("ali-ccp", write_ali_ccp)])
def test_training_config_runs_one_epoch(name: str, writer, tmp_path: Path):
    from recsys_transfer.train.run import run_training

    raw = writer(tmp_path / "raw.csv", 3000, seed=5)
    cfg = load_config(ROOT / "pipelines" / f"{name}.yaml", [
        f"data.path={tmp_path / 'data'}", f"data.prepare.input=[{raw}]", "train.epochs=1", "train.progress=false",
        "train.device=cpu", "train.batch_size=512"])
    run_training(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    tasks = ["click", "purchase"] if name == "ali-ccp" else ["click"]
    assert sorted(metrics["test"]) == sorted(tasks)
    assert all(metrics["test"][t]["rows"] == DatasetMeta.load(tmp_path / "data").split_rows["test"] for t in tasks)
