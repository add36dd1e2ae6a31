"""The ``recsys-transfer`` command line.

    recsys-transfer prepare {--dataset {movielens,criteo,synthetic,fdn-synthetic,movielens-sequences,
        table-sequences} | --schema FILE.yaml} --input PATH... --output DIR [--variant A|B|I]
        [--sequence-task TASK ...] [--user-column U --item-column I --time-column T [--domain-column D]]
    recsys-transfer info DIR [--field NAME] [--check]
    recsys-transfer select --data DIR [--fields F ...] [--top-k 1000] [--quantile 0.2 | --eta X] [--output DIR]
    recsys-transfer train --config pipelines/NAME.yaml [--set key.path=value ...] --output DIR [--overwrite | --resume]
    recsys-transfer bench --config benchmarks/grids/NAME.yaml --output DIR
    recsys-transfer demo [--output DIR]
    recsys-transfer env
    recsys-transfer launch [TORCHRUN OPTIONS] -- COMMAND ...       (torchrun, failures in one line per rank)
    recsys-transfer download NAME [NAME ...] --dir DIR [--md5 HEX | --sha256 HEX] | download --list

Every command is a thin layer over a library function (``prepare`` -> :func:`recsys_transfer.data.prepare.prepare`,
``train`` -> :func:`recsys_transfer.train.run.run_training`, ...). User mistakes (missing files, malformed rows,
bad options) print one line ``error: ...`` (``error: [rank N] ...`` in a torchrun job) and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback. This module and the config import no torch,
so ``--help`` and ``info`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recsys_transfer.errors import UserError


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return parts  # type: ignore[return-value]


def _add_split_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split and head/tail")
    g.add_argument("--split", choices=("random", "temporal"), default="random",
                   help="random (seeded, per record) or temporal (MovieLens: by rating time; --schema: by its "
                        "timestamp column)")
    g.add_argument("--split-fractions", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VALID,TEST")
    g.add_argument("--seed", type=int, default=2022, help="split seed (and the synthetic data seed)")
    g.add_argument("--head-rule", choices=("pareto", "threshold"), default="pareto",
                   help="source domain: top fraction of items (pareto) or items with count >= --head-min-count")
    g.add_argument("--head-fraction", type=float, default=0.2)
    g.add_argument("--head-min-count", type=int, default=10)


def build_parser() -> argparse.ArgumentParser:
    from recsys_transfer.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="recsys-transfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw data -> prepared parquet shards + meta.json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=("movielens", "criteo", "synthetic", "fdn-synthetic",
                                              "movielens-sequences", "table-sequences"),
                        help="a built-in source")
    source.add_argument("--schema", type=Path, help="a schema file (pipelines/datasets/*.yaml) describing any "
                        "CSV/TSV/parquet table, plain or gzip/bz2/xz")
    p.add_argument("--input", type=Path, nargs="*", default=[],
                   help="MovieLens: the directory; Criteo and --schema: one or more files read as one stream; "
                        "table-sequences: one or more .csv/.tsv/.parquet files; synthetic: none")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--min-count", type=int, default=None,
                   help="values seen fewer times in train map to OOV (default: movielens 1, criteo 10)")
    p.add_argument("--hash-size", type=int, default=None, help="criteo, --schema: hash each categorical field (that sets no hash_size) into this many rows")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="stop at the first malformed row (default) or skip it and count it in meta.json")
    p.add_argument("--rows", type=int, default=None, help="synthetic, fdn-synthetic: number of rows")
    p.add_argument("--conversion", action="store_true",
                   help="synthetic: add a post-click conversion label `purchase` (ESMM's CTR / CVR / CTCVR setting)")
    p.add_argument("--variant", choices=("A", "B", "I"), default=None,
                   help="fdn-synthetic: Dataset-A or -B (one task, the single-task oracle's data) or -I (both tasks; "
                        "default)")
    p.add_argument("--genres", choices=("combination", "bag"), default="combination",
                   help="movielens: a movie's genres as one value (default) or as a list field (multi-hot bag)")
    p.add_argument("--history", type=int, default=0, metavar="N",
                   help="movielens: add a list field of the user's last N items rated before each rating")
    g = p.add_argument_group("movielens-sequences, table-sequences (PeterRec's user sequences and transfer tasks)")
    g.add_argument("--sequence-task", choices=("pretrain", "profile", "cold"), default=None,
                   help="table-sequences: pretrain or cold")
    g.add_argument("--sequence-length", type=int, default=50, metavar="N", help="keep each user's last N items")
    g.add_argument("--target-genres", nargs="+", default=(), metavar="GENRE",
                   help="movielens-sequences pretrain, cold: the target item domain (default: Documentary Horror)")
    g.add_argument("--max-target", type=int, default=3, help="cold: a cold user has 1..G target ratings")
    g.add_argument("--user-column", default=None, metavar="NAME", help="table-sequences: the user id column")
    g.add_argument("--item-column", default=None, metavar="NAME", help="table-sequences: the item id column")
    g.add_argument("--time-column", default=None, metavar="NAME",
                   help="table-sequences: the column ordering each user's items (numbers or ISO dates)")
    g.add_argument("--domain-column", default=None, metavar="NAME",
                   help="table-sequences: 0 = source-domain item, 1 = target-domain item (needed by cold; "
                        "absent: every item is source domain)")
    p.add_argument("--overwrite", action="store_true", help="replace another prepared dataset in --output")
    p.add_argument("--allow-degenerate", action="store_true",
                   help="prepare even if a split has zero rows or a binary label has one class in train")
    p.add_argument("--no-progress", action="store_true")
    _add_split_options(p)

    p = sub.add_parser("info", help="summarize a prepared dataset")
    p.add_argument("data", type=Path)
    p.add_argument("--field", default=None, help="also list this field's head (source) ids")
    p.add_argument("--check", action="store_true", help="read every row of every shard and report")

    p = sub.add_parser("select", help="selective target domain T'_eta per field (paper Eq. 3)")
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset directory")
    p.add_argument("--fields", nargs="*", default=None, help="default: every sparse field with more than 100 ids")
    p.add_argument("--top-k", type=int, default=1000, help="co-occurrence coordinates: the K most frequent values")
    p.add_argument("--quantile", type=float, default=0.2, help="eta = this quantile of the tail items' scores")
    p.add_argument("--eta", type=float, default=None, help="explicit threshold (overrides --quantile)")
    p.add_argument("--context-fields", nargs="*", default=None, help="fields that supply coordinates (default: all others)")
    p.add_argument("--output", type=Path, default=None, help="default: DATA/selection")

    p = sub.add_parser("train", help="train one model/mode from a pipeline config (also under torchrun)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 --set transfer.mode=+Ours")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output (the default when it holds one of an "
                        "unfinished run of the same config; needed to continue a completed run)")

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="synthetic long-tail data -> prepare -> train a model -> held-out AUC")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=2022)

    p = sub.add_parser("download", help="fetch MovieLens-100K/1M or Criteo terabyte day files (resumable, checked)",
                       epilog="RECSYS_DOWNLOAD_MIRROR=BASE_URL fetches every file from BASE_URL + its original path.")
    p.add_argument("names", nargs="*", metavar="NAME", help="e.g. movielens-100k, criteo-terabyte-day-0 (see --list)")
    p.add_argument("--dir", type=Path, default=None, help="where the data goes (what RECSYS_DATA_DIR then names)")
    p.add_argument("--list", action="store_true", help="print the datasets, their checksums and URLs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--retries", type=int, default=3, help="resume this many times when the connection drops")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--md5", default=None, help="check this md5 instead of the recorded one (one NAME only)")
    g.add_argument("--sha256", default=None, help="check this sha256 instead of the recorded one (one NAME only)")

    sub.add_parser("env", help="versions of torch, fbgemm and TorchRec, the fbgemm build, devices, world info")
    sub.add_parser("launch", help="torchrun a command on several processes: launch [TORCHRUN OPTIONS] -- COMMAND",
                   add_help=False)
    return parser


def prepare_config(args: argparse.Namespace):
    """The :class:`~recsys_transfer.config.PrepareConfig` of ``recsys-transfer prepare``'s options."""
    from recsys_transfer.config import PrepareConfig

    try:
        return PrepareConfig(dataset=args.dataset, schema=str(args.schema) if args.schema else None, input=tuple(str(p) for p in args.input), rows=args.rows,
                             min_count=args.min_count, hash_size=args.hash_size, split=args.split,
                             split_fractions=tuple(args.split_fractions), seed=args.seed, head_rule=args.head_rule,
                             head_fraction=args.head_fraction, head_min_count=args.head_min_count,
                             on_bad_row=args.on_bad_row, allow_degenerate=args.allow_degenerate,
                             genres=args.genres, history=args.history, conversion=args.conversion,
                             variant=args.variant, sequence_task=args.sequence_task,
                             sequence_length=args.sequence_length, target_genres=tuple(args.target_genres),
                             max_target=args.max_target, user_column=args.user_column,
                             item_column=args.item_column, time_column=args.time_column,
                             domain_column=args.domain_column)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from recsys_transfer.data.prepare import prepare
    from recsys_transfer.data.prepared import human_summary

    meta = prepare(prepare_config(args), args.output, overwrite=args.overwrite, progress=not args.no_progress)
    print(human_summary(meta))
    print(f"wrote {args.output}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from recsys_transfer.data.prepared import DatasetMeta, human_summary

    meta = DatasetMeta.load(args.data)
    print(human_summary(meta))
    if args.field:
        f = meta.field(args.field)
        print(f"{f.name}: {f.num_head} head ids (source), {len(f.tail_ids())} tail ids (target); head: {f.head_ids}")
    if args.check:
        from recsys_transfer.data.loader import check_shards

        report = check_shards(args.data, meta)
        print("check: every shard read; " + ", ".join(f"{s} {r['rows']:,} rows in {r['shards']} shard(s)"
                                                      for s, r in report.items()) + " (as meta.json says)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from recsys_transfer.transfer.domains import select_command

    kwargs = {"context_fields": args.context_fields} if args.context_fields else {}
    try:
        selections = select_command(args.data, args.fields, args.output, top_k=args.top_k, quantile=args.quantile,
                                    eta=args.eta, **kwargs)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for sel in selections:
        c = sel.counts()
        print(f"{sel.field:<16} eta {sel.eta:.4f}  " + "  ".join(f"{k} {v:,}" for k, v in c.items()))
    print(f"wrote {args.output or args.data / 'selection'}")
    return 0


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summary_line(result: dict) -> str:
    """The CLI's one-line summary of a finished run: every task's headline test metrics."""
    parts = []
    for name, m in result["test"].items():
        keys = [k for k in ("auc", "logloss", "head_auc", "tail_auc", "gauc", "mse", "mae", "accuracy", "macro_f1",
                            "hr@10", "mrr@10", "ndcg@10") if k in m]
        parts.append(f"{name}: " + " ".join(f"{k} {_fmt(m[k])}" for k in keys))
    field = result.get("transfer_field")
    return ("test " + " | ".join(parts) + (f" (head/tail: {field})" if field else "")
            + f"  best epoch {result['best_epoch']} ({result['monitor']} {_fmt(result['best_monitor'])})")


def cmd_train(args: argparse.Namespace) -> int:
    from recsys_transfer.config import load_config
    from recsys_transfer.train.run import run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg, args.output, overwrite=args.overwrite, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(summary_line(result) + f"  -> {args.output}/metrics.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recsys_transfer.demo import run_demo

    run_demo(args.output, rows=args.rows, epochs=args.epochs, seed=args.seed)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from recsys_transfer.env import describe

    print(describe())
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from recsys_transfer.data import download

    if args.list:
        print(download.table())
        return 0
    if not args.names or args.dir is None:
        raise UserError("download needs NAME ... and --dir DIR (recsys-transfer download --list shows the names)")
    if (args.md5 or args.sha256) and len(args.names) > 1:
        raise UserError("--md5/--sha256 check one file: give one NAME with them")
    for name in args.names:
        download.download(name, args.dir, md5=args.md5, sha256=args.sha256, retries=args.retries,
                          progress="none" if args.no_progress else "auto")
    return 0


def _error_line(text: str) -> None:
    """One line on stderr in ONE write, so the lines of several ranks sharing the stream never interleave."""
    sys.stderr.flush()
    line = " ".join(text.splitlines()) + "\n"
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured by a test harness)
        sys.stderr.write(line)
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # torchrun's options and our command pass through unparsed
        from recsys_transfer.launch import launch

        try:
            return launch(argv[1:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from recsys_transfer.bench.cli import cmd_bench
    from recsys_transfer.noise import quiet_library_noise

    quiet_library_noise()
    handler = {"prepare": cmd_prepare, "info": cmd_info, "select": cmd_select, "train": cmd_train, "bench": cmd_bench,
               "demo": cmd_demo, "env": cmd_env, "download": cmd_download}[args.command]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        code = handler(args)
    except UserError as exc:
        where = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        _error_line(f"error: {where}{exc}")
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if world > 1:  # a torchrun rank: leave without the gloo teardown abort
        from recsys_transfer.train.distributed import exit_rank

        exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
