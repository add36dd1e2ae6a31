"""Model checkpoints (torch.distributed.checkpoint, so sharded tables are saved shard by shard) that name the run
which wrote them, so a run never loads or reports another run's model.

    save_model(model, run_dir / "best", run_id)
    load_model(model, run_dir / "best", run_id)      # UserError if best/ was written by another run (or is absent)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch.distributed as dist
from torch import nn

from recsys_transfer.errors import UserError

RUN_MARKER = "RUN_ID"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_model(model: nn.Module, path: str | Path, run_id: str) -> None:
    """Every rank saves its part of ``model.state_dict()`` to ``path`` (DCP); rank 0 then marks it with ``run_id``."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if _is_main() and (path / RUN_MARKER).exists():
        (path / RUN_MARKER).unlink()  # half-written checkpoints are never marked
    _barrier()
    with warnings.catch_warnings():  # single-process runs: DCP notes it saves without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(str(path), overwrite=True))
    _barrier()
    if _is_main():
        (path / RUN_MARKER).write_text(run_id + "\n")
    _barrier()


def checkpoint_run_id(path: str | Path) -> str | None:
    marker = Path(path) / RUN_MARKER
    return marker.read_text().strip() if marker.is_file() else None


def load_model(model: nn.Module, path: str | Path, run_id: str | None = None) -> None:
    """Load ``path`` into ``model`` (every rank its shards). ``run_id``: refuse a checkpoint another run wrote."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    found = checkpoint_run_id(path)
    if found is None:
        raise UserError(f"{path}: no complete model checkpoint here")
    if run_id is not None and found != run_id:
        raise UserError(f"{path}: this checkpoint belongs to run {found}, not to run {run_id}")
    state = model.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state)
