"""Every place vitscale replaces a method inside DeepSpeed, behind one version guard.

Each replacement is installed per engine or optimizer instance (never on DeepSpeed's
classes), only where the method it replaces has nothing more to do, and only on the
DeepSpeed releases it was written and tested against (`VERIFIED`). On any other release
DeepSpeed's own code runs, and `install` says so in one line: results are the same either
way (to float32 summation order for the norm), only slower. The reasons and figures are in
docs/PERFORMANCE.md ("Behind choices in the code"); each stays only while no GPU
measurement shows that it does not pay.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

# The DeepSpeed releases whose ZeRO internals these replacements were checked against.
VERIFIED = ("0.19.8",)


# ============================================================================ fused gradient norm
# The gradient norm of a DeepSpeed ZeRO partition in one fused pass.
#
# Gradient clipping (the paper clips at global norm 1) needs the norm of every rank's
# gradient partition each step. DeepSpeed's ZeRO optimizers (stages 1-2 and 3 alike)
# compute it one parameter at a time in Python, first copying each gradient to float64:
# ~150 norms and as many copies a step for ViT-S/16, ~390 for ViT-H/14 (on a GPU, each a
# kernel launch). Ours is one `_foreach_norm` over the partition's gradients with float32
# accumulation, as `torch.nn.utils.clip_grad_norm_` does (`benchmarks/trainer_overhead.py`
# times both norms on the same gradients). The float32 norm differs
# from DeepSpeed's float64 one by ~1e-5 relative, which moves the clip factor by as much; the
# result is still summed over the group the gradients are partitioned over and reported as
# -1 when not finite, which is how DeepSpeed's step recognises a non-finite gradient.
#
# Installed only where the method it replaces has nothing more to do: norm type 2, no
# tensor parallelism, no experts.
#
# Under bf16, DeepSpeed's ZeRO-1/2 optimizer also scans every gradient for inf/NaN before the
# norm, again one parameter at a time, then all-reduces the flag and reads it on the host:
# ~150-390 checks and a host sync a step. Its step already treats a non-finite norm as that
# same overflow (skips the step, reports the norm as inf), and the norm is computed every step,
# so the scan is dropped there, as DeepSpeed's ZeRO-3 does for bf16 (the norm alone).
#
# At stage 0 (fp32 only) there is no ZeRO optimizer: the engine clips the whole gradient itself,
# again one parameter at a time, and drops the norm, so `get_global_grad_norm()` is None, the
# logged norm would be blank and a non-finite gradient would pass unseen. There the engine's
# clip is replaced by `torch.nn.utils.clip_grad_norm_`, whose norm the engine then reports.


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


# ============================================================================ ZeRO-1 bf16: flat gradients
# ZeRO-1 under bf16 with fp32 gradients: the gradients handled as the flat buffers they are.
#
# There DeepSpeed trains through its BF16_Optimizer, which accumulates every rank's whole
# gradient in fp32, one flat buffer per parameter group, then has the engine all-reduce those
# buffers and takes their norm and clips them one parameter at a time. Three changes, per
# engine instance:
#
# - All-reduce in place. The engine's generic reduction concatenated the buffers into a new
#   tensor, all-reduced that and copied the result back: two extra passes over the whole fp32
#   gradient each step. Here each buffer goes to the same DeepSpeed reduction on its own;
#   DeepSpeed's flatten of a single tensor is a view of it, so the buffer is scaled and
#   all-reduced where it lies and the copy back is a no-op. The arithmetic, the scaling by the
#   world size and the group are DeepSpeed's own.
# - Norm and clip over the flat buffers: one norm and one multiply per parameter group
#   instead of one per parameter (~150 for ViT-B/16, ~390 for ViT-H/14; on a GPU, each a
#   kernel launch). Parameters without a gradient this step hold zeros there, as does the
#   alignment padding, so the norm is the same up to float32 summation order.
# - Written, not zeroed and added to. DeepSpeed zeroes the whole fp32 buffers after every
#   step and adds each bf16 gradient into them. Here the first gradient of an accumulation
#   window is copied in (converted on the way) and later ones added, so the zeroing pass
#   goes; what a backward leaves unwritten (a parameter that got no gradient) is zeroed at
#   its end. The padding is never written. Same values: a gradient added to zero is that
#   gradient. (After a step the buffers keep that step's gradients until the next backward
#   writes them, where DeepSpeed's are zero.)
#
# With the engine's `bf16.immediate_grad_update` (pretrain/zero/engine.py turns it on for this
# set-up) each bf16 gradient goes into its buffer as soon as backward produces it and is
# freed there, instead of all of them living until the end of backward and then being
# zeroed for the next one (`benchmarks/trainer_overhead.py --bf16 --stage 1` measures both).
# Installed only where nothing else reduces, norms or accumulates these gradients: no
# pipeline or tensor parallelism, no experts, no Muon.


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


# ============================================================================ ZeRO-2 bf16: fp32 buckets
# ZeRO-2 under bf16 with fp32 gradients: each bucket reduced in fp32, not copied back.
#
# There DeepSpeed's ZeRO-2 optimizer gathers the bf16 gradients into a bf16 bucket and, per
# bucket, converts it to fp32, all-reduces that, adds this rank's slices into its fp32
# gradient partition, and also copies the fp32 result back into the bf16 bucket. Nothing
# reads the bucket after that: the partition is what the optimizer steps on, and the
# gradients outside it are dropped. So the copy back is one pass over the bucket per step
# for nothing (`benchmarks/trainer_overhead.py --bf16 --stage 2`).
#
# Here the bucket is converted first and handed to DeepSpeed's own reduction, which then
# scales and all-reduces the fp32 tensor in place and returns it: the same arithmetic, so
# the same weights bit for bit. Installed only where every parameter
# group keeps that fp32 partition (DeepSpeed's "compact" gradient partition) and nothing else
# reads the bucket: no CPU offload, no experts, no ZenFlow.
#
# The adding into the partition is DeepSpeed's too, but with this rank's offsets worked out
# once: DeepSpeed looks up the rank (twice) and five tables per parameter per bucket (on a
# GPU, Python that runs between the kernel launches).


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


# ============================================================================ the guard
REPLACEMENTS = (
    ("fused gradient norm", install_fused_grad_norm),
    ("flat bf16-optimizer gradients", install_flat_gradients),
    ("fp32 bucket reduction without copy-back", install_fp32_bucket_reduction),
)


def install(engine, version: str | None = None) -> tuple[list[str], str]:
    """Install the replacements that apply to `engine` on a verified DeepSpeed release;
    returns their names and one line saying what is active. `version`: DeepSpeed's own
    unless given (the test of the fallback gives another)."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if version not in VERIFIED:
        return [], (
            f"deepspeed {version}: DeepSpeed's own ZeRO code throughout (vitscale's replacements are "
            f"verified on {', '.join(VERIFIED)} only)"
        )
    active = [name for name, install_one in REPLACEMENTS if install_one(engine)]
    return active, f"deepspeed {version}: vitscale's {', '.join(active) or 'no replacement'} active"
