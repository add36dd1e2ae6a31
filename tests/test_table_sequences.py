"""``prepare --dataset table-sequences`` (recsys_transfer/data/table_sequences.py) on ML-100K's real ratings written
as a plain table, against ``movielens-sequences`` on the same directory and against counts computed here from the
raw file with plain Python."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from recsys_transfer.cli import main
from recsys_transfer.config import PrepareConfig
from recsys_transfer.data.prepare import prepare
from recsys_transfer.errors import UserError

SPLITS = ("train", "valid", "test")
TARGET_FLAGS = (7, 11)  # u.item genre flags of Documentary and Horror (the movielens-sequences default)
COLUMNS = dict(user_column="user_id", item_column="item_id", time_column="timestamp")


def _ratings(ml100k_dir: Path) -> list[tuple[int, int, int, int]]:
    return [tuple(int(x) for x in line.split("\t")) for line in (ml100k_dir / "u.data").read_text().splitlines()]


def _target_items(ml100k_dir: Path) -> set[int]:
    items = set()
    for line in (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines():
        f = line.split("|")
        if any(f[5 + k] == "1" for k in TARGET_FLAGS):
            items.add(int(f[0]))
    return items


@pytest.fixture(scope="module")
def tables(ml100k_dir, tmp_path_factory):
    """u.data as CSV with a header: ``plain.csv`` (user_id, item_id, rating, timestamp), ``domain.csv`` (+ domain:
    1 for Documentary or Horror movies), and ``plain.parquet``."""
    root = tmp_path_factory.mktemp("table-seq")
    ratings = _ratings(ml100k_dir)
    target = _target_items(ml100k_dir)
    (root / "plain.csv").write_text("user_id,item_id,rating,timestamp\n"
                                    + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ratings))
    (root / "domain.csv").write_text("user_id,item_id,rating,timestamp,domain\n"
                                     + "".join(f"{u},{i},{r},{t},{int(i in target)}\n" for u, i, r, t in ratings))
    pl.read_csv(root / "plain.csv").write_parquet(root / "plain.parquet")
    return root, ratings


def _table(inputs, out, task, **kwargs) -> object:
    options = {**COLUMNS, **kwargs}
    return prepare(PrepareConfig(dataset="table-sequences", input=tuple(str(p) for p in inputs), sequence_task=task,
                                 **options), out, progress=False)


def _contents(out: Path) -> dict:
    d = {split: pq.read_table(out / split / "part-00000.parquet").to_pydict() for split in SPLITS}
    d["vocab"] = {p.stem: pq.read_table(p).to_pydict() for p in sorted((out / "vocab").glob("*.parquet"))}
    return d


@pytest.mark.parametrize("task", ["pretrain", "cold"])
def test_with_a_domain_column_equals_movielens_sequences(tables, ml100k_dir, tmp_path, task):
    root, _ = tables
    ml = prepare(PrepareConfig(dataset="movielens-sequences", input=(str(ml100k_dir),), sequence_task=task),
                 tmp_path / "ml", progress=False)
    tab = _table([root / "domain.csv"], tmp_path / "tab", task, domain_column="domain")
    expected, got = _contents(tmp_path / "ml"), _contents(tmp_path / "tab")
    assert got["vocab"] == expected["vocab"]  # items (and the cold task's target classes), ids and counts
    for split in SPLITS:  # the same rows in the same order: items, labels, eval_negatives, raw user / target ids
        assert got[split] == expected[split], split
    assert tab.split_rows == ml.split_rows and tab.skip_reasons == ml.skip_reasons
    assert [f.frequencies for f in tab.sparse] == [f.frequencies for f in ml.sparse]
    assert [t.to_json() for t in tab.tasks] == [t.to_json() for t in ml.tasks]
    assert tab.dataset == f"table-sequences-{task}" and tab.source["domain_column"] == "domain"
    assert {k: tab.source[k] for k in ("ratings", "users", "items", "target_items", "items_vocab")} == \
        {k: ml.source[k] for k in ("ratings", "users", "items", "target_items", "items_vocab")}


def test_without_a_domain_column_every_item_is_source(tables, tmp_path):
    root, ratings = tables
    meta = _table([root / "plain.csv"], tmp_path / "csv", "pretrain")
    by_user = defaultdict(list)
    for u, i, _, t in ratings:
        by_user[u].append((t, i))
    count = defaultdict(int)
    for _, i, _, _ in ratings:
        count[i] += 1
    ids = {item: 2 + k for k, item in enumerate(sorted(count, key=lambda i: (-count[i], i)))}
    keep = sorted(u for u, seq in by_user.items() if len(seq) >= 2)
    assert (len(keep), len(ids)) == (943, 1682)  # every ML-100K user has >= 20 ratings
    assert meta.total_rows == len(keep) and meta.field("items").vocab_size == 2 + len(ids)
    assert meta.source["target_items"] == 0 and meta.source["domain_column"] is None
    rows = {}
    for split in SPLITS:
        part = pq.read_table(tmp_path / "csv" / split / "part-00000.parquet").to_pydict()
        rows.update({u: (split, seq, nxt) for u, seq, nxt in zip(part["user"], part["items"], part["next_item"])})
    assert sorted(rows) == keep
    user = 1
    full = [ids[i] for _, i in sorted(by_user[user])]  # by time, ties by raw item id
    split, seq, nxt = rows[user]
    assert nxt == full[-1] and seq == (full[-50:] if split == "train" else full[:-1][-50:])
    # the same ratings as parquet: the same dataset (ids, splits, rows)
    parquet = _table([root / "plain.parquet"], tmp_path / "pq", "pretrain")
    assert parquet.dataset_id == meta.dataset_id  # the id leaves out the input paths
    assert _contents(tmp_path / "pq") == _contents(tmp_path / "csv")


def test_iso_time_orders_and_text_ids_are_kept(tmp_path):
    """A hand-made table: ISO dates and datetimes (with T or a space, one with an offset) sort by time, not by text;
    text ids keep their type in the vocabulary and the shards; two files are one table."""
    a = tmp_path / "a.tsv"
    a.write_text("when\tuser\tmovie\n"
                 "2021-03-01\tann\tz\n"
                 "2021-01-15 09:30\tann\tx\n"
                 "2021-01-15T09:00:00\tann\ty\n"  # before x, though after it as text ('T' > ' ')
                 "2021-02-01T00:00:00+02:00\tbob\tx\n")  # 2021-01-31 22:00 UTC
    b = tmp_path / "b.csv"
    b.write_text("user,movie,when\nbob,y,2021-01-31 23:00\nbob,w,2020-12-31\n")
    meta = prepare(PrepareConfig(dataset="table-sequences", input=(str(a), str(b)), sequence_task="pretrain",
                                 user_column="user", item_column="movie", time_column="when",
                                 split_fractions=(1.0, 0.0, 0.0), allow_degenerate=True), tmp_path / "o",
                   progress=False)
    vocab = pq.read_table(tmp_path / "o" / "vocab" / "items.parquet")
    assert str(vocab.schema.field("item").type) in ("string", "large_string")
    ids = dict(zip(vocab["item"].to_pylist(), vocab["id"].to_pylist()))
    assert ids == {"x": 2, "y": 3, "w": 4, "z": 5}  # x, y twice (ties by raw id), then w, z
    train = pq.read_table(tmp_path / "o" / "train" / "part-00000.parquet")
    assert str(train.schema.field("user").type) == "string"
    train = train.to_pydict()
    got = dict(zip(train["user"], train["items"]))
    assert got == {"ann": [ids["y"], ids["x"], ids["z"]], "bob": [ids["w"], ids["x"], ids["y"]]}
    assert meta.split_rows == {"train": 2, "valid": 0, "test": 0}


def _cli(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(["prepare", "--dataset", "table-sequences", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    cols = ["--user-column", "u", "--item-column", "i", "--time-column", "t"]
    run = ["--sequence-task", "pretrain", "--output", str(tmp_path / "o"), *cols]
    ok = tmp_path / "ok.csv"
    ok.write_text("u,i,t,domain\n1,10,5,0\n1,11,6,0\n")
    err = _cli([*run, "--input", str(ok), "--domain-column", "dom"], capsys)
    assert f"{ok}: column(s) ['dom'] missing (its columns: ['u', 'i', 't', 'domain'])" in err
    pl.DataFrame({"u": [1], "i": [2], "time": [3]}).write_parquet(tmp_path / "ok.parquet")
    err = _cli([*run, "--input", str(tmp_path / "ok.parquet")], capsys)
    assert f"{tmp_path / 'ok.parquet'}: column(s) ['t'] missing (its columns: ['u', 'i', 'time'])" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("u,i,t\n1,10,5\n1,11,6\n2,,7\n")
    assert f"{empty}:4: empty item value (column 'i')" in _cli([*run, "--input", str(empty)], capsys)
    two = tmp_path / "two.csv"
    two.write_text("u,i,t,domain\n1,10,5,0\n1,11,6,2\n")
    err = _cli([*run, "--input", str(two), "--domain-column", "domain"], capsys)
    assert f"{two}:3: domain value '2' (column 'domain') is not 0 (source) or 1 (target)" in err
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("u,i,t,domain\n1,10,5,0\n2,10,6,1\n")
    err = _cli([*run, "--input", str(mixed), "--domain-column", "domain"], capsys)
    assert f"{mixed}:3: item 10 has domain 1 here but 0 at {mixed}:2" in err
    late = tmp_path / "late.csv"
    late.write_text("u,i,t\n1,10,2021-01-01\n1,11,soon\n")
    assert f"{late}:3: time value 'soon' (column 't') is not an ISO date" in _cli([*run, "--input", str(late)],
                                                                                    capsys)
    err = _cli(["--sequence-task", "profile", "--output", str(tmp_path / "o"), *cols, "--input", str(ok)], capsys)
    assert "sequence_task profile: needs the user attributes" in err
    err = _cli(["--sequence-task", "cold", "--output", str(tmp_path / "o"), *cols, "--input", str(ok)], capsys)
    assert "sequence_task cold: needs domain_column" in err
    text = tmp_path / "ok.txt"
    text.write_text(ok.read_text())
    assert f"{text}: table-sequences reads .csv and .tsv" in _cli([*run, "--input", str(text)], capsys)


def test_options_are_validated():
    with pytest.raises(ValueError, match="item_column: required by table-sequences"):
        PrepareConfig(dataset="table-sequences", sequence_task="pretrain", user_column="u", time_column="t")
    with pytest.raises(ValueError, match="table-sequences options"):
        PrepareConfig(dataset="movielens-sequences", sequence_task="pretrain", user_column="u")
    with pytest.raises(ValueError, match="target_genres: a movielens-sequences option"):
        PrepareConfig(dataset="table-sequences", sequence_task="pretrain", target_genres=("Horror",), **COLUMNS)
    with pytest.raises(ValueError, match="name one column twice"):
        PrepareConfig(dataset="table-sequences", sequence_task="cold", domain_column="item_id", **COLUMNS)
    with pytest.raises(UserError, match="table-sequences takes one or more"):
        prepare(PrepareConfig(dataset="table-sequences", sequence_task="pretrain", **COLUMNS), "unused",
                progress=False)
