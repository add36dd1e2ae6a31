"""Benchmark harness: grid specs (``benchmarks/grids/*.yaml``) -> resumable runs -> results.csv / results.md /
plots. Entry points: ``recsys-transfer bench`` (see :mod:`recsys_transfer.bench.cli`) and
``benchmarks/harness.py``."""

from recsys_transfer.bench.spec import GridSpec, load_grid  # noqa: F401
