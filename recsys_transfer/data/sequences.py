"""MovieLens -> user-sequence datasets for PeterRec (Yuan et al., SIGIR 2020, Sec. 3.1 and 4.1), and the batch
transform :class:`SequenceSampling` that the sequence models train on.

``recsys-transfer prepare --dataset movielens-sequences --sequence-task {pretrain,profile,cold} --input DIR``.
``DIR`` is a MovieLens-100K directory (``u.data``, ``u.item``, ``u.user``), the ML-1M-partial directory
(``ratings_part*.tsv``, ``movies.dat`` latin-1, ``users.dat``) or a full ML-1M one (``ratings.dat``), detected by
the files present (:func:`recsys_transfer.data.movielens.detect_layout`, whose readers this module reuses).
Implicit feedback: every rating is an interaction, whatever its value.

One builder, :func:`build_sequences`, makes every task below from a frame of interactions (``user``, ``item``,
``ts``, a ``target`` flag per row); :func:`prepare_sequences` only loads the MovieLens ratings and flags the
target-domain genres. ``--dataset table-sequences`` (:mod:`recsys_transfer.data.table_sequences`) feeds the same
builder from any CSV / TSV / parquet table with user, item and time columns and an optional 0/1 domain column; the
rules here hold for it word for word (read "movie" as "item", "rating" as "interaction", the target genres as the
items of domain 1), except ``profile``, which needs MovieLens' user attributes.

Item vocabulary (field ``items``, table ``t_items``), the SAME for the three tasks of one input (so a fine-tuning
run loads the pretrained item table row for row): ``0`` = none / padding (never inside a sequence; ``targets``
holds it where a position is not predicted), ``1`` = the special token ([MASK] = [TCS] = [TCL], the paper's
footnote 1), ``2..V-1`` = every item rated in the input, most rated first (ties by raw movie id).
``vocab/items.parquet`` maps raw movie id -> id (with its rating count).

Time order: each user's ratings sorted by timestamp, ties by raw movie id (MovieLens timestamps have one-second
resolution and many same-second ratings; the raw id makes the order a function of the data, not of line order).
A sequence keeps the LAST ``sequence_length`` items of that order, stored jagged (no padding).

Target domain (every task): the items having any genre in ``target_genres`` (default Documentary
and Horror, chosen because on both ML-100K and ML-1M-partial it gives many cold users AND more than the
99 + ``max_target`` target items that the sampled evaluation needs: measured, ML-100K 400 cold users over 142
target items, ML-1M-partial 2,325 over 421); the source domain is every other item.

Tasks (one prepared directory each; every row also carries the raw ``user`` id in its shard, ``int64``, or text
for a table with text user ids, a column ``meta.json`` does not list, so the loader never reads it; tests and
analyses do):

* ``pretrain``: one row per user with at least 2 source-domain ratings (fewer: counted skip); ``items`` = the
  user's source-domain items; label ``next_item`` = the user's LAST source-domain item. Split by user 90/9/1
  (the paper's 90/10 train/validation; the 1% test split only gives the trainer's final test pass rows). Train
  rows keep the last item inside ``items`` (the model predicts every position); valid/test rows hold it out:
  ``items`` = the last n items BEFORE it and ``next_item`` is what full-pool MRR@5 ranks. Task ``next``
  (retrieval; sampled candidates and sampled softmax in training, full candidates in evaluation).
* ``profile``: one row per user with any source-domain rating (none: counted skip); ``items`` = the user's
  source-domain items (last n): the sequences the network was pretrained on, as the paper's GenEst / AgeEst users
  are ColdRec-2's source users with their source sequences (Sec. 4.1), so no input row of a frozen item table is
  an untrained one; multiclass labels
  ``gender`` (0 F, 1 M), ``age`` (7 brackets, ML-1M's codes 1, 18, 25, 35, 45, 50, 56 -> 0..6; ML-100K's ages in
  years bucketed into them: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+, as ML-1M's README defines the codes),
  ``occupation`` (ML-1M's codes 0..20; ML-100K's 21 occupation names in alphabetical order -> 0..20). Split by
  user 70/3/27, seeded (paper 4.1).
* ``cold``: users with 1..``max_target`` target-domain ratings (ColdRec-1's rule) and at least one source rating
  (none: counted skip); one row per (cold user, target item): ``items`` = the user's source-domain items,
  label ``target_item`` = the target item's class id in ``0..|Y|-1`` (its own vocabulary ``vocab/targets.parquet``:
  every rated target item, most rated first, ties by raw id; NOT the item table), list field ``eval_negatives`` =
  99 distinct class ids other than the user's target items, uniform, seeded, sorted (the paper's sampled
  protocol, fixed per row). Split by row 70/3/27, seeded.

Every task's ``meta.json`` also lists the list fields ``negatives`` and ``targets`` (``vocab_of: items``, stored
as empty lists) so a model building its EmbeddingCollection from ``meta`` routes them to ``t_items``;
:class:`SequenceSampling` fills them per batch. ``source`` records the reserved ids, the task, the options, the
target genres, the class names, the class counts per split and label, the counts of users and items.
``split_fractions`` other than the global default (0.8, 0.1, 0.1) replace the task's split; a split takes exactly
``round(f_train N)`` train and ``round(f_valid N)`` valid units of the ``N`` (users or rows), seeded.

Writing: the directory is the usual prepared layout (:mod:`recsys_transfer.data.prepared`: one parquet shard per
split, ``vocab/``, ``meta.json``), written here rather than by ``build_prepared``, whose vocabularies number ids by
training frequency from 1 and cannot reserve the token id. In ``meta.json`` ``input_rows`` / ``skipped_rows``
count the task's units (users, or (user, target item) pairs for ``cold``; skipped: the users left out, by
reason); ``frequencies`` are training-split counts; ``eval_negatives`` holds class ids, where 0 is a class, not
OOV (``info`` prints its count of 0 as ``oov-count``). Everything fits in memory (ML-1M: 1M ratings).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_transfer.data.prepared import (
    DatasetMeta,
    SparseFieldMeta,
    publish_prepared,
    staging_dir,
)
from recsys_transfer.data.splits import SPLITS, HeadTailSpec
from recsys_transfer.errors import UserError
from recsys_transfer.tasks import TaskSpec

PAD, TOKEN, FIRST_ITEM = 0, 1, 2
SEQUENCE_TASKS = ("pretrain", "profile", "cold")
DEFAULT_TARGET_GENRES = ("Documentary", "Horror")
DEFAULT_SEQUENCE_LENGTH = 50
DEFAULT_MAX_TARGET = 3
EVAL_NEGATIVES = 99
SPLIT_FRACTIONS = {"pretrain": (0.90, 0.09, 0.01), "profile": (0.70, 0.03, 0.27), "cold": (0.70, 0.03, 0.27)}
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # ML-1M users.dat age codes (lower bounds of the brackets)
OCCUPATIONS_100K = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)
LIST_FIELDS = ("items", "negatives", "targets")  # every sequence dataset; cold adds eval_negatives


def _seed(seed: int, task: str, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, SEQUENCE_TASKS.index(task), purpose])


def load_interactions(directory: Path) -> tuple[str, pl.DataFrame]:
    """(layout, ratings) with columns ``user``, ``item`` (raw ids), ``ts``, ``gender``, ``age``, ``occupation``
    (raw strings of the user file), ``genres`` (list of genre names), sorted by (user, ts, item)."""
    from recsys_transfer.data.movielens import _load_100k, _load_1m, detect_layout

    layout = detect_layout(directory)
    df, _ = (_load_100k if layout == "ml-100k" else _load_1m)(directory, "error", {})
    df = df.select(
        "user", "item", "ts",
        pl.col("gender").str.strip_chars(), pl.col("age").str.strip_chars(), pl.col("occupation").str.strip_chars(),
        pl.col("genres").fill_null("").str.split("|").list.eval(pl.element().filter(pl.element() != "")),
    )
    return layout, df.sort(["user", "ts", "item"])


def item_vocabulary(df: pl.DataFrame) -> pl.DataFrame:
    """Raw ``item`` -> ``id`` (2.., most rated first, ties by raw id) with its ``count``."""
    counts = df.group_by("item").len("count").sort(["count", "item"], descending=[True, False])
    return counts.with_columns(pl.int_range(FIRST_ITEM, FIRST_ITEM + len(counts), dtype=pl.Int64).alias("id"))


def _sequences(df: pl.DataFrame, n: int, drop_last: bool = False) -> pl.DataFrame:
    """Per user (sorted by user): ``items``, the last ``n`` item ids in time order (before the last one, with
    ``drop_last``), and ``last``, the user's last item id. ``df`` is in (user, ts, item) order."""
    grouped = df.group_by("user", maintain_order=True).agg(pl.col("id").alias("all"))
    seq = pl.col("all").list.slice(0, pl.col("all").list.len() - 1) if drop_last else pl.col("all")
    return grouped.select("user", seq.list.tail(n).alias("items"), pl.col("all").list.last().alias("last"))


def _split_codes(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(f_train n)`` train and ``round(f_valid n)`` valid units (the rest test), seeded."""
    n_train = int(round(fractions[0] * n))
    n_valid = min(int(round(fractions[1] * n)), n - n_train)
    codes = np.full(n, 2, dtype=np.uint8)
    perm = rng.permutation(n)
    codes[perm[:n_train]] = 0
    codes[perm[n_train:n_train + n_valid]] = 1
    return codes


def _age_bracket(layout: str, age: pl.Expr) -> pl.Expr:
    years = age.cast(pl.Int64)
    if layout == "ml-100k":  # bucketed into ML-1M's brackets (module docstring)
        return pl.sum_horizontal([(years >= a).cast(pl.Int64) for a in AGE_CODES[1:]])
    return years.replace_strict(list(AGE_CODES), list(range(len(AGE_CODES))), default=None)


@dataclass(frozen=True)
class _Field:
    name: str
    vocab_size: int
    vocab_of: str | None = None


@dataclass(frozen=True)
class TargetDomain:
    """How a source marked the target domain (the ``target`` column): ``record`` goes into ``meta.json``'s
    ``source`` (e.g. ``{"target_genres": [...]}``), ``name`` and ``widen`` word the error of a target domain too
    small for the sampled evaluation (``name``: e.g. ``"target_genres ['Horror']"``; ``widen``: what to do)."""

    record: dict
    name: str
    widen: str


@dataclass(frozen=True)
class SequenceBuild:
    """What every sequence source passes to :func:`build_sequences` (module docstring): the ``task``, the last-n cut,
    the cold task's ``max_target``, the ``seed`` of the splits and negatives, the ``split_fractions`` (None: the
    task's own), the head/tail spec and the output's ``overwrite`` / ``allow_degenerate``."""

    task: str
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    max_target: int = DEFAULT_MAX_TARGET
    seed: int = 2022
    split_fractions: tuple[float, float, float] | None = None
    head_tail: HeadTailSpec = HeadTailSpec()
    overwrite: bool = False
    allow_degenerate: bool = False


def prepare_sequences(input_dir: str | Path, output: str | Path, build: SequenceBuild,
                      target_genres: tuple[str, ...] = DEFAULT_TARGET_GENRES) -> DatasetMeta:
    """Raw MovieLens directory -> the prepared sequence dataset of ``task`` in ``output`` (module docstring): loads
    the ratings, marks the target domain by ``target_genres`` and hands them to :func:`build_sequences`."""
    if build.task not in SEQUENCE_TASKS:
        raise UserError(f"sequence_task must be one of {SEQUENCE_TASKS}, got {build.task!r}")
    d = Path(input_dir)
    layout, df = load_interactions(d)
    known = sorted(set(df["genres"].explode().drop_nulls().to_list()))
    unknown = [g for g in target_genres if g not in known]
    if not target_genres or unknown:
        raise UserError(f"target_genres: {unknown or 'none given'} not genre(s) of {d} (its genres: {known})")
    is_target = df["genres"].list.eval(pl.element().is_in(list(target_genres))).list.any()
    domain = TargetDomain(record={"target_genres": list(target_genres)},
                          name=f"target_genres {list(target_genres)}", widen="choose more genres")
    return build_sequences(
        df.with_columns(is_target.alias("target")), output, build, dataset=f"{layout}-sequences",
        provenance={"kind": "movielens-sequences", "layout": layout, "input": str(d)}, domain=domain,
        profile=lambda src: _movielens_profile(src, layout, d))


def _movielens_profile(src: pl.DataFrame, layout: str, d: Path) -> tuple[pl.DataFrame, dict[str, list]]:
    """The profile labels of the users in ``src`` (MovieLens ratings with the raw user-file strings): one row per
    user (``user``, ``gender``, ``age``, ``occupation`` as class ids) and the class names of each label."""
    users = src.group_by("user", maintain_order=True).agg(pl.col("gender", "age", "occupation").first())
    if layout == "ml-100k":
        occ = pl.col("occupation").replace_strict(list(OCCUPATIONS_100K), list(range(21)), default=None)
        occ_names = list(OCCUPATIONS_100K)
    else:
        occ = pl.col("occupation").cast(pl.Int64, strict=False)
        occ = pl.when(occ.is_between(0, 20)).then(occ)
        occ_names = list(OCCUPATIONS_1M)
    users = users.select(
        "user",
        pl.col("gender").replace_strict(["F", "M"], [0, 1], default=None).alias("gender"),
        _age_bracket(layout, pl.col("age")).alias("age"),
        occ.alias("occupation"),
    )
    bad = users.filter(pl.any_horizontal(pl.col("gender", "age", "occupation").is_null()))
    if len(bad):
        raise UserError(f"{d}: user {bad['user'][0]} has a gender, age or occupation outside the known classes")
    return users, {"gender": ["F", "M"], "age": list(AGE_CODES), "occupation": occ_names}


def build_sequences(
    df: pl.DataFrame,
    output: str | Path,
    build: SequenceBuild,
    *,
    dataset: str,
    provenance: dict,
    domain: TargetDomain,
    profile: Callable[[pl.DataFrame], tuple[pl.DataFrame, dict[str, list]]] | None = None,
) -> DatasetMeta:
    """Interactions -> the prepared sequence dataset of ``task`` in ``output``: the one builder of every source
    (MovieLens, :mod:`recsys_transfer.data.table_sequences`); the rules are the module docstring's.

    ``df``: one row per interaction, columns ``user`` and ``item`` (raw ids, integers or strings), ``ts`` (any
    sortable type), ``target`` (bool: the item is in the target domain; the same for every row of an item) and
    whatever ``profile`` reads. ``dataset``: the name prefix (``meta.json``'s ``dataset`` is ``{dataset}-{task}``);
    ``provenance``: the first entries of ``meta.json``'s ``source`` (``kind``, ``input``, ...). ``profile`` (task
    ``profile`` only; a source without user attributes passes None): the source-domain rows -> (one row per user:
    ``user`` and a class id per label, the class names per label, in label order)."""
    task, sequence_length, max_target, seed = build.task, build.sequence_length, build.max_target, build.seed
    split_fractions, head_tail = build.split_fractions, build.head_tail
    if task not in SEQUENCE_TASKS:
        raise UserError(f"sequence_task must be one of {SEQUENCE_TASKS}, got {task!r}")
    if task == "profile" and profile is None:
        raise UserError(f"sequence_task profile: {provenance['kind']} has no user attributes to predict (the "
                        "profile labels come from MovieLens' user file)")
    fractions = tuple(split_fractions) if split_fractions is not None else SPLIT_FRACTIONS[task]
    df = df.sort(["user", "ts", "item"], maintain_order=True)
    vocab = item_vocabulary(df)
    df = df.join(vocab.select("item", "id"), on="item", how="left", maintain_order="left")
    n_items = len(vocab)
    skipped: dict[str, int] = {}
    source = {**provenance, "task": task,
              "sequence_length": sequence_length, "seed": seed, "split_fractions": list(fractions),
              "reserved_ids": {"pad": PAD, "token": TOKEN, "first_item": FIRST_ITEM},
              "ratings": len(df), "users": int(df["user"].n_unique()), "items": n_items,
              "items_vocab": hashlib.sha256(json.dumps(vocab["item"].to_list()).encode()).hexdigest()[:16]}
    fields = [_Field("items", FIRST_ITEM + n_items), _Field("negatives", FIRST_ITEM + n_items, "items"),
              _Field("targets", FIRST_ITEM + n_items, "items")]
    extra_vocab: dict[str, pl.DataFrame] = {}

    # every task reads the source domain: the pretraining sequences, and the fine-tuning tasks' inputs
    source.update(domain.record, target_items=int(df.filter("target")["item"].n_unique()),
                  target_ratings=int(df["target"].sum()))
    src = df.filter(~pl.col("target"))

    if task == "pretrain":
        per_user = src.group_by("user", maintain_order=True).len()
        keep = per_user.filter(pl.col("len") >= 2)["user"]
        skipped["users with fewer than 2 source-domain ratings"] = source["users"] - len(keep)
        src = src.filter(pl.col("user").is_in(keep.implode()))
        codes = pl.Series("__split", _split_codes(len(keep), fractions, _seed(seed, task, 0)))
        rows = _sequences(src, sequence_length).with_columns(codes)  # by user, as ``held``
        held = _sequences(src, sequence_length, drop_last=True)["items"]
        rows = rows.with_columns(pl.when(pl.col("__split") == 0).then(pl.col("items")).otherwise(held).alias("items"))
        rows = rows.with_columns(pl.col("last").alias("next_item"))
        labels = ["next_item"]
        tasks = [TaskSpec(name="next", label="next_item", kind="retrieval", candidates="sampled", loss="softmax",
                          eval_candidates="full")]
    elif task == "profile":
        has_src = src["user"].unique()
        skipped["users without a source-domain rating"] = source["users"] - len(has_src)
        rows = _sequences(src, sequence_length)  # the sequences the network was pretrained on (GenEst's inputs)
        users, classes = profile(src)
        rows = rows.join(users, on="user", how="left", maintain_order="left")
        rows = rows.with_columns(pl.Series("__split", _split_codes(len(rows), fractions, _seed(seed, task, 0))))
        labels = list(classes)
        tasks = [TaskSpec(name=lab, kind="multiclass", num_classes=len(names)) for lab, names in classes.items()]
        source["classes"] = classes
    else:  # cold
        if max_target < 1:
            raise UserError(f"max_target must be >= 1, got {max_target}")
        tgt = df.filter("target")
        targets = (tgt.group_by("item").len("count").sort(["count", "item"], descending=[True, False])
                   .with_columns(pl.int_range(0, pl.len(), dtype=pl.Int64).alias("class")))
        n_classes = len(targets)
        if n_classes - max_target < EVAL_NEGATIVES:
            raise UserError(f"{domain.name}: {n_classes} target items; the sampled evaluation needs at least "
                            f"{EVAL_NEGATIVES} + max_target ({max_target}); {domain.widen}")
        per_user = tgt.group_by("user").len("n_target")
        cold = per_user.filter(pl.col("n_target") <= max_target)
        has_src = src["user"].unique()
        no_src = cold.filter(~pl.col("user").is_in(has_src.implode()))
        skipped["cold users without a source-domain rating"] = len(no_src)
        cold_users = cold.filter(pl.col("user").is_in(has_src.implode()))["user"]
        seqs = _sequences(src.filter(pl.col("user").is_in(cold_users.implode())), sequence_length)
        pairs = (tgt.filter(pl.col("user").is_in(cold_users.implode()))
                 .join(targets.select("item", "class"), on="item", how="left", maintain_order="left")
                 .select("user", pl.col("item").alias("target_raw"), pl.col("class").alias("target_item")))
        rows = pairs.join(seqs.select("user", "items"), on="user", how="left", maintain_order="left")
        # 99 negatives per row: the user's target classes excluded, the rest ranked by uniform keys (a uniform
        # subset without replacement), sorted
        rng = _seed(seed, task, 1)
        keys = rng.random((len(rows), n_classes))
        user_classes = rows.group_by("user", maintain_order=True).agg(pl.col("target_item").alias("mine"))
        mine = rows.select("user").join(user_classes, on="user", how="left", maintain_order="left")["mine"]
        r_idx = np.repeat(np.arange(len(rows)), mine.list.len().to_numpy())
        keys[r_idx, mine.explode().to_numpy()] = np.inf
        neg = np.sort(np.argpartition(keys, EVAL_NEGATIVES - 1, axis=1)[:, :EVAL_NEGATIVES], axis=1)
        rows = rows.with_columns(pl.Series("eval_negatives", neg.astype(np.int64).tolist(),
                                           dtype=pl.List(pl.Int64)))
        rows = rows.with_columns(pl.Series("__split", _split_codes(len(rows), fractions, _seed(seed, task, 0))))
        labels = ["target_item"]
        fields.append(_Field("eval_negatives", n_classes))
        tasks = [TaskSpec(name="cold", label="target_item", kind="retrieval", candidates="full", loss="bpr",
                          eval_negatives="eval_negatives")]  # BPR for item recommendation (Eq. 8)
        extra_vocab["targets"] = targets.select("item", pl.col("class").alias("id"), "count")
        source.update(max_target=max_target, num_target_classes=n_classes, cold_users=len(cold_users),
                      eval_negatives=EVAL_NEGATIVES)

    rows = rows.with_columns(pl.lit([], dtype=pl.List(pl.Int64)).alias("negatives"),
                             pl.lit([], dtype=pl.List(pl.Int64)).alias("targets"))
    source["class_counts"] = {
        lab: {SPLITS[c]: _class_counts(rows.filter(pl.col("__split") == c)[lab]) for c in range(3)}
        for lab in labels if task == "profile"
    }
    skipped = {reason: n for reason, n in skipped.items() if n}
    return _write(rows, fields, labels, tasks, Path(output), dataset=f"{dataset}-{task}", source=source,
                  skipped=skipped, head_tail=head_tail, vocab=vocab, extra_vocab=extra_vocab, overwrite=build.overwrite,
                  allow_degenerate=build.allow_degenerate)


def _class_counts(values: pl.Series) -> dict[str, int]:
    counts = values.value_counts().sort(values.name)
    return {str(k): int(v) for k, v in zip(counts[values.name], counts["count"])}


def _write(rows: pl.DataFrame, fields: list[_Field], labels: list[str], tasks: list[TaskSpec], out: Path, *,
           dataset: str, source: dict, skipped: dict[str, int], head_tail: HeadTailSpec, vocab: pl.DataFrame,
           extra_vocab: dict[str, pl.DataFrame], overwrite: bool, allow_degenerate: bool) -> DatasetMeta:
    """The prepared layout of :mod:`recsys_transfer.data.prepared`, written directly: the ids here are final
    (reserved 0/1, items from 2), which the generic builder's frequency-ordered vocabularies cannot express."""
    old_id, tmp = staging_dir(out)
    (tmp / "vocab").mkdir()
    try:
        vocab.select("item", "id", "count").write_parquet(tmp / "vocab" / "items.parquet")
        for name, table in extra_vocab.items():
            table.write_parquet(tmp / "vocab" / f"{name}.parquet")
        extra = [c for c in ("user", "target_raw") if c in rows.columns]  # not in meta: the loader never reads them
        raw_type = {c: (pa.string(), pl.String) if rows.schema[c] == pl.String else (pa.int64(), pl.Int64)
                    for c in extra}  # raw ids: integers, or text (table-sequences)
        schema = pa.schema([pa.field(f.name, pa.list_(pa.int64())) for f in fields]
                           + [pa.field(lab, pa.float32()) for lab in labels]
                           + [pa.field(c, raw_type[c][0]) for c in extra])
        split_rows, split_files = {}, {}
        train = rows.filter(pl.col("__split") == 0)
        for code, name in enumerate(SPLITS):
            part = rows.filter(pl.col("__split") == code)
            table = part.select(*[pl.col(f.name).cast(pl.List(pl.Int64)) for f in fields],
                                *[pl.col(lab).cast(pl.Float32) for lab in labels],
                                *[pl.col(c).cast(raw_type[c][1]) for c in extra]).to_arrow().cast(schema)
            (tmp / name).mkdir()
            pq.write_table(table, tmp / name / "part-00000.parquet", compression="zstd")
            split_rows[name], split_files[name] = len(part), [f"{name}/part-00000.parquet"]
        sparse = []
        for f in fields:
            values = train[f.name].explode().drop_nulls().to_numpy().astype(np.int64)
            freq = np.bincount(values, minlength=f.vocab_size)[: f.vocab_size]
            sparse.append(SparseFieldMeta(name=f.name, vocab_size=f.vocab_size, oov_index=PAD, hashed=False,
                                          min_count=1, frequencies=freq.tolist(),
                                          head_ids=head_tail.head_ids(freq, PAD).tolist(), multi_valued=True,
                                          vocab_of=f.vocab_of))
        n_skipped = sum(skipped.values())
        d = dict(dataset=dataset,
                 sparse=[{"name": f.name, "vocab_size": f.vocab_size, "hashed": False, "multi_valued": True,
                          "vocab_of": f.vocab_of} for f in fields],
                 dense=[], labels=labels, group=None, dense_stats={},
                 split={"kind": "random", "fractions": source["split_fractions"], "seed": source["seed"],
                        "unit": "row"},
                 head_tail=head_tail.to_json(), split_rows=split_rows, split_files=split_files,
                 input_rows=len(rows) + n_skipped, skipped_rows=n_skipped, skip_reasons=dict(skipped), source=source)
        d["dataset_id"] = DatasetMeta.compute_id(d)
        d["sparse"], d["tasks"], d["label_counts"] = sparse, tuple(tasks), {}
        meta = DatasetMeta(**d)
        meta.write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_prepared(meta, tmp, out, old_id, overwrite=overwrite, allow_degenerate=allow_degenerate)


# ----------------------------------------------------------------------------------------------------------
# the batch transform


def popularity_distribution(frequencies, power: float = 1.0) -> np.ndarray:
    """``q [V]`` (``V = len(frequencies)``): the probability of each id in one draw of a ``sampler: popularity``
    pool, ``(count + 1) ** power`` normalized over the items and 0 at the reserved ids 0 and 1; ``count`` = the
    item's training count (``meta``'s ``frequencies``; +1 so an item unseen in training stays drawable and has a
    finite log-Q). ``power`` 1 is the unigram distribution, 0 uniform (word2vec's 0.75 sits between)."""
    q = np.zeros(len(frequencies), dtype=np.float64)
    q[FIRST_ITEM:] = (np.asarray(frequencies[FIRST_ITEM:], dtype=np.float64) + 1.0) ** power
    return q / q.sum()


class SequenceSampling:
    """What a sequence model trains on, drawn per batch from ``(config.seed, split, rank, epoch, batch index)`` (so a
    run resumed mid-epoch gets the very batches it would have had); :class:`~recsys_transfer.data.loader.
    BatchLoader` applies it to every batch it builds (``transform=``). ``config`` is a
    :class:`~recsys_transfer.config.SequenceConfig`. On the KJT (B rows; ``L[b]`` = row b's length of ``items``):

    * masking (``mask_rate > 0`` and ``training``; GRec, PeterRec Eq. 2): ``k[b] = max(1, floor(mask_rate L[b] +
      1/2))`` positions of row b (0 for an empty row), a uniform subset; each chosen position becomes the token
      ``1`` with probability 0.8, a uniform item of ``2..V-1`` with 0.1 (it may draw the original), stays with
      0.1; feature ``targets`` (``vocab_of: items``) has ``items``' lengths and holds the original id at the
      chosen positions, 0 elsewhere.
    * tokens: ``token: end`` appends ``1`` to every row of ``items`` ([TCL], Eq. 5), ``both`` also prepends it
      ([TCS], Eq. 6); ``targets`` (when masking) gets 0 there. Never masked.
    * negatives (``negatives = S > 0`` and ``negatives`` on: by default in training only): feature ``negatives``
      (``vocab_of: items``), ``S`` ids drawn uniformly WITH replacement from ``2..V-1``, one pool per batch spread
      over the rows (row b holds ``S // B + (b < S % B)`` of them, in pool order; the model concatenates the
      feature's values into the pool ``[S]``). A negative equal to a row's positive is not removed here.
      ``sampler: popularity``: the ``S`` ids are drawn WITH replacement from :func:`popularity_distribution` ``q``
      instead, and the KJT gets weights: every value's ``log(S q(id))`` (0 at the reserved ids), the log of its
      expected count in the pool -- the log-Q correction of the sampled softmax (Jean et al. 2015; TF's
      ``sampled_softmax_loss`` subtracts the same from the true and the sampled logits), which the sequence models
      apply (:func:`recsys_transfer.models.sequence.sampled_scores`). A uniform pool needs none (a constant).

    Evaluation transforms (``training=False``) never mask; they add the tokens, and negatives only if asked
    (``negatives=True``, for a task evaluated on sampled candidates). Other features pass unchanged.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from recsys_transfer.config import SequenceConfig
        >>> from recsys_transfer.types import Batch
        >>> kjt = KeyedJaggedTensor(keys=["items", "negatives", "targets"], values=torch.tensor([5, 6, 7, 8]),
        ...                         lengths=torch.tensor([3, 1, 0, 0, 0, 0], dtype=torch.int32))
        >>> batch = Batch(torch.zeros(2, 0), kjt, {})
        >>> t = SequenceSampling(SequenceConfig(token="end", negatives=3), vocab_size=10, split="train")
        >>> out = t(batch, epoch=0, index=0)
        >>> out.sparse["items"].lengths().tolist(), out.sparse["items"].values().tolist()
        ([4, 2], [5, 6, 7, 1, 8, 1])
        >>> out.sparse["negatives"].lengths().tolist()
        [2, 1]
    """

    MASK_TOKEN_SHARE, MASK_RANDOM_SHARE = 0.8, 0.1

    def __init__(self, config, meta: DatasetMeta | None = None, *, split: str = "train",
                 training: bool | None = None, negatives: bool | None = None, vocab_size: int | None = None,
                 rank: int = 0) -> None:
        self.config = config
        self.rank = rank  # ranks of one job draw independently
        self.training = split == "train" if training is None else training
        self.mask = self.training and config.mask_rate > 0
        self.negatives = (self.training if negatives is None else negatives) and config.negatives > 0
        self.stream = SPLITS.index(split)
        if meta is not None:
            names = meta.sparse_names
            needed = ["items"] + ["negatives"] * self.negatives + ["targets"] * self.mask
            missing = [n for n in needed if n not in names]
            if missing:
                raise UserError(f"sequence: the dataset {meta.dataset} has no list field(s) {missing} (a "
                                "movielens-sequences dataset has items, negatives and targets); prepare it with "
                                "`prepare --dataset movielens-sequences` (or table-sequences) or drop the sequence "
                                "section")
            for n in needed[1:]:
                if meta.field(n).vocab_of != "items":
                    raise UserError(f"sequence: field {n!r} must share the items vocabulary (vocab_of: items)")
            vocab_size = meta.field("items").vocab_size
        if vocab_size is None or vocab_size <= FIRST_ITEM:
            raise UserError(f"sequence: the item vocabulary needs ids from {FIRST_ITEM} on, got size {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.popularity = self.negatives and config.sampler == "popularity"
        if self.popularity:
            if meta is None:
                raise UserError("sequence.sampler popularity draws by the items' training counts: it needs the "
                                "dataset's meta")
            q = popularity_distribution(meta.field("items").frequencies, config.sampler_power)
            self.cdf = np.cumsum(q)
            with np.errstate(divide="ignore"):
                self.log_expected = np.where(q > 0, np.log(config.negatives * q), 0.0).astype(np.float32)

    def __call__(self, batch, epoch: int, index: int):
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from recsys_transfer.types import Batch

        kjt = batch.sparse
        keys = kjt.keys()
        n = kjt.stride()
        lengths = kjt.lengths().numpy().astype(np.int64).reshape(len(keys), n)
        values = kjt.values().numpy()
        starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
        cols = {k: (values[starts[j]:starts[j + 1]], lengths[j]) for j, k in enumerate(keys)}
        rng = np.random.default_rng([self.config.seed, self.stream, self.rank, epoch, index])
        items, lens = cols["items"]
        items = items.astype(np.int64)
        targets = None
        if self.mask:
            items, targets = self._mask(items, lens, rng)
        if self.config.token != "none":
            items, targets, lens = self._tokens(items, targets, lens)
        cols["items"] = (items, lens)
        if targets is not None:
            cols["targets"] = (targets, lens)
        if self.negatives:
            s = self.config.negatives
            if self.popularity:  # inverse CDF; the last id catches a draw above cdf[-1]'s rounding
                pool = np.minimum(np.searchsorted(self.cdf, rng.random(s), side="right"), self.vocab_size - 1)
            else:
                pool = rng.integers(FIRST_ITEM, self.vocab_size, size=s, dtype=np.int64)
            share = np.full(n, s // n if n else 0, dtype=np.int64)
            share[: s % n if n else 0] += 1
            cols["negatives"] = (pool, share)
        new_values = np.concatenate([cols[k][0].astype(np.int64, copy=False) for k in keys])
        new_lengths = np.concatenate([cols[k][1] for k in keys]).astype(np.int32)
        weights = torch.from_numpy(self.log_expected[new_values]) if self.popularity else None
        sparse = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(new_values), weights=weights,
                                   lengths=torch.from_numpy(new_lengths), stride=n)
        return Batch(dense=batch.dense, sparse=sparse, labels=batch.labels)

    def _mask(self, items: np.ndarray, lens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        m = len(items)
        row = np.repeat(np.arange(len(lens)), lens)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        k = np.where(lens > 0, np.maximum(1, np.floor(self.config.mask_rate * lens + 0.5)), 0).astype(np.int64)
        order = np.lexsort((rng.random(m), row))  # within each row, a uniform order of its positions
        rank = np.empty(m, dtype=np.int64)
        rank[order] = np.arange(m) - offsets[row[order]]
        chosen = rank < k[row]
        action = rng.random(m)
        random_items = rng.integers(FIRST_ITEM, self.vocab_size, size=m, dtype=np.int64)
        out = items.copy()
        to_token = chosen & (action < self.MASK_TOKEN_SHARE)
        to_random = (chosen & (action >= self.MASK_TOKEN_SHARE)
                     & (action < self.MASK_TOKEN_SHARE + self.MASK_RANDOM_SHARE))
        out[to_token] = TOKEN
        out[to_random] = random_items[to_random]
        return out, np.where(chosen, items, PAD)

    def _tokens(self, items: np.ndarray, targets: np.ndarray | None, lens: np.ndarray):
        lead = 1 if self.config.token == "both" else 0
        new_lens = lens + lead + 1
        new_offsets = np.concatenate([[0], np.cumsum(new_lens)])
        row = np.repeat(np.arange(len(lens)), lens)
        within = np.arange(len(items)) - np.concatenate([[0], np.cumsum(lens)])[row]
        pos = new_offsets[row] + lead + within
        out = np.full(new_offsets[-1], TOKEN, dtype=np.int64)
        out[pos] = items
        if targets is not None:
            t = np.zeros(new_offsets[-1], dtype=np.int64)
            t[pos] = targets
            targets = t
        return out, targets, new_lens
