"""The epoch plan: what every global step consumes, computed from per-shard sample counts alone.

For a given (seed, epoch) the split's shards are put in a seeded order and read as one long
sequence of samples. That sequence is cut into `P = width * cycle` partitions, each a
contiguous run of it, so a shard is read front to back by one reader, or by two where a
partition boundary falls inside it. Partitions are grouped in `cycle` blocks of `width`:

    step s reads block  q = s % cycle;  each of its `width` partitions yields `chunk`
    consecutive outputs (chunk = global_batch // width), output indices
    [(s // cycle) * chunk, (s // cycle + 1) * chunk) of that partition's shuffled order.

The global batch of step s is those `width` chunks in partition order; rank r of W takes the
contiguous slice of `width / W` partitions, so every rank gets `global_batch / W` samples each
step. A DataLoader worker of a rank takes every K-th step; because K divides `cycle`, a worker
always reads the same blocks, so each partition has exactly one reader. None of this depends
on the world size: after s steps the consumed samples are a function of (seed, epoch, s), which
is why (epoch, step) is the whole resumable state and a resumed run may change world size.

Remainder rule: an epoch has `steps = N // global_batch` steps. Partition lengths are set so
the partitions tile exactly the first `steps * global_batch` samples of the epoch's shard
sequence; the last `N % global_batch` samples (< one global batch, the tail of that epoch's
shard order, so a different tail every epoch) are not read in that epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from vitscale_common.errors import UserError

# Distinct stream tags so the shard order and the in-partition shuffles never share draws.
_SHARD_ORDER_TAG = 0x5A1
_PARTITION_SHUFFLE_TAG = 0x5A2


class PlanError(UserError):
    """A stream layout that cannot serve the requested batch, world size or readers."""


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """How an epoch is cut; fixed for a run (changing it changes the sample order)."""

    global_batch: int  # samples per global step, summed over ranks
    width: int  # partitions read by one global step; the world size must divide it
    cycle: int  # steps between two visits of a partition; readers per rank must divide it

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.width < 1 or self.cycle < 1:
            raise PlanError(f"stream layout needs positive sizes, got {self}")
        if self.global_batch % self.width:
            raise PlanError(f"global batch {self.global_batch} is not a multiple of data.stream_width={self.width}")

    @property
    def partitions(self) -> int:
        return self.width * self.cycle

    @property
    def chunk(self) -> int:
        """Consecutive outputs one partition contributes to a step."""
        return self.global_batch // self.width

    def check_readers(self, world_size: int, readers: int) -> None:
        """Raise unless `world_size` ranks with `readers` partition readers each can share the plan."""
        if self.width % world_size:
            raise PlanError(
                f"world size {world_size} does not divide data.stream_width={self.width}; "
                f"choose a stream_width that is a multiple of every world size the run may use"
            )
        if self.cycle % max(readers, 1):
            raise PlanError(f"data.readers={readers} does not divide data.stream_cycle={self.cycle}")


def default_width(global_batch: int, num_shards: int, cycle: int, cap: int = 64) -> int:
    """The default `stream_width`: a power of two dividing the global batch, at most `cap`.

    It is also kept to about `num_shards / cycle` (but at least 8, one node's GPUs), so a small
    dataset is not cut into partitions much shorter than a shard. It depends only on the batch
    and the dataset, never on the world size: any power-of-two world size up to it can resume.
    """
    limit = min(cap, max(8, num_shards // cycle))
    width = 1
    while width * 2 <= limit and global_batch % (width * 2) == 0:
        width *= 2
    return width


class Segment(NamedTuple):
    """A contiguous run of samples inside one shard, read front to back."""

    shard: int  # index into the split's shard list (not the epoch order)
    first: int  # first sample (position in the shard)
    count: int


class Slot(NamedTuple):
    """One partition's contribution to a step: outputs [lo, hi) of its shuffled order."""

    partition: int
    lo: int
    hi: int


class EpochPlan:
    """The plan of one epoch. Holds O(number of shards + cycle) numbers, never per-sample rows."""

    def __init__(self, shard_counts: Sequence[int], layout: StreamLayout, seed: int, epoch: int):
        counts = np.asarray(shard_counts, dtype=np.int64)
        if counts.ndim != 1 or len(counts) == 0 or (counts < 0).any():
            raise PlanError("the split has no shards, or a negative shard sample count")
        self.layout, self.seed, self.epoch = layout, seed, epoch
        self.shard_counts = counts
        self.order = np.random.default_rng([seed, epoch, _SHARD_ORDER_TAG]).permutation(len(counts))
        self.cum = np.concatenate([[0], np.cumsum(counts[self.order])])  # offsets in epoch sequence
        self.num_samples = int(self.cum[-1])
        self.steps = self.num_samples // layout.global_batch
        if self.steps == 0:
            raise PlanError(
                f"the split has {self.num_samples} samples, fewer than one global batch ({layout.global_batch})"
            )
        self.remainder = self.num_samples - self.steps * layout.global_batch
        q = np.arange(layout.cycle)
        visits = np.maximum(0, -((q - self.steps) // layout.cycle))  # ceil((steps - q) / cycle)
        self.block_len = visits * layout.chunk  # length of each partition of block q
        self.block_start = np.concatenate([[0], np.cumsum(self.block_len * layout.width)])

    # -- partitions -------------------------------------------------------------------------
    def partition_length(self, p: int) -> int:
        return int(self.block_len[p // self.layout.width])

    def partition_start(self, p: int) -> int:
        """Offset of partition p in the epoch's sample sequence."""
        q, i = divmod(p, self.layout.width)
        return int(self.block_start[q] + i * self.block_len[q])

    def partition_boundaries(self) -> np.ndarray:
        """Start offsets of all partitions (P numbers), then the end of the last."""
        w = self.layout.width
        starts = (self.block_start[:-1, None] + np.arange(w)[None, :] * self.block_len[:, None]).ravel()
        return np.concatenate([starts, [self.block_start[-1]]])

    def partition_segments(self, p: int) -> list[Segment]:
        """The shard runs partition p reads, in order."""
        lo = self.partition_start(p)
        hi = lo + self.partition_length(p)
        segments = []
        i = int(np.searchsorted(self.cum, lo, side="right")) - 1
        while lo < hi:
            end = min(hi, int(self.cum[i + 1]))
            if end > lo:
                segments.append(Segment(int(self.order[i]), lo - int(self.cum[i]), end - lo))
            lo = end
            i += 1
        return segments

    # -- steps ------------------------------------------------------------------------------
    def step_slots(self, step: int) -> list[Slot]:
        """The global batch of `step` in canonical order: `width` chunks, partition by partition."""
        return self.rank_slots(step, 0, 1)

    def rank_slots(self, step: int, rank: int, world_size: int) -> list[Slot]:
        """Rank `rank`'s contiguous share of the global batch of `step`."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside epoch of {self.steps} steps")
        L = self.layout
        per_rank = L.width // world_size
        q, visit = step % L.cycle, step // L.cycle
        first = q * L.width + rank * per_rank
        lo, hi = visit * L.chunk, (visit + 1) * L.chunk
        return [Slot(p, lo, hi) for p in range(first, first + per_rank)]

    def rank_partitions(self, rank: int, world_size: int) -> list[int]:
        """Every partition rank `rank` reads this epoch (a fixed, interleaved set)."""
        L = self.layout
        per_rank = L.width // world_size
        return [q * L.width + rank * per_rank + i for q in range(L.cycle) for i in range(per_rank)]


def partition_order(length: int, buffer: int, seed: int, epoch: int, partition: int) -> np.ndarray:
    """Output order of a partition read sequentially through a `buffer`-sample shuffle buffer.

    Simulated on positions only (no data), so a reader can tell which positions a resumed
    stream still owes and where the consumed prefix ends, without replaying any bytes.
    Entry j is the position (0-based, in reading order) of the j-th output.
    """
    rng = np.random.default_rng([seed, epoch, partition, _PARTITION_SHUFFLE_TAG])
    if buffer <= 1 or length <= 1:
        return np.arange(length, dtype=np.int64)
    out = np.empty(length, dtype=np.int64)
    buf: list[int] = []
    picks = rng.integers(0, buffer, size=max(0, length - buffer))
    n = 0
    for pos in range(length):
        if len(buf) < buffer:
            buf.append(pos)
            continue
        k = int(picks[pos - buffer])
        out[n], buf[k] = buf[k], pos
        n += 1
    out[n:] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return out


def iter_epoch_steps(first_epoch: int, first_step: int, steps_per_epoch: int) -> Iterator[tuple[int, int]]:
    """(epoch, step) pairs from a resume point on, forever."""
    epoch, step = first_epoch, first_step
    while True:
        yield epoch, step
        step += 1
        if step == steps_per_epoch:
            epoch, step = epoch + 1, 0


@dataclasses.dataclass
class ReadAudit:
    """What a plan asks of the file system, computed from the plan alone."""

    max_readers_per_shard: int  # over all shards of the epoch
    sequential_fraction: float  # over the audited ranks' bytes
    bytes_read: int
    runs: int


def audit_reads(
    plan: EpochPlan, shard_bytes: Sequence[int], ranks: Sequence[int], world_size: int, seek_cost: int = 1 << 20
) -> ReadAudit:
    """Readers per shard (all shards) and sequential share of bytes (the given ranks).

    Each reader run is one open (or seek) followed by a forward read; the first `seek_cost`
    bytes after it are charged as non-sequential (a generous readahead window on parallel
    file systems and object stores), the rest as sequential.
    """
    bounds = np.unique(plan.partition_boundaries())
    lo, hi = plan.cum[:-1], plan.cum[1:]
    consumed_end = plan.steps * plan.layout.global_batch
    inside = np.searchsorted(bounds, hi, side="left") - np.searchsorted(bounds, lo, side="right")
    readers = np.where((hi > lo) & (lo < consumed_end), 1 + inside, 0)
    sizes = np.asarray(shard_bytes, dtype=np.float64)
    per_sample = np.divide(sizes, plan.shard_counts, out=np.zeros_like(sizes), where=plan.shard_counts > 0)
    total = sequential = 0.0
    runs = 0
    for rank in ranks:
        for p in plan.rank_partitions(rank, world_size):
            for seg in plan.partition_segments(p):
                nbytes = seg.count * per_sample[seg.shard]
                total += nbytes
                sequential += max(0.0, nbytes - seek_cost)
                runs += 1
    return ReadAudit(int(readers.max()), sequential / total if total else 1.0, int(total), runs)
