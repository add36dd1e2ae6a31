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
                                  baseline_set=[], pretrain_softmax="sampled", pretrain_negatives=1024)
    pre, fine = mod.plan(args, tmp_path)
    assert [r.name for r in pre] == ["pretrain-nextitnet", "pretrain-grec"]
    nextitnet = load_config(ROOT / "pipelines" / pre[0].pipeline, list(pre[0].overrides))
    assert nextitnet.model.params["softmax"] == "sampled" and nextitnet.sequence.negatives == 1024  # as recorded
    # 7 variants x 4 tasks + 3 more insertions on age, + GRec's FineAll and PeterRec on 4 tasks, + DeepFM on cold;
    # x 3 seeds
    assert len(fine) == (7 * 4 + 3 + 2 * 4 + 1) * 3 == len({r.name for r in fine}) == len({r.cell for r in fine})
    deepfm = [r for r in fine if r.cell[:2] == ("deepfm", "deepfm")]
    assert [r.cell[3:] for r in deepfm] == [("cold", 0), ("cold", 1), ("cold", 2)]
    for r in pre + fine:
        cfg = load_config(ROOT / "pipelines" / r.pipeline, list(r.overrides))
        variant = cfg.model.params.get("variant")
        if r in deepfm:  # Table 5's baseline: from scratch, on the cold runs' prepared data, the pretraining's width
            assert cfg.model.name == "deepfm" and cfg.model.init_from is None and r.after is None
            assert cfg.model.params["embedding_dim"] == 64 and cfg.model.params["fields"] == ["items"]
            cold = next(f for f in fine if f.cell[3] == "cold" and f not in deepfm)
            cold = load_config(ROOT / "pipelines" / cold.pipeline, list(cold.overrides))
            assert cfg.data == cold.data and cfg.train.seed == r.cell[4] and cfg.train.epochs == 5
        elif r in fine:
            assert (cfg.model.init_from is None) == (variant in ("peter_zero", "fine_zero")), r.name
            assert cfg.model.params["dilations"] == [1, 4] and cfg.train.seed in (0, 1, 2)
            if cfg.model.init_from is not None:
                assert cfg.model.init_from.endswith(r.after) and r.after in {p.name for p in pre}
    ages = [r for r in fine if "-age-" in r.name and r.name.startswith("nextitnet-peterrec-")]
    assert sorted({r.name.split("-")[2] for r in ages}) == ["b", "c", "d", "e"]


def test_the_report_has_the_table5_section_with_deepfm_peterrec_and_fineall(tmp_path):
    mod = _script()
    args = mod.argparse.Namespace(input=str(tmp_path), seeds=[0, 1], pretrain_seed=0, dim=8, dilations=[1],
                                  pretrain_epochs=1, epochs=1, pretrain_softmax="full", pretrain_negatives=0, jobs=1,
                                  threads=1, grec=False)

    def runs(hr5, trained):
        return {"runs": [{"seed": s, "sampled_hr@5": h, "sampled_mrr@5": h / 2, "hr@10": h / 4, "ndcg@10": 0.0,
                          "trained": trained} for s, h in enumerate(hr5)]}

    out = {"pretrain": {}, "cells": {"deepfm/deepfm/-/cold": runs([0.30, 0.40], 1234),
                                     "nextitnet/peterrec/d/cold": runs([0.50, 0.52], 567),
                                     "nextitnet/fine_all/d/cold": runs([0.60, 0.62], 89012)}}
    text = mod.report(args, out, 1.0)
    section = text.split("## Table 5 analog: DeepFM vs PeterRec vs FineAll on cold-user recommendation")[1]
    rows = [line for line in section.split("\n## ")[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| DeepFM | 35.00 ± 7.07 | 17.50 ± 3.54 | 8.75 ± 1.77 | 1,234 |",
                        "| PeterRec | 51.00 ± 1.41 | 25.50 ± 0.71 | 12.75 ± 0.35 | 567 |",
                        "| FineAll | 61.00 ± 1.41 | 30.50 ± 0.71 | 15.25 ± 0.35 | 89,012 |"]
    assert "- cold (Table 5): PeterRec 51.00 >= DeepFM 35.00 (sampled_hr@5)." in text
