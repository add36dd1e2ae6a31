"""Model checkpoints (torch.distributed.checkpoint, so sharded tables are saved shard by shard) that name the run
which wrote them, so a run never loads or reports another run's model.

    save_model(model, run_dir / "best", run_id)
    load_model(model, run_dir / "best", run_id)      # UserError if best/ was written by another run (or is absent)
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
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


def load_pretrained(model: nn.Module, source: str | Path) -> dict:
    """Initialize ``model``'s parameters and buffers from another run's model checkpoint, by name: ``source`` is a
    run directory (its ``best/``) or a model checkpoint directory (DCP, as :func:`save_model` writes). Names both
    have are loaded (every rank its shards); names only the model has keep their values (new heads, patches);
    names only the checkpoint has are left out (a pretraining output layer). A name with another shape, or no
    name in common, is a :class:`UserError`. Returns ``{"path", "run_id", "loaded", "new", "unused"}`` (names)."""
    import torch.distributed.checkpoint as dcp

    path = Path(source)
    if (path / "best" / RUN_MARKER).is_file():
        path = path / "best"
    found = checkpoint_run_id(path)
    if found is None:
        raise UserError(f"model.init_from {source}: no complete model checkpoint there (a finished run's directory "
                        f"or its best/ directory)")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = model.state_dict()
    common = [k for k in state if k in saved]
    if not common:
        raise UserError(f"model.init_from {source}: the checkpoint shares no parameter name with this model "
                        f"(checkpoint: {sorted(saved)[:4]}...; model: {sorted(state)[:4]}...)")
    for k in common:
        want = tuple(getattr(saved[k], "size", ()))
        have = tuple(state[k].size()) if hasattr(state[k], "size") else ()
        if want != have:
            raise UserError(f"model.init_from {source}: {k} is {list(want)} in the checkpoint but {list(have)} in "
                            f"this model (another dataset's vocabulary or another width?)")
    subset = {k: state[k] for k in common}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(subset, checkpoint_id=str(path))
    state.update(subset)
    model.load_state_dict(state)
    return {"path": str(path), "run_id": found, "loaded": common, "new": [k for k in state if k not in saved],
            "unused": sorted(k for k in saved if k not in state)}


# -- train-state checkpoints ------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    crc = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class CheckpointDir:
    """The train-state checkpoints of one run: ``<run>/checkpoints/step-<global step>/`` (DCP files plus
    ``manifest.json``: every file's size and CRC-32, and the run's id, config, world size, position, versions).

    Atomic: a checkpoint is written to ``.step-<N>.tmp/`` and renamed into place by rank 0 only after every rank
    has written its files and the manifest is complete, so a kill during a save leaves the previous checkpoints as
    they were (a left-over ``.tmp`` is removed by the next save). The newest ``keep`` are kept. :meth:`latest`
    verifies the manifest and falls back to the previous checkpoint, with one line naming the damaged file."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints (renamed into place, with a manifest), newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-")
                 and (p / MANIFEST).is_file()]
        return sorted(found, key=self.step_of, reverse=True)

    @staticmethod
    def step_of(path: Path) -> int:
        return int(path.name.split("-")[1])

    def set_aside_newer(self, path: Path) -> list[Path]:
        """Rename every complete checkpoint newer than ``path`` (the one a run resumes from, after falling back from
        damaged newer ones) to ``damaged-step-N``: the resumed run writes those steps again, and they must neither
        be loaded nor count among the newest ``keep``. Returns the new names."""
        moved = []
        for p in self.complete():
            if self.step_of(p) > self.step_of(Path(path)):
                target = p.with_name(f"damaged-{p.name}")
                if target.exists():
                    shutil.rmtree(target)
                p.rename(target)
                moved.append(target)
        return moved

    @staticmethod
    def manifest(path: Path) -> dict:
        return json.loads((path / MANIFEST).read_text())

    def problem(self, path: Path) -> str | None:
        """What is wrong with checkpoint ``path`` (one line naming the file), or None when every file is there
        with its recorded size and CRC-32."""
        try:
            files = self.manifest(path)["files"]
        except (OSError, ValueError, KeyError) as exc:  # ValueError: not JSON
            return f"{path / MANIFEST}: unreadable manifest ({exc})"
        for name, (size, crc) in sorted(files.items()):
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            actual = f.stat().st_size
            if actual != size:
                return f"{f}: {actual} bytes, {size} when saved ({'truncated' if actual < size else 'changed'})"
            if _crc32(f) != crc:
                return f"{f}: CRC-32 differs from the one saved (corrupted)"
        return None

    def latest(self, warn=None) -> Path | None:
        """The newest checkpoint that verifies; each damaged newer one is reported through ``warn(line)``."""
        for path in self.complete():
            problem = self.problem(path)
            if problem is None:
                return path
            if warn is not None:
                warn(f"warning: {problem}; falling back to the previous checkpoint")
        return None

    def save(self, state: dict, step: int, manifest: dict) -> Path:
        """Write ``state`` (a DCP state dict, every rank its part) as checkpoint ``step``; a collective."""
        import torch.distributed.checkpoint as dcp

        final = self.root / f"step-{step:09d}"
        tmp = self.root / f".step-{step:09d}.tmp"
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for old in self.root.glob(".step-*.tmp"):
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), overwrite=True))
        _barrier()
        if _is_main():
            files = {f.name: [f.stat().st_size, _crc32(f)] for f in sorted(tmp.iterdir()) if f.is_file()}
            body = json.dumps({**manifest, "files": files}, indent=1, default=str) + "\n"
            with (tmp / MANIFEST).open("w") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            # prune only checkpoints older than this one: a newer one can only be a damaged checkpoint the run fell
            # back from (set aside by set_aside_newer at resume), never a reason to delete what was just written
            older = [p for p in self.complete() if self.step_of(p) < step]
            for old in older[self.keep - 1:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final
