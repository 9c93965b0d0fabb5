"""ZeRO-2 under bf16 with fp32 gradients: each bucket reduced in fp32, not copied back.

There DeepSpeed's ZeRO-2 optimizer gathers the bf16 gradients into a bf16 bucket and, per
bucket, converts it to fp32, all-reduces that, adds this rank's slices into its fp32
gradient partition, and also copies the fp32 result back into the bf16 bucket. Nothing
reads the bucket after that: the partition is what the optimizer steps on, and the
gradients outside it are dropped. So the copy back is one pass over the bucket per step
for nothing (ViT-S/16 bf16 ZeRO-2 on one CPU rank: 0.927-0.929 of the bare loop's speed
with it, 0.938-0.945 without, `benchmarks/trainer_overhead.py --bf16 --stage 2`).

Here the bucket is converted first and handed to DeepSpeed's own reduction, which then
scales and all-reduces the fp32 tensor in place and returns it: the same arithmetic, so
the same weights bit for bit. Installed per optimizer instance, only where every parameter
group keeps that fp32 partition (DeepSpeed's "compact" gradient partition) and nothing else
reads the bucket: no CPU offload, no experts, no ZenFlow.
"""
from __future__ import annotations

import types


def reduce_into_fp32(self, tensor, communication_data_type):
    """The ZeRO-2 optimizer's gradient_reduction_w_predivide without the copy back into `tensor`."""
    if tensor.dtype != communication_data_type:
        tensor = tensor.to(communication_data_type)
    return type(self).gradient_reduction_w_predivide(self, tensor, communication_data_type)


def install_fp32_bucket_reduction(engine) -> bool:
    """Drop the copy back where the reduced bucket only feeds fp32 gradient partitions; False
    (engine unchanged) anywhere else."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if (not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload
            or getattr(optimizer, "has_moe_layers", False) or getattr(optimizer, "zenflow", False)):
        return False
    if not all(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups))):
        return False
    optimizer.gradient_reduction_w_predivide = types.MethodType(reduce_into_fp32, optimizer)
    return True
