"""torchrun / DistributedModelParallel glue.

``init_distributed()`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group:
nccl on CUDA, gloo on CPU. ``shard_model()`` wraps a model in TorchRec's DistributedModelParallel with a
planner-produced plan: the per-table policy of a :class:`~recsys_transfer.config.ShardingConfig`
(:mod:`recsys_transfer.train.sharding`), or one sharding type for every table when asked, so that tests and
benchmarks can pin the layout. Always call ``shutdown()`` before the process exits (gloo ranks abort at
teardown otherwise), and end a rank of a torchrun job with ``exit_rank(code)``.

Why ``exit_rank``: even after ``destroy_process_group()``, objects that TorchRec's sharded modules still hold
(process-group handles, gloo work objects with their C++ threads) are destroyed during interpreter
finalization; in a small fraction of runs a gloo thread is still joinable then and the rank dies with
``terminate called without an active exception`` (SIGABRT) after all its work is done, which torchrun reports as
a failed job (seen once in CI on a 2-rank gloo run; not reproduced in 40 local runs). ``exit_rank`` flushes Python's streams and
logging and leaves with ``os._exit``, skipping that finalization; files must be closed before it is called.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from recsys_transfer.config import ShardingConfig
from recsys_transfer.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` (the local rank's GPU when CUDA is available, else the CPU), ``cpu``, ``cuda``
    (the local rank's GPU; a :class:`UserError` when there is none) or ``cuda:N``."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"train.device={name}: CUDA is not available here (torch {torch.__version__}, built for "
                        f"CUDA {torch.version.cuda}); use train.device=cpu or auto")
    device = torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    if device.index >= torch.cuda.device_count():
        raise UserError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group from torchrun's environment (nccl on a GPU, gloo on the CPU); a plain run is rank 0
    of 1 (no group). ``device``: as :func:`resolve_device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        store = _attempt_store(rank, world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def _attempt_store(rank: int, world: int):
    """Under torchrun, the rendezvous store seen through a prefix unique to this restart attempt
    (``TORCHELASTIC_RESTART_COUNT``), or None outside torchrun.

    torchrun keeps its store across the restarts of ``--max-restarts``; without a prefix the restarted workers
    find the keys of the dead attempt's process groups (the gloo addresses of the killed processes) and either
    connect to a dead address ("Connection refused") or wait forever in ``new_group`` (both seen here in 1 of 2
    restarts). Every group of this attempt (the default one and :func:`control_group`) lives under the prefix."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if attempt is None or not host or not port:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
    store = dist.TCPStore(host, int(port), world_size=world, is_master=not agent_store and rank == 0,
                          timeout=timedelta(minutes=30), multi_tenant=True)
    return dist.PrefixStore(f"/recsys_transfer/attempt_{attempt}", store)


_CONTROL: list = []  # the gloo group for control messages (created on first use)
CONTROL_TIMEOUT = timedelta(hours=12)  # rank 0 may prepare a full Criteo day while the others wait


def control_group():
    """A gloo group with a long timeout for control messages between ranks (who failed, and why), so ranks can
    wait for rank 0's data preparation without tripping the training group's collective timeout."""
    if not _CONTROL:
        _CONTROL.append(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    return _CONTROL[0]


def run_on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its (picklable) result once it is done. If it fails, every
    rank raises: rank 0 its own exception, the others a :class:`UserError` naming rank 0's error (so no rank waits
    forever and each reports one line). Without a process group: just ``fn()``."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    group = control_group()
    result, error, failure = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
            failure = exc
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    message = [error, result]
    dist.broadcast_object_list(message, src=0, group=group)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise UserError(f"rank 0 failed: {message[0]}")
    return message[1]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CONTROL.clear()


def exit_rank(code: int = 0) -> NoReturn:
    """End this process now with ``code``, after ``shutdown()`` and a flush, skipping interpreter finalization
    (see the module docstring for the gloo teardown abort this avoids). Use only in a process's entry point."""
    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def shard_model(model: nn.Module, device: torch.device, sharding_type: str | None = None,
                compute_kernel: str = "fused", fused_params: dict | None = None, *,
                sharding: ShardingConfig | None = None, batch_size: int | None = None,
                data_parallel: bool = True) -> nn.Module:
    """Wrap ``model`` in DistributedModelParallel with a planner-produced plan (:mod:`recsys_transfer.train.sharding`).

    ``sharding``: the run's :class:`~recsys_transfer.config.ShardingConfig` (per-table overrides, the size policy,
    memory budgets; default ``ShardingConfig()``), with ``compute_kernel`` as its default kernel when not given;
    ``batch_size``: the per-rank batch the planner's estimates assume unless ``sharding.batch_size`` is set. Or
    ``sharding_type``: one type for every table, so that tests and benchmarks can pin the layout (``table_wise``,
    ``row_wise``, ..., or any TorchRec type when the row pipeline is not attached: it is not checked against
    :data:`recsys_transfer.config.ROW_PIPELINE_SHARDINGS` here, but :func:`recsys_transfer.rows.lookup.attach_rows`
    refuses the others on every rank). ``fused_params`` go to the sharders (e.g. the fused optimizer of plain TorchRec training); with
    the row pipeline the lookup kernel is replaced after sharding and the fused optimizer is not used. The model's
    own initial weights are kept (:func:`copy_into_shards`).

    ``data_parallel``: wrap the dense (unsharded) part in DDP, TorchRec's default, whose gradient hooks average
    the dense gradients of ONE backward per forward. False: no DDP -- the dense parameters are replicated
    (broadcast from rank 0 once, :func:`_replicated_dense`) and the training step averages their gradients itself
    (:class:`recsys_transfer.train.step.TrainStep`): needed for one backward per task (gradient surgery,
    ``rows.per_task``), which DDP cannot serve (module docstring of :mod:`recsys_transfer.train.step`).
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel

    from recsys_transfer.train import sharding as plans

    if sharding is not None and sharding_type is not None:
        raise ValueError("shard_model: pass sharding_type or sharding, not both")
    tables = plans.model_tables(model)
    sharders = plans.sharders(fused_params)
    if sharding_type is not None:
        config = ShardingConfig()
        choices = plans.uniform_choices(tables, sharding_type, compute_kernel)
    else:
        config = sharding if sharding is not None else ShardingConfig(compute_kernel=compute_kernel)
        choices = plans.choose(config, tables)
    plans.check_choices(tables, choices, device.type, sharders, row_pipeline=sharding_type is None)
    # rank 0 plans; every rank gets the plan, or rank 0's error (TorchRec's collective_plan leaves the others waiting)
    plan = run_on_rank0(lambda: plans.plan_sharding(model, device.type, choices, sharders, config,
                                                    batch_size=batch_size))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapper = None if data_parallel else _replicated_dense()
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders, data_parallel_wrapper=wrapper)
    copy_into_shards(dmp, init)
    return dmp


def _replicated_dense():
    """A :class:`torchrec.distributed.model_parallel.DataParallelWrapper` without DDP (``shard_model(...,
    data_parallel=False)``)."""
    from torchrec.distributed.model_parallel import DataParallelWrapper

    class ReplicatedDense(DataParallelWrapper):
        """DistributedModelParallel's data-parallel wrapper that does NOT wrap the dense part in DDP: its parameters
        and buffers are broadcast from rank 0 once (as DDP's constructor does) and stay plain modules; whoever
        trains them averages their gradients over the ranks (:class:`recsys_transfer.train.step.TrainStep`)."""

        @torch.no_grad()
        def wrap(self, dmp, env, device) -> None:
            from torchrec.distributed.types import ShardedModule

            module = dmp._dmp_wrapped_module
            if env.world_size == 1:
                return
            sharded = [n for n, m in module.named_modules() if isinstance(m, ShardedModule)]
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                if any(name.startswith(s + ".") for s in sharded) or not isinstance(t, torch.Tensor):
                    continue
                dist.broadcast(t.data, src=0, group=env.process_group)

    return ReplicatedDense()


@torch.no_grad()
def copy_into_shards(dmp: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Write a full (unsharded) state dict into a DMP model: each rank copies the slices of its local shards.

    DistributedModelParallel re-initializes sharded tables from the table configs; this keeps the model's own
    initialization, so a sharded run starts exactly where the single-process run does.
    """
    for key, value in dmp.state_dict().items():
        src = full_state[key]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(src[tuple(slice(o, o + n) for o, n in zip(off, size))])
        else:
            value.copy_(src)
