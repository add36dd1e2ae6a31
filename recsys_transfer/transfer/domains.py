"""The selective target domain T'_eta of the paper (Sec. 3.1, Eq. 3), for recommendation data.

Starting from the frequency split of a field (source S = the field's head ids in ``meta.json``, the top 20% by
training count; rough target T = the tail ids), Eq. 3 keeps a rare item only if it resembles some frequent item::

    T'_eta = T ∩ { i : max_{j in S} cos(s_i, s_j) >= eta }                                             (Eq. 3)

Co-occurrence vectors (Sec. 5.3, "Cosine Similarity Calculation", recommendation experiments: "for each
typical item, we count the times this item co-occurred with one of the top 1K items in one record and construct
the 1K dimension feature vector"). Every sparse field of a prepared dataset is single-valued, so the items a
record's value of field ``f`` co-occurs with are that record's values in the OTHER sparse fields. Hence:

* coordinates: the ``top_k`` (default 1000, as the paper) most frequent ``(field, id)`` values of the other
  sparse fields (or of ``context_fields`` if given), ranked globally by training count across those fields
  (ties: field order in ``meta.json``, then id); the OOV id 0 is never a coordinate. If fewer values exist,
  all of them are used (``Selection.num_coordinates`` records how many);
* ``s_i[k]`` = number of TRAINING records in which id ``i`` of ``f`` appears together with coordinate ``k``.

Counting is done by polars on the prepared train shards (lazy scan, one join + group-by per other field), the
result is a ``scipy.sparse`` CSR matrix ``[vocab_size, K]``.

Scores. ``score_i = max_{j in S} cos(s_i, s_j)`` for every tail id, computed as sparse products of
L2-normalised rows in memory-bounded blocks (``chunk_rows`` sparse tail rows x a densified block of head rows
sized so that one product has at most ``block_entries`` entries), so fields with millions of ids work. A zero vector has cosine 0 with
everything (an item that never co-occurs with a coordinate gets score 0). Scores are clipped to [0, 1] (the
vectors are non-negative; clipping only removes rounding error). Source ids, the OOV row and unseen ids
(training count 0, e.g. empty hash buckets) get score NaN: they are not candidates of Eq. 3.

Roles per id: ``source`` (S), ``target`` (in T'_eta), ``dropped`` (in T, score < eta), ``none`` (OOV row, and
tail ids never seen in training: they have no co-occurrence evidence and no gradient, so they belong to no
domain; T counts only seen tail ids -- identical to the meta tail for vocabulary fields).

Threshold. By default ``eta`` is the ``quantile`` (default 0.2: the paper filters 20% of the rare items) of the
scores of T (numpy's linear interpolation), so about 20% of T is dropped; ``eta`` may be given explicitly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.errors import UserError, read_json

ROLES = ("none", "source", "target", "dropped")
DEFAULT_TOP_K = 1000
DEFAULT_QUANTILE = 0.2
MIN_VOCAB_FOR_DEFAULT = 100  # select_command's default: fields with more than this many ids (paper, Criteo)
SELECTION_JSON = "selection.json"


# ----------------------------------------------------------------------------------------------------------
# result


@dataclass
class Selection:
    """The selective target domain of one field. Per-id arrays have length ``vocab_size``."""

    field: str
    dataset_id: str
    eta: float
    quantile: float | None  # None when eta was given explicitly
    top_k: int
    num_coordinates: int  # min(top_k, number of candidate context values)
    context_fields: list[str]
    role: np.ndarray  # str per id: one of ROLES
    score: np.ndarray  # float64 per id; NaN except for seen tail ids
    frequency: np.ndarray  # int64 per id: training count (from meta.json)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return len(self.role)

    def target_mask(self) -> np.ndarray:
        """bool[vocab_size]: True for ids in T'_eta."""
        return self.role == "target"

    def source_mask(self) -> np.ndarray:
        return self.role == "source"

    def dropped_mask(self) -> np.ndarray:
        return self.role == "dropped"

    def counts(self) -> dict[str, int]:
        c = {r: int(np.count_nonzero(self.role == r)) for r in ROLES}
        return {"source": c["source"], "tail": c["target"] + c["dropped"], "target": c["target"],
                "dropped": c["dropped"], "none": c["none"]}

    def summary(self) -> dict:
        c = self.counts()
        tail_scores = self.score[(self.role == "target") | (self.role == "dropped")]
        return {
            "field": self.field,
            "dataset_id": self.dataset_id,
            "vocab_size": self.vocab_size,
            "eta": self.eta,
            "quantile": self.quantile,
            "top_k": self.top_k,
            "num_coordinates": self.num_coordinates,
            "context_fields": list(self.context_fields),
            "counts": c,
            "dropped_fraction": c["dropped"] / c["tail"] if c["tail"] else 0.0,
            "zero_score_tail": int(np.count_nonzero(tail_scores == 0)),
            "median_score_target": _median(self.score[self.role == "target"]),
            "median_score_dropped": _median(self.score[self.role == "dropped"]),
            "seconds": round(self.seconds, 3),
        }


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if len(x) else None


# ----------------------------------------------------------------------------------------------------------
# co-occurrence vectors


def _train_files(data_dir: Path, meta: DatasetMeta) -> list[str]:
    files = [str(data_dir / f) for f in meta.split_files.get("train", [])]
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise UserError(f"{data_dir}: training shards missing ({missing[:1] or 'none listed'}); prepare the data again")
    return files


def _context_fields(meta: DatasetMeta, field_name: str, context_fields) -> list[str]:
    if context_fields is None:
        ctx = [n for n in meta.sparse_names if n != field_name]
    else:
        ctx = list(context_fields)
        for n in ctx:
            meta.field(n)  # UserError on unknown names
        if field_name in ctx:
            raise UserError(f"context_fields must not contain the selected field {field_name!r} itself")
        if len(set(ctx)) != len(ctx):
            raise UserError(f"duplicate context_fields: {ctx}")
        order = {n: k for k, n in enumerate(meta.sparse_names)}
        ctx.sort(key=order.__getitem__)
    if not ctx:
        raise UserError(f"field {field_name!r}: no other sparse field to build co-occurrence vectors from")
    return ctx


def coordinates(meta: DatasetMeta, context_fields: list[str], top_k: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The top-``top_k`` (field, id) values of ``context_fields`` by training count (OOV excluded), as
    ``[(field, ids, coordinate indices)]``; coordinate index = position in the global ranking. Ties: field
    order, then id.
    Values never seen in training (count 0) are not coordinates."""
    counts, fidx, ids = [], [], []
    for k, name in enumerate(context_fields):
        f = meta.field(name)
        freq = np.asarray(f.frequencies, dtype=np.int64)
        i = np.flatnonzero(freq > 0)
        i = i[i != f.oov_index]
        counts.append(freq[i])
        ids.append(i)
        fidx.append(np.full(len(i), k, dtype=np.int64))
    counts_a, fidx_a, ids_a = (np.concatenate(x) for x in (counts, fidx, ids))
    order = np.lexsort((ids_a, fidx_a, -counts_a))[:top_k]  # count desc, field order, id asc
    coord_of = np.arange(len(order), dtype=np.int64)
    out = []
    for k, name in enumerate(context_fields):
        sel = fidx_a[order] == k
        if sel.any():
            out.append((name, ids_a[order][sel], coord_of[sel]))
    return out


def cooccurrence_matrix(data_dir: str | Path, field_name: str, *, top_k: int = DEFAULT_TOP_K,
                        context_fields=None, meta: DatasetMeta | None = None) -> tuple[sp.csr_matrix, list[str]]:
    """CSR ``[vocab_size, K]`` (float64) of co-occurrence counts of ``field_name``'s ids with the top-``top_k``
    context values on the training split (see the module docstring), and the context fields used. A list field
    counts each of its ids in a row (an empty list: none), as the selected field or as a context field."""
    data_dir = Path(data_dir)
    meta = meta or DatasetMeta.load(data_dir)
    f = meta.field(field_name)
    if top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    ctx = _context_fields(meta, field_name, context_fields)
    coords = coordinates(meta, ctx, top_k)
    k_total = sum(len(ids) for _, ids, _ in coords)
    files = _train_files(data_dir, meta)
    scan = pl.scan_parquet(files)
    queries = []
    for name, ids, cidx in coords:
        cmap = pl.LazyFrame({name: ids, "__coord": cidx}, schema={name: pl.Int64, "__coord": pl.Int64})
        q = scan.select(field_name, name)
        for col in (field_name, name):  # a list field: each of a row's ids co-occurs with the row's other values
            if meta.field(col).multi_valued:
                q = q.explode(col)
        q = (
            q.select(pl.col(field_name).cast(pl.Int64), pl.col(name).cast(pl.Int64))
            .filter(pl.col(field_name) != f.oov_index)
            .join(cmap, on=name, how="inner")
            .group_by(field_name, "__coord")
            .agg(pl.len().alias("__n"))
        )
        queries.append(q)
    parts = pl.collect_all(queries) if queries else []
    rows = [p[field_name].to_numpy() for p in parts]
    cols = [p["__coord"].to_numpy() for p in parts]
    vals = [p["__n"].to_numpy() for p in parts]
    if rows:
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals).astype(np.float64)
    else:
        r = c = np.zeros(0, np.int64)
        v = np.zeros(0, np.float64)
    if len(r) and (r.min() < 0 or r.max() >= f.vocab_size):
        raise UserError(f"{data_dir}: field {field_name!r} has ids outside [0, {f.vocab_size}); prepare the data again")
    m = sp.coo_matrix((v, (r, c)), shape=(f.vocab_size, k_total)).tocsr()
    m.sum_duplicates()
    return m, ctx


# ----------------------------------------------------------------------------------------------------------
# scores


def _normalize_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(inv) @ m)


def max_cosine(vectors: sp.csr_matrix, query_ids: np.ndarray, source_ids: np.ndarray, *,
               chunk_rows: int = 4096, block_entries: int = 1 << 21, threads: int = 1) -> np.ndarray:
    """``max_{j in source_ids} cos(v_i, v_j)`` for each ``i`` in ``query_ids`` (float64, clipped to [0, 1]).

    Rows are L2-normalised once. Source rows are taken in blocks of ``max(1, block_entries // chunk_rows)``,
    each densified once to a ``[K, block]`` array; every chunk of ``chunk_rows`` (sparse) query rows is
    multiplied with it (a dense ``[chunk_rows, block]`` product, at most ``block_entries`` entries) and folded
    into a running row max. Memory is bounded by the blocks (plus the sparse vectors), never by
    |query| x |source|. Sparse x dense blocks measured 3-4x faster than sparse x sparse products here, as the
    most frequent context values make the products nearly dense. ``threads > 1`` spreads source blocks over
    threads; on 2 cores that measured no gain (18.3 s with 1 thread vs 20.5 s with 2 for 131k x 33k items), so
    the default is 1. Measured: a field of 298k ids (239k tail x 60k head, K = 1000) takes ~55-60 s on 2 cores
    with ~450 MiB peak RSS for the whole process."""
    if chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1, got {chunk_rows}")
    query_ids = np.asarray(query_ids, dtype=np.int64)
    source_ids = np.asarray(source_ids, dtype=np.int64)
    if not len(query_ids) or not len(source_ids):
        return np.zeros(len(query_ids), dtype=np.float64)
    normed = _normalize_rows(sp.csr_matrix(vectors, dtype=np.float64))
    chunks = [normed[query_ids[s : s + chunk_rows]] for s in range(0, len(query_ids), chunk_rows)]
    live = [k for k, q in enumerate(chunks) if q.nnz]  # all-zero query rows keep score 0
    head_block = max(1, block_entries // chunk_rows)
    starts = list(range(0, len(source_ids), head_block))

    def run(block_starts: list[int]) -> np.ndarray:
        best = np.zeros(len(query_ids), dtype=np.float64)
        for b in block_starts:
            dense = np.ascontiguousarray(normed[source_ids[b : b + head_block]].toarray().T)  # [K, block]
            for k in live:
                seg = best[k * chunk_rows : k * chunk_rows + chunks[k].shape[0]]
                np.maximum(seg, (chunks[k] @ dense).max(axis=1), out=seg)
        return best

    threads = max(1, min(threads, len(starts)))
    if threads == 1:
        out = run(starts)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(run, [starts[t::threads] for t in range(threads)]))
        out = np.maximum.reduce(parts)
    return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# selection


def select_target_domain(data_dir: str | Path, field: str, *, top_k: int = DEFAULT_TOP_K,
                         quantile: float = DEFAULT_QUANTILE, eta: float | None = None, context_fields=None,
                         chunk_rows: int = 4096, block_entries: int = 1 << 21, threads: int = 1,
                         meta: DatasetMeta | None = None) -> Selection:
    """Selective target domain T'_eta (Eq. 3) of one sparse field of a prepared dataset (module docstring).
    ``meta``: the dataset's, if the caller has it (else read from ``data_dir``)."""
    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    meta = meta or DatasetMeta.load(data_dir)
    f = meta.field(field)
    if eta is None and not 0.0 <= quantile <= 1.0:
        raise UserError(f"quantile must be in [0, 1], got {quantile}")
    if eta is not None and not math.isfinite(eta):
        raise UserError(f"eta must be a finite number, got {eta}")
    vectors, ctx = cooccurrence_matrix(data_dir, field, top_k=top_k, context_fields=context_fields, meta=meta)
    freq = np.asarray(f.frequencies, dtype=np.int64)
    head = f.head_mask()
    tail = f.tail_mask() & (freq > 0)
    tail_ids = np.flatnonzero(tail)
    head_ids = np.flatnonzero(head)
    tail_scores = max_cosine(vectors, tail_ids, head_ids, chunk_rows=chunk_rows, block_entries=block_entries,
                              threads=threads)
    if eta is None:
        eta_value = float(np.quantile(tail_scores, quantile)) if len(tail_scores) else 0.0
        q_value: float | None = float(quantile)
    else:
        eta_value, q_value = float(eta), None
    score = np.full(f.vocab_size, np.nan, dtype=np.float64)
    score[tail_ids] = tail_scores
    role = np.full(f.vocab_size, "none", dtype="<U7")
    role[head] = "source"
    role[tail_ids] = np.where(tail_scores >= eta_value, "target", "dropped")
    role[f.oov_index] = "none"
    return Selection(field=field, dataset_id=meta.dataset_id, eta=eta_value, quantile=q_value, top_k=int(top_k),
                     num_coordinates=int(vectors.shape[1]), context_fields=ctx, role=role, score=score,
                     frequency=freq, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# persistence


def write_selection(selections: list[Selection], out_dir: str | Path) -> Path:
    """``out_dir/<field>.parquet`` (id, role, score, frequency) per selection + ``out_dir/selection.json``.
    An existing ``selection.json`` of the same dataset keeps its other fields; one of another dataset is
    replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not selections:
        raise UserError("nothing to write: no field selected")
    ids = {s.dataset_id for s in selections}
    if len(ids) != 1:
        raise UserError(f"selections come from different datasets {sorted(ids)}; write them to separate directories")
    path = out / SELECTION_JSON
    doc = {"dataset_id": selections[0].dataset_id, "fields": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("dataset_id") == doc["dataset_id"]:
            doc["fields"].update(old.get("fields", {}))
    for s in selections:
        pl.DataFrame({
            "id": np.arange(s.vocab_size, dtype=np.int64),
            "role": pl.Series(s.role.astype(object), dtype=pl.Utf8),
            "score": s.score,
            "frequency": s.frequency,
        }).write_parquet(out / f"{s.field}.parquet")
        summ = s.summary()
        doc["fields"][s.field] = {
            "file": f"{s.field}.parquet",
            **{k: summ[k] for k in ("dataset_id", "vocab_size", "eta", "quantile", "top_k", "num_coordinates",
                                     "context_fields", "counts", "dropped_fraction", "seconds")},
        }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


def load_selection(out_dir: str | Path, field_name: str, meta: DatasetMeta) -> Selection:
    """Read one field's selection back, refusing one made for another dataset or vocabulary."""
    out = Path(out_dir)
    path = out / SELECTION_JSON
    doc = read_json(path, "no selection found; run `recsys-transfer select` first")
    entry = doc.get("fields", {}).get(field_name)
    if entry is None:
        raise UserError(f"{path}: no selection for field {field_name!r} (has {sorted(doc.get('fields', {}))}); "
                        f"run `recsys-transfer select --fields {field_name}`")
    got = entry.get("dataset_id", doc.get("dataset_id"))
    if got != meta.dataset_id:
        raise UserError(f"{path}: selection for field {field_name!r} was made for dataset {got}, not {meta.dataset_id}; "
                        "run `recsys-transfer select` again")
    f = meta.field(field_name)
    table = pl.read_parquet(out / entry.get("file", f"{field_name}.parquet"))
    if table.height != f.vocab_size or entry.get("vocab_size") != f.vocab_size:
        raise UserError(f"{path}: selection for field {field_name!r} has {table.height} ids, the dataset has "
                        f"{f.vocab_size}; run `recsys-transfer select` again")
    if not (table["id"].to_numpy() == np.arange(f.vocab_size)).all():
        raise UserError(f"{out / entry.get('file')}: ids are not 0..{f.vocab_size - 1} in order; run `recsys-transfer select` again")
    return Selection(field=field_name, dataset_id=got, eta=float(entry["eta"]), quantile=entry.get("quantile"),
                     top_k=int(entry["top_k"]), num_coordinates=int(entry.get("num_coordinates", 0)),
                     context_fields=list(entry.get("context_fields", [])),
                     role=table["role"].to_numpy().astype("<U7"), score=table["score"].to_numpy(),
                     frequency=table["frequency"].to_numpy(), seconds=float(entry.get("seconds", 0.0)))


def load_domains(out_dir: str | Path, fields, meta: DatasetMeta) -> dict[str, np.ndarray]:
    """Per field, the bool mask over ids of T'_eta, as :class:`~recsys_transfer.transfer.plugin.TransferPlugin`
    takes it. Raises :class:`UserError` for a selection of another dataset or vocabulary size."""
    out = {}
    for name in fields:
        s = load_selection(out_dir, name, meta)
        mask = s.target_mask()
        if (mask & meta.field(name).head_mask()).any():
            raise UserError(f"{out_dir}: selection for field {name!r} marks head ids as target; run `recsys-transfer select` again")
        out[name] = mask
    return out


def select_command(data_dir: str | Path, fields=None, out_dir: str | Path | None = None,
                   top_k: int = DEFAULT_TOP_K, quantile: float = DEFAULT_QUANTILE,
                   eta: float | None = None, meta: DatasetMeta | None = None, **kwargs) -> list[Selection]:
    """What ``recsys-transfer select`` runs: select every requested field (default: every sparse field with
    more than 100 ids) and write the result to ``out_dir`` (default ``data_dir/selection``). ``meta``: the
    dataset's, read once (from ``data_dir`` when not given) and handed to every stage."""
    data_dir = Path(data_dir)
    meta = meta or DatasetMeta.load(data_dir)
    if not fields:
        fields = [f.name for f in meta.sparse if f.vocab_size > MIN_VOCAB_FOR_DEFAULT]
        if not fields:
            raise UserError(f"{data_dir}: no sparse field has more than {MIN_VOCAB_FOR_DEFAULT} ids; name fields explicitly")
    else:
        for name in fields:
            meta.field(name)
    selections = [select_target_domain(data_dir, name, top_k=top_k, quantile=quantile, eta=eta, meta=meta, **kwargs)
                  for name in fields]
    write_selection(selections, Path(out_dir) if out_dir is not None else data_dir / "selection")
    return selections


__all__ = [
    "ROLES",
    "Selection",
    "cooccurrence_matrix",
    "coordinates",
    "load_domains",
    "load_selection",
    "max_cosine",
    "select_command",
    "select_target_domain",
    "write_selection",
]
