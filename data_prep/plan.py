"""The conversion plan: which input lands in which shard slot, fixed before any work starts.

One seeded permutation is applied to the listing (per source-defined split, or once to
the whole listing before cutting it into splits by fraction). Each split's permuted
positions are cut into shards of exactly `samples_per_shard` positions (the last one
shorter), so a sample's shard and slot depend only on (listing, seed, shard size) and
never on how many tasks or workers run. Array tasks take shards round-robin.

Nothing here holds a per-item array for the whole listing: a shard's listing indices
are computed on demand from the bijection (sharding.permutation).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from sharding import format as fmt
from sharding.permutation import FeistelPermutation

# Splits named by a source are ordered like this; others follow alphabetically.
SPLIT_ORDER = ("train", "val", "test")


def split_sort_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


@dataclass(frozen=True)
class SplitPlan:
    """Position p of this split holds listing item base + perm(perm_offset + p)."""

    name: str
    count: int
    base: int
    perm_size: int
    perm_offset: int
    perm_seed: int


@dataclass(frozen=True)
class ShardTask:
    split: str
    shard: int
    start: int  # first position within the split
    stop: int

    @property
    def name(self) -> str:
        return fmt.shard_name(self.split, self.shard)

    @property
    def num_inputs(self) -> int:
        return self.stop - self.start


def _split_seed(seed: int, split: str) -> int:
    return (int(seed) << 32) ^ zlib.crc32(split.encode())


class Plan:
    def __init__(self, splits: list[SplitPlan], samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.splits = splits
        self.samples_per_shard = samples_per_shard
        self._perms: dict[str, FeistelPermutation] = {}

    @classmethod
    def by_source_splits(cls, counts: dict[str, int], seed: int, samples_per_shard: int) -> "Plan":
        """`counts` in listing order: each split is a contiguous block of the listing."""
        splits, base = [], 0
        for name, n in counts.items():
            splits.append(SplitPlan(fmt.check_split_name(name), n, base, n, 0, _split_seed(seed, name)))
            base += n
        return cls(splits, samples_per_shard)

    @classmethod
    def by_fraction(cls, n: int, fractions: dict[str, float], seed: int, samples_per_shard: int) -> "Plan":
        total = sum(fractions.values())
        if not fractions or any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
        splits, cum, start = [], 0.0, 0
        for name, frac in fractions.items():
            cum += frac
            stop = round(n * cum / total)
            if stop > start:
                splits.append(SplitPlan(fmt.check_split_name(name), stop - start, 0, n, start, int(seed)))
            start = stop
        return cls(splits, samples_per_shard)

    def shards(self) -> list[ShardTask]:
        out = []
        for sp in self.splits:
            for i in range(math.ceil(sp.count / self.samples_per_shard)):
                start = i * self.samples_per_shard
                out.append(ShardTask(sp.name, i, start, min(start + self.samples_per_shard, sp.count)))
        return out

    def shards_for_task(self, task_index: int, num_tasks: int) -> list[ShardTask]:
        if not 0 <= task_index < num_tasks:
            raise ValueError(f"task index {task_index} outside 0..{num_tasks - 1}")
        return self.shards()[task_index::num_tasks]

    def split(self, name: str) -> SplitPlan:
        return next(sp for sp in self.splits if sp.name == name)

    def listing_indices(self, task: ShardTask) -> np.ndarray:
        sp = self.split(task.split)
        if sp.name not in self._perms:
            self._perms[sp.name] = FeistelPermutation(sp.perm_size, sp.perm_seed)
        positions = np.arange(sp.perm_offset + task.start, sp.perm_offset + task.stop, dtype=np.int64)
        return sp.base + self._perms[sp.name](positions)

    def to_dict(self) -> dict:
        return {"samples_per_shard": self.samples_per_shard, "splits": [asdict(s) for s in self.splits]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls([SplitPlan(**s) for s in d["splits"]], d["samples_per_shard"])
