"""ZeRO-1 under bf16 with fp32 gradients: the gradients handled as the flat buffers they are.

There DeepSpeed trains through its BF16_Optimizer, which accumulates every rank's whole
gradient in fp32, one flat buffer per parameter group, then has the engine all-reduce those
buffers and takes their norm and clips them one parameter at a time. Two changes, per
engine instance:

- All-reduce in place. The engine's generic reduction concatenated the buffers into a new
  tensor, all-reduced that and copied the result back: two extra passes over the whole fp32
  gradient each step. Here each buffer goes to the same DeepSpeed reduction on its own;
  DeepSpeed's flatten of a single tensor is a view of it, so the buffer is scaled and
  all-reduced where it lies and the copy back is a no-op. The arithmetic, the scaling by the
  world size and the group are DeepSpeed's own.
- Norm and clip over the flat buffers: one norm and one multiply per parameter group
  instead of one per parameter (~150 for ViT-B/16, ~390 for ViT-H/14; on a GPU, each a
  kernel launch). Parameters without a gradient this step hold zeros there (the optimizer
  zeroes the buffers after every step), as does the alignment padding, so the norm is the
  same up to float32 summation order.

`benchmarks/trainer_overhead.py --bf16 --stage 1` measures it; figures in docs/PERFORMANCE.md.
Installed only where nothing else is reduced or normed this way: no pipeline or tensor
parallelism, no experts, no Muon.
"""
from __future__ import annotations

import types


def allreduce_flat_gradients(self, grads=None, elements_per_buffer=500_000_000):
    """The engine's buffered_allreduce_fallback for BF16_Optimizer: each flat fp32 gradient
    buffer reduced in place."""
    if grads is not None:
        return type(self).buffered_allreduce_fallback(self, grads, elements_per_buffer)
    from deepspeed import comm as dist
    from deepspeed.utils import groups

    group = groups._get_sequence_data_parallel_group()  # the group DeepSpeed's own path reduces over
    world = dist.get_world_size(group) / float(self.sequence_parallel_size)
    flat_buffers, _ = self.optimizer.get_grads_for_reduction()
    for flat in flat_buffers:
        self.allreduce_and_copy([flat], group, world)


def flat_grads_for_norm(self, for_clipping=False):
    """BF16_Optimizer's get_grads_for_norm: the whole flat fp32 gradient buffers."""
    flat = list(self.fp32_groups_gradients_flat)
    return flat if for_clipping else (flat, {})


def install_flat_gradients(engine) -> bool:
    """Reduce, norm and clip BF16_Optimizer's flat gradients whole; False (engine unchanged)
    for any other optimizer, or with pipeline or tensor parallelism, experts or Muon."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if (not isinstance(optimizer, BF16_Optimizer) or engine.pipeline_parallelism or engine.has_moe_layers
            or optimizer.mpu is not None or optimizer._uses_muon):
        return False
    engine.buffered_allreduce_fallback = types.MethodType(allreduce_flat_gradients, engine)
    optimizer.get_grads_for_norm = types.MethodType(flat_grads_for_norm, optimizer)
    return True
