"""What a training step moves between ranks: counted, and worked out from the model.

`count_collectives()` wraps torch.distributed's collectives (and the references DeepSpeed's
communication layer keeps to two of them) and records each call's payload; `step_bytes()` is the same traffic as
arithmetic over the model's parameter groups, for a ZeRO stage, precision and world size,
so a table for models too large to run here (docs/PRETRAIN.md, "Communication") comes from
arithmetic a 2-rank test checks against the counted calls, byte for byte.

Payload: the full tensor a collective produces or consumes (all-reduce: the tensor;
all-gather: the gathered output; reduce-scatter: the input). Ring algorithms put on the
wire, per rank, 2(W-1)/W of an all-reduce's payload and (W-1)/W of the others'.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# The collective, and which of its tensor arguments is the full payload.
_PAYLOAD_ARG = {"all_reduce": 0, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 1, "broadcast": 0}
# DeepSpeed's ZeRO-1/2 partition start alignment, in elements (its nccl_start_alignment_factor).
_ZERO12_ALIGNMENT = 2


@dataclass(frozen=True)
class Call:
    op: str
    dtype: torch.dtype
    numel: int

    @property
    def bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@contextlib.contextmanager
def count_collectives() -> Iterator[list[Call]]:
    """Record every all-reduce, all-gather, reduce-scatter and broadcast while inside."""
    calls: list[Call] = []
    originals = {op: getattr(dist, op) for op in _PAYLOAD_ARG}

    def counted(op, original):
        signature = inspect.signature(original)
        name = list(signature.parameters)[_PAYLOAD_ARG[op]]  # DeepSpeed passes it by keyword

        def call(*args, **kwargs):
            tensor = signature.bind_partial(*args, **kwargs).arguments.get(name)
            if torch.is_tensor(tensor):
                calls.append(Call(op, tensor.dtype, tensor.numel()))
            return original(*args, **kwargs)

        return call

    for op, original in originals.items():
        setattr(dist, op, counted(op, original))
    # DeepSpeed's torch backend keeps its own references to the gather and scatter functions.
    backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    cached = {attr: getattr(backend, attr, None) for attr in ("all_gather_function", "reduce_scatter_function")}
    for attr, function in cached.items():
        if function is not None:
            op = "all_gather_into_tensor" if attr == "all_gather_function" else "reduce_scatter_tensor"
            setattr(backend, attr, counted(op, function))
    try:
        yield calls
    finally:
        for op, original in originals.items():
            setattr(dist, op, original)
        for attr, function in cached.items():
            if function is not None:
                setattr(backend, attr, function)


def totals(calls: list[Call]) -> dict[str, int]:
    """Payload bytes by collective and dtype, e.g. {'all_reduce float32': 324904}."""
    out: dict[str, int] = {}
    for c in calls:
        key = f"{c.op} {str(c.dtype).removeprefix('torch.')}"
        out[key] = out.get(key, 0) + c.bytes
    return out


def step_bytes(
    group_numels: list[int],
    param_numels: list[int],
    *,
    stage: int,
    precision: str,
    grad_dtype: str,
    world: int,
    micro_batches: int = 1,
) -> dict[str, int]:
    """Payload bytes of one optimizer step over `micro_batches` accumulated micro-batches, as
    `totals` reports them.

    `group_numels`: elements per optimizer parameter group; `param_numels`: per parameter.
    Stages 2 and 3 reduce each micro-batch's gradients as backward produces them (that is how
    they keep only a partition); stages 0 and 1 reduce once, at the accumulation boundary.
    Stage 3 assumes the model fits `zero.max_live_parameters`, so each parameter is gathered
    once a step; a larger model is gathered again for backward (up to twice as much)."""
    param = "bfloat16" if precision == "bf16" else "float32"
    grad = "bfloat16" if precision == "bf16" and grad_dtype == "bf16" else "float32"
    size = {"float32": 4, "bfloat16": 2}
    n = sum(group_numels)
    out: dict[str, int] = {}

    def add(key: str, elements: int) -> None:
        out[key] = out.get(key, 0) + elements * size[key.split()[1]]

    if stage == 3:
        padded = sum(math.ceil(p / world) * world for p in param_numels)
        add(f"reduce_scatter_tensor {grad}", padded * micro_batches)
        add(f"all_gather_into_tensor {param}", padded)
        add("all_reduce float32", len(group_numels))  # the clipping norm, one per group
        return out
    padded = sum(math.ceil(g / (_ZERO12_ALIGNMENT * world)) * _ZERO12_ALIGNMENT * world for g in group_numels)
    if stage == 0:
        add("all_reduce float32", n)  # the engine reduces the whole gradient; its clip needs no collective
        return out
    if stage == 1 and precision == "bf16" and grad_dtype == "fp32":
        # BF16_Optimizer: the flat fp32 gradient buffers (padded) reduced whole; its norm of
        # the reduced, whole gradient needs no collective.
        add("all_reduce float32", padded)
    else:
        add(f"all_reduce {grad}", n * (micro_batches if stage == 2 else 1))
        add("all_reduce float32", len(group_numels))  # the clipping norm, one per group
    add(f"all_gather_into_tensor {param}", padded)  # the updated partitions, to every rank
    return out


def wire_bytes(totals_: dict[str, int], world: int) -> int:
    """Bytes each rank sends per step under ring algorithms."""
    return round(sum(b * (2 if k.startswith("all_reduce") else 1) * (world - 1) / world for k, b in totals_.items()))
