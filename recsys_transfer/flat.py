"""Several tables stored as consecutive row blocks of ONE buffer (the layout of a TBE), and how to see them so.

A lookup or a row update over many small tables costs one kernel call per table on CPU, and the per-call
dispatch, not the arithmetic, dominates. When the tables (and their optimizer state) are row blocks of one
buffer, the same work is one call on the buffer with global row ids ``first_row[t] + id``.
:func:`share_storage` moves same-width tables into one buffer (each Parameter keeps its identity and values:
its ``.data`` becomes a row block), :func:`rows_of_one_buffer` recognises such a layout (checked on every use,
so a tensor re-allocated elsewhere just falls back to the per-table path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def rows_of_one_buffer(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """``(base, first rows)`` when every tensor is a contiguous block of whole rows of one storage (same dtype,
    device and row shape): ``base`` views that storage as rows (``[N, *row_shape]``) and ``tensors[k]`` is
    ``base[first[k] : first[k] + len(tensors[k])]``. None otherwise."""
    t0 = tensors[0]
    if t0.dim() == 0:
        return None
    row_shape = t0.shape[1:]
    storage = t0.untyped_storage()
    lo = storage.data_ptr()
    hi = lo + storage.nbytes()
    row_bytes = t0.element_size() * (t0[0].numel() if len(t0) else row_shape.numel())
    firsts = []
    for t in tensors:  # a tensor whose bytes lie inside t0's storage is part of it (allocations never overlap)
        ptr = t.data_ptr()
        if (t.shape[1:] != row_shape or t.dtype != t0.dtype or not lo <= ptr < hi or (ptr - lo) % row_bytes
                or ptr + t.shape[0] * row_bytes > hi or not t.is_contiguous()):
            return None
        firsts.append((ptr - lo) // row_bytes)
    n = (hi - lo) // row_bytes
    base = torch.empty(0, dtype=t0.dtype, device=t0.device).set_(
        storage, 0, (n, *row_shape), torch.empty((n, *row_shape), device="meta").stride())
    return base, firsts


def share_storage(tensors: Sequence[torch.Tensor]) -> None:
    """Move tensors of equal row shape, dtype and device into one buffer, in the given order (values kept; each
    tensor's ``.data`` becomes a row block of the buffer). Groups already laid out so are left alone."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((tuple(t.shape[1:]), t.dtype, t.device), []).append(t)
    for ts in groups.values():
        if len(ts) < 2 or consecutive(ts):
            continue
        with torch.no_grad():  # an empty buffer filled table by table: each old table is freed once moved,
            buf = torch.empty((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), dtype=ts[0].dtype, device=ts[0].device)
            row = 0  # so the peak is the tables plus the largest one, not twice the tables
            for t in ts:
                block = buf[row : row + t.shape[0]]
                block.copy_(t.detach())
                t.data = block
                row += t.shape[0]


def consecutive(tensors: Sequence[torch.Tensor]) -> bool:
    """The tensors are row blocks of one buffer, in order and without gaps."""
    flat = rows_of_one_buffer(tensors)
    if flat is None:
        return False
    firsts = flat[1]
    return all(firsts[k + 1] == firsts[k] + tensors[k].shape[0] for k in range(len(tensors) - 1))


def global_rows(rows: Sequence[torch.Tensor], firsts: Sequence[int]) -> torch.Tensor:
    """``cat(rows[k] + firsts[k])``: row ids of several blocks in their shared buffer."""
    if len(rows) == 1:
        return rows[0] + firsts[0]
    return torch.cat([r + f for r, f in zip(rows, firsts)])


class Lazy(Sequence):
    """``[make(0), ..., make(n - 1)]``, each element made when first asked for (and kept). The per-table views of
    one lookup call's arrays (a slice and a shift per table: ~3 us each, ~0.1 ms per call for Criteo's 39 tables)
    are passed around as these: the whole-buffer paths, which use the call's arrays directly, never make them."""

    def __init__(self, n: int, make: Callable[[int], torch.Tensor]) -> None:
        self._made: list = [None] * n
        self._make = make

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        v = self._made[k]
        if v is None:
            v = self._made[k] = self._make(k if k >= 0 else k + len(self))
        return v


class Blocks(Lazy):
    """The row blocks ``whole[lo:hi]`` of one tensor for ``spans`` (each ``(lo, hi)``), sliced when asked for;
    :func:`join` of them is ``whole`` itself when the spans tile it in order, found from the spans alone."""

    def __init__(self, whole: torch.Tensor, spans: Sequence[tuple[int, int]]) -> None:
        super().__init__(len(spans), lambda k: whole[spans[k][0] : spans[k][1]])
        self.whole, self.spans = whole, spans

    def tiles(self) -> bool:
        """The spans cover ``whole``'s rows in order, without gaps."""
        spans = self.spans
        return (len(spans) > 0 and spans[0][0] == 0 and spans[-1][1] == len(self.whole)
                and all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1)))


def join(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(blocks)``, without the copy when the blocks are adjacent row blocks of one tensor, in order
    (e.g. the per-table slices of one update direction): then the result is a view covering them."""
    if isinstance(blocks, Blocks) and blocks.tiles():
        return blocks.whole
    b0 = blocks[0]
    if len(blocks) == 1:
        return b0
    if b0.dim() >= 1 and all(b.is_contiguous() for b in blocks):
        storage = b0.untyped_storage().data_ptr()
        nbytes = b0.element_size()
        end = b0.data_ptr() + b0.numel() * nbytes
        adjacent = True
        for b in blocks[1:]:
            if (b.dtype != b0.dtype or b.shape[1:] != b0.shape[1:] or b.untyped_storage().data_ptr() != storage
                    or b.data_ptr() != end):
                adjacent = False
                break
            end += b.numel() * nbytes
        if adjacent:
            return b0.as_strided((sum(len(b) for b in blocks), *b0.shape[1:]), b0.stride())
    return torch.cat(list(blocks))


class LayoutCache:
    """:func:`rows_of_one_buffer` of a list of tensors that is looked up every step: remembered while every tensor
    keeps its data pointer, shape and dtype (the check is a tuple of those, ~1 us per tensor, instead of the full
    layout analysis). Holds at most one layout, so it keeps at most one storage alive."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, list[int]] | None = None

    def __deepcopy__(self, memo: dict) -> "LayoutCache":
        return LayoutCache()  # a copy's tensors live elsewhere; do not drag this buffer along

    def __getstate__(self) -> dict:
        return {"_key": None, "_value": None}

    def get(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
        key = tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors)
        if key != self._key:
            self._value = rows_of_one_buffer(tensors)  # any row shape: [R, D] tables, [R] per-row state
            self._key = key
        return self._value
