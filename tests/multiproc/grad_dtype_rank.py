"""One rank of the bf16 gradient-precision check (run by test_grad_dtype.py under torchrun).

A bf16 model takes one optimizer step over 16 accumulated micro-batches per rank, at ZeRO
stages 1, 2 and 3, with `zero.grad_dtype` fp32 (the default) and bf16. The optimizer is
plain SGD with lr 1 and no clipping, so the step moves the fp32 master weights by exactly
the gradient DeepSpeed accumulated and reduced. The reference is the exact mean of the
same bf16 micro-batch gradients (a plain bf16 copy of the model, summed in float64 over
micro-batches and ranks). ZeRO-2 with fp32 gradients runs a second time with DeepSpeed's own
bucket reduction (the copy back into the bf16 bucket that pretrain/zero2_fp32_reduce.py
drops). Prints one JSON line: the step's error relative to the reference, which set-ups ran
which of our reduction changes, and whether the two ZeRO-2 runs ended bitwise equal.

    torchrun --nproc_per_node 2 tests/multiproc/grad_dtype_rank.py [MICRO_BATCHES]   (default 16)
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param

from pretrain import distributed
from pretrain.engine import ZeroConfig, build_engine, deepspeed_config
from pretrain.model import create_model
from pretrain.optim import OptimConfig
from rank_report import report  # next to this script

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)
MICRO = 4
PLAIN_SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, warmup_steps=0, end_lr=1.0)


def step_error(stage: int, grad_dtype: str, accumulate: int, rank: int, world: int,
               deepspeed_reduction: bool = False) -> tuple[float, dict, dict]:
    """The step's relative error; which of our reduction changes the engine ran (flat buffers
    all-reduced in place, pretrain/bf16_flat_grads.py; the fp32 bucket not copied back,
    pretrain/zero2_fp32_reduce.py); the fp32 weights after the step. `deepspeed_reduction`
    takes the second change out again."""
    zero = ZeroConfig(stage=stage, precision="bf16", grad_dtype=grad_dtype,
                      reduce_bucket_size=20_000, allgather_bucket_size=20_000)
    ds = deepspeed_config(zero, global_batch=MICRO * accumulate * world, micro_batch=MICRO, grad_accum=accumulate,
                          clip_grad=0.0)
    torch.manual_seed(0)
    model = create_model("vit_ti16", **ARCH)
    plain = create_model("vit_ti16", **ARCH).to(torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    engine = build_engine(model, ds, PLAIN_SGD, total_steps=2)
    if deepspeed_reduction:
        del engine.optimizer.gradient_reduction_w_predivide  # back to the class's method
    changes = {"reduced_in_place": "buffered_allreduce_fallback" in vars(engine),
               "not_copied_back": "gradient_reduction_w_predivide" in vars(engine.optimizer)}
    before = {k: safe_get_full_fp32_param(p).double() for k, p in engine.module.named_parameters()}
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
    after = {k: safe_get_full_fp32_param(p).double() for k, p in engine.module.named_parameters()}
    error = sum((before[k] - after[k] - exact[k]).square().sum() for k in exact).sqrt()
    return (error / sum(v.square().sum() for v in exact.values()).sqrt()).item(), changes, after


def main() -> None:
    distributed.init_process_group(distributed.detect(), 300)
    rank, world = dist.get_rank(), dist.get_world_size()
    accumulate = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    results = {f"stage{stage}-{grad_dtype}": step_error(stage, grad_dtype, accumulate, rank, world)
               for stage in (1, 2) for grad_dtype in ("fp32", "bf16")}
    # Before any ZeRO-3 engine: zero.Init leaves its own linear function in place for the rest
    # of the process, which rounds the bf16 gradients differently.
    *_, deepspeeds = step_error(2, "fp32", accumulate, rank, world, deepspeed_reduction=True)
    results.update({f"stage3-{grad_dtype}": step_error(3, grad_dtype, accumulate, rank, world)
                    for grad_dtype in ("fp32", "bf16")})
    ours = results["stage2-fp32"][2]
    report(rank, {"errors": {k: error for k, (error, _, _) in results.items()},
                  **{change: sorted(k for k, (_, changes, _) in results.items() if changes[change])
                     for change in ("reduced_in_place", "not_copied_back")},
                  "stage2_as_deepspeed": all(torch.equal(ours[k], deepspeeds[k]) for k in ours)})
    distributed.shutdown()  # DeepSpeed's communication threads joined before teardown


if __name__ == "__main__":
    sys.exit(main())
