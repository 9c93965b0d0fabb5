"""One rank of the bf16 gradient-precision check (run by test_grad_dtype.py under torchrun).

A bf16 model takes one optimizer step over 16 accumulated micro-batches per rank, at ZeRO
stages 1, 2 and 3, with `zero.grad_dtype` fp32 (the default) and bf16. The optimizer is
plain SGD with lr 1 and no clipping, so the step moves the fp32 master weights by exactly
the gradient DeepSpeed accumulated and reduced. The reference is the exact mean of the
same bf16 micro-batch gradients (a plain bf16 copy of the model, summed in float64 over
micro-batches and ranks). ZeRO-1 and ZeRO-2 with fp32 gradients run a second time with
DeepSpeed's own paths, and
both ways again with `zero.overlap_comm`. And
at ZeRO-1 with fp32 gradients, a parameter that gets no gradient in a step must not move.
DeepSpeed's own paths are the version guard's fallback (pretrain/zero/deepspeed_patches.py).
Prints one JSON line: the step's error relative to the reference, which set-ups ran which
of our changes, whether ours and DeepSpeed's own ended bitwise equal, what the fallback
said and whether any of our methods were left on its engines, and how far the unused
parameter moved.

    torchrun --nproc_per_node 2 tests/multiproc/grad_dtype_rank.py [MICRO_BATCHES]   (default 16)
"""

import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param
from rank_report import report  # next to this script

from pretrain.model import create_model
from pretrain.runtime import distributed
from pretrain.zero.engine import ZeroConfig, build_engine, deepspeed_config
from pretrain.zero.optimizer import OptimConfig

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)
MICRO = 4
PLAIN_SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0, end_lr=1.0)
# Which of our replacements (method name -> where it lives) says which change ran.
CHANGES = {
    "reduced_in_place": "buffered_allreduce_fallback",  # pretrain/zero/deepspeed_patches.py, on the engine
    "written_not_added": "_update_hp_grad",  # pretrain/zero/deepspeed_patches.py
    "not_copied_back": "gradient_reduction_w_predivide",
}  # pretrain/zero/deepspeed_patches.py


def engine_for(
    model, stage: int, grad_dtype: str, accumulate: int, world: int, ours: bool = True, overlap_comm: bool = False
):
    zero = ZeroConfig(
        stage=stage,
        precision="bf16",
        grad_dtype=grad_dtype,
        overlap_comm=overlap_comm,
        reduce_bucket_size=20_000,
        allgather_bucket_size=20_000,
    )
    ds = deepspeed_config(
        zero, global_batch=MICRO * accumulate * world, micro_batch=MICRO, grad_accum=accumulate, clip_grad=0.0
    )
    # Not ours: the guard's fallback, as on a DeepSpeed release the replacements are not verified on.
    engine = build_engine(model, ds, PLAIN_SGD, total_steps=2, deepspeed_version=None if ours else "0.0.0")
    FALLBACK["lines"].add(engine.vitscale_patches_line if not ours else "")
    FALLBACK["methods_from_pretrain"] += 0 if ours else len(methods_from_pretrain(engine))
    return engine


FALLBACK = {"lines": set(), "methods_from_pretrain": 0}


def methods_from_pretrain(engine) -> list[str]:
    """Our replacements on this engine: the instance attributes that are methods from pretrain/."""
    return [name for obj in (engine, engine.optimizer) for name, value in vars(obj).items()
            if isinstance(value, types.MethodType) and value.__func__.__module__.startswith("pretrain.")]  # fmt: skip


def installed(engine) -> dict[str, bool]:
    return {change: method in vars(engine) or method in vars(engine.optimizer) for change, method in CHANGES.items()}


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    return {k: safe_get_full_fp32_param(p).double() for k, p in engine.module.named_parameters()}


def step_error(
    stage: int, grad_dtype: str, accumulate: int, rank: int, world: int, ours: bool = True, overlap_comm: bool = False
) -> tuple[float, dict, dict]:
    """The step's relative error, which of our changes the engine ran, the fp32 weights after
    the step. `ours=False`: with DeepSpeed's own methods."""
    torch.manual_seed(0)
    model = create_model("vit_ti16", **ARCH)
    # The paper's zero head would leave every other parameter without a gradient in a first step.
    torch.nn.init.normal_(model.head.weight, std=0.02)
    plain = create_model("vit_ti16", **ARCH).to(torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    engine = engine_for(model, stage, grad_dtype, accumulate, world, ours, overlap_comm)
    before = fp32_weights(engine)
    exact = {k: torch.zeros_like(v) for k, v in before.items()}
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(accumulate):
        x = torch.randn(MICRO, 3, 32, 32, generator=g).to(torch.bfloat16)
        y = torch.randint(0, 10, (MICRO,), generator=g)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()  # an optimizer step only at the accumulation boundary
        plain.zero_grad(set_to_none=True)
        (F.cross_entropy(plain(x), y) / accumulate).backward()  # as the engine scales the loss
        for k, p in plain.named_parameters():
            exact[k] += p.grad.double()
    for v in exact.values():
        dist.all_reduce(v)
        v /= world
    after = fp32_weights(engine)
    error = sum((before[k] - after[k] - exact[k]).square().sum() for k in exact).sqrt()
    return (error / sum(v.square().sum() for v in exact.values()).sqrt()).item(), installed(engine), after


class TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
        self.use_b = True

    def forward(self, x):
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def unused_parameter_move(world: int) -> float:
    """ZeRO-1, fp32 gradients, one micro-batch a step: branch b is used in step 1 and not in
    step 2. How far step 2 moved b's fp32 weights (0: it had no gradient; a gradient left over
    from step 1 would move it by as much again)."""
    torch.manual_seed(0)
    model = TwoBranches()
    engine = engine_for(model, 1, "fp32", 1, world)
    x = torch.randn(MICRO, 8).to(torch.bfloat16)
    engine.backward(engine(x).float().square().mean())
    engine.step()
    after_first = fp32_weights(engine)
    model.use_b = False
    engine.backward(engine(x).float().square().mean())
    engine.step()
    after_second = fp32_weights(engine)
    return max((after_second[k] - after_first[k]).abs().max().item() for k in ("b.weight", "b.bias"))


def main() -> None:
    distributed.init_process_group(distributed.detect(), 300)
    rank, world = dist.get_rank(), dist.get_world_size()
    accumulate = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    results = {
        f"stage{stage}-{grad_dtype}": step_error(stage, grad_dtype, accumulate, rank, world)
        for stage in (1, 2)
        for grad_dtype in ("fp32", "bf16")
    }
    # Before any ZeRO-3 engine: one leaves DeepSpeed's linear function in place for the rest of
    # the process (docs/PRETRAIN.md, "ZeRO stage and memory"), which rounds the bf16 gradients differently.
    # Also with zero.overlap_comm (DeepSpeed's reduction stream and double buckets), ours against
    # DeepSpeed's own in both.
    as_deepspeed = {}
    for stage in (1, 2):
        for overlap in (False, True):
            ours = (
                results[f"stage{stage}-fp32"][2]
                if not overlap
                else step_error(stage, "fp32", accumulate, rank, world, overlap_comm=True)[2]
            )
            theirs = step_error(stage, "fp32", accumulate, rank, world, ours=False, overlap_comm=overlap)[2]
            label = f"stage{stage}-fp32" + ("-overlap_comm" if overlap else "")
            as_deepspeed[label] = all(torch.equal(ours[k], theirs[k]) for k in ours)
    moved = unused_parameter_move(world)
    results.update(
        {f"stage3-{grad_dtype}": step_error(3, grad_dtype, accumulate, rank, world) for grad_dtype in ("fp32", "bf16")}
    )
    report(
        rank,
        {
            "errors": {k: error for k, (error, _, _) in results.items()},
            **{change: sorted(k for k, (_, changes, _) in results.items() if changes[change]) for change in CHANGES},
            "as_deepspeed": as_deepspeed,
            "fallback": {
                "lines": sorted(FALLBACK["lines"] - {""}),
                "methods_from_pretrain": FALLBACK["methods_from_pretrain"],
            },
            "unused_parameter_moved": moved,
        },
    )
    distributed.shutdown()  # DeepSpeed's communication threads joined before teardown


if __name__ == "__main__":
    sys.exit(main())
