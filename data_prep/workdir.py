"""The convert job's work area inside the output folder: where each shard's records go.

`vit-prep convert` writes a shard's `done` record and rejected inputs here; `vit-prep
merge` reads them back and removes the area. Both name the same files through these.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.plan import ShardTask
from sharding import format as fmt


def work_path(out: Path, name: str) -> Path:
    return out / fmt.WORK_DIR / name


def done_path(out: Path, task: ShardTask) -> Path:
    return work_path(out, f"{task.name}.done.json")


def rejected_part_path(out: Path, task: ShardTask) -> Path:
    return work_path(out, f"{task.name}.rejected.parquet")


def is_done(out: Path, task: ShardTask) -> bool:
    """The shard's record and its tar are both there: the shard is never redone."""
    return done_path(out, task).is_file() and (out / fmt.shard_path(task.split, task.shard)).is_file()


def canonical_json(obj) -> str:
    """The one JSON spelling of plans and records, so reruns write the same bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
