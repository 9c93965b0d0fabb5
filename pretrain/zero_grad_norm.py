"""The gradient norm of DeepSpeed's ZeRO-1/2 partition in one fused pass.

Gradient clipping (the paper clips at global norm 1) needs the norm of every rank's
gradient partition each step. DeepSpeed's stage-1/2 optimizer computes it one parameter at
a time in Python, first copying each gradient to float64: ~150 norms and as many
model-sized copies a step for ViT-S/16, ~390 for ViT-H/14 (on a GPU, each a kernel
launch). Ours is one `_foreach_norm` over the partition's gradients with float32
accumulation, as `torch.nn.utils.clip_grad_norm_` does (and so the bare loop in
`benchmarks/trainer_overhead.py`): 13-17 ms -> 4-5 ms a step for ViT-S/16 on one CPU
thread. The float32 norm differs from DeepSpeed's float64 one by ~1e-5 relative, which
moves the clip factor by as much; the result is still summed over the data-parallel group
and reported as -1 when not finite, which is how DeepSpeed's step recognises a non-finite
gradient.

Installed per optimizer instance (never on DeepSpeed's class), and only where the method it
replaces has nothing more to do: norm type 2, no tensor or pipeline parallelism.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist


def fused_grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer.get_grad_norm_direct for the L2 norm, fused."""
    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    # DeepSpeed pads the last rank's partition with zero tensors it marks; they add nothing.
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.stack(norms).square().sum()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    total = total.sqrt()
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def install_fused_grad_norm(optimizer) -> bool:
    """Give a ZeRO-1/2 optimizer the fused norm; False (and unchanged) for any other."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    # With tensor parallelism DeepSpeed counts each shared parameter on one model-parallel rank
    # and all-reduces over that group too; we have none, but leave such set-ups to DeepSpeed.
    if optimizer.model_parallel_group is not None or getattr(optimizer, "has_moe_layers", False):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(fused_grad_norm, optimizer)
    return True
