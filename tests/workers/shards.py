"""Put a tensor back together from the shards the distributed workers save (``part["state"][key]``: a list of
``(offsets, tensor)`` per rank), for the tests that compare a sharded run with one process."""

from __future__ import annotations

import torch


def assemble(init: torch.Tensor, parts: list[dict], key: str):
    """``(whole, covered, shards)``: ``init`` overwritten by every rank's shards of ``key``; how many shards wrote
    each element (1 everywhere: no overlap, no gap); and ``(rank, offsets, shape)`` of each shard."""
    whole = init.clone()
    covered = torch.zeros_like(whole, dtype=torch.int32)
    shards = []
    for rank, part in enumerate(parts):
        for offsets, tensor in part["state"].get(key, []):
            sl = tuple(slice(o, o + s) for o, s in zip(offsets, tensor.shape))
            whole[sl] = tensor
            covered[sl] += 1
            shards.append((rank, tuple(offsets), tuple(tensor.shape)))
    return whole, covered, shards
