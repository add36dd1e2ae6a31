"""Shared fixtures. Real data comes from $RECSYS_DATA_DIR (CI sets it to ../shared/data).

Tests that need the real files FAIL when the variable is unset under CI (CI=true), and skip only on a developer
machine without the data, so a misconfigured CI can never go green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the suite: the test models are tiny, and on a busy 2-core machine OpenMP threads
    waiting for a core made a DeepFM epoch on ML-100K ~10x slower. torchrun workers get OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data_dir() -> Path | None:
    value = os.environ.get("RECSYS_DATA_DIR")
    if not value:
        guess = Path(__file__).resolve().parents[1].parent / "shared" / "data"
        return guess if guess.is_dir() else None
    return Path(value)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None or not d.is_dir():
        msg = f"real data not found: set RECSYS_DATA_DIR (got {os.environ.get('RECSYS_DATA_DIR')!r})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def ml100k_dir(data_dir: Path) -> Path:
    d = data_dir / "movielens-100k"
    assert (d / "u.data").is_file(), f"{d}/u.data missing"
    return d


@pytest.fixture(scope="session")
def criteo8k_dir(data_dir: Path) -> Path:
    d = data_dir / "criteo-kaggle-8k"
    assert (d / "train.tsv").is_file(), f"{d}/train.tsv missing"
    return d


@pytest.fixture(scope="session")
def ml100k_prepared(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """ML-100K prepared once per session with the default random 80/10/10 split (seed 2022)."""
    from recsys_transfer.data.movielens import prepare_movielens

    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    meta = prepare_movielens(ml100k_dir, out, progress=False)
    return out, meta
