"""MovieLens-100K on the real files: counts computed independently here, in plain Python."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_transfer.data.movielens import prepare_movielens
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import DataError, UserError


def _plain(ml100k_dir: Path):
    """Non-neutral ratings in file order, with the user's zip code, counted without polars."""
    zips = {}
    for line in (ml100k_dir / "u.user").read_text().splitlines():
        uid, _age, _g, _occ, z = line.split("|")
        zips[uid] = z
    rows = []
    for line in (ml100k_dir / "u.data").read_text().splitlines():
        u, i, r, _ts = line.split("\t")
        if r != "3":
            rows.append((u, i, zips[u], int(r) > 3))
    return rows


def test_md5_proves_real_file(ml100k_dir: Path):
    assert hashlib.md5((ml100k_dir / "u.data").read_bytes()).hexdigest() == "6e47046882bad158b0efbb84cd5cb987"


def test_row_counts_vocab_and_labels(ml100k_dir: Path, ml100k_prepared):
    out, meta = ml100k_prepared
    rows = _plain(ml100k_dir)
    assert meta.input_rows == 100_000
    assert meta.total_rows == len(rows) == 72_855
    assert meta.skip_reasons == {"rating == 3 (neutral)": 100_000 - 72_855}
    assert meta.total_rows + meta.skipped_rows == meta.input_rows

    codes = SplitSpec().assign_random(np.arange(len(rows)))
    train = [r for r, c in zip(rows, codes) if c == 0]
    assert meta.split_rows == {"train": len(train), "valid": int((codes == 1).sum()), "test": int((codes == 2).sum())}
    # vocabularies are fitted on train only; +1 for the OOV row 0
    assert meta.field("user_id").vocab_size == len({r[0] for r in train}) + 1
    assert meta.field("item_id").vocab_size == len({r[1] for r in train}) + 1
    assert meta.field("zip").vocab_size == len({r[2] for r in train}) + 1
    # label balance over all prepared rows, and per split as written
    positives = sum(r[3] for r in rows)
    labels = pl.concat([pl.read_parquet(out / f) for fs in meta.split_files.values() for f in fs])["label"]
    assert int(labels.sum()) == positives == 55_375
    # zip frequencies equal the train counts of the raw zip strings, in id order
    vocab = pl.read_parquet(out / "vocab" / "zip.parquet")
    counts = Counter(r[2] for r in train)
    freq = meta.field("zip").frequencies
    assert all(freq[i] == counts[z] for z, i in zip(vocab["zip"], vocab["id"]))
    assert sorted(freq[1:], reverse=True) == freq[1:]  # ids are in frequency order


def test_prepared_rows_match_raw_rows(ml100k_dir: Path, ml100k_prepared):
    """Decode the test split back to raw strings and compare with the plain-Python rows of that split."""
    out, meta = ml100k_prepared
    rows = _plain(ml100k_dir)
    codes = SplitSpec().assign_random(np.arange(len(rows)))
    expected = [(u, i, z) for (u, i, z, _), c in zip(rows, codes) if c == 2]
    test = pl.concat([pl.read_parquet(out / f) for f in meta.split_files["test"]])
    decoded = []
    inv = {}
    for name in ("user_id", "item_id", "zip"):
        v = pl.read_parquet(out / "vocab" / f"{name}.parquet")
        inv[name] = dict(zip(v["id"].to_list(), v[name].to_list()))
    for u, i, z in zip(test["user_id"], test["item_id"], test["zip"]):
        decoded.append((inv["user_id"].get(u, "<oov>"), inv["item_id"].get(i, "<oov>"), inv["zip"].get(z, "<oov>")))
    assert len(decoded) == len(expected)
    # values unseen in train decode to OOV; everything else must match exactly
    mismatches = [(d, e) for d, e in zip(decoded, expected) if any(a != b and a != "<oov>" for a, b in zip(d, e))]
    assert mismatches == []
    assert sum(d[1] == "<oov>" for d in decoded) < 0.01 * len(decoded)


def test_head_tail_pareto_on_zip(ml100k_prepared):
    _, meta = ml100k_prepared
    f = meta.field("zip")
    freq = np.asarray(f.frequencies)
    seen = int((freq[1:] > 0).sum())
    assert f.num_head == math.ceil(0.2 * seen)
    head, tail = f.head_mask(), f.tail_mask()
    assert not head[0] and not tail[0] and (head ^ tail)[1:].all()
    assert freq[head].min() >= freq[tail].max()
    assert f.is_head(np.array(f.head_ids)).all()
    # threshold rule
    thr = HeadTailSpec("threshold", min_count=50).head_ids(freq)
    assert set(thr.tolist()) == {i for i in range(1, len(freq)) if freq[i] >= 50}


def test_split_determinism(ml100k_dir: Path, tmp_path: Path, ml100k_prepared):
    out, meta = ml100k_prepared
    again = prepare_movielens(ml100k_dir, tmp_path / "again", progress=False)
    assert again.dataset_id == meta.dataset_id and again.split_rows == meta.split_rows
    for split, files in meta.split_files.items():
        a = pl.concat([pl.read_parquet(out / f) for f in files])
        b = pl.concat([pl.read_parquet(tmp_path / "again" / f) for f in again.split_files[split]])
        assert a.equals(b)
    other = prepare_movielens(ml100k_dir, tmp_path / "other", split=SplitSpec(seed=7), progress=False)
    assert other.split_rows != meta.split_rows
    assert other.dataset_id != meta.dataset_id


def test_temporal_split_orders_by_time(ml100k_dir: Path, tmp_path: Path):
    meta = prepare_movielens(ml100k_dir, tmp_path / "t", split=SplitSpec("temporal"), progress=False)
    n = 72_855
    assert meta.split_rows == {"train": round(0.8 * n), "valid": round(0.1 * n), "test": n - round(0.8 * n) - round(0.1 * n)}
    ts = sorted(int(line.split("\t")[3]) for line in (ml100k_dir / "u.data").read_text().splitlines()
                if line.split("\t")[2] != "3")
    # the latest training week precedes or equals the earliest test week
    weeks = {s: pl.read_parquet(tmp_path / "t" / meta.split_files[s][0])["time"] for s in ("train", "test")}
    vocab = pl.read_parquet(tmp_path / "t" / "vocab" / "time.parquet")
    inv = dict(zip(vocab["id"].to_list(), vocab["time"].to_list()))
    train_weeks = {inv[i] for i in weeks["train"].to_list()}
    known_test_weeks = {inv[i] for i in weeks["test"].to_list() if i != 0}
    # ISO year-week strings sort chronologically; a test week known to train can only be the boundary week
    assert known_test_weeks <= {max(train_weeks)}
    assert (weeks["test"] == 0).mean() > 0.5  # most test weeks were never seen in train: OOV
    assert ts[round(0.8 * n) - 1] <= ts[round(0.9 * n)]


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture()
def ml_copy(ml100k_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ml"
    d.mkdir()
    for name in ("u.user", "u.item"):
        shutil.copy(ml100k_dir / name, d / name)
    lines = (ml100k_dir / "u.data").read_text().splitlines()[:200]
    (d / "u.data").write_text("\n".join(lines) + "\n")
    return d


def _edit(d: Path, line_no: int, text: bytes) -> None:
    lines = (d / "u.data").read_bytes().split(b"\n")
    lines[line_no - 1] = text
    (d / "u.data").write_bytes(b"\n".join(lines))


def test_bad_wrong_column_count(ml_copy: Path, tmp_path: Path):
    _edit(ml_copy, 17, b"1\t2\t4")
    with pytest.raises(DataError, match=r"u\.data:17: expected 4 fields"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)
    meta = prepare_movielens(ml_copy, tmp_path / "o", on_bad_row="skip", progress=False)
    assert meta.skip_reasons["wrong field count"] == 1
    assert meta.input_rows == 200 and meta.total_rows + meta.skipped_rows == 200


def test_bad_non_numeric(ml_copy: Path, tmp_path: Path):
    _edit(ml_copy, 5, b"196\t242\tfour\t881250949")
    with pytest.raises(DataError, match=r"u\.data:5: field 'rating' must be an integer, got 'four'"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)
    meta = prepare_movielens(ml_copy, tmp_path / "o", on_bad_row="skip", progress=False)
    assert meta.skip_reasons["non-integer field"] == 1


def test_bad_header_row(ml_copy: Path, tmp_path: Path):
    body = (ml_copy / "u.data").read_bytes()
    (ml_copy / "u.data").write_bytes(b"user_id\titem_id\trating\ttimestamp\n" + body)
    with pytest.raises(DataError, match=r"u\.data:1: .*header row is not expected"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)


def test_bad_rating_range_and_unknown_user(ml_copy: Path, tmp_path: Path):
    _edit(ml_copy, 3, b"196\t242\t9\t881250949")
    with pytest.raises(DataError, match=r"u\.data:3: rating must be 1\.\.5"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)
    _edit(ml_copy, 3, b"5000\t242\t4\t881250949")
    with pytest.raises(DataError, match=r"u\.data:3: user id 5000 is not in the user file"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)


def test_crlf_equals_lf(ml_copy: Path, tmp_path: Path):
    lf = prepare_movielens(ml_copy, tmp_path / "lf", progress=False)
    for name in ("u.data", "u.user", "u.item"):
        (ml_copy / name).write_bytes((ml_copy / name).read_bytes().replace(b"\n", b"\r\n"))
    crlf = prepare_movielens(ml_copy, tmp_path / "crlf", progress=False)
    assert crlf.dataset_id == lf.dataset_id
    a = pl.read_parquet(tmp_path / "lf" / "train" / "*.parquet")
    b = pl.read_parquet(tmp_path / "crlf" / "train" / "*.parquet")
    assert a.equals(b) and len(a) > 100


def test_bad_non_utf8(ml_copy: Path, tmp_path: Path):
    _edit(ml_copy, 9, b"196\t24\xff2\t4\t881250949")
    with pytest.raises(DataError, match=r"u\.data:9: bytes that are not valid utf-8"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)


def test_bad_missing_and_empty_files(ml_copy: Path, tmp_path: Path):
    (ml_copy / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user: file not found"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)
    (ml_copy / "u.data").write_bytes(b"")
    with pytest.raises(DataError, match=r"u\.data: file is empty"):
        prepare_movielens(ml_copy, tmp_path / "o", progress=False)


def test_unknown_layout(tmp_path: Path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(UserError, match="unknown MovieLens layout"):
        prepare_movielens(tmp_path, tmp_path / "o", progress=False)


def test_ml1m_layout(tmp_path: Path):
    """The ML-1M layout ('::', latin-1, age groups, genres in the title file) on a small file of that format."""
    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "users.dat").write_bytes(b"1::F::1::10::48067\n2::M::56::16::70072\n")
    (d / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                   "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
                                   "3::Caf\u00e9 (2000)::Drama\n".encode("latin-1"))
    ratings = [f"{1 + k % 2}::{1 + k % 3}::{1 + k % 5}::{978300760 + k}" for k in range(500)]
    (d / "ratings.dat").write_text("\n".join(ratings) + "\n")
    meta = prepare_movielens(d, tmp_path / "o", progress=False)
    assert meta.dataset == "ml-1m"
    assert meta.input_rows == 500 and meta.skip_reasons["rating == 3 (neutral)"] == 100
    assert meta.total_rows == 400
    years = pl.read_parquet(tmp_path / "o" / "vocab" / "year.parquet")["year"].to_list()
    assert set(years) == {"1995", "2000"}
    genres = set(pl.read_parquet(tmp_path / "o" / "vocab" / "genres.parquet")["genres"])
    assert "Animation|Children's|Comedy" in genres
    assert DatasetMeta.load(tmp_path / "o").dataset_id == meta.dataset_id


def test_history_and_genre_bag_against_the_raw_files(ml100k_dir: Path, ml100k_lists_prepared, ml100k_prepared):
    """history=5: each rating's last 5 items rated strictly before it by the same user (neutral ratings included,
    ties by line, same second not before), computed here with a sort and bisect over u.data; genres=bag: each
    row's genres are its movie's u.item flags. Totals over every split, contents on the test split."""
    from bisect import bisect_left

    from recsys_transfer.data.movielens import GENRES_100K

    out, meta = ml100k_lists_prepared
    hist, genres = meta.field("history"), meta.field("genres")
    assert hist.multi_valued and hist.vocab_of == "item_id" and hist.table_field == "item_id"
    assert genres.multi_valued and genres.vocab_of is None and genres.vocab_size == 19 + 1
    assert meta.total_rows == 72_855 and meta.dataset_id != ml100k_prepared[1].dataset_id
    ratings = [line.split("\t") for line in (ml100k_dir / "u.data").read_text().splitlines()]
    by_user: dict[str, list] = {}
    for line, (u, i, _r, ts) in enumerate(ratings):
        by_user.setdefault(u, []).append((int(ts), line, i))
    for seq in by_user.values():
        seq.sort()
    times = {u: [t for t, _, _ in seq] for u, seq in by_user.items()}
    expected = []  # (history, item) of every non-neutral rating, file order
    neutral_in_history = 0
    rating_of = {(u, i): r for u, i, r, _ in ratings}
    for u, i, r, ts in ratings:
        if r == "3":
            continue
        k = bisect_left(times[u], int(ts))  # ratings of u strictly before ts
        h = [item for _, _, item in by_user[u][max(0, k - 5) : k]]
        neutral_in_history += sum(rating_of[(u, x)] == "3" for x in h)
        expected.append((h, i))
    assert neutral_in_history > 1000
    frames = {s: pl.concat([pl.read_parquet(out / f) for f in meta.split_files[s]]) for s in meta.split_files}
    assert sum(int(f["history"].list.len().sum()) for f in frames.values()) == sum(len(h) for h, _ in expected)
    total = sum(int(f["history"].list.len().sum()) for f in frames.values())
    assert total == 350_257  # pinned: the count above, for the record
    codes = SplitSpec().assign_random(np.arange(len(expected)))
    want = [e for e, c in zip(expected, codes) if c == 2]
    item_vocab = pl.read_parquet(out / "vocab" / "item_id.parquet")
    item_of = dict(zip(item_vocab["id"].to_list(), item_vocab["item_id"].to_list()))
    genre_vocab = pl.read_parquet(out / "vocab" / "genres.parquet")
    genre_of = dict(zip(genre_vocab["id"].to_list(), genre_vocab["genres"].to_list()))
    flags = {}
    for line in (ml100k_dir / "u.item").read_text(encoding="latin-1").splitlines():
        parts = line.split("|")
        flags[parts[0]] = {GENRES_100K[k] for k, f in enumerate(parts[5:]) if f == "1"}
    test = frames["test"]
    assert len(test) == len(want)
    oov = 0
    for h_ids, g_ids, (h, item) in zip(test["history"].to_list(), test["genres"].to_list(), want):
        got = [item_of.get(x, "<oov>") for x in h_ids]
        assert len(got) == len(h) and all(a == b or a == "<oov>" for a, b in zip(got, h))
        oov += got.count("<oov>")
        assert sorted(genre_of[x] for x in g_ids) == sorted(flags[item])  # a multi-hot bag: each genre once
    assert oov < 10


def test_list_options_are_validated(ml100k_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="genres must be one of"):
        prepare_movielens(ml100k_dir, tmp_path / "a", progress=False, genres="multi")
    with pytest.raises(UserError, match="history must be an integer >= 0"):
        prepare_movielens(ml100k_dir, tmp_path / "b", progress=False, history=-1)


def test_history_lists_ties_and_order_by_hand():
    """Oldest first; ties of earlier seconds by line; a rating of the same second is not before (either way)."""
    from recsys_transfer.data.movielens import history_lists

    user = np.array([1, 1, 2, 1, 1, 1, 2])
    ts = np.array([5, 3, 9, 5, 1, 3, 1])
    item = pl.Series(["p", "q", "x", "r", "s", "t", "y"])
    got = history_lists(user, ts, item, 2).to_list()
    assert got == [["q", "t"], ["s"], ["y"], ["q", "t"], [], ["s"], []]
    assert history_lists(user, ts, item, 5).to_list()[0] == ["s", "q", "t"]
