"""Run directories that never mix two runs, and strict JSON records.

A run directory holds ``run.json`` (run id, status, config, command, versions, written first and updated at the
end), ``epochs.jsonl`` (one record per epoch), ``metrics.json`` (the final result, written last), ``best/`` (the
best model, marked with the run id: :mod:`recsys_transfer.train.checkpoint`), ``checkpoints/`` (the train states a
run resumes from) and ``tensorboard/`` (event files with ``log.tensorboard``: :mod:`recsys_transfer.train.scalars`).
:func:`open_run_dir` refuses a directory that holds another run's files unless ``overwrite`` (then only those files
are removed; anything else in the directory is left alone). Every record is strict JSON: NaN and infinities are
written as ``null`` (:func:`strict`), and ``status`` is ``running``, ``completed`` or ``failed`` (with the error).
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Any

from recsys_transfer.errors import UserError

PLAN_FILE = "plan.json"  # the sharding plan of a torchrun run (recsys_transfer.train.sharding.write_plan)
RUN_FILES = ("run.json", "metrics.json", "epochs.jsonl", PLAN_FILE)
RUN_DIRS = ("best", "checkpoints", "tensorboard")


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (recursively), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON (``allow_nan=False``) of :func:`strict` of ``value``."""
    return json.dumps(strict(value), indent=indent, allow_nan=False)


def write_json(path: Path, value: Any) -> None:
    """Write ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value, indent=1) + "\n")
    tmp.replace(path)


def append_jsonl(path: Path, value: Any) -> None:
    with path.open("a") as fh:
        fh.write(dumps(value) + "\n")


def earlier_run(out: Path) -> list[str]:
    """The names of the files of an earlier run in ``out``."""
    if not out.is_dir():
        return []
    return [n for n in (*RUN_FILES, *RUN_DIRS) if (out / n).exists()]


def open_run_dir(out: Path, overwrite: bool) -> str:
    """Make ``out`` ready for a new run and return the run's id (module docstring)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    found = earlier_run(out)
    if found and not overwrite:
        raise UserError(f"{out}: holds an earlier run ({', '.join(found)}); choose another --output or pass "
                        "--overwrite to replace it")
    for name in found:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return uuid.uuid4().hex[:16]
