"""A pretraining config on a cluster: memory by part, step time, throughput, days, loader cores,
checkpoint cost, the best feasible way to run it, and what to watch out for."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sharding
from pretrain.plan import activations as act
from pretrain.plan.calibration import Calibration, calibrate
from pretrain.plan.hardware import GIB, Assumptions, Cluster, Gpu, gpu_of, load_assumptions, load_gpus
from pretrain.plan.model_states import ModelShape, model_shape, model_states
from pretrain.plan.step_time import StepTime, flops_per_image, step_time
from pretrain.train.config import PretrainConfig, load_pretrain_config
from sharding.plan import PlanError, StreamLayout, default_width
from vitscale_common.config_loader import ConfigError

# Communication the compute does not hide, as a fraction of the step, above which the per-GPU
# batch is called too small.
EXPOSED_COMM_WARNING = 0.10


@dataclass(frozen=True)
class Option:
    """One way to run the config: ZeRO stage, micro-batch, accumulation, checkpointing."""

    stage: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    memory: dict[str, int]  # bytes per GPU by part
    time: StepTime

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    def describe(self) -> str:
        ckpt = "on" if self.checkpointing else "off"
        return f"ZeRO-{self.stage}, micro-batch {self.micro_batch} x {self.grad_accum}, activation checkpointing {ckpt}"

    def overrides(self) -> str:
        return (f"zero.stage={self.stage} train.grad_accum={self.grad_accum} "
                f"model.activation_checkpointing={str(self.checkpointing).lower()}")  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    bytes: int  # one checkpoint, all ranks' files
    write_s: float  # at assume.checkpoint_write_gbs
    blocked_s: float  # training waits this long per save (the host copy only with async_save)
    fraction: float  # of the run's time spent blocked on saves at checkpoint.every


@dataclass
class Plan:
    cfg: PretrainConfig
    cluster: Cluster
    gpu: Gpu
    assume: Assumptions
    calibration: Calibration
    configured: Option
    alternatives: list[Option]
    recommended: Option | None
    total_steps: int | None
    loader_cores_per_gpu: float
    checkpoint: Checkpoint
    warnings: list[str]

    @property
    def images_per_s(self) -> float:
        return self.cfg.train.batch_size / self.configured.time.step_s

    @property
    def mfu(self) -> float:
        per_gpu = self.images_per_s / self.cluster.world
        return per_gpu * flops_per_image(self.cfg.model) / (self.gpu.peak_bf16_tflops * 1e12)

    @property
    def days(self) -> float | None:
        if self.total_steps is None:
            return None
        return self.total_steps * self.configured.time.step_s / (1 - self.checkpoint.fraction) / 86400

    def fits(self, option: Option | None = None) -> bool:
        return (option or self.configured).total <= self.gpu.memory_bytes

    def refusal(self) -> str | None:
        """Why vit-submit should refuse this config (over memory by more than assume.fit_margin), or None."""
        option = self.configured
        if option.total <= self.gpu.memory_bytes * (1 + self.assume.fit_margin):
            return None
        part, size = max(option.memory.items(), key=lambda kv: kv[1])
        hint = (
            f"; {self.recommended.overrides()} would fit"
            if self.recommended
            else "; no stage, micro-batch or checkpointing fits"
        )
        return (f"{self.cfg.model.name} does not fit a {self.cluster.gpu} ({self.gpu.memory_gib:.1f} GiB): "
                f"{option.total / GIB:.1f} GiB predicted per GPU, {part} alone {size / GIB:.1f} GiB "
                f"({option.describe()}){hint}")  # fmt: skip

    def summary(self) -> str:
        o, c = self.configured, self.cluster
        fit = "fits" if self.fits() else "DOES NOT FIT"
        days = f", {self.days:.1f} days for {self.total_steps:,} steps" if self.days is not None else ""
        return (f"{self.cfg.model.name} on {c.world} x {c.gpu} ({c.nodes} x {c.gpus_per_node}): {o.describe()}; "
                f"{o.total / GIB:.1f} of {self.gpu.memory_gib:.1f} GiB ({fit}); {o.time.step_s:.3f} s/step, "
                f"{self.images_per_s:,.0f} img/s, MFU {100 * self.mfu:.0f}%{days}; "
                f"loader {self.loader_cores_per_gpu:.1f} cores/GPU")  # fmt: skip


# ------------------------------------------------------------------------------ the parts
def _memory(
    cfg: PretrainConfig, shape: ModelShape, world: int, assume: Assumptions, zero, micro: int
) -> dict[str, int]:
    states = model_states(shape, zero, world, ema=bool(cfg.train.ema_decay)).parts()
    elem = 2 if zero.precision == "bf16" else 4
    a = act.activations(cfg.model, micro, elem)
    tensors = {
        **states,
        f"activations, {cfg.model.depth} blocks": a.blocks,
        "activations outside the blocks": a.outside_blocks,
        "backward temporaries (one block)": act.block_bytes(cfg.model, micro, elem, 4, checkpointed=False),
    }
    tensors = {k: v for k, v in tensors.items() if v}
    margin = int(assume.allocator_margin * sum(tensors.values()))
    return {**tensors, "allocator margin": margin, "CUDA context": int(assume.cuda_context_gib * GIB)}


def _option(cfg, shape, cluster, gpu, assume, mfu, stage, micro, accum, checkpointing) -> Option:
    zero = dataclasses.replace(cfg.zero, stage=stage)
    model = dataclasses.replace(cfg.model, activation_checkpointing=checkpointing)
    mem = _memory(dataclasses.replace(cfg, model=model), shape, cluster.world, assume, zero, micro)
    t = step_time(model, shape, zero, cluster, gpu, assume, micro_batch=micro, grad_accum=accum, mfu=mfu)
    return Option(stage, micro, accum, checkpointing, mem, t)


def _stages(cfg: PretrainConfig) -> list[int]:
    return [1, 2, 3] if cfg.zero.precision == "bf16" else [0, 1, 2, 3]  # bf16 needs a ZeRO optimizer


def _micro_batches(per_rank: int) -> list[int]:
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0 and (m & (m - 1) == 0 or m == per_rank)]


def _preference(batch: int, o: Option) -> tuple:
    """The fastest (to 3 significant figures); between equals, no recomputation, the larger
    micro-batch (the MFU assumed for all of them holds best there), the lower stage."""
    rate = batch / o.time.step_s
    return (round(rate, 2 - math.floor(math.log10(rate))), not o.checkpointing, o.micro_batch, -o.stage)


def _checkpoint(
    cfg: PretrainConfig, shape: ModelShape, cluster: Cluster, assume: Assumptions, step_s: float
) -> Checkpoint:
    n = shape.numel
    weights = 0 if cfg.zero.stage == 3 else n * (2 if cfg.zero.precision == "bf16" else 4)  # rank 0's model file
    states = 12 * n + (4 * n if cfg.train.ema_decay else 0)  # fp32 master + two moments (+ EMA), split over ranks
    total = weights + states
    write_s = total / (assume.checkpoint_write_gbs * 1e9)
    per_rank = weights + states / cluster.world  # rank 0 holds the most
    blocked = per_rank / (assume.host_copy_gbs * 1e9) if cfg.checkpoint.async_save else write_s
    every = cfg.checkpoint.every
    fraction = blocked / (every * step_s + blocked) if every else 0.0
    return Checkpoint(total, write_s, blocked, fraction)


def _total_steps(cfg: PretrainConfig, train_samples: int | None) -> tuple[int | None, int | None]:
    """(total steps, samples per epoch): from train.steps, or epochs over the dataset's size."""
    samples = train_samples
    if samples is None and cfg.data.path and Path(cfg.data.path, "dataset.json").is_file():
        samples = sharding.open_dataset(cfg.data.path).num_samples(cfg.data.train_split)
    if cfg.train.steps:
        return cfg.train.steps, samples
    if samples is None:
        return None, None
    return math.ceil(cfg.train.epochs * (samples // cfg.train.batch_size)), samples


def _stream_warnings(cfg: PretrainConfig, world: int, samples: int | None) -> list[str]:
    d, batch = cfg.data, cfg.train.batch_size
    width = d.stream_width or default_width(batch, num_shards=2**62, cycle=d.stream_cycle)
    out = []
    try:
        StreamLayout(batch, width, d.stream_cycle).check_readers(world, d.readers)
    except PlanError as e:
        note = "" if d.stream_width else f" (data.stream_width=0 gives at most {width})"
        out.append(f"the data stream cannot take this world size: {e}{note}")
        return out
    partitions = width * d.stream_cycle
    if samples is not None and cfg.data.path and Path(cfg.data.path, "dataset.json").is_file():
        shards = len(sharding.open_dataset(cfg.data.path).shards(cfg.data.train_split))
        if samples / partitions < samples / shards:
            out.append(f"{partitions} partitions of {samples // partitions:,} samples are shorter than a shard "
                       f"({samples // shards:,}): shards are opened by more than two readers an epoch")  # fmt: skip
    return out


def _warnings(cfg: PretrainConfig, o: Option, cores: float, world: int, samples: int | None) -> list[str]:
    out = []
    exposed = o.time.exposed_comm_s / o.time.step_s
    if exposed > EXPOSED_COMM_WARNING:
        out.append(f"batch per GPU {o.micro_batch * o.grad_accum} is too small to hide communication: "
                   f"{1e3 * o.time.exposed_comm_s:.0f} ms a step is exposed ({100 * exposed:.0f}% of the step)")  # fmt: skip
    out += _stream_warnings(cfg, world, samples)
    cpus = cfg.slurm.cpus_per_task
    if cores > cpus - 1:
        out.append(f"the loader needs {cores:.1f} cores per GPU at this rate; slurm.cpus_per_task={cpus} leaves "
                   f"{cpus - 1} beside the rank")  # fmt: skip
    if cfg.model.attn_dropout > 0:
        out.append("model.attn_dropout > 0: attention probabilities kept for backward are not counted")
    return out


# ------------------------------------------------------------------------------ the plan
def plan_config(
    cfg: PretrainConfig,
    cluster: Cluster,
    gpus: dict[str, Gpu],
    assume: Assumptions,
    calibration: Path | None = None,
    train_samples: int | None = None,
) -> Plan:
    gpu = gpu_of(cluster, gpus)
    world, batch = cluster.world, cfg.train.batch_size
    if batch % (world * cfg.train.grad_accum):
        raise ConfigError(f"train.batch_size: {batch} is not divisible by {world} GPUs x train.grad_accum "
                          f"{cfg.train.grad_accum}")  # fmt: skip
    per_rank = batch // world
    cal = calibrate(calibration, gpu, cfg.train.compile, assume.mfu)
    shape = model_shape(cfg.model, cfg.train.optim.weight_decay)

    def option(stage, micro, checkpointing):
        return _option(cfg, shape, cluster, gpu, assume, cal.mfu, stage, micro, per_rank // micro, checkpointing)

    micro = per_rank // cfg.train.grad_accum
    ckpt = cfg.model.activation_checkpointing
    configured = option(cfg.zero.stage, micro, ckpt)
    alternatives = [option(s, micro, c) for s in _stages(cfg) for c in (False, True)]
    feasible = [option(s, m, c) for s in _stages(cfg) for m in _micro_batches(per_rank) for c in (False, True)]
    feasible = [o for o in feasible if o.total <= gpu.memory_bytes]
    recommended = max(feasible, key=lambda o: _preference(batch, o), default=None)
    total_steps, samples = _total_steps(cfg, train_samples)
    rate = assume.loader_images_per_core_s.get(cfg.data.decode)
    if rate is None:
        raise ConfigError(f"assume.loader_images_per_core_s has no rate for data.decode={cfg.data.decode!r}")
    cores = batch / configured.time.step_s / world / rate
    return Plan(
        cfg=cfg,
        cluster=cluster,
        gpu=gpu,
        assume=assume,
        calibration=cal,
        configured=configured,
        alternatives=alternatives,
        recommended=recommended,
        total_steps=total_steps,
        loader_cores_per_gpu=cores,
        checkpoint=_checkpoint(cfg, shape, cluster, assume, configured.time.step_s),
        warnings=_warnings(cfg, configured, cores, world, samples),
    )


def make_plan(
    files: Sequence[str | Path],
    overrides: Sequence[str] = (),
    *,
    cluster: Cluster | None = None,
    hardware: Sequence[str | Path] = (),
    calibration: Path | None = None,
    train_samples: int | None = None,
) -> Plan:
    """The plan of a pretraining config (files merged, then `key=value` overrides; `assume.KEY=VALUE`
    overrides the planner's assumptions). `cluster`: default the config's slurm section."""
    assumed = [o for o in overrides if o.startswith("assume.")]
    cfg = load_pretrain_config(files, [o for o in overrides if not o.startswith("assume.")])
    if cluster is None:
        if not cfg.slurm.gpu:
            raise ConfigError("no GPU kind: set slurm.gpu or pass --gpu (vit-plan --list-gpus names them)")
        cluster = Cluster(cfg.slurm.nodes, max(cfg.slurm.gpus_per_node, 1), cfg.slurm.gpu)
    return plan_config(cfg, cluster, load_gpus(hardware), load_assumptions(assumed), calibration, train_samples)
