"""Atomic writes: the final name holds the old or the complete new content, never a torn file."""
import pytest

from sharding.atomic import atomic_open, atomic_write_text, remove_stale_temps


def test_failed_write_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step-1")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("step-2 (half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_stale_temps_from_killed_writers_are_removed(tmp_path):
    (tmp_path / ".shard-000001.tar.tmp-4242").write_bytes(b"partial")
    (tmp_path / "shard-000000.tar").write_bytes(b"whole")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
