"""One rank of the memory check (run by test_plan_memory.py under torchrun).

For each ZeRO stage and precision a ViT-S/16 (2 blocks, 32 px) engine takes two steps. After
the second backward (gradients reduced, before the optimizer step) and after the step, every
tensor storage alive in the process that the engine created is sorted by what holds it: the
model's parameters (ZeRO-3: their partitions and the persistent ones), the fp32 master weights
and Adam's moments the inner optimizer steps; the rest are gradients and buckets. Reported
with the planner's figures for the same model, stage, precision and world.
"""

import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_report import report  # next to this script

from pretrain.model import create_model
from pretrain.plan.model_states import model_shape, model_states
from pretrain.runtime import distributed
from pretrain.zero.engine import ZeroConfig, build_engine, build_model_for, deepspeed_config
from pretrain.zero.optimizer import OptimConfig

ARCH = dict(img_size=32, depth=2, num_classes=11)
SET_UPS = [(stage, precision) for stage in (1, 2, 3) for precision in ("fp32", "bf16")]


def live_storages() -> dict[int, int]:
    gc.collect()
    out = {}
    for o in gc.get_objects():
        # single numbers are step counters, loss scales and overflow flags, no model state
        if torch.is_tensor(o) and not o.is_meta and o.numel() > 1:
            storage = o.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def roles(engine, model) -> dict[int, str]:
    """Storage -> the part of the model states it is."""
    out = {}
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, and the whole tensor where it persists
            out[ptr(p.ds_tensor)] = "parameters"
            if p.data.numel():
                out[ptr(p.data)] = "parameters"
        else:
            out[ptr(p.data)] = "parameters"
    zero = engine.optimizer
    inner = zero.optimizer
    masters = getattr(zero, "fp32_partitioned_groups_flat", None) or [
        p for g in inner.param_groups for p in g["params"]
    ]
    for m in masters:
        out[ptr(m)] = "master"
        for name in ("exp_avg", "exp_avg_sq"):
            out[ptr(inner.state[m][name])] = "optimizer"
    return out


def parts(engine, model, before: set[int]) -> dict[str, int]:
    found = {"parameters": 0, "master": 0, "optimizer": 0, "rest": 0}
    known = roles(engine, model)
    for p, nbytes in live_storages().items():
        if p not in before:
            found[known.get(p, "rest")] += nbytes
    return found


def measure(stage: int, precision: str, rank: int, world: int) -> dict:
    zero = ZeroConfig(stage=stage, precision=precision, grad_dtype="fp32", reduce_bucket_size=1_000_000)
    ds = deepspeed_config(zero, global_batch=4 * world, micro_batch=4, grad_accum=1, clip_grad=1.0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32).to(dtype), torch.randint(0, 11, (4,))
    before = set(live_storages())
    model = build_model_for(zero, ds, lambda: create_model("vit_s16", **ARCH))
    optim = OptimConfig(warmup_steps=1)
    engine = build_engine(model, ds, optim, total_steps=10)
    for step in range(2):
        engine.backward(F.cross_entropy(engine(x).float(), y))
        if step == 1:
            after_backward = parts(engine, model, before)
        engine.step()
    after_step = parts(engine, model, before)
    reference = create_model("vit_s16", **ARCH)
    predicted = model_states(model_shape(reference.cfg, optim.weight_decay), zero, world, rank=rank)
    del engine, model
    gc.collect()
    return {"after_backward": after_backward, "after_step": after_step, "predicted": predicted.parts()}


def main() -> None:
    distributed.init_process_group(distributed.detect(), 300)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"stage{s}-{p}": measure(s, p, rank, world) for s, p in SET_UPS}
    distributed.shutdown()
    report(rank, results)


if __name__ == "__main__":
    main()
