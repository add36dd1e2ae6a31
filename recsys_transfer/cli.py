"""The ``recsys-transfer`` command line.

    recsys-transfer prepare --dataset {movielens,criteo,synthetic} --input PATH --output DIR [options]
    recsys-transfer info DIR [--field NAME]
    recsys-transfer select --data DIR [--fields F ...] [--top-k 1000] [--quantile 0.2 | --eta X] [--output DIR]
    recsys-transfer train --config pipelines/NAME.yaml [--set key.path=value ...] --output DIR
    recsys-transfer bench --config benchmarks/grids/NAME.yaml --output DIR
    recsys-transfer demo [--output DIR]

User mistakes (missing files, malformed rows, bad options) print one line ``error: ...`` and exit with status 2,
without a traceback; anything else is a bug and keeps its traceback.
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
                   help="random (seeded, per record) or temporal (MovieLens: by rating time)")
    g.add_argument("--split-fractions", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VALID,TEST")
    g.add_argument("--seed", type=int, default=2022, help="split seed (and synthetic data seed)")
    g.add_argument("--head-rule", choices=("pareto", "threshold"), default="pareto",
                   help="source domain: top fraction of items (pareto) or items with count >= --head-min-count")
    g.add_argument("--head-fraction", type=float, default=0.2)
    g.add_argument("--head-min-count", type=int, default=10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-transfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw data -> prepared parquet shards + meta.json")
    p.add_argument("--dataset", required=True, choices=("movielens", "criteo", "synthetic"))
    p.add_argument("--input", type=Path, nargs="*", default=[],
                   help="MovieLens: the directory; Criteo: one or more TSV files read as one stream; synthetic: none")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--min-count", type=int, default=None,
                   help="values seen fewer times in train map to OOV (default: movielens 1, criteo 10, synthetic 1)")
    p.add_argument("--hash-size", type=int, default=None, help="criteo: hash each categorical field into this many rows")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                   help="stop at the first malformed row (default) or skip it and count it in meta.json")
    p.add_argument("--rows", type=int, default=None, help="synthetic: number of rows")
    p.add_argument("--no-progress", action="store_true")
    _add_split_options(p)

    p = sub.add_parser("info", help="summarize a prepared dataset")
    p.add_argument("data", type=Path)
    p.add_argument("--field", default=None, help="also list this field's head (source) ids")

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

    from recsys_transfer.bench.cli import add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("demo", help="synthetic long-tail data -> prepare -> train a model -> held-out AUC")
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=2022)
    return parser


def _split_specs(args: argparse.Namespace):
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec

    try:
        return (SplitSpec(args.split, tuple(args.split_fractions), args.seed),
                HeadTailSpec(args.head_rule, args.head_fraction, args.head_min_count))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from recsys_transfer.data.prepared import human_summary

    split, head_tail = _split_specs(args)
    progress = not args.no_progress
    if args.dataset == "movielens":
        from recsys_transfer.data.movielens import prepare_movielens

        if len(args.input) != 1:
            raise UserError("--input: movielens takes exactly one directory")
        meta = prepare_movielens(args.input[0], args.output, split=split, head_tail=head_tail,
                                 min_count=args.min_count or 1, on_bad_row=args.on_bad_row, progress=progress)
    elif args.dataset == "criteo":
        from recsys_transfer.data.criteo import prepare_criteo

        if not args.input:
            raise UserError("--input: criteo takes one or more TSV files")
        if split.kind != "random":
            raise UserError("--split temporal: Criteo rows carry no timestamp; use --split random")
        meta = prepare_criteo(list(args.input), args.output, split=split, head_tail=head_tail,
                              min_count=args.min_count or 10, hash_size=args.hash_size,
                              on_bad_row=args.on_bad_row, progress=progress)
    else:
        from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic

        if args.input:
            raise UserError("--input: the synthetic dataset is generated, it takes no input")
        if split.kind != "random":
            raise UserError("--split temporal: synthetic rows carry no timestamp; use --split random")
        kwargs = {"seed": args.seed}
        if args.rows is not None:
            kwargs["rows"] = args.rows
        try:
            cfg = SyntheticConfig(**kwargs)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        meta = prepare_synthetic(cfg, args.output, split=split, head_tail=head_tail, progress=progress)
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


def cmd_train(args: argparse.Namespace) -> int:
    from recsys_transfer.config import load_config
    from recsys_transfer.train.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(cfg, args.output)
    if os.environ.get("RANK", "0") != "0":
        return 0
    t = result["test"]
    line = f"test AUC {t['auc']:.4f}  logloss {t['logloss']:.4f}"
    if "head_auc" in t:
        line += f"  head AUC {t['head_auc']:.4f}  tail AUC {t['tail_auc']:.4f} ({t['field']})"
    print(line + f"  best epoch {result['best_epoch']}  -> {args.output}/metrics.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recsys_transfer.demo import run_demo

    run_demo(args.output, rows=args.rows, epochs=args.epochs, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recsys_transfer.bench.cli import cmd_bench

    handler = {"prepare": cmd_prepare, "info": cmd_info, "select": cmd_select, "train": cmd_train, "bench": cmd_bench,
               "demo": cmd_demo}[args.command]
    try:
        code = handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: leave without the gloo teardown abort
        from recsys_transfer.train.distributed import exit_rank

        exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
