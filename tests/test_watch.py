"""Watching a long job (issue 11, section 6), on the real ML-100K files.

A run with ``log.tensorboard`` writes event files whose scalars (read back with TensorBoard's own
``EventAccumulator``) are the run's records: the epochs.jsonl numbers at each epoch's last global step, the running
train loss / transfer statistics every ``log.every_steps`` steps, checkpoint save times at the checkpoints' steps,
metrics.json's test metrics. A run killed with SIGKILL and started again continues the same series (one value per
step, equal to the uninterrupted run's). Off a terminal, ``train.progress`` prints plain lines (no tqdm control
characters). Config mistakes are one-line errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from recsys_transfer.cli import main
from recsys_transfer.config import LogConfig, RunConfig, build, config_differences, load_config
from recsys_transfer.errors import UserError
from recsys_transfer.train.progress import Bar, LogLines, Progress, reporter
from recsys_transfer.train.rundir import open_run_dir
from recsys_transfer.train.run import run_training
from recsys_transfer.train.scalars import TensorBoardScalars

BATCH = 4096
TIMING = ("train/seconds", "train/rows_per_s", "step/train/rows_per_s", "checkpoint/save_seconds")
LINE = re.compile(r"epoch (\d+)  step (\d+)/(\d+)  loss (\d+\.\d{4})  ([\d,]+) rows/s  eta (\d+):(\d\d):(\d\d)")


def _config(tmp_path: Path, data: Path) -> Path:
    p = tmp_path / "watch.yaml"
    p.write_text(f"""data: {{path: {data}}}
model: {{name: deepfm, params: {{embedding_dim: 8, hidden: [16]}}}}
transfer: {{mode: "+Ours", loss: adversarial, fields: [zip]}}
train: {{epochs: 2, batch_size: {BATCH}, eval_batch_size: 16384, early_stopping_patience: 0}}
checkpoint: {{every_steps: 4}}
log: {{tensorboard: true, every_steps: 2, lines_every_steps: 3, lines_every_seconds: 0}}
""")
    return p


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "epochs.jsonl").read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # event files hold float32


@pytest.fixture(scope="module")
def whole(ml100k_prepared, tmp_path_factory):
    """The uninterrupted run, in this process; ``n``: batches per epoch."""
    data, _ = ml100k_prepared
    root = tmp_path_factory.mktemp("watch")
    cfg = _config(root, data)
    out = root / "whole"
    metrics = run_training(load_config(cfg), out)
    n = math.ceil(_epochs(out)[0]["train/rows"] / BATCH)
    return cfg, out, metrics, n


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_tensorboard_scalars_are_the_runs_records(whole):
    _, out, metrics, n = whole
    scalars = _scalars(out)
    ends = [n, 2 * n]
    logged = sorted(set(range(2, 2 * n + 1, 2)) | set(ends))
    epochs = _epochs(out)
    # every number of every epochs.jsonl record, at the epoch's last global step
    assert {"train/loss", "train/label/loss", "train/rows_per_s", "valid/label/auc", "valid/label/logloss",
            "valid/label/head_auc", "valid/label/tail_auc", "monitor_value", "epoch"} <= set(_numbers(epochs[0]))
    for key in _numbers(epochs[0]):
        assert [s for s, _ in scalars[key]] == ends, key
        assert all(_close(v, r[key]) for (_, v), r in zip(scalars[key], epochs)), key
    # the epoch's running loss every 2 steps (log.every_steps) and at its end, where it is the epoch's loss
    for tag in ("step/train/loss", "step/train/label/loss", "step/train/rows_per_s"):
        assert [s for s, _ in scalars[tag]] == logged, tag
    for tag in ("train/loss", "train/label/loss"):
        at = dict(scalars[f"step/{tag}"])
        assert [_close(at[end], r[tag]) for end, r in zip(ends, epochs)] == [True, True], tag
    # the transfer statistics of every table under transfer, at the same steps; the last is metrics.json's
    assert metrics["transfer"]
    for table, stats in metrics["transfer"].items():
        for key in ("transfer_loss", "mean_lambda"):
            series = scalars[f"step/transfer/{table}/{key}"]
            assert [s for s, _ in series] == logged and _close(series[-1][1], stats[key]), (table, key)
        assert any(v > 0 for _, v in scalars[f"step/transfer/{table}/mean_lambda"])
    # a save time per checkpoint (every 4 steps and each epoch end), the test metrics at the last step
    assert [s for s, _ in scalars["checkpoint/save_seconds"]] == sorted(set(range(4, 2 * n + 1, 4)) | set(ends))
    assert all(v > 0 for _, v in scalars["checkpoint/save_seconds"])
    test = _numbers(metrics["test"]["label"])
    assert {"auc", "logloss", "head_auc", "tail_auc"} <= set(test)
    assert {k.removeprefix("test/label/") for k in scalars if k.startswith("test/")} == set(test)
    for key, value in test.items():
        assert [s for s, _ in scalars[f"test/label/{key}"]] == [2 * n] and _close(scalars[f"test/label/{key}"][0][1],
                                                                                    value), key
    assert [p.name.startswith("events.out.tfevents.") for p in (out / "tensorboard").iterdir()] == [True]


def _train(config: Path, out: Path, fault: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if fault is not None:
        env["RECSYS_TRANSFER_FAULT_STEP"] = str(fault)
    return subprocess.run([sys.executable, "-m", "recsys_transfer", "train", "--config", str(config), "--output",
                           str(out)], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def cut(whole):
    """The same run killed in epoch 1, 3 steps after its checkpoint of step ``g`` (batch ``g - n`` of the epoch; 20
    and 5 with 15 batches per epoch), in a subprocess whose stdout and stderr are pipes (no terminal), then run
    again into the same directory (in this process, its stdout and stderr captured: no terminal either)."""
    cfg, out, _, n = whole
    g = 4 * math.ceil((n + 4) / 4)
    cut = out.parent / "cut"
    killed = _train(cfg, cut, fault=g + 3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        run_training(load_config(cfg), cut)
    resumed = subprocess.CompletedProcess([], 0, stdout.getvalue(), stderr.getvalue())
    assert f"(epoch 1, batch {g - n}, step {g}," in resumed.stdout
    return cut, killed, resumed, g


def test_a_killed_and_resumed_run_continues_one_series(whole, cut):
    _, out, _, n = whole
    run, _, _, g = cut
    a, b = _scalars(out), _scalars(run)
    assert set(a) == set(b)
    for tag in a:
        steps = [s for s, _ in b[tag]]
        assert steps == sorted(set(steps)), tag  # one value per step
        assert steps == [s for s, _ in a[tag]], tag
        if tag not in TIMING:
            assert [v for _, v in b[tag]] == [v for _, v in a[tag]], tag  # bitwise, as the resumed run is
    files = sorted((run / "tensorboard").iterdir())
    assert len(files) == 2  # one per attempt, in one directory: one run in TensorBoard
    events = list(EventFileLoader(str(files[1])).Load())[:3]
    assert any(e.HasField("session_log") and e.session_log.status == e.session_log.START and e.step == g + 1
               for e in events), events  # the first attempt's steps after the checkpoint (g) are purged


def test_off_a_terminal_progress_is_plain_lines(whole, cut):
    n = whole[3]
    _, killed, resumed, g = cut
    b = g - n  # the batch of epoch 1 the resumed run continues after
    for proc in (killed, resumed):
        assert "\r" not in proc.stdout + proc.stderr and "\x1b" not in proc.stdout + proc.stderr
    printed = {name: [m for m in map(LINE.fullmatch, proc.stdout.splitlines()) if m]
               for name, proc in (("killed", killed), ("resumed", resumed))}
    # every 3 batches of the epoch (log.lines_every_steps), the resumed epoch continuing its count
    assert [(int(m[1]), int(m[2])) for m in printed["killed"]] == \
        [(0, k) for k in range(3, n + 1, 3)] + [(1, k) for k in range(3, b + 4, 3)]
    assert [(int(m[1]), int(m[2])) for m in printed["resumed"]] == [(1, k) for k in range(3, n + 1, 3) if k > b]
    for m in printed["killed"] + printed["resumed"]:
        assert int(m[3]) == n and 0 < float(m[4]) < 1 and int(m[5].replace(",", "")) > 0
    eta = [int(m[6]) * 3600 + int(m[7]) * 60 + int(m[8]) for m in printed["resumed"]]
    assert eta == sorted(eta, reverse=True) and eta[-1] <= eta[0]
    assert "epoch 0: loss" in killed.stdout and "epoch 1: loss" in resumed.stdout


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


class _State:
    def __init__(self, batches: int, rows: int, seconds: float) -> None:
        self.batches, self.rows, self.seconds, self.total = batches, rows, seconds, 0.5 * rows


def test_the_report_is_a_bar_only_on_a_terminal_and_lines_follow_steps_or_seconds():
    assert type(reporter(False, stream=_Stream(True))) is Progress
    assert isinstance(reporter(True, stream=_Stream(True)), Bar)
    lines = reporter(True, every_steps=0, every_seconds=10.0, stream=_Stream(False))
    assert isinstance(lines, LogLines) and (lines.every_steps, lines.every_seconds) == (0, 10.0)
    now = [0.0]
    out = _Stream(False)
    report = LogLines(every_steps=0, every_seconds=10.0, stream=out, clock=lambda: now[0])
    report.start(2, 100, _State(0, 0, 0.0))
    for k, t in enumerate([3.0, 9.9, 10.0, 15.0, 20.5], start=1):
        now[0] = t
        report.update(_State(k, 1000 * k, t))
    assert out.text.splitlines() == ["epoch 2  step 3/100  loss 0.5000  300 rows/s  eta 0:05:23",
                                     "epoch 2  step 5/100  loss 0.5000  244 rows/s  eta 0:06:30"]


def test_a_resumed_writer_purges_the_steps_after_its_checkpoint(tmp_path):
    first = TensorBoardScalars(tmp_path / "tensorboard", 1, 10)
    for step in range(1, 11):
        first.epoch({"train/loss": step, "monitor": "valid/label/auc"}, step)
    first.close()  # killed after step 10, its checkpoint was step 5
    second = TensorBoardScalars(tmp_path / "tensorboard", 1, 10, purge_step=6)
    for step in range(6, 13):
        second.epoch({"train/loss": step + 100.0, "valid/label/auc": float("nan")}, step)
    second.close()
    assert _scalars(tmp_path) == {"train/loss": [(s, s if s <= 5 else s + 100.0) for s in range(1, 13)]}


def test_log_config_mistakes_are_one_line_errors(tmp_path, ml100k_prepared, capsys, monkeypatch):
    assert LogConfig() == LogConfig(tensorboard=False, every_steps=50, lines_every_steps=0, lines_every_seconds=30.0)
    cases = [({"tensorbord": True}, "log: unknown key(s) ['tensorbord']; known keys: ['every_steps', "
                                    "'lines_every_seconds', 'lines_every_steps', 'tensorboard']"),
             ({"every_steps": -1}, "log.every_steps must be an integer >= 0, got -1"),
             ({"every_steps": True}, "log.every_steps: expected int, got True"),
             ({"lines_every_seconds": float("nan")}, "log.lines_every_seconds must be a finite number >= 0"),
             ({"lines_every_steps": 0, "lines_every_seconds": 0}, "set train.progress: false"),
             ({"tensorboard": "yes"}, "log.tensorboard: expected bool")]
    for raw, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            build(LogConfig, raw, "log")
    data, _ = ml100k_prepared
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{path: {data}}}\nmodel: {{name: lr}}\nlog: {{tensorboard: true}}\n")
    # how a run is watched may change between a checkpoint and its resume, and does not change a bench run's id
    plain, watched = load_config(cfg, ["log.tensorboard=false"]), load_config(cfg, ["log.every_steps=7"])
    assert config_differences(plain.to_dict(), watched.to_dict()) == []
    from recsys_transfer.bench.runner import run_id_of

    assert run_id_of(plain, "x") == run_id_of(watched, "x")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # not installed
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--output", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "is_fx_tracing" not in ln]
    assert lines == ["error: log.tensorboard is on but the tensorboard package is not installed: pip install "
                     "'recsys-transfer[tensorboard]'"]
    assert not out.exists()


def test_overwrite_removes_the_tensorboard_directory(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("")
    with pytest.raises(UserError, match=r"holds an earlier run \(tensorboard\)"):
        open_run_dir(tmp_path, overwrite=False)
    open_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "tensorboard").exists()

