"""Re-read a shard dataset and report every disagreement between its files.

Per shard: the tar exists with the recorded size and sha256; stock `tarfile` reads it;
its members are exactly the indexed ones, at the indexed offsets, in order; every
image's sha256 matches and (optionally) it decodes as RGB at the indexed size; labels
agree. Per dataset: counts in dataset.json, the shard table, the index and
rejected.parquet reconcile (inputs = samples + rejected), and every excluded key exists.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sharding import format as fmt
from sharding.dataset import ShardDataset, ShardInfo


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_image(data: bytes, width: int, height: int) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                return f"is {img.format}, not JPEG"
            img.load()
            if img.mode != "RGB" or img.size != (width, height):
                return f"decodes as {img.mode} {img.size}, index says RGB {(width, height)}"
    except Exception as e:
        return f"does not decode: {type(e).__name__}: {e}"
    return None


def verify_shard(ds: ShardDataset, shard: ShardInfo, decode: bool = True) -> list[str]:
    path = Path(shard.path)
    if not path.is_file():
        return [f"{shard.name}: missing {path}"]
    problems = []
    if path.stat().st_size != shard.num_bytes:
        problems.append(f"{shard.name}: {path.stat().st_size} bytes, index says {shard.num_bytes}")
    if _sha256_file(path) != shard.sha256:
        problems.append(f"{shard.name}: sha256 differs from the index")
    index = ds.sample_index(shard.split, shard.name).to_pylist()
    if len(index) != shard.num_samples:
        problems.append(f"{shard.name}: index has {len(index)} rows, shard table says {shard.num_samples}")
    label_ext = fmt.LABELS_EXT if ds.label_kind == fmt.LABEL_MULTI else fmt.CLASS_EXT
    expected = []
    for row in index:
        for ext, off, size in (
            (fmt.IMAGE_EXT, row["jpg_offset"], row["jpg_size"]),
            (label_ext, row["label_offset"], row["label_size"]),
            (fmt.META_EXT, row["json_offset"], row["json_size"]),
        ):
            expected.append((f"{row['key']}.{ext}", off, size))
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            got = [(m.name, m.offset_data, m.size) for m in members]
            if got != expected:
                first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                problems.append(
                    f"{shard.name}: tar members disagree with the index from member {first} "
                    f"({len(got)} members, {len(expected)} expected)"
                )
                return problems
            for i, row in enumerate(index):
                image = tar.extractfile(members[3 * i]).read()
                label = tar.extractfile(members[3 * i + 1]).read()
                if hashlib.sha256(image).hexdigest() != row["sha256"]:
                    problems.append(f"{shard.name}/{row['key']}: image sha256 differs from the index")
                want = (json.dumps(row["labels"]) if ds.label_kind == fmt.LABEL_MULTI else str(row["label"])).encode()
                if label != want:
                    problems.append(f"{shard.name}/{row['key']}: label {label!r}, index says {want!r}")
                if decode and (err := _check_image(image, row["width"], row["height"])):
                    problems.append(f"{shard.name}/{row['key']}: image {err}")
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{shard.name}: unreadable tar: {e}")
    return problems


@functools.lru_cache(maxsize=4)
def _dataset(path: str) -> ShardDataset:
    return ShardDataset(path)


def _verify_one(path: str, split: str, name: str, decode: bool) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard; runs in a worker process."""
    ds = _dataset(path)
    shard = next(s for s in ds.shards(split) if s.name == name)
    keys = ds.sample_index(split, name).column("key").to_pylist()
    return verify_shard(ds, shard, decode), keys


def verify_dataset(
    path: str | Path, decode: bool = True, workers: int = 1, progress: Callable[[ShardInfo], None] = lambda s: None
) -> VerifyReport:
    ds = ShardDataset(path)
    report = VerifyReport()
    keys: set[str] = set()
    shards = []
    for split in ds.splits:
        split_info = ds.info["splits"][split]
        in_split = ds.shards(split)
        shards += in_split
        if len(in_split) != split_info["num_shards"]:
            report.problems.append(
                f"{split}: {len(in_split)} shards in the table, dataset.json says {split_info['num_shards']}"
            )
        if sum(s.num_samples for s in in_split) != split_info["num_samples"]:
            report.problems.append(
                f"{split}: shard table sums to {sum(s.num_samples for s in in_split)} samples, "
                f"dataset.json says {split_info['num_samples']}"
            )
        if split_info["num_samples"] + split_info["num_rejected"] != split_info["num_inputs"]:
            report.problems.append(f"{split}: samples + rejected != inputs in dataset.json")
    jobs = [(str(ds.path), s.split, s.name, decode) for s in shards]
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(_verify_one, *zip(*jobs)) if pool and jobs else map(lambda j: _verify_one(*j), jobs)
        for shard, (problems, shard_keys) in zip(shards, results):  # in order: a stable report
            report.problems += problems
            keys.update(shard_keys)
            report.shards += 1
            report.samples += shard.num_samples
            report.bytes += shard.num_bytes
            progress(shard)
    rejected = ds.rejected().num_rows
    if rejected != ds.info["num_rejected"]:
        report.problems.append(f"rejected.parquet has {rejected} rows, dataset.json says {ds.info['num_rejected']}")
    if report.samples + rejected != ds.info["num_inputs"]:
        report.problems.append(f"{report.samples} samples + {rejected} rejected != {ds.info['num_inputs']} inputs")
    unknown = ds.excluded_keys() - keys
    if unknown:
        report.problems.append(f"{len(unknown)} excluded keys are not in the index (e.g. {sorted(unknown)[0]})")
    return report
