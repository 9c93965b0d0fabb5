"""One rank of the host-sync count (run by test_host_syncs.py under torchrun).

The real Trainer trains a small ViT for 6 steps of 2 micro-batches, logging, checking for
stop requests and saving only at the end. A TorchDispatchMode counts every
`aten._local_scalar_dense` (what `.item()`, `bool(tensor)` and `float(tensor)` run: on a GPU,
a wait for the device) during steps 3-5, and names the first caller outside torch.
Prints, per set-up, our calls and DeepSpeed's, each as "file:function".
"""

import collections
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from rank_report import report  # next to this script
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.model import create_model
from pretrain.runtime import distributed
from pretrain.runtime.signals import StopRequest
from pretrain.runtime.watchdog import Watchdog
from pretrain.train.loop import Hooks, TrainConfig, Trainer
from pretrain.train.run_log import RunLog
from pretrain.zero.engine import ZeroConfig, build_engine, deepspeed_config
from pretrain.zero.optimizer import OptimConfig

ARCH = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10, dropout=0.0)
MICRO, ACCUM, STEPS = 2, 2, 6
STEADY = range(2, 5)  # batches (0-based) of steps 3-5
SET_UPS = ((0, "fp32"), (1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16"), (3, "bf16"))


def caller() -> str:
    """Where the read came from: the innermost frame outside torch as 'area/file.py:function',
    and for DeepSpeed's the DeepSpeed function that called it ('... <- file.py:function')."""
    frames = [f for f in reversed(traceback.extract_stack()[:-2])
              if not ("torch" in Path(f.filename).parts and "site-packages" in Path(f.filename).parts)]  # fmt: skip
    if not frames:
        return "unknown"
    path = Path(frames[0].filename)
    area = next((a for a in ("pretrain", "deepspeed") if a in path.parts), "other")
    where = f"{area}/{path.name}:{frames[0].name}"
    if area == "deepspeed" and len(frames) > 1:
        where += f" <- {Path(frames[1].filename).name}:{frames[1].name}"
    return where


class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counting, self.reads = False, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func is torch.ops.aten._local_scalar_dense.default:
            self.reads[caller()] += 1
        return func(*args, **(kwargs or {}))


class Batches:
    def __init__(self, rank: int, mode: CountReads):
        self.rank, self.mode = rank, mode

    def __iter__(self):
        g = torch.Generator().manual_seed(10 + self.rank)
        for i in range(STEPS):
            self.mode.counting = i in STEADY
            yield (
                torch.randn(MICRO * ACCUM, 3, 32, 32, generator=g),
                torch.randint(0, 10, (MICRO * ACCUM,), generator=g),
            )


def count(stage: int, precision: str, run_dir: Path) -> dict[str, int]:
    torch.manual_seed(0)
    model = create_model("vit_ti16", **ARCH)
    world = dist.get_world_size()
    zero = ZeroConfig(stage=stage, precision=precision, reduce_bucket_size=20_000, allgather_bucket_size=20_000)
    ds = deepspeed_config(zero, global_batch=MICRO * ACCUM * world, micro_batch=MICRO, grad_accum=ACCUM, clip_grad=1.0)
    optim = OptimConfig(warmup_steps=2)
    engine = build_engine(model, ds, optim, total_steps=STEPS)
    cfg = TrainConfig(steps=STEPS, batch_size=MICRO * ACCUM * world, grad_accum=ACCUM, loss="softmax",
                      log_every=STEPS, stop_check_every=STEPS, optim=optim)  # fmt: skip
    rank = dist.get_rank()
    log = RunLog(run_dir, enabled=rank == 0, resume_step=0)
    mode = CountReads()
    trainer = Trainer(engine, Batches(rank, mode), cfg, num_classes=10, rank=rank, log=log,
                      hooks=Hooks(save=lambda s, f: None))  # fmt: skip
    with mode:
        trainer.fit(0, STEPS, StopRequest(), Watchdog(0, rank))
    log.close()
    return dict(mode.reads)


def main() -> None:
    import sys

    distributed.init_process_group(distributed.detect(), 300)
    root = Path(sys.argv[1])
    results = {f"stage{s}-{p}": count(s, p, root / f"{s}-{p}") for s, p in SET_UPS}
    distributed.shutdown()
    report(dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"]), results)


if __name__ == "__main__":
    main()
