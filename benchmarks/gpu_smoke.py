"""GPU smoke test (one command, a few minutes on one GPU): DeepFM trained with +Ours on synthetic long-tail data on
the GPU, step time against TorchRec's fused-TBE B, and the barrier invariant checked on the GPU.

    python benchmarks/gpu_smoke.py                      # on a machine with a CUDA device; records the result
    python benchmarks/gpu_smoke.py --device cpu --rows 20000 --steps 3 --no-record   # the same logic on the CPU

What it does, on ``--device`` (default ``cuda``; on a machine without CUDA it prints one line and exits 0):

1. prepares ``--rows`` synthetic long-tail rows (``recsys_transfer.data.synthetic``: 4 sparse fields, dense fields,
   rare items that resemble frequent ones plus planted orphans) and the selective target domain of ``item`` and
   ``user``;
2. builds three DeepFM (dim 16, MLP 400-400-400) training steps on the device, all with row-wise Adagrad on the
   tables and Adam on the dense part: ``B`` and ``+Ours`` (adversarial loss on ``item`` and ``user``) through the
   trainer's step (:func:`recsys_transfer.train.compose.compose_step`), and ``B-fused``, TorchRec's own path
   (DistributedModelParallel with 1 rank, fbgemm's fused TBE with its fused EXACT_ROWWISE_ADAGRAD);
3. times ``--steps`` steps of each, interleaved (median, after ``--warmup``), on the same batches of ``--batch``
   rows, synchronizing the device around each step;
4. checks, for every touched row of every +Ours step, the barrier's constraint on the tensors the GPU computed, and
   counts the rows where it binds: for the default barrier on the applied update, ``<g_i, delta_i> >= phi_i`` with
   ``phi_i = alpha <g_i, u_i> min(1, l_main / ||g_i||^2)`` (``<g_i, u_i>`` where that is <= 0), ``u_i`` mode B's
   update and ``delta_i`` the update applied; for ``transfer.barrier: paper``, Algorithm 1's ``<g_i, mu_i> >= phi_i``;
5. trains one epoch of B and +Ours and reports their test AUC (same batches, same init);
6. saves the trained +Ours run's full train state (:class:`recsys_transfer.train.state.TrainState`: model, dense
   and row optimizer state, discriminators, RNG) from the device, loads it into a fresh +Ours step built from
   another seed, trains ``--resume-steps`` more steps with both on the same batches and checks that every model
   tensor is bitwise equal (a save + resume on the GPU); reports save / load seconds;
7. writes ``benchmarks/results/gpu_smoke.{json,md}`` (unless ``--no-record``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIELDS = ("item", "user")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_group(device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def check_resume(model, step, meta, domains, device, args, batches, root: Path) -> dict:
    """Save ``step``'s train state, load it into a fresh +Ours step (another seed), train both on the same batches
    and compare every model tensor bitwise (the run's step 6)."""
    import torch

    from recsys_transfer.train.checkpoint import CheckpointDir
    from recsys_transfer.train.loop import FitResult
    from recsys_transfer.train.state import TrainState

    store = CheckpointDir(root)
    state = TrainState(model, step, None, FitResult(), meta={"run_id": "gpu_smoke"})
    _sync(device)
    s0 = time.perf_counter()
    store.save(state.state_dict(), 1, {"run_id": "gpu_smoke", "config": {}})
    save_s = time.perf_counter() - s0
    model2, step2 = build_steps(meta, domains, device, args.seed + 1, names=("+Ours",))["+Ours"]
    s0 = time.perf_counter()
    TrainState(model2, step2, None, FitResult(), meta={}).load(store.latest())
    _sync(device)
    load_s = time.perf_counter() - s0
    for k in range(args.resume_steps):
        for s in (step, step2):
            s(batches[k % len(batches)])
    _sync(device)
    a, b = model.state_dict(), model2.state_dict()
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"save_seconds": save_s, "load_seconds": load_s, "steps": args.resume_steps, "tensors": len(a),
            "bitwise_equal": bool(equal)}


def build_steps(meta, domains, device, seed: int, names=("B", "+Ours", "B-fused")):
    """(name -> (model, step)) for B, +Ours and B-fused, every model from the same initial weights."""
    import torch
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.models.deepfm import DeepFM
    from recsys_transfer.objectives import Objective
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.distributed import shard_model
    from recsys_transfer.train.step import TrainStep, dense_optimizer

    dense = TrainConfig(optimizer="adam", lr=1e-3)
    rows = RowsConfig(optimizer="rowwise_adagrad", lr=0.01)
    steps = {}
    for name in names:
        torch.manual_seed(seed)
        model = DeepFM(meta, embedding_dim=16, hidden=(400, 400, 400))
        if name == "B-fused":
            _init_group(device)
            model = shard_model(model, device, sharding_type="table_wise",
                                fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01})
            params = [p for n, p in model.named_parameters() if "embedding_bags" not in n]
            step = TrainStep(model, Objective(meta.tasks), dense_optimizer(dense, params))
        else:
            model = model.to(device)
            mode = TransferConfig(mode=name, loss="adversarial", fields=FIELDS)
            step = compose_step(model, meta, rows=rows, transfer=mode, domains=domains, train=dense)
        steps[name] = (model, step)
    return steps


def check_barrier(records: list[tuple]) -> dict:
    """The barrier's constraint on every recorded row: ``(g, d, phi)`` per call, ``<g, d> >= phi``."""
    rows = binding = violations = 0
    worst = 0.0
    for g, d, phi in records:
        slack = (g * d).sum(1) - phi
        tol = 1e-4 * (1 + phi.abs())
        violations += int((slack < -tol).sum())
        binding += int((slack.abs() <= tol).sum())
        rows += len(g)
        worst = min(worst, float((slack / (1 + phi.abs())).min())) if len(g) else worst
    return {"rows_checked": rows, "violations": violations, "binding_rows": binding, "worst_relative_slack": worst}


def barrier_spies(barrier_module, records: list[tuple]) -> dict:
    """Wrappers of the two barriers that record ``(g, d, phi)`` (float64, on the device) for :func:`check_barrier`."""
    import torch

    paper, applied = barrier_module.barrier_direction, barrier_module.applied_barrier

    def paper_spy(g_main, g_transfer, main_loss, alpha):
        mu, lam = paper(g_main, g_transfer, main_loss, alpha)
        g = g_main.detach().double()
        a = alpha.detach().double() if isinstance(alpha, torch.Tensor) else float(alpha)
        gg = (g * g).sum(1)
        records.append((g, mu.detach().double(), a * torch.minimum(gg, torch.as_tensor(float(main_loss), dtype=gg.dtype,
                                                                                      device=gg.device))))
        return mu, lam

    def applied_spy(g_main, u, v, main_loss, alpha, max_ratio=None, workspace=None):
        delta, lam = applied(g_main, u, v, main_loss, alpha, max_ratio, workspace)
        g, u64 = g_main.detach().double(), u.detach().double()
        gg, ru = (g * g).sum(1), (g * u64).sum(1)
        cap = torch.clamp(float(main_loss) / gg.clamp_min(1e-300), max=1.0)
        records.append((g, delta.detach().double(), torch.where(ru > 0, alpha * ru * cap, ru)))
        return delta, lam

    return {"barrier_direction": paper_spy, "applied_barrier": applied_spy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume-steps", type=int, default=3, help="steps trained after the save + resume check")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing "
              "to measure on a CPU-only machine (run with --device cpu to exercise the script itself)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    from recsys_transfer.data.loader import BatchLoader
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec
    from recsys_transfer.data.synthetic import SyntheticConfig, prepare_synthetic
    from recsys_transfer.noise import quiet_library_noise
    from recsys_transfer.train.evaluate import evaluate
    from recsys_transfer.train.loop import train_epoch
    from recsys_transfer.transfer import barrier as barrier_module
    from recsys_transfer.transfer.domains import load_domains, select_command

    quiet_library_noise()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    meta = prepare_synthetic(SyntheticConfig(rows=args.rows, seed=args.seed), work / "data", split=SplitSpec(),
                             head_tail=HeadTailSpec(), progress=False)
    select_command(work / "data", list(FIELDS))
    domains = load_domains(work / "data" / "selection", FIELDS, meta)
    prepared_s = time.perf_counter() - t0
    print(f"prepared {args.rows:,} rows + selection in {prepared_s:.1f}s", flush=True)

    steps = build_steps(meta, domains, device, args.seed)
    loader = BatchLoader(work / "data", "train", args.batch, shuffle=True, seed=args.seed, meta=meta,
                         pin_memory=device.type == "cuda")
    batches = [b.to(device, non_blocking=True) for _, b in zip(range(8), loader)]
    records: list[tuple] = []
    originals = {name: getattr(barrier_module, name) for name in ("barrier_direction", "applied_barrier")}
    for name, spy in barrier_spies(barrier_module, records).items():
        setattr(barrier_module, name, spy)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for k in range(args.warmup + args.steps):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            batch = batches[k % len(batches)]
            _sync(device)
            s0 = time.perf_counter()
            steps[name][1](batch)
            _sync(device)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - s0)
    for name, fn in originals.items():
        setattr(barrier_module, name, fn)
    barrier = check_barrier(records)
    on_device = {str(g.device) for g, *_ in records}
    timing = {name: {"median_ms": statistics.median(v) * 1e3, "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))] * 1e3}
              for name, v in times.items()}
    print("step ms (median): " + ", ".join(f"{n} {t['median_ms']:.2f}" for n, t in timing.items()), flush=True)
    print(f"barrier invariant: {barrier}", flush=True)

    aucs = {}
    test = BatchLoader(work / "data", "test", 16384, meta=meta, pin_memory=device.type == "cuda")
    for name in ("B", "+Ours"):
        model, step = build_steps(meta, domains, device, args.seed, names=(name,))[name]
        loader.set_epoch(0)
        s0 = time.perf_counter()
        stats = train_epoch(step, loader, device=device)
        _sync(device)
        aucs[name] = {"test_auc": evaluate(model, test, meta.tasks, device=device)["label"]["auc"],
                      "epoch_seconds": time.perf_counter() - s0, "rows_per_s": stats.rows_per_s}
    print("one epoch: " + ", ".join(f"{n} AUC {a['test_auc']:.6f} ({a['rows_per_s']:,.0f} rows/s)"
                                    for n, a in aucs.items()), flush=True)
    resume = check_resume(model, step, meta, domains, device, args, batches, work / "checkpoints")
    print(f"save + resume on {device}: {resume}", flush=True)

    ratios = {"+Ours/B": timing["+Ours"]["median_ms"] / timing["B"]["median_ms"],
              "+Ours/B-fused": timing["+Ours"]["median_ms"] / timing["B-fused"]["median_ms"],
              "B/B-fused": timing["B"]["median_ms"] / timing["B-fused"]["median_ms"]}
    ok = (barrier["violations"] == 0 and barrier["rows_checked"] > 0 and on_device == {str(device)}
          and resume["bitwise_equal"])
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip(),
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor(), "torch": torch.__version__, "cuda": torch.version.cuda, "args": vars(args),
              "prepare_seconds": prepared_s, "timing": timing, "ratios": ratios, "barrier": barrier,
              "barrier_tensors_on": sorted(on_device), "one_epoch": aucs, "resume": resume, "ok": ok}
    print(f"ratios: {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())}; {'OK' if ok else 'FAILED'}")
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gpu_smoke.json").write_text(json.dumps(record, indent=1) + "\n")
        lines = [f"# gpu_smoke on {record['device_name']} ({device})", "", f"`{record['command']}` at "
                 f"{record['commit'][:10]}, torch {torch.__version__} (CUDA {torch.version.cuda})", "",
                 "| method | median step ms | p90 ms |", "|---|---:|---:|"]
        lines += [f"| {n} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} |" for n, t in timing.items()]
        lines += ["", *(f"- {k}: {v:.3f}" for k, v in ratios.items()),
                  f"- barrier invariant: {barrier['violations']} violations in {barrier['rows_checked']:,} rows "
                  f"({barrier['binding_rows']:,} binding), tensors on {sorted(on_device)}",
                  *(f"- one epoch {n}: test AUC {a['test_auc']:.4f}, {a['rows_per_s']:,.0f} rows/s"
                    for n, a in aucs.items()),
                  f"- save + resume of the +Ours train state on the device: save {resume['save_seconds']:.2f} s, "
                  f"load {resume['load_seconds']:.2f} s, {resume['tensors']} tensors bitwise equal after "
                  f"{resume['steps']} more steps: {resume['bitwise_equal']}"]
        (RESULTS / "gpu_smoke.md").write_text("\n".join(lines) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
