"""Scale: planning an ImageNet-21k-sized conversion fits a task's memory, and the global
shuffle of a 300M listing costs a task only its own share."""

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from data_prep.plan import Plan

GB = 1 << 30


@pytest.mark.slow
def test_planning_a_14m_listing_into_array_tasks_stays_under_2gb(tmp_path):
    n = 14_000_000
    script = Path(__file__).with_name("prep_scale_task.py")
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(n)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows, shards, peak = map(int, r.stdout.split())
    assert shards == 1386 + 14  # 13.86M train + 140k val, 10k per shard
    assert rows == 22 * 10_000  # task 7 of 64 owns shards 7, 71, ..., 1351
    assert peak < 2 * GB, f"peak memory {peak / GB:.2f} GB"


def test_a_task_of_a_300m_plan_needs_memory_for_its_share_only():
    plan = Plan.by_fraction(300_000_000, {"train": 0.999, "val": 0.001}, seed=5, samples_per_shard=10_000)
    shards = plan.shards_for_task(123, 4096)
    tracemalloc.start()
    indices = [plan.listing_indices(t) for t in shards[:3]]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(plan.shards()) == 30_000
    assert peak < 20 * 10_000 * 8 * 3  # a few arrays of the shard's size, nothing of 300M
    flat = np.concatenate(indices)
    assert len(np.unique(flat)) == 30_000 and flat.min() >= 0 and flat.max() < 300_000_000
