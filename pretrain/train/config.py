"""The pretraining config: sections run, model, data, train, zero, checkpoint, eval, slurm.

Each section's dataclass lives next to the code that uses it; this file only composes
them and computes the derived values (per-rank batch, steps) once. A `model:` section
naming a registered variant (`model: {name: vit_b16}`) starts from that variant's fields,
so a recipe states only what it changes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from pretrain.checkpoint.checkpointer import CheckpointConfig
from pretrain.data.loaders import DataConfig
from pretrain.evaluate.periodic import EvalConfig
from pretrain.model import ViTConfig, list_models, model_config
from pretrain.train.loop import TrainConfig
from pretrain.zero.engine import ZeroConfig
from vitscale_common.config_loader import ConfigError, load_config, parse_overrides, read_yaml
from vitscale_common.slurm_config import SlurmConfig


@dataclass
class RunConfig:
    dir: str = "runs/pretrain"  # run directory: config, checkpoints, metrics; an existing one is resumed
    seed: int = 0  # seeds the model init, data order and augmentation
    dist_timeout_s: float = 1800.0  # collective-operation timeout (a dead peer fails the job after this)
    threads: int = 0  # torch intra-op threads per rank on CPU (0: torch's default)
    # CPU ranks: malloc keeps freed buffers for reuse (see pretrain/runtime/glibc_host_memory.py)
    reuse_host_memory: bool = True


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# Differences from a run's saved config that a resume accepts (dotted key prefixes):
# length, evaluation, logging and resources, none of which changes what a step computes.
RESUMABLE_CHANGES = (
    "run.dir",
    "run.dist_timeout_s",
    "run.threads",
    "run.reuse_host_memory",
    "train.steps",
    "train.epochs",
    "train.log_every",
    "train.stop_check_every",
    "train.compile",
    "train.compile_backend",
    "train.watchdog_s",
    "eval",
    "checkpoint",
    "slurm",
    "data.workers",
    "data.readers",
    "data.decode",
    "data.cache_dir",
    "data.prefetch",
    "zero.reduce_bucket_size",
    "zero.allgather_bucket_size",
    "zero.prefetch_bucket_size",
    "zero.param_persistence_threshold",
    "zero.max_live_parameters",
    "zero.sub_group_size",
    "zero.overlap_comm",
    "model.activation_checkpointing",
)


def _model_name(files: Sequence[str | Path], overrides: Sequence[str]) -> str | None:
    """The `model.name` the layers end up with, read before typing them."""
    name = None
    for layer in [read_yaml(f) for f in files] + [parse_overrides(overrides)]:
        value = OmegaConf.select(layer, "model.name", default=None)
        if value is not None:
            name = value
    return name


def load_pretrain_config(files: Sequence[str | Path], overrides: Sequence[str] = (), schema=PretrainConfig):
    """Typed, validated config: schema defaults < registry variant < files < overrides."""
    name = _model_name(files, overrides)
    base = schema()
    if name is not None:
        if name not in list_models():
            raise ConfigError(f"model.name: unknown variant {name!r} (known: {', '.join(list_models())})")
        base.model = model_config(name)
    cfg = load_config(base, files, overrides)
    cfg.train.validate()
    cfg.zero.validate()
    cfg.slurm.validate()
    if cfg.train.ema_decay and cfg.zero.stage == 3:
        raise ConfigError("train.ema_decay: EMA keeps whole weights on every rank; use zero.stage <= 2 with it")
    if cfg.train.compile != "none" and cfg.zero.stage == 3:
        # ZeRO-3 gathers and releases each parameter in module hooks around every block, and
        # swaps F.linear process-wide: a compiled block would have to trace through both.
        raise ConfigError(
            "train.compile: blocks needs zero.stage <= 2 (ZeRO-3 gathers parameters in hooks "
            "around each block); set train.compile=none"
        )
    if cfg.train.max_nonfinite_skips and cfg.zero.stage == 0:
        # Stage 0 has no ZeRO optimizer: the step is applied whatever the gradient, and the run
        # stops at the next log line or save that sees it.
        raise ConfigError(
            "train.max_nonfinite_skips: skipping a non-finite step needs a ZeRO optimizer; "
            "use zero.stage >= 1, or max_nonfinite_skips=0"
        )
    return cfg


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the job's shape, logged at start."""

    world_size: int
    per_rank_batch: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def derive(train: TrainConfig, world_size: int, steps_per_epoch: int) -> Derived:
    if train.batch_size % (world_size * train.grad_accum):
        raise ConfigError(
            f"train.batch_size: {train.batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {train.grad_accum}"
        )
    per_rank = train.batch_size // world_size
    total = train.steps or math.ceil(train.epochs * steps_per_epoch)
    return Derived(
        world_size, per_rank, per_rank // train.grad_accum, steps_per_epoch, total, min(train.optim.warmup_steps, total)
    )
