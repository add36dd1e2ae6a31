"""Shared fixtures. Real data comes from $RECSYS_DATA_DIR (CI sets it to ../shared/data).

Tests that need the real files FAIL when the variable is unset under CI (CI=true), and skip only on a developer
machine without the data, so a misconfigured CI can never go green by skipping; the run then ends with one line
saying how to get the data (:func:`pytest_terminal_summary`).
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


DATA_MISSING = "real data not found"


def _missing(msg: str):
    if os.environ.get("CI"):
        pytest.fail(f"{DATA_MISSING}: {msg}")
    pytest.skip(f"{DATA_MISSING}: {msg}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if d is None or not d.is_dir():
        _missing(f"set RECSYS_DATA_DIR (got {os.environ.get('RECSYS_DATA_DIR')!r})")
    return d


def _real(data_dir: Path, name: str, probe: str) -> Path:
    """``data_dir/name``, which must hold ``probe``; a data directory with only some of the sets (e.g. what
    ``recsys-transfer download`` fetched) skips the tests of the others (fails under CI)."""
    d = data_dir / name
    if not (d / probe).is_file():
        _missing(f"{d / probe} missing")
    return d


@pytest.fixture(scope="session")
def ml100k_dir(data_dir: Path) -> Path:
    return _real(data_dir, "movielens-100k", "u.data")


@pytest.fixture(scope="session")
def criteo8k_dir(data_dir: Path) -> Path:
    return _real(data_dir, "criteo-kaggle-8k", "train.tsv")


@pytest.fixture(scope="session")
def ml1m_partial_dir(data_dir: Path) -> Path:
    return _real(data_dir, "movielens-1m-partial", "ratings_part1.tsv")


@pytest.fixture(scope="session")
def adult_dir(data_dir: Path) -> Path:
    return _real(data_dir, "adult-census", "adult.data")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """One line, when real-data tests were skipped, on how to get the data. Only MovieLens-100K among the sets the
    tests read is downloadable; the 8k Criteo sample, the partial ML-1M files and Adult (with its added header
    lines) exist only in ../shared/data.
    An outer wrapper, so the line comes after the short summary's SKIPPED lines, just before the counts."""
    result = yield
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if DATA_MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"real data missing: {len(skipped)} tests skipped; get MovieLens-100K with `recsys-transfer download "
            "movielens-100k --dir DIR` and set RECSYS_DATA_DIR=DIR (the criteo-kaggle-8k, movielens-1m-partial and "
            "adult-census sets are not downloadable: they come with ../shared/data, read by default from beside the "
            "clone)")
    return result


@pytest.fixture(scope="session")
def ml100k_prepared(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """ML-100K prepared once per session with the default random 80/10/10 split (seed 2022)."""
    from recsys_transfer.data.movielens import prepare_movielens

    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    meta = prepare_movielens(ml100k_dir, out, progress=False)
    return out, meta
