"""Step time and memory of +Ours (item-wise barrier, fused backward row update) against B on Criteo-schema data.

Same model (DeepFM: 26 sparse fields, all under transfer, dim 16, MLP 400-400-400, 13 dense), same batches
(Zipf-distributed ids, batch 4096), in one run, at two sizes: every table 1e5 rows; then one table grown to 1e7
rows (the rest unchanged). Methods:

* ``B``        — main loss only, tables updated by our row pipeline (row-wise Adagrad), through the trainer's own
                 training step (``compose_step`` -> ``TrainStep``, what ``recsys-transfer train`` runs);
* ``+Ours``    — selective domain + barrier with the adversarial transfer loss on all 26 fields, same step;
* ``+Ours:<option>:...`` — +Ours with options: ``paper`` (the paper's barrier on the direction instead of the
                 default barrier on the applied update), ``rows=K`` (``transfer.max_rows``: at most K source and K
                 target rows per table and step in the transfer loss), ``disc=K`` (``transfer.disc_every``: the
                 discriminators step every K-th step), e.g. ``+Ours:rows=256:disc=4``;
* ``B-fused``  — main loss only with TorchRec's own path: DistributedModelParallel (1 rank, gloo), fbgemm fused
                 TBE with its fused EXACT_ROWWISE_ADAGRAD, no plug-in (the library's fastest CPU path).

Dense parameters use Adam in every method (the trainer's fused Adam for B and +Ours). Printed per size: median step time (ms), peak RSS, RSS growth
during training ("extra": training peak minus RSS after setup), and the ``ratio`` of +Ours to B and to B-fused.
Step times come from ONE process that interleaves the methods step by step (so background load hits all alike);
memory from fresh processes, one method each, ``--mem-runs`` (3) per method, median reported: one process's RSS
growth varies by tens of MiB from run to run. Results go to ``benchmarks/results/barrier_overhead.{json,md}``.

    python benchmarks/barrier_overhead.py                 # both sizes, 40 timed steps each
    python benchmarks/barrier_overhead.py --sizes 100000 --steps 10
    python benchmarks/barrier_overhead.py --methods B,+Ours,+Ours:paper,+Ours:rows=256:disc=4,B-fused
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NUM_SPARSE, NUM_DENSE, DIM, MLP_HIDDEN = 26, 13, 16, (400, 400, 400)


def make_meta(big_rows: int | None, rows: int):
    import numpy as np

    from recsys_transfer.data.prepared import DatasetMeta, SparseFieldMeta

    sparse = []
    for k in range(NUM_SPARSE):
        n = big_rows if (big_rows and k == 0) else rows
        # ids are in frequency order (as prepared data is): expected Zipf(1.05) counts per 1e8 records
        freq = (1e8 / np.arange(1, n + 1) ** 1.05).astype(np.int64)
        freq = np.concatenate([[0], freq[: n - 1]])
        head = np.arange(1, int(np.ceil(0.2 * (n - 1))) + 1)
        sparse.append(SparseFieldMeta(name=f"C{k + 1}", vocab_size=n, oov_index=0, hashed=False, min_count=1,
                                      frequencies=freq.tolist(), head_ids=head.tolist()))
    d = dict(dataset="criteo-schema-synthetic", sparse=sparse, dense=[f"dense_I{k + 1}" for k in range(NUM_DENSE)],
             labels=["label"], split={}, head_tail={}, split_rows={"train": 0, "valid": 0, "test": 0},
             split_files={}, input_rows=0, skipped_rows=0, skip_reasons={}, source={})
    return DatasetMeta(**d, dataset_id="bench")


def make_batches(meta, batch: int, count: int, seed: int = 0):
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_transfer.types import Batch

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        cols = []
        for f in meta.sparse:
            ids = rng.zipf(1.05, batch)
            ids = np.where(ids < f.vocab_size, ids, rng.integers(1, f.vocab_size, batch))
            cols.append(ids)
        values = torch.from_numpy(np.concatenate(cols).astype(np.int64))
        kjt = KeyedJaggedTensor(keys=meta.sparse_names, values=values,
                                lengths=torch.ones(len(cols) * batch, dtype=torch.int32), stride=batch)
        dense = torch.from_numpy(rng.normal(size=(batch, NUM_DENSE)).astype(np.float32))
        labels = torch.from_numpy((rng.random(batch) < 0.25).astype(np.float32))
        out.append(Batch(dense, kjt, {"label": labels}))
    return out


def rss_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB: VmRSS (current) or VmHWM (peak since start or last reset)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def transfer_options(method: str) -> dict:
    """TransferConfig fields of a method name: ``B``, ``+Ours``, ``+Ours:paper:rows=256:disc=4``."""
    name, *options = method.split(":")
    if name not in ("B", "+Ours") or (name == "B" and options):
        raise SystemExit(f"unknown method {method!r}: B, +Ours[:paper][:rows=K][:disc=K], B-fused")
    out: dict = {"mode": name}
    for opt in options:
        key, _, value = opt.partition("=")
        if key == "paper" and not value:
            out["barrier"] = "paper"
        elif key == "rows" and value.isdigit():
            out["max_rows"] = int(value)
        elif key == "disc" and value.isdigit():
            out["disc_every"] = int(value)
        else:
            raise SystemExit(f"unknown option {opt!r} in {method!r}: paper, rows=K, disc=K")
    return out


def build(method: str, meta, loss: str = "adversarial"):
    """The step function of one method on a fresh DeepFM: the trainer's TrainStep (composed as ``recsys-transfer
    train`` composes it, :func:`recsys_transfer.train.compose.compose_step`) for B and +Ours."""
    import numpy as np
    import torch

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.models.deepfm import DeepFM
    from recsys_transfer.objectives import Objective
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.step import TrainStep, dense_optimizer

    torch.manual_seed(0)
    model = DeepFM(meta, embedding_dim=DIM, hidden=MLP_HIDDEN)
    if method == "B-fused":
        import torch.distributed as dist
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        from recsys_transfer.train.distributed import shard_model

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        model = shard_model(model, torch.device("cpu"), sharding_type="table_wise",
                            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})
        dense_params = [p for n, p in model.named_parameters() if "embedding_bags" not in n]
        train_step = TrainStep(model, Objective(meta.tasks), dense_optimizer(TrainConfig(optimizer="adam", lr=1e-3),
                                                                              dense_params))
    else:
        rng = np.random.default_rng(1)
        domains = {f.name: f.tail_mask() & (rng.random(f.vocab_size) >= 0.2) for f in meta.sparse}  # T'_eta
        train_step = compose_step(model, meta, rows=RowsConfig(optimizer="rowwise_adagrad", lr=0.01),
                                  transfer=TransferConfig(loss=loss, fields=tuple(meta.sparse_names),
                                                          **transfer_options(method)),
                                  domains=domains, train=TrainConfig(optimizer="adam", lr=1e-3))

    def step(b) -> float:
        t0 = time.perf_counter()
        train_step(b)
        return time.perf_counter() - t0

    return step


def time_worker(methods: list[str], big_rows: int | None, rows: int, steps: int, warmup: int, batch: int,
                loss: str) -> dict:
    """All methods in one process, steps interleaved round-robin (rotating the order), so load from anything
    else on the machine hits every method alike; same batches for every method."""
    import numpy as np

    meta = make_meta(big_rows, rows)
    batches = make_batches(meta, batch, 6)
    steppers = {m: build(m, meta, loss) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for k in range(warmup + steps):
        order = methods[k % len(methods):] + methods[: k % len(methods)]
        for m in order:
            dt = steppers[m](batches[k % len(batches)])
            if k >= warmup:
                times[m].append(dt)
    return {m: {"median_ms": statistics.median(v) * 1e3, "p90_ms": float(np.percentile(v, 90)) * 1e3}
            for m, v in times.items()}


def mem_worker(method: str, big_rows: int | None, rows: int, steps: int, batch: int, loss: str) -> dict:
    """One method alone: RSS after setup, peak RSS of the process, and the peak while training minus the RSS
    after setup (Linux: the peak counter VmHWM is reset after setup through /proc/self/clear_refs, so one-time
    setup transients, e.g. moving tables into one buffer, do not count as training memory)."""
    meta = make_meta(big_rows, rows)
    batches = make_batches(meta, batch, 6)
    step = build(method, meta, loss)
    rss_setup = rss_mib()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    for k in range(steps):
        step(batches[k % len(batches)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_setup_mib": rss_setup, "rss_peak_mib": peak, "rss_extra_mib": rss_mib("VmHWM") - rss_setup}



def _finish_dist() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,10000000", help="comma list: 1e5 = every table 1e5 rows; larger = one table grown")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--methods", default="B,+Ours,B-fused")
    p.add_argument("--mem-steps", type=int, default=8)
    p.add_argument("--mem-runs", type=int, default=3,
                   help="fresh processes per method for memory; the median is reported (one process's RSS growth "
                        "varies by +-40 MiB from run to run)")
    p.add_argument("--loss", default="adversarial", help="transfer loss of +Ours (the paper's CTR choice: adversarial)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "METHODS", "BIG"), help=argparse.SUPPRESS)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.worker:
        kind, methods, big = args.worker
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if kind == "time":
            res = time_worker(methods.split(","), int(big) or None, args.rows, args.steps, args.warmup, args.batch,
                              args.loss)
        else:
            res = mem_worker(methods, int(big) or None, args.rows, args.mem_steps, args.batch, args.loss)
        _finish_dist()
        print("RESULT " + json.dumps(res))
        return 0

    def run(kind: str, methods: str, big: int) -> dict:
        cmd = [sys.executable, __file__, "--worker", kind, methods, str(big), "--rows", str(args.rows), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--mem-steps",
               str(args.mem_steps), "--loss", args.loss, "--threads", str(args.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind} worker for {methods} failed")
        return json.loads(line[0][7:])

    rows_out = []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    methods = args.methods.split(",")
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        big = size if size != args.rows else 0
        timing = run("time", ",".join(methods), big)
        for method in methods:
            mems = [run("mem", method, big) for _ in range(args.mem_runs)]
            res = {"method": method, "size": size, **timing[method],
                   **{k: statistics.median(m[k] for m in mems) for k in mems[0]},
                   "rss_extra_mib_runs": [round(m["rss_extra_mib"], 1) for m in mems]}
            rows_out.append(res)
            print(f"  {method:<8} size {size:>10,}  median {res['median_ms']:8.1f} ms  p90 {res['p90_ms']:8.1f} ms  "
                  f"peak RSS {res['rss_peak_mib']:8.0f} MiB  growth {res['rss_extra_mib']:7.0f} MiB", flush=True)
    lines = ["| table rows | method | median step ms | p90 ms | peak RSS MiB | RSS growth in training MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['size']:,} | {r['method']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['rss_peak_mib']:.0f} | {r['rss_extra_mib']:.0f} |")
    summary = []
    for size in sorted({r["size"] for r in rows_out}):
        by = {r["method"]: r for r in rows_out if r["size"] == size}
        if "+Ours" in by and "B" in by:
            text = (f"size {size:,}: +Ours/B step-time ratio {by['+Ours']['median_ms'] / by['B']['median_ms']:.3f}")
            for name, r in by.items():
                if name.startswith("+Ours:"):
                    text += f"; {name}/B {r['median_ms'] / by['B']['median_ms']:.3f}"
            if "B-fused" in by:
                text += (f"; +Ours/B-fused ratio {by['+Ours']['median_ms'] / by['B-fused']['median_ms']:.3f}"
                         f"; B/B-fused ratio {by['B']['median_ms'] / by['B-fused']['median_ms']:.3f}")
            text += (f"; extra peak RSS of +Ours over B {by['+Ours']['rss_peak_mib'] - by['B']['rss_peak_mib']:.0f} MiB"
                     f" (process), {by['+Ours']['rss_extra_mib'] - by['B']['rss_extra_mib']:.0f} MiB (training)")
            summary.append(text)
    print("\n".join(lines))
    print("\n".join(summary))
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "commit": commit,
                "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
                "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
                "mem_runs": args.mem_runs,
                "loss": args.loss, "threads": args.threads or "default"}
        (RESULTS / "barrier_overhead.json").write_text(json.dumps({"meta": meta, "runs": rows_out, "summary": summary},
                                                                  indent=1) + "\n")
        (RESULTS / "barrier_overhead.md").write_text(
            "# barrier_overhead\n\n" + f"`{meta['command']}` at {commit[:10]}, {meta['cpus']} CPUs, load "
            f"{meta['loadavg'][0]:.1f}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
