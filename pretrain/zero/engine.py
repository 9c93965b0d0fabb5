"""The DeepSpeed engine, set up from the `zero` section.

DeepSpeed's defaults are sized for GPUs (500M-element buckets); every size that decides
peak memory is a config field here, so a CPU test and an 8-GPU node use the same code.
ZeRO stage 3 builds the model inside `deepspeed.zero.Init`, so no rank ever holds all of
it: that is what lets ViT-H/14 train on two CPU processes with 22 GB between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pretrain.zero import deepspeed_patches
from pretrain.zero.optimizer import OptimConfig, build_optimizer, build_scheduler
from vitscale_common.config_loader import ConfigError


@dataclass
class ZeroConfig:
    stage: int = 1  # ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters)
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights/activations, fp32 master weights)
    # Under bf16: the dtype gradients are accumulated over micro-batches and reduced across
    # ranks in. fp32, as Megatron and torchtitan do: the mean gradient to fp32 rounding,
    # whatever the accumulation count. bf16 (DeepSpeed's default) halves gradient memory and
    # traffic, but rounds at every micro-batch and in the reduction (docs/PRETRAIN.md, "Precision").
    grad_dtype: str = "fp32"
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket (peak gradient memory)
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather bucket (stages 1-2)
    prefetch_bucket_size: int = 20_000_000  # stage 3: elements of parameters fetched ahead
    param_persistence_threshold: int = 100_000  # stage 3: params smaller than this stay whole on every rank
    max_live_parameters: int = 200_000_000  # stage 3: gathered elements kept at once
    sub_group_size: int = 100_000_000  # stage 3: optimizer-step chunk (bounds its temporaries)
    overlap_comm: bool = False  # overlap reduction with backward (worth it on GPUs, costs buffers)

    def validate(self, where: str = "zero") -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{where}.stage: must be 0, 1, 2 or 3, got {self.stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{where}.precision: must be fp32 or bf16, got {self.precision!r}")
        if self.grad_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"{where}.grad_dtype: must be fp32 or bf16, got {self.grad_dtype!r}")
        if self.precision == "fp32" and self.grad_dtype != "fp32":
            raise ConfigError(
                f"{where}.grad_dtype: bf16 gradients need precision bf16 (fp32 weights have fp32 gradients)"
            )
        if self.stage == 0 and self.precision == "bf16":
            # DeepSpeed's stage-0 bf16 optimizer (FP16_UnfusedOptimizer) steps our AdamW once on
            # zero gradients as it starts: Adam's step count then runs one ahead of the schedule
            # and weight decay is applied once before training. Stages 1-3 do neither.
            raise ConfigError(
                f"{where}.precision: bf16 needs ZeRO stage 1-3 (DeepSpeed's stage-0 bf16 optimizer "
                f"takes an extra Adam step as it starts); set {where}.stage=1"
            )


def deepspeed_config(
    cfg: ZeroConfig, *, global_batch: int, micro_batch: int, grad_accum: int, clip_grad: float
) -> dict[str, Any]:
    """The DeepSpeed JSON config; batch sizes are derived by the caller, once."""
    cfg.validate()
    zero: dict[str, Any] = {
        "stage": cfg.stage,
        "reduce_bucket_size": cfg.reduce_bucket_size,
        "allgather_bucket_size": cfg.allgather_bucket_size,
        "overlap_comm": cfg.overlap_comm,
        "contiguous_gradients": True,
        # Stages 1-2: one all-reduce of each whole bucket. DeepSpeed's "reduce_scatter" path
        # there all-reduces too (its default use_multi_rank_bucket_allreduce), but first copies
        # the bucket's slices into a new tensor and afterwards copies them back: same traffic,
        # two more passes over the gradients. Stage 3's reduce-scatter is a real one (half
        # the traffic): kept. docs/PRETRAIN.md ("Communication") has the bytes per step.
        "reduce_scatter": cfg.stage == 3,
    }
    if cfg.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=cfg.prefetch_bucket_size,
            stage3_param_persistence_threshold=cfg.param_persistence_threshold,
            stage3_max_live_parameters=cfg.max_live_parameters,
            sub_group_size=cfg.sub_group_size,
        )
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip_grad,
        "zero_optimization": zero,
        "bf16": {
            "enabled": cfg.precision == "bf16",
            # BF16_Optimizer (ZeRO-1, fp32 gradients): each bf16 gradient moves into the
            # fp32 buffer as backward produces it and is freed (pretrain/zero/deepspeed_patches.py).
            "immediate_grad_update": cfg.precision == "bf16" and cfg.grad_dtype == "fp32",
        },
        **(_bf16_gradients(cfg.grad_dtype) if cfg.precision == "bf16" else {}),
        # Our optimizer is torch's AdamW/SGD; DeepSpeed only vouches for its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _bf16_gradients(grad_dtype: str) -> dict[str, Any]:
    """DeepSpeed's keys for the gradients of a bf16 model. With fp32 accumulation DeepSpeed
    runs ZeRO-1 through its BF16_Optimizer (same sharding, its own checkpoint files) and
    ZeRO-2/3 accumulate into fp32 partitions."""
    if grad_dtype == "bf16":
        return {}  # DeepSpeed's default: the model's dtype for both
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def build_model_for(cfg: ZeroConfig, ds_config: dict, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct the model; partitioned as it is built under ZeRO-3."""
    if cfg.stage != 3:
        return build()
    import deepspeed

    # No `dtype=`: DeepSpeed 0.19 then picks bf16 on any device without fp16 (an operator-precedence
    # slip); without it the precision comes from the config's bf16 section, as intended.
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build()


def build_engine(
    model: torch.nn.Module,
    ds_config: dict,
    optim_cfg: OptimConfig,
    total_steps: int,
    deepspeed_version: str | None = None,
):
    """DeepSpeed engine wrapping `model`, our optimizer and the step-indexed lr schedule.
    `deepspeed_version`: the release the replacements are guarded on (default: the one
    installed; another one makes DeepSpeed's own code run, as on an unverified release)."""
    import deepspeed

    optimizer = build_optimizer(optim_cfg, model.named_parameters())
    # A callable, so the schedule drives the optimizer DeepSpeed wraps around ours.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: build_scheduler(optim_cfg, opt, total_steps),
        config=ds_config,
    )
    # Where verified on this DeepSpeed release: the clipping norm fused (and the bf16 overflow
    # scan dropped), ZeRO-1 bf16 gradients reduced and clipped whole, ZeRO-2 bf16 buckets not
    # copied back.
    engine.vitscale_patches, engine.vitscale_patches_line = deepspeed_patches.install(engine, deepspeed_version)
    return engine


def input_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
