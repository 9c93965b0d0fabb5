"""Read samples from a tar shard as bytes: headers parsed here, nothing extracted, nothing unpickled.

A sample is the run of consecutive members sharing a key (the member path up to the first
dot of its file name, as webdataset groups them). Reading starts at any member boundary, so a
reader that owns the second half of a shard seeks straight to it. A shard cut short raises
`TruncatedShard` after the samples read before the cut; the one the cut falls in is lost
unless the cut came between its members (then it lacks a member, caught when decoded).
"""

from __future__ import annotations

from typing import BinaryIO, Iterator, NamedTuple

BLOCK = 512


class ShardDamage(Exception):
    """A corrupt member header at byte `offset`: sequential reading cannot continue past it.

    `reason` is the counter name. With the shard index, reading resumes at the next sample
    that starts after `offset`; without it, the rest of the shard is lost.
    """

    reason = "corrupt"

    def __init__(self, message: str, offset: int = -1):
        super().__init__(message)
        self.offset = offset


class TruncatedShard(ShardDamage):
    reason = "truncated"


class ShardSample(NamedTuple):
    key: str
    members: dict[str, bytes]  # extension ("jpg", "cls", "labels.json") -> bytes


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").strip()
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field or b"0", 8)


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TruncatedShard(f"shard ends inside {what}")
    return data


def _pax_path(data: bytes) -> str | None:
    # Records are "LEN key=value\n"; only the path matters to us.
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def iter_headers(f: BinaryIO) -> Iterator[tuple[int, str, int]]:
    """(header offset, path, size) of each regular file; the file is left at its data.

    The consumer must read or seek past `size` rounded up to whole blocks before resuming.
    """
    long_name: str | None = None
    entry = 0  # where this member's headers begin, long-name header included
    while True:
        pos = f.tell()
        if long_name is None:
            entry = pos
        header = f.read(BLOCK)
        if len(header) == 0:
            return  # end of file without the end-of-archive marker: accepted, as tar does
        if len(header) != BLOCK:
            raise TruncatedShard("shard ends inside a member header")
        if header == b"\0" * BLOCK:
            return
        if _octal(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise ShardDamage(f"bad tar header checksum at byte {pos}", pos)
        size = _octal(header[124:136])
        kind = header[156:157]
        if kind in (b"x", b"L"):
            data = _read_exact(f, padded(size), "a long-name header")[:size]
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8")
            continue
        if kind not in (b"0", b"\0"):  # directories, links, global headers: nothing to read
            f.seek(padded(size), 1)
            long_name = None
            continue
        name = header[0:100].rstrip(b"\0").decode("utf-8")
        prefix = header[345:500].rstrip(b"\0").decode("utf-8") if header[257:262] == b"ustar" else ""
        yield entry, long_name or (f"{prefix}/{name}" if prefix else name), size
        long_name = None


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def iter_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each regular file from the current position to the end of the archive."""
    for _, path, size in iter_headers(f):
        yield path, _read_exact(f, padded(size), f"member {path}")[:size]


def split_key(path: str) -> tuple[str, str]:
    """'dir/abc.labels.json' -> ('dir/abc', 'labels.json'), webdataset's grouping rule."""
    slash = path.rfind("/") + 1
    dot = path.find(".", slash)
    if dot < 0:
        return path, ""
    return path[:dot], path[dot + 1 :]


def iter_samples(f: BinaryIO) -> Iterator[ShardSample]:
    """Samples from the current position; damage is raised after the last complete sample."""
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for path, data in iter_members(f):
            k, ext = split_key(path)
            if k != key and key is not None:
                yield ShardSample(key, members)
                members = {}
            key = k
            members[ext] = data
    except ShardDamage:
        # The members read so far are whole; a missing one shows when the sample is decoded.
        if key is not None:
            yield ShardSample(key, members)
        raise
    if key is not None:
        yield ShardSample(key, members)


def skip_samples(f: BinaryIO, count: int) -> None:
    """Advance past `count` samples reading headers only (used when no index gives offsets)."""
    if count == 0:
        return
    seen = 0
    key: str | None = None
    for pos, path, size in iter_headers(f):
        k, _ = split_key(path)
        if k != key:
            if seen == count:
                f.seek(pos)
                return
            seen += 1
            key = k
        f.seek(padded(size), 1)
    raise TruncatedShard(f"shard has fewer than {count + 1} samples")
