"""Time of one optimizer step: the model's FLOPs at a utilisation, and the collectives'
bytes over the links they cross, hidden behind backward where DeepSpeed overlaps them.

Bytes are `pretrain.zero.comm_bytes.step_bytes` (checked against counted collectives in
tests/multiproc/test_comm_bytes.py); a ring puts 2(W-1)/W of an all-reduce's payload and
(W-1)/W of a reduce-scatter's or all-gather's on each rank's link. Within one node that link
is NVLink; across nodes every ring crosses the network, whose share per GPU sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model import ViTConfig
from pretrain.model.flops import backward_flops, block_forward_flops, training_flops
from pretrain.plan.hardware import Assumptions, Cluster, Gpu
from pretrain.plan.model_states import ModelShape
from pretrain.zero.comm_bytes import step_bytes, wire_bytes
from pretrain.zero.engine import ZeroConfig


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # forward and backward of every micro-batch (and the recomputed blocks)
    reduce_s: float  # gradient all-reduce / reduce-scatter on the wire
    gather_s: float  # parameter all-gathers on the wire
    exposed_comm_s: float  # what of the two the compute does not hide
    sent_bytes: int  # bytes each rank puts on its link per step

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def flops_per_image(model: ViTConfig) -> float:
    """Training FLOPs of one image, with the forward of every block again under checkpointing."""
    recompute = model.depth * block_forward_flops(model) if model.activation_checkpointing else 0.0
    return training_flops(model) + recompute


def link_gbs(cluster: Cluster, gpu: Gpu, assume: Assumptions) -> float:
    nominal = gpu.nvlink_gbs if cluster.nodes == 1 else gpu.network_gbs
    return nominal * assume.comm_efficiency


def step_time(
    model: ViTConfig,
    shape: ModelShape,
    zero: ZeroConfig,
    cluster: Cluster,
    gpu: Gpu,
    assume: Assumptions,
    *,
    micro_batch: int,
    grad_accum: int,
    mfu: float,
) -> StepTime:
    per_image = flops_per_image(model)
    compute = grad_accum * micro_batch * per_image / (mfu * gpu.peak_bf16_tflops * 1e12)
    backward_share = backward_flops(model).total / per_image
    world = cluster.world
    if world == 1:
        return StepTime(compute, 0.0, 0.0, 0.0, 0)
    payload = step_bytes([sum(g) for g in shape.groups], shape.params, stage=zero.stage, precision=zero.precision,
                         grad_dtype=zero.grad_dtype, world=world, micro_batches=grad_accum)  # fmt: skip
    gathers = {k: v for k, v in payload.items() if k.startswith("all_gather")}
    reductions = {k: v for k, v in payload.items() if k not in gathers}
    bandwidth = link_gbs(cluster, gpu, assume) * 1e9
    reduce_s, gather_s = wire_bytes(reductions, world) / bandwidth, wire_bytes(gathers, world) / bandwidth
    backward_s = backward_share * compute
    if zero.stage == 3:
        # Parameters are fetched ahead of the blocks that need them, always; the reduce-scatter
        # runs beside backward only with overlap_comm.
        hidden = gather_s + (reduce_s if zero.overlap_comm else 0.0)
        exposed = max(0.0, hidden - compute) + (0.0 if zero.overlap_comm else reduce_s)
    else:
        # Stage 2 reduces each micro-batch during its backward; stage 1 reduces at the last
        # one's backward, and its bf16 optimizer (fp32 gradients) only after backward ends.
        # The updated partitions are gathered after the optimizer step, with nothing to hide them.
        bf16_optimizer = zero.stage == 1 and zero.precision == "bf16" and zero.grad_dtype == "fp32"
        if not zero.overlap_comm or bf16_optimizer or zero.stage == 0:
            window = 0.0
        else:
            window = backward_s if zero.stage == 2 else backward_s / grad_accum
        exposed = max(0.0, reduce_s - window) + gather_s
    sent = wire_bytes(payload, world)
    return StepTime(compute, reduce_s, gather_s, exposed, sent)
