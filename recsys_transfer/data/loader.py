"""Prepared parquet -> :class:`~recsys_transfer.types.Batch` (dense tensor, KeyedJaggedTensor, labels).

Rank sharding: the ``N`` rows of a split, in file order, are cut into ``world_size`` contiguous ranges
``[N*r//W, N*(r+1)//W)``; rank ``r`` reads only the parquet row groups overlapping its range, so the ranks'
parts are disjoint, their union is the whole split, and their sizes differ by at most one row. (Ranks may then
differ by one batch when ``drop_last=False``; distributed training should use ``drop_last=True``, which serves every
rank the same number of batches, ``(N // W) // batch_size``: a rank holding one row more than another could
otherwise fill one batch more -- N = 511, W = 2, batch 64 gave 3 and 4 -- and wait forever in a collective the
others never reach.)

Shuffling (``shuffle=True``) is two-level and memory-bounded, as in TorchRec's and tf.data's loaders: each epoch
the rank's row-group pieces are visited in an order drawn from ``(seed, epoch, rank)``, pieces are gathered into a
buffer of about ``shuffle_buffer_rows`` rows, and the buffer is permuted before it is cut into batches. With a
buffer at least as large as the split this is a full uniform shuffle. Call :meth:`BatchLoader.set_epoch` each
epoch (like ``DistributedSampler``) to get a new order.

The hot path is columnar: one ``read_row_group`` per piece, decoded straight into the buffer's arrays, one numpy
gather per batch from the buffer in its permuted order (a permuted copy of the whole buffer is never made, so the
first batch of an epoch waits only for the reads), a transpose of the batch's ids into the KJT's field-major
layout, and one ``torch.from_numpy`` per batch tensor; no Python loop touches individual rows.

List fields (``multi_valued`` in ``meta.json``, parquet ``list<int64>``) become jagged KJT features: the buffer
keeps, per list field, the ids of its rows one after another and their offsets (:class:`_Lists`); a batch's
lists are gathered with numpy index arithmetic (lengths from the offsets, one ``repeat`` and one ``take`` per
field), and the KJT's lengths are the lists' lengths (an empty list: length 0; a null list is empty).
Single-valued fields keep the row-major ``[n, F]`` path above; a dataset without list fields builds exactly the
batches it always did (lengths all ones).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_transfer.data.prefetch import read_ahead
from recsys_transfer.data.prepared import DatasetMeta
from recsys_transfer.data.splits import SPLITS
from recsys_transfer.errors import UserError
from recsys_transfer.types import Batch


def _open_shard(path: Path) -> pq.ParquetFile:
    """A parquet shard, or one :class:`UserError` line naming it when it is truncated or not parquet."""
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{path}: unreadable parquet shard ({exc}); prepare the data again") from None


def check_shards(data_dir: str | Path, meta: DatasetMeta | None = None) -> dict[str, dict]:
    """Read every row of every shard of every split (``recsys-transfer info --check``): per split the shards,
    rows and whether they match ``meta.json`` (list fields must be ``list<int>`` columns, the other sparse fields
    integer ones); a shard that cannot be read is a :class:`UserError` naming it."""
    data_dir = Path(data_dir)
    meta = meta or DatasetMeta.load(data_dir)
    columns = meta.sparse_names + meta.dense + meta.labels
    report = {}
    for split in SPLITS:
        rows = 0
        for rel in meta.split_files[split]:
            path = data_dir / rel
            if not path.is_file():
                raise UserError(f"{path}: shard listed in meta.json is missing; prepare the data again")
            pf = _open_shard(path)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise UserError(f"{path}: columns {missing} missing from the shard; prepare the data again")
            for f in meta.sparse:  # a list field is list<int>, any other an integer column
                kind = pf.schema_arrow.field(f.name).type
                is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
                ids = kind.value_type if is_list else kind
                if is_list != f.multi_valued or not pa.types.is_integer(ids):
                    want = "list<int64>" if f.multi_valued else "int64"
                    raise UserError(f"{path}: column {f.name!r} is {kind}, meta.json says {want}; prepare the data "
                                    "again")
            for g in range(pf.metadata.num_row_groups):
                try:
                    rows += pf.read_row_group(g, columns=columns).num_rows
                except (OSError, ValueError, pa.ArrowException) as exc:
                    raise UserError(f"{path}: unreadable parquet shard (row group {g}: {exc}); prepare the data "
                                    "again") from None
        expected = meta.split_rows[split]
        if rows != expected:
            raise UserError(f"{data_dir}: {split} shards hold {rows} rows, meta.json says {expected}; prepare the "
                            "data again")
        report[split] = {"shards": len(meta.split_files[split]), "rows": rows}
    return report


@dataclass(frozen=True)
class _Piece:
    file: Path
    row_group: int
    start: int  # first row inside the row group
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class _Lists:
    """The lists of one list field for ``n`` rows: row ``k``'s ids are ``values[offsets[k]:offsets[k + 1]]``
    (``offsets`` int64 ``[n + 1]``, starting at 0; ``values`` int64)."""

    offsets: np.ndarray
    values: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def of_lengths(lengths: np.ndarray, values: np.ndarray) -> "_Lists":
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _Lists(offsets, values)

    def take(self, idx: np.ndarray | slice) -> "_Lists":
        if isinstance(idx, slice):  # a contiguous run of rows (step 1): a view of the values
            lo, hi, _ = idx.indices(len(self.offsets) - 1)
            hi = max(hi, lo)
            a, b = self.offsets[lo], self.offsets[hi]
            return _Lists(self.offsets[lo : hi + 1] - a, self.values[a:b])
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        out = _Lists.of_lengths(lengths, self.values)
        # element j of the gathered lists comes from values[starts[row] + (j - out.offsets[row])]
        pos = np.arange(out.offsets[-1], dtype=np.int64) + np.repeat(starts - out.offsets[:-1], lengths)
        out.values = self.values[pos]
        return out

    @staticmethod
    def concat(parts: list["_Lists"]) -> "_Lists":
        return _Lists.of_lengths(np.concatenate([p.lengths for p in parts]), np.concatenate([p.values for p in parts]))


def _list_column(column: pa.ChunkedArray) -> _Lists:
    """A parquet ``list<int64>`` column as :class:`_Lists` (a null list is an empty one)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return _Lists.of_lengths(lengths, values)


@dataclass
class _Rows:
    """Rows of a split: ``sparse`` int64 [n, F_single] (the single-valued fields), ``dense`` float32 [n, D],
    ``labels`` float32 [n, L], and ``lists``: one :class:`_Lists` per list field. Row major, so the gather of a
    shuffled batch reads each row's ids from one or two cache lines (a field-major buffer would cost a cache miss
    per id)."""

    sparse: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    lists: list[_Lists]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray | slice) -> "_Rows":
        return _Rows(self.sparse[idx], self.dense[idx], self.labels[idx], [x.take(idx) for x in self.lists])

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        arrays = (np.concatenate([getattr(p, k) for p in parts]) for k in ("sparse", "dense", "labels"))
        lists = [_Lists.concat([p.lists[j] for p in parts]) for j in range(len(parts[0].lists))]
        return _Rows(*arrays, lists)


class BatchLoader:
    """Iterates :class:`Batch` objects over one split of a prepared dataset (see module docstring).

    Example::

        loader = BatchLoader("runs/ml100k", "train", batch_size=1024, shuffle=True, seed=0)
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                logits = model(batch)
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer_rows: int = 1_000_000,
        meta: DatasetMeta | None = None,
        prefetch: int = 4,
        pin_memory: bool = False,
        transform: Callable[[Batch, int, int], Batch] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world_size {world_size}")
        if prefetch < 0:
            raise UserError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = prefetch
        self.pin_memory = pin_memory  # batches in page-locked memory (built in the loader thread), for GPU copies
        # transform(batch, epoch, batch index) -> batch, applied to every batch (e.g. data.sequences.
        # SequenceSampling): the index counts the epoch's batches from 0, so a resumed epoch gets the same batches
        self.transform = transform
        self.data_dir = Path(data_dir)
        self.meta = meta or DatasetMeta.load(self.data_dir)
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, batch_size)
        self.epoch = 0
        self.start_batch = 0  # batches of the epoch to pass over (a resumed run: set_epoch(epoch, start_batch=k))
        self.keys = self.meta.sparse_names
        self._singles = [k for k in self.keys if not self.meta.field(k).multi_valued]  # columns of _Rows.sparse
        self._lists = [k for k in self.keys if self.meta.field(k).multi_valued]  # _Rows.lists, in this order
        self._list_set = frozenset(self._lists)
        self._columns = self.keys + self.meta.dense + self.meta.labels
        self._pieces, self.num_rows = self._plan()
        self._fewest_rows = self.meta.split_rows[self.split] // self.world_size  # the smallest rank's rows
        self._files: dict[Path, pq.ParquetFile] = {}

    # -- planning ----------------------------------------------------------------------------------------------
    def _plan(self) -> tuple[list[_Piece], int]:
        groups: list[tuple[Path, int, int]] = []  # (file, row group, rows)
        for rel in self.meta.split_files[self.split]:
            path = self.data_dir / rel
            if not path.is_file():
                raise UserError(f"{path}: shard listed in meta.json is missing; prepare the data again")
            md = _open_shard(path).metadata
            groups += [(path, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        total = sum(n for _, _, n in groups)
        if total != self.meta.split_rows[self.split]:
            raise UserError(f"{self.data_dir}: {self.split} shards hold {total} rows, meta.json says "
                            f"{self.meta.split_rows[self.split]}; prepare the data again")
        lo = total * self.rank // self.world_size
        hi = total * (self.rank + 1) // self.world_size
        pieces, offset = [], 0
        for path, g, n in groups:
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                pieces.append(_Piece(path, g, a - offset, b - offset))
            offset += n
        return pieces, hi - lo

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch whose order the next iteration serves, from its batch ``start_batch`` on: a run resumed
        mid-epoch gets exactly the batches the interrupted run had not trained yet (the order depends on ``(seed,
        epoch, rank)`` only). Buffers wholly before that batch are not read, only their permutation is drawn."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        if self.drop_last:  # every rank the same count (module docstring)
            return self._fewest_rows // self.batch_size
        full, rest = divmod(self.num_rows, self.batch_size)
        return full + (1 if rest else 0)

    # -- reading -----------------------------------------------------------------------------------------------
    def _read_into(self, piece: _Piece, out: _Rows, lo: int) -> list[_Lists]:
        """Decode one piece straight into rows ``lo:lo + len(piece)`` of ``out`` (no per-piece arrays to stack
        and concatenate afterwards); returns the piece's lists of each list field."""
        pf = self._files.get(piece.file)
        if pf is None:
            pf = self._files[piece.file] = _open_shard(piece.file)
        n = len(piece)
        try:
            table = pf.read_row_group(piece.row_group, columns=self._columns).slice(piece.start, n)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise UserError(f"{piece.file}: unreadable parquet shard (row group {piece.row_group}: {exc}); "
                            "prepare the data again") from None
        for names, array in ((self._singles, out.sparse), (self.meta.dense, out.dense), (self.meta.labels, out.labels)):
            for j, name in enumerate(names):
                array[lo : lo + n, j] = table.column(name).to_numpy()
        return [_list_column(table.column(name)) for name in self._lists]

    def _read_buffer(self, pieces: list[_Piece]) -> _Rows:
        n = sum(len(p) for p in pieces)
        out = _Rows(np.empty((n, len(self._singles)), dtype=np.int64), np.empty((n, len(self.meta.dense)), np.float32),
                    np.empty((n, len(self.meta.labels)), np.float32), [])
        lo = 0
        lists: list[list[_Lists]] = []
        for piece in pieces:
            lists.append(self._read_into(piece, out, lo))
            lo += len(piece)
        out.lists = [_Lists.concat([part[j] for part in lists]) if len(lists) != 1 else lists[0][j]
                     for j in range(len(self._lists))]
        return out

    def _buffers(self) -> Iterator[tuple[int, Callable[[], _Rows], np.ndarray | None]]:
        """(rows in the buffer, a function reading them, the order to serve them in; None = as stored). The
        permutation is drawn whether or not the buffer is read, so skipping buffers keeps the later orders."""
        if not self.shuffle:
            for piece in self._pieces:
                yield len(piece), (lambda piece=piece: self._read_buffer([piece])), None
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        order = rng.permutation(len(self._pieces))
        group: list[_Piece] = []
        buffered = 0
        for k in order:
            piece = self._pieces[k]
            group.append(piece)
            buffered += len(piece)
            if buffered >= self.shuffle_buffer_rows:
                yield buffered, (lambda group=group: self._read_buffer(group)), rng.permutation(buffered)
                group, buffered = [], 0
        if group:
            yield buffered, (lambda group=group: self._read_buffer(group)), rng.permutation(buffered)

    def __iter__(self) -> Iterator[Batch]:
        """Batches in order; with ``prefetch > 0`` they are built (parquet decoding, shuffling, KJT layout) in a
        background thread up to ``prefetch`` batches ahead, overlapping the training step that consumes them
        (pyarrow and numpy release the GIL). Memory: ``prefetch`` extra batches."""
        batches = self._batches()
        if self.drop_last:  # the rank holding a row more stops where the others do (module docstring)
            batches = itertools.islice(batches, max(0, len(self) - self.start_batch))
        if self.prefetch:
            return read_ahead(batches, name="batch-loader", depth=self.prefetch)
        return batches

    def _batches(self) -> Iterator[Batch]:
        """The buffers' rows, each buffer in its order, as one stream cut into batches: a batch is gathered from
        its buffer when it is built (so a permuted buffer is never copied whole), and rows left over at the end of
        a buffer open the first batch of the next one. The first ``start_batch`` batches are passed over: their
        rows are counted, not gathered, and a buffer holding none of the served rows is not read."""
        bs = self.batch_size
        index = self.start_batch  # the epoch's number of the next batch served
        skip = self.start_batch * bs  # rows of the stream before the first served batch
        seen = 0  # rows of the stream before the current buffer
        carry: _Rows | None = None
        for n, read, order in self._buffers():
            if seen + n <= skip:
                seen += n
                continue
            rows, pos = read(), max(skip - seen, 0)
            seen += n

            def part(lo: int, hi: int) -> _Rows:
                return rows.take(slice(lo, hi) if order is None else order[lo:hi])

            if carry is not None:
                pos = min(bs - len(carry), n)
                carry = _Rows.concat([carry, part(0, pos)])
                if len(carry) < bs:
                    continue
                yield self._to_batch(carry, index)
                index += 1
                carry = None
            while pos + bs <= n:
                yield self._to_batch(part(pos, pos + bs), index)
                index += 1
                pos += bs
            if pos < n:
                carry = part(pos, n)
        if carry is not None and len(carry) and not self.drop_last:
            yield self._to_batch(carry, index)

    def _to_batch(self, rows: _Rows, index: int = 0) -> Batch:
        n = len(rows)
        if not self._lists:
            # KJT values are field-major: all rows of field 0, then field 1, ...; lengths [F * B], all ones.
            values = torch.from_numpy(np.ascontiguousarray(rows.sparse.T).reshape(-1))
            lengths = torch.ones(len(self.keys) * n, dtype=torch.int32)
        else:  # field-major too; a list field contributes its rows' lists and their lengths
            singles = np.ascontiguousarray(rows.sparse.T)  # [F_single, n]
            ones = np.ones(n, dtype=np.int32)
            parts, lens = [], []
            s = k = 0
            for name in self.keys:
                if name in self._list_set:
                    parts.append(rows.lists[k].values)
                    lens.append(rows.lists[k].lengths.astype(np.int32))
                    k += 1
                else:
                    parts.append(singles[s])
                    lens.append(ones)
                    s += 1
            values = torch.from_numpy(np.concatenate(parts))
            lengths = torch.from_numpy(np.concatenate(lens))
        sparse = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, stride=n)
        labels = torch.from_numpy(np.ascontiguousarray(rows.labels))
        batch = Batch(
            dense=torch.from_numpy(np.ascontiguousarray(rows.dense)),
            sparse=sparse,
            labels={name: labels[:, k] for k, name in enumerate(self.meta.labels)},
        )
        if self.transform is not None:
            batch = self.transform(batch, self.epoch, index)
        return batch.pin_memory() if self.pin_memory else batch
