"""The command line: user mistakes exit 2 with one line on stderr and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_transfer.cli import main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recsys_transfer", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_user_mistake_is_one_line_no_traceback(tmp_path: Path, ml100k_dir: Path):
    bad = tmp_path / "ml"
    bad.mkdir()
    (bad / "u.data").write_text("1\t2\t4\n")
    for name in ("u.user", "u.item"):
        (bad / name).write_bytes((ml100k_dir / name).read_bytes())
    r = _run("prepare", "--dataset", "movielens", "--input", str(bad), "--output", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {bad / 'u.data'}:1: expected 4 fields separated by '\\t', found 3"]
    assert "Traceback" not in r.stderr


def test_prepare_and_info(tmp_path: Path, ml100k_dir: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "prep"
    assert main(["prepare", "--dataset", "movielens", "--input", str(ml100k_dir), "--output", str(out),
                 "--no-progress", "--head-rule", "threshold", "--head-min-count", "100"]) == 0
    text = capsys.readouterr().out
    assert "72,855 rows" in text and "skipped 27,145" in text
    assert main(["info", str(out), "--field", "gender"]) == 0
    assert "gender: 2 head ids" in capsys.readouterr().out  # both genders have >= 100 training ratings
    assert main(["info", str(out), "--field", "nope"]) == 2
    assert "unknown sparse field 'nope'" in capsys.readouterr().err


def test_bad_options(tmp_path: Path):
    assert main(["prepare", "--dataset", "movielens", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--split-fractions", "0.5,0.5,0.5"]) == 2
    assert main(["info", str(tmp_path)]) == 2
