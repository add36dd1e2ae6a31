"""Throughput and peak memory of ``prepare_criteo``, of the schema path on the same data, and of a
straightforward pandas implementation.

Generates Criteo-schema synthetic TSV files (40 tab-separated fields: label, I1..I13 with empties and
negatives, C1..C26 8-hex tokens drawn Zipf-like from a few thousand values per field, some empty), then for
each size runs each implementation of the same transformation in a FRESH subprocess so the peak RSS
(``ru_maxrss`` of that process) belongs to one implementation only:

* ``ours``:   ``recsys_transfer.data.criteo.prepare_criteo``, the dedicated Criteo reader (streaming: one
  parse, two passes via a spill file, bounded memory);
* ``schema``: ``recsys_transfer.data.tabular.prepare_tabular`` with the recipe
  ``pipelines/datasets/criteo-tsv.yaml`` (the generic reader any schema file goes through; the same dataset);
* ``schema-gz``: the same on a gzip of the same file (``gzip -6``, as the terabyte day files come), made once
  per size next to the TSV;
* ``pandas``: ``pd.read_csv`` of the whole file, the same seeded random split, min-count vocabularies fit on
  train per sparse field, log-square bucketing of I1..I13, dense ``log1p(max(v,0))``, ids via ``Series.map``,
  one parquet file per split.

The driver checks that every implementation gives the same rows per split and the same vocabulary size for
every sparse field as the first one run, and records wall and CPU seconds (user + system, all threads,
imports excluded) of every run and the load average, since the machine may be shared. Ratios: ours vs pandas
(the original claim), schema vs ours (target >= 0.8x rows/s) and schema-gz vs schema (target >= 0.5x).

Usage::

    python benchmarks/prepare_throughput.py                       # 2,000,000 rows, ours and pandas
    python benchmarks/prepare_throughput.py --sizes 1000000,2000000
    python benchmarks/prepare_throughput.py --rows 5000000 --impls ours   # the >= 5M-row proof
    python benchmarks/prepare_throughput.py --impls ours,schema,schema-gz,pandas
    python benchmarks/prepare_throughput.py --sizes 1000000,5000000 --impls schema --tag schema_5m  # flat RSS

Results go to ``benchmarks/results/prepare_throughput.{json,md}`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
INT_FIELDS = [f"I{i}" for i in range(1, 14)]
CAT_FIELDS = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *INT_FIELDS, *CAT_FIELDS]
MIN_COUNT = 10
SEED = 2022
IMPLS = ("ours", "schema", "schema-gz", "pandas")
CRITEO_RECIPE = REPO / "pipelines" / "datasets" / "criteo-tsv.yaml"


# ----------------------------------------------------------------------------------------------------------
# synthetic Criteo TSV (vectorized: ~1-2 s per million rows)


def write_synthetic_criteo(path: Path, rows: int, seed: int = 0, block: int = 1_000_000) -> None:
    import polars as pl

    rng = np.random.default_rng(seed)
    pool_sizes = rng.integers(3, 8000, size=len(CAT_FIELDS))
    pools = [
        pl.Series([f"{x:08x}" for x in rng.integers(0, 2**32, size=int(k), dtype=np.uint64)], dtype=pl.Utf8)
        for k in pool_sizes
    ]
    cat_null = rng.uniform(0.0, 0.4, size=len(CAT_FIELDS))
    int_null = rng.uniform(0.0, 0.45, size=len(INT_FIELDS))
    int_mu = rng.uniform(0.0, 6.0, size=len(INT_FIELDS))
    tmp = path.with_suffix(".part")
    with tmp.open("wb") as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            cols: dict[str, pl.Series] = {"label": pl.Series((rng.random(n) < 0.25).astype(np.int64))}
            for j, name in enumerate(INT_FIELDS):
                v = np.floor(np.exp(rng.normal(int_mu[j], 1.5, size=n))).astype(np.int64)
                v[rng.random(n) < 0.03] *= -1  # some negatives
                s = pl.Series(name, v)
                cols[name] = pl.select(pl.when(pl.Series(rng.random(n) < int_null[j])).then(None).otherwise(s)).to_series()
            for j, name in enumerate(CAT_FIELDS):
                k = len(pools[j])
                idx = np.minimum((k * rng.random(n) ** 3).astype(np.int64), k - 1)  # Zipf-like: low ids common
                s = pools[j].gather(idx)
                cols[name] = pl.select(pl.when(pl.Series(rng.random(n) < cat_null[j])).then(None).otherwise(s)).to_series()
            df = pl.DataFrame({name: cols[name].alias(name) for name in COLUMNS})
            df.write_csv(f, separator="\t", include_header=False, quote_style="never", null_value="")
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------------------
# the implementations (run inside a worker subprocess)


def run_ours(inp: Path, out: Path, chunk_rows: int) -> dict:
    from recsys_transfer.data.criteo import prepare_criteo
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec

    meta = prepare_criteo(
        [inp], out, split=SplitSpec(seed=SEED), head_tail=HeadTailSpec(), min_count=MIN_COUNT,
        chunk_rows=chunk_rows, progress=False,
    )
    return {"rows": meta.total_rows, "split_rows": dict(meta.split_rows),
            "vocab_sizes": {f.name: f.vocab_size for f in meta.sparse}}


def run_schema(inp: Path, out: Path, chunk_rows: int) -> dict:
    """The schema path: the generic tabular reader with the Criteo TSV recipe (a gzip input is detected by its
    magic bytes)."""
    from recsys_transfer.data.schema import load_schema
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
    from recsys_transfer.data.tabular import prepare_tabular

    meta = prepare_tabular(
        load_schema(CRITEO_RECIPE), [inp], out, split=SplitSpec(seed=SEED), head_tail=HeadTailSpec(),
        min_count=MIN_COUNT, chunk_rows=chunk_rows, progress=False,
    )
    return {"rows": meta.total_rows, "split_rows": dict(meta.split_rows),
            "vocab_sizes": {f.name: f.vocab_size for f in meta.sparse}}


def gzip_file(src: Path, dst: Path, level: int = 6) -> None:
    tmp = dst.with_suffix(".part")
    with src.open("rb") as f, gzip.open(tmp, "wb", compresslevel=level) as g:
        shutil.copyfileobj(f, g, 1 << 22)
    tmp.rename(dst)


def run_pandas(inp: Path, out: Path) -> dict:
    import pandas as pd

    from recsys_transfer.data.splits import SplitSpec

    dtypes = {"label": "int64", **{c: "float64" for c in INT_FIELDS}, **{c: "str" for c in CAT_FIELDS}}
    df = pd.read_csv(inp, sep="\t", header=None, names=COLUMNS, dtype=dtypes, na_values=[""], keep_default_na=False)
    codes = SplitSpec(seed=SEED).assign_random(np.arange(len(df), dtype=np.uint64))
    train = codes == 0
    result = pd.DataFrame(index=df.index)
    vocab_sizes = {}
    for c in INT_FIELDS:  # log-square bucket as the sparse key
        v = df[c]
        bucket = np.where(v > 2, np.floor(np.log(v.where(v > 2, 3.0)) ** 2), v)
        df[c + "_b"] = pd.Series(bucket, index=df.index).astype("Int64")
    for c, key in [(c, c + "_b") for c in INT_FIELDS] + [(c, c) for c in CAT_FIELDS]:
        counts = df.loc[train, key].value_counts()
        counts = counts[counts >= MIN_COUNT]
        vocab = counts.rename_axis("value").reset_index(name="count").sort_values(
            ["count", "value"], ascending=[False, True]
        )
        mapping = pd.Series(np.arange(1, len(vocab) + 1, dtype=np.int64), index=vocab["value"].to_numpy())
        result[c] = df[key].map(mapping).fillna(0).astype("int64")
        vocab_sizes[c] = len(vocab) + 1  # + the OOV row 0
    for c in INT_FIELDS:
        result["dense_" + c] = np.log1p(df[c].clip(lower=0)).fillna(0.0).astype("float32")
    result["label"] = df["label"].astype("float32")
    out.mkdir(parents=True, exist_ok=True)
    split_rows = {}
    for code, name in enumerate(("train", "valid", "test")):
        part = result[codes == code]
        part.to_parquet(out / f"{name}.parquet", index=False)
        split_rows[name] = len(part)
    return {"rows": len(result), "split_rows": split_rows, "vocab_sizes": vocab_sizes}


def worker(impl: str, inp: Path, out: Path, chunk_rows: int) -> None:
    t0 = time.perf_counter()
    c0 = time.process_time()
    if impl == "ours":
        check = run_ours(inp, out, chunk_rows)
    elif impl in ("schema", "schema-gz"):
        check = run_schema(inp, out, chunk_rows)
    else:
        check = run_pandas(inp, out)
    seconds = time.perf_counter() - t0
    cpu_run = time.process_time() - c0  # all threads of this process, the run only (imports excluded)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss is in KiB on Linux
    print(json.dumps({"impl": impl, "rows": check["rows"], "seconds": seconds, "cpu_seconds": cpu_run,
                      "cpu_seconds_process": usage.ru_utime + usage.ru_stime, "user_seconds": usage.ru_utime,
                      "system_seconds": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "split_rows": check["split_rows"], "vocab_sizes": check["vocab_sizes"]}))


# ----------------------------------------------------------------------------------------------------------
# driver


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("polars", "pyarrow", "pandas", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _check_same_output(rows: int, by: dict[str, dict]) -> str:
    """Every implementation must produce the same rows per split and the same vocabulary sizes as the first."""
    if len(by) < 2:
        return "not compared (one implementation only)"
    names = list(by)
    a = by[names[0]]
    problems = []
    for name in names[1:]:
        b = by[name]
        if a["rows"] != b["rows"] or a["split_rows"] != b["split_rows"]:
            problems.append(f"rows differ: {names[0]} {a['split_rows']} vs {name} {b['split_rows']}")
        va, vb = a["vocab_sizes"], b["vocab_sizes"]
        diff = {k: (va.get(k), vb.get(k)) for k in set(va) | set(vb) if va.get(k) != vb.get(k)}
        if diff:
            problems.append(f"vocab sizes differ ({names[0]}, {name}): {diff}")
    if problems:
        raise SystemExit(f"{rows:,} rows: the implementations disagree: " + "; ".join(problems))
    return (f"equal at {rows:,} rows ({', '.join(names)}): rows per split {a['split_rows']}, vocab sizes of all "
            f"{len(a['vocab_sizes'])} sparse fields (total {sum(a['vocab_sizes'].values()):,} rows)")


def ratio_lines(sizes: list[int], results: list[dict]) -> tuple[dict, dict, dict, list[str]]:
    """(ours/pandas wall ratios, pandas/ours CPU ratios, the schema ratios, one line per ratio), per size.
    Wall ratios compare rows/s of the best runs; CPU ratios the least CPU seconds of each."""
    ratios, cpu_ratios, schema_ratios, lines = {}, {}, {}, []
    for rows in sizes:
        by = {r["impl"]: r for r in results if r["input_rows"] == rows}
        if "ours" in by and "pandas" in by:
            ratios[rows] = by["ours"]["rows_per_s"] / by["pandas"]["rows_per_s"]
            cpu_ratios[rows] = by["pandas"]["min_cpu_seconds"] / by["ours"]["min_cpu_seconds"]
            lines.append(f"ratio at {rows:,} rows: wall (ours rows/s / pandas rows/s, best runs) {ratios[rows]:.2f}x; "
                         f"CPU (pandas CPU s / ours CPU s, least of each) {cpu_ratios[rows]:.2f}x")
        for num, den, target in (("schema", "ours", 0.8), ("schema-gz", "schema", 0.5)):
            if num in by and den in by:
                wall = by[num]["rows_per_s"] / by[den]["rows_per_s"]
                cpu = by[den]["min_cpu_seconds"] / by[num]["min_cpu_seconds"]
                schema_ratios.setdefault(str(rows), {})[f"{num}/{den}"] = {"wall": wall, "cpu": cpu, "target": target}
                lines.append(f"ratio at {rows:,} rows: {num} / {den} rows/s {wall:.2f}x wall, {cpu:.2f}x per CPU s "
                             f"(target >= {target}x: {'met' if wall >= target else 'NOT met'} on wall time)")
    return ratios, cpu_ratios, schema_ratios, lines


def rss_lines(sizes: list[int], results: list[dict]) -> list[str]:
    """Per implementation run at several sizes: peak RSS at the smallest and the largest size."""
    lines = []
    for impl in dict.fromkeys(r["impl"] for r in results):
        by = {r["input_rows"]: r for r in results if r["impl"] == impl}
        if len(by) > 1:
            lo, hi = min(by), max(by)
            lines.append(f"peak RSS of {impl}: {by[lo]['peak_rss_mib']:,.0f} MiB at {lo:,} rows, "
                         f"{by[hi]['peak_rss_mib']:,.0f} MiB at {hi:,} rows "
                         f"({by[hi]['peak_rss_mib'] / by[lo]['peak_rss_mib']:.2f}x for {hi / lo:.0f}x the rows)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--sizes", type=str, default="", help="comma-separated row counts (overrides --rows)")
    ap.add_argument("--impls", type=str, default="ours,pandas")
    ap.add_argument("--chunk-rows", type=int, default=125_000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per implementation and size; the fastest is kept")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "recsys_bench_criteo")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated TSV files")
    ap.add_argument("--tag", type=str, default="", help="suffix of the result files")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the result files go")
    ap.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.input, args.output, args.chunk_rows)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.rows]
    impls = [s for s in args.impls.split(",") if s]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        ap.error(f"--impls: unknown {unknown}; known: {', '.join(IMPLS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    results = []
    checks = []
    for rows in sizes:
        data = args.workdir / f"criteo_synth_{rows}.tsv"
        if not data.exists():
            t0 = time.perf_counter()
            write_synthetic_criteo(data, rows, seed=rows)
            print(f"generated {rows:,} rows ({data.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f}s", flush=True)
        data_gz = data.with_suffix(".tsv.gz")
        if "schema-gz" in impls and not data_gz.exists():
            t0 = time.perf_counter()
            gzip_file(data, data_gz)
            print(f"gzipped to {data_gz.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - t0:.1f}s",
                  flush=True)
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        load_before: dict[str, float] = {}
        for _ in range(args.repeat):  # best wall time of N fresh processes (the machine may be shared); the
            for impl in impls:        # rounds interleave the implementations, so a burst of load hits all alike
                out = args.workdir / f"out_{impl}_{rows}"
                shutil.rmtree(out, ignore_errors=True)
                inp = data_gz if impl == "schema-gz" else data
                cmd = [sys.executable, __file__, "--worker", impl, "--input", str(inp), "--output", str(out),
                       "--chunk-rows", str(args.chunk_rows)]
                load_before.setdefault(impl, os.getloadavg()[0])
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr)
                    raise SystemExit(f"{impl} worker failed on {rows} rows")
                runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                shutil.rmtree(out, ignore_errors=True)
        for impl in impls:
            inp = data_gz if impl == "schema-gz" else data
            res = dict(min(runs[impl], key=lambda r: r["seconds"]))
            res["all_seconds"] = [r["seconds"] for r in runs[impl]]
            res["all_cpu_seconds"] = [r["cpu_seconds"] for r in runs[impl]]
            res["min_cpu_seconds"] = min(r["cpu_seconds"] for r in runs[impl])
            res["load_average_1m_before_runs"] = load_before[impl]
            res["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs[impl])
            res["input_rows"] = rows
            res["input_mib"] = data.stat().st_size / 2**20  # the TSV's size, also for schema-gz
            res["input_file"] = inp.name
            res["input_file_mib"] = inp.stat().st_size / 2**20
            res["rows_per_s"] = res["rows"] / res["seconds"]
            results.append(res)
            print(f"{impl:<9} {rows:>10,} rows {res['seconds']:8.2f}s (cpu {res['cpu_seconds']:.1f}s) "
                  f"{res['rows_per_s']:>12,.0f} rows/s peak RSS {res['peak_rss_mib']:8.0f} MiB", flush=True)
        checks.append(_check_same_output(rows, {r["impl"]: r for r in results if r["input_rows"] == rows}))
        print(checks[-1], flush=True)
        if not args.keep_data:
            data.unlink()
            data_gz.unlink(missing_ok=True)

    lines = ["| impl | rows | input MiB (file read) | best wall s | all wall s | CPU s of best | all CPU s | rows/s (wall) | "
             "rows per CPU s | peak RSS MiB | load 1m before |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        read = r.get("input_file_mib", r["input_mib"])
        lines.append(f"| {r['impl']} | {r['rows']:,} | {r['input_mib']:,.0f}"
                     f"{f' ({read:,.0f} gz)' if r['impl'] == 'schema-gz' else ''} | {r['seconds']:.2f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['all_seconds'])} | {r['cpu_seconds']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['all_cpu_seconds'])} | {r['rows_per_s']:,.0f} | "
                     f"{r['rows'] / r['min_cpu_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['load_average_1m_before_runs']:.2f} |")
    ratios, cpu_ratios, schema_ratios, ratio_text = ratio_lines(sizes, results)
    rss = rss_lines(sizes, results)
    table = "\n".join(lines)
    print()
    print(table)
    for line in ratio_text + rss:
        print(line)

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "chunk_rows": args.chunk_rows,
        "repeat": args.repeat,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "output_check": checks,
        "min_count": MIN_COUNT,
        "results": results,
        "ratio": {str(k): v for k, v in ratios.items()},
        "cpu_ratio": {str(k): v for k, v in cpu_ratios.items()},
        "schema_ratio": schema_ratios,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = "prepare_throughput" + (f"_{args.tag}" if args.tag else "")
    (args.results_dir / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    md = [
        "# prepare throughput: prepare_criteo, the schema path (plain and gzip), pandas",
        "",
        f"Command: `{record['command']}`  ",
        f"Commit: `{record['git_commit']}`  ",
        f"Machine: {record['machine']['cpu_count']} CPUs, {record['machine']['platform']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + "  ",
        f"chunk_rows {args.chunk_rows:,}, min_count {MIN_COUNT}, best of {args.repeat} run(s) (rounds interleave the "
        "implementations); each run is a fresh subprocess, peak RSS is that process's ru_maxrss (max over runs). The machine may be shared with other "
        "jobs: wall times are noisy, CPU seconds less so. CPU seconds: user + system time of all threads of the "
        "worker during the run (imports excluded).  ",
        f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_at_start)}, at end "
        f"{tuple(round(x, 2) for x in record['load_average_at_end'])}.",
        "",
        table,
        "",
        *[f"- {line}" for line in ratio_text + rss],
        *[f"- output check: {line}" for line in checks],
        "",
    ]
    (args.results_dir / f"{stem}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
