"""Read access to a shard dataset: `open_dataset(path)`.

Holds dataset.json, classes and the per-shard table in memory; the per-sample index is
read lazily, one shard at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from sharding import format as fmt
from sharding.index import EXCLUSION_SCHEMA, REJECTED_SCHEMA, SAMPLE_SCHEMA, SHARD_SCHEMA, read_table
from vitscale_common.errors import UserError


@dataclass(frozen=True)
class ShardInfo:
    split: str
    index: int
    name: str  # e.g. train-000012
    path: str  # absolute path of the tar
    num_samples: int
    num_bytes: int
    sha256: str

    @property
    def url(self) -> str:
        """What webdataset takes: the plain path (never a `pipe:` URL)."""
        return self.path


@dataclass(frozen=True)
class ClassInfo:
    index: int
    class_id: str
    name: str


class ShardDataset:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        info_path = self.path / fmt.DATASET_JSON
        if not info_path.is_file():
            raise UserError(f"{info_path}: not found (not a shard dataset, or not merged yet)")
        try:
            self.info = json.loads(info_path.read_text())
        except ValueError as e:
            raise UserError(f"{info_path}: not valid JSON: {e}") from None
        if self.info.get("format") != fmt.FORMAT_NAME:
            raise UserError(f"{info_path}: not a {fmt.FORMAT_NAME} dataset")
        if self.info.get("format_version") != fmt.FORMAT_VERSION:
            raise UserError(
                f"{info_path}: format version {self.info.get('format_version')}, this code reads {fmt.FORMAT_VERSION}"
            )
        try:
            table = read_table(self.path / fmt.SHARD_TABLE, SHARD_SCHEMA)
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise UserError(f"{self.path / fmt.SHARD_TABLE}: unreadable shard table: {e}") from None
        self._shards: dict[str, list[ShardInfo]] = {s: [] for s in self.splits}
        for row in table.to_pylist():
            self._shards.setdefault(row["split"], []).append(
                ShardInfo(
                    split=row["split"],
                    index=row["shard"],
                    name=row["name"],
                    path=str(self.path / row["path"]),
                    num_samples=row["num_samples"],
                    num_bytes=row["num_bytes"],
                    sha256=row["sha256"],
                )
            )
        for shards in self._shards.values():
            shards.sort(key=lambda s: s.index)

    def __repr__(self) -> str:
        return f"ShardDataset({str(self.path)!r}, splits={ {s: self.num_samples(s) for s in self.splits} })"

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def splits(self) -> list[str]:
        # dataset.json is written with sorted keys; split_order keeps the plan's order.
        return list(self.info.get("split_order") or self.info["splits"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def label_kind(self) -> str:
        return self.info["label_kind"]

    def _check_split(self, split: str) -> None:
        if split not in self.info["splits"]:
            raise UserError(f"{self.path}: no split {split!r} (has {', '.join(self.splits)})")

    def shards(self, split: str) -> list[ShardInfo]:
        self._check_split(split)
        return list(self._shards.get(split, []))

    def num_samples(self, split: str) -> int:
        self._check_split(split)
        return int(self.info["splits"][split]["num_samples"])

    def sample_index(self, split: str, shard_name: str) -> pa.Table:
        """Per-sample rows of one shard (see sharding.index.SAMPLE_SCHEMA)."""
        self._check_split(split)
        got_split, index = fmt.parse_shard_name(shard_name)
        if got_split != split:
            raise UserError(f"shard {shard_name!r} is not in split {split!r}")
        return read_table(self.path / fmt.shard_index_path(split, index), SAMPLE_SCHEMA)

    def excluded_keys(self) -> set[str]:
        keys: set[str] = set()
        for p in sorted((self.path / fmt.EXCLUSIONS_DIR).glob("*.parquet")):
            keys.update(read_table(p, EXCLUSION_SCHEMA).column("key").to_pylist())
        return keys

    @cached_property
    def classes(self) -> list[ClassInfo]:
        out = []
        path = self.path / fmt.CLASSES_TSV
        for line in path.read_text().splitlines()[1:]:
            idx, class_id, name = line.split("\t")
            out.append(ClassInfo(int(idx), class_id, name))
        return out

    def rejected(self) -> pa.Table:
        return read_table(self.path / fmt.REJECTED, REJECTED_SCHEMA)


def open_dataset(path: str | Path) -> ShardDataset:
    return ShardDataset(path)
