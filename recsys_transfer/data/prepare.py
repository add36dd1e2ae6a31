"""The one library entry point that builds a prepared dataset: ``recsys-transfer prepare`` and the trainer (a run
whose ``data.path`` does not exist yet) both call :func:`prepare` with a :class:`~recsys_transfer.config.PrepareConfig`.

    from recsys_transfer.config import PrepareConfig
    from recsys_transfer.data.prepare import prepare

    meta = prepare(PrepareConfig(dataset="movielens", input=("../shared/data/movielens-100k",)), "runs/ml100k")
    meta = prepare(PrepareConfig(schema="pipelines/datasets/adult-census.yaml",
                                 input=("../shared/data/adult-census/adult.data",)), "runs/adult")
"""

from __future__ import annotations

from pathlib import Path

from recsys_transfer.config import PrepareConfig
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
from recsys_transfer.errors import UserError

DEFAULT_MIN_COUNT = {"movielens-sequences": 1, "table-sequences": 1, "movielens": 1, "criteo": 10, "synthetic": 1,
                     "fdn-synthetic": 1}
GENERATED = ("synthetic", "fdn-synthetic")  # built-in sources that generate their rows (take rows, no input)


def prepare(config: PrepareConfig, output: str | Path, *, overwrite: bool = False,
            progress: bool = True) -> DatasetMeta:
    """Raw data -> prepared parquet shards + ``meta.json`` in ``output`` (see :mod:`recsys_transfer.data.prepared`).

    User mistakes (a missing file, a malformed row, an option that does not fit the source, an output directory
    holding another dataset without ``overwrite``, a degenerate split or label) raise :class:`UserError`."""
    try:
        split = SplitSpec(config.split, tuple(config.split_fractions), config.seed)
        head_tail = HeadTailSpec(config.head_rule, config.head_fraction, config.head_min_count)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    common = dict(split=split, head_tail=head_tail, progress=progress, overwrite=overwrite,
                  allow_degenerate=config.allow_degenerate)
    inputs = [Path(p) for p in config.input]
    if config.schema is not None:
        from recsys_transfer.data.schema import load_schema
        from recsys_transfer.data.tabular import prepare_tabular

        if config.rows is not None:
            raise UserError("rows: only the synthetic dataset is generated; a schema reads its input")
        return prepare_tabular(load_schema(config.schema), inputs, output, min_count=config.min_count,
                               hash_size=config.hash_size, on_bad_row=config.on_bad_row,
                               schema_file=config.schema, **common)
    min_count = config.min_count if config.min_count is not None else DEFAULT_MIN_COUNT[config.dataset]
    if config.dataset not in GENERATED and config.rows is not None:
        raise UserError(f"rows: only the synthetic datasets are generated; {config.dataset} reads its input")
    if config.dataset in ("movielens-sequences", "table-sequences"):
        return _prepare_sequences(config, inputs, output, head_tail, overwrite)
    if config.dataset == "movielens":
        from recsys_transfer.data.movielens import prepare_movielens

        if len(inputs) != 1:
            raise UserError("input: movielens takes exactly one directory")
        if config.hash_size is not None:
            raise UserError("hash_size: movielens fields are vocabularies, not hashed")
        return prepare_movielens(inputs[0], output, min_count=min_count, on_bad_row=config.on_bad_row,
                                 genres=config.genres, history=config.history, **common)
    if config.dataset == "criteo":
        from recsys_transfer.data.criteo import prepare_criteo

        if not inputs:
            raise UserError("input: criteo takes one or more TSV files")
        if split.kind != "random":
            raise UserError("split temporal: Criteo rows carry no timestamp; use a random split")
        return prepare_criteo(inputs, output, min_count=min_count, hash_size=config.hash_size,
                              on_bad_row=config.on_bad_row, **common)
    if inputs:
        raise UserError(f"input: the {config.dataset} dataset is generated, it takes no input")
    if config.min_count is not None or config.hash_size is not None:
        raise UserError(f"min_count, hash_size: the {config.dataset} dataset's vocabularies take no such option")
    if split.kind != "random":
        raise UserError(f"split temporal: {config.dataset} rows carry no timestamp; use a random split")
    kwargs = {"seed": config.seed}
    if config.rows is not None:
        kwargs["rows"] = config.rows
    if config.dataset == "fdn-synthetic":
        from recsys_transfer.data.fdn_synthetic import FdnSyntheticConfig, prepare_fdn_synthetic

        return prepare_fdn_synthetic(FdnSyntheticConfig(variant=config.variant, **kwargs), output, **common)
    from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic

    try:
        synthetic = SyntheticConfig(conversion=config.conversion, **kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return prepare_synthetic(synthetic, output, **common)


def _prepare_sequences(config: PrepareConfig, inputs: list[Path], output: str | Path, head_tail: HeadTailSpec,
                       overwrite: bool) -> DatasetMeta:
    from recsys_transfer.data.sequences import DEFAULT_TARGET_GENRES, SequenceBuild, prepare_sequences

    name = config.dataset
    if name == "movielens-sequences" and len(inputs) != 1:
        raise UserError("input: movielens-sequences takes exactly one MovieLens directory")
    if name == "table-sequences" and not inputs:
        raise UserError("input: table-sequences takes one or more .csv, .tsv or .parquet files")
    if config.min_count is not None or config.hash_size is not None:
        raise UserError(f"min_count, hash_size: {name} keeps every rated item (ids 2..)")
    if (config.split, config.on_bad_row, config.genres, config.history) != ("random", "error", "combination", 0):
        raise UserError(f"split, on_bad_row, genres, history: not options of {name} (its splits are by "
                        "user or row, seeded; split_fractions replaces the task's)")
    fractions = tuple(config.split_fractions)
    build = SequenceBuild(task=config.sequence_task, sequence_length=config.sequence_length,
                          max_target=config.max_target, seed=config.seed,
                          split_fractions=None if fractions == (0.8, 0.1, 0.1) else fractions, head_tail=head_tail,
                          overwrite=overwrite, allow_degenerate=config.allow_degenerate)
    if name == "table-sequences":
        from recsys_transfer.data.table_sequences import prepare_table_sequences

        return prepare_table_sequences(inputs, output, build, user_column=config.user_column,
                                       item_column=config.item_column, time_column=config.time_column,
                                       domain_column=config.domain_column)
    return prepare_sequences(inputs[0], output, build, tuple(config.target_genres) or DEFAULT_TARGET_GENRES)
