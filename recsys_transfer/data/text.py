"""Reading small delimited text files strictly, with line-numbered errors.

Used by the MovieLens reader (files of at most a few tens of MB). Criteo streams with its own reader.
Every problem is reported as ``path:line: message`` through :class:`~recsys_transfer.errors.DataError`,
or, under ``on_bad_row='skip'``, dropped and counted by the caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsys_transfer.errors import DataError


def read_lines(path: Path, encoding: str = "utf-8") -> pl.Series:
    """All lines of ``path`` (CRLF or LF, trailing newline optional) as a Utf8 series; line k is index k-1."""
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "file is empty")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(path, f"bytes that are not valid {encoding} ({raw[exc.start:exc.start + 1]!r} at column {column})", line) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pl.Series("line", lines, dtype=pl.Utf8).str.strip_suffix("\r")


def split_fields(
    path: Path,
    lines: pl.Series,
    separator: str,
    n_fields: int,
    names: list[str],
    *,
    on_bad_row: str = "error",
    skipped: dict[str, int] | None = None,
) -> pl.DataFrame:
    """Split each line into exactly ``n_fields`` string columns plus ``__line`` (1-based line number).

    A line with another field count raises ``DataError`` (or is skipped and counted under
    ``'wrong field count'`` when ``on_bad_row == 'skip'``). Blank lines count as bad rows too.
    """
    parts = lines.str.split(separator)
    counts = parts.list.len().to_numpy()
    bad = counts != n_fields
    if bad.any():
        if on_bad_row != "skip":
            first = int(np.flatnonzero(bad)[0])
            raise DataError(path, f"expected {n_fields} fields separated by {separator!r}, found {counts[first]}", first + 1)
        if skipped is not None:
            skipped["wrong field count"] = skipped.get("wrong field count", 0) + int(bad.sum())
    keep = ~bad
    df = pl.DataFrame({"__parts": parts.filter(pl.Series(keep)), "__line": np.flatnonzero(keep) + 1})
    return df.select(
        [pl.col("__parts").list.get(k).alias(name) for k, name in enumerate(names)] + [pl.col("__line").cast(pl.Int64)]
    )


def to_int(
    path: Path,
    df: pl.DataFrame,
    columns: list[str],
    *,
    on_bad_row: str = "error",
    skipped: dict[str, int] | None = None,
) -> pl.DataFrame:
    """Cast string columns to Int64 strictly: a non-integer value is an error naming its line (or a counted skip)."""
    cast = df.with_columns([pl.col(c).str.strip_chars().cast(pl.Int64, strict=False).alias(c) for c in columns])
    bad = np.zeros(len(df), dtype=bool)
    for c in columns:
        bad_c = cast[c].is_null().to_numpy()
        if bad_c.any() and on_bad_row != "skip":
            first = int(np.flatnonzero(bad_c)[0])
            raise DataError(path, f"field {c!r} must be an integer, got {df[c][first]!r}"
                            + (" (a header row is not expected)" if first == 0 else ""), int(df["__line"][first]))
        bad |= bad_c
    if bad.any():
        if skipped is not None:
            skipped["non-integer field"] = skipped.get("non-integer field", 0) + int(bad.sum())
        cast = cast.filter(pl.Series(~bad))
    return cast
