"""Sharding plans (recsys_transfer.train.sharding): the ``sharding`` config section, the size policy and overrides on
the real ML-100K tables, the refused sharding types, the plan table, and a mixed plan under torchrun (2 processes)
equal to the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys_transfer.config import REFUSED_SHARDINGS, ShardingConfig, load_config
from recsys_transfer.errors import UserError
from recsys_transfer.models.fm import FM
from recsys_transfer.train import sharding as plans

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# ML-100K's tables: rows = vocabulary (+1 for unseen ids)
ML100K_ROWS = {"t_user_id": 944, "t_item_id": 1609, "t_time": 33, "t_age": 62, "t_gender": 3, "t_occupation": 22,
               "t_zip": 796, "t_year": 72, "t_genres": 215}


def _config(tmp_path: Path, sharding: str, data: str = "runs/x") -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{path: {data}}}\nsharding: {sharding}\n")
    return path


def _plan(meta, config: ShardingConfig, world: int = 2, dim: int = 8):
    """(plan rows, choices) of FM on ``meta`` for ``world`` ranks, planned in this process."""
    model = FM(meta, embedding_dim=dim)
    tables = plans.model_tables(model)
    choices = plans.choose(config, tables)
    sharders = plans.sharders()
    plans.check_choices(tables, choices, "cpu", sharders)
    plan = plans.plan_sharding(model, "cpu", choices, sharders, config, world_size=world, local_world_size=world)
    return plans.plan_rows(plan, tables, choices), choices


# -- the config section ------------------------------------------------------------------------------------------


def test_the_sharding_section_loads_strictly(tmp_path):
    cfg = load_config(_config(tmp_path, "{row_wise_min_rows: 500, ddr_bytes: 8GiB, hbm_bytes: 1000000000, "
                                        "tables: {t_zip: table_wise, t_item_id: {compute_kernel: fused}}}"))
    s = cfg.sharding
    assert (s.row_wise_min_rows, s.ddr_bytes, s.hbm_bytes, s.compute_kernel) == (500, 8 * 2**30, 10**9, "fused")
    assert s.tables["t_zip"].sharding_type == "table_wise" and s.tables["t_zip"].compute_kernel is None
    assert s.tables["t_item_id"].sharding_type is None and s.tables["t_item_id"].compute_kernel == "fused"
    assert cfg.to_dict()["sharding"]["tables"]["t_zip"] == {"sharding_type": "table_wise", "compute_kernel": None}
    default = load_config(_config(tmp_path, "{}")).sharding
    assert default == ShardingConfig() and default.row_wise_min_rows == 1_000_000 and default.ddr_bytes is None


def test_the_readme_example_loads(tmp_path):
    import re

    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
              if b.startswith("sharding:")]
    assert len(blocks) == 1
    path = tmp_path / "run.yaml"
    path.write_text("data: {path: runs/x}\n" + blocks[0])
    s = load_config(path).sharding
    assert s.row_wise_min_rows == 500_000 and s.ddr_bytes == 64 * 2**30
    assert s.tables["t_item_id"].sharding_type == "row_wise" and s.tables["t_zip"].compute_kernel == "fused"


@pytest.mark.parametrize("section,message", [
    ("{tables: {t_zip: diagonal}}", "table t_zip: unknown sharding type 'diagonal'"),
    ("{tables: {t_zip: {sharding: row_wise}}}", "sharding.tables.t_zip: unknown key(s) ['sharding']"),
    ("{tables: {t_zip: {}}}", "sharding.tables.t_zip: give sharding_type and/or compute_kernel"),
    ("{tables: {t_zip: {compute_kernel: key_value}}}", "sharding.tables.t_zip.compute_kernel must be one of"),
    ("{compute_kernel: quant}", "sharding.compute_kernel must be one of"),
    ("{row_wise_min_rows: 0}", "sharding.row_wise_min_rows must be a positive integer or null"),
    ("{rowwise_min_rows: 10}", "unknown key(s) ['rowwise_min_rows']"),
    ("{hbm_bytes: -1}", "sharding.hbm_bytes must be a positive whole number of bytes, got -1"),
    ("{ddr_bytes: 0}", "sharding.ddr_bytes must be a positive whole number of bytes, got 0"),
    ("{ddr_bytes: 8 parsecs}", "sharding.ddr_bytes must be a byte count (e.g. 17179869184 or 16GiB), got '8 parsecs'"),
    ("{hbm_bytes: [1]}", "sharding.hbm_bytes must be a byte count"),
    ("{batch_size: 0}", "sharding.batch_size must be a positive integer or null"),
])
def test_bad_sharding_sections_are_one_line_errors(tmp_path, section, message):
    with pytest.raises(UserError) as err:
        load_config(_config(tmp_path, section))
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'run.yaml'}.sharding: ") and message in text and "\n" not in text


@pytest.mark.parametrize("refused", sorted(REFUSED_SHARDINGS))
def test_refused_sharding_types_name_the_table_and_why(tmp_path, refused):
    with pytest.raises(UserError) as err:
        load_config(_config(tmp_path, f"{{tables: {{t_zip: {refused}}}}}"))
    text = str(err.value)
    assert f"table t_zip: {refused} sharding is refused: " in text and "\n" not in text
    reason = {"data_parallel": "replicas drift apart", "table_row_wise": "deadlocked",
              "column_wise": "needs whole rows", "table_column_wise": "needs whole rows",
              "grid_shard": "needs whole rows"}[refused]
    assert reason in text
    with pytest.raises(ValueError, match=f"table t_zip: {refused} sharding is refused"):
        ShardingConfig(tables={"t_zip": {"sharding_type": refused}})  # the same from Python


# -- the policy on the real ML-100K tables -----------------------------------------------------------------------


def test_the_policy_puts_large_tables_row_wise_and_small_ones_table_wise(ml100k_prepared):
    _, meta = ml100k_prepared
    assert {f"t_{f.name}": f.vocab_size for f in meta.sparse} == ML100K_ROWS
    rows, _ = _plan(meta, ShardingConfig(row_wise_min_rows=500))
    assert len(rows) == 2 * len(ML100K_ROWS)  # FM: the embedding and the first-order tables
    for r in rows:
        big = ML100K_ROWS[r["table"]] >= 500
        assert r["sharding_type"] == ("row_wise" if big else "table_wise"), r
        assert r["chosen_by"] == ("rows >= 500" if big else "rows < 500")
        assert r["ranks"] == ([0, 1] if big else [r["ranks"][0]]) and r["compute_kernel"] == "fused"
        assert sum(s["sizes"][0] for s in r["shards"]) == r["rows"] == ML100K_ROWS[r["table"]]
    assert {r["table"] for r in rows if r["sharding_type"] == "row_wise"} == {"t_user_id", "t_item_id", "t_zip"}
    # TorchRec's own choice (row_wise_min_rows: null) makes every table row-wise, even the 3-row t_gender
    rows, _ = _plan(meta, ShardingConfig(row_wise_min_rows=None))
    assert {r["sharding_type"] for r in rows} == {"row_wise"} and {r["chosen_by"] for r in rows} == {"planner"}
    # the default threshold (1M rows) keeps every ML-100K table whole
    rows, _ = _plan(meta, ShardingConfig())
    assert {r["sharding_type"] for r in rows} == {"table_wise"}


def test_a_table_override_wins_over_the_policy(ml100k_prepared):
    _, meta = ml100k_prepared
    config = ShardingConfig(row_wise_min_rows=500, tables={"t_item_id": "table_wise", "t_gender": "row_wise"})
    rows, choices = _plan(meta, config)
    kinds = {(r["collection"], r["table"]): r["sharding_type"] for r in rows}
    for collection in ("embedding", "linear.tables"):  # one decision per table name, in both collections
        assert kinds[(collection, "t_item_id")] == "table_wise"
        assert kinds[(collection, "t_gender")] == "row_wise"
        assert kinds[(collection, "t_user_id")] == "row_wise" and kinds[(collection, "t_age")] == "table_wise"
    assert choices["t_item_id"].source == "sharding.tables" and choices["t_user_id"].source == "rows >= 500"


def test_plan_errors_name_the_table(ml100k_prepared):
    _, meta = ml100k_prepared
    with pytest.raises(UserError, match=r"sharding.tables: no table named t_nope in the model \(its tables: t_age, "):
        _plan(meta, ShardingConfig(tables={"t_nope": "row_wise"}))
    with pytest.raises(UserError, match="table t_zip: compute kernel dense is not available for table_wise sharding "
                                        "on cpu \\(TorchRec offers fused\\)"):
        _plan(meta, ShardingConfig(tables={"t_zip": {"sharding_type": "table_wise", "compute_kernel": "dense"}}))
    with pytest.raises(UserError, match=r"table t_user_id \(embedding\): embedding_dim 6 is not a multiple of 4"):
        _plan(meta, ShardingConfig(), dim=6)
    with pytest.raises(UserError, match=r"sharding: TorchRec's planner found no plan for 2 rank\(s\) within the "
                                        r"budgets \(hbm_bytes=None, ddr_bytes=1000\)"):
        _plan(meta, ShardingConfig(ddr_bytes=1000))
    # shard_model(sharding_type=...) (plain TorchRec training: no row-pipeline check) still names what TorchRec's
    # sharder does not offer, e.g. table_row_wise on CPU, for an EmbeddingCollection (sequence embeddings) too
    sys.path.insert(0, str(WORKERS))
    from seq_model import SeqModel

    for model, kind in ((FM(meta, embedding_dim=8), "EmbeddingBagCollection"), (SeqModel(meta, dim=8),
                                                                               "EmbeddingCollection")):
        tables = plans.model_tables(model)
        choices = plans.uniform_choices(tables, "table_row_wise", "fused")
        with pytest.raises(UserError, match=f"TorchRec's {kind} sharder does not offer table_row_wise sharding on "
                                            "cpu"):
            plans.check_choices(tables, choices, "cpu", plans.sharders(), row_pipeline=False)


# -- the plan table ----------------------------------------------------------------------------------------------


def test_the_plan_is_printed_and_saved_as_rows(ml100k_prepared, tmp_path, capsys):
    _, meta = ml100k_prepared
    rows, _ = _plan(meta, ShardingConfig(row_wise_min_rows=900, tables={"t_genres": "row_wise"}))
    path = plans.write_plan(tmp_path, rows)
    assert path == tmp_path / "plan.json"
    saved = json.loads(path.read_text())
    assert saved["tables"] == rows
    by = {(r["collection"], r["table"]): r for r in rows}
    zip_row, user_row = by[("embedding", "t_zip")], by[("embedding", "t_user_id")]
    assert (zip_row["rows"], zip_row["dim"], zip_row["sharding_type"], zip_row["bytes"]) == (796, 8, "table_wise",
                                                                                            796 * 8 * 4)
    assert len(zip_row["ranks"]) == 1 and zip_row["shards"] == [{"rank": zip_row["ranks"][0], "offsets": [0, 0],
                                                                  "sizes": [796, 8], "bytes": 796 * 8 * 4}]
    assert user_row["sharding_type"] == "row_wise" and user_row["ranks"] == [0, 1]
    assert [s["sizes"] for s in user_row["shards"]] == [[472, 8], [472, 8]]
    assert by[("linear.tables", "t_genres")]["chosen_by"] == "sharding.tables"
    total = sum(r["bytes"] for r in rows)
    assert sum(saved["bytes_per_rank"].values()) == total and set(saved["bytes_per_rank"]) == {"0", "1"}

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sharding plan (plan.json):"
    assert lines[1].split() == ["collection", "table", "rows", "dim", "sharding", "kernel", "ranks", "bytes",
                                "chosen", "by"]
    body = [ln.split() for ln in lines[2:-1]]
    assert len(body) == len(rows) == 18
    assert ["embedding", "t_zip", "796", "8", "table_wise", "fused", str(zip_row["ranks"][0]), "25,472", "rows", "<",
            "900"] in body
    assert ["embedding", "t_user_id", "944", "8", "row_wise", "fused", "0,1", "30,208", "rows", ">=", "900"] in body
    assert lines[-1].startswith("table bytes per rank: rank 0: ") and f"{total - saved['bytes_per_rank']['0']:,}" \
        in lines[-1]


def test_overwrite_removes_an_earlier_plan(tmp_path):
    from recsys_transfer.train.rundir import open_run_dir

    plans.write_plan(tmp_path, [], echo=False)
    with pytest.raises(UserError, match=r"holds an earlier run \(plan.json\)"):
        open_run_dir(tmp_path, overwrite=False)
    open_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "plan.json").exists()


# -- under torchrun ----------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_a_mixed_plan_sharded_equals_the_single_process_run(ml100k_prepared, tmp_path):
    """The size policy (row_wise from 900 rows: t_user_id, t_item_id row-wise; t_zip and the rest table-wise) with
    the barrier on a row-wise and a table-wise table under transfer: the final weights of 2 ranks equal one
    process's."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_barrier_distributed import LOCAL_BATCH, STEPS, WORLD, _single_process

    data, meta = ml100k_prepared
    torch.manual_seed(0)
    model = FM(meta, embedding_dim=8)
    with torch.no_grad():
        for p in model.embedding.parameters():
            p.normal_(0, 0.1)
    init = model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(WORKERS / "barrier_worker.py"), "--data", str(data), "--init", str(tmp_path / "init.pt"), "--out",
           str(tmp_path / "out"), "--row-wise-min-rows", "900", "--mode", "lexico", "--loss", "mmd", "--optimizer",
           "adam", "--steps", str(STEPS), "--batch", str(LOCAL_BATCH), "--fields", "zip,user_id"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]

    parts = [torch.load(tmp_path / "out" / f"rank{k}.pt") for k in range(WORLD)]
    plan = {(p["collection"], p["table"]): p for p in parts[0]["plan"]}
    assert parts[1]["plan"] == parts[0]["plan"]
    assert {t for (c, t), p in plan.items() if p["sharding_type"] == "row_wise"} == {"t_user_id", "t_item_id"}
    assert plan[("embedding", "t_zip")]["sharding_type"] == "table_wise"  # under transfer, table-wise
    want = _single_process(data, meta, init, "lexico", "mmd", "adam")
    for key, full in want.items():
        got = init[key].clone()
        covered = torch.zeros_like(got, dtype=torch.int32)
        for part in parts:
            for offsets, tensor in part["state"].get(key, []):
                sl = tuple(slice(o, o + s) for o, s in zip(offsets, tensor.shape))
                got[sl] = tensor
                covered[sl] += 1
        if "embedding_bags" in key:
            assert bool((covered == 1).all()), f"{key}: shards overlap or miss rows"
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5, msg=key)
        assert not torch.equal(full, init[key]), f"{key} did not train"
    for table in ("t_zip", "t_user_id"):  # the transfer ran on both layouts
        assert parts[0]["stats"][f"embedding.{table}"]["target_rows"] > 0


@pytest.mark.distributed
def test_the_row_pipeline_refuses_on_every_rank(ml100k_prepared, tmp_path):
    """``shard_model(sharding_type=...)`` does not check the row pipeline; attaching it to a column-wise or
    data-parallel layout is refused on both ranks (before, data_parallel trained silently wrong and a column-wise
    refusal on one rank left the other hanging)."""
    data, _ = ml100k_prepared
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKERS / "refusal_worker.py"), "--data", str(data), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in range(2):
        found = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert set(found) == {"column_wise", "data_parallel"}
        for kind, message in found.items():
            assert message is not None and f"{kind} sharding is refused by the row pipeline: " in message, message
            assert message.startswith("table t_age, t_gender,"), message  # the tables of that layout, every rank


@pytest.mark.distributed
def test_a_torchrun_run_prints_and_saves_its_plan(ml100k_prepared, tmp_path):
    data, _ = ml100k_prepared
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "recsys_transfer", "train", "--config", str(ROOT / "pipelines" / "movielens100k.yaml"),
           "--set", f"data.path={data}", "--set", "train.epochs=1", "--set", "train.progress=false",
           "--set", "model.params.hidden=[16]", "--set", "sharding.row_wise_min_rows=1000",
           "--set", "sharding.tables.t_zip=row_wise", "--output", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    kinds = {r["table"]: (r["sharding_type"], r["chosen_by"]) for r in saved["tables"]}
    assert kinds["t_item_id"] == ("row_wise", "rows >= 1000") and kinds["t_zip"] == ("row_wise", "sharding.tables")
    assert kinds["t_user_id"] == ("table_wise", "rows < 1000")
    assert r.stdout.count("sharding plan (plan.json):") == 1  # rank 0 prints it
    assert len([ln for ln in r.stdout.splitlines() if " t_item_id " in ln]) == len(
        [t for t in saved["tables"] if t["table"] == "t_item_id"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["sharding"]["tables"] == {"t_zip": {"sharding_type": "row_wise", "compute_kernel": None}}

