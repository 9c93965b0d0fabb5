"""One rank of the fused ZeRO gradient-norm check (run by test_zero_grad_norm.py under torchrun).

For ZeRO stages 1, 2 and 3 the engine is built as vit-pretrain builds it (but with a non-zero
head, so that every parameter has a gradient in the first backward), one micro-batch per
rank goes through backward, and the norm of each parameter group's reduced gradient is
computed three ways: by our fused method, by DeepSpeed's own per-parameter method on the
same partitions, and from first principles (a plain copy of the model, run on both ranks'
batches, its gradients averaged; at stage 3, whose groups are DeepSpeed's sub-groups, only
the total is compared). Then a non-finite gradient on rank 0 must make both ranks
report DeepSpeed's -1 sentinel, and a step must clip with our norm. At stage 0 (fp32) the
engine clips the whole gradient itself: its reported norm must be the true one, and an
infinite gradient on rank 0 must show on both ranks. Under bf16 the ZeRO-1/2 optimizer's own
per-parameter inf/NaN scan is dropped (pretrain/zero/deepspeed_patches.py): an infinite gradient on
rank 0 must still make both ranks skip the step, and the next finite step must train; at
ZeRO-1 with fp32 gradients (BF16_Optimizer) the norm over whole gradient buffers must equal
DeepSpeed's per-parameter one.
Prints one JSON line.
"""

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_report import report  # next to this script

from pretrain.model import create_model
from pretrain.runtime import distributed
from pretrain.zero.engine import ZeroConfig, build_engine, build_model_for, deepspeed_config
from pretrain.zero.optimizer import OptimConfig, param_groups

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)


def nonzero_head(model: torch.nn.Module) -> torch.nn.Module:
    """The paper's zero head would leave every other parameter without a gradient in a first
    step; a small random one gives them all one. Same values on every rank (same seed), and
    written whole where ZeRO-3 holds the head partitioned."""
    import deepspeed

    weight = model.head.weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0, enabled=hasattr(weight, "ds_id")):
        torch.nn.init.normal_(weight, std=0.02)
    return model


def rank_batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def reference_group_norms(world: int) -> list[float]:
    """Per-group norm of the world-averaged gradient, from a plain model (same init)."""
    torch.manual_seed(0)
    model = nonzero_head(create_model("vit_ti16", **ARCH))
    for rank in range(world):
        x, y = rank_batch(rank)
        (F.cross_entropy(model(x), y) / world).backward()
    groups = param_groups(model.named_parameters(), 0.1)
    return [math.sqrt(sum(p.grad.double().square().sum().item() for p in g["params"])) for g in groups]


def check_stage(stage: int, rank: int, world: int) -> dict:
    # Buckets far smaller than the model: several reductions, partitions cutting parameters.
    zero = ZeroConfig(stage=stage, reduce_bucket_size=20_000, allgather_bucket_size=20_000)
    ds = deepspeed_config(zero, global_batch=4 * world, micro_batch=4, grad_accum=1, clip_grad=1.0)
    torch.manual_seed(0)
    model = nonzero_head(build_model_for(zero, ds, lambda: create_model("vit_ti16", **ARCH)))
    engine = build_engine(model, ds, OptimConfig(warmup_steps=1), total_steps=2)
    opt = engine.optimizer
    x, y = rank_batch(rank)
    engine.backward(F.cross_entropy(engine(x), y))
    partition_params = opt.fp16_groups if stage == 3 else opt.params_in_partition
    args = [(opt.averaged_gradients[i], params) for i, params in enumerate(partition_params)]
    ours = [opt.get_grad_norm_direct(*a).item() for a in args]
    theirs = [type(opt).get_grad_norm_direct(opt, *a).item() for a in args]
    # A non-finite element in one rank's partition: every rank must see the sentinel.
    first = next(g for g in args[0][0] if g.numel() and not getattr(g, "_zero_padding", False))
    saved = first.view(-1)[0].item()
    sentinels = {}
    for label, bad in (("inf", math.inf), ("nan", math.nan)):
        if rank == 0:
            first.view(-1)[0] = bad
        sentinels[label] = opt.get_grad_norm_direct(*args[0]).item()
    first.view(-1)[0] = saved
    engine.step()
    return {
        "installed": "get_grad_norm_direct" in vars(opt),
        "reduce_scatter": opt.reduce_scatter,
        "ours": ours,
        "deepspeed": theirs,
        "sentinels": sentinels,
        "engine_norm": float(engine.get_global_grad_norm()),
    }


def check_stage0(rank: int, world: int) -> dict:
    """No ZeRO optimizer: the engine's own clip, replaced, must report the norm it clipped with."""
    ds = deepspeed_config(ZeroConfig(stage=0), global_batch=4 * world, micro_batch=4, grad_accum=1, clip_grad=1.0)
    torch.manual_seed(0)
    engine = build_engine(
        nonzero_head(create_model("vit_ti16", **ARCH)), ds, OptimConfig(warmup_steps=1), total_steps=3
    )
    x, y = rank_batch(rank)
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    norm = engine.get_global_grad_norm()
    # An infinite gradient on rank 0 alone reaches every rank through the gradient all-reduce.
    if rank == 0:
        next(engine.module.parameters()).register_hook(lambda grad: grad * math.inf)
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()
    bad = engine.get_global_grad_norm()
    return {
        "installed": "clip_fp32_gradients" in vars(engine),
        "engine_norm": None if norm is None else float(norm),
        "nonfinite_norm": None if bad is None else str(float(bad)),
    }


def bf16_engine(stage: int, grad_dtype: str, world: int):
    """A bf16 engine as vit-pretrain builds it, small buckets, clipping at 1, 3 scheduled steps."""
    zero = ZeroConfig(
        stage=stage, precision="bf16", grad_dtype=grad_dtype, reduce_bucket_size=20_000, allgather_bucket_size=20_000
    )
    ds = deepspeed_config(zero, global_batch=4 * world, micro_batch=4, grad_accum=1, clip_grad=1.0)
    torch.manual_seed(0)
    return build_engine(nonzero_head(create_model("vit_ti16", **ARCH)), ds, OptimConfig(warmup_steps=1), total_steps=3)


def check_bf16_optimizer_norm(rank: int, world: int) -> dict:
    """ZeRO-1 under bf16 with fp32 gradients (DeepSpeed's BF16_Optimizer): the norm over its
    flat gradient buffers (pretrain/zero/deepspeed_patches.py) against DeepSpeed's per-parameter one."""
    from deepspeed.runtime.utils import get_global_norm_of_tensors

    engine = bf16_engine(1, "fp32", world)
    opt = engine.optimizer
    x, y = rank_batch(rank)
    engine.backward(F.cross_entropy(engine(x.to(torch.bfloat16)).float(), y))
    ours = get_global_norm_of_tensors(opt.get_grads_for_norm()[0]).item()
    theirs = get_global_norm_of_tensors(type(opt).get_grads_for_norm(opt)[0]).item()
    engine.step()
    return {
        "optimizer": type(opt).__name__,
        "installed": "get_grads_for_norm" in vars(opt),
        "ours": ours,
        "deepspeed": theirs,
        "engine_norm": float(engine.get_global_grad_norm()),
    }


def check_bf16_overflow(stage: int, grad_dtype: str, rank: int, world: int) -> dict:
    """bf16 ZeRO-1/2 with the scan dropped: a non-finite gradient skips the step on every rank."""
    engine = bf16_engine(stage, grad_dtype, world)
    x, y = rank_batch(rank)
    x = x.to(torch.bfloat16)

    def step() -> tuple[bool, float]:
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()
        moved = any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        return moved, float(engine.get_global_grad_norm())

    hook = next(engine.module.parameters()).register_hook(lambda grad: grad * math.inf) if rank == 0 else None
    bad_moved, bad_norm = step()
    if hook is not None:
        hook.remove()
    moved, norm = step()
    return {
        "optimizer": type(engine.optimizer).__name__,
        "scan_dropped": "check_overflow" in vars(engine.optimizer),
        "bad_moved": bad_moved,
        "bad_norm": str(bad_norm),
        "moved": moved,
        "norm": norm,
    }


def main() -> int:
    distributed.init_process_group(distributed.detect(), 600)
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"reference": reference_group_norms(world)}
    for stage in (1, 2, 3):
        result[f"stage{stage}"] = check_stage(stage, rank, world)
    result["stage0"] = check_stage0(rank, world)
    result["bf16_optimizer"] = check_bf16_optimizer_norm(rank, world)
    for stage, grad_dtype in ((1, "bf16"), (2, "bf16"), (2, "fp32")):  # ZeRO-1 with fp32 gradients is BF16_Optimizer's
        result[f"bf16_stage{stage}_{grad_dtype}_grads"] = check_bf16_overflow(stage, grad_dtype, rank, world)
    report(rank, result)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
