"""The training sample stream: the epoch plan turned into batches of decoded samples.

One `RankStream` runs per rank, or per partition reader of a rank (reader k of K takes every
K-th step). Each partition it owns is read by a `PartitionReader`: sequentially, front to back,
through a deterministic shuffle buffer whose output order is precomputed on positions
(`partition_order`), so a reader resumed at output j knows exactly which positions it still
owes and seeks straight past the rest.

A sample that cannot be used (its shard is truncated or unreadable, its bytes do not decode,
or its key is excluded) is replaced by the nearest earlier valid output of the same partition
(the nearest later one when there is none), decoded with the failed slot's own random key, so
batches stay full, ranks stay in lock-step and the result is the same however the run was
interrupted. Every replacement is counted by reason and logged with shard and key.

This module decodes nothing itself: the caller passes `decode(sample, key) -> item`, where
`key` seeds any randomness (augmentation), and any exception it raises counts as a bad sample.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from sharding.plan import EpochPlan, StreamLayout, iter_epoch_steps, partition_order
from sharding.shard_source import ShardRows, ShardSource
from sharding.tar_reader import ShardSample
from vitscale_common.errors import UserError

log = logging.getLogger(__name__)

Decode = Callable[[ShardSample, tuple[int, ...]], Any]
MAX_LOGGED = 20  # per reader; the totals are always counted


class StreamError(UserError):
    """The stream cannot continue (error rate over the limit, no valid sample left)."""


# -- counting losses ---------------------------------------------------------------------------
def check_error_rate(counters: dict[str, int], samples: int, max_rate: float, min_samples: int = 200) -> None:
    """Abort when substituted samples exceed `max_rate` of those yielded (once enough are seen)."""
    bad = counters.get("substituted", 0)
    if samples >= min_samples and bad > max_rate * samples:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counters.items()) if k != "substituted")
        raise StreamError(
            f"{bad} of {samples} samples were unusable ({detail}), over data.max_error_rate={max_rate}; "
            f"check the shards with the verifier or raise the limit"
        )


def decode_failure(e: Exception) -> str:
    """Counter name of a decoder exception: a member the sample lacks, or bytes that do not decode."""
    return "missing_member" if isinstance(e, KeyError) else "decode_error"


# -- one partition -----------------------------------------------------------------------------
class PartitionReader:
    """Outputs of one partition in its shuffled order, from output `first_output` on."""

    def __init__(
        self,
        source: ShardSource,
        plan: EpochPlan,
        partition: int,
        first_output: int,
        buffer: int,
        excluded: frozenset[str] | set[str],
        decode: Decode,
    ):
        self.source, self.plan, self.partition = source, plan, partition
        self.excluded, self.decode = excluded, decode
        self.length = plan.partition_length(partition)
        self.order = partition_order(self.length, buffer, plan.seed, plan.epoch, partition)
        self.segments = plan.partition_segments(partition)
        self.seg_start = np.concatenate([[0], np.cumsum([s.count for s in self.segments])])
        self.next_output = first_output
        self.pending = np.zeros(self.length, dtype=bool)  # positions still owed
        self.pending[self.order[first_output:]] = True
        start = int(self.order[first_output:].min()) if first_output < self.length else self.length
        self.stream = self._read_from(start)
        self.store: dict[int, ShardSample | str] = {}  # read, owed, not yet emitted
        self.last_good: ShardSample | None = None
        # Per segment: (first position lost for good, reason). A truncated or unopenable shard
        # fails from some point to its end, so the substitute search skips it without I/O.
        self.bad_from: dict[int, tuple[int, str]] = {}
        self._cached_rows: tuple[int, ShardRows | None] = (-1, None)
        self.logged = 0

    @property
    def exhausted(self) -> bool:
        return self.next_output >= self.length

    def _locate(self, pos: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.seg_start, pos, side="right")) - 1
        return i, pos - int(self.seg_start[i])

    def _note_bad(self, segment: int, offset: int, item: ShardSample | str) -> None:
        final = item in ("truncated", "unreadable")  # a corrupt header leaves later samples readable
        if final and offset < self.bad_from.get(segment, (offset + 1, ""))[0]:
            self.bad_from[segment] = (offset, item)

    def _rows(self, segment: int) -> ShardRows | None:
        """The index rows of a segment's shard; the last one is kept (a reader moves shard by shard)."""
        shard = self.segments[segment].shard
        if self._cached_rows[0] != shard:
            self._cached_rows = (shard, self.source.rows(shard))
        return self._cached_rows[1]

    def _read_from(self, pos: int) -> Iterator[tuple[int, ShardSample | str]]:
        if pos >= self.length:
            return
        i, offset = self._locate(pos)
        for seg_index, seg in enumerate(self.segments[i:], start=i):
            rows = self._rows(seg_index)
            for item in self.source.read_run(seg.shard, seg.first + offset, seg.count - offset, rows):
                self._note_bad(seg_index, offset, item)
                yield pos, item
                pos += 1
                offset += 1
            offset = 0

    def _read_one(self, pos: int) -> ShardSample | str:
        """Random access, only on the rare substitute path."""
        i, offset = self._locate(pos)
        known = self.bad_from.get(i)
        if known and offset >= known[0]:
            return known[1]
        seg = self.segments[i]
        item = next(self.source.read_run(seg.shard, seg.first + offset, 1, self._rows(i)))
        self._note_bad(i, offset, item)
        return item

    def _take(self, pos: int) -> ShardSample | str:
        while pos not in self.store:
            p, item = next(self.stream)
            if self.pending[p]:
                self.store[p] = item
        self.pending[pos] = False
        return self.store.pop(pos)

    def _use(self, item: ShardSample | str, key: tuple[int, ...]) -> tuple[Any, str | None]:
        if isinstance(item, str):
            return None, item
        if item.key in self.excluded:
            return None, "excluded"
        try:
            return self.decode(item, key), None
        except Exception as e:  # any decoder failure is a bad sample, by contract
            return None, decode_failure(e)

    def _where(self, pos: int, item: ShardSample | str) -> str:
        """'train-000003.tar sample 6 (key ...)': the key from the index, as the sample may be unreadable."""
        i, offset = self._locate(pos)
        seg = self.segments[i]
        rows = self._rows(i)
        sample = seg.first + offset
        key = item.key if isinstance(item, ShardSample) else None
        if rows is not None and sample < len(rows.keys):
            key = rows.keys[sample]
        return f"{self.source.name(seg.shard)} sample {sample}" + (f" (key {key})" if key else "")

    def next(self, counters: collections.Counter) -> Any:
        """The next output; a substitute when the sample is unusable (counted in `counters` by reason)."""
        j = self.next_output
        self.next_output += 1
        key = (self.plan.seed, self.plan.epoch, self.partition, j)
        pos = int(self.order[j])
        item = self._take(pos)
        value, reason = self._use(item, key)
        if reason is None:
            self.last_good = item
            return value
        counters[reason] += 1
        counters["substituted"] += 1
        if self.logged < MAX_LOGGED:
            self.logged += 1
            log.warning("%s: %s; substituted", self._where(pos, item), reason)
        return self._substitute(j, key)

    def _substitute(self, j: int, key: tuple[int, ...]) -> Any:
        if self.last_good is not None:
            value, reason = self._use(self.last_good, key)
            if reason is None:
                return value
        # No valid output since this reader started: search outward, as an uninterrupted
        # reader would have remembered (backward) or found nothing before (forward).
        for jj in list(range(j - 1, -1, -1)) + list(range(j + 1, self.length)):
            value, reason = self._use(self._read_one(int(self.order[jj])), key)
            if reason is None:
                return value
        raise StreamError(
            f"partition {self.partition} of epoch {self.plan.epoch} has no valid sample "
            f"(e.g. {self._where(int(self.order[j]), reason)}: {reason}); "
            f"check the shards, data.path and data.shards_url"
        )


# -- one rank (or one reader of it) -----------------------------------------------------------
class StepBatch(NamedTuple):
    epoch: int
    step: int
    items: list  # decoded items, in canonical order
    counters: dict[str, int]  # losses while making this batch, by reason


class RankStream:
    """The batches of one rank, from (epoch, step) on, forever; reader k of K takes every K-th step."""

    def __init__(
        self,
        source: ShardSource,
        shard_counts: Sequence[int],
        layout: StreamLayout,
        *,
        seed: int,
        buffer: int,
        decode: Decode,
        rank: int,
        world_size: int,
        excluded: frozenset[str] | set[str] = frozenset(),
        reader: int = 0,
        readers: int = 1,
        epoch: int = 0,
        step: int = 0,
    ):
        layout.check_readers(world_size, readers)
        self.source, self.shard_counts, self.layout = source, list(shard_counts), layout
        self.seed, self.buffer, self.decode, self.excluded = seed, buffer, decode, excluded
        self.rank, self.world_size, self.reader, self.readers = rank, world_size, reader, readers
        self.start = (epoch, step)
        self.steps_per_epoch = EpochPlan(self.shard_counts, layout, seed, 0).steps

    def __iter__(self) -> Iterator[StepBatch]:
        plan: EpochPlan | None = None
        readers: dict[int, PartitionReader] = {}
        for n, (epoch, step) in enumerate(iter_epoch_steps(*self.start, self.steps_per_epoch)):
            if n % self.readers != self.reader:
                continue
            if plan is None or plan.epoch != epoch:
                plan, readers = EpochPlan(self.shard_counts, self.layout, self.seed, epoch), {}
            counters: collections.Counter = collections.Counter()
            items = []
            for slot in plan.rank_slots(step, self.rank, self.world_size):
                reader = readers.get(slot.partition)
                if reader is None:
                    reader = PartitionReader(
                        self.source, plan, slot.partition, slot.lo, self.buffer, self.excluded, self.decode
                    )
                    readers[slot.partition] = reader
                assert reader.next_output == slot.lo, "a partition was read out of step order"
                items.extend(reader.next(counters) for _ in range(slot.lo, slot.hi))
                if reader.exhausted:
                    del readers[slot.partition]
            yield StepBatch(epoch, step, items, dict(counters))


# -- evaluation: every sample exactly once over all ranks --------------------------------------
class EvalBatch(NamedTuple):
    start: int  # first sample, in the split's shard-list order
    count: int  # real samples; the rest of the batch is padding


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[EvalBatch]:
    """Rank `rank`'s batches: a contiguous share, the same number of batches on every rank."""
    per_rank = -(-num_samples // world_size)
    num_batches = -(-per_rank // batch_size)
    lo, hi = rank * per_rank, min(num_samples, (rank + 1) * per_rank)
    out = []
    for b in range(num_batches):
        start = lo + b * batch_size
        out.append(EvalBatch(start, max(0, min(batch_size, hi - start))))
    return out


def read_eval_batch(
    source: ShardSource, shard_counts: Sequence[int], batch: EvalBatch, decode: Decode, counters: collections.Counter
) -> list[Any]:
    """Decoded items of an eval batch; an unusable sample is `None` (masked out, counted), never replaced."""
    cum = np.concatenate([[0], np.cumsum(shard_counts)])
    items: list[Any] = []
    pos, end = batch.start, batch.start + batch.count
    while pos < end:
        shard = int(np.searchsorted(cum, pos, side="right")) - 1
        first = pos - int(cum[shard])
        count = min(end, int(cum[shard + 1])) - pos
        for i, item in enumerate(source.read_run(shard, first, count, source.rows(shard))):
            try:
                if isinstance(item, str):
                    raise ValueError(item)
                items.append(decode(item, (pos + i,)))
            except Exception as e:
                reason = item if isinstance(item, str) else decode_failure(e)
                counters[reason] += 1
                log.warning("%s sample %d: %s; left out of evaluation (%s)", source.name(shard), first + i, reason, e)
                items.append(None)
        pos += count
    return items
