"""Any interaction table -> PeterRec's user-sequence datasets: ``recsys-transfer prepare --dataset table-sequences
--sequence-task {pretrain,cold} --input FILE... --user-column U --item-column I --time-column T [--domain-column D]``.

The input is one or more files read as one table, one interaction per row; the reader is chosen by the suffix:
``.csv`` (comma, ``"`` quotes) and ``.tsv`` (tab, no quoting), each with a header row and optionally gzip / bz2 /
xz compressed (``.csv.gz``; recognized by the first bytes, :mod:`recsys_transfer.data.compressed`), or ``.parquet``.
Only the named columns are read; every file must have them (other columns are ignored, their order is free).

* user and item ids: a column whose values (over every file) all read as integers is stored as integers, as
  MovieLens ids are; otherwise every id is the cell's text without surrounding spaces (parquet string columns stay
  strings; other parquet types are refused). The raw id keeps that type in ``vocab/items.parquet`` (and in the
  shards' ``user`` column, ``int64`` for integer user ids, text otherwise). Ties in the item order (same count,
  same time) are broken by the raw id: numerically for integer ids, by code points for text.
* time: numbers (integers or decimals, e.g. unix seconds) or ISO 8601 dates / datetimes (``2020-01-31``,
  ``2020-01-31 08:15``, ``2020-01-31T08:15:00.250``; a value with a ``Z`` or ``+02:00`` offset is converted to UTC,
  one without is taken as written); the first value of a text column decides which, and every value must then be
  of that kind. Parquet numeric, date and timestamp columns are used as they are (a zoned timestamp in UTC). Only
  the order matters: it sorts each user's items (ties by raw item id, as for MovieLens).
* domain (optional): ``0`` = source domain, ``1`` = target domain, one value per item (an item with both is an
  error). Without it every item is in the source domain, and only ``pretrain`` can be built.

Every row is one interaction (a repeated (user, item) pair appears twice in the user's sequence). The tasks are
exactly :mod:`recsys_transfer.data.sequences`' (the same builder, :func:`~recsys_transfer.data.sequences.
build_sequences`): ``pretrain`` on the source-domain items, ``cold`` on the target domain (users with 1..
``max_target`` target interactions, 99 sampled negatives per row, 70/3/27). ``profile`` needs user attributes that
a generic table does not describe and is refused. ``meta.json``'s ``source`` records ``kind: table-sequences``, the
inputs, the four column names and ``domain_column``; ``dataset`` is ``table-sequences-{task}``.

Bad input is one line naming the file (and the line: the header is line 1, a parquet file's first row is row 1): a
missing column (with the columns the file has), an empty or unreadable user, item or time value, a domain value
other than 0 / 1, an item whose domain differs between two rows (both places named).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.schema import FileFormat
from recsys_transfer.data.sequences import SequenceBuild, TargetDomain, build_sequences
from recsys_transfer.data.tabular import FILE_COL, LINE_COL, read_cells
from recsys_transfer.errors import DataError, UserError

TABLE_TASKS = ("pretrain", "cold")
_TEXT_FORMATS = {".csv": FileFormat(delimiter=","), ".tsv": FileFormat(delimiter="\t", quote=None)}
_COMPRESSED = (".gz", ".bz2", ".xz")
_ISO_NAIVE = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%d")
_ISO_ZONED = ("%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M%#z")


def _kind(path: Path) -> str:
    """``.csv``, ``.tsv`` or ``.parquet``, from the file name (a compression suffix after a text one is allowed)."""
    name = path.name.lower()
    for kind in _TEXT_FORMATS:
        if name.endswith(kind) or any(name.endswith(kind + c) for c in _COMPRESSED):
            return kind
    if name.endswith(".parquet"):
        return ".parquet"
    raise DataError(path, "table-sequences reads .csv and .tsv files (optionally .gz, .bz2, .xz) and .parquet "
                    "files, chosen by the suffix")


def _read_file(path: Path, columns: dict[str, str]) -> pl.DataFrame:
    """The named columns of one file (role -> column name) as read (text: strings, null where empty; parquet: its
    types) under their roles, plus ``__line``."""
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    names = list(columns.values())
    kind = _kind(path)
    if kind == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(path, f"not a readable parquet file ({str(exc).splitlines()[0]})") from None
        have = pf.schema_arrow.names
        missing = [c for c in names if c not in have]
        if missing:
            raise DataError(path, f"column(s) {missing} missing (its columns: {have})")
        frame = pl.from_arrow(pf.read(columns=names))
        frame = frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias(LINE_COL))
    else:
        frames = list(read_cells([path], _TEXT_FORMATS[kind]))
        if not frames:
            raise DataError(path, "no interactions (nothing below the header)")
        have = [c for c in frames[0].columns if c not in (LINE_COL, FILE_COL)]
        missing = [c for c in names if c not in have]
        if missing:
            raise DataError(path, f"column(s) {missing} missing (its columns: {have})")
        frame = pl.concat([f.select(*names, LINE_COL) for f in frames])
    return frame.select(*[pl.col(name).alias(role) for role, name in columns.items()], LINE_COL)


def _first_bad(frame: pl.DataFrame, bad: pl.Expr) -> dict | None:
    rows = frame.filter(bad)
    return rows.row(0, named=True) if len(rows) else None


def _ids(frame: pl.DataFrame, role: str, name: str, path: Path) -> pl.Series:
    """The file's ``role`` ids as Int64 (integer columns) or String, refusing empty values."""
    dtype = frame.schema[role]
    if dtype.is_integer():
        values = frame[role].cast(pl.Int64)
    elif dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        values = frame[role].cast(pl.String).str.strip_chars()
    else:
        raise DataError(path, f"column {name!r} ({role} ids) has type {dtype}; ids must be integers or text")
    empty = values.is_null() | (values == "" if values.dtype == pl.String else False)
    bad = _first_bad(frame.with_columns(empty.alias("__bad")), pl.col("__bad"))
    if bad is not None:
        raise DataError(path, f"empty {role} value (column {name!r})", bad[LINE_COL])
    return values


def _iso(text: pl.Expr) -> pl.Expr:
    """ISO 8601 text -> naive Datetime (offsets converted to UTC), null where it does not parse."""
    t = text.str.strip_chars().str.replace(r"^(\d{4}-\d{2}-\d{2})T", "$1 ")
    naive = [t.str.to_datetime(f, time_unit="us", strict=False, exact=True) for f in _ISO_NAIVE]
    zoned = [t.str.to_datetime(f, time_unit="us", strict=False, exact=True).dt.convert_time_zone("UTC")
             .dt.replace_time_zone(None) for f in _ISO_ZONED]
    return pl.coalesce(naive + zoned)


def _times(frame: pl.DataFrame, name: str, path: Path) -> pl.Series:
    """The file's times as Int64 / Float64 (numbers) or Datetime (dates), refusing empty and unreadable values."""
    col = frame["time"]
    empty = col.is_null() | (col.str.strip_chars() == "" if col.dtype == pl.String else False)
    bad = _first_bad(frame.with_columns(empty.alias("__bad")), pl.col("__bad"))
    if bad is not None:
        raise DataError(path, f"empty time value (column {name!r})", bad[LINE_COL])
    if col.dtype.is_numeric():
        values = col.cast(pl.Float64) if col.dtype.is_float() else col.cast(pl.Int64)
        what = "a finite number"
    elif col.dtype in (pl.Date, pl.Datetime) or isinstance(col.dtype, pl.Datetime):
        values = col.cast(pl.Datetime("us")) if col.dtype == pl.Date else col
        if getattr(values.dtype, "time_zone", None):
            values = values.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return values.cast(pl.Datetime("us"))
    elif col.dtype == pl.String:
        text = col.str.strip_chars()
        if text.head(1).cast(pl.Float64, strict=False).is_not_null().all():  # the first value decides
            as_int = text.cast(pl.Int64, strict=False)
            values = as_int if as_int.is_not_null().all() else text.cast(pl.Float64, strict=False)
            what = f"a number (the column's first value, {text[0]!r}, is one)"
        else:
            values = frame.select(_iso(pl.col("time")))["time"]
            what = "an ISO date or datetime (YYYY-MM-DD[ HH:MM[:SS[.f]]], T or space, optional Z / +HH:MM)"
            bad = _first_bad(frame.with_columns(values.is_null().alias("__bad")), pl.col("__bad"))
            if bad is not None:
                raise DataError(path, f"time value {bad['time']!r} (column {name!r}) is not {what}", bad[LINE_COL])
            return values
    else:
        raise DataError(path, f"column {name!r} (time) has type {col.dtype}; times must be numbers, dates or text")
    ok = values.is_not_null() & (values.is_finite() if values.dtype == pl.Float64 else True)
    bad = _first_bad(frame.with_columns((~ok).alias("__bad")), pl.col("__bad"))
    if bad is not None:
        raise DataError(path, f"time value {bad['time']!r} (column {name!r}) is not {what}", bad[LINE_COL])
    return values


def _domain(frame: pl.DataFrame, name: str, path: Path) -> pl.Series:
    """The file's domain flags (True = target domain) from values 0 / 1."""
    text = frame["domain"].cast(pl.String).str.strip_chars()
    bad = _first_bad(frame.with_columns(text.alias("__text")), ~pl.col("__text").is_in(["0", "1"]).fill_null(False))
    if bad is not None:
        value = "empty" if bad["__text"] in (None, "") else repr(bad["domain"])
        raise DataError(path, f"domain value {value} (column {name!r}) is not 0 (source) or 1 (target)", bad[LINE_COL])
    return (text == "1").alias("target")


def read_interactions(paths: Sequence[str | Path], *, user_column: str, item_column: str, time_column: str,
                      domain_column: str | None = None) -> pl.DataFrame:
    """The interactions of ``paths`` as one frame: ``user``, ``item`` (Int64 or String), ``ts`` (Int64, Float64 or
    Datetime), ``target`` (bool; False everywhere without a domain column), ``__file`` (index into ``paths``) and
    ``__line`` (1-based line or parquet row), in file and line order (module docstring for the rules)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("input: table-sequences takes one or more .csv, .tsv or .parquet files")
    columns = {"user": user_column, "item": item_column, "time": time_column}
    if domain_column is not None:
        columns["domain"] = domain_column
    parts = []
    for k, path in enumerate(paths):
        frame = _read_file(path, columns)
        parts.append(pl.DataFrame([
            _ids(frame, "user", user_column, path).alias("user"),
            _ids(frame, "item", item_column, path).alias("item"),
            _times(frame, time_column, path).alias("ts"),
            _domain(frame, domain_column, path) if domain_column is not None
            else pl.Series("target", [False] * len(frame), dtype=pl.Boolean),
            pl.Series(FILE_COL, [k] * len(frame), dtype=pl.Int32),
            frame[LINE_COL],
        ]))
    for role in ("user", "item"):  # integer ids only if every file's ids read as integers
        as_int = [p[role].cast(pl.Int64, strict=False) if p[role].dtype == pl.String else p[role] for p in parts]
        if all(s.is_not_null().all() for s in as_int):
            parts = [p.with_columns(s.alias(role)) for p, s in zip(parts, as_int)]
        else:
            parts = [p.with_columns(pl.col(role).cast(pl.String)) for p in parts]
    kinds = {"datetime" if p["ts"].dtype == pl.Datetime("us") else "number" for p in parts}
    if len(kinds) > 1:
        dates = next(paths[k] for k, p in enumerate(parts) if p["ts"].dtype == pl.Datetime("us"))
        numbers = next(paths[k] for k, p in enumerate(parts) if p["ts"].dtype != pl.Datetime("us"))
        raise UserError(f"time column {time_column!r}: dates in {dates} but numbers in {numbers}; use one kind")
    df = pl.concat(parts, how="vertical_relaxed")  # Int64 and Float64 times -> Float64
    if domain_column is not None:
        _check_item_domains(df, paths)
    return df


def _check_item_domains(df: pl.DataFrame, paths: list[Path]) -> None:
    """Refuse an item marked 0 on one row and 1 on another, naming its first row and the first that differs."""
    first = df.group_by("item", maintain_order=True).agg(pl.col("target").first().alias("__first"),
                                                         pl.col(FILE_COL).first().alias("__f0"),
                                                         pl.col(LINE_COL).first().alias("__l0"))
    joined = df.join(first, on="item", how="left", maintain_order="left")
    bad = _first_bad(joined, pl.col("target") != pl.col("__first"))
    if bad is not None:
        raise DataError(paths[bad[FILE_COL]], f"item {bad['item']!r} has domain {int(bad['target'])} here but "
                        f"{int(bad['__first'])} at {paths[bad['__f0']]}:{bad['__l0']}", bad[LINE_COL])


def prepare_table_sequences(inputs: Sequence[str | Path], output: str | Path, build: SequenceBuild, *,
                            user_column: str, item_column: str, time_column: str,
                            domain_column: str | None = None) -> DatasetMeta:
    """Interaction files -> the prepared sequence dataset of ``build.task`` in ``output`` (module docstring)."""
    task = build.task
    if task not in TABLE_TASKS:
        raise UserError(f"sequence_task {task!r}: table-sequences builds {' and '.join(TABLE_TASKS)}"
                        + (" (profile needs the user attributes only MovieLens has)" if task == "profile" else ""))
    if task == "cold" and domain_column is None:
        raise UserError("sequence_task cold: needs domain_column (1 marks the target-domain items)")
    df = read_interactions(inputs, user_column=user_column, item_column=item_column, time_column=time_column,
                           domain_column=domain_column)
    provenance = {"kind": "table-sequences", "input": [str(p) for p in inputs],
                  "columns": {"user": user_column, "item": item_column, "time": time_column,
                              "domain": domain_column}}
    domain = TargetDomain(record={"domain_column": domain_column}, name=f"domain column {domain_column!r}",
                          widen="mark more items as domain 1")
    return build_sequences(df.select("user", "item", "ts", "target"), output, build, dataset="table-sequences",
                           provenance=provenance, domain=domain)
