"""The README's Python examples run as written (against the real ML-100K files), so they cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path, data_dir, capsys):
    blocks = _python_blocks()
    assert len(blocks) == 2  # prepare, then the training step
    target = str(tmp_path / "ml100k")
    namespace: dict = {}
    for k, block in enumerate(blocks):
        code = block.replace("runs/ml100k", target).replace("../shared/data", str(data_dir))
        code = code.replace("range(3)", "range(1)")  # one epoch is enough to run it
        if k == 1:
            from recsys_transfer.transfer.domains import select_command

            select_command(target, ["zip"])  # the README says: after `recsys-transfer select`
        exec(compile(code, f"README.md python block {k}", "exec"), namespace)
    assert namespace["meta"].tasks[0].name == "label"
    printed = capsys.readouterr().out
    assert "'label': {'rows': " in printed and "'tail_auc':" in printed
