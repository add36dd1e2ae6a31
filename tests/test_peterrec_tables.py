"""benchmarks/peterrec_tables.py plans runs that the shipped pipelines accept (the tables' runs are long; the
script's own ``--smoke`` trains them all on ML-100K in a few minutes and is not part of the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from recsys_transfer.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("peterrec_tables", ROOT / "benchmarks" / "peterrec_tables.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peterrec_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_tables_plan_every_variant_task_and_seed_with_valid_configs(tmp_path):
    mod = _script()
    args = mod.argparse.Namespace(input=str(tmp_path), seeds=[0, 1, 2], pretrain_seed=0, dim=64, dilations=[1, 4],
                                  pretrain_epochs=10, epochs=5, grec=True, pretrain_set=[], finetune_set=[],
                                  pretrain_softmax="sampled", pretrain_negatives=1024)
    pre, fine = mod.plan(args, tmp_path)
    assert [r.name for r in pre] == ["pretrain-nextitnet", "pretrain-grec"]
    nextitnet = load_config(ROOT / "pipelines" / pre[0].pipeline, list(pre[0].overrides))
    assert nextitnet.model.params["softmax"] == "sampled" and nextitnet.sequence.negatives == 1024  # as recorded
    # 7 variants x 4 tasks + 3 more insertions on age, + GRec's FineAll and PeterRec on 4 tasks; x 3 seeds
    assert len(fine) == (7 * 4 + 3 + 2 * 4) * 3 == len({r.name for r in fine})
    for r in pre + fine:
        cfg = load_config(ROOT / "pipelines" / r.pipeline, list(r.overrides))
        variant = cfg.model.params.get("variant")
        if r in fine:
            assert (cfg.model.init_from is None) == (variant in ("peter_zero", "fine_zero")), r.name
            assert cfg.model.params["dilations"] == [1, 4] and cfg.train.seed in (0, 1, 2)
            if cfg.model.init_from is not None:
                assert cfg.model.init_from.endswith(r.after) and r.after in {p.name for p in pre}
    ages = [r for r in fine if "-age-" in r.name and r.name.startswith("nextitnet-peterrec-")]
    assert sorted({r.name.split("-")[2] for r in ages}) == ["b", "c", "d", "e"]
