"""Bytes of a rank's model states under DeepSpeed ZeRO: parameters, gradients, fp32 master
weights, Adam's moments and DeepSpeed's buckets, worked out from the model's parameter groups
the way DeepSpeed 0.19 lays them out (tests/multiproc/test_plan_memory.py compares every
part with the live tensors of a real 2-rank engine).

ZeRO 1-2 flatten each parameter group, padded to a multiple of 2 x world elements, and give
each rank one contiguous partition of it; the model keeps the whole flat group in its dtype.
ZeRO 3 partitions each parameter on its own (ceil(numel / world) elements per rank); a
parameter under `zero.param_persistence_threshold` elements also stays whole on every rank.
Figures are for one rank: the worst one unless `rank` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pretrain.model import ViTConfig, build_model
from pretrain.zero.engine import ZeroConfig
from pretrain.zero.optimizer import param_groups

_ZERO12_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: partition starts, in elements


@dataclass(frozen=True)
class ModelShape:
    groups: list[list[int]]  # elements of each parameter, per optimizer parameter group, in group order
    params: list[int]  # elements of each parameter, in the model's order (ZeRO-3 partitions these)

    @property
    def numel(self) -> int:
        return sum(self.params)


def model_shape(cfg: ViTConfig, weight_decay: float) -> ModelShape:
    """The parameter layout, from the model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_model(cfg)
    groups = [[p.numel() for p in g["params"]] for g in param_groups(model.named_parameters(), weight_decay)]
    return ModelShape(groups=groups, params=[p.numel() for p in model.parameters()])


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def _padded(group: list[int], world: int) -> int:
    unit = _ZERO12_ALIGNMENT * world
    return math.ceil(sum(group) / unit) * unit


def _partition_params(group: list[int], world: int, rank: int | None) -> int:
    """Elements of the whole parameters that overlap `rank`'s partition of the group (None: the
    most of any rank): where gradients stay in the parameters' dtype, DeepSpeed keeps each such
    gradient whole."""
    size = _padded(group, world) // world
    starts = [0]
    for n in group:
        starts.append(starts[-1] + n)
    most = 0
    for r in range(world) if rank is None else [rank]:
        lo, hi = r * size, (r + 1) * size
        most = max(most, sum(n for n, s in zip(group, starts) if s < hi and s + n > lo))
    return most


@dataclass(frozen=True)
class ModelStates:
    """Bytes per rank, each part as DeepSpeed holds it."""

    parameters: int  # the model's weights in its dtype (ZeRO-3: the partition and the persistent ones)
    gathered: int  # ZeRO-3: parameters gathered whole around the blocks being computed, at most
    gradients: int
    master: int  # fp32 master weights of the rank's partition
    optimizer: int  # Adam's two fp32 moments of the partition
    buckets: int  # gradient reduction buckets
    ema: int  # fp32 EMA weights (train.ema_decay), whole on every rank

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gathered parameters": self.gathered,
            "gradients": self.gradients,
            "fp32 master weights": self.master,
            "Adam moments": self.optimizer,
            "reduce buckets": self.buckets,
            "EMA weights": self.ema,
        }


def model_states(
    shape: ModelShape, zero: ZeroConfig, world: int, ema: bool = False, rank: int | None = None
) -> ModelStates:
    """Bytes of `rank`'s model states; None: the rank that holds the most (ranks differ only in
    the gradients of parameters their partitions cut through, at ZeRO 1-2)."""
    param_b = _bytes(zero.precision)
    grad_b = _bytes(zero.grad_dtype if zero.precision == "bf16" else "fp32")
    ema_b = 4 * shape.numel if ema else 0
    if zero.stage == 3:
        part = sum(math.ceil(n / world) for n in shape.params)
        persistent = [n for n in shape.params if n < zero.param_persistence_threshold]
        gathered_max = sum(shape.params) - sum(persistent)
        big = max((n for n in shape.params if n >= zero.param_persistence_threshold), default=0)
        gathered = min(gathered_max, zero.max_live_parameters, zero.prefetch_bucket_size + 2 * big)
        return ModelStates(
            # a persistent parameter's whole tensor is gathered into a buffer padded to world x partition
            parameters=param_b * (part + sum(math.ceil(n / world) * world for n in persistent)),
            gathered=param_b * gathered,
            gradients=grad_b * part,
            master=4 * part,
            optimizer=8 * part,
            buckets=grad_b * zero.reduce_bucket_size,
            ema=ema_b,
        )
    if zero.stage == 0:  # plain data parallel: everything whole, fp32, no master copy
        n = shape.numel
        return ModelStates(
            parameters=4 * n, gathered=0, gradients=4 * n, master=0, optimizer=8 * n, buckets=0, ema=ema_b
        )
    padded = [_padded(g, world) for g in shape.groups]
    part = sum(p // world for p in padded)
    if zero.precision == "bf16" and zero.grad_dtype == "fp32":
        # ZeRO-1 runs DeepSpeed's BF16_Optimizer: the whole flat fp32 gradient on every rank;
        # ZeRO-2 accumulates into the fp32 partition only.
        gradients = 4 * (sum(padded) if zero.stage == 1 else part)
    else:
        gradients = grad_b * sum(_partition_params(g, world, rank) for g in shape.groups)
    # Buckets exist while backward reduces (two alternating ones with overlap_comm); the
    # BF16_Optimizer reduces its flat buffer in place and has none.
    bf16_optimizer = zero.stage == 1 and zero.precision == "bf16" and zero.grad_dtype == "fp32"
    buckets = (
        0 if bf16_optimizer else (2 if zero.overlap_comm else 1) * grad_b * min(zero.reduce_bucket_size, shape.numel)
    )
    return ModelStates(
        parameters=param_b * sum(padded),
        gathered=0,
        gradients=gradients,
        master=4 * part,
        optimizer=8 * part,
        buckets=buckets,
        ema=ema_b,
    )
