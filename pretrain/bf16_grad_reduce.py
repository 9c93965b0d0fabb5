"""ZeRO-1 under bf16 with fp32 gradients: the gradient all-reduce done in place.

There DeepSpeed trains through its BF16_Optimizer, which accumulates every rank's whole
gradient in fp32, one flat buffer per parameter group, and has the engine all-reduce those
buffers. The engine's generic reduction first concatenates the buffers it is given into a
new tensor, all-reduces that, and copies the result back: two extra passes over the whole
fp32 gradient each step, for buffers that are already flat. Here each buffer goes to the
same DeepSpeed reduction on its own, and DeepSpeed's flatten of a single tensor is a view of
it, so the buffer is scaled and all-reduced where it lies and the copy back is a no-op
(`benchmarks/trainer_overhead.py --bf16 --stage 1`; figures in docs/PERFORMANCE.md).
The arithmetic, the scaling by the world size and the group are DeepSpeed's own.

Installed per engine instance, and only where nothing else is reduced this way: no
pipeline parallelism, no experts.
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


def install_in_place_grad_allreduce(engine) -> bool:
    """Reduce BF16_Optimizer's flat gradients in place; False (engine unchanged) for any
    other optimizer, or with pipeline parallelism or experts."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(engine.optimizer, BF16_Optimizer) or engine.pipeline_parallelism or engine.has_moe_layers:
        return False
    engine.buffered_allreduce_fallback = types.MethodType(allreduce_flat_gradients, engine)
    return True
