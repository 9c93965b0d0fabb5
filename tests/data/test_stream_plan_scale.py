"""The JFT-300M plan on paper: 300M samples in 15,000 shards, 1,024 ranks x 8 loader workers.

Computed from the 15,000 per-shard counts alone; checked on sampled ranks: every rank the same
batch every step, one reader per partition, at most two readers per shard, >= 95% of bytes
read sequentially; planning time and peak memory are printed (pytest -s) and bounded.
"""

import collections
import time
import tracemalloc

import numpy as np

from sharding.plan import EpochPlan, StreamLayout, audit_reads, partition_order

SHARDS, SAMPLES, RANKS, WORKERS, GLOBAL_BATCH = 15_000, 300_000_000, 1024, 8, 4096
BYTES_PER_SAMPLE = 110_000  # ~JFT JPEG size at a 512 px shorter side


def test_jft_scale_plan_invariants_on_sampled_ranks():
    rng = np.random.default_rng(0)
    counts = rng.integers(19_000, 21_000, size=SHARDS)
    counts[-1] += SAMPLES - counts.sum()  # exactly 300M
    shard_bytes = counts * BYTES_PER_SAMPLE
    layout = StreamLayout(GLOBAL_BATCH, width=RANKS, cycle=WORKERS)

    tracemalloc.start()
    t0 = time.perf_counter()
    plan = EpochPlan(counts, layout, seed=0, epoch=3)
    plan_s = time.perf_counter() - t0
    sampled = [0, 1, 511, 1023, int(rng.integers(RANKS))]
    audit = audit_reads(plan, shard_bytes, sampled, RANKS)
    t1 = time.perf_counter()
    partitions = plan.rank_partitions(sampled[-1], RANKS)
    order = partition_order(plan.partition_length(partitions[0]), 1024, 0, 3, partitions[0])
    order_s = time.perf_counter() - t1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert plan.num_samples == SAMPLES and plan.steps == SAMPLES // GLOBAL_BATCH
    assert plan.remainder < GLOBAL_BATCH
    assert audit.max_readers_per_shard <= 2
    assert audit.sequential_fraction >= 0.95
    assert len(partitions) == WORKERS  # one partition per loader worker
    assert len(order) == plan.partition_length(partitions[0])

    per_rank = GLOBAL_BATCH // RANKS
    for rank in sampled:
        readers = collections.defaultdict(set)
        for step in range(plan.steps):
            slots = plan.rank_slots(step, rank, RANKS)
            assert sum(s.hi - s.lo for s in slots) == per_rank
            for s in slots:
                readers[s.partition].add(step % WORKERS)
        assert sorted(readers) == plan.rank_partitions(rank, RANKS)
        assert all(len(w) == 1 for w in readers.values())

    # The per-sample table alone would be >= 300M x 8 bytes; the plan holds O(shards).
    assert peak < 64 << 20
    print(
        f"\nJFT-300M plan: {plan.steps} steps/epoch, remainder {plan.remainder}, {layout.partitions} partitions "
        f"of ~{plan.partition_length(0)} samples; planned in {plan_s * 1e3:.1f} ms; one partition's shuffle "
        f"order in {order_s * 1e3:.0f} ms; peak traced memory {peak / 2**20:.1f} MiB; max readers/shard "
        f"{audit.max_readers_per_shard}; sequential bytes {audit.sequential_fraction:.4%} over {len(sampled)} ranks"
    )
