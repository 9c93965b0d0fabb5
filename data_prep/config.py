"""`PrepConfig`: a conversion recipe (configs/prep/*.yaml); `vit-prep` flags use the same names."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from data_prep.policy import ImagePolicy
from data_prep.sources.base import SourceConfig
from vitscale_common.errors import UserError
from vitscale_common.slurm_config import SlurmConfig


@dataclass
class PrepConfig:
    """Everything `vit-prep convert` needs; see docs/DATA_PREP.md."""

    source: SourceConfig = field(default_factory=SourceConfig)
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    output: Optional[str] = None  # dataset folder to write (required)
    name: Optional[str] = None  # dataset name in dataset.json (default: the source kind)
    seed: int = 0  # seed of the global shuffle (and of fraction splits)
    samples_per_shard: Optional[int] = None  # planned inputs per shard (default: the source's hint)
    splits: str = "train=0.8,val=0.1,test=0.1"  # split fractions, used when the source defines none
    dedup: bool = True  # exclude exact duplicate images (sha256) at merge time
    workers: int = 1  # converter processes on this node
    num_tasks: Optional[int] = None  # array tasks in all (default: SLURM_ARRAY_TASK_COUNT or 1)
    task_index: Optional[int] = None  # this task (default: SLURM_ARRAY_TASK_ID or 0)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # job resources for vit-submit; unused here


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_tasks(cfg: PrepConfig) -> tuple[int, int]:
    """(task_index, num_tasks): flags first, then the SLURM array environment, then (0, 1).

    SLURM numbers array tasks from the job's first index (`--array=1-8` gives ids 1..8);
    SLURM_ARRAY_TASK_MIN makes the index zero-based whatever range was submitted.
    """
    num_tasks = cfg.num_tasks if cfg.num_tasks is not None else _env_int("SLURM_ARRAY_TASK_COUNT") or 1
    if cfg.task_index is not None:
        index = cfg.task_index
    else:
        task_id = _env_int("SLURM_ARRAY_TASK_ID")
        index = 0 if task_id is None else task_id - (_env_int("SLURM_ARRAY_TASK_MIN") or 0)
    if num_tasks < 1 or not 0 <= index < num_tasks:
        raise UserError(f"task index {index} is outside 0..{num_tasks - 1} (--num-tasks {num_tasks})")
    return index, num_tasks


def parse_splits(text: str) -> dict[str, float]:
    """`train=0.8,val=0.1,test=0.1` -> {"train": 0.8, ...} (order kept: it is the cut order)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep or name.strip() in out:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"splits: {part!r} in {text!r} is not name=fraction (or repeats a name)") from None
    if not out:
        raise UserError("splits: empty")
    return out


def validate(cfg: PrepConfig) -> None:
    if not cfg.output:
        raise UserError("output: required (--output DIR)")
    if cfg.workers < 1:
        raise UserError(f"workers: must be >= 1, got {cfg.workers}")
    if cfg.samples_per_shard is not None and cfg.samples_per_shard < 1:
        raise UserError(f"samples_per_shard: must be >= 1, got {cfg.samples_per_shard}")
    parse_splits(cfg.splits)
    try:
        cfg.policy.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
