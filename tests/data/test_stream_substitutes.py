"""Substitutes are deterministic: resuming at any step, with any reader split, gives the same batches.

Uses `sharding.stream` directly (no torch): the decoder returns the sample key, and refuses a
seeded 15% of keys, so many partitions start a resumed reader on a bad sample (the path that
searches backwards instead of remembering).
"""

import numpy as np
import pytest

from sharding import format as fmt
from sharding.plan import StreamLayout
from sharding.stream import RankStream, ShardSource, StreamError
from sharding.writer import ShardTarWriter

COUNTS = [23, 31, 17, 40, 9, 28]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("subst")
    urls = []
    for shard, count in enumerate(COUNTS):
        path = root / fmt.shard_path("train", shard)
        with ShardTarWriter(path) as w:
            for slot in range(count):
                w.add(fmt.sample_key("train", shard, slot), [("jpg", b"\xff\xd8 not really"), ("cls", b"0")])
        urls.append(str(path))
    return urls


def decoder(bad: set[str]):
    def decode(sample, key):
        if sample.key in bad:
            raise ValueError("refused")
        return sample.key

    return decode


def batches(urls, bad, *, start=(0, 0), world=1, workers=1, steps=None):
    layout = StreamLayout(12, 4, 4)
    out = {}
    for rank in range(world):
        for worker in range(workers):
            stream = RankStream(ShardSource(urls), COUNTS, layout, seed=5, buffer=6, decode=decoder(bad), rank=rank,
                                world_size=world, worker=worker, workers=workers, epoch=start[0], step=start[1])  # fmt: skip
            for b in stream:
                if b.epoch > start[0]:
                    break
                out.setdefault(b.step, {})[rank] = (b.items, b.counters)
    return {s: sum((v[r][0] for r in sorted(v)), []) for s, v in out.items()}, out


def test_resume_at_every_step_reproduces_substitutes(shards):
    rng = np.random.default_rng(0)
    keys = [fmt.sample_key("train", s, i) for s, c in enumerate(COUNTS) for i in range(c)]
    bad = set(rng.choice(keys, size=len(keys) * 15 // 100, replace=False).tolist())
    full, raw = batches(shards, bad)
    steps = len(full)
    assert steps == sum(COUNTS) // 12
    subs = sum(c.get("substituted", 0) for v in raw.values() for _, c in v.values())
    taken = [k for s in range(steps) for k in full[s]]
    assert not set(taken) & bad
    assert len(taken) - len(set(taken)) == subs > 0
    for s0 in range(steps):
        resumed, _ = batches(shards, bad, start=(0, s0))
        assert [resumed[s] for s in range(s0, steps)] == [full[s] for s in range(s0, steps)], f"resume at {s0}"
    split, _ = batches(shards, bad, world=2, workers=2)
    assert split == full


def test_partition_without_any_valid_sample_is_an_error(shards):
    everything = {fmt.sample_key("train", s, i) for s, c in enumerate(COUNTS) for i in range(c)}
    with pytest.raises(StreamError, match="no valid sample"):
        batches(shards, everything)
