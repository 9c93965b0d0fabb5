"""ZeRO-1 under bf16 with fp32 gradients: the gradients handled as the flat buffers they are.

There DeepSpeed trains through its BF16_Optimizer, which accumulates every rank's whole
gradient in fp32, one flat buffer per parameter group, then has the engine all-reduce those
buffers and takes their norm and clips them one parameter at a time. Three changes, per
engine instance:

- All-reduce in place. The engine's generic reduction concatenated the buffers into a new
  tensor, all-reduced that and copied the result back: two extra passes over the whole fp32
  gradient each step. Here each buffer goes to the same DeepSpeed reduction on its own;
  DeepSpeed's flatten of a single tensor is a view of it, so the buffer is scaled and
  all-reduced where it lies and the copy back is a no-op. The arithmetic, the scaling by the
  world size and the group are DeepSpeed's own.
- Norm and clip over the flat buffers: one norm and one multiply per parameter group
  instead of one per parameter (~150 for ViT-B/16, ~390 for ViT-H/14; on a GPU, each a
  kernel launch). Parameters without a gradient this step hold zeros there, as does the
  alignment padding, so the norm is the same up to float32 summation order.
- Written, not zeroed and added to. DeepSpeed zeroes the whole fp32 buffers after every
  step and adds each bf16 gradient into them. Here the first gradient of an accumulation
  window is copied in (converted on the way) and later ones added, so the zeroing pass
  goes; what a backward leaves unwritten (a parameter that got no gradient) is zeroed at
  its end. The padding is never written. Same values: a gradient added to zero is that
  gradient. (After a step the buffers keep that step's gradients until the next backward
  writes them, where DeepSpeed's are zero.)

With the engine's `bf16.immediate_grad_update` (pretrain/zero/engine.py turns it on for this
set-up) each bf16 gradient goes into its buffer as soon as backward produces it and is
freed there, instead of all of them living until the end of backward and then being
zeroed for the next one. On one CPU rank, ViT-S/16: 0.949-0.960 of the bare loop's speed
before the last change and that option, 0.984-1.006 with both
(`benchmarks/trainer_overhead.py --bf16 --stage 1`; docs/PERFORMANCE.md).
Installed only where nothing else reduces, norms or accumulates these gradients: no
pipeline or tensor parallelism, no experts, no Muon.
"""

from __future__ import annotations

import types

import torch


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


@torch.no_grad()
def write_or_add_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads):
    """BF16_Optimizer's _update_hp_grad: the window's first gradient copied into the fp32
    buffer, later ones added."""
    if lp.grad is None:
        return
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    if self.fp32_groups_has_gradients[group_idx][param_idx]:
        hp_grad.add_(lp.grad.to(hp_grad.dtype).view(hp_grad.shape))
    else:
        hp_grad.copy_(lp.grad.view(hp_grad.shape))
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()


def mark_hp_grads_empty(self):
    """BF16_Optimizer's clear_hp_grads without the zeroing: the next backward writes them."""
    for i, group in enumerate(self.fp32_groups_gradients):
        self.fp32_groups_has_gradients[i] = [False] * len(group)


@torch.no_grad()
def update_hp_grads_and_zero_the_rest(self, clear_lp_grads=False):
    """BF16_Optimizer's update_hp_grads (a no-op with immediate_grad_update, whose hooks did
    it during backward), then zeros for every parameter no gradient was written to."""
    type(self).update_hp_grads(self, clear_lp_grads)
    for written, grads in zip(self.fp32_groups_has_gradients, self.fp32_groups_gradients):
        for has_gradient, grad in zip(written, grads):
            if not has_gradient:
                grad.zero_()


def install_flat_gradients(engine) -> bool:
    """Reduce, norm, clip and write BF16_Optimizer's flat gradients whole; False (engine
    unchanged) for any other optimizer, or with pipeline or tensor parallelism, experts or Muon."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if (
        not isinstance(optimizer, BF16_Optimizer)
        or engine.pipeline_parallelism
        or engine.has_moe_layers
        or optimizer.mpu is not None
        or optimizer._uses_muon
        or optimizer.autoep_folding_tp_group is not None
    ):
        return False
    engine.buffered_allreduce_fallback = types.MethodType(allreduce_flat_gradients, engine)
    optimizer.get_grads_for_norm = types.MethodType(flat_grads_for_norm, optimizer)
    optimizer._update_hp_grad = types.MethodType(write_or_add_hp_grad, optimizer)
    optimizer.clear_hp_grads = types.MethodType(mark_hp_grads_empty, optimizer)
    optimizer.update_hp_grads = types.MethodType(update_hp_grads_and_zero_the_rest, optimizer)
    return True
