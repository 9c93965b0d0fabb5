"""One rank of the communication count (run by test_comm_bytes.py under torchrun).

A small ViT (one parameter of odd size, so partition padding shows) trains 3 steps per
set-up, of 1 or 2 micro-batches; the collectives of the third are counted (pretrain/zero/comm_bytes.py) and
reported with the arithmetic's figure for the same model, stage, precision and world.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_report import report  # next to this script

from pretrain.model import create_model
from pretrain.runtime import distributed
from pretrain.zero import comm_bytes
from pretrain.zero.engine import ZeroConfig, build_engine, build_model_for, deepspeed_config
from pretrain.zero.optimizer import OptimConfig, param_groups

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=11)
# (stage, precision, gradient dtype, micro-batches per step)
SET_UPS = [(0, "fp32", "fp32", 1), (1, "fp32", "fp32", 1), (2, "fp32", "fp32", 1), (3, "fp32", "fp32", 1),
           (1, "bf16", "fp32", 1), (2, "bf16", "fp32", 1), (3, "bf16", "fp32", 1), (1, "bf16", "bf16", 1),
           (2, "bf16", "bf16", 1), (0, "fp32", "fp32", 2), (1, "fp32", "fp32", 2), (2, "fp32", "fp32", 2),
           (1, "bf16", "fp32", 2), (3, "bf16", "fp32", 2)]  # fmt: skip


def counted(stage: int, precision: str, grad_dtype: str, accum: int, world: int) -> tuple[dict, dict]:
    zero = ZeroConfig(stage=stage, precision=precision, grad_dtype=grad_dtype)
    ds = deepspeed_config(zero, global_batch=4 * accum * world, micro_batch=4, grad_accum=accum, clip_grad=1.0)
    torch.manual_seed(0)
    model = build_model_for(zero, ds, lambda: create_model("vit_ti16", **ARCH))
    optim = OptimConfig(warmup_steps=1)
    engine = build_engine(model, ds, optim, total_steps=10)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = torch.randn(4, 3, 32, 32).to(dtype), torch.randint(0, 11, (4,))
    for _ in range(3):  # the third step is the one counted
        with comm_bytes.count_collectives() as calls:
            for _micro_batch in range(accum):
                engine.backward(F.cross_entropy(engine(x).float(), y))
                engine.step()
    reference = create_model("vit_ti16", **ARCH)  # whole, for the arithmetic's sizes
    groups = [sum(p.numel() for p in g["params"]) for g in param_groups(reference.named_parameters(), 0.03)]
    params = [p.numel() for p in reference.parameters()]
    expected = comm_bytes.step_bytes(groups, params, stage=stage, precision=precision, grad_dtype=grad_dtype,
                                      world=world, micro_batches=accum)  # fmt: skip
    return comm_bytes.totals(calls), expected


def main() -> None:
    distributed.init_process_group(distributed.detect(), 300)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for stage, precision, grad_dtype, accum in SET_UPS:
        got, expected = counted(stage, precision, grad_dtype, accum, world)
        key = f"stage{stage}-{precision}-{grad_dtype} gradients-{accum} micro-batches"
        results[key] = {"counted": got, "arithmetic": expected}
    distributed.shutdown()
    report(rank, results)


if __name__ == "__main__":
    main()
