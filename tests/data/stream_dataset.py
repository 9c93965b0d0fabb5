"""Tiny shard datasets for the stream tests, written with the project's shard writer and index.

Every sample's class is its own id (num_classes = number of samples), so a batch's targets
say exactly which samples it holds. Images are small JPEGs whose colour also encodes the id.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from sharding import format as fmt
from sharding.index import EXCLUSION_SCHEMA, SAMPLE_SCHEMA, SHARD_SCHEMA, table_from_rows, write_table
from sharding.writer import ShardTarWriter


def jpeg(sample_id: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(sample_id)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_dataset(root: Path, splits: dict[str, list[int]], image_size: int = 24) -> Path:
    """`splits` maps a split to its shard sample counts; returns the dataset folder."""
    root = Path(root)
    total = sum(sum(c) for c in splits.values())
    shard_rows, info_splits, next_id = [], {}, 0
    for split, counts in splits.items():
        for shard, count in enumerate(counts):
            rows = []
            path = root / fmt.shard_path(split, shard)
            with ShardTarWriter(path) as w:
                for slot in range(count):
                    key = fmt.sample_key(split, shard, slot)
                    image = jpeg(next_id, image_size)
                    meta = json.dumps({"source_id": f"id{next_id}"}).encode()
                    loc = w.add(
                        key, [(fmt.IMAGE_EXT, image), (fmt.CLASS_EXT, str(next_id).encode()), (fmt.META_EXT, meta)]
                    )
                    m = loc.members
                    rows.append({
                        "key": key, "split": split, "shard": shard, "slot": slot,
                        "sample_offset": loc.offset, "sample_size": loc.size,
                        "jpg_offset": m["jpg"].offset, "jpg_size": m["jpg"].size,
                        "label_offset": m["cls"].offset, "label_size": m["cls"].size,
                        "json_offset": m["json"].offset, "json_size": m["json"].size,
                        "label": next_id, "labels": None, "sha256": hashlib.sha256(image).hexdigest(),
                        "source_id": f"id{next_id}", "width": image_size, "height": image_size,
                    })  # fmt: skip
                    next_id += 1
            write_table(root / fmt.shard_index_path(split, shard), table_from_rows(rows, SAMPLE_SCHEMA))
            shard_rows.append({
                "split": split, "shard": shard, "name": fmt.shard_name(split, shard),
                "path": fmt.shard_path(split, shard), "num_samples": count, "num_bytes": w.num_bytes,
                "sha256": w.sha256(), "num_inputs": count, "num_rejected": 0,
            })  # fmt: skip
        info_splits[split] = {"num_samples": sum(counts), "num_shards": len(counts)}
    write_table(root / fmt.SHARD_TABLE, table_from_rows(shard_rows, SHARD_SCHEMA))
    info = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "name": "stream-test",
            "splits": info_splits, "num_classes": total, "label_kind": fmt.LABEL_SINGLE}  # fmt: skip
    (root / fmt.DATASET_JSON).write_text(json.dumps(info, indent=1))
    return root


def exclude(root: Path, keys: list[str]) -> None:
    rows = [{"key": k, "reason": "test_duplicate"} for k in keys]
    write_table(root / fmt.EXCLUSIONS_DIR / "test.parquet", table_from_rows(rows, EXCLUSION_SCHEMA))


def sample_ids(root: Path, split: str) -> list[int]:
    """Ids (= labels) of a split in shard order."""
    from sharding import open_dataset

    ds = open_dataset(root)
    return [i for s in ds.shards(split) for i in ds.sample_index(split, s.name).column("label").to_pylist()]
