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


@pytest.fixture(scope="session")
def adult_prepared(adult_dir: Path, tmp_path_factory):
    """(prepared dir, meta) of UCI Adult through its recipe (two tasks: income, never_married), built once per
    session; read-only for the tests that share it."""
    from recsys_transfer.config import PrepareConfig
    from recsys_transfer.data.prepare import prepare

    out = tmp_path_factory.mktemp("adult") / "prepared"
    recipe = Path(__file__).parents[1] / "pipelines" / "datasets" / "adult-census.yaml"
    meta = prepare(PrepareConfig(schema=str(recipe), input=(str(adult_dir / "adult.data"),
                                                            str(adult_dir / "adult.test"))), out, progress=False)
    return out, meta


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


#: lists_frame's dense x is the row number divided by this
ROW_SCALE = 4096


def lists_frame(n: int = 2400, seed: int = 5):
    """A small frame with list fields: ``user``, ``item`` (single-valued), ``hist`` (a list of items, 0-6 long,
    empty and null lists included, sharing ``item``'s vocabulary), ``tags`` (a list with its own vocabulary),
    dense ``x`` = the row's number / 4096 (exact in float32: identifies a row in a batch, small enough to train on),
    ``label``."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    items = [f"i{x}" for x in rng.zipf(1.5, n) % 150]
    hist = [[f"i{x}" for x in rng.zipf(1.5, int(k)) % 180] for k in rng.integers(0, 7, n)]
    hist[2] = None  # a null list is an empty list
    for k in range(0, n, 7):  # repeated ids within a bag
        if hist[k]:
            hist[k] = hist[k] + hist[k][:1]
    return pl.DataFrame({
        "user": [f"u{x}" for x in rng.integers(0, 60, n)],
        "item": items,
        "hist": pl.Series(hist, dtype=pl.List(pl.String)),
        "tags": pl.Series([[f"t{x}" for x in rng.integers(0, 9, int(k))] for k in rng.integers(0, 4, n)],
                          dtype=pl.List(pl.String)),
        "x": np.arange(n, dtype=np.float64) / ROW_SCALE,
        "label": (rng.random(n) < 0.4).astype(np.float32),
    })


@pytest.fixture(scope="session")
def lists_prepared(tmp_path_factory: pytest.TempPathFactory):
    """:func:`lists_frame` prepared (random 80/10/10 split), in row groups of 250 rows (many loader pieces)."""
    from recsys_transfer.data.prepared import BuildReport, Schema, SparseSpec, build_prepared, chunked
    from recsys_transfer.data.splits import HeadTailSpec, SplitSpec

    df = lists_frame()
    schema = Schema(sparse=(SparseSpec("user"), SparseSpec("item"),
                            SparseSpec("hist", multi_valued=True, vocab="item"), SparseSpec("tags", multi_valued=True)),
                    dense=("x",))
    out = tmp_path_factory.mktemp("lists") / "prepared"
    meta = build_prepared(chunked(df, 600), schema, out, dataset="lists", split=SplitSpec(), head_tail=HeadTailSpec(),
                          report=BuildReport(input_rows=len(df)), source={}, progress=False, row_group_size=250)
    return out, meta


@pytest.fixture(scope="session")
def ml100k_lists_prepared(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """ML-100K prepared with the list fields: genres as a bag, a 5-item user history sharing item_id's table."""
    from recsys_transfer.data.movielens import prepare_movielens

    out = tmp_path_factory.mktemp("ml100k_lists") / "prepared"
    meta = prepare_movielens(ml100k_dir, out, progress=False, genres="bag", history=5)
    return out, meta
