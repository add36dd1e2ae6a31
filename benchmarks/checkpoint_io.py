"""Save and load time, throughput and memory of the FULL train state (issue 11, section 7), 1 and 2 processes.

The state is what ``recsys-transfer train`` checkpoints: :class:`recsys_transfer.train.state.TrainState` (model,
dense Adam state, row-optimizer state with the applied barrier's ``transfer_`` copies, the adversarial
discriminators of all 26 tables, loop position, per-rank RNG) written by
:meth:`recsys_transfer.train.checkpoint.CheckpointDir.save` (DCP files, fsync, then rank 0's CRC-32 manifest pass,
rename, pruning to ``keep``), read back by :meth:`TrainState.load`. Model: the Criteo-shaped DeepFM of
``barrier_overhead.py`` (26 sparse fields, dim 16, MLP 400-400-400, 13 dense), +Ours with the adversarial loss on
all 26 fields, rows by ``--row-optimizer`` (row-wise Adagrad), two training steps (batch 4096, Zipf ids) so every
optimizer state exists. Sizes: every table 1e5 rows; then one table 1e7 rows (the rest 1e5). Worlds: 1 process
(the model unsharded, as ``train`` runs it) and 2 processes (torchrun, gloo, every table ``row_wise``).

Per configuration, one process group does one untimed warm-up save, then ``--repeats`` (3) rounds; each round:

* ``save``: ``state_dict()`` + ``CheckpointDir.save`` (keep=1, so every timed save also prunes the previous
  checkpoint, as a long run does), the slowest rank's wall time; its parts: the ``state_dict()`` build, DCP's
  ``save`` (serialisation and fsync) and the CRC manifest pass (rank 0 reads every rank's files after the barrier);
* ``load``: ``TrainState.load`` of that checkpoint with its files in the page cache (just written), then again
  after evicting them from the page cache (``posix_fadvise(DONTNEED)``, so the bytes come from the disk);
* the peer (1 process only): ``torch.save`` of the same tensors (the state dict's tensors, pickled values as
  they are) to a new file + fsync, the previous file then removed, and ``torch.load`` of it, page cache and
  evicted; interleaved with ours (the two saves take turns going first, each load follows ours).

Memory: per rank, the peak RSS during the save (or load) minus the RSS just before it (VmHWM reset through
``/proc/self/clear_refs``). Medians of the rounds are reported.

``--settle`` (3 s): every timed save and load starts after that many seconds of idle. On the VM these numbers
were taken on (virtio-balloon with free page reporting, most likely the reason), memory freed and left idle for
~2 s goes back to the host, and faulting it in again costs over 1 s of system time per GiB; an operation that
right follows a big free (e.g. a save after a load) reuses still-backed pages and runs 2-3x faster. Without a
settle the order of the operations decided which one was fast. A training run saves after seconds of training,
so the settled numbers are the representative ones.

Results go to ``benchmarks/results/checkpoint_io.{json,md}``.

Reading the memory column: our tables are views of one flat buffer per width (``recsys_transfer.flat``), and DCP
clones a view before serialising it; torch 2.13's ``FileSystemWriter`` also keeps every tensor it has written
until the rank's file is complete (``_write_files_from_queue``'s ``tensor_dict``, used only for safetensors;
pytorch issue 195982), so a save holds a second copy of about all table bytes of the rank. ``torch.save`` writes
the flat buffer's storage once, without copies.

    python benchmarks/checkpoint_io.py                          # both sizes, 1 and 2 processes, 3 rounds
    python benchmarks/checkpoint_io.py --sizes 100000 --worlds 1 --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MIB = 2 ** 20

sys.path.insert(0, str(Path(__file__).parent))
from barrier_overhead import rss_mib  # noqa: E402  (VmRSS / VmHWM of /proc/self/status in MiB)


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def evict(path: Path) -> None:
    """Drop the files under ``path`` from the page cache (they are clean: DCP and the manifest fsync them)."""
    for f in sorted(path.iterdir() if path.is_dir() else [path]):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path.iterdir() if path.is_dir() else [path]) if f.is_file())


class Timers:
    """Wall time spent in the CRC-32 manifest pass and in DCP's ``save`` (wrappers installed around the functions
    ``CheckpointDir.save`` calls; what they do is unchanged)."""

    def __init__(self) -> None:
        import torch.distributed.checkpoint as dcp

        import recsys_transfer.train.checkpoint as ckpt

        self.crc = self.dcp = 0.0
        ckpt._crc32, dcp.save = self._timed(ckpt._crc32, "crc"), self._timed(dcp.save, "dcp")

    def _timed(self, fn, total: str):
        """``fn``, adding its wall time to ``self.<total>``."""

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, total, getattr(self, total) + time.perf_counter() - t0)

        return wrapper

    def reset(self) -> None:
        self.crc = self.dcp = 0.0


def build_state(big: int | None, rows: int, row_optimizer: str, train_steps: int, batch: int, rank: int,
                world: int):
    """The Criteo-shaped DeepFM +Ours of ``barrier_overhead.py``, trained ``train_steps`` steps, and its
    TrainState (sharded row-wise over ``world`` processes)."""
    import numpy as np
    import torch

    from barrier_overhead import DIM, MLP_HIDDEN, make_batches, make_meta

    from recsys_transfer.config import RowsConfig, TrainConfig, TransferConfig
    from recsys_transfer.models.deepfm import DeepFM
    from recsys_transfer.train.compose import compose_step
    from recsys_transfer.train.distributed import shard_model
    from recsys_transfer.train.loop import FitResult
    from recsys_transfer.train.state import TrainState

    meta = make_meta(big, rows)
    torch.manual_seed(0)
    model = DeepFM(meta, embedding_dim=DIM, hidden=MLP_HIDDEN)
    if world > 1:
        model = shard_model(model, torch.device("cpu"), sharding_type="row_wise")
    rng = np.random.default_rng(1)
    domains = {f.name: f.tail_mask() & (rng.random(f.vocab_size) >= 0.2) for f in meta.sparse}  # T'_eta
    step = compose_step(model, meta, rows=RowsConfig(optimizer=row_optimizer, lr=0.01),
                        transfer=TransferConfig(mode="+Ours", loss="adversarial", fields=tuple(meta.sparse_names)),
                        domains=domains, train=TrainConfig(optimizer="adam", lr=1e-3))
    for b in make_batches(meta, batch, train_steps, seed=rank):
        step(b)
    loop = FitResult()
    loop.global_step = train_steps
    state = TrainState(model, step, None, loop, meta={"run_id": "bench", "config": {}}, rank=rank, world_size=world)
    return state


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from recsys_transfer.train.checkpoint import CheckpointDir
    from recsys_transfer.train.distributed import exit_rank, init_distributed
    from recsys_transfer.train.state import _local

    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    t0 = time.perf_counter()
    state = build_state(args.big or None, args.rows, args.row_optimizer, args.train_steps, args.batch, rank, world)
    setup_s = time.perf_counter() - t0
    timers = Timers()
    store = CheckpointDir(args.dir / "checkpoints", keep=1)
    peers = [args.dir / "peer.pt"]

    def settle() -> None:
        """Every timed operation meets the machine in the same state (module docstring: ``--settle``)."""
        time.sleep(args.settle)

    def save(step: int) -> dict:
        settle()
        barrier()
        timers.reset()
        rss0 = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        sd = state.state_dict()
        t1 = time.perf_counter()
        path = store.save(sd, step, {"run_id": "bench", "global_step": step})
        t2 = time.perf_counter()
        return {"path": path, "sd": sd, "save_s": t2 - t0, "state_dict_s": t1 - t0, "dcp_s": timers.dcp,
                "crc_s": timers.crc, "extra_mib": rss_mib("VmHWM") - rss0}

    def load(path: Path, cold: bool) -> dict:
        settle()
        barrier()
        if cold and rank == 0:
            evict(path)
        barrier()
        rss0 = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        state.load(path)
        t1 = time.perf_counter()
        barrier()
        return {"s": t1 - t0, "extra_mib": rss_mib("VmHWM") - rss0}

    def peer_save(sd: dict, step: int) -> dict:
        """A new file, then the previous one removed (as CheckpointDir writes a new directory and prunes)."""
        tensors = {k: (_local(v) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
        path = args.dir / f"peer-{step}.pt"
        settle()
        rss0 = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        with path.open("wb") as fh:
            torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())
        peers[0].unlink(missing_ok=True)
        peers[0] = path
        return {"save_s": time.perf_counter() - t0, "extra_mib": rss_mib("VmHWM") - rss0, "bytes": disk_bytes(path)}

    def peer_load(cold: bool) -> dict:
        if cold:
            evict(peers[0])
        settle()
        rss0 = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        loaded = torch.load(peers[0], weights_only=False)
        dt = time.perf_counter() - t0
        extra = rss_mib("VmHWM") - rss0
        del loaded
        return {"s": dt, "extra_mib": extra}

    first = save(1)
    rounds = []
    for r in range(args.repeats):
        peer_first = world == 1 and r % 2 == 1  # ours and the peer take turns going first
        row = {}
        if peer_first:
            row["peer_save"] = peer_save(state.state_dict(), 2 + r)
        s = save(2 + r)
        row.update({k: v for k, v in s.items() if k not in ("path", "sd")})
        row["bytes"] = disk_bytes(s["path"]) if rank == 0 else 0
        row["rank_bytes"] = (s["path"] / f"__{rank}_0.distcp").stat().st_size
        if world == 1 and not peer_first:
            row["peer_save"] = peer_save(s["sd"], 2 + r)
        row["load_warm"] = load(s["path"], cold=False)
        if world == 1:
            row["peer_load_warm"] = peer_load(cold=False)
        row["load_cold"] = load(s["path"], cold=True)
        if world == 1:
            row["peer_load_cold"] = peer_load(cold=True)
        del s
        rounds.append(row)
    mine = {"rank": rank, "setup_s": setup_s, "first_save_s": first["save_s"], "rounds": rounds,
            "rss_mib": rss_mib()}
    del first
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    if world > 1:
        exit_rank(0)


def summarize(size: int, world: int, ranks: list[dict]) -> dict:
    """One configuration's row: per round the slowest rank's times (rank 0's CRC pass, bytes on disk), then the
    median over rounds; memory per rank (median over rounds)."""
    med = statistics.median
    n = len(ranks[0]["rounds"])

    def slowest(get) -> float:
        return med(max(get(r["rounds"][i]) for r in ranks) for i in range(n))

    out = {"size": size, "ranks": world, "rounds": n,
           "bytes": ranks[0]["rounds"][0]["bytes"],
           "save_s": slowest(lambda x: x["save_s"]),
           "first_save_s": max(r["first_save_s"] for r in ranks),
           "state_dict_s": slowest(lambda x: x["state_dict_s"]),
           "dcp_s": slowest(lambda x: x["dcp_s"]),
           "crc_s": med(x["crc_s"] for x in ranks[0]["rounds"]),
           "load_warm_s": slowest(lambda x: x["load_warm"]["s"]),
           "load_cold_s": slowest(lambda x: x["load_cold"]["s"]),
           "rank_mib": [r["rounds"][0]["rank_bytes"] / MIB for r in ranks],
           "save_extra_mib": [med(x["extra_mib"] for x in r["rounds"]) for r in ranks],
           "load_extra_mib": [med(max(x["load_warm"]["extra_mib"], x["load_cold"]["extra_mib"]) for x in r["rounds"])
                              for r in ranks],
           "save_s_runs": [round(max(r["rounds"][i]["save_s"] for r in ranks), 3) for i in range(n)],
           "setup_s": max(r["setup_s"] for r in ranks)}
    out["crc_share"] = out["crc_s"] / out["save_s"]
    out["save_mib_s"] = out["bytes"] / MIB / out["save_s"]
    out["load_warm_mib_s"] = out["bytes"] / MIB / out["load_warm_s"]
    out["load_cold_mib_s"] = out["bytes"] / MIB / out["load_cold_s"]
    if "peer_save" in ranks[0]["rounds"][0]:
        rs = ranks[0]["rounds"]
        peer = {"bytes": rs[0]["peer_save"]["bytes"], "save_s": med(x["peer_save"]["save_s"] for x in rs),
                "load_warm_s": med(x["peer_load_warm"]["s"] for x in rs),
                "load_cold_s": med(x["peer_load_cold"]["s"] for x in rs),
                "save_extra_mib": [med(x["peer_save"]["extra_mib"] for x in rs)],
                "load_extra_mib": [med(max(x["peer_load_warm"]["extra_mib"], x["peer_load_cold"]["extra_mib"])
                                       for x in rs)]}
        peer["save_s_runs"] = [round(x["peer_save"]["save_s"], 3) for x in rs]
        peer["save_mib_s"] = peer["bytes"] / MIB / peer["save_s"]
        peer["load_warm_mib_s"] = peer["bytes"] / MIB / peer["load_warm_s"]
        peer["load_cold_mib_s"] = peer["bytes"] / MIB / peer["load_cold_s"]
        out["peer"] = peer
    return out


def _mem(values: list[float]) -> str:
    return " / ".join(str(round(v)) for v in values)


def table(results: list[dict]) -> list[str]:
    lines = ["| table rows | ranks | what | on disk MiB (per rank) | save s | save MiB/s | "
             "CRC pass s (share of save) | "
             "load s (page cache) | load s (evicted) | load MiB/s (evicted) | extra RSS in save MiB per rank | "
             "extra RSS in load MiB per rank |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        per_rank = f" ({_mem(r['rank_mib'])})" if r["ranks"] > 1 else ""
        lines.append(f"| {r['size']:,} | {r['ranks']} | TrainState + CheckpointDir | "
                     f"{r['bytes'] / MIB:.0f}{per_rank} | "
                     f"{r['save_s']:.2f} | {r['save_mib_s']:.0f} | {r['crc_s']:.2f} ({100 * r['crc_share']:.0f}%) | "
                     f"{r['load_warm_s']:.2f} | {r['load_cold_s']:.2f} | {r['load_cold_mib_s']:.0f} | "
                     f"{_mem(r['save_extra_mib'])} | {_mem(r['load_extra_mib'])} |")
        if "peer" in r:
            p = r["peer"]
            lines.append(f"| {r['size']:,} | {r['ranks']} | peer: torch.save + fsync / torch.load | "
                         f"{p['bytes'] / MIB:.0f} | {p['save_s']:.2f} | {p['save_mib_s']:.0f} | - | "
                         f"{p['load_warm_s']:.2f} | {p['load_cold_s']:.2f} | {p['load_cold_mib_s']:.0f} | "
                         f"{_mem(p['save_extra_mib'])} | {_mem(p['load_extra_mib'])} |")
    return lines


def notes(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        text = (f"size {r['size']:,}, {r['ranks']} rank(s): save {r['save_s']:.2f} s = state_dict "
                f"{r['state_dict_s']:.3f} + DCP save {r['dcp_s']:.2f} + CRC pass {r['crc_s']:.2f} + rest "
                f"{r['save_s'] - r['state_dict_s'] - r['dcp_s'] - r['crc_s']:.2f} (barriers, rename, pruning); "
                f"rounds {r['save_s_runs']} s; first (warm-up) save {r['first_save_s']:.2f} s")
        if "peer" in r:
            p = r["peer"]
            text += (f"; torch.save rounds {p['save_s_runs']} s; ours / torch.save: save {r['save_s'] / p['save_s']:.2f}x (without the CRC pass "
                     f"{(r['save_s'] - r['crc_s']) / p['save_s']:.2f}x), load "
                     f"{r['load_cold_s'] / p['load_cold_s']:.2f}x"
                     f" evicted, {r['load_warm_s'] / p['load_warm_s']:.2f}x page cache")
        out.append(text)
    by = {(r["size"], r["ranks"]): r for r in results}
    for size in sorted({r["size"] for r in results}):
        if (size, 1) in by and (size, 2) in by:
            a, b = by[(size, 1)], by[(size, 2)]
            out.append(f"size {size:,}: 2 ranks / 1 rank: save {b['save_s'] / a['save_s']:.2f}x, load (evicted) "
                       f"{b['load_cold_s'] / a['load_cold_s']:.2f}x (2 ranks on 2 shared cores, one disk)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,10000000",
                   help="comma list: 1e5 = every table 1e5 rows; larger = one table of that many rows")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--worlds", default="1,2", help="process counts (2: torchrun, gloo, row_wise)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row-optimizer", default="rowwise_adagrad", choices=("rowwise_adagrad", "adam", "sgd",
                                                                          "momentum"))
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of idle before every timed save and load (module docstring)")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a new one in $TMPDIR)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--big", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="checkpoint_io_"))
    results = []
    t_all = time.perf_counter()
    try:
        for size in [int(float(s)) for s in args.sizes.split(",")]:
            for world in [int(w) for w in args.worlds.split(",")]:
                run_dir = scratch / f"size{size}_world{world}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                cmd = [__file__, "--worker", "--big", str(size if size != args.rows else 0), "--rows", str(args.rows),
                       "--repeats", str(args.repeats), "--settle", str(args.settle), "--row-optimizer",
                       args.row_optimizer, "--train-steps", str(args.train_steps), "--batch", str(args.batch),
                       "--dir", str(run_dir)]
                if world > 1:
                    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *cmd]
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    print(r.stdout[-2000:], r.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"worker for size {size}, {world} rank(s) failed")
                res = summarize(size, world, json.loads(line[0][7:]))
                res["wall_s"] = time.perf_counter() - t0
                results.append(res)
                shutil.rmtree(run_dir, ignore_errors=True)
                print(f"  size {size:>10,}  ranks {world}  {res['bytes'] / MIB:7.0f} MiB  save {res['save_s']:6.2f} s "
                      f"({res['save_mib_s']:5.0f} MiB/s, CRC {100 * res['crc_share']:.0f}%)  load "
                      f"{res['load_warm_s']:6.2f}"
                      f" / {res['load_cold_s']:6.2f} s  extra RSS {_mem(res['save_extra_mib'])} MiB  "
                      f"[{res['wall_s']:.0f} s]", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    lines, summary = table(results), notes(results)
    print("\n".join(lines))
    print("\n".join(summary))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if not args.no_record:
        RESULTS.mkdir(exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        import torch

        meta = {"command": " ".join(["python benchmarks/checkpoint_io.py"] + sys.argv[1:]), "commit": commit,
                "machine": f"shared {os.cpu_count()}-core CPU box (other jobs running), no GPU",
                "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
                "torch": torch.__version__, "row_optimizer": args.row_optimizer, "repeats": args.repeats,
                "train_steps": args.train_steps, "batch": args.batch, "settle_s": args.settle,
                "omp_threads": env["OMP_NUM_THREADS"]}
        (RESULTS / "checkpoint_io.json").write_text(json.dumps({"meta": meta, "runs": results, "summary": summary},
                                                               indent=1) + "\n")
        (RESULTS / "checkpoint_io.md").write_text(
            "# checkpoint_io\n\n"
            f"`{meta['command']}` at {commit[:10]}; {meta['machine']}, load {meta['loadavg'][0]:.1f}; torch "
            f"{meta['torch']}, OMP_NUM_THREADS={meta['omp_threads']}; rows: {args.row_optimizer}; median of "
            f"{args.repeats} rounds after one warm-up save, each save and load after {args.settle:g} s idle (see "
            "the script's docstring); times are the slowest rank's; MiB = 2^20 bytes.\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
