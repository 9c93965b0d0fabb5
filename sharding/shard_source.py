"""Where shard bytes come from: local paths, or any fsspec URL through a size-bounded local cache.

`ShardSource` opens a shard and checks each sample against the dataset's per-shard index
(`ShardIndex`, read on demand), so the stream (stream.py) sees a verified sample or the
reason it is unusable.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple, Sequence

import numpy as np

from sharding.tar_reader import ShardDamage, ShardSample, TruncatedShard, iter_samples, skip_samples
from vitscale_common.atomic import atomic_open
from vitscale_common.errors import UserError

log = logging.getLogger(__name__)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


class ShardRows(NamedTuple):
    """What the dataset index says about one shard's samples, in order."""

    offsets: np.ndarray  # byte offset of each sample's first header
    keys: list[str]
    sha256: list[str]  # hex digest of each sample's JPEG bytes


class ShardIndex:
    """Reads one shard's rows from the dataset's per-shard index files, on demand.

    At JFT scale the whole index is tens of GB; a reader needs only the shard it is in.
    Plain data, so loader processes receive it under any start method.
    """

    def __init__(self, dataset_path: str, split: str, shard_names: Sequence[str]):
        self.dataset_path, self.split, self.shard_names = dataset_path, split, list(shard_names)

    def rows(self, shard: int) -> ShardRows | None:
        from sharding.dataset import open_dataset

        name = self.shard_names[shard]
        try:
            table = open_dataset(self.dataset_path).sample_index(self.split, name)
        except (OSError, ValueError, UserError) as e:  # reading still works, by scanning headers
            log.warning("no usable index for %s (%s); scanning its headers, not verifying", name, e)
            return None
        cols = table.select(["sample_offset", "key", "sha256"]).to_pydict()
        return ShardRows(np.asarray(cols["sample_offset"], dtype=np.int64), cols["key"], cols["sha256"])


def evict_least_recent(folder: Path, max_bytes: int, keep: Path) -> None:
    """Delete the least recently used cached shards (oldest mtime first) until the folder's
    shards total at most `max_bytes`; `keep`, the shard just fetched, always stays."""
    entries = []
    for path in folder.iterdir():
        if path.name.startswith("."):  # another worker's copy in progress
            continue
        try:
            st = path.stat()
        except FileNotFoundError:  # evicted by another worker meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size


class ShardSource:
    """Opens shards by URL: local paths directly, anything else through fsspec.

    With `cache_dir`, a remote shard is first copied whole into that per-node folder (through
    `atomic_open`: concurrent workers may race, the last identical copy wins) and read
    from there, so a shard read by several readers on a node crosses the network once. With
    `cache_max_bytes`, each new copy evicts the least recently opened shards beyond that size
    (a reader that has a shard open keeps reading it: POSIX unlinks only the name).
    With `index`, readers seek straight to a sample and, if `verify`, check each sample's key
    and JPEG digest against the index.
    """

    def __init__(self, urls: Sequence[str], cache_dir: str | None = None, index: ShardIndex | None = None,
                 verify: bool = True, cache_max_bytes: int = 0):  # fmt: skip
        self.urls = list(urls)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_max_bytes = cache_max_bytes
        self.index, self.verify = index, verify

    def name(self, shard: int) -> str:
        return self.urls[shard].rsplit("/", 1)[-1]

    def rows(self, shard: int) -> ShardRows | None:
        return self.index.rows(shard) if self.index else None

    def open(self, shard: int) -> BinaryIO:
        url = self.urls[shard]
        if _is_local(url):
            return open(_local_path(url), "rb", buffering=1 << 20)
        import fsspec  # remote only: keeps local reads free of the import

        if self.cache_dir is None:
            return fsspec.open(url, "rb", block_size=1 << 22).open()
        cached = self.cache_dir / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{self.name(shard)}"
        try:
            os.utime(cached)  # mtime = last opened, the order eviction goes by
            return open(cached, "rb", buffering=1 << 20)
        except FileNotFoundError:  # not cached yet, or evicted by another worker just now
            pass
        with fsspec.open(url, "rb") as src, atomic_open(cached) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        f = open(cached, "rb", buffering=1 << 20)  # opened before any eviction can remove the name
        if self.cache_max_bytes:
            evict_least_recent(self.cache_dir, self.cache_max_bytes, keep=cached)
        return f

    def read_run(self, shard: int, first: int, count: int, rows: ShardRows | None) -> Iterator[ShardSample | str]:
        """Samples first..first+count-1 of a shard in order; an unusable one as its reason.

        `rows` is the shard's index (None: scan headers, check nothing). Damage is handled so
        that the outcome for a sample never depends on where reading started: past a corrupt
        header, reading resumes at the next sample the index places after it (exactly where a
        reader seeking to that sample would start); a truncated shard, an unopenable one, or
        damage without an index loses everything after.
        """
        done = 0
        try:
            with self.open(shard) as f:
                if rows is not None and first < len(rows.offsets):
                    f.seek(int(rows.offsets[first]))
                else:
                    skip_samples(f, first)
                while done < count:
                    try:
                        for sample in iter_samples(f):
                            if done == count:
                                return
                            yield self._checked(sample, rows, first + done)
                            done += 1
                        break  # the shard ended early: the rest is counted as truncated below
                    except ShardDamage as e:
                        log.warning("%s: %s", self.name(shard), e)
                        resume = _resume_after(rows, first + done, e)
                        if resume is None:
                            raise
                        while done < count and first + done < resume:
                            yield e.reason
                            done += 1
                        if done < count:
                            f.seek(int(rows.offsets[resume]))
            reason = "truncated"
        except ShardDamage as e:
            reason = e.reason
        except Exception as e:  # missing file, refused connection, no range support: all count alike
            reason = "unreadable"
            log.warning("%s: cannot read: %s", self.name(shard), e)
        for _ in range(count - done):
            yield reason

    def _checked(self, sample: ShardSample, rows: ShardRows | None, position: int) -> ShardSample | str:
        """The sample, or why it disagrees with the index (bytes changed since conversion)."""
        if rows is None or not self.verify:
            return sample
        if position >= len(rows.keys) or sample.key != rows.keys[position]:
            return "index_mismatch"
        jpg = sample.members.get("jpg")
        if jpg is not None and hashlib.sha256(jpg).hexdigest() != rows.sha256[position]:
            return "checksum"
        return sample


def _resume_after(rows: ShardRows | None, sample: int, damage: ShardDamage) -> int | None:
    """The first sample from `sample` on that starts after the damage, if the index says."""
    if isinstance(damage, TruncatedShard) or damage.offset < 0 or rows is None:
        return None
    after = int(np.searchsorted(rows.offsets, damage.offset, side="right"))
    resume = max(sample, after)
    return resume if resume < len(rows.offsets) else None
