"""MovieLens (100K and 1M) -> prepared dataset, for the CTR task of the harmless-transfer paper's code base.

Task (as in "Learnable Embedding Sizes for Recommender Systems", which the paper builds on): ratings equal to 3
are dropped (reported as a counted skip, reason ``rating == 3 (neutral)``), the label is ``rating > 3``.

Layouts, detected from the directory:

* ML-100K: ``u.data`` (``user \\t item \\t rating \\t unix_ts``), ``u.user`` (``user|age|gender|occupation|zip``),
  ``u.item`` (``item|title|release_date|video_release|url|19 genre flags``, latin-1).
* ML-1M: ``ratings.dat`` (``user::item::rating::ts``), ``users.dat`` (``user::gender::age::occupation::zip``),
  ``movies.dat`` (``item::title (year)::Genre|Genre``), ``::``-separated, latin-1.
* ML-1M partial (``../shared/data/movielens-1m-partial``): the ML-1M ``users.dat`` and ``movies.dat`` with the
  ratings in ``ratings_part*.tsv`` files (tab-separated, header ``user_id movie_id rating timestamp``), read in
  name order as one table. Those files hold ratings 3-5 only, so under the CTR rule every label is 1 and
  ``prepare`` refuses it (a single-class label) unless ``--allow-degenerate``.

Sparse fields (single-valued by default): ``user_id``, ``item_id``, ``time`` (the rating's ISO year-week,
``2019-W07``), ``age`` (ML-100K: years; ML-1M: the published age group code), ``gender``, ``occupation``, ``zip``
(the raw zip code string; the paper's long-tail transfer field), ``year`` (release year; missing -> OOV),
``genres`` (the combination of genres as one value, e.g. ``Action|Comedy``). No dense fields; one label, ``label``.

Options (keyword arguments of :func:`prepare_movielens`; the defaults give the datasets, and dataset ids, of
before they existed):

* ``genres="bag"``: ``genres`` is a list field, the movie's genres as a multi-hot bag (``["Action", "Comedy"]``,
  one id per genre; ML-100K's ``unknown`` flag is a genre like the others; a movie without any flag has an empty
  bag). ``"combination"`` (default) keeps one id per combination.
* ``history=N`` (``N > 0``; default 0, off): a list field ``history``, the user's last ``N`` items rated strictly
  before this rating, oldest first, sharing ``item_id``'s vocabulary (and so its embedding table). Order: by
  timestamp, ties by line order in the ratings file(s); an item rated in the same second as this rating is not
  before it (whatever its line), so every rating of one second gets the same history. The history counts every
  rating of the file, the neutral ones (rating 3) included, although those are dropped as examples: they are
  real interactions (the user watched the movie), and whether a past rating was neutral does not depend on this
  rating's label. Ratings skipped as bad rows (``on_bad_row="skip"``) or of unknown users/items are not in it.

Everything fits in memory (ML-1M is 1,000,209 ratings), so the whole table is one chunk; the builder still fits
vocabularies on the training split only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_transfer.data.prepared import (
    ROW_COL,
    SPLIT_COL,
    BuildReport,
    DatasetMeta,
    Schema,
    SparseSpec,
    build_prepared,
    chunked,
)
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.data.text import read_lines, split_fields, to_int
from recsys_transfer.errors import DataError, UserError

FIELDS = ("user_id", "item_id", "time", "age", "gender", "occupation", "zip", "year", "genres")
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
LAYOUTS = {"ml-100k": ("u.data", "u.user", "u.item"), "ml-1m": ("ratings.dat", "users.dat", "movies.dat"),
           "ml-1m-partial": ("ratings_part1.tsv", "users.dat", "movies.dat")}
PARTIAL_HEADER = "user_id\tmovie_id\trating\ttimestamp"


def detect_layout(directory: Path) -> str:
    if not directory.is_dir():
        raise UserError(f"{directory}: MovieLens input must be a directory holding u.data/u.user/u.item (ML-100K), "
                        "ratings.dat/users.dat/movies.dat (ML-1M) or ratings_part*.tsv/users.dat/movies.dat")
    for name, files in LAYOUTS.items():
        if (directory / files[0]).exists():
            return name
    raise UserError(f"{directory}: unknown MovieLens layout: expected u.data, u.user, u.item (ML-100K), "
                    "ratings.dat, users.dat, movies.dat (ML-1M) or ratings_part*.tsv, users.dat, movies.dat")


def _read_ratings(path: Path, sep: str, on_bad_row: str, skipped: dict[str, int],
                  header: str | None = None) -> tuple[pl.DataFrame, int]:
    lines = read_lines(path, "utf-8")
    if header is not None:  # a required first line; rows are numbered from line 2
        if lines[0] != header:
            raise DataError(path, f"expected the header {header!r}, got {lines[0]!r}", 1)
        lines = lines.slice(1)
    n_input = len(lines)
    df = split_fields(path, lines, sep, 4, ["user", "item", "rating", "ts"], on_bad_row=on_bad_row, skipped=skipped)
    if header is not None:
        df = df.with_columns(pl.col("__line") + 1)
    df = to_int(path, df, ["user", "item", "rating", "ts"], on_bad_row=on_bad_row, skipped=skipped)
    bad = ~df["rating"].is_between(1, 5)
    if bad.any():
        if on_bad_row != "skip":
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(path, f"rating must be 1..5, got {df['rating'][i]}", int(df["__line"][i]))
        skipped["rating out of 1..5"] = skipped.get("rating out of 1..5", 0) + int(bad.sum())
        df = df.filter(~bad)
    return df, n_input


def _check_unique(path: Path, df: pl.DataFrame, key: str) -> None:
    dup = df[key].is_duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[-1])
        raise DataError(path, f"duplicate {key} {df[key][i]}", int(df["__line"][i]))


def _read_table(path: Path, encoding: str, sep: str, names: list[str]) -> pl.DataFrame:
    """A user or item file: every line must have ``len(names)`` fields, the first an integer unique id."""
    df = to_int(path, split_fields(path, read_lines(path, encoding), sep, len(names), names), [names[0]])
    _check_unique(path, df, names[0])
    return df


def _load_100k(d: Path, on_bad_row: str, skipped: dict[str, int]) -> tuple[pl.DataFrame, int]:
    ratings, n_input = _read_ratings(d / "u.data", "\t", on_bad_row, skipped)
    users = _read_table(d / "u.user", "utf-8", "|", ["user", "age", "gender", "occupation", "zip"])
    items = _read_table(d / "u.item", "latin-1", "|",
                        ["item", "title", "release", "video", "url", *[f"g{k}" for k in range(19)]])
    flags = pl.concat_list([pl.col(f"g{k}") == "1" for k in range(19)])
    items = items.select(
        "item",
        pl.col("release").str.slice(-4).cast(pl.Int64, strict=False).cast(pl.Utf8).alias("year"),
        flags.list.eval(pl.arg_where(pl.element())).list.eval(pl.element().replace_strict(list(range(19)), list(GENRES_100K)))
        .list.join("|").alias("genres"),
    )
    return _join(ratings, users, items, d / "u.data", on_bad_row, skipped), n_input


def _load_1m(d: Path, on_bad_row: str, skipped: dict[str, int]) -> tuple[pl.DataFrame, int]:
    if (d / "ratings.dat").exists():
        ratings, n_input = _read_ratings(d / "ratings.dat", "::", on_bad_row, skipped)
        where = d / "ratings.dat"
    else:  # the partial layout: ratings_part*.tsv with a header, one table in file-name order
        parts = sorted(d.glob("ratings_part*.tsv"))
        read = [_read_ratings(p, "\t", on_bad_row, skipped, header=PARTIAL_HEADER) for p in parts]
        ratings = pl.concat([r for r, _ in read])
        n_input = sum(n for _, n in read)
        where = parts[0] if len(parts) == 1 else Path(f"{d}/ratings_part*.tsv")
    users = _read_table(d / "users.dat", "latin-1", "::", ["user", "gender", "age", "occupation", "zip"])
    items = _read_table(d / "movies.dat", "latin-1", "::", ["item", "title", "genres"])
    items = items.select(
        "item",
        pl.col("title").str.extract(r"\((\d{4})\)\s*$").alias("year"),
        pl.col("genres").str.split("|").list.sort().list.join("|").alias("genres"),
    )
    return _join(ratings, users, items, where, on_bad_row, skipped), n_input


def _join(ratings: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, path: Path, on_bad_row: str,
          skipped: dict[str, int]) -> pl.DataFrame:
    df = ratings.join(users.drop("__line"), on="user", how="left", maintain_order="left")
    df = df.join(items, on="item", how="left", maintain_order="left")
    for key, probe in (("user", "gender"), ("item", "genres")):
        missing = df[probe].is_null() if key == "user" else ~df["item"].is_in(items["item"].implode())
        if missing.any():
            if on_bad_row != "skip":
                i = int(np.flatnonzero(missing.to_numpy())[0])
                raise DataError(path, f"{key} id {df[key][i]} is not in the {key} file", int(df["__line"][i]))
            skipped[f"unknown {key}"] = skipped.get(f"unknown {key}", 0) + int(missing.sum())
            df = df.filter(~missing)
    return df


GENRES_OPTIONS = ("combination", "bag")


def history_lists(user: np.ndarray, ts: np.ndarray, item: pl.Series, n: int) -> pl.Series:
    """Per rating (rows in file order), the user's last ``n`` items rated strictly before it, oldest first (module
    docstring: ties by line order, same-second ratings not before each other). Vectorized: the ratings sorted by
    (user, timestamp, line); in that order the history of position ``p`` is positions ``[max(u, s - n), s)``,
    ``u`` the user's first position and ``s`` the first position of ``p``'s (user, second); one gather builds
    every list."""
    m = len(user)
    order = np.lexsort((np.arange(m), ts, user))  # by user, then timestamp, then line
    u, t = user[order], ts[order]
    pos = np.arange(m, dtype=np.int64)
    new_user = np.ones(m, dtype=bool)
    new_user[1:] = u[1:] != u[:-1]
    new_second = new_user.copy()
    new_second[1:] |= t[1:] != t[:-1]
    first_of_user = np.maximum.accumulate(np.where(new_user, pos, 0))
    first_of_second = np.maximum.accumulate(np.where(new_second, pos, 0))
    lo = np.maximum(first_of_user, first_of_second - n)
    lengths = first_of_second - lo
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = np.arange(offsets[-1], dtype=np.int64) + np.repeat(lo - offsets[:-1], lengths)  # sorted positions
    values = item.gather(order[take]).to_arrow()
    lists = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets), values))
    inverse = np.empty(m, dtype=np.int64)
    inverse[order] = pos
    return lists.gather(inverse)  # back to file order


def prepare_movielens(
    input_dir: str | Path,
    output: str | Path,
    *,
    split: SplitSpec = SplitSpec(),
    head_tail: HeadTailSpec = HeadTailSpec(),
    min_count: int = 1,
    on_bad_row: str = "error",
    progress: bool = True,
    overwrite: bool = False,
    allow_degenerate: bool = False,
    genres: str = "combination",
    history: int = 0,
) -> DatasetMeta:
    """Raw MovieLens directory -> prepared dataset in ``output`` (see module docstring; ``genres``:
    ``"combination"`` or ``"bag"``; ``history``: the length of the user-history list field, 0 for none)."""
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if genres not in GENRES_OPTIONS:
        raise UserError(f"genres must be one of {GENRES_OPTIONS}, got {genres!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 0:
        raise UserError(f"history must be an integer >= 0 (0: no history field), got {history!r}")
    d = Path(input_dir)
    layout = detect_layout(d)
    skipped: dict[str, int] = {}
    df, n_input = (_load_100k if layout == "ml-100k" else _load_1m)(d, on_bad_row, skipped)
    if history:  # over every rating, the neutral ones included (module docstring)
        items = df["item"].cast(pl.Utf8)
        df = df.with_columns(history_lists(df["user"].to_numpy(), df["ts"].to_numpy(), items, history)
                             .alias("history"))
    if genres == "bag":  # "Action|Comedy" -> ["Action", "Comedy"]; no genre -> []
        df = df.with_columns(pl.col("genres").str.split("|").list.eval(pl.element().filter(pl.element() != "")))

    neutral = df["rating"] == 3
    skipped["rating == 3 (neutral)"] = int(neutral.sum())
    df = df.filter(~neutral)
    week = pl.from_epoch(pl.col("ts"), time_unit="s").dt
    df = df.select(
        pl.col("user").cast(pl.Utf8).alias("user_id"),
        pl.col("item").cast(pl.Utf8).alias("item_id"),
        pl.format("{}-W{}", week.iso_year(), week.week().cast(pl.Utf8).str.zfill(2)).alias("time"),
        pl.col("age").str.strip_chars(),
        pl.col("gender").str.strip_chars(),
        pl.col("occupation").str.strip_chars(),
        pl.col("zip").str.strip_chars(),
        pl.col("year"),
        pl.col("genres"),
        *([pl.col("history")] if history else []),
        (pl.col("rating") > 3).cast(pl.Float32).alias("label"),
        pl.col("ts"),
    )
    df = df.with_row_index(ROW_COL).with_columns(pl.col(ROW_COL).cast(pl.UInt64))
    if split.kind == "temporal":
        df = df.with_columns(pl.Series(SPLIT_COL, split.assign_temporal(df["ts"].to_numpy())))
    df = df.drop("ts")

    report = BuildReport(input_rows=n_input)
    for reason, n in skipped.items():
        report.skip(reason, n)
    sparse = [SparseSpec(f, min_count=min_count, multi_valued=f == "genres" and genres == "bag") for f in FIELDS]
    if history:
        sparse.append(SparseSpec("history", min_count=min_count, multi_valued=True, vocab="item_id"))
    schema = Schema(sparse=tuple(sparse), dense=(), labels=("label",))
    options = {"genres": genres} if genres != "combination" else {}  # defaults: the source (and id) of before
    if history:
        options["history"] = history
    return build_prepared(
        chunked(df, max(len(df), 1)),
        schema,
        output,
        dataset=layout,
        split=split,
        head_tail=head_tail,
        report=report,
        source={"kind": "movielens", "layout": layout, "input": str(d), "min_count": min_count,
                "on_bad_row": on_bad_row, "task": "drop rating 3; label = rating > 3", **options},
        progress=progress,
        overwrite=overwrite,
        allow_degenerate=allow_degenerate,
    )
