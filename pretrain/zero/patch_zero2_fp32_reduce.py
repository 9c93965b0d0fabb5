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

The adding into the partition is DeepSpeed's too, but with this rank's offsets worked out
once: DeepSpeed looks up the rank (twice) and five tables per parameter per bucket
(0.937-0.940 of the bare loop's speed -> 0.950-0.955 on one CPU rank; on a GPU that Python
runs between the kernel launches).
"""

from __future__ import annotations

import types


def reduce_into_fp32(self, tensor, communication_data_type):
    """The ZeRO-2 optimizer's gradient_reduction_w_predivide without the copy back into `tensor`."""
    if tensor.dtype != communication_data_type:
        tensor = tensor.to(communication_data_type)
    return type(self).gradient_reduction_w_predivide(self, tensor, communication_data_type)


def add_into_fp32_partition(self, reduced, communication_data_type):
    """The ZeRO-2 optimizer's _add_full_reduction_to_compact_grad_partition: this rank's
    slice of each parameter in the reduced bucket added into its fp32 gradient partition."""
    slices = self._fp32_partition_slices
    offset = 0  # of the parameter in the bucket
    for group_idx, param_idx, param_id in self.ipg_buckets[communication_data_type].params:
        numel = self.bit16_groups[group_idx][param_idx].numel()
        if param_id in slices:
            source_offset, dest_offset, count = slices[param_id]
            partition = self._get_compact_grad_partition_buffer(group_idx).flat_partition
            partition.narrow(0, dest_offset, count).add_(reduced.narrow(0, offset + source_offset, count))
        offset += numel


def _partition_slices(self) -> dict[int, tuple[int, int, int]]:
    """param id -> (offset in the parameter, offset in this rank's partition, elements), for
    every parameter with elements in this rank's partition."""
    from deepspeed import comm as dist

    slices = {}
    for group_idx in range(len(self.bit16_groups)):
        rank = dist.get_rank(group=self.real_dp_process_group[group_idx])
        for param_id, source_offset in self.grad_start_offset[group_idx][rank].items():
            dest_offset = int(self.grad_partition_insertion_offset[group_idx][rank][param_id])
            count = min(
                self.param_dict[param_id].numel() - int(source_offset),
                int(self.partition_size[group_idx]) - dest_offset,
            )
            if count > 0:
                slices[param_id] = (int(source_offset), dest_offset, count)
    return slices


def install_fp32_bucket_reduction(engine) -> bool:
    """Drop the copy back, and add with offsets worked out once, where the reduced bucket only
    feeds fp32 gradient partitions; False (engine unchanged) anywhere else."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if (
        not isinstance(optimizer, DeepSpeedZeroOptimizer)
        or optimizer.cpu_offload
        or getattr(optimizer, "has_moe_layers", False)
        or getattr(optimizer, "zenflow", False)
    ):
        return False
    if not all(optimizer._use_compact_grad_partition_buffer(i) for i in range(len(optimizer.bit16_groups))):
        return False
    optimizer.gradient_reduction_w_predivide = types.MethodType(reduce_into_fp32, optimizer)
    optimizer._fp32_partition_slices = _partition_slices(optimizer)  # the partitioning is fixed from here on
    optimizer._add_full_reduction_to_compact_grad_partition = types.MethodType(add_into_fp32_partition, optimizer)
    return True
