"""Runs that never report a wrong result, tried as a new user would: each mistake ends with one line naming what is
wrong and exit status 2 (or a counted skip), on the real ML-100K / ML-1M-partial / Criteo-8k files."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from recsys_transfer.cli import main
from recsys_transfer.config import load_config
from recsys_transfer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _pipeline(tmp_path: Path, data: Path, model: str = "lr", extra: str = "") -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(f"data: {{path: {data}}}\nmodel: {{name: {model}}}\n"
                 "train: {epochs: 2, batch_size: 2048, eval_batch_size: 8192, progress: false}\n" + extra)
    return p


def _error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "is_fx_tracing" not in ln]


def test_an_earlier_run_is_refused_unless_overwrite(tmp_path, ml100k_prepared, capsys):
    data, _ = ml100k_prepared
    cfg, out = _pipeline(tmp_path, data), tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--output", str(out)]) == 0
    first = _strict((out / "metrics.json").read_text())
    assert first["status"] == "completed" and "test label: auc" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--config", str(cfg), "--output", str(out)]) == 2
    assert _error_lines(capsys) == [f"error: {out}: holds a completed run; choose another --output, pass --overwrite "
                                    "to replace it or --resume to continue it (e.g. with more train.epochs)"]
    assert _strict((out / "metrics.json").read_text())["run_id"] == first["run_id"]  # untouched
    shutil.rmtree(out / "checkpoints")  # a run without checkpoints (checkpoint.enabled: false) cannot resume
    assert main(["train", "--config", str(cfg), "--output", str(out)]) == 2
    assert _error_lines(capsys) == [f"error: {out}: holds an earlier run (run.json, metrics.json, epochs.jsonl, best); "
                                    "choose another --output or pass --overwrite to replace it"]
    assert main(["train", "--config", str(cfg), "--output", str(out), "--overwrite"]) == 0
    second = _strict((out / "metrics.json").read_text())
    assert second["run_id"] != first["run_id"] and (out / "notes.txt").read_text() == "mine"
    assert (out / "best" / "RUN_ID").read_text().strip() == second["run_id"]
    run = _strict((out / "run.json").read_text())
    assert run["status"] == "completed" and run["versions"]["torch"] == torch.__version__
    epochs = [_strict(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all("valid/label/ne" in e for e in epochs)


@pytest.fixture(scope="module")
def ml1m_partial(ml1m_partial_dir, tmp_path_factory):
    """The real ML-1M partial files under the CTR rule: every label is 1 (ratings 3-5 only)."""
    out = tmp_path_factory.mktemp("ml1m") / "prepared"
    assert main(["prepare", "--dataset", "movielens", "--input", str(ml1m_partial_dir), "--output",
                 str(out), "--no-progress", "--allow-degenerate"]) == 0
    return out


def test_a_single_class_label_is_refused_at_prepare(ml1m_partial_dir, tmp_path, capsys, ml1m_partial):
    assert main(["prepare", "--dataset", "movielens", "--input", str(ml1m_partial_dir), "--output",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    # 299,418 ratings, 104,086 of them 3s (dropped): 195,332 positives, split 80/10/10 with the default seed
    meta = json.loads((ml1m_partial / "meta.json").read_text())
    assert meta["input_rows"] == 299_418 and meta["skip_reasons"] == {"rating == 3 (neutral)": 104_086}
    n_train = meta["split_rows"]["train"]
    assert meta["label_counts"]["train"]["label"] == {"0": 0, "1": n_train}
    assert _error_lines(capsys)[-1] == (f"error: label 'label' (task 'label') has a single class in train: 0 negatives, "
                                        f"{n_train:,} positives of {n_train:,} rows; a binary task needs both (pass "
                                        "--allow-degenerate to prepare it anyway)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


def test_no_epoch_with_a_finite_monitor_is_an_error_and_no_model_is_pretended(tmp_path, ml1m_partial, ml100k_prepared,
                                                                              capsys):
    out = tmp_path / "out"
    assert main(["train", "--config", str(_pipeline(tmp_path, ml100k_prepared[0])), "--output", str(out)]) == 0
    stale = out / "best"  # another run's model sits there; --overwrite removes it, it is never loaded or reported
    assert stale.is_dir()
    cfg = _pipeline(tmp_path, ml1m_partial)
    assert main(["train", "--config", str(cfg), "--output", str(out), "--overwrite"]) == 2
    assert _error_lines(capsys) == ["error: no epoch gave a finite valid/label/auc (per epoch: [None, None]); no model "
                                    "was saved"]
    assert not (out / "best").exists()
    metrics = _strict((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("no epoch gave a finite")
    epochs = [_strict(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["valid/label/auc"] for e in epochs] == [None, None] and epochs[0]["valid/label/logloss"] > 0


def test_load_model_refuses_another_runs_checkpoint(tmp_path, ml100k_prepared):
    from recsys_transfer.models.registry import build_model
    from recsys_transfer.train.checkpoint import load_model, save_model

    _, meta = ml100k_prepared
    model = build_model("lr", meta)
    save_model(model, tmp_path / "best", "run-a")
    load_model(model, tmp_path / "best", "run-a")
    with pytest.raises(UserError, match="belongs to run run-a, not to run run-b"):
        load_model(model, tmp_path / "best", "run-b")
    (tmp_path / "best" / "RUN_ID").unlink()  # a checkpoint whose save did not finish
    with pytest.raises(UserError, match="no complete model checkpoint here"):
        load_model(model, tmp_path / "best", "run-a")


class _GoesNaN(nn.Module):
    """LR whose logits turn NaN on its 3rd training forward (a diverging model, made deterministic)."""

    def __init__(self, meta, tasks=None) -> None:
        super().__init__()
        from recsys_transfer.models.lr import LR

        self.inner = LR(meta, tasks=tasks)
        self.dataset_id = meta.dataset_id
        self.calls = 0

    def forward(self, batch):
        out = self.inner(batch)
        if self.training:
            self.calls += 1
            if self.calls == 3:
                return {k: v * float("nan") for k, v in out.items()}
        return out


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_non_finite_training_loss_stops_naming_epoch_and_step_or_is_a_counted_skip(tmp_path, ml100k_prepared,
                                                                                    monkeypatch, capsys, policy):
    from recsys_transfer.models import registry

    monkeypatch.setitem(registry.MODELS, "goes_nan", _GoesNaN)
    cfg = _pipeline(tmp_path, ml100k_prepared[0], model="goes_nan")
    out = tmp_path / "out"
    code = main(["train", "--config", str(cfg), "--output", str(out), "--set", f"train.nonfinite_loss={policy}"])
    if policy == "error":
        assert code == 2
        assert _error_lines(capsys) == ["error: epoch 0, step 2: training loss is nan (label nan); set "
                                        "train.nonfinite_loss=skip to skip such batches"]
        assert _strict((out / "metrics.json").read_text())["status"] == "failed"
    else:
        assert code == 0
        metrics = _strict((out / "metrics.json").read_text())
        assert metrics["skipped_batches"] == 1 and metrics["test"]["label"]["auc"] > 0.6
        first = _strict((out / "epochs.jsonl").read_text().splitlines()[0])
        assert first["train/skipped_batches"] == 1


def test_config_mistakes_are_one_line_errors(tmp_path, ml100k_prepared, capsys):
    data, _ = ml100k_prepared
    cfg = _pipeline(tmp_path, data, model="fm")
    out = str(tmp_path / "out")
    cases = [
        (["--set", "transfer.mode=+T", "--set", "transfer.min_vocab=100000"],
         "error: transfer mode '+T': no field has more than transfer.min_vocab = 100000 ids"),
        (["--set", "transfer.loss=adversarail"], "transfer: transfer loss must be one of"),
        (["--set", "rows.optimizer=adamw"], "rows: rows.optimizer must be one of"),
        (["--set", "train.monitor=valid/label/mse"], "task 'label' (binary) has no metric 'mse'"),
        (["--set", "train.device=cuda"] if not torch.cuda.is_available() else ["--set", "train.device=tpu"],
         "train.device"),
        (["--set", "train.group_field=nope"], "unknown sparse field 'nope'"),
    ]
    for extra, message in cases:
        assert main(["train", "--config", str(cfg), "--output", out, "--overwrite", *extra]) == 2, extra
        lines = _error_lines(capsys)
        assert len(lines) == 1 and message in lines[0], (extra, lines)
    parsed = load_config(cfg, ["train.lr=1e-3", "rows.lr=5e-2", "transfer.lam=1E-4"])
    assert parsed.train.lr == 1e-3 and parsed.rows.lr == 0.05 and parsed.transfer.lam == 1e-4
    assert isinstance(parsed.train.lr, float)


def test_a_truncated_shard_is_one_line_naming_it(tmp_path, ml100k_prepared, capsys):
    src, meta = ml100k_prepared
    data = tmp_path / "data"
    shutil.copytree(src, data)
    shard = data / meta.split_files["valid"][0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["info", str(data), "--check"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {shard}: unreadable parquet shard")
    assert main(["train", "--config", str(_pipeline(tmp_path, data)), "--output", str(tmp_path / "o")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"error: {shard}: unreadable parquet shard"), lines
    assert main(["info", str(src), "--check"]) == 0
    assert f"train {meta.split_rows['train']:,} rows" in capsys.readouterr().out


def test_prepare_refuses_a_directory_holding_another_dataset(tmp_path, criteo8k_dir, capsys):
    out = tmp_path / "data"
    crit = [str(criteo8k_dir / f) for f in ("train.tsv", "dev.tsv", "test.tsv")]
    assert main(["prepare", "--dataset", "criteo", "--input", *crit, "--output", str(out), "--no-progress"]) == 0
    first = json.loads((out / "meta.json").read_text())["dataset_id"]
    assert main(["prepare", "--dataset", "criteo", "--input", *crit, "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()  # the same dataset again: replaced, same id
    assert main(["prepare", "--dataset", "criteo", "--input", *crit, "--output", str(out), "--no-progress",
                 "--min-count", "2"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "holds another prepared dataset" in lines[0] and "--overwrite" in lines[0]
    assert json.loads((out / "meta.json").read_text())["dataset_id"] == first  # left untouched
    assert main(["prepare", "--dataset", "criteo", "--input", *crit, "--output", str(out), "--no-progress",
                 "--min-count", "2", "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["dataset_id"] != first


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_help_and_info_start_without_torch(ml100k_prepared):
    r = _python("import sys\nfrom recsys_transfer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                "    pass\nprint('TORCH', 'torch' in sys.modules)")
    assert r.returncode == 0 and "usage: recsys-transfer" in r.stdout and "TORCH False" in r.stdout, r.stderr
    r = _python(f"import sys\nfrom recsys_transfer.cli import main\nmain(['info', {str(ml100k_prepared[0])!r}])\n"
                "print('TORCH', 'torch' in sys.modules)")
    assert r.returncode == 0 and "TORCH False" in r.stdout, r.stderr
    r = _python("import sys\nimport recsys_transfer.config\nprint('TORCH', 'torch' in sys.modules)")
    assert "TORCH False" in r.stdout


def _imports(path: Path, package_root: Path) -> set[str]:
    """Every recsys_transfer module ``path`` imports (at any level, ``TYPE_CHECKING`` blocks aside)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recsys_transfer"):
            found.add(node.module)
            for alias in node.names:  # `from recsys_transfer.metrics import ranking` imports a module
                if (package_root.parent / (node.module.replace(".", "/") + f"/{alias.name}.py")).is_file():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("recsys_transfer")}
    return found


def test_no_import_cycles():
    package = ROOT / "recsys_transfer"
    graph = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path, package) if m != name}
    cycles = []

    def visit(node, stack):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    # a package's __init__ importing its own submodules is not a cycle between modules
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") or c[0].startswith(m + ".") for m in c)]
    assert not real, real
    assert "recsys_transfer.cli" not in graph["recsys_transfer.train.run"]
    assert "recsys_transfer.bench.report" not in graph["recsys_transfer.bench.plots"]


def test_env_reports_versions_builds_and_world(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch            {torch.__version__}" in text and "fbgemm_build     cpu" in text
    assert "torchrec         1.8.0" in text and "world            single process (no torchrun)" in text
    assert ("cpu only" in text) != torch.cuda.is_available()


def _launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recsys_transfer", "launch", "--standalone", "--nproc-per-node", "2",
                           "--", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.distributed
def test_torchrun_prepares_the_data_on_rank_0_and_trains(tmp_path, ml100k_dir):
    """``data.path`` does not exist yet: rank 0 prepares it (the library function), rank 1 waits, both train."""
    data = tmp_path / "data"
    r = _launch("train", "--config", str(ROOT / "pipelines" / "movielens100k.yaml"), "--set", f"data.path={data}",
                "--set", f"data.prepare.input=[{ml100k_dir}]", "--set", "train.epochs=1", "--set",
                "train.progress=false", "--set", "model.params.hidden=[16]", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("test label: auc") == 1 and r.stderr.strip() == "", r.stderr[-2000:]
    metrics = _strict((tmp_path / "run" / "metrics.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test"]["label"]["rows"] == meta["split_rows"]["test"]
    assert meta["input_rows"] == 100_000


@pytest.mark.distributed
def test_user_errors_under_torchrun_are_one_line_per_rank(tmp_path, ml100k_prepared):
    data, _ = ml100k_prepared
    r = _launch("train", "--config", str(_pipeline(tmp_path, data)), "--output", str(tmp_path / "run"), "--set",
                "transfer.mode=+T", "--set", "transfer.fields=[nope]")
    lines = sorted(ln for ln in r.stderr.splitlines() if ln.strip())
    assert r.returncode == 2, r.stderr[-3000:]
    want = "unknown sparse field 'nope'"
    assert len(lines) == 2 and lines[0].startswith("error: [rank 0] ") and lines[1].startswith("error: [rank 1] ")
    assert all(want in ln for ln in lines) and "Traceback" not in r.stderr
    # a failure on rank 0 alone (preparing the data) reaches rank 1 instead of leaving it waiting
    r = _launch("train", "--config", str(ROOT / "pipelines" / "movielens100k.yaml"), "--set",
                f"data.path={tmp_path / 'new'}", "--set", f"data.prepare.input=[{tmp_path / 'missing'}]",
                "--output", str(tmp_path / "run2"))
    lines = sorted(ln for ln in r.stderr.splitlines() if ln.strip())
    assert r.returncode == 2 and len(lines) == 2, r.stderr[-3000:]
    assert lines[0].startswith("error: [rank 0] ") and "MovieLens input must be a directory" in lines[0]
    assert lines[1].startswith("error: [rank 1] rank 0 failed: ") and "MovieLens input must be a directory" in lines[1]
