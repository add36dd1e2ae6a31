"""Prepared parquet -> KeyedJaggedTensor batches, on the real ML-100K data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recsys_transfer.data.loader import BatchLoader
from recsys_transfer.errors import UserError


def _rows(out, meta, split="train") -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out / f) for f in meta.split_files[split]])


def _batches_to_frame(batches, keys) -> pl.DataFrame:
    cols: dict[str, list] = {k: [] for k in keys}
    labels = []
    for b in batches:
        kjt = b.sparse
        assert kjt.keys() == keys
        assert torch.equal(kjt.lengths(), torch.ones(len(keys) * b.batch_size, dtype=torch.int32))
        for k in keys:
            jt = kjt[k]
            assert jt.values().dtype == torch.int64
            cols[k].append(jt.values().numpy())
        labels.append(b.labels["label"].numpy())
    return pl.DataFrame({**{k: np.concatenate(v) for k, v in cols.items()}, "label": np.concatenate(labels)})


def test_round_trip_in_order(ml100k_prepared):
    out, meta = ml100k_prepared
    loader = BatchLoader(out, "train", 1000)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-meta.split_rows["train"] // 1000)
    assert [b.batch_size for b in batches[:-1]] == [1000] * (len(batches) - 1)
    got = _batches_to_frame(batches, meta.sparse_names)
    want = _rows(out, meta).select(meta.sparse_names + ["label"]).with_columns(pl.col("label").cast(pl.Float32))
    assert got.equals(want)
    assert batches[0].dense.shape == (1000, 0) and batches[0].dense.dtype == torch.float32


def test_values_are_field_major(ml100k_prepared):
    out, meta = ml100k_prepared
    b = next(iter(BatchLoader(out, "valid", 7)))
    rows = _rows(out, meta, "valid").head(7)
    expected = np.concatenate([rows[k].to_numpy() for k in meta.sparse_names])
    assert np.array_equal(b.sparse.values().numpy(), expected)
    assert b.sparse.stride() == 7


def test_shuffle_is_a_permutation_and_changes_with_epoch(ml100k_prepared):
    out, meta = ml100k_prepared
    keys = meta.sparse_names
    want = _rows(out, meta).select(keys)
    loader = BatchLoader(out, "train", 512, shuffle=True, seed=3, shuffle_buffer_rows=10_000)
    e0 = _batches_to_frame(list(loader), keys).select(keys)
    e0_again = _batches_to_frame(list(loader), keys).select(keys)
    loader.set_epoch(1)
    e1 = _batches_to_frame(list(loader), keys).select(keys)
    assert e0.equals(e0_again)  # deterministic by (seed, epoch)
    assert not e0.equals(e1) and not e0.equals(want)
    for got in (e0, e1):
        assert got.sort(keys).equals(want.sort(keys))  # same multiset of rows


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_sharding_disjoint_and_complete(ml100k_prepared, world_size):
    out, meta = ml100k_prepared
    keys = ["user_id", "item_id"]  # (user, item) identifies a training row: one rating per pair
    want = _rows(out, meta).select(keys)
    assert want.n_unique() == len(want)
    parts = []
    for rank in range(world_size):
        loader = BatchLoader(out, "train", 256, shuffle=True, seed=1, rank=rank, world_size=world_size)
        frame = _batches_to_frame(list(loader), meta.sparse_names).select(keys)
        assert len(frame) == loader.num_rows
        parts.append(frame)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    union = pl.concat(parts)
    assert union.n_unique() == len(union) == len(want)  # disjoint and complete
    assert union.sort(keys).equals(want.sort(keys))


@pytest.mark.parametrize("world_size", [2, 3])
def test_drop_last_serves_every_rank_the_same_number_of_batches(ml100k_prepared, world_size):
    """Ranks whose parts differ by one row, a batch size that divides the larger part only: without the common
    count the larger rank would serve one batch more (and, in training, wait in a collective the others never
    reach: the hang seen with N = 511, W = 2, batch 64)."""
    out, meta = ml100k_prepared
    n = meta.split_rows["valid"]
    sizes = [n * (r + 1) // world_size - n * r // world_size for r in range(world_size)]
    assert max(sizes) == min(sizes) + 1, sizes  # ML-100K's valid split has an odd number of rows
    big = max(sizes)
    bs = next(d for d in range(2, big + 1) if big % d == 0)  # divides the larger part, not the smaller (= big - 1)
    counts = []
    for rank in range(world_size):
        loader = BatchLoader(out, "valid", bs, shuffle=True, seed=2, rank=rank, world_size=world_size,
                             drop_last=True)
        batches = list(loader)
        assert len(batches) == len(loader) and all(b.batch_size == bs for b in batches)
        counts.append(len(batches))
        loader.set_epoch(0, start_batch=2)  # resuming mid-epoch stops at the same count
        assert len(list(loader)) == len(loader) - 2
    assert counts == [min(sizes) // bs] * world_size


def test_drop_last_and_errors(ml100k_prepared):
    out, meta = ml100k_prepared
    n = meta.split_rows["valid"]
    loader = BatchLoader(out, "valid", 1000, drop_last=True)
    assert len(loader) == n // 1000 == len(list(loader))
    assert all(b.batch_size == 1000 for b in loader)
    with pytest.raises(UserError, match="split must be one of"):
        BatchLoader(out, "validation", 10)
    with pytest.raises(UserError, match="rank 2 outside world_size 2"):
        BatchLoader(out, "train", 10, rank=2, world_size=2)
    with pytest.raises(UserError, match="meta.json missing"):
        BatchLoader(out / "train", "train", 10)


def test_prefetch_gives_the_same_batches_and_stops_its_thread(ml100k_prepared):
    """Batches built ahead in a thread equal the synchronous ones, and leaving the loop early ends the thread."""
    import threading

    data, meta = ml100k_prepared
    kw = dict(shuffle=True, seed=3, shuffle_buffer_rows=5000)
    sync = list(BatchLoader(data, "train", 512, prefetch=0, **kw))
    ahead = list(BatchLoader(data, "train", 512, prefetch=3, **kw))
    assert len(sync) == len(ahead) > 10
    for a, b in zip(sync, ahead):
        assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.dense, b.dense)
        assert torch.equal(a.labels["label"], b.labels["label"])
    for k, _ in enumerate(BatchLoader(data, "train", 512, prefetch=2, **kw)):
        if k == 2:
            break
    assert not [t for t in threading.enumerate() if t.name == "batch-loader"]


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_shuffled_batches_follow_the_documented_order(ml100k_prepared, tmp_path, rank, world_size):
    """The stream is: pieces in the order drawn from (seed, epoch, rank), grouped into buffers of at least
    shuffle_buffer_rows rows, each buffer permuted by the next draw, buffers concatenated, cut into batches (rows
    left at a buffer's end open the next batch). Rebuilt here from pyarrow reads, for several buffers, a batch
    size that does not divide them, and the last partial batch."""
    import shutil

    import pyarrow.parquet as pq

    prepared, meta = ml100k_prepared
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    for rel in meta.split_files["train"]:  # the same rows in row groups of 2,500: many pieces
        pq.write_table(pq.read_table(out / rel), out / rel, row_group_size=2_500)
    loader = BatchLoader(out, "train", 700, shuffle=True, seed=11, shuffle_buffer_rows=6_000, rank=rank,
                         world_size=world_size, prefetch=0)
    loader.set_epoch(2)
    keys = meta.sparse_names
    rng = np.random.default_rng([11, 2, rank])
    pieces = [loader._pieces[k] for k in rng.permutation(len(loader._pieces))]
    frames, group = [], []

    def flush():
        rows = pl.concat([pl.from_arrow(pq.ParquetFile(p.file).read_row_group(p.row_group))
                          .slice(p.start, p.stop - p.start) for p in group])
        frames.append(rows[rng.permutation(len(rows))])

    buffered = 0
    for p in pieces:
        group.append(p)
        buffered += p.stop - p.start
        if buffered >= 6_000:
            flush()
            group, buffered = [], 0
    if group:
        flush()
    assert len(frames) >= 3
    want = pl.concat(frames).select(keys + ["label"]).with_columns(pl.col("label").cast(pl.Float32))
    batches = list(loader)
    full, rest = divmod(len(want), 700)
    assert [b.batch_size for b in batches] == [700] * full + ([rest] if rest else [])
    assert _batches_to_frame(batches, keys).equals(want)


# ---------------------------------------------------------------------------------------------------------
# list fields: jagged KJT features


def _list_rows(out, meta, split="train") -> dict[int, dict]:
    """Row number (dense ``x`` * 4096) -> {field: list of ids} from the parquet files."""
    frame = _rows(out, meta, split)
    got = {}
    for row in frame.iter_rows(named=True):
        got[round(row["x"] * 4096)] = {k: (row[k] if meta.field(k).multi_valued else [row[k]])
                                       for k in meta.sparse_names}
    return got


def _batch_rows(batch, keys) -> list[tuple[int, dict]]:
    """(row number, {field: ids}) of every row of a batch, read back from the KJT (lengths included)."""
    kjt = batch.sparse
    assert kjt.keys() == keys and kjt.stride() == batch.batch_size
    assert len(kjt.lengths()) == len(keys) * batch.batch_size and kjt.lengths().dtype == torch.int32
    per_field = {}
    for k in keys:
        jt = kjt[k]
        per_field[k] = [x.tolist() for x in torch.split(jt.values(), jt.lengths().tolist())]
    xs = (batch.dense[:, 0].double() * 4096).round().long().tolist()  # the row number (tests/conftest.py)
    return [(x, {k: per_field[k][b] for k in keys}) for b, x in enumerate(xs)]


def test_list_fields_are_jagged_in_order_with_empty_lists(lists_prepared):
    out, meta = lists_prepared
    keys = meta.sparse_names
    want = _list_rows(out, meta)
    batches = list(BatchLoader(out, "train", 97))
    got = [r for b in batches for r in _batch_rows(b, keys)]
    assert [x for x, _ in got] == list(want)  # file order
    assert all(want[x] == ids for x, ids in got)
    lengths = np.concatenate([b.sparse["hist"].lengths().numpy() for b in batches])
    assert (lengths == 0).sum() > 50 and lengths.max() >= 6  # empty lists and repeated ids are there
    assert all(torch.equal(b.sparse["item"].lengths(), torch.ones(b.batch_size, dtype=torch.int32)) for b in batches)
    # values are field-major: user's ids, item's, then every hist list, then every tags list
    b = batches[0]
    expected = np.concatenate([b.sparse[k].values().numpy() for k in keys])
    assert np.array_equal(b.sparse.values().numpy(), expected)


@pytest.mark.parametrize("world_size", [1, 2])
def test_list_fields_shuffled_resumed_and_sharded(lists_prepared, world_size):
    """Shuffled over several buffers (batch size not dividing them): each row's lists stay with the row; a resumed
    epoch (set_epoch(epoch, start_batch)) serves exactly the remaining batches; prefetch changes nothing; ranks'
    rows are disjoint and complete."""
    out, meta = lists_prepared
    keys = meta.sparse_names
    want = _list_rows(out, meta)
    seen = []
    for rank in range(world_size):
        loader = BatchLoader(out, "train", 64, shuffle=True, seed=3, shuffle_buffer_rows=500, rank=rank,
                             world_size=world_size, prefetch=0)
        loader.set_epoch(1)
        batches = list(loader)
        rows = [r for b in batches for r in _batch_rows(b, keys)]
        assert all(want[x] == ids for x, ids in rows)
        assert [x for x, _ in rows] != sorted(x for x, _ in rows)  # shuffled
        seen += [x for x, _ in rows]
        loader.set_epoch(1, start_batch=5)
        again = list(loader)
        assert len(again) == len(batches) - 5
        for a, b in zip(again, batches[5:]):
            assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.sparse.lengths(),
                                                                                     b.sparse.lengths())
            assert torch.equal(a.dense, b.dense)
        ahead = BatchLoader(out, "train", 64, shuffle=True, seed=3, shuffle_buffer_rows=500, rank=rank,
                            world_size=world_size, prefetch=3)
        ahead.set_epoch(1)
        for a, b in zip(ahead, batches):
            assert torch.equal(a.sparse.values(), b.sparse.values()) and torch.equal(a.dense, b.dense)
    assert sorted(seen) == sorted(want)


def test_check_shards_accepts_list_columns_and_refuses_a_wrong_type(lists_prepared, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_transfer.data.loader import check_shards

    prepared, meta = lists_prepared
    report = check_shards(prepared, meta)
    assert report["train"]["rows"] == meta.split_rows["train"]
    out = tmp_path / "p"
    shutil.copytree(prepared, out)
    rel = meta.split_files["train"][0]
    table = pq.read_table(out / rel)
    flat = pa.array([len(x) for x in table.column("hist").to_pylist()], type=pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("hist"), "hist", flat), out / rel)
    with pytest.raises(UserError, match="column 'hist' is int64, meta.json says list<int64>"):
        check_shards(out, meta)
