"""Schema files: any delimited text or parquet table -> a prepared dataset, with no Python written.

A schema file (YAML) says how to read the files and what each column is; :mod:`recsys_transfer.data.tabular`
reads them with it (``recsys-transfer prepare --schema FILE.yaml --input PATH... --output DIR``). Recipes ship in
``pipelines/datasets/``. Every key is checked: an unknown key, a key that does not fit the column's kind, or a
column of the file that the schema does not mention is an error naming it. Example (UCI Adult, two tasks)::

    name: adult-census
    format: {delimiter: ", ", header: true, na_values: ["?"]}
    columns:
      - {name: age, kind: dense, normalize: standard}
      - {name: workclass, kind: categorical}
      - {name: fnlwgt, kind: drop}
      - {name: marital-status, kind: drop}          # not a feature: the second task is made from it
      - {name: income, source: Y, kind: label, map: {">50K": 1, ">50K.": 1, "<=50K": 0, "<=50K.": 0}}
      ...
    labels:
      - {name: never_married, expr: 'col("marital-status") == "Never-married"'}

``format`` (:class:`FileFormat`): ``delimiter`` (any string: ``"\\t"``, ``","``, ``"::"``, ``", "``),
``header`` (the first line of every file names the columns) and/or ``names`` (the column names, in file order;
required without a header; with a header they replace it), ``quote`` (a quoted field may hold the delimiter but
not a line break; ``null`` for none), ``encoding`` (any ASCII-compatible codec, e.g. ``latin-1``),
``compression`` (``auto``: gzip, bz2 and xz are recognized by their magic bytes, never by the file name; or
``none``/``gzip``/``bz2``/``xz``), ``na_values`` (cells that mean "missing"; the empty cell always does),
``strip`` (strip spaces around every cell). A parquet input (magic ``PAR1``) is read by column name; its cells are
read as text so the same column kinds apply.

``columns`` (:class:`ColumnSpec`): one entry per feature, label or ignored column. ``source`` is the raw column it
reads (default: its ``name``), so one raw column can feed several entries (Criteo's ``I1`` as a bucketized
categorical and as a dense value). Kinds:

* ``categorical``: the cell's text (optionally ``extract``: the first group of a regular expression, e.g. the
  year of ``Toy Story (1995)``; or ``time_part`` of a ``timestamp`` source: ``hour``, ``weekday`` (0 = Monday),
  ``day``, ``month``, ``year``, ``date``, ``iso_week`` like ``1998-W07``), a vocabulary fit on train with
  ``min_count`` (rarer values, unseen values and missing cells map to the OOV row 0), or ``hash_size`` rows
  (hashed, no vocabulary). ``vocab: OTHER`` shares another field's vocabulary and embedding table.
* ``multi_categorical``: a list in one cell split at ``separator`` (``Action|Comedy``; empty and missing tokens
  are dropped, an empty cell is an empty list), or made from 0/1 ``flags`` columns (the list of the flag columns
  set to 1, named by ``flag_names`` or the columns' names); ``max_length`` keeps the first N. Jagged lists in the
  prepared data.
* ``int_bucketized``: an integer cell bucketed by Criteo's log-square rule (``v > 2 -> floor(ln(v)^2)``, else
  ``v``), then a vocabulary; a cell that is not an integer is a bad row, a missing one maps to OOV.
* ``dense``: a float; ``transform: log1p`` is ``log1p(max(v, 0))``; then ``fill`` (``zero`` or ``mean``) and
  ``normalize`` (``none``, ``standard``, ``minmax``) fitted on the training rows. A cell that is not a number is
  a bad row.
* ``label``: ``task`` ``binary`` (0/1), ``regression`` (a float) or ``multiclass`` (``classes``: the values, in
  class-id order); ``map`` turns cell texts into numbers first (``">50K.": 1``). A missing or unmapped label is a
  bad row. ``weight``: the task's share of the loss.
* ``group``: a categorical whose ids group rows for group AUC (also a feature).
* ``timestamp``: a time, as integer seconds (``unit: s``), milliseconds (``unit: ms``) or text parsed with
  ``format`` (strftime codes: Avazu's ``hour`` is ``%y%m%d%H``). Not a feature; it orders a temporal split
  (at most one per schema) and feeds ``time_part`` categoricals.
* ``drop``: not a feature or label. With ``type`` (``int``, ``float``, ``str``) it is still read for expressions.

``labels`` (:class:`DerivedLabel`) are made from expressions over the raw columns, and ``filters``
(:class:`FilterSpec`) keep the rows where an expression holds; the rows a filter drops are a counted skip
reason (``reason``). Expressions are Python syntax, checked and compiled to polars (never ``eval``): column
names (``rating``, or ``col("marital-status")`` for names that are not identifiers), numbers, strings,
``== != < <= > >=``, ``in [..]``, ``and or not``, ``+ - * / %`` and ``is_null(x)``. A column is a number in an
expression when its entries read it as one (dense, int_bucketized, timestamp, a label's mapped value, or
``type: int|float``), else text; comparing text with a number is an error.

``joins`` (:class:`JoinSpec`): side tables read whole (small ones: MovieLens ``users.dat``) and joined on a key,
a row whose key is not in the side table is a bad row; their columns are described in ``columns`` like the main
table's. A join's ``file`` is relative to the directory of the first input.

Bad rows (a wrong field count, text that is not valid in the encoding, a bad number, a missing label, an unknown
join key) stop the build with ``path:line: message``; under ``on_bad_row: skip`` each is dropped and counted by
reason in ``meta.json``. Blank lines are always dropped and counted (``blank line``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import polars as pl
import yaml

from recsys_transfer.errors import UserError

KINDS = ("categorical", "multi_categorical", "int_bucketized", "dense", "label", "group", "timestamp", "drop")
TIME_PARTS = ("hour", "weekday", "day", "month", "year", "date", "iso_week")
COMPRESSIONS = ("auto", "none", "gzip", "bz2", "xz")
LABEL_TASKS = ("binary", "regression", "multiclass")


@dataclass(frozen=True)
class FileFormat:
    delimiter: str = ","
    header: bool = True
    names: tuple[str, ...] = ()
    quote: str | None = '"'
    encoding: str = "utf-8"
    compression: str = "auto"
    na_values: tuple[str, ...] = ()
    strip: bool = False

    def __post_init__(self) -> None:
        if not self.delimiter or "\n" in self.delimiter or "\r" in self.delimiter:
            raise ValueError(f"delimiter must be a non-empty string without line breaks, got {self.delimiter!r}")
        if self.quote is not None and (len(self.quote) != 1 or self.quote in self.delimiter):
            raise ValueError(f"quote must be one character not in the delimiter (or null), got {self.quote!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if not self.header and not self.names:
            raise ValueError("a file without a header needs its column names: format.names")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate column names in format.names: {list(self.names)}")
        try:
            ascii_compatible = "\n,\t|:".encode(self.encoding) == b"\n,\t|:"
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None
        if not ascii_compatible:
            raise ValueError(f"encoding {self.encoding!r} is not ASCII-compatible (line breaks and delimiters "
                             "must be single ASCII bytes); convert the file to UTF-8")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    kind: str
    source: str = ""
    type: str = ""  # drop: read it for expressions as int | float | str
    # categorical, multi_categorical, int_bucketized, group
    min_count: int | None = None
    hash_size: int | None = None
    vocab: str | None = None
    extract: str | None = None
    time_part: str | None = None
    separator: str = "|"
    flags: tuple[str, ...] = ()
    flag_names: tuple[str, ...] = ()
    max_length: int | None = None
    # dense
    transform: str = "none"
    fill: str = "zero"
    normalize: str = "none"
    # label
    task: str = "binary"
    map: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    weight: float = 1.0
    # timestamp
    unit: str = "s"
    format: str = ""

    _KEYS = {  # keys each kind may set (besides name, kind, source)
        "categorical": {"min_count", "hash_size", "vocab", "extract", "time_part"},
        "group": {"min_count", "hash_size", "extract", "time_part"},
        "multi_categorical": {"min_count", "hash_size", "vocab", "separator", "flags", "flag_names", "max_length"},
        "int_bucketized": {"min_count", "hash_size", "vocab"},
        "dense": {"transform", "fill", "normalize"},
        "label": {"task", "map", "classes", "weight"},
        "timestamp": {"unit", "format"},
        "drop": {"type"},
    }

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name or self.name.startswith("__"):
            raise ValueError(f"column name {self.name!r}: must be non-empty and not start with '__'")
        if not self.source:
            object.__setattr__(self, "source", self.name)
        for f in fields(self):
            if f.name in ("name", "kind", "source"):
                continue
            value = getattr(self, f.name)
            base = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            if value != base and f.name not in self._KEYS[self.kind]:
                raise ValueError(f"column {self.name!r}: {f.name!r} does not apply to kind {self.kind!r} (it "
                                 f"takes {sorted(self._KEYS[self.kind]) or 'no other keys'})")
        if self.type not in ("", "int", "float", "str"):
            raise ValueError(f"column {self.name!r}: type must be int, float or str, got {self.type!r}")
        if self.min_count is not None and self.min_count < 1:
            raise ValueError(f"column {self.name!r}: min_count must be >= 1")
        if self.hash_size is not None and self.hash_size < 2:
            raise ValueError(f"column {self.name!r}: hash_size must be >= 2")
        if self.time_part is not None and self.time_part not in TIME_PARTS:
            raise ValueError(f"column {self.name!r}: time_part must be one of {TIME_PARTS}")
        if self.time_part is not None and self.extract is not None:
            raise ValueError(f"column {self.name!r}: extract and time_part exclude each other")
        if self.extract is not None:
            try:
                if re.compile(self.extract).groups < 1:
                    raise ValueError(f"column {self.name!r}: extract needs one capture group, got {self.extract!r}")
            except re.error as exc:
                raise ValueError(f"column {self.name!r}: extract is not a regular expression ({exc})") from None
        if not self.separator:
            raise ValueError(f"column {self.name!r}: separator must be non-empty")
        if self.flag_names and len(self.flag_names) != len(self.flags):
            raise ValueError(f"column {self.name!r}: flag_names must name each of the {len(self.flags)} flags")
        if self.flags and self.source != self.name:
            raise ValueError(f"column {self.name!r}: a list made from flags reads the flag columns, not a source")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"column {self.name!r}: max_length must be >= 1")
        if self.transform not in ("none", "log1p"):
            raise ValueError(f"column {self.name!r}: transform must be none or log1p, got {self.transform!r}")
        if self.task not in LABEL_TASKS:
            raise ValueError(f"column {self.name!r}: task must be one of {LABEL_TASKS}, got {self.task!r}")
        if (self.task == "multiclass") != bool(self.classes):
            raise ValueError(f"column {self.name!r}: a multiclass label lists its classes (and only it does)")
        if self.classes and self.map:
            raise ValueError(f"column {self.name!r}: a multiclass label takes classes, not map")
        for k, v in self.map.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"column {self.name!r}: map values must be numbers, got {k!r}: {v!r}")
        object.__setattr__(self, "map", {str(k): float(v) for k, v in self.map.items()})
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.weight >= 0:
            raise ValueError(f"column {self.name!r}: weight must be >= 0")
        if self.unit not in ("s", "ms"):
            raise ValueError(f"column {self.name!r}: unit must be s or ms, got {self.unit!r}")

    @property
    def sources(self) -> tuple[str, ...]:
        """The raw columns this entry reads."""
        return self.flags if self.flags else (self.source,)

    @property
    def is_sparse(self) -> bool:
        return self.kind in ("categorical", "multi_categorical", "int_bucketized", "group")


@dataclass(frozen=True)
class DerivedLabel:
    name: str
    expr: str
    task: str = "binary"  # binary (a condition) or regression (a number)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.task not in ("binary", "regression"):
            raise ValueError(f"label {self.name!r}: a derived label is binary (a condition) or regression")


@dataclass(frozen=True)
class FilterSpec:
    expr: str
    reason: str = ""

    def __post_init__(self) -> None:
        if not self.reason:
            object.__setattr__(self, "reason", f"filtered out: not ({self.expr})")


@dataclass(frozen=True)
class JoinSpec:
    file: str
    key: str  # the main table's column
    on: str = ""  # the side table's key column (default: key)
    format: FileFormat = FileFormat()

    def __post_init__(self) -> None:
        if not self.on:
            object.__setattr__(self, "on", self.key)


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[ColumnSpec, ...]
    format: FileFormat = FileFormat()
    labels: tuple[DerivedLabel, ...] = ()
    filters: tuple[FilterSpec, ...] = ()
    joins: tuple[JoinSpec, ...] = ()
    min_count: int = 1  # default of the vocabulary columns that set none (``prepare --min-count`` overrides it)
    others: str = "error"  # a raw column no entry reads: error | drop

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '_', '.', '-'")
        if self.others not in ("error", "drop"):
            raise ValueError(f"others must be error or drop, got {self.others!r}")
        if self.min_count < 1:
            raise ValueError("min_count must be >= 1")
        names = [c.name for c in self.columns if c.kind not in ("drop", "timestamp")] + [d.name for d in self.labels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two entries make the same column: {dup}")
        if not self.label_names:
            raise ValueError("no label: add a column of kind label or a derived label under labels")
        stamps = [c for c in self.columns if c.kind == "timestamp"]
        if len({c.source for c in stamps}) > 1:
            raise ValueError(f"at most one timestamp column, got {[c.name for c in stamps]}")
        groups = [c.name for c in self.columns if c.kind == "group"]
        if len(groups) > 1:
            raise ValueError(f"at most one group column, got {groups}")
        sparse = {c.name: c for c in self.columns if c.is_sparse}
        for c in self.columns:
            if c.vocab is not None and (c.vocab not in sparse or sparse[c.vocab].vocab is not None):
                raise ValueError(f"column {c.name!r}: vocab {c.vocab!r} must name a categorical column that owns "
                                 "its vocabulary")
            if c.time_part is not None and c.source not in {s.source for s in stamps}:
                raise ValueError(f"column {c.name!r}: time_part reads a timestamp column; {c.source!r} is not one")

    @property
    def label_names(self) -> list[str]:
        return [c.name for c in self.columns if c.kind == "label"] + [d.name for d in self.labels]

    @property
    def timestamp(self) -> ColumnSpec | None:
        return next((c for c in self.columns if c.kind == "timestamp"), None)


def load_schema(path: str | Path) -> TableSchema:
    """A schema file, strictly: unknown keys and wrong types are one-line :class:`UserError`\\ s naming the file
    and key path; expressions are compiled once here so a mistake in one is reported before any data is read."""
    from recsys_transfer.config import build

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: schema file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    schema = build(TableSchema, tree, str(path))
    types = raw_types(schema)
    for where, text in [(f"labels.{d.name}", d.expr) for d in schema.labels] + \
                       [(f"filters[{k}]", f.expr) for k, f in enumerate(schema.filters)]:
        try:
            compile_expr(text, types)
        except ValueError as exc:
            raise UserError(f"{path}: {where}: {exc}") from None
    return schema


def raw_types(schema: TableSchema) -> dict[str, str]:
    """How expressions see each raw column: ``num`` or ``str``."""
    types: dict[str, str] = {}
    for c in schema.columns:
        for s in c.sources:
            numeric = (c.kind in ("dense", "int_bucketized", "timestamp") or (c.kind == "label" and c.task != "multiclass")
                       or (c.kind == "drop" and c.type in ("int", "float")))
            if c.flags:
                numeric = False
            types[s] = "num" if numeric or types.get(s) == "num" else "str"
    return types


# ----------------------------------------------------------------------------------------------------------
# expressions


_COMPARE = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__", ast.Gt: "__gt__",
            ast.GtE: "__ge__"}
_ARITH = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__", ast.Mod: "__mod__"}


def compile_expr(text: str, types: dict[str, str], columns: dict[str, pl.Expr] | None = None) -> pl.Expr:
    """A polars expression from a small Python-syntax expression (see the module docstring). ``types``: raw column
    -> ``num``/``str``; ``columns``: the polars expression of each raw column (default ``pl.col(name)``)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"expression {text!r} is not valid: {exc.msg}") from None

    def column(name: str) -> tuple[pl.Expr, str]:
        if name not in types:
            raise ValueError(f"expression {text!r}: unknown column {name!r} (columns: {sorted(types)})")
        return (columns or {}).get(name, pl.col(name)), types[name]

    def visit(node: ast.AST) -> tuple[pl.Expr, str]:
        if isinstance(node, ast.Name):
            return column(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords \
                and len(node.args) == 1:
            if node.func.id == "col" and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                return column(node.args[0].value)
            if node.func.id == "is_null":
                return visit(node.args[0])[0].is_null(), "bool"
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool) \
                and isinstance(node.value, (int, float, str)):
            return pl.lit(node.value), "num" if isinstance(node.value, (int, float)) else "str"
        if isinstance(node, ast.UnaryOp):
            inner, kind = visit(node.operand)
            if isinstance(node.op, ast.Not) and kind == "bool":
                return ~inner, "bool"
            if isinstance(node.op, ast.USub) and kind == "num":
                return -inner, "num"
        if isinstance(node, ast.BoolOp):
            parts = [visit(v) for v in node.values]
            if all(k == "bool" for _, k in parts):
                out = parts[0][0]
                for p, _ in parts[1:]:
                    out = (out & p) if isinstance(node.op, ast.And) else (out | p)
                return out, "bool"
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            (a, ka), (b, kb) = visit(node.left), visit(node.right)
            if ka == kb == "num":
                return getattr(a, _ARITH[type(node.op)])(b), "num"
        if isinstance(node, ast.Compare):
            out = None
            left, kl = visit(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)) and isinstance(right_node, (ast.List, ast.Tuple)):
                    items = [visit(e) for e in right_node.elts]
                    if any(k != kl for _, k in items) or kl == "bool":
                        raise ValueError(f"expression {text!r}: 'in' mixes text and numbers")
                    values = [e.value for e in right_node.elts]  # type: ignore[attr-defined]
                    term = left.is_in(values)
                    term = ~term if isinstance(op, ast.NotIn) else term
                    right, kr = left, kl
                elif type(op) in _COMPARE:
                    right, kr = visit(right_node)
                    if kl != kr or kl == "bool":
                        raise ValueError(f"expression {text!r}: compares {kl} with {kr}")
                    term = getattr(left, _COMPARE[type(op)])(right)
                else:
                    raise ValueError(f"expression {text!r}: unsupported comparison {type(op).__name__}")
                out = term if out is None else out & term
                left, kl = right, kr
            return out, "bool"
        raise ValueError(f"expression {text!r}: unsupported part {ast.unparse(node)!r}")

    expr, _ = visit(tree.body)
    return expr


__all__ = ["ColumnSpec", "DerivedLabel", "FileFormat", "FilterSpec", "JoinSpec", "TableSchema", "compile_expr",
           "load_schema", "raw_types"]
