"""The gradient norm of a DeepSpeed ZeRO partition in one fused pass.

Gradient clipping (the paper clips at global norm 1) needs the norm of every rank's
gradient partition each step. DeepSpeed's ZeRO optimizers (stages 1-2 and 3 alike)
compute it one parameter at a time in Python, first copying each gradient to float64:
~150 norms and as many copies a step for ViT-S/16, ~390 for ViT-H/14 (on a GPU, each a
kernel launch). Ours is one `_foreach_norm` over the partition's gradients with float32
accumulation, as `torch.nn.utils.clip_grad_norm_` does (and so the bare loop in
`benchmarks/trainer_overhead.py`, which times both norms on the same gradients: 4-6 ms
against 13-22 ms a step for ViT-S/16 at ZeRO-1/2 on one CPU thread). The float32 norm differs
from DeepSpeed's float64 one by ~1e-5 relative, which moves the clip factor by as much; the
result is still summed over the group the gradients are partitioned over and reported as
-1 when not finite, which is how DeepSpeed's step recognises a non-finite gradient.

Installed per optimizer instance (never on DeepSpeed's classes), and only where the method
it replaces has nothing more to do: norm type 2, no tensor parallelism, no experts.

Under bf16, DeepSpeed's ZeRO-1/2 optimizer also scans every gradient for inf/NaN before the
norm, again one parameter at a time, then all-reduces the flag and reads it on the host:
~150-390 checks and a host sync a step. Its step already treats a non-finite norm as that
same overflow (skips the step, reports the norm as inf), and the norm is computed every step,
so the scan is dropped there, as DeepSpeed's ZeRO-3 does for bf16 (the norm alone).

At stage 0 (fp32 only) there is no ZeRO optimizer: the engine clips the whole gradient itself,
again one parameter at a time, and drops the norm, so `get_global_grad_norm()` is None, the
logged norm would be blank and a non-finite gradient would pass unseen. There the engine's
clip is replaced by `torch.nn.utils.clip_grad_norm_`, whose norm the engine then reports.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist


def fused_grad_norm(self, gradients, params, norm_type=2):
    """The ZeRO optimizers' get_grad_norm_direct for the L2 norm, fused."""
    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    # DeepSpeed pads the last rank's ZeRO-1/2 partition with zero tensors it marks; they add nothing.
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.stack(norms).square().sum()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    # ZeRO-3 parameters carry the group they are partitioned over; ZeRO-1/2 partitions span
    # the data-parallel group.
    group = getattr(params[0], "ds_process_group", self.dp_process_group) if params else self.dp_process_group
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total.sqrt()
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def fused_clip_fp32_gradients(self):
    """The stage-0 fp32 engine's clip_fp32_gradients, one fused pass, keeping its norm.

    Every rank holds the whole gradient, already averaged over the ranks, so the norm needs
    no collective. A non-finite norm is kept as it is (the trainer stops on it)."""
    grads = [p for p in self.module.parameters() if p.grad is not None]
    self._global_grad_norm = torch.nn.utils.clip_grad_norm_(grads, self.gradient_clipping())


def overflow_from_norm(self, partition_gradients=True):
    """The ZeRO-1/2 optimizer's check_overflow for bf16: nothing before the norm; step()
    flags the step as overflowed when the fused norm comes back non-finite."""
    self.overflow = False


def install_fused_grad_norm(engine) -> bool:
    """Give the engine the fused norm where DeepSpeed's is per parameter (and, under bf16 at
    ZeRO-1/2, drop the per-parameter overflow scan the norm makes redundant); False (and
    unchanged) for a model-parallel or expert set-up, or an optimizer that is not ZeRO's
    (DeepSpeed's BF16_Optimizer at ZeRO-1 under bf16 with fp32 gradients keeps its own)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if engine.zero_optimization_stage() == 0:
        if engine.mpu is not None:
            return False
        engine.clip_fp32_gradients = types.MethodType(fused_clip_fp32_gradients, engine)
        return True
    optimizer = engine.optimizer
    if not isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        return False
    # With tensor parallelism DeepSpeed counts each shared parameter on one model-parallel rank
    # and all-reduces over that group too; we have none, but leave such set-ups to DeepSpeed.
    if optimizer.model_parallel_group is not None or getattr(optimizer, "has_moe_layers", False):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(fused_grad_norm, optimizer)
    if (
        isinstance(optimizer, DeepSpeedZeroOptimizer)
        and optimizer.dtype == torch.bfloat16
        and optimizer.compute_grad_norm
        and not optimizer.cpu_offload
    ):
        optimizer.check_overflow = types.MethodType(overflow_from_norm, optimizer)
    return True
