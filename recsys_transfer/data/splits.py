"""Deterministic train/valid/test assignment and head/tail (source/target) splits.

Random split: every record gets ``u = splitmix64(seed, row_index) / 2**64`` and falls in the first split whose
cumulative fraction exceeds ``u``. The assignment depends only on (seed, global row index), so it is identical
whether a file is read in one piece or streamed in chunks, and needs no state across chunks.

Head/tail (the paper's source S and rough target T, Sec. 2): ``pareto`` puts the top ``fraction`` (default 20%)
of a field's items seen in training, ordered by (count desc, id asc), in the head; ``threshold`` puts every item
with training count >= ``min_count`` in the head. Every other non-OOV id is tail; the OOV row is neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer, vectorized (uint64 arithmetic wraps modulo 2**64 in numpy)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform_from_index(row_index: np.ndarray, seed: int) -> np.ndarray:
    """A float64 in [0, 1) per row, a pure function of (seed, row index)."""
    with np.errstate(over="ignore"):
        key = np.asarray(row_index, dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64))[0]
    return (splitmix64(key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class SplitSpec:
    """How records are assigned to train/valid/test.

    ``kind='random'``: seeded, per-record (see module docstring). ``kind='temporal'``: records sorted by the
    source's time column; the first ``fractions[0]`` go to train, then valid, then test (ties keep file order).
    """

    kind: str = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 2022

    def __post_init__(self) -> None:
        if self.kind not in ("random", "temporal"):
            raise ValueError(f"split kind must be 'random' or 'temporal', got {self.kind!r}")
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or not math.isclose(sum(self.fractions), 1.0):
            raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, got {self.fractions}")

    def assign_random(self, row_index: np.ndarray) -> np.ndarray:
        """Split code per row (0 train, 1 valid, 2 test)."""
        u = uniform_from_index(row_index, self.seed)
        cuts = np.cumsum(self.fractions)[:2]
        return np.searchsorted(cuts, u, side="right").astype(np.uint8)

    def assign_temporal(self, timestamps: np.ndarray) -> np.ndarray:
        """Split code per row from timestamps (stable sort, so ties keep input order)."""
        n = len(timestamps)
        order = np.argsort(timestamps, kind="stable")
        n_train = int(round(self.fractions[0] * n))
        n_valid = int(round(self.fractions[1] * n))
        codes = np.empty(n, dtype=np.uint8)
        codes[order[:n_train]] = 0
        codes[order[n_train : n_train + n_valid]] = 1
        codes[order[n_train + n_valid :]] = 2
        return codes

    def to_json(self) -> dict:
        return {"kind": self.kind, "fractions": list(self.fractions), "seed": self.seed}


@dataclass(frozen=True)
class HeadTailSpec:
    """Source/target rule per field: ``pareto`` (top ``fraction`` of seen items) or ``threshold`` (count >= min_count)."""

    rule: str = "pareto"
    fraction: float = 0.2
    min_count: int = 10

    def __post_init__(self) -> None:
        if self.rule not in ("pareto", "threshold"):
            raise ValueError(f"head/tail rule must be 'pareto' or 'threshold', got {self.rule!r}")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"head fraction must be in (0, 1), got {self.fraction}")
        if self.min_count < 1:
            raise ValueError(f"head min_count must be >= 1, got {self.min_count}")

    def head_ids(self, counts: np.ndarray, oov_index: int = 0) -> np.ndarray:
        """Sorted ids of the head (source) items given per-id training counts."""
        counts = np.asarray(counts, dtype=np.int64).copy()
        ids = np.arange(len(counts))
        valid = ids != oov_index
        if self.rule == "threshold":
            return ids[valid & (counts >= self.min_count)]
        seen = ids[valid & (counts > 0)]
        n_head = int(math.ceil(self.fraction * len(seen)))
        order = np.lexsort((seen, -counts[seen]))  # count desc, then id asc
        return np.sort(seen[order[:n_head]])

    def to_json(self) -> dict:
        return {"rule": self.rule, "fraction": self.fraction, "min_count": self.min_count}
