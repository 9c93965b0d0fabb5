"""Deterministic, atomic tar shard writer.

The same samples in the same order always give the same bytes: every header has a fixed
mtime, owner and mode, and the archive uses plain USTAR headers (no pax records carrying
times). The shard appears under its final name only when complete (vitscale_common.atomic), so
a reader, or a rerun after a crash, never sees half a shard.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vitscale_common.atomic import atomic_open

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
FIXED_MTIME = 0
FIXED_MODE = 0o644


@dataclass(frozen=True)
class MemberLocation:
    """Where one member's data lies inside the tar (offset of its first data byte)."""

    offset: int
    size: int


@dataclass(frozen=True)
class SampleLocation:
    """A sample's byte range (first header to end of last member) and its members' data."""

    offset: int
    size: int
    members: dict[str, MemberLocation]


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = FIXED_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class ShardTarWriter:
    """Write one shard: `add(key, [(ext, bytes), ...])` per sample, inside a `with` block."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sha = hashlib.sha256()
        self._pos = 0
        self._ctx = None
        self._file = None
        self.num_samples = 0

    def __enter__(self) -> "ShardTarWriter":
        self._ctx = atomic_open(self.path, "wb")
        self._file = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            # End-of-archive: two zero blocks, then pad to a whole record like tar(1) does.
            end = self._pos + 2 * BLOCK
            self._write(b"\0" * (2 * BLOCK + (-end) % RECORD))
        return bool(self._ctx.__exit__(exc_type, exc, tb))

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> SampleLocation:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        start = self._pos
        where = {}
        for ext, data in members:
            header = _header(f"{key}.{ext}", len(data))
            self._write(header)
            where[ext] = MemberLocation(self._pos, len(data))
            self._write(data)
            self._write(b"\0" * ((-len(data)) % BLOCK))
        self.num_samples += 1
        return SampleLocation(start, self._pos - start, where)

    @property
    def num_bytes(self) -> int:
        return self._pos

    def sha256(self) -> str:
        return self._sha.hexdigest()
