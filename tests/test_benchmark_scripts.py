"""The logic of benchmarks/checkpoint_io.py and benchmarks/scaling.py that decides what they report (no timing)."""

from __future__ import annotations

import importlib.util
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
