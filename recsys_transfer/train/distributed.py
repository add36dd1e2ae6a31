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
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start the process group from torchrun's environment; a plain run is rank 0 of 1 (no group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def shard_model(model: nn.Module, device: torch.device, sharding_type: str | None = None,
                compute_kernel: str = "fused", fused_params: dict | None = None) -> nn.Module:
    """Wrap ``model`` in DistributedModelParallel.

    ``sharding_type``: None (planner's choice), ``table_wise``, ``row_wise`` (every table gets that type).
    ``compute_kernel``: ``fused`` (TorchRec's fused TBE) or ``dense``. ``fused_params`` go to the sharder (e.g. the
    fused optimizer of plain TorchRec training); with the transfer plug-in the lookup kernel is replaced after
    sharding and the fused optimizer is not used.
    """
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    world = dist.get_world_size() if dist.is_initialized() else 1
    constraints = {}
    for module in model.modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            configs = (module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection)
                       else module.embedding_configs())
            for cfg in configs:
                constraints[cfg.name] = ParameterConstraints(
                    sharding_types=[sharding_type] if sharding_type else None,
                    # fbgemm's fused TBE needs dims divisible by 4; narrower tables (e.g. FM's 1-wide first-order
                    # weights) use the dense kernel
                    compute_kernels=[compute_kernel if cfg.embedding_dim % 4 == 0 else "dense"],
                )
    sharders = [_sharder_cls()(fused_params=fused_params), EmbeddingCollectionSharder(fused_params=fused_params)]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type),
        constraints=constraints,
    )
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
