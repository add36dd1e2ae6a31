"""``recsys-transfer bench``: run a grid spec resumably and write results.csv, results.md and plots.

    recsys-transfer bench --config benchmarks/grids/ml100k.yaml --output benchmarks/results/bench_ml100k
        [--set train.epochs=2 ...] [--max-runs N] [--report-only] [--dry-run]

Wire into the main CLI with ``add_bench_parser(subparsers)`` and the handler ``cmd_bench``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark grid (resumable) -> results.csv, results.md, plots")
    configure_parser(p)
    return p


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="grid spec YAML (benchmarks/grids/*.yaml)")
    p.add_argument("--output", required=True, type=Path, help="output directory (runs/, results.csv, results.md, plots/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run (after the grid's own), e.g. --set train.epochs=2")
    p.add_argument("--max-runs", type=int, default=None, help="train at most N missing runs, then report")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="train only the runs whose index in the grid is K mod N (run N processes, K = 0..N-1, on one "
                        "--output; each reports every finished run)")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.csv/results.md/plots")
    p.add_argument("--dry-run", action="store_true", help="list the runs (and which are done) and exit")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: grid's, 1)")


def cmd_bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from recsys_transfer.bench.report import write_report
    from recsys_transfer.bench.runner import expand, rebuild_csv, run_grid
    from recsys_transfer.bench.spec import load_grid

    spec = load_grid(args.config)
    if args.threads:
        import dataclasses

        spec = dataclasses.replace(spec, threads=args.threads)
    out = Path(args.output)
    if args.dry_run:
        for r in expand(spec, args.overrides):
            done = (out / "runs" / r.run_id / "metrics.json").is_file()
            print(f"{'done' if done else 'todo'}  {r.run_id}")
        return 0
    if args.report_only:
        rebuild_csv(out)
    else:
        res = run_grid(spec, out, args.overrides, max_runs=args.max_runs, shard=_shard(args.shard))
        print(f"ran {len(res['ran'])}, skipped {len(res['skipped'])} (done), {len(res['runs'])} in the grid")
    command = "recsys-transfer bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "bench" else \
        "OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(a) for a in sys.argv)
    path = write_report(out, spec, command=command)
    print(f"wrote {out / 'results.csv'}, {path}, {out / 'plots'}/")
    return 0


def _shard(text: str | None) -> tuple[int, int] | None:
    from recsys_transfer.errors import UserError

    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise UserError(f"--shard: expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def main(argv: list[str] | None = None) -> int:
    from recsys_transfer.errors import UserError

    parser = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
