"""Substitutes are deterministic: resuming at any step, with any reader split, gives the same batches.

Uses `sharding.stream` directly (no torch): the decoder returns the sample key, and refuses a
seeded 15% of keys, so many partitions start a resumed reader on a bad sample (the path that
searches backwards instead of remembering).
"""

import collections
import hashlib

import numpy as np
import pytest

from sharding import format as fmt
from sharding.plan import StreamLayout
from sharding.shard_source import ShardRows, ShardSource
from sharding.stream import RankStream, StreamError
from sharding.writer import ShardTarWriter

COUNTS = [23, 31, 17, 40, 9, 28]
JPEG = b"\xff\xd8 not really"  # the decoder below never decodes it
JPEG_SHA = hashlib.sha256(JPEG).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards with a corrupt header (shard 3, sample 10's label) and a cut (shard 1, inside sample 20)."""
    root = tmp_path_factory.mktemp("subst")
    urls, offsets = [], []
    for shard, count in enumerate(COUNTS):
        path = root / fmt.shard_path("train", shard)
        with ShardTarWriter(path) as w:
            locs = [w.add(fmt.sample_key("train", shard, slot), [("jpg", JPEG), ("cls", b"0")])
                    for slot in range(count)]  # fmt: skip
        urls.append(str(path))
        offsets.append([loc.offset for loc in locs])
    data = bytearray((root / fmt.shard_path("train", 3)).read_bytes())
    label_header = offsets[3][10] + 1024  # jpg header + one data block, then the cls header
    data[label_header : label_header + 4] = b"\x01\x02\x03\x04"
    (root / fmt.shard_path("train", 3)).write_bytes(bytes(data))
    cut = (root / fmt.shard_path("train", 1)).read_bytes()[: offsets[1][20] + 700]
    (root / fmt.shard_path("train", 1)).write_bytes(cut)
    return urls, offsets


class Index:
    """The rows a dataset index would hold for these shards."""

    def __init__(self, offsets):
        self.offsets = offsets

    def rows(self, shard):
        count = len(self.offsets[shard])
        keys = [fmt.sample_key("train", shard, i) for i in range(count)]
        return ShardRows(np.asarray(self.offsets[shard]), keys, [JPEG_SHA] * count)


def decoder(bad: set[str]):
    def decode(sample, key):
        if sample.key in bad:
            raise ValueError("refused")
        sample.members["cls"]  # a sample cut between its members lacks this: KeyError
        return sample.key

    return decode


def batches(shards, bad, *, start=(0, 0), world=1, readers=1, indexed=True):
    urls, offsets = shards
    layout = StreamLayout(12, 2, 2)  # 4 partitions of ~36 samples
    out = {}
    for rank in range(world):
        for reader in range(readers):
            source = ShardSource(urls, index=Index(offsets) if indexed else None)
            stream = RankStream(source, COUNTS, layout, seed=5, buffer=6, decode=decoder(bad), rank=rank,
                                world_size=world, reader=reader, readers=readers, epoch=start[0], step=start[1])  # fmt: skip
            for b in stream:
                if b.epoch > start[0]:
                    break
                out.setdefault(b.step, {})[rank] = (b.items, b.counters)
    return {s: sum((v[r][0] for r in sorted(v)), []) for s, v in out.items()}, out


@pytest.mark.parametrize("indexed", [True, False])
def test_resume_at_every_step_reproduces_substitutes(shards, indexed):
    rng = np.random.default_rng(0)
    keys = [fmt.sample_key("train", s, i) for s, c in enumerate(COUNTS) for i in range(c)]
    bad = set(rng.choice(keys, size=len(keys) * 15 // 100, replace=False).tolist())
    bad.discard(fmt.sample_key("train", 3, 10))  # its loss should show as the cut member
    full, raw = batches(shards, bad, indexed=indexed)
    steps = len(full)
    assert steps == sum(COUNTS) // 12
    counts = collections.Counter()
    for per_rank in raw.values():
        for _, c in per_rank.values():
            counts.update(c)
    taken = [k for s in range(steps) for k in full[s]]
    assert not set(taken) & bad
    assert len(taken) - len(set(taken)) == counts["substituted"] > 0
    # The corrupt label header costs its own sample (missing member); without the index, also the rest.
    assert counts["truncated"] > 0 and counts["missing_member"] == 1
    assert (counts["corrupt"] > 0) != indexed
    # With the index, reading resumes after the corrupt header: the samples after it survive.
    survivors = {fmt.sample_key("train", 3, i) for i in range(11, COUNTS[3])} - bad
    remainder = sum(COUNTS) % 12  # at most this many are simply not read this epoch
    if indexed:
        assert len(survivors & set(taken)) >= len(survivors) - remainder
    else:
        assert not survivors & set(taken)
    for s0 in range(steps):
        resumed, _ = batches(shards, bad, start=(0, s0), indexed=indexed)
        assert [resumed[s] for s in range(s0, steps)] == [full[s] for s in range(s0, steps)], f"resume at {s0}"
    split, _ = batches(shards, bad, world=2, readers=2, indexed=indexed)
    assert split == full


def test_partition_without_any_valid_sample_is_an_error(shards):
    everything = {fmt.sample_key("train", s, i) for s, c in enumerate(COUNTS) for i in range(c)}
    with pytest.raises(StreamError, match="no valid sample"):
        batches(shards, everything)
