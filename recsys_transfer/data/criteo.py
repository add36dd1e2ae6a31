"""Criteo Display Advertising (Kaggle) TSV -> prepared dataset (see :mod:`recsys_transfer.data.prepared`).

Input: raw Criteo Kaggle rows (or the terabyte click logs' ``day_N`` files, same 40 columns), no header, tab
separated, 40 fields per line, plain or compressed (gzip, bz2, xz: detected from the magic bytes)::

    label  I1 .. I13  C1 .. C26

``label`` is ``0`` or ``1``; ``I1..I13`` are integers (``[+-]?[0-9]+`` in int64 range; may be empty or
negative); ``C1..C26`` are opaque tokens (8 hex digits in the real data; may be empty). Several files are read
as ONE stream in the given order (the 8k sample ships as train/dev/test, the full Kaggle set is one
``train.txt`` of 45,840,617 rows); the split is our own seeded random split over that stream. LF and CRLF
line ends are both accepted (a CR right before the LF is dropped).

Columns of the prepared dataset:

* sparse ``C1``..``C26``: vocabulary ids of the raw tokens (or hashed ids with ``hash_size``; only the C fields
  are hashed, the bucketed integer fields are tiny and always get a vocabulary);
* sparse ``I1``..``I13`` (``int_as_categorical=True``): the integer fields bucketed with the log-square rule
  of the Criteo competition winners: ``v > 2 -> floor(ln(v)**2)``, otherwise ``v`` itself (so ``-3, 0, 1, 2``
  are their own buckets); a missing value is null and maps to the OOV row 0;
* dense ``dense_I1``..``dense_I13`` (``dense=True``): ``log1p(max(v, 0))`` as float32, missing -> 0;
* label ``label`` (float32).

Vocabularies are fit on training rows only, with ``min_count`` (default 10, the usual Criteo choice):
values seen fewer times in train, unseen values and missing values all map to the OOV row 0. The raw
columns handed to :func:`~recsys_transfer.data.prepared.build_prepared` are Utf8 for ``C*`` and Int64 (the
bucket) for ``I*``, so ``vocab/I3.parquet`` lists buckets and ``vocab/C3.parquet`` lists hex tokens.

Reading: the files are read once (build_prepared spills the int-coded rows for its second pass). They are cut
into byte blocks of about ``chunk_rows`` lines at line boundaries (the next block is read in a background
thread), so memory is bounded by the chunk size plus the vocabularies, never by the file size.
Each block is parsed by polars' multi-threaded CSV reader (every field as a string) and checked
column-wise: the block's tab count must be exactly 39 per line (polars itself refuses a line with more fields,
so with the total right no line can have fewer), every CR must end a line, the text must be UTF-8, the label
``0``/``1`` and the ``I`` fields integers. No per-row Python runs unless a block holds a bad line; then only
that block is re-checked line by line (:func:`check_line`, the exact rules) to name the file and 1-based line
of the problem: wrong column count, a label other than ``0``/``1``, a non-integer ``I`` field, a header row
(``header row not expected``), an empty line, a stray CR or invalid UTF-8. With ``on_bad_row="error"`` the
first one raises :class:`~recsys_transfer.errors.DataError` (``path:line: message``); with
``on_bad_row="skip"`` bad lines are dropped and counted per reason in the build report (``skip_reasons``,
counted during pass 1 only), and ``__row`` (the split key) numbers only the KEPT records, so the split of the
good records does not depend on which bad lines were around them. A missing or empty file is always an error.

:func:`read_criteo` exposes the validated raw records (label Int8, ``I*`` Int64, ``C*`` Utf8, nulls for
empty fields) for tests and other consumers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_transfer.data.prepared import (
    ROW_COL,
    BuildReport,
    DatasetMeta,
    Schema,
    SparseSpec,
    build_prepared,
)
from recsys_transfer.data.compressed import open_stream
from recsys_transfer.data.prefetch import read_ahead
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import DataError, UserError

LABEL = "label"
INT_FIELDS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CAT_FIELDS: tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
RAW_COLUMNS: tuple[str, ...] = (LABEL, *INT_FIELDS, *CAT_FIELDS)
NUM_COLUMNS = len(RAW_COLUMNS)  # 40
DENSE_PREFIX = "dense_"
DENSE_FIELDS: tuple[str, ...] = tuple(DENSE_PREFIX + f for f in INT_FIELDS)
ON_BAD_ROW = ("error", "skip")

_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)  # exactly what polars' strict-less Utf8 -> Int64 cast accepts
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_HEADER_NAMES = {n.lower() for n in RAW_COLUMNS} | {"click", "clicked", "target", "y"}
_BYTES_PER_ROW_GUESS = 256


# ----------------------------------------------------------------------------------------------------------
# transformations (vectorized)


def log_square_bucket(col: pl.Expr) -> pl.Expr:
    """Int64 bucket of an Int64 expression: ``v > 2 -> floor(ln(v)**2)``, else ``v``; null stays null."""
    return (
        pl.when(col > 2)
        .then((col.cast(pl.Float64).log() ** 2).floor().cast(pl.Int64))
        .otherwise(col)
    )


def dense_transform(col: pl.Expr) -> pl.Expr:
    """Float32 ``log1p(max(v, 0))`` of an Int64 expression; missing -> 0."""
    return col.clip(lower_bound=0).cast(pl.Float64).log1p().fill_null(0.0).cast(pl.Float32)


# ----------------------------------------------------------------------------------------------------------
# the exact, line-by-line checker (only runs on blocks that contain a bad line)


@dataclass(frozen=True)
class _Bad:
    reason: str  # short key, counted in skip_reasons
    message: str  # the one-line explanation in DataError


def check_line(raw: bytes) -> _Bad | None:
    """Why one physical line (without its LF) is not a valid Criteo record, or None if it is."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Bad("invalid UTF-8", f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at column {exc.start + 1}")
    if "\r" in text:
        return _Bad("stray carriage return", "carriage return (\\r) inside the line; only LF or CRLF line ends are allowed")
    if text == "":
        return _Bad("empty line", "empty line; expected 40 tab-separated fields (label, I1..I13, C1..C26)")
    fields = text.split("\t")
    label = fields[0]
    if label not in ("0", "1") and _looks_like_header(fields):
        return _Bad("header row", f"header row not expected (starts {text[:40]!r}); Criteo files have no header")
    if len(fields) != NUM_COLUMNS:
        return _Bad(
            "wrong column count",
            f"expected {NUM_COLUMNS} tab-separated fields (label, I1..I13, C1..C26), got {len(fields)}",
        )
    if label not in ("0", "1"):
        return _Bad("invalid label", f"label must be 0 or 1, got {label!r}")
    for name, value in zip(INT_FIELDS, fields[1:14]):
        if value == "":
            continue
        if not _INT_RE.fullmatch(value) or not (_I64_MIN <= int(value) <= _I64_MAX):
            return _Bad("non-integer field", f"{name} must be an integer or empty, got {value[:40]!r}")
    return None


def _looks_like_header(fields: Sequence[str]) -> bool:
    names = {f.strip().strip('"').lower() for f in fields}
    return fields[0].strip().strip('"').lower() in _HEADER_NAMES or bool(names & {"i1", "c1"})


# ----------------------------------------------------------------------------------------------------------
# reading


_RAW_SCHEMA = {name: pl.Utf8 for name in RAW_COLUMNS}
_TABS_PER_LINE = NUM_COLUMNS - 1


def _read_lines(data: bytes) -> pl.DataFrame:
    """Parse whole TSV lines, every field as a string; an empty field is null.

    Raises a polars error on a line with too many fields or invalid UTF-8. A line with too FEW fields is
    padded with nulls by polars, so callers must check the tab count (see :meth:`_CriteoSource._parse`).
    """
    return pl.read_csv(
        data,
        has_header=False,
        separator="\t",
        quote_char=None,
        schema=_RAW_SCHEMA,
        raise_if_empty=False,
    )  # no rechunk: the per-thread chunks are fine for everything downstream (a rechunk costs ~30% of the parse)


@dataclass
class _Block:
    path: Path
    first_line: int  # 1-based line number (in its file) of the block's first line
    data: bytes  # whole lines; the last one may lack its LF only at the end of a file
    lines: int  # number of physical lines in data


def _blocks(path: Path, chunk_rows: int) -> Iterator[_Block]:
    """Whole-line byte blocks of about ``chunk_rows`` lines (block size adapts to the observed line length)."""
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file; expected Criteo TSV rows (label, I1..I13, C1..C26)")
    bytes_per_row = _BYTES_PER_ROW_GUESS
    line = 1
    rest = b""  # the partial line after a block's last LF opens the next block (no seek: streams may be compressed)
    with open_stream(path) as f:  # buffered: read(n) returns fewer than n bytes only at the end of the stream
        while True:
            target = max(chunk_rows * bytes_per_row, 1 << 16)
            more = f.read(target)
            buf, eof = rest + more, len(more) < target
            if not buf:
                return
            while not eof and buf.rfind(b"\n") < 0:  # a line longer than the block: read on
                more = f.read(target)
                buf += more
                eof = len(more) < target
            rest = b""
            if not eof:  # cut after the last LF
                cut = buf.rfind(b"\n") + 1
                buf, rest = buf[:cut], buf[cut:]
            n = buf.count(b"\n") + (0 if buf.endswith(b"\n") else 1)
            bytes_per_row = max(16, len(buf) // n + 1)
            yield _Block(path, line, buf, n)
            line += n
            if eof:
                return


_BAD = "__bad"
_TYPED_SCHEMA = {LABEL: pl.Int8, **{n: pl.Int64 for n in INT_FIELDS}, **{n: pl.Utf8 for n in CAT_FIELDS}}


def _typed(frame: pl.DataFrame, check: bool) -> pl.DataFrame:
    """Raw strings -> label Int8, ``I*`` Int64, ``C*`` Utf8 in one multi-threaded select; with ``check`` also a
    Boolean column ``__bad`` (label not 0/1, or an ``I`` value that is not an integer)."""
    ints = [pl.col(n).cast(pl.Int64, strict=False) for n in INT_FIELDS]
    exprs = [pl.col(LABEL).cast(pl.Int8, strict=False), *ints, *[pl.col(n) for n in CAT_FIELDS]]
    if check:
        checks = [~pl.col(LABEL).is_in(["0", "1"]).fill_null(False)]
        checks += [pl.col(n).is_not_null() & i.is_null() for n, i in zip(INT_FIELDS, ints)]
        exprs.append(pl.any_horizontal(checks).alias(_BAD))
    return frame.lazy().select(exprs).collect()  # lazy: the I casts are shared by the values and the checks


def _parse_block(block: _Block, skip_bad: bool) -> tuple[pl.DataFrame, dict[str, int]]:
    """Validated, typed frame (see :func:`_typed`) for one block: fast path, or the exact line check if anything
    is off."""
    data = block.data
    tabs = data.count(b"\t")  # memchr-speed, and no block-sized temporary array
    if tabs != _TABS_PER_LINE * block.lines:  # some line has a wrong number of fields (or is empty)
        return _parse_slow(block, skip_bad)
    if data.find(b"\r") >= 0 and data.count(b"\r") != data.count(b"\r\n"):  # a CR that does not end a line
        return _parse_slow(block, skip_bad)
    try:
        frame = _read_lines(data)
    except pl.exceptions.PolarsError:  # too many fields on a line, invalid UTF-8, ...
        return _parse_slow(block, skip_bad)
    if len(frame) != block.lines:
        return _parse_slow(block, skip_bad)
    # Every line has exactly 39 tabs (none has more: polars refuses those; so the count is exact per line),
    # is valid UTF-8 and its CRs end it. What is left to check is the label and the integer fields, which are
    # cast once: a non-null string that does not cast is a bad value.
    frame = _typed(frame, check=True)
    bad = frame.get_column(_BAD)
    frame = frame.drop(_BAD)
    if not bad.any():
        return frame, {}
    bad_rows = np.flatnonzero(bad.to_numpy())
    lines = data.split(b"\n")
    skipped: dict[str, int] = {}
    for i in bad_rows:
        problem = check_line(lines[i])
        if problem is None:  # the vectorized and the exact checks disagree: a bug, not a data problem
            raise RuntimeError(f"{block.path}:{block.first_line + i}: line rejected by the fast check only")
        if not skip_bad:
            raise DataError(block.path, problem.message, block.first_line + int(i))
        skipped[problem.reason] = skipped.get(problem.reason, 0) + 1
    keep = np.ones(len(frame), dtype=bool)
    keep[bad_rows] = False
    return frame.filter(pl.Series(keep)), skipped


def _parse_slow(block: _Block, skip_bad: bool) -> tuple[pl.DataFrame, dict[str, int]]:
    """Exact line-by-line check of a block; keeps the good lines (skip mode) or raises on the first bad one."""
    lines = block.data.split(b"\n")
    if block.data.endswith(b"\n"):
        lines.pop()
    good: list[bytes] = []
    skipped: dict[str, int] = {}
    for i, raw in enumerate(lines):
        problem = check_line(raw)
        if problem is None:
            good.append(raw[:-1] if raw.endswith(b"\r") else raw)
            continue
        if not skip_bad:
            raise DataError(block.path, problem.message, block.first_line + i)
        skipped[problem.reason] = skipped.get(problem.reason, 0) + 1
    if not good:
        return pl.DataFrame(schema=_TYPED_SCHEMA), skipped
    try:
        frame = _read_lines(b"\n".join(good) + b"\n")
    except pl.exceptions.PolarsError as exc:  # every line passed the exact check, so this is a bug
        raise RuntimeError(f"{block.path}:{block.first_line}: lines passed the check but polars refused them: {exc}") from exc
    if len(frame) != len(good):
        raise RuntimeError(f"{block.path}:{block.first_line}: {len(good)} good lines parsed into {len(frame)} rows")
    return _typed(frame, check=False), skipped


def read_criteo(
    inputs: Sequence[str | Path],
    *,
    chunk_rows: int = 125_000,
    on_bad_row: str = "error",
    report: BuildReport | None = None,
) -> Iterator[pl.DataFrame]:
    """Validated raw records of Criteo TSV files, read as one stream, in chunks of about ``chunk_rows``.

    Columns: ``label`` Int8 (0/1), ``I1..I13`` Int64 (null = empty field), ``C1..C26`` Utf8 (null = empty)
    and ``__row`` UInt64, the 0-based index of the record among the KEPT records of the whole stream.
    Bad lines raise :class:`DataError` (``on_bad_row="error"``) or are dropped and counted in ``report``
    (``input_rows`` counts every record line read, ``skip_reasons`` the dropped ones by reason).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1, got {chunk_rows}")
    skip_bad = on_bad_row == "skip"
    next_row = 0
    for path in [Path(p) for p in inputs]:
        for block in read_ahead(_blocks(path, chunk_rows), name="criteo-read"):
            raw, skipped = _parse_block(block, skip_bad)
            if report is not None:
                report.input_rows += len(raw) + sum(skipped.values())
                for reason, n in skipped.items():
                    report.skip(reason, n)
            yield raw.with_columns(pl.int_range(next_row, next_row + len(raw), dtype=pl.UInt64).alias(ROW_COL))
            next_row += len(raw)


class _CriteoSource:
    """Chunk factory for :func:`build_prepared` (which reads it once); skips are counted on the first call only."""

    def __init__(
        self, inputs: Sequence[Path], *, report: BuildReport, int_as_categorical: bool, dense: bool, on_bad_row: str,
        chunk_rows: int,
    ) -> None:
        self.inputs = list(inputs)
        self.report = report
        self.int_as_categorical = int_as_categorical
        self.dense = dense
        self.on_bad_row = on_bad_row
        self.chunk_rows = chunk_rows
        self.calls = 0

    def __call__(self) -> Iterator[pl.DataFrame]:
        self.calls += 1
        first_pass = self.calls == 1
        report = self.report if first_pass else None
        for raw in read_criteo(self.inputs, chunk_rows=self.chunk_rows, on_bad_row=self.on_bad_row, report=report):
            yield self._transform(raw)

    def _transform(self, raw: pl.DataFrame) -> pl.DataFrame:
        """Typed raw records -> the columns build_prepared wants."""
        exprs: list[pl.Expr] = []
        if self.int_as_categorical:
            exprs += [log_square_bucket(pl.col(name)).alias(name) for name in INT_FIELDS]
        exprs += [pl.col(name) for name in CAT_FIELDS]
        if self.dense:
            exprs += [dense_transform(pl.col(name)).alias(DENSE_PREFIX + name) for name in INT_FIELDS]
        exprs.append(pl.col(LABEL).cast(pl.Float32))
        exprs.append(pl.col(ROW_COL))
        return raw.select(exprs)


# ----------------------------------------------------------------------------------------------------------
# entry point


def criteo_schema(
    *, min_count: int = 10, hash_size: int | None = None, int_as_categorical: bool = True, dense: bool = True
) -> Schema:
    sparse = []
    if int_as_categorical:
        sparse += [SparseSpec(name, min_count=min_count) for name in INT_FIELDS]
    sparse += [SparseSpec(name, min_count=min_count, hash_size=hash_size) for name in CAT_FIELDS]
    return Schema(sparse=tuple(sparse), dense=DENSE_FIELDS if dense else (), labels=(LABEL,))


def prepare_criteo(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    min_count: int = 10,
    hash_size: int | None = None,
    int_as_categorical: bool = True,
    dense: bool = True,
    on_bad_row: str = "error",
    chunk_rows: int = 125_000,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_degenerate: bool = False,
) -> DatasetMeta:
    """Prepare Criteo Kaggle TSV files (read as one stream, in order) into ``output``; see the module docstring.

    The TSV is parsed once; the int-coded rows are spilled to a temporary Arrow file of about the input's size
    in ``spill_dir`` (default: next to ``output``, in ``<output>.tmp``), removed at the end (see
    :mod:`recsys_transfer.data.prepared`)."""
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    if split.kind != "random":
        raise UserError("the Criteo Kaggle data has no timestamp column: use a random split")
    if chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1, got {chunk_rows}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("no Criteo input files given")
    for p in paths:  # fail before creating the output directory
        if not p.is_file():
            raise DataError(p, "no such file" if not p.exists() else "not a regular file")
        if p.stat().st_size == 0:
            raise DataError(p, "empty file; expected Criteo TSV rows (label, I1..I13, C1..C26)")
    schema = criteo_schema(min_count=min_count, hash_size=hash_size, int_as_categorical=int_as_categorical, dense=dense)
    report = BuildReport()
    source = _CriteoSource(
        paths, report=report, int_as_categorical=int_as_categorical, dense=dense, on_bad_row=on_bad_row,
        chunk_rows=chunk_rows,
    )
    return build_prepared(
        source,
        schema,
        output,
        dataset="criteo",
        split=split,
        head_tail=head_tail,
        report=report,
        source={
            "format": "criteo-kaggle-tsv",
            "input": [str(p) for p in paths],
            "min_count": min_count,
            "hash_size": hash_size,
            "int_as_categorical": int_as_categorical,
            "dense": dense,
            "int_bucketing": "log-square" if int_as_categorical else None,
            "dense_transform": "log1p(max(v,0))" if dense else None,
            "on_bad_row": on_bad_row,
        },
        progress=progress,
        spill_dir=spill_dir,
        overwrite=overwrite,
        allow_degenerate=allow_degenerate,
    )


__all__ = [
    "CAT_FIELDS",
    "DENSE_FIELDS",
    "INT_FIELDS",
    "LABEL",
    "RAW_COLUMNS",
    "check_line",
    "criteo_schema",
    "dense_transform",
    "log_square_bucket",
    "prepare_criteo",
    "read_criteo",
]
