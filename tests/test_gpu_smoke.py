"""The GPU smoke script runs its whole logic on the CPU (so it cannot rot between GPU sessions) and, without CUDA,
its default run exits cleanly with one message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def test_gpu_smoke_logic_on_the_cpu():
    r = _run("--device", "cpu", "--rows", "20000", "--batch", "2048", "--steps", "2", "--warmup", "1", "--no-record")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "barrier invariant: {'rows_checked':" in r.stdout and "'violations': 0" in r.stdout
    assert "+Ours/B-fused" in r.stdout and r.stdout.rstrip().endswith("OK")
    assert "save + resume on cpu: {'save_seconds':" in r.stdout and "'bitwise_equal': True}" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the default run measures on the GPU (minutes)")
def test_gpu_smoke_without_cuda_says_so_and_exits_0():
    r = _run()
    assert r.returncode == 0 and r.stdout.startswith("gpu_smoke: no CUDA device here"), r.stdout + r.stderr
