"""Any delimited text or parquet table + a schema file -> prepared dataset (see :mod:`recsys_transfer.data.schema`
for the schema file and its column kinds).

Reading streams with bounded memory, as the Criteo reader does: each input (gzip, bz2 and xz detected from the
magic bytes and decompressed in the read-ahead thread) is cut into byte blocks of about ``chunk_rows`` whole lines.
A block whose delimiter count is exactly (columns - 1) per line, with no blank line and no quote character, goes
straight to polars' multi-threaded CSV reader (every cell as text; a line with too many fields makes it fail, and a
line with too few would need one with too many to keep the count). Any other block is checked per line: numpy
finds the line ends and counts the delimiters of every line at once; a line with the wrong count, a blank line,
or (with a quote character) a line holding a quote is settled exactly (Python's ``csv`` for quoted lines), and
only then does polars parse the block. So every bad line is found with its file and 1-based line number, and no
Python runs per row unless a line holds a quote.
A delimiter of several characters (``::``) is replaced by the byte 0x1f first (a block holding that byte is an
error). Side tables (``joins``) are read whole with the same reader. Cells are then typed, validated, filtered,
labelled and turned into features by one polars select per chunk
(:class:`_ChunkTransform`); :func:`~recsys_transfer.data.prepared.build_prepared` fits vocabularies and dense
statistics on the training rows and writes the shards.

The split key ``__row`` numbers the KEPT rows of the whole stream (as Criteo's), so which rows go to train does not
depend on the bad or filtered rows around them. A temporal split reads the input twice: first only to collect the
kept rows' timestamps (the split needs them all), then to build.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys_transfer.data.compressed import detect_compression, open_stream
from recsys_transfer.data.criteo import log_square_bucket
from recsys_transfer.data.prefetch import read_ahead
from recsys_transfer.data.prepared import (
    ROW_COL,
    SPLIT_COL,
    BuildReport,
    DatasetMeta,
    DenseSpec,
    Schema,
    SparseSpec,
    build_prepared,
)
from recsys_transfer.data.schema import ColumnSpec, FileFormat, TableSchema, compile_expr, raw_types
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import DataError, UserError
from recsys_transfer.tasks import TaskSpec

LINE_COL = "__line"  # 1-based line (text) or row (parquet) of the record in its file
FILE_COL = "__file"  # index of the record's input file
_BYTES_PER_ROW_GUESS = 256
_SUBST = 0x1F  # a multi-character delimiter is replaced by this byte before parsing
def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file")


def _open(path: Path, fmt: FileFormat) -> tuple[BinaryIO, str]:
    kind = detect_compression(path)
    if fmt.compression not in ("auto", kind) and not (fmt.compression == "none" and kind == "parquet"):
        raise DataError(path, f"format.compression says {fmt.compression}, but the file's first bytes say {kind}")
    return (path.open("rb") if kind == "parquet" else open_stream(path)), kind


# ----------------------------------------------------------------------------------------------------------
# text: blocks of whole lines -> frames of text cells


@dataclass
class _Block:
    path: Path
    first_line: int
    data: bytes


def _blocks(f: BinaryIO, path: Path, first_line: int, chunk_rows: int) -> Iterator[_Block]:
    """Whole-line blocks of about ``chunk_rows`` lines from a (decompressing) binary stream."""
    bytes_per_row = _BYTES_PER_ROW_GUESS
    line = first_line
    rest = b""
    try:
        while True:
            target = max(chunk_rows * bytes_per_row, 1 << 16)
            buf = rest + f.read(target)
            eof = len(buf) == len(rest)
            if not buf:
                return
            cut = len(buf) if eof else buf.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the block: read on
                rest = buf
                continue
            data, rest = buf[:cut], buf[cut:]
            n = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            bytes_per_row = max(16, len(data) // n + 1)
            yield _Block(path, line, data)
            line += n
            if eof:
                return
    except DataError as exc:  # a truncated or corrupt compressed stream
        raise DataError(path, f"{exc.message} (after line {line - 1})") from None


def _split_line(text: str, fmt: FileFormat) -> list[str]:
    """The cells of one line, exactly (quotes honoured); the slow path of a line the fast check cannot settle."""
    if len(fmt.delimiter) == 1:
        row = next(csv.reader([text], delimiter=fmt.delimiter, quotechar=fmt.quote or '"',
                              quoting=csv.QUOTE_MINIMAL if fmt.quote else csv.QUOTE_NONE, strict=True), [])
        return row
    return text.split(fmt.delimiter)


class _TextReader:
    """The text cells of one delimited file (see the module docstring)."""

    def __init__(self, fmt: FileFormat, names: list[str] | None, skip_bad: bool) -> None:
        self.fmt = fmt
        self.names = names  # the columns every file must have (None: taken from the first file's header)
        self.skip_bad = skip_bad
        self.multi = len(fmt.delimiter.encode(fmt.encoding)) > 1
        self.sep = _SUBST if self.multi else fmt.delimiter.encode(fmt.encoding)[0]
        self.quote = fmt.quote.encode(fmt.encoding)[0] if fmt.quote else None
        # missing cells become null in the parser (quoted ones too); with ``strip`` read_cells compares the stripped
        # cells instead
        self.null_values = None if fmt.strip else ["", *fmt.na_values]

    def _header(self, f: BinaryIO, path: Path) -> list[str]:
        raw = f.readline()
        try:
            text = raw.decode(self.fmt.encoding).rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(path, f"header line is not valid {self.fmt.encoding}", 1) from None
        try:
            cells = _split_line(text, self.fmt)
        except csv.Error as exc:
            raise DataError(path, f"header line: {exc}", 1) from None
        return [c.strip() if self.fmt.strip else c for c in cells]

    def frames(self, path: Path, f: BinaryIO, chunk_rows: int, report: BuildReport | None) -> Iterator[pl.DataFrame]:
        first = 1
        if self.fmt.header:
            header = self._header(f, path)
            first = 2
            if self.fmt.names:  # names replace the header; it must still have as many cells
                if len(header) != len(self.fmt.names):
                    raise DataError(path, f"header has {len(header)} columns, format.names {len(self.fmt.names)}", 1)
            elif self.names is None:
                if len(set(header)) != len(header):
                    raise DataError(path, f"duplicate column names in the header: {header}", 1)
                self.names = header
            elif header != self.names:
                raise DataError(path, f"header {header} differs from the first input's {self.names}", 1)
        if self.names is None:
            self.names = list(self.fmt.names)
        for block in read_ahead(_blocks(f, path, first, chunk_rows), name="tabular-read"):
            frame, skipped, lines = self._parse(block)
            if report is not None:
                report.input_rows += lines
                for reason, n in skipped.items():
                    report.skip(reason, n)
            yield frame

    def _bad(self, block: _Block, i: int, reason: str, message: str, skipped: dict[str, int]) -> None:
        if not self.skip_bad:
            raise DataError(block.path, message, block.first_line + i)
        skipped[reason] = skipped.get(reason, 0) + 1

    def _parse(self, block: _Block) -> tuple[pl.DataFrame, dict[str, int], int]:
        """(cells of the good lines + ``__line``, skipped lines by reason, lines in the block)."""
        data = block.data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if self.multi:
            if bytes([_SUBST]) in data:
                i = data[: data.index(bytes([_SUBST]))].count(b"\n")
                raise DataError(block.path, "byte 0x1f in the data (used to parse the multi-character delimiter "
                                f"{self.fmt.delimiter!r})", block.first_line + i)
            data = data.replace(self.fmt.delimiter.encode(self.fmt.encoding), bytes([_SUBST]))
        fast = self._parse_regular(block, data)
        if fast is not None:
            return fast
        arr = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(arr == 10)
        if not data.endswith(b"\n"):
            ends = np.append(ends, len(data))
        starts = np.concatenate([[0], ends[:-1] + 1])
        n_lines = len(ends)
        n_cols = len(self.names)
        seps = np.flatnonzero(arr == self.sep)
        counts = np.searchsorted(seps, ends) - np.searchsorted(seps, starts)
        blank = ends == starts
        check = (counts != n_cols - 1) | blank
        if self.quote is not None:
            quoted = np.zeros(n_lines, dtype=bool)
            quoted[np.searchsorted(ends, np.flatnonzero(arr == self.quote))] = True
            check |= quoted
        skipped: dict[str, int] = {}
        keep = np.ones(n_lines, dtype=bool)
        if check.any():
            for i in np.flatnonzero(check):
                raw = data[starts[i]:ends[i]]
                if not raw:
                    keep[i] = False
                    skipped["blank line"] = skipped.get("blank line", 0) + 1
                    continue
                try:
                    text = raw.decode(self.fmt.encoding)
                except UnicodeDecodeError as exc:
                    keep[i] = False
                    self._bad(block, int(i), "invalid encoding", f"bytes that are not valid {self.fmt.encoding} "
                              f"(byte 0x{raw[exc.start]:02x} at column {exc.start + 1})", skipped)
                    continue
                try:
                    cells = _split_line(text.replace(chr(_SUBST), self.fmt.delimiter) if self.multi else text,
                                        self.fmt)
                except csv.Error as exc:
                    keep[i] = False
                    self._bad(block, int(i), "bad quoting", f"bad quoting: {exc}", skipped)
                    continue
                if len(cells) != n_cols:
                    keep[i] = False
                    self._bad(block, int(i), "wrong field count", f"expected {n_cols} fields separated by "
                              f"{self.fmt.delimiter!r}, found {len(cells)}", skipped)
        line_no = block.first_line + np.flatnonzero(keep)
        if not keep.all():
            parts = [data[s:e] for s, e, k in zip(starts, ends, keep) if k]
            data = b"\n".join(parts) + b"\n" if parts else b""
        frame = self._read(block, data, line_no)
        return frame.with_columns(pl.Series(LINE_COL, line_no, dtype=pl.Int64)), skipped, n_lines

    def _parse_regular(self, block: _Block, data: bytes) -> tuple[pl.DataFrame, dict[str, int], int] | None:
        """The fast path of :meth:`_parse` for a block with nothing to settle line by line, or None. The block's
        delimiter count must be exactly (columns - 1) per line, with no blank line and no quote character; then
        no line has too few delimiters unless another has too many, which polars refuses (the exact path then
        finds it). Counting bytes runs at memchr speed and needs no per-line arrays."""
        utf8 = self.fmt.encoding.lower().replace("_", "-") in ("utf-8", "utf8", "ascii")
        if not utf8 or (self.quote is not None and data.find(self.quote) >= 0):
            return None
        n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
        seps = int(np.count_nonzero(np.frombuffer(data, dtype=np.uint8) == self.sep))  # ~7x bytes.count's speed
        if seps != (len(self.names) - 1) * n_lines:
            return None
        if len(self.names) == 1 and (data.startswith(b"\n") or data.find(b"\n\n") >= 0):
            return None  # with more columns a blank line has too few delimiters, so the count above is off
        try:
            frame = pl.read_csv(data, has_header=False, separator=chr(self.sep), quote_char=None,
                                schema={name: pl.String for name in self.names}, null_values=self.null_values,
                                raise_if_empty=False)
        except pl.exceptions.PolarsError:  # a line with too many fields, invalid UTF-8: the exact path says which
            return None
        if len(frame) != n_lines:
            return None
        line_no = pl.int_range(block.first_line, block.first_line + n_lines, dtype=pl.Int64, eager=True)
        return frame.with_columns(line_no.alias(LINE_COL)), {}, n_lines

    def _read(self, block: _Block, data: bytes, line_no: np.ndarray) -> pl.DataFrame:
        schema = {name: pl.String for name in self.names}
        if not data:
            return pl.DataFrame(schema=schema)
        encoding = self.fmt.encoding.lower().replace("_", "-")
        if encoding not in ("utf-8", "utf8", "ascii"):
            try:
                data = data.decode(self.fmt.encoding).encode("utf-8")
            except UnicodeDecodeError as exc:
                i = data[: exc.start].count(b"\n")
                raise DataError(block.path, f"bytes that are not valid {self.fmt.encoding}", int(line_no[i])) from None
        try:
            frame = pl.read_csv(data, has_header=False, separator=chr(self.sep), quote_char=self.fmt.quote,
                                schema=schema, null_values=self.null_values, raise_if_empty=False)
        except pl.exceptions.PolarsError as exc:
            bad = _first_undecodable(data)
            if bad is not None:
                raise DataError(block.path, f"bytes that are not valid {self.fmt.encoding}", int(line_no[bad])) from None
            raise DataError(block.path, f"cannot parse the lines from here on ({str(exc).splitlines()[0]})",
                            int(line_no[0])) from None
        if len(frame) != len(line_no):
            raise RuntimeError(f"{block.path}:{block.first_line}: {len(line_no)} checked lines parsed into "
                               f"{len(frame)} rows")
        return frame


def _first_undecodable(data: bytes) -> int | None:
    """Index of the first line that is not valid UTF-8, or None."""
    for i, line in enumerate(data.split(b"\n")):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return i
    return None


def _parquet_frames(path: Path, names: list[str] | None, chunk_rows: int,
                    report: BuildReport | None) -> Iterator[pl.DataFrame]:
    pf = pq.ParquetFile(path)
    columns = names if names is not None else pf.schema_arrow.names
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(path, f"columns {missing} missing (the parquet file has {pf.schema_arrow.names})")
    row = 1
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
        frame = pl.from_arrow(batch)
        nested = [c for c in frame.columns if isinstance(frame.schema[c], (pl.List, pl.Array, pl.Struct))]
        if nested:
            raise DataError(path, f"nested parquet columns {nested} are not supported; store lists as text cells")
        frame = frame.select([pl.col(c).cast(pl.String) for c in columns])
        frame = frame.with_columns(pl.int_range(row, row + len(frame), dtype=pl.Int64).alias(LINE_COL))
        row += len(frame)
        if report is not None:
            report.input_rows += len(frame)
        yield frame


def read_cells(inputs: Sequence[Path], fmt: FileFormat, *, chunk_rows: int = 125_000, on_bad_row: str = "error",
               report: BuildReport | None = None, names: list[str] | None = None) -> Iterator[pl.DataFrame]:
    """The text cells of ``inputs`` read as one stream (every cell a string; missing cells null: the empty cell
    and ``fmt.na_values``), with ``__line`` and ``__file``. Bad lines raise :class:`DataError` or, under
    ``on_bad_row='skip'``, are dropped and counted in ``report`` (which also counts every record read)."""
    reader = _TextReader(fmt, names, on_bad_row == "skip")
    na = ["", *fmt.na_values]
    for k, path in enumerate(inputs):
        _check_file(path)
        f, kind = _open(path, fmt)
        with f:
            frames = (_parquet_frames(path, reader.names, chunk_rows, report) if kind == "parquet"
                      else reader.frames(path, f, chunk_rows, report))
            if kind == "parquet" and reader.names is None:
                reader.names = pq.ParquetFile(path).schema_arrow.names
            for frame in frames:
                file_col = pl.lit(k, dtype=pl.UInt16).alias(FILE_COL)
                if kind != "parquet" and not fmt.strip:  # the text reader made the missing cells null
                    yield frame.with_columns(file_col)
                    continue
                cells = [c for c in frame.columns if c != LINE_COL]
                exprs = [pl.col(c).str.strip_chars(" ") if fmt.strip else pl.col(c) for c in cells]
                exprs = [pl.when(e.is_in(na)).then(None).otherwise(e).alias(c) for e, c in zip(exprs, cells)]
                yield frame.select(*exprs, pl.col(LINE_COL), file_col)


# ----------------------------------------------------------------------------------------------------------
# cells -> features, labels and split keys


_TIME_PARTS = {
    "hour": lambda t: t.dt.hour().cast(pl.String),
    "weekday": lambda t: (t.dt.weekday() - 1).cast(pl.String),
    "day": lambda t: t.dt.day().cast(pl.String),
    "month": lambda t: t.dt.month().cast(pl.String),
    "year": lambda t: t.dt.year().cast(pl.String),
    "date": lambda t: t.dt.strftime("%Y-%m-%d"),
    "iso_week": lambda t: pl.format("{}-W{}", t.dt.iso_year(), t.dt.week().cast(pl.String).str.zfill(2)),
}


class _ChunkTransform:
    """One chunk of cells (after joins) -> the columns :func:`build_prepared` wants, with bad rows and filters
    counted (see the schema module for the rules)."""

    def __init__(self, schema: TableSchema, inputs: Sequence[Path], skip_bad: bool) -> None:
        self.schema = schema
        self.inputs = list(inputs)
        self.skip_bad = skip_bad
        self.types = raw_types(schema)
        ints = {s for c in schema.columns for s in c.sources
                if c.kind == "int_bucketized" or (c.kind == "drop" and c.type == "int")
                or (c.kind == "timestamp" and not c.format)}
        stamp = schema.timestamp
        self.values: dict[str, pl.Expr] = {}  # raw column -> its typed value (expressions, features)
        self.typed: dict[str, pl.Expr] = {}  # typed columns computed once per chunk (see _typed_col)
        self.unstripped: dict[str, pl.Expr] = {}  # their first try, without stripping the text
        self.checks: list[tuple[str, str, pl.Expr, str]] = []  # (reason, column, bad-row mask, what it should be)
        for c in schema.columns:
            for s in c.sources:
                if s in self.values or self.types.get(s) != "num":
                    continue
                raw = pl.col(s)
                if stamp is not None and s == stamp.source:
                    if stamp.format:
                        text, fmt = raw, stamp.format
                        if re.search(r"(?<!%)%[HI]", fmt) and not re.search(r"(?<!%)%M", fmt):
                            text, fmt = raw + "00", fmt + "%M"  # polars parses an hour only with its minute
                        value = self._typed_col(text.str.strptime(pl.Datetime("us"), fmt, strict=False).dt.epoch("s"))
                        what = f"a time in the format {stamp.format!r}"
                    else:
                        stripped, unstripped = self._number(raw, pl.Int64)
                        if stamp.unit == "ms":
                            stripped, unstripped = stripped // 1000, unstripped // 1000
                        value = self._typed_col(stripped, unstripped)
                        what = "an integer time"
                    self.checks.append((f"{s}: bad time", s, value.is_null(), what))
                elif c.kind == "label" and s == c.source:
                    continue  # labels are typed below (their map)
                else:
                    dtype = pl.Int64 if s in ints else pl.Float64
                    value = self._typed_col(*self._number(raw, dtype))
                    what = "an integer" if dtype == pl.Int64 else "a number"
                    self.checks.append((f"{s}: not {what}", s, raw.is_not_null() & value.is_null(), what))
                self.values[s] = value
        self.labels: dict[str, pl.Expr] = {}
        for c in schema.columns:
            if c.kind != "label":
                continue
            raw = pl.col(c.source)
            self.checks.append((f"{c.name}: missing label", c.source, raw.is_null(), "a label"))
            unstripped = None
            if c.map:
                value = raw.replace_strict(list(c.map), list(c.map.values()), default=None, return_dtype=pl.Float64)
                what = f"one of {sorted(c.map)}"
            elif c.classes:
                value = raw.replace_strict(list(c.classes), list(range(len(c.classes))), default=None,
                                           return_dtype=pl.Float64)
                what = f"one of the classes {list(c.classes)}"
            else:
                value, unstripped = self._number(raw, pl.Float64)
                what = "a number"
            value = self._typed_col(value, unstripped)
            bad = raw.is_not_null() & value.is_null()
            if c.task == "binary":
                bad = bad | (value.is_not_null() & ~value.is_in([0.0, 1.0]))
                what += " mapping to 0 or 1" if c.map else " (0 or 1)"
            self.checks.append((f"{c.name}: bad label", c.source, bad, what))
            self.labels[c.name] = value
            if self.types.get(c.source) == "num":
                self.values.setdefault(c.source, value)
        self.filters = [(f.reason, compile_expr(f.expr, self.types, self._expr_columns())) for f in schema.filters]
        self.derived = {d.name: compile_expr(d.expr, self.types, self._expr_columns()) for d in schema.labels}

    @staticmethod
    def _number(raw: pl.Expr, dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr]:
        """(the number in the stripped text, the number in the text as it is): polars' cast refuses spaces, so
        where the second is null and the first is not, the cell had spaces around it."""
        return raw.str.strip_chars().cast(dtype, strict=False), raw.cast(dtype, strict=False)

    def _typed_col(self, value: pl.Expr, unstripped: pl.Expr | None = None) -> pl.Expr:
        """A reference to ``value`` computed once per chunk as a column of its own, so the checks, features,
        labels and expressions that read it do not each parse the text again (an eager select shares nothing).
        ``unstripped``: the same without stripping the text first, tried first (see :meth:`__call__`)."""
        name = f"__typed{len(self.typed)}"
        self.typed[name] = value
        if unstripped is not None:
            self.unstripped[name] = unstripped
        return pl.col(name)

    def _expr_columns(self) -> dict[str, pl.Expr]:
        return {name: self.values.get(name, pl.col(name)) for name in self.types}

    def _value(self, name: str) -> pl.Expr:
        return self.values.get(name, pl.col(name))

    def _feature(self, c: ColumnSpec) -> pl.Expr:
        if c.kind in ("categorical", "group"):
            if c.time_part is not None:
                return _TIME_PARTS[c.time_part](pl.from_epoch(self._value(c.source), time_unit="s")).alias(c.name)
            if c.extract is not None:
                return pl.col(c.source).str.extract(c.extract, 1).alias(c.name)
            return pl.col(c.source).alias(c.name)
        if c.kind == "int_bucketized":
            return log_square_bucket(self._value(c.source)).alias(c.name)
        if c.kind == "multi_categorical":
            if c.flags:
                names = c.flag_names or c.flags
                items = pl.concat_list([pl.when(pl.col(f) == "1").then(pl.lit(n)) for f, n in zip(c.flags, names)])
                items = items.list.drop_nulls()
            else:
                items = pl.col(c.source).str.split(c.separator).list.eval(
                    pl.element().filter(~pl.element().is_in(["", *self._na()])))
            return (items.list.head(c.max_length) if c.max_length else items).alias(c.name)
        if c.kind == "dense":
            value = self._value(c.source)
            if c.transform == "log1p":
                value = value.clip(lower_bound=0).log1p()
            return value.cast(pl.Float64).alias(c.name)
        raise AssertionError(c.kind)

    def _na(self) -> list[str]:
        return list(self.schema.format.na_values)

    def _drop(self, frame: pl.DataFrame, mask: np.ndarray, reason: str, report: BuildReport | None,
              message: str | None) -> pl.DataFrame:
        """Drop the rows of ``mask`` counted under ``reason``; a bad row (``message``) stops the build instead,
        naming its file and line, unless bad rows are skipped."""
        if not mask.any():
            return frame
        if message is not None and not self.skip_bad:
            i = int(np.flatnonzero(mask)[0])
            raise DataError(self.inputs[int(frame[FILE_COL][i])], message, int(frame[LINE_COL][i]))
        if report is not None:
            report.skip(reason, int(mask.sum()))
        return frame.filter(pl.Series(~mask))

    def __call__(self, cells: pl.DataFrame, report: BuildReport | None) -> pl.DataFrame:
        # The typed columns are first made from the text as it is (stripping every cell costs as much as the
        # cast); only a chunk where a check fails is typed again from the stripped text, which gives the same
        # values where the first try succeeded (a cell that casts has no spaces around it).
        typed = {n: self.unstripped.get(n, v) for n, v in self.typed.items()}
        frame = cells.with_columns([v.alias(n) for n, v in typed.items()]) if typed else cells
        if self.checks:
            check_masks = [m.fill_null(False).alias(f"m{k}") for k, (_, _, m, _) in enumerate(self.checks)]
            masks = frame.select(check_masks)
            if self.unstripped and any(masks[c].any() for c in masks.columns):
                frame = cells.with_columns([v.alias(n) for n, v in self.typed.items()])
                masks = frame.select(check_masks)
            for k, (reason, column, _, what) in enumerate(self.checks):
                mask = masks[f"m{k}"].to_numpy()
                if mask.any():
                    value = frame[column][int(np.flatnonzero(mask)[0])] if column in frame.columns else None
                    frame = self._drop(frame, mask, reason, report, f"column {column!r}: expected {what}, got {value!r}")
                    masks = masks.filter(pl.Series(~mask))
        for reason, expr in self.filters:
            keep = frame.select(expr.fill_null(False)).to_series().to_numpy()
            frame = self._drop(frame, ~keep, reason, report, None)
        exprs = [self._feature(c) for c in self.schema.columns if c.is_sparse or c.kind == "dense"]
        exprs += [v.cast(pl.Float32).alias(n) for n, v in self.labels.items()]
        exprs += [v.cast(pl.Float32).alias(n) for n, v in self.derived.items()]
        stamp = self.schema.timestamp
        if stamp is not None:
            exprs.append(self._value(stamp.source).alias("__ts"))
        out = frame.select(*exprs, pl.col(LINE_COL), pl.col(FILE_COL))
        if self.derived:  # a derived label that evaluates to null (a missing input) is a bad row
            bad = out.select(pl.any_horizontal([pl.col(n).is_null() for n in self.derived])).to_series().to_numpy()
            out = self._drop(out, bad, "derived label missing", report,
                             "a derived label is missing (an expression met a missing value)")
        return out


# ----------------------------------------------------------------------------------------------------------
# the source and the entry point


class _TabularSource:
    """Chunk factory for :func:`build_prepared`: reads the inputs (and side tables), transforms each chunk,
    numbers the kept rows (``__row``) and, for a temporal split, sets ``__split`` from :meth:`temporal_codes`."""

    def __init__(self, schema: TableSchema, inputs: Sequence[Path], *, report: BuildReport, on_bad_row: str,
                 chunk_rows: int) -> None:
        self.schema = schema
        self.inputs = list(inputs)
        self.report = report
        self.on_bad_row = on_bad_row
        self.chunk_rows = chunk_rows
        self.transform = _ChunkTransform(schema, self.inputs, on_bad_row == "skip")
        self.sides = [self._side(j) for j in schema.joins]
        self.codes: np.ndarray | None = None
        self.calls = 0
        self._check_columns()

    def _side(self, join) -> tuple[object, pl.DataFrame, Path]:
        path = Path(join.file) if Path(join.file).is_absolute() else self.inputs[0].parent / join.file
        frames = list(read_cells([path], join.format, chunk_rows=1 << 20, on_bad_row="error"))
        side = pl.concat(frames) if frames else pl.DataFrame()
        if join.on not in side.columns:
            raise UserError(f"{path}: join key {join.on!r} is not a column (columns: {side.columns[:-2]})")
        dup = side[join.on].is_duplicated()
        if dup.any():
            i = int(np.flatnonzero(dup.to_numpy())[-1])
            raise DataError(path, f"duplicate join key {join.on} {side[join.on][i]!r}", int(side[LINE_COL][i]))
        if side[join.on].null_count():
            i = int(np.flatnonzero(side[join.on].is_null().to_numpy())[0])
            raise DataError(path, f"missing join key {join.on}", int(side[LINE_COL][i]))
        side = side.drop(LINE_COL, FILE_COL).with_columns(pl.lit(True).alias(f"__in_{join.on}_{id(join)}"))
        return join, side, path

    def _raw_names(self) -> list[str]:
        names = list(self.schema.format.names)
        if not names:  # from the first input's header (or parquet schema)
            first = next(read_cells(self.inputs[:1], self.schema.format, chunk_rows=1, on_bad_row="skip"), None)
            names = [c for c in (first.columns if first is not None else []) if c not in (LINE_COL, FILE_COL)]
        return names

    def _check_columns(self) -> None:
        """Every raw column (main and side tables) is read by an entry or dropped; every entry's source exists."""
        main = self._raw_names()
        available = set(main)
        for join, side, path in self.sides:
            if join.key not in available:
                raise UserError(f"joins: key {join.key!r} is not a column of the main table (columns: {main})")
            clash = sorted((set(side.columns) - {join.on, *[c for c in side.columns if c.startswith('__in_')]})
                           & available)
            if clash:
                raise UserError(f"joins: {path.name} has columns {clash} that the main table has too; rename them "
                                "with the join's format.names")
            available |= {c for c in side.columns if not c.startswith("__in_")}
        used = {s for c in self.schema.columns for s in c.sources}
        missing = sorted(used - available)
        if missing:
            raise UserError(f"schema {self.schema.name}: column(s) {missing} not in the input (columns: "
                            f"{sorted(available)})")
        join_keys = {j.on for j, _, _ in self.sides} | {j.key for j, _, _ in self.sides}
        unread = sorted(available - used - join_keys)
        if unread and self.schema.others == "error":
            raise UserError(f"schema {self.schema.name}: column(s) {unread} of the input are not described; add "
                            "them (kind: drop to ignore one) or set others: drop")

    def _chunks(self, report: BuildReport | None) -> Iterator[pl.DataFrame]:
        next_row = 0
        for cells in read_cells(self.inputs, self.schema.format, chunk_rows=self.chunk_rows,
                                on_bad_row=self.on_bad_row, report=report):
            for join, side, path in self.sides:
                cells = cells.join(side, left_on=join.key, right_on=join.on, how="left", maintain_order="left",
                                   coalesce=True)
                marker = [c for c in side.columns if c.startswith("__in_")][0]
                missing = cells[marker].is_null().to_numpy()
                if missing.any():
                    i = int(np.flatnonzero(missing)[0])
                    message = f"{join.key} {cells[join.key][i]!r} is not in {path.name}"
                    cells = self.transform._drop(cells, missing, f"unknown {join.key}", report, message)
                cells = cells.drop(marker)
            out = self.transform(cells, report)
            out = out.with_columns(pl.int_range(next_row, next_row + len(out), dtype=pl.UInt64).alias(ROW_COL))
            next_row += len(out)
            yield out

    def temporal_codes(self, split: SplitSpec) -> None:
        stamps = [chunk["__ts"].to_numpy() for chunk in self._chunks(None)]
        self.codes = split.assign_temporal(np.concatenate(stamps) if stamps else np.zeros(0, np.int64))

    def __call__(self) -> Iterator[pl.DataFrame]:
        self.calls += 1
        for chunk in self._chunks(self.report if self.calls == 1 else None):
            if self.codes is not None:
                chunk = chunk.with_columns(pl.Series(SPLIT_COL, self.codes[chunk[ROW_COL].to_numpy()]))
            yield chunk.drop([c for c in ("__ts", LINE_COL, FILE_COL) if c in chunk.columns])


def build_schema(schema: TableSchema, *, min_count: int | None = None, hash_size: int | None = None) -> Schema:
    """The prepared-data :class:`Schema` (sparse, dense, labels, tasks, group) of a schema file; ``min_count``
    and ``hash_size`` (``prepare --min-count/--hash-size``) replace the schema's defaults for the vocabulary
    columns that set none."""
    default_min = min_count if min_count is not None else schema.min_count
    owners = {c.name: c for c in schema.columns if c.is_sparse}
    sparse = []
    for c in schema.columns:
        if not c.is_sparse:
            continue
        owner = owners[c.vocab] if c.vocab else c
        sparse.append(SparseSpec(c.name, min_count=owner.min_count or default_min,
                                 hash_size=owner.hash_size if owner.hash_size is not None else (
                                     hash_size if owner.kind in ("categorical", "multi_categorical") else None),
                                 multi_valued=c.kind == "multi_categorical", vocab=c.vocab))
    dense = tuple(DenseSpec(c.name, fill=c.fill, normalize=c.normalize) for c in schema.columns if c.kind == "dense")
    tasks = []
    for c in schema.columns:
        if c.kind == "label":
            tasks.append(TaskSpec(c.name, c.name, c.task, c.weight,
                                  num_classes=len(c.classes) if c.task == "multiclass" else None))
    tasks += [TaskSpec(d.name, d.name, d.task, d.weight) for d in schema.labels]
    group = next((c.name for c in schema.columns if c.kind == "group"), None)
    try:
        return Schema(sparse=tuple(sparse), dense=dense, labels=tuple(schema.label_names), tasks=tuple(tasks),
                      group=group)
    except ValueError as exc:
        raise UserError(f"schema {schema.name}: {exc}") from None


def prepare_tabular(
    schema: TableSchema,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    min_count: int | None = None,
    hash_size: int | None = None,
    on_bad_row: str = "error",
    chunk_rows: int = 125_000,
    progress: bool = True,
    spill_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_degenerate: bool = False,
    schema_file: str | Path | None = None,
) -> DatasetMeta:
    """Prepare ``inputs`` (read as one stream, in order) with ``schema`` into ``output``; see the module
    docstring. The schema itself (not its file's path) is part of the dataset id."""
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError(f"schema {schema.name}: no input files given (--input)")
    for p in paths:
        _check_file(p)
    if split.kind == "temporal" and schema.timestamp is None:
        raise UserError(f"split temporal: schema {schema.name} has no timestamp column; use a random split")
    target = build_schema(schema, min_count=min_count, hash_size=hash_size)
    report = BuildReport()
    source = _TabularSource(schema, paths, report=report, on_bad_row=on_bad_row, chunk_rows=chunk_rows)
    if split.kind == "temporal":
        source.temporal_codes(split)
    schema_json = dataclasses.asdict(schema)
    return build_prepared(
        source,
        target,
        output,
        dataset=schema.name,
        split=split,
        head_tail=head_tail,
        report=report,
        source={
            "kind": "schema",
            "schema": schema_json,
            "schema_sha256": hashlib.sha256(json.dumps(schema_json, sort_keys=True).encode()).hexdigest()[:16],
            "schema_file": str(schema_file) if schema_file is not None else None,  # not part of the id
            "input": [str(p) for p in paths],
            "min_count": min_count,
            "hash_size": hash_size,
            "on_bad_row": on_bad_row,
        },
        progress=progress,
        spill_dir=spill_dir,
        overwrite=overwrite,
        allow_degenerate=allow_degenerate,
    )


__all__ = ["build_schema", "prepare_tabular", "read_cells"]
