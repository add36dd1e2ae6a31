"""The logic of benchmarks/checkpoint_io.py, scaling.py, prepare_throughput.py, mtl_throughput.py and fdn_synthetic.py
that decides what they report (no timing claims; prepare_throughput, mtl_throughput and fdn_synthetic run on tiny
sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from recsys_transfer.data.loader import BatchLoader

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(save: float, crc: float, extra: float, size: int = 0) -> dict:
    load = {"s": save / 2, "extra_mib": 1.0}
    return {"save_s": save, "state_dict_s": 0.0, "dcp_s": save - crc, "crc_s": crc, "extra_mib": extra,
            "bytes": size, "rank_bytes": size, "load_warm": load, "load_cold": load}


def test_checkpoint_io_reports_the_slowest_rank_of_each_round_then_the_median():
    io = _script("checkpoint_io")
    mib = 2 ** 20
    ranks = [{"rank": 0, "setup_s": 1.0, "first_save_s": 9.0,
              "rounds": [_round(1.0, 0.1, 10, mib), _round(5.0, 0.2, 30, mib), _round(2.0, 0.3, 20, mib)]},
             {"rank": 1, "setup_s": 2.0, "first_save_s": 8.0,
              "rounds": [_round(3.0, 0.0, 40, 0), _round(1.0, 0.0, 60, 0), _round(4.0, 0.0, 50, 0)]}]
    out = io.summarize(10, 2, ranks)
    assert out["save_s_runs"] == [3.0, 5.0, 4.0]  # per round, the slower rank
    assert out["save_s"] == 4.0  # their median (not the median of each rank, then the max: 2.0 / 3.0)
    assert out["crc_s"] == pytest.approx(0.2)  # rank 0 runs the CRC pass
    assert out["save_extra_mib"] == [20, 50]  # memory stays per rank
    assert out["bytes"] == mib and out["save_mib_s"] == pytest.approx(1 / 4.0)
    assert out["first_save_s"] == 9.0 and "peer" not in out


@pytest.mark.parametrize("world, batch", [(1, 1024), (1, 1000), (2, 512), (2, 250)])
def test_scaling_steps_per_epoch_is_the_loaders(ml100k_prepared, world, batch):
    """The default fault step (the middle of the last epoch) is placed with the loader's batch count."""
    data, meta = ml100k_prepared
    steps = _script("scaling").steps_per_epoch(meta.split_rows["train"], world, batch)
    for rank in range(world):
        loader = BatchLoader(data, "train", batch, shuffle=True, seed=1, drop_last=world > 1, rank=rank,
                             world_size=world, meta=meta)
        assert len(loader) == steps, rank


def test_prepare_throughput_schema_impls_run_and_agree(tmp_path):
    """prepare_throughput with tiny sizes: the schema path on the TSV and on its gzip runs beside prepare_criteo,
    the outputs are checked equal, and the schema ratios are recorded."""
    bench = _script("prepare_throughput")
    bench.main(["--sizes", "3000,6000", "--impls", "ours,schema,schema-gz", "--workdir", str(tmp_path / "w"),
                "--results-dir", str(tmp_path / "r"), "--tag", "t", "--chunk-rows", "1000"])
    record = json.loads((tmp_path / "r" / "prepare_throughput_t.json").read_text())
    assert [(r["impl"], r["rows"]) for r in record["results"]] == [
        (impl, rows) for rows in (3000, 6000) for impl in ("ours", "schema", "schema-gz")]
    gz = [r for r in record["results"] if r["impl"] == "schema-gz"]
    assert all(r["input_file"].endswith(".tsv.gz") and r["input_file_mib"] < r["input_mib"] for r in gz)
    assert all(line.startswith("equal at") and "(ours, schema, schema-gz)" in line for line in record["output_check"])
    assert set(record["schema_ratio"]["6000"]) == {"schema/ours", "schema-gz/schema"}
    md = (tmp_path / "r" / "prepare_throughput_t.md").read_text()
    assert "schema / ours rows/s" in md and "peak RSS of schema:" in md
    assert not list((tmp_path / "w").glob("criteo_synth_*"))  # the generated files are removed


def test_prepare_throughput_refuses_disagreeing_outputs_and_unknown_impls():
    bench = _script("prepare_throughput")
    a = {"rows": 10, "split_rows": {"train": 8, "valid": 1, "test": 1}, "vocab_sizes": {"C1": 3, "I1": 2}}
    b = {**a, "vocab_sizes": {"C1": 4, "I1": 2}}
    with pytest.raises(SystemExit, match=r"vocab sizes differ \(ours, schema\): \{'C1': \(3, 4\)\}"):
        bench._check_same_output(10, {"ours": a, "schema": b})
    assert bench._check_same_output(10, {"ours": a}).startswith("not compared")
    with pytest.raises(SystemExit):
        bench.main(["--impls", "ours,polars"])


MTL_TINY = ["--epochs", "1", "--chunks", "2", "--batch-size", "1024", "--lr", "0.01", "--dim", "4", "--experts",
            "2", "--expert-hidden", "8", "--tower-hidden", "4", "--specific", "1", "--shared", "1", "--n-boot", "50",
            "--surgery-steps", "2", "--surgery-rounds", "2", "--parts-steps", "2", "--parts-rounds", "2"]


def test_mtl_throughput_ours_and_surgery_on_adult(adult_dir, tmp_path):
    """mtl_throughput with tiny widths, our side only (CI has no bench extra): both models train through the
    trainer's step, every task gets a test AUC, and GradVac's step is timed beside the plain one."""
    bench = _script("mtl_throughput")
    rec = bench.main([*MTL_TINY, "--sides", "ours", "--surgery", "none,per-task,gradvac", "--raw", str(adult_dir),
                      "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r"), "--tag", "t"])
    result = rec["result"]
    assert list(result["impls"]) == ["ours-mmoe", "ours-ple"] and result["comparison"] == {}
    for s in result["impls"].values():
        assert s["rows"] == result["train_rows"] and s["rows_per_s"] > 0
        assert set(s["test_auc"]) == {"income", "never_married"} and min(s["test_auc"].values()) > 0.6
    assert set(result["parts_ms_per_step"]) == {f"ours-{m} {part}" for m in ("mmoe", "ple")
                                                for part in ("fwd+bwd", "step")}
    assert set(rec["surgery"]["ms_per_step"]) == {"none", "per-task", "gradvac"}
    assert rec["surgery"]["ratio_vs_none"]["none"] == 1.0
    md = (tmp_path / "r" / "mtl_throughput_t.md").read_text()
    assert "| ours-mmoe |" in md and "| gradvac |" in md and "## Where the time goes" in md
    assert json.loads((tmp_path / "r" / "mtl_throughput_t.json").read_text())["config"]["sides"] == ["ours"]
    with pytest.raises(SystemExit):
        bench.main(["--surgery", "gradvec"])


def test_mtl_throughput_against_torch_rechub_same_dimensions(adult_dir, tmp_path):
    """With torch-rechub installed (the bench extra): both sides train the same rows, and the models have the same
    parameters but for torch-rechub's BatchNorm in each gate (2 per gate output) -- the widths match."""
    pytest.importorskip("torch_rechub")
    bench = _script("mtl_throughput")
    rec = bench.main([*MTL_TINY, "--surgery", "", "--raw", str(adult_dir), "--work-dir", str(tmp_path / "w"),
                      "--results-dir", str(tmp_path / "r")])
    impls, tasks = rec["result"]["impls"], 2
    assert list(impls) == ["ours-mmoe", "rechub-mmoe", "ours-ple", "rechub-ple"]
    assert all(s["rows"] == rec["result"]["train_rows"] for s in impls.values())
    experts, levels, specific, shared = 2, 2, 1, 1
    gate_bn = {"mmoe": 2 * tasks * experts,
               "ple": 2 * (levels * tasks * (specific + shared) + (levels - 1) * (tasks * specific + shared))}
    for model, extra in gate_bn.items():
        assert impls[f"rechub-{model}"]["parameters"] - impls[f"ours-{model}"]["parameters"] == extra
        cmp = rec["result"]["comparison"][model]
        assert cmp["ratio"] > 0 and set(cmp["auc_diff_ci95"]) == {"income", "never_married"}
    assert len(rec["result"]["parts_ms_per_step"]) == 8
    assert "not run" in rec["surgery"]["status"]
    assert "ratio ours/rechub" in (tmp_path / "r" / "mtl_throughput.md").read_text()

def test_fdn_synthetic_runs_the_table1_protocol_on_tiny_data(tmp_path):
    """benchmarks/fdn_synthetic.py with tiny sizes: oracles on Dataset-A/-B, a multi-task model on Dataset-I, the gap
    per seed and task against the oracle of lower validation MSE, mean over seeds (lr needs the constant field)."""
    bench = _script("fdn_synthetic")
    assert bench.main(["--models", "mmoe", "--oracles", "single_task,lr", "--seeds", "0", "1", "--rows", "600",
                       "--epochs", "1", "--results-dir", str(tmp_path / "r"), "--tag", "t", "--train-repeats", "2",
                       "--gen", "constant_field=true", "--workdir", str(tmp_path / "w")]) == 0
    record = json.loads((tmp_path / "r" / "fdn_synthetic_t.json").read_text())
    assert record["models"] == ["mmoe"] and record["oracles"] == ["single_task", "lr"] and record["seeds"] == [0, 1]
    assert record["commit"] and record["command"].startswith("python benchmarks/fdn_synthetic.py --models mmoe")
    for seed in ("0", "1"):
        runs, entry = record["runs"][seed], record["per_seed"][seed]
        for task, variant_run in (("y1", "oracle/{}/y1"), ("y2", "oracle/{}/y2")):
            best = min(("single_task", "lr"), key=lambda o: runs[variant_run.format(o)]["mse"][task]["valid"])
            oracle = runs[variant_run.format(best)]["mse"][task]["test"]
            model = runs["model/mmoe"]["mse"][task]["test"]
            assert entry["oracle"][task] == {"model": best, "mse": oracle}
            assert entry["gap"]["mmoe"][task] == pytest.approx((oracle - model) / oracle)
        assert set(runs["oracle/single_task/y1"]["mse"]) == {"y1"} and set(runs["model/mmoe"]["mse"]) == {"y1", "y2"}
    gaps = [record["per_seed"][s]["gap"]["mmoe"]["y2"] for s in ("0", "1")]
    assert record["table"]["mmoe"]["y2"]["gap_mean"] == pytest.approx(sum(gaps) / 2)
    assert record["claim"] is None  # fdn, ple, cgc and mmoe were not all run
    assert all(v > 0 for v in record["per_seed"]["0"]["label_variance"].values())
    repeats = record["runs"]["1"]["model/mmoe"]["repeats"]  # train seeds 1 and 1001, the mean MSE used
    assert record["runs"]["1"]["model/mmoe"]["mse"]["y1"]["test"] == pytest.approx(
        (repeats[0]["mse"]["y1"]["test"] + repeats[1]["mse"]["y1"]["test"]) / 2)
    assert set(record["training_noise"]) == {"y1", "y2"} and record["train_repeats"] == 2
    assert record["generator"]["constant_field"] is True and record["generator"]["dim"] == 100
    assert set(record["oracle"]["mse_over_variance"]) == {"y1", "y2"}
    md = (tmp_path / "r" / "fdn_synthetic_t.md").read_text()
    assert "| mmoe |" in md and "gap = (MSE_oracle - MSE_model) / MSE_oracle" in md


def test_fdn_synthetic_claim_check_and_model_params_check():
    bench = _script("fdn_synthetic")
    seeds = [0, 1]
    mse = {"fdn": 1.0, "ple": 1.1, "cgc": 1.2, "mmoe": 1.3}

    def run(y1: float, y2: float) -> dict:
        return {"mse": {"y1": {"test": y1, "valid": y1}, "y2": {"test": y2, "valid": y2}}}

    runs = {s: {("oracle", "o", "y1"): run(0.9, 0.9), ("oracle", "o", "y2"): run(0.9, 0.9),
                **{("model", m): run(v + 0.01 * s, v) for m, v in mse.items()}} for s in seeds}
    runs[1][("model", "cgc")] = run(1.35, 1.2)  # seed 1: CGC worse than MMoE on y1
    out = bench.summarize(runs, seeds, list(mse), ["o"])
    assert out["table"]["fdn"]["y1"]["gap_mean"] == pytest.approx(((0.9 - 1.0) + (0.9 - 1.01)) / 2 / 0.9)
    assert out["claim"]["holds_on_means"] is True and out["claim"]["seeds_where_it_holds"] == 1
    assert out["claim"]["pairs"]["cgc-mmoe/y1"]["seeds_positive"] == 1
    with pytest.raises(SystemExit, match=r"MODEL_PARAMS\['deepfm'\] has \['num_experts'\]"):
        saved = bench.MODEL_PARAMS["deepfm"]
        bench.MODEL_PARAMS["deepfm"] = {"num_experts": 8}
        try:
            bench.check_models(["deepfm"], bench._pipeline())
        finally:
            bench.MODEL_PARAMS["deepfm"] = saved
