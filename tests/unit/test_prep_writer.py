"""The shard writer: deterministic bytes, offsets that stock tarfile agrees with, atomicity."""

import tarfile

import numpy as np
import pytest

from sharding.permutation import FeistelPermutation
from sharding.writer import ShardTarWriter


def _write(path, samples):
    locs = []
    with ShardTarWriter(path) as w:
        for key, members in samples:
            locs.append(w.add(key, members))
    return w, locs


SAMPLES = [(f"k{i}", [("jpg", bytes([i]) * (100 + 37 * i)), ("cls", str(i).encode())]) for i in range(5)]


def test_same_samples_give_same_bytes_and_tarfile_agrees_on_offsets(tmp_path):
    w1, locs = _write(tmp_path / "a.tar", SAMPLES)
    w2, _ = _write(tmp_path / "b.tar", SAMPLES)
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert len(data) == w1.num_bytes and len(data) % 10240 == 0
    assert w1.sha256() == w2.sha256()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"k{i}.{e}" for i in range(5) for e in ("jpg", "cls")]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
        for i, loc in enumerate(locs):
            jpg = members[2 * i]
            assert (loc.members["jpg"].offset, loc.members["jpg"].size) == (jpg.offset_data, jpg.size)
            assert loc.offset == jpg.offset
            assert data[loc.members["jpg"].offset :][: jpg.size] == SAMPLES[i][1][0][1]
    assert locs[-1].offset + locs[-1].size == members[-1].offset_data + 512


def test_a_failed_shard_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardTarWriter(tmp_path / "s.tar") as w:
            w.add("a", [("jpg", b"x")])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["a.b", "", "x/y"])
def test_keys_with_dots_or_slashes_are_refused(tmp_path, key):
    with pytest.raises(ValueError):
        with ShardTarWriter(tmp_path / "s.tar") as w:
            w.add(key, [("jpg", b"x")])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_is_a_bijection(n):
    perm = FeistelPermutation(n, seed=7)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))


def test_feistel_depends_on_seed_and_shuffles():
    a = FeistelPermutation(10_000, seed=1)(np.arange(10_000))
    b = FeistelPermutation(10_000, seed=2)(np.arange(10_000))
    assert (a != b).mean() > 0.99
    # Neighbouring positions land far apart: no class-ordered runs survive.
    assert np.abs(np.diff(a)).mean() > 2000
    # Evaluating a slice gives the same values as the whole: tasks need only their share.
    assert (FeistelPermutation(10_000, seed=1)(np.arange(500, 700)) == a[500:700]).all()
