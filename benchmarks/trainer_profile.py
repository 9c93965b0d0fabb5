"""Where the trainer's step time goes, next to the bare loop's: a torch.profiler table of
each (GPU kernels and CPU ops) and a cProfile of our step's Python side.

The loops are those of trainer_overhead.py (same model, optimizer, batch); ours runs
ZeRO-1 (or `--stage`) with the paper recipes' 2e8-element buckets.

    python benchmarks/trainer_profile.py [--model vit_h14] [--batch 32] [--img 224] [--stage 1] [--bf16]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from trainer_overhead import BareLoop, OurLoop

from pretrain.model import model_config
from pretrain.runtime import distributed
from pretrain.runtime.glibc_host_memory import keep_freed_host_memory
from pretrain.zero.engine import ZeroConfig
from pretrain.zero.optimizer import OptimConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_h14")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="profiled steps of each loop")
    p.add_argument("--stage", type=int, default=1, help="ZeRO stage of our engine")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="ours with zero.precision=bf16 (fp32 gradients), the bare loop under torch.autocast(bfloat16)",
    )
    args = p.parse_args()
    distributed.init_process_group(distributed.detect(), 600)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        keep_freed_host_memory()  # as vit-pretrain does on CPU ranks
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda

    model_cfg = model_config(args.model, img_size=args.img, num_classes=100)
    optim_cfg = OptimConfig(lr=1e-3, weight_decay=0.03, warmup_steps=5)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
    targets = torch.randint(0, 100, (args.batch,), generator=g).to(device)
    zero = ZeroConfig(
        stage=args.stage,
        precision="bf16" if args.bf16 else "fp32",
        reduce_bucket_size=200_000_000,
        allgather_bucket_size=200_000_000,
    )
    total = 3 * args.steps + 10
    loops = {
        "bare": BareLoop(model_cfg, optim_cfg, images, targets, total, 1.0, args.bf16),
        "ours": OurLoop(model_cfg, optim_cfg, images, targets, total, 1.0, Path(tempfile.mkdtemp()), zero),
    }
    for loop in loops.values():  # warm-up: allocator, kernels, DeepSpeed's first-step set-up
        loop.run(2)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    for label, loop in loops.items():
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            loop.run(args.steps)
            sync()
            wall = time.perf_counter() - t0
        print(f"== {label}: {wall / args.steps * 1e3:.1f} ms/step")
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))
    profiler = cProfile.Profile()
    profiler.enable()
    loops["ours"].run(args.steps)
    sync()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    print(f"== ours, Python side over {args.steps} steps\n{out.getvalue()}")


if __name__ == "__main__":
    main()
