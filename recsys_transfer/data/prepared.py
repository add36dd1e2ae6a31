"""The prepared-dataset format, shared by every source (MovieLens, Criteo, synthetic).

Layout of a prepared directory::

    DIR/meta.json                 the schema artifact (see :class:`DatasetMeta`)
    DIR/train/part-00000.parquet  shards per split; columns: one int64 id column per sparse field,
    DIR/valid/...                 one float32 column per dense field, one float32 column per label
    DIR/test/...
    DIR/vocab/<field>.parquet     raw value -> id (and training count) per vocabulary-encoded field

Ids: 0 is the OOV row of every sparse field (values unseen in train, below ``min_count``, or missing);
vocabulary ids 1..V-1 are assigned in order of decreasing training count (ties by raw value), so id order is
frequency order. Hashed fields map a raw value to ``1 + h(value) mod (hash_size - 1)`` with a stable
64-bit hash (:func:`stable_hash`), so they need no vocabulary.

Building reads the stream of raw chunks (polars DataFrames) ONCE and makes two passes, so memory is bounded by
the chunk size plus the vocabularies, never by the file. Sources supply the chunks; see :func:`build_prepared`.

* Pass 1 (over the source, which runs one chunk ahead in a background thread): every value of a vocabulary
  field gets a temporary integer id (a per-field growing dictionary: a private polars ``Categorical`` for
  strings, a dense lookup array for integers of a bounded range, a join table otherwise; 0 = missing),
  training counts are accumulated per temporary id (fit on train only, as FuxiCTR does), hashed fields are
  hashed, and the int-coded rows (temporary ids, hashed ids, dense, labels, split code) are spilled
  to an uncompressed Arrow IPC file.
* Vocabularies: per field, the raw values with ``count >= min_count`` sorted by (count desc, raw value asc)
  -- the raw values keep their dtype, so ties order exactly as the raw values themselves -- give the final
  ids and a lookup array temporary id -> final id.
* Pass 2 (over the spill, not the source): final ids by array lookup, rows split and written as parquet by
  ``PASS2_WORKERS`` threads, each over a contiguous range of the spill (so a split with rows from several
  ranges has shards ``part-00-00000.parquet``, ``part-01-00000.parquet``, ... listed in row order).

The source is therefore parsed once, and no string is hashed or joined in pass 2. The spill file costs
temporary disk of about 4 bytes per row per sparse/dense/label field plus 1 (~210 bytes per Criteo row, about
the size of the TSV itself); it goes to ``spill_dir`` (default: inside the output's temporary directory
``<output>.tmp``) and is removed when the build ends, also when it fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_transfer.data.prefetch import read_ahead
from recsys_transfer.data.splits import SPLITS, HeadTailSpec, SplitSpec, splitmix64
from recsys_transfer.errors import UserError, read_json
from recsys_transfer.tasks import TaskSpec, check_tasks, default_tasks, tasks_from_json

FORMAT_VERSION = 1
OOV_INDEX = 0
ROW_COL = "__row"  # global 0-based record index in the input, supplied by the source
SPLIT_COL = "__split"  # optional split code (0/1/2) supplied by the source (temporal splits)
PASS2_WORKERS = 2  # threads of pass 2 (a constant, not the core count: it shapes the shard layout)


# ----------------------------------------------------------------------------------------------------------
# Schema given by a source


@dataclass(frozen=True)
class SparseSpec:
    """One categorical field. ``min_count``: values seen fewer times in train map to OOV.
    ``hash_size``: if set, hash into that many rows (row 0 stays OOV/missing) instead of a vocabulary.
    ``multi_valued``: the chunk column is a list per row (polars ``List``); each element gets an id, the prepared
    column is ``list<int64>`` (empty lists allowed; a null list is an empty list).
    ``vocab``: share the vocabulary (and the embedding table) of that other field, e.g. a history list of the
    ``item_id`` field's items; the shared vocabulary is fit on the occurrences of every field that uses it."""

    name: str
    min_count: int = 1
    hash_size: int | None = None
    multi_valued: bool = False
    vocab: str | None = None

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"{self.name}: min_count must be >= 1")
        if self.hash_size is not None and self.hash_size < 2:
            raise ValueError(f"{self.name}: hash_size must be >= 2")
        if self.vocab == self.name:
            object.__setattr__(self, "vocab", None)

    @property
    def vocab_owner(self) -> str:
        return self.vocab or self.name


DENSE_FILLS = ("zero", "mean")
DENSE_NORMALIZATIONS = ("none", "standard", "minmax")


@dataclass(frozen=True)
class DenseSpec:
    """One dense field, fitted on the training rows (as FuxiCTR's feature processor): a missing value (null or
    NaN) becomes ``fill`` (``zero``, or ``mean``: the training mean), then ``normalize``: ``none``, ``standard``
    (``(x - mean) / std``, population std, 1 when std is 0) or ``minmax`` (``(x - min) / (max - min)``, 0 when
    constant). Statistics are over the training rows' present values, in float64; they are recorded in
    ``meta.json`` (``dense_stats``)."""

    name: str
    fill: str = "zero"
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.fill not in DENSE_FILLS:
            raise ValueError(f"{self.name}: fill must be one of {DENSE_FILLS}, got {self.fill!r}")
        if self.normalize not in DENSE_NORMALIZATIONS:
            raise ValueError(f"{self.name}: normalize must be one of {DENSE_NORMALIZATIONS}, got {self.normalize!r}")

    @property
    def fitted(self) -> bool:
        return self.fill != "zero" or self.normalize != "none"


@dataclass(frozen=True)
class Schema:
    sparse: tuple[SparseSpec, ...]
    dense: tuple[str | DenseSpec, ...] = ()  # names (no fill or normalization needed) or DenseSpecs
    labels: tuple[str, ...] = ("label",)
    tasks: tuple[TaskSpec, ...] = ()  # default: one binary task per label column
    group: str | None = None  # a sparse field whose ids group rows (group AUC); recorded in meta.json

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense", tuple(d if isinstance(d, DenseSpec) else DenseSpec(d) for d in self.dense))
        names = [s.name for s in self.sparse] + list(self.dense_names) + list(self.labels)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column names in schema: {names}")
        by_name = {s.name: s for s in self.sparse}
        for s in self.sparse:
            if s.vocab is None:
                continue
            owner = by_name.get(s.vocab)
            if owner is None or owner.vocab is not None:
                raise ValueError(f"{s.name}: vocab {s.vocab!r} must name another sparse field that owns its vocabulary")
            if (s.hash_size, s.min_count) != (owner.hash_size, owner.min_count):
                raise ValueError(f"{s.name}: a field sharing {owner.name}'s vocabulary takes its min_count and "
                                 "hash_size; set them on the owner only")
        if self.group is not None and self.group not in by_name:
            raise ValueError(f"group {self.group!r} is not a sparse field of the schema")
        if self.group is not None and by_name[self.group].multi_valued:
            raise ValueError(f"group {self.group!r}: a group id must be single-valued")
        if not self.tasks:
            object.__setattr__(self, "tasks", default_tasks(self.labels))
        check_tasks(self.tasks, list(self.labels), "schema")

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dense)


# ----------------------------------------------------------------------------------------------------------
# meta.json


@dataclass(frozen=True)
class SparseFieldMeta:
    name: str
    vocab_size: int  # number of embedding rows, OOV row included
    oov_index: int
    hashed: bool
    min_count: int
    frequencies: list[int]  # training count per id, length vocab_size (OOV row counts OOV occurrences)
    head_ids: list[int]  # source domain S (sorted); tail = every other non-OOV id
    multi_valued: bool = False  # a list of ids per row (parquet list<int64>; jagged lengths in the KJT)
    vocab_of: str | None = None  # the field whose vocabulary and embedding table this one shares (None: its own)

    @property
    def table_field(self) -> str:
        """The field naming the embedding table this field looks up (itself, or the vocabulary's owner)."""
        return self.vocab_of or self.name

    @property
    def num_head(self) -> int:
        return len(self.head_ids)

    def head_mask(self) -> np.ndarray:
        """bool[vocab_size]: True for head (source) ids."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[np.asarray(self.head_ids, dtype=np.int64)] = True
        return mask

    def tail_mask(self) -> np.ndarray:
        """bool[vocab_size]: True for tail (rough target) ids; the OOV row is neither head nor tail."""
        mask = ~self.head_mask()
        mask[self.oov_index] = False
        return mask

    def tail_ids(self) -> np.ndarray:
        return np.flatnonzero(self.tail_mask())

    def is_head(self, ids: np.ndarray) -> np.ndarray:
        return self.head_mask()[np.asarray(ids, dtype=np.int64)]


@dataclass(frozen=True)
class DatasetMeta:
    """Everything a model, loader or transfer method needs to know about a prepared dataset."""

    dataset: str
    sparse: list[SparseFieldMeta]
    dense: list[str]
    labels: list[str]
    split: dict
    head_tail: dict
    split_rows: dict[str, int]
    split_files: dict[str, list[str]]
    input_rows: int
    skipped_rows: int
    skip_reasons: dict[str, int]
    source: dict
    format_version: int = FORMAT_VERSION
    dataset_id: str = ""
    tasks: tuple[TaskSpec, ...] = ()  # what the labels mean; default (older datasets): one binary task per label
    label_counts: dict = field(default_factory=dict)  # split -> binary label -> {"0": n, "1": n}
    group: str | None = None  # sparse field whose ids group rows for group AUC (the schema's ``group`` column)
    dense_stats: dict = field(default_factory=dict)  # dense field -> fitted fill / normalization (DenseSpec)

    def __post_init__(self) -> None:
        if not self.tasks:
            object.__setattr__(self, "tasks", default_tasks(self.labels))
        check_tasks(self.tasks, list(self.labels), "meta.json tasks")

    # -- queries ---------------------------------------------------------------------------------------------
    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def field(self, name: str) -> SparseFieldMeta:
        for f in self.sparse:
            if f.name == name:
                return f
        raise UserError(f"unknown sparse field {name!r}; this dataset has {self.sparse_names}")

    @property
    def total_rows(self) -> int:
        return sum(self.split_rows.values())

    # -- io --------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        # not dataclasses.asdict: it deep-copies every int of the frequency lists (seconds at Criteo scale)
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sparse":
                d[f.name] = [{g.name: _copy_json(getattr(s, g.name)) for g in fields(s)} for s in value]
            elif f.name == "tasks":
                d[f.name] = [t.to_json() for t in value]
            else:
                d[f.name] = _copy_json(value)
        return d

    @staticmethod
    def compute_id(d: dict) -> str:
        """Content id of the schema + data split (not of paths), so a model can refuse another dataset."""
        key = {
            "dataset": d["dataset"],
            # list fields and shared vocabularies add to a field's key; single-valued own-vocabulary fields keep
            # the key they had before those existed (so earlier dataset ids stay valid)
            "sparse": [(f["name"], f["vocab_size"], f["hashed"])
                       + ((bool(f.get("multi_valued")), f.get("vocab_of"))
                          if f.get("multi_valued") or f.get("vocab_of") else ())
                       for f in d["sparse"]],
            "dense": d["dense"],
            "labels": d["labels"],
            "split": d["split"],
            "split_rows": d["split_rows"],
            "source": {k: v for k, v in d["source"].items() if k not in ("input", "schema_file")},
        }
        for extra in ("group", "dense_stats"):
            if d.get(extra):
                key[extra] = d[extra]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def write(self, directory: Path) -> None:
        d = self.to_json()
        (Path(directory) / "meta.json").write_text(json.dumps(d, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DatasetMeta":
        path = Path(directory) / "meta.json"
        d = read_json(path, "not a prepared dataset (meta.json missing); run `recsys-transfer prepare` first")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format_version {d.get('format_version')} is not {FORMAT_VERSION}; prepare the data again")
        try:
            d["sparse"] = [SparseFieldMeta(**f) for f in d["sparse"]]
            d["tasks"] = tasks_from_json(d.get("tasks", []))
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{path}: {exc}; prepare the data again") from None


def _copy_json(value):
    """Copy of a JSON-like value; lists of ints are copied flat (fast), containers recursively."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(x, (int, float, str)) for x in value):
            return list(value)
        return [_copy_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# hashing


def stable_hash(values: pl.Series) -> np.ndarray:
    """A 64-bit hash of each value that does not depend on the polars version: the MD5 prefix is too slow, so
    we hash the UTF-8 bytes with FNV-1a folded through SplitMix64, vectorized over the Arrow buffers."""
    arr = values.cast(pl.Utf8).fill_null("").to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    n = len(lengths)
    h = np.full(n, np.uint64(0xCBF29CE484222325))
    prime = np.uint64(0x100000001B3)
    max_len = int(lengths.max()) if n else 0
    starts = offsets[:-1]
    with np.errstate(over="ignore"):
        for k in range(max_len):  # loop over character positions (short strings), vectorized over rows
            live = lengths > k
            idx = np.flatnonzero(live)
            h[idx] = (h[idx] ^ data[starts[idx] + k].astype(np.uint64)) * prime
        h ^= lengths.astype(np.uint64)
    return splitmix64(h)


# ----------------------------------------------------------------------------------------------------------
# building


@dataclass
class BuildReport:
    input_rows: int = 0
    skipped_rows: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped_rows += n
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + n


ChunkFactory = Callable[[], Iterable[pl.DataFrame]]


def _split_codes(chunk: pl.DataFrame, split: SplitSpec) -> np.ndarray:
    if SPLIT_COL in chunk.columns:
        return chunk[SPLIT_COL].to_numpy().astype(np.uint8)
    if split.kind != "random":
        raise ValueError("a temporal split must be assigned by the source (column __split)")
    return split.assign_random(chunk[ROW_COL].to_numpy())


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterator:
    if not enabled:
        yield from iterable
        return
    from tqdm import tqdm

    with tqdm(iterable, desc=desc, unit="chunk", total=total, leave=False) as bar:
        yield from bar


_LUT_MAX_RANGE = 1 << 22  # integer fields whose values span more than this use the join table instead
_LUT_DTYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32)


class _ProgressCounter:
    """A thread-safe tqdm counter (or nothing when disabled)."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, unit="chunk", total=total, leave=False)

    def update(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()



class _FieldEncoder:
    """Pass 1: raw values of one vocabulary field -> temporary integer ids (0 = missing, 1.. = first-seen order).

    Strings go through a polars ``Categorical`` with a private ``Categories`` (a growing string -> UInt32
    dictionary, one hash probe per value; :meth:`string_expr` lets the caller encode all string fields of a
    chunk in one multi-threaded select). Integers whose values span at most ``_LUT_MAX_RANGE`` (bucketed Criteo
    integers, MovieLens ids, ages, years) go through a dense numpy lookup array ``value - lo -> id``; any other
    dtype through a growing polars join table. Training counts are accumulated per temporary id
    (``np.bincount``), so pass 2 maps ints by array lookup instead of joining strings. Memory: one entry per
    distinct raw value (the lookup array: 8 bytes per value of the spanned range, at most 32 MiB).
    """

    def __init__(self, name: str, tag: str) -> None:
        self.name = name
        self.tag = tag
        self.dtype: pl.DataType | None = None
        self.counts = np.zeros(1, dtype=np.int64)  # training count per temporary id; [0] counts missing values
        self._categories: pl.Categories | None = None
        self._keepalive: pl.Series | None = None  # polars frees a Categories mapping that no series uses
        self._lut: np.ndarray | None = None  # integer fields: value - self._lo -> temporary id (0: not seen yet)
        self._lo = 0
        self._lut_values: list[np.ndarray] = []  # integer fields: raw values in temporary-id order
        self._n = 0  # temporary ids handed out
        self._table: pl.DataFrame | None = None  # other fields: raw value -> temporary id

    def _start(self, dtype: pl.DataType) -> None:
        self.dtype = dtype
        if dtype == pl.String:
            self._categories = pl.Categories(f"recsys-build-{self.tag}-{self.name}")
            self._keepalive = pl.Series([], dtype=pl.Categorical(self._categories))
        elif dtype in _LUT_DTYPES:
            self._lut = np.zeros(0, dtype=np.int64)
        else:
            self._table = pl.DataFrame({self.name: pl.Series([], dtype=dtype), "tid": pl.Series([], dtype=pl.UInt32)})

    def string_expr(self, dtype: pl.DataType) -> pl.Expr | None:
        """The temporary-id expression (UInt32, 0 = missing) of this string field, or None if it is not one."""
        if dtype != pl.String or self.dtype not in (None, pl.String):
            return None
        if self.dtype is None:
            self._start(dtype)
        cat = pl.col(self.name).cast(pl.Categorical(self._categories))
        return (cat.to_physical().cast(pl.UInt32) + 1).fill_null(0).alias(self.name)

    def count(self, tid: np.ndarray, train: np.ndarray) -> np.ndarray:
        """Add the training rows of ``tid`` (temporary ids of one chunk) to the counts; returns ``tid`` as uint32."""
        counts = np.bincount(tid[train], minlength=len(self.counts))
        if len(counts) > len(self.counts):
            counts[: len(self.counts)] += self.counts
            self.counts = counts
        else:
            self.counts += counts
        return tid.astype(np.uint32, copy=False)

    def encode(self, values: pl.Series, train: np.ndarray) -> np.ndarray:
        if values.dtype == pl.Null:  # an all-missing chunk says nothing about the field's dtype
            self.counts[0] += int(np.count_nonzero(train))
            return np.zeros(len(values), dtype=np.uint32)
        if self.dtype is None:
            self._start(values.dtype)
        if self._categories is not None:
            tid = values.cast(pl.String).to_frame(self.name).select(self.string_expr(pl.String)).to_series().to_numpy()
        else:
            tid = self._lut_ids(values.cast(self.dtype)) if self._lut is not None else None
            if tid is None:
                tid = self._join_ids(values)
        return self.count(tid, train)

    def _lut_ids(self, values: pl.Series) -> np.ndarray | None:
        """Temporary ids by the dense lookup array; None (and the field moves to the join table for good) when
        the values span more than ``_LUT_MAX_RANGE``."""
        valid = values.is_not_null().to_numpy()
        if not valid.any():
            return np.zeros(len(values), dtype=np.int64)
        vmin, vmax = int(values.min()), int(values.max())
        lo = vmin if not len(self._lut) else min(self._lo, vmin)
        hi = vmax if not len(self._lut) else max(self._lo + len(self._lut) - 1, vmax)
        if hi - lo + 1 > _LUT_MAX_RANGE:
            self._to_table()
            return None
        if lo != self._lo or hi - lo + 1 != len(self._lut):  # grow the array (it only ever grows)
            grown = np.zeros(hi - lo + 1, dtype=np.int64)
            if len(self._lut):
                grown[self._lo - lo : self._lo - lo + len(self._lut)] = self._lut
            self._lut, self._lo = grown, lo
        idx = values.fill_null(lo).to_numpy().astype(np.int64, copy=False) - lo
        tid = self._lut[idx]
        tid[~valid] = 0
        new = (tid == 0) & valid
        if new.any():
            fresh = np.unique(idx[new])  # sorted; the order of temporary ids does not reach the final ids
            self._lut[fresh] = np.arange(self._n + 1, self._n + 1 + len(fresh))
            self._lut_values.append(fresh + lo)
            self._n += len(fresh)
            tid[new] = self._lut[idx[new]]
        return tid

    def _to_table(self) -> None:
        raw = self.raw_values()
        self._table = pl.DataFrame({self.name: raw, "tid": pl.Series(np.arange(1, len(raw) + 1), dtype=pl.UInt32)})
        self._lut, self._lut_values = None, []

    def _join_ids(self, values: pl.Series) -> np.ndarray:
        frame = values.cast(self.dtype).alias(self.name).to_frame()
        new = frame.drop_nulls().unique(maintain_order=True).join(self._table, on=self.name, how="anti")
        if len(new):
            start = len(self._table) + 1
            new = new.with_columns(pl.int_range(start, start + len(new), dtype=pl.UInt32).alias("tid"))
            self._table = pl.concat([self._table, new], rechunk=True)
        return (
            frame.join(self._table, on=self.name, how="left", maintain_order="left")
            .get_column("tid")
            .fill_null(0)
            .to_numpy()
        )

    def raw_values(self) -> pl.Series:
        """Raw value of each temporary id 1..n (index i -> id i + 1)."""
        if self._categories is not None:
            values = self._categories.to_series().cast(pl.String)
        elif self._lut is not None:
            values = pl.Series(np.concatenate([np.zeros(0, dtype=np.int64), *self._lut_values])).cast(self.dtype)
        elif self._table is not None:
            values = self._table.get_column(self.name)  # rows were appended in id order
        else:  # no chunk at all
            values = pl.Series([], dtype=pl.String)
        return values.alias(self.name)

    def vocabulary(self, min_count: int) -> tuple[pl.DataFrame, np.ndarray, int]:
        """(raw -> id table, lookup temporary id -> final id, OOV training count).

        Final ids: 1.. in order of decreasing training count, ties by raw value (in the raw dtype's order,
        exactly as before the temporary ids existed); missing, unseen and rare values -> OOV_INDEX."""
        values = self.raw_values()
        n = len(values)
        counts = np.zeros(n + 1, dtype=np.int64)
        counts[: min(len(self.counts), n + 1)] = self.counts[: n + 1]
        if len(self.counts) > n + 1 and self.counts[n + 1 :].any():
            raise RuntimeError(f"{self.name}: training counts for ids the dictionary does not know")
        table = pl.DataFrame({
            self.name: values,
            "tid": np.arange(1, n + 1, dtype=np.int64),
            "count": counts[1:],
        })
        if values.null_count() and table.filter(pl.col(self.name).is_null())["count"].sum():
            raise RuntimeError(f"{self.name}: a temporary id with training rows has no raw value")
        keep = pl.col("count") >= min_count
        kept = table.filter(keep).sort(["count", self.name], descending=[True, False]).with_row_index("id", offset=1)
        kept = kept.with_columns(pl.col("id").cast(pl.Int64))
        lut = np.zeros(n + 1, dtype=np.int64)
        lut[kept["tid"].to_numpy()] = kept["id"].to_numpy()
        oov = int(counts[0]) + int(counts[1:][counts[1:] < min_count].sum())
        return kept.select(self.name, "id", "count"), lut, oov


class _ShardWriter:
    def __init__(self, directory: Path, rows_per_shard: int, row_group_size: int, prefix: str = "part-") -> None:
        self.directory = directory
        self.prefix = prefix
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.files: list[str] = []
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"{self.prefix}{len(self.files):05d}.parquet"
                self._writer = pq.ParquetWriter(self.directory / name, table.schema, compression="zstd")
                self.files.append(f"{self.directory.name}/{name}")
                self._in_shard = 0
            take = min(table.num_rows, self.rows_per_shard - self._in_shard)
            self._writer.write_table(table.slice(0, take), row_group_size=self.row_group_size)
            self._in_shard += take
            self.rows += take
            table = table.slice(take)
            if self._in_shard >= self.rows_per_shard:
                self._writer.close()
                self._writer = None

    def close(self, schema: pa.Schema, empty_shard: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.files and empty_shard:  # an empty split still gets one (empty) shard so readers see the schema
            name = f"{self.prefix}{0:05d}.parquet"
            pq.write_table(schema.empty_table(), self.directory / name)
            self.files.append(f"{self.directory.name}/{name}")


def build_prepared(
    chunks: ChunkFactory,
    schema: Schema,
    output: str | Path,
    *,
    dataset: str,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    report: BuildReport,
    source: dict,
    progress: bool = True,
    rows_per_shard: int = 2_000_000,
    row_group_size: int = 131_072,
    spill_dir: str | Path | None = None,
    overwrite: bool = False,
    allow_degenerate: bool = False,
) -> DatasetMeta:
    """``chunks()`` (a factory of raw chunks) -> prepared directory, reading the source ONCE.

    Each chunk is a polars DataFrame with the raw columns named in ``schema``, ``__row`` (the global record
    index, used by the random split) and optionally ``__split``. Sources count their skipped rows in ``report``
    while their chunks are read (``report`` is frozen after that), so ``input_rows == prepared rows + skipped
    rows``. See the module docstring for the two passes and the spill file (``spill_dir``: where the spill
    goes; default: inside the output's temporary directory; it is always removed, also on errors).

    The output directory must be empty, absent, or hold a prepared dataset: one of the same dataset id (the same
    schema, split and source options) is replaced; another one only with ``overwrite`` (else a
    :class:`UserError` after the build, leaving it untouched). A split with zero rows, or a binary task whose
    label has a single class in train, is an error naming the label and the counts, unless ``allow_degenerate``
    (the counts are in ``meta.json`` either way, ``label_counts``).
    """
    out = Path(output)
    old_id, tmp = staging_dir(out)
    if spill_dir is None:
        spill_root = tmp / "_spill"
        spill_root.mkdir()
    else:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        spill_root = Path(tempfile.mkdtemp(prefix="recsys-spill-", dir=spill_dir))
    try:
        try:
            meta = _build(chunks, schema, tmp, spill_root / "pass1.arrows", dataset=dataset, split=split,
                          head_tail=head_tail, report=report, source=source, progress=progress,
                          rows_per_shard=rows_per_shard, row_group_size=row_group_size)
        finally:
            shutil.rmtree(spill_root, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_prepared(meta, tmp, out, old_id, overwrite=overwrite, allow_degenerate=allow_degenerate)


def staging_dir(out: Path) -> tuple[str | None, Path]:
    """``(id of the dataset now in out or None, an empty out.tmp/)`` to build a dataset in before
    :func:`publish_prepared` moves it into ``out``; :class:`UserError` if ``out`` is a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a directory")
    old_id = _existing_dataset_id(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return old_id, tmp


def publish_prepared(meta: DatasetMeta, tmp: Path, out: Path, old_id: str | None, *, overwrite: bool,
                     allow_degenerate: bool) -> DatasetMeta:
    """Move a dataset built in ``tmp`` into ``out`` once it passes the checks: no degenerate split or label (unless
    ``allow_degenerate``), and ``out`` holding no other dataset (id ``old_id``) unless ``overwrite``. On a failed
    check ``tmp`` is removed and ``out`` left as it was."""
    try:
        if not allow_degenerate:
            check_label_counts(meta)
        if old_id is not None and old_id != meta.dataset_id and not overwrite:
            raise UserError(f"{out}: holds another prepared dataset (id {old_id}; this one is {meta.dataset_id}); "
                            "pass --overwrite to replace it")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def _existing_dataset_id(out: Path) -> str | None:
    """The dataset id of the prepared dataset in ``out`` (None when ``out`` is absent or empty); a non-empty
    directory that is not a prepared dataset is refused."""
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        return str(json.loads((out / "meta.json").read_text())["dataset_id"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out}: output directory exists, is not empty and is not a prepared dataset; "
                        "refusing to overwrite") from None


def check_label_counts(meta: "DatasetMeta") -> None:
    """Every split has rows and every binary task's label has both classes in train; else a one-line
    :class:`UserError` naming the split or label and the counts (``--allow-degenerate`` skips this check)."""
    empty = [name for name in SPLITS if meta.split_rows.get(name, 0) == 0]
    if empty:
        raise UserError(f"split(s) {empty} have zero rows (rows per split: {meta.split_rows}); change the split "
                        "or pass --allow-degenerate")
    for task in meta.tasks:
        if task.kind != "binary":
            continue
        counts = meta.label_counts.get("train", {}).get(task.label, {})
        n0, n1 = counts.get("0", 0), counts.get("1", 0)
        if n0 == 0 or n1 == 0:
            raise UserError(f"label {task.label!r} (task {task.name!r}) has a single class in train: {n0:,} "
                            f"negatives, {n1:,} positives of {meta.split_rows['train']:,} rows; a binary task "
                            "needs both (pass --allow-degenerate to prepare it anyway)")


def _id_type(spec: SparseSpec, spill: bool) -> pa.DataType:
    base = pa.uint32() if spill and spec.hash_size is None else pa.int64()
    return pa.list_(base) if spec.multi_valued else base


def _output_schema(schema: Schema) -> pa.Schema:
    return pa.schema(
        [pa.field(s.name, _id_type(s, spill=False)) for s in schema.sparse]
        + [pa.field(n, pa.float32()) for n in (*schema.dense_names, *schema.labels)]
    )


def _spill_schema(schema: Schema) -> pa.Schema:
    return pa.schema(
        [pa.field(s.name, _id_type(s, spill=True)) for s in schema.sparse]
        + [pa.field(n, pa.float32()) for n in (*schema.dense_names, *schema.labels)]
        + [pa.field(SPLIT_COL, pa.uint8())]
    )


def _float32(values: pl.Series) -> pa.Array:
    arr = values.cast(pl.Float32).to_arrow()
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _list_parts(values: pl.Series) -> tuple[pl.Series, np.ndarray]:
    """(flattened elements, int64 offsets [n + 1]) of a list column; a null list is an empty list."""
    arr = values.fill_null(pl.Series([[]], dtype=values.dtype)).to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr, pa.LargeListArray):
        offsets = np.asarray(arr.offsets, dtype=np.int64)
    else:
        offsets = np.asarray(arr.offsets).astype(np.int64)
    flat = pl.Series(values.name, arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
    return flat, offsets - offsets[0]


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


class _DenseFit:
    """Training statistics of one dense field (count, sum, sum of squares, min, max of present values, float64)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sumsq, self.min, self.max = 0, 0.0, 0.0, np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        v = values[~np.isnan(values)].astype(np.float64)
        if len(v):
            self.n += len(v)
            self.sum += float(v.sum())
            self.sumsq += float(np.dot(v, v))
            self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))

    def stats(self, spec: DenseSpec) -> dict:
        if self.n == 0:
            raise UserError(f"dense field {spec.name!r}: no present value in the training rows to fit "
                            f"fill={spec.fill!r} / normalize={spec.normalize!r}")
        mean = self.sum / self.n
        std = float(np.sqrt(max(self.sumsq / self.n - mean * mean, 0.0)))
        fill = mean if spec.fill == "mean" else 0.0
        if spec.normalize == "standard":
            shift, scale = mean, (std if std > 0 else 1.0)
        elif spec.normalize == "minmax":
            shift, scale = self.min, (self.max - self.min if self.max > self.min else 1.0)
        else:
            shift, scale = 0.0, 1.0
        return {"fill": spec.fill, "normalize": spec.normalize, "count": self.n, "mean": mean, "std": std,
                "min": self.min, "max": self.max, "fill_value": fill, "shift": shift, "scale": scale}


def _apply_dense(arr: pa.Array, stats: dict | None) -> pa.Array:
    """Missing -> fill, then (x - shift) / scale (float64 arithmetic, float32 result); unfitted fields only get
    their nulls filled with 0."""
    if stats is None:
        return arr if arr.null_count == 0 else pa.array(np.nan_to_num(arr.to_numpy(zero_copy_only=False), nan=0.0)
                                                        .astype(np.float32))
    x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    x[np.isnan(x)] = stats["fill_value"]
    return pa.array(((x - stats["shift"]) / stats["scale"]).astype(np.float32))


def _build(
    chunks: ChunkFactory,
    schema: Schema,
    tmp: Path,
    spill_path: Path,
    *,
    dataset: str,
    split: SplitSpec,
    head_tail: HeadTailSpec,
    report: BuildReport,
    source: dict,
    progress: bool,
    rows_per_shard: int,
    row_group_size: int,
) -> DatasetMeta:
    # -- pass 1: read the source once; temporary ids + training counts; spill the int-coded rows -------------
    # One encoder per vocabulary (a field sharing another's vocabulary uses the owner's encoder). Its counts are
    # the vocabulary's (every sharing field's occurrences); per-field counts are kept separately for a shared one.
    tag = uuid.uuid4().hex
    encoders = {s.name: _FieldEncoder(s.name, tag) for s in schema.sparse if s.hash_size is None and s.vocab is None}
    sharing = {s.vocab_owner for s in schema.sparse if s.vocab is not None}
    own_counts = {s.name: np.zeros(1, dtype=np.int64) for s in schema.sparse
                  if s.hash_size is None and s.vocab_owner in sharing}
    hashed_freq = {s.name: np.zeros(s.hash_size, dtype=np.int64) for s in schema.sparse if s.hash_size is not None}
    dense_fits = {d.name: _DenseFit() for d in schema.dense if d.fitted}
    spill_schema = _spill_schema(schema)
    batches = 0

    def add_own(name: str, tid: np.ndarray, train: np.ndarray) -> None:
        if name in own_counts:
            c = np.bincount(tid[train], minlength=len(own_counts[name]))
            c[: len(own_counts[name])] += own_counts[name]
            own_counts[name] = c

    with pa.OSFile(str(spill_path), "wb") as sink, pa.ipc.new_file(sink, spill_schema) as spill:
        # The source (parsing, validation, transforms: polars, GIL released) runs one chunk ahead in a thread.
        for chunk in _progress(read_ahead(chunks(), name="prepare-source"), "read", progress):
            codes = _split_codes(chunk, split)
            train = codes == 0
            string_exprs = {}  # all single-valued string fields of the chunk in one multi-threaded select
            for spec in schema.sparse:
                if spec.hash_size is None and not spec.multi_valued and spec.vocab is None:
                    expr = encoders[spec.name].string_expr(chunk.schema[spec.name])
                    if expr is not None:
                        string_exprs[spec.name] = expr
            string_ids = chunk.select(list(string_exprs.values())) if string_exprs else None
            cols: list[pa.Array] = []
            for spec in schema.sparse:
                raw = chunk[spec.name]
                offsets = None
                rows_train = train
                if spec.multi_valued:
                    if not isinstance(raw.dtype, pl.List):
                        raise ValueError(f"{spec.name}: a multi-valued field needs a list column, got {raw.dtype}")
                    raw, offsets = _list_parts(raw)
                    rows_train = np.repeat(train, np.diff(offsets))
                if spec.name in string_exprs:
                    tid = encoders[spec.name].count(string_ids.get_column(spec.name).to_numpy(), train)
                    add_own(spec.name, tid, train)
                    ids = tid
                elif spec.hash_size is None:
                    ids = encoders[spec.vocab_owner].encode(raw, rows_train)
                    add_own(spec.name, ids, rows_train)
                else:
                    ids = 1 + (stable_hash(raw) % np.uint64(spec.hash_size - 1)).astype(np.int64)
                    ids[raw.is_null().to_numpy()] = OOV_INDEX
                    hashed_freq[spec.name] += np.bincount(ids[rows_train], minlength=spec.hash_size)
                cols.append(pa.array(ids) if offsets is None else _list_array(offsets, ids))
            for d in schema.dense:
                arr = _float32(chunk[d.name])
                if d.name in dense_fits:
                    dense_fits[d.name].add(arr.to_numpy(zero_copy_only=False)[train])
                cols.append(arr)
            cols += [_float32(chunk[n]) for n in schema.labels]
            cols.append(pa.array(codes.astype(np.uint8, copy=False)))
            spill.write_batch(pa.RecordBatch.from_arrays(cols, schema=spill_schema))
            batches += 1
    frozen = BuildReport(report.input_rows, report.skipped_rows, dict(report.skip_reasons))

    # -- vocabularies (train only) ---------------------------------------------------------------------------
    luts: dict[str, np.ndarray] = {}
    freqs: dict[str, np.ndarray] = {}
    (tmp / "vocab").mkdir()
    for spec in schema.sparse:
        if spec.hash_size is not None:
            freqs[spec.name] = hashed_freq[spec.name]
            continue
        if spec.vocab is None:
            vocab, lut, oov_count = encoders[spec.name].vocabulary(spec.min_count)
            vocab.write_parquet(tmp / "vocab" / f"{spec.name}.parquet")
            luts[spec.name] = lut
            freq = np.zeros(len(vocab) + 1, dtype=np.int64)
            freq[vocab["id"].to_numpy()] = vocab["count"].to_numpy()
            freq[OOV_INDEX] = oov_count
            freqs[spec.name] = freq
    for spec in schema.sparse:  # a shared vocabulary: each field's own training counts under the shared ids
        if spec.name in own_counts:
            lut = luts[spec.name] = luts[spec.vocab_owner]
            mine = own_counts[spec.name]
            freqs[spec.name] = np.bincount(lut[: len(mine)], weights=mine[: len(lut)],
                                           minlength=len(freqs[spec.vocab_owner])).astype(np.int64)
    del encoders

    # -- pass 2: read the spill, map temporary ids by array lookup, write the shards --------------------------
    # The spill is an Arrow IPC file (random access by batch). PASS2_WORKERS threads each take a contiguous range
    # of its batches and write their own shards (numpy lookups and parquet encoding release the GIL, so the
    # workers use separate cores); shard files are named by worker then sequence, so a split's files listed in
    # order hold its rows in input order, and the layout depends on the data and chunk size, not on timing.
    out_schema = _output_schema(schema)
    n_sparse = len(schema.sparse)
    workers = min(PASS2_WORKERS, batches) or 1
    ranges = np.array_split(np.arange(batches), workers)
    prefix = (lambda w: "part-") if workers == 1 else (lambda w: f"part-{w:02d}-")
    writers = [{name: _ShardWriter(tmp / name, rows_per_shard, row_group_size, prefix(w)) for name in SPLITS}
               for w in range(workers)]
    bar = _ProgressCounter("write", batches, progress)

    binary_labels = sorted({t.label for t in schema.tasks if t.kind == "binary"})
    label_col = {name: n_sparse + len(schema.dense) + k for k, name in enumerate(schema.labels)}
    dense_stats = {name: fit.stats(next(d for d in schema.dense if d.name == name))
                   for name, fit in dense_fits.items()}
    counts = [{name: {lab: np.zeros(3, np.int64) for lab in binary_labels} for name in SPLITS} for _ in range(workers)]

    def count_labels(w: int, split_name: str, table: pa.Table) -> None:
        for lab in binary_labels:  # how many 0s, 1s and other values each binary label has per split
            y = table.column(label_col[lab]).to_numpy()
            n0, n1 = int(np.count_nonzero(y == 0)), int(np.count_nonzero(y == 1))
            counts[w][split_name][lab] += (n0, n1, len(y) - n0 - n1)

    n_dense = len(schema.dense)

    def map_batch(batch: pa.RecordBatch) -> list[tuple[str, pa.Table]]:
        codes = batch.column(len(batch.schema) - 1).to_numpy()
        sparse: list[np.ndarray | pa.Array] = []
        for i, spec in enumerate(schema.sparse):
            col = batch.column(i)
            if not spec.multi_valued:
                sparse.append(col.to_numpy())
                continue
            values = col.values.to_numpy()  # the spill's lists start at offset 0 (written from whole chunks)
            ids = luts[spec.name][values] if spec.hash_size is None else values.astype(np.int64, copy=False)
            sparse.append(pa.ListArray.from_arrays(col.offsets, pa.array(ids, type=pa.int64())))
        dense = [_apply_dense(batch.column(n_sparse + j), dense_stats.get(d.name))
                 for j, d in enumerate(schema.dense)]
        labels = [batch.column(i) for i in range(n_sparse + n_dense, len(batch.schema) - 1)]
        parts = []
        for code, name in enumerate(SPLITS):
            rows = np.flatnonzero(codes == code)
            if not len(rows):
                continue
            take = None if len(rows) == len(codes) else rows
            cols = []
            for spec, values in zip(schema.sparse, sparse):
                if spec.multi_valued:
                    cols.append(values if take is None else values.take(pa.array(take)))
                    continue
                values = values if take is None else values[take]
                cols.append(pa.array(luts[spec.name][values] if spec.hash_size is None else values))
            cols += [c if take is None else c.take(pa.array(take)) for c in (*dense, *labels)]
            parts.append((name, pa.Table.from_arrays(cols, schema=out_schema)))
        return parts

    def work(w: int) -> None:
        with pa.OSFile(str(spill_path), "rb") as src:  # not memory_map: mapped pages would count as RSS
            reader = pa.ipc.open_file(src)
            for i in ranges[w]:
                for name, table in map_batch(reader.get_batch(int(i))):
                    count_labels(w, name, table)
                    writers[w][name].write(table)
                bar.update()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare-write") as pool:
        for future in [pool.submit(work, w) for w in range(workers)]:
            future.result()
    bar.close()
    split_rows = {name: sum(ws[name].rows for ws in writers) for name in SPLITS}
    split_files: dict[str, list[str]] = {}
    for name in SPLITS:
        for w, ws in enumerate(writers):  # the first worker writes the empty shard of an empty split
            ws[name].close(out_schema, empty_shard=w == 0 and split_rows[name] == 0)
        split_files[name] = [f for ws in writers for f in ws[name].files]

    sparse_meta = []
    for spec in schema.sparse:
        freq = freqs[spec.name]
        sparse_meta.append(
            SparseFieldMeta(
                name=spec.name,
                vocab_size=int(len(freq)),
                oov_index=OOV_INDEX,
                hashed=spec.hash_size is not None,
                min_count=spec.min_count,
                frequencies=np.asarray(freq, dtype=np.int64).tolist(),
                head_ids=np.asarray(head_tail.head_ids(freq, OOV_INDEX), dtype=np.int64).tolist(),
                multi_valued=spec.multi_valued,
                vocab_of=spec.vocab,
            )
        )
    prepared_rows = sum(split_rows.values())
    if prepared_rows + frozen.skipped_rows != frozen.input_rows:
        raise RuntimeError(
            f"row accounting broken: {prepared_rows} prepared + {frozen.skipped_rows} skipped != {frozen.input_rows} input"
        )
    d = dict(
        dataset=dataset,
        sparse=[{"name": f.name, "vocab_size": f.vocab_size, "hashed": f.hashed, "multi_valued": f.multi_valued,
                 "vocab_of": f.vocab_of} for f in sparse_meta],  # for the id
        dense=list(schema.dense_names),
        labels=list(schema.labels),
        group=schema.group,
        dense_stats=dense_stats,
        split=split.to_json(),
        head_tail=head_tail.to_json(),
        split_rows=split_rows,
        split_files=split_files,
        input_rows=frozen.input_rows,
        skipped_rows=frozen.skipped_rows,
        skip_reasons=frozen.skip_reasons,
        source=source,
    )
    d["dataset_id"] = DatasetMeta.compute_id(d)
    d["sparse"] = sparse_meta
    d["tasks"] = schema.tasks
    d["label_counts"] = {}
    for name in SPLITS:
        for lab in binary_labels:
            n = sum(c[name][lab] for c in counts)
            entry = {"0": int(n[0]), "1": int(n[1])}
            if n[2]:
                entry["other"] = int(n[2])
            d["label_counts"].setdefault(name, {})[lab] = entry
    meta = DatasetMeta(**d)
    meta.write(tmp)
    return meta


def chunked(df: pl.DataFrame, chunk_rows: int) -> Callable[[], Iterator[pl.DataFrame]]:
    """Chunk factory over an in-memory frame (adds ``__row`` if absent)."""
    if ROW_COL not in df.columns:
        df = df.with_row_index(ROW_COL).with_columns(pl.col(ROW_COL).cast(pl.UInt64))

    def factory() -> Iterator[pl.DataFrame]:
        for start in range(0, max(len(df), 1), chunk_rows):
            part = df.slice(start, chunk_rows)
            if len(part) or start == 0:
                yield part

    return factory


def rechunked(blocks: Iterable[pl.DataFrame], chunk_rows: int,
              empty: Callable[[], pl.DataFrame]) -> Iterator[pl.DataFrame]:
    """Generated blocks re-sliced into frames of ``chunk_rows`` rows (the last one shorter), so the rows do not
    depend on the frame size; ``empty()`` (a frame with the columns) when there are no rows at all."""
    pending: list[pl.DataFrame] = []
    have = 0
    seen = False
    for blk in blocks:
        seen = seen or len(blk) > 0
        pending.append(blk)
        have += len(blk)
        while have >= chunk_rows:
            buf = pl.concat(pending, rechunk=False) if len(pending) > 1 else pending[0]
            out, rest = buf.slice(0, chunk_rows), buf.slice(chunk_rows)
            yield out.rechunk()
            pending, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield pl.concat(pending).rechunk()
    elif not seen:  # one empty frame so consumers see the columns
        yield empty()


def human_summary(meta: DatasetMeta) -> str:
    lines = [
        f"dataset {meta.dataset} (id {meta.dataset_id}): {meta.total_rows:,} rows "
        + ", ".join(f"{k} {v:,}" for k, v in meta.split_rows.items())
        + f"; input {meta.input_rows:,}, skipped {meta.skipped_rows:,}"
        + (f" {meta.skip_reasons}" if meta.skip_reasons else ""),
    ]
    for f in meta.sparse:
        lines.append(
            f"  {f.name:<16} vocab {f.vocab_size:>9,}  head {f.num_head:>8,}  "
            f"oov-count {f.frequencies[f.oov_index]:>8,}{'  (hashed)' if f.hashed else ''}"
            f"{'  (list)' if f.multi_valued else ''}{f'  (table of {f.vocab_of})' if f.vocab_of else ''}"
        )
    if meta.dense:
        lines.append(f"  dense: {', '.join(meta.dense)}")
    return "\n".join(lines)


__all__ = [
    "BuildReport",
    "DatasetMeta",
    "DenseSpec",
    "HeadTailSpec",
    "Schema",
    "SparseFieldMeta",
    "SparseSpec",
    "SplitSpec",
    "build_prepared",
    "chunked",
    "rechunked",
    "human_summary",
    "stable_hash",
    "ROW_COL",
    "SPLIT_COL",
    "OOV_INDEX",
]
