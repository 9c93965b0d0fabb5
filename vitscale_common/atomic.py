"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Every stage writes files that another process may read while it runs (shards, indexes,
checkpoint manifests, the `latest` pointer). All of them go through here: write to a
temporary name in the same folder, fsync, rename over the final name, fsync the folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry itself must reach disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    # Unique per host and process: array tasks on different nodes may share a pid and write
    # into one folder on shared storage, and two writers racing must never share a temp file.
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open `path` for writing; it appears under its final name only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _writer_is_gone(temp: Path, host: str) -> bool:
    """True when `temp` was written on this host by a process that no longer runs."""
    writer_host, _, pid = temp.name.rpartition(".tmp-")[2].rpartition("-")
    if writer_host != host or not pid.isdigit():
        return False  # another node's writer: its liveness cannot be judged from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def remove_stale_temps(folder: str | os.PathLike, *, all_writers: bool = False) -> int:
    """Delete temp files left by killed writers; returns how many were removed.

    By default only temps of dead processes on this host go, so a task starting beside
    running siblings (array tasks sharing an output folder) never deletes their work in
    flight. `all_writers=True` is for a caller that knows every writer has finished.
    """
    host = socket.gethostname()
    removed = 0
    for p in Path(folder).glob(".*.tmp-*"):
        if all_writers or _writer_is_gone(p, host):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
    return removed
