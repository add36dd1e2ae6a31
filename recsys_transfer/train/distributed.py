"""torchrun / DistributedModelParallel glue.

``init_distributed()`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group:
nccl on CUDA, gloo on CPU. ``shard_model()`` wraps a model in TorchRec's DistributedModelParallel with a
planner-produced plan, constrained to one sharding type (``table_wise`` / ``row_wise``) when asked, so that
tests and benchmarks can pin the layout. Always call ``shutdown()`` before the process exits (gloo ranks abort at
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


def _sharder_cls():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType

    class Sharder(EmbeddingBagCollectionSharder):
        """TorchRec's EBC sharder, also offering row-wise sharding on CPU (TorchRec lists it for CUDA only;
        its CPU path — fbgemm block bucketization, gloo reduce-scatter — works and is tested here)."""

        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = list(super().sharding_types(compute_device_type))
            if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
                types.append(ShardingType.ROW_WISE.value)
            return types

    return Sharder


#: sharding types whose shards the row pipeline can update (whole rows of model-parallel tables)
ROW_PIPELINE_SHARDINGS = ("table_wise", "row_wise")


def shard_model(model: nn.Module, device: torch.device, sharding_type: str | None = None,
                compute_kernel: str = "fused", fused_params: dict | None = None) -> nn.Module:
    """Wrap ``model`` in DistributedModelParallel.

    ``sharding_type``: None (planner's choice among :data:`ROW_PIPELINE_SHARDINGS`), or one type for every table
    (``table_wise``, ``row_wise``, or any TorchRec type when the row pipeline is not attached).
    ``compute_kernel``: ``fused`` (TorchRec's fused TBE) or ``dense``. ``fused_params`` go to the sharder (e.g. the
    fused optimizer of plain TorchRec training); with the transfer plug-in the lookup kernel is replaced after
    sharding and the fused optimizer is not used.
    """
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import KernelConfig, ParameterConstraints, TopologyFactory, TrainerConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    world = dist.get_world_size() if dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    constraints = {}
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            configs = (module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection)
                       else module.embedding_configs())
            for cfg in configs:
                constraints[cfg.name] = ParameterConstraints(
                    # the row pipeline updates whole rows of model-parallel shards: not data-parallel (DDP)
                    # replicas, not column shards
                    sharding_types=[sharding_type] if sharding_type else list(ROW_PIPELINE_SHARDINGS),
                    # fbgemm's fused TBE needs dims divisible by 4; narrower tables (e.g. FM's 1-wide first-order
                    # weights) use the dense kernel
                    compute_kernels=[compute_kernel if cfg.embedding_dim % 4 == 0 else "dense"],
                )
    sharders = [_sharder_cls()(fused_params=fused_params), EmbeddingCollectionSharder(fused_params=fused_params)]
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=world, local_world_size=min(local, world)),
                                               kernel_config=KernelConfig(compute_device=device.type))
    # a fixed 15% reserve for the dense parts: TorchRec's default heuristic warns it over-estimates them
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                       storage_reservation=FixedPercentageStorageReservation(0.15))
    pg = dist.GroupMember.WORLD if dist.is_initialized() else None
    plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    copy_into_shards(dmp, init)
    return dmp


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
