"""Benchmark harness entry point (same as ``recsys-transfer bench``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/harness.py --config benchmarks/grids/ml100k.yaml \
        --output benchmarks/results/bench_ml100k
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

from recsys_transfer.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
