"""Atomic writes: the final name holds the old or the complete new content, never a torn file."""

import os
import socket
import subprocess

import pytest

from vitscale_common.atomic import atomic_open, atomic_write_text, remove_stale_temps


def test_failed_write_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "latest"
    atomic_write_text(target, "step-1")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("step-2 (half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_only_temps_of_dead_local_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".shard-000001.tar.tmp-{host}-{dead_pid()}"
    live = tmp_path / f".shard-000002.tar.tmp-{host}-{os.getpid()}"
    remote = tmp_path / ".shard-000003.tar.tmp-othernode-1234"
    for p in (dead, live, remote):
        p.write_bytes(b"partial")
    (tmp_path / "shard-000000.tar").write_bytes(b"whole")
    assert remove_stale_temps(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, remote.name, "shard-000000.tar"])
    assert remove_stale_temps(tmp_path, all_writers=True) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
