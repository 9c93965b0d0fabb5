"""The epoch plan: exact tiling of an epoch, the remainder rule, reader ownership, shuffle bounds."""

import collections

import numpy as np
import pytest

from sharding.plan import EpochPlan, PlanError, StreamLayout, default_width, partition_order

COUNTS = [37, 50, 41, 12, 60, 33, 45, 8, 29]


def consumed(plan: EpochPlan, steps=None):
    """(epoch-sequence offset) of every sample the given steps consume, via the plan's segments."""
    out = []
    for s in range(plan.steps) if steps is None else steps:
        for slot in plan.step_slots(s):
            start = plan.partition_start(slot.partition)
            out.extend(start + np.arange(slot.lo, slot.hi))
    return out


@pytest.mark.parametrize("layout", [StreamLayout(16, 4, 4), StreamLayout(24, 2, 8), StreamLayout(8, 8, 1)])
def test_epoch_consumes_every_sample_once_except_remainder(layout):
    plan = EpochPlan(COUNTS, layout, seed=3, epoch=1)
    n = sum(COUNTS)
    assert plan.steps == n // layout.global_batch
    assert plan.remainder == n % layout.global_batch < layout.global_batch
    got = consumed(plan)
    # Output indices of a partition are taken as ranges; each offset exactly once, tail left out.
    assert sorted(got) == list(range(plan.steps * layout.global_batch))
    # Partitions tile the consumed prefix with segments that agree with the shard order.
    total = 0
    for p in range(layout.partitions):
        segs = plan.partition_segments(p)
        assert sum(s.count for s in segs) == plan.partition_length(p)
        for s in segs:
            assert 0 <= s.first and s.first + s.count <= COUNTS[s.shard]
        total += plan.partition_length(p)
    assert total == plan.steps * layout.global_batch


def test_ranks_get_equal_contiguous_slices_and_fixed_partitions():
    layout = StreamLayout(32, 8, 4)
    plan = EpochPlan(COUNTS * 3, layout, seed=0, epoch=0)
    for world in (1, 2, 4, 8):
        owners = collections.defaultdict(set)
        for s in range(plan.steps):
            slices = [plan.rank_slots(s, r, world) for r in range(world)]
            assert [sum(x.hi - x.lo for x in sl) for sl in slices] == [32 // world] * world
            assert [x for sl in slices for x in sl] == plan.step_slots(s)  # canonical order, any world size
            for r, sl in enumerate(slices):
                for x in sl:
                    owners[x.partition].add((r, s % 2))  # 2 workers per rank: worker = step parity
        assert all(len(v) == 1 for v in owners.values()), "a partition was read by two readers"


def test_epochs_differ_and_seed_repeats():
    layout = StreamLayout(16, 4, 4)
    a, b = EpochPlan(COUNTS, layout, 0, 0), EpochPlan(COUNTS, layout, 0, 1)
    assert list(a.order) != list(b.order)
    assert list(a.order) == list(EpochPlan(COUNTS, layout, 0, 0).order)
    assert list(a.order) != list(EpochPlan(COUNTS, layout, 1, 0).order)


def test_partition_order_is_a_bounded_buffer_permutation():
    out = partition_order(1000, 64, seed=0, epoch=0, partition=5)
    assert sorted(out) == list(range(1000))
    # The j-th output was read no later than input j + buffer: the reader holds <= buffer samples.
    assert (out[:-64] <= np.arange(1000 - 64) + 64).all()
    assert (out != np.arange(1000)).mean() > 0.9
    assert list(out) == list(partition_order(1000, 64, 0, 0, 5))
    assert list(out) != list(partition_order(1000, 64, 0, 0, 6))


def test_layout_errors_name_the_setting():
    with pytest.raises(PlanError, match="stream_width"):
        StreamLayout(10, 4, 2)
    with pytest.raises(PlanError, match="world size 3"):
        StreamLayout(16, 4, 2).check_readers(3, 1)
    with pytest.raises(PlanError, match="data.readers=3"):
        StreamLayout(16, 4, 8).check_readers(2, 3)
    with pytest.raises(PlanError, match="fewer than one global batch"):
        EpochPlan([5, 5], StreamLayout(16, 4, 2), 0, 0)
    assert default_width(4096, 1024, 8) == 64 and default_width(96, 1024, 8) == 32 and default_width(7, 1024, 8) == 1
    assert default_width(4096, 12, 8) == 8  # a small dataset: fewer, longer partitions, still 8 ranks
    assert default_width(4096, 15_000, 8) == 64  # past the cap, set data.stream_width for more ranks
