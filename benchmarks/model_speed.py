"""Training speed of our ViT against timm's ViT of the same configuration, same process.

    python benchmarks/model_speed.py [--models vit_s16 vit_b16] [--batch 8] [--rounds 7]
                                     [--steps 3] [--threads N] [--device cpu|cuda] [--bf16]

Both models get the same weights (ours converted with `pretrain.model.timm_format.to_timm`), the
same input batch and the same threads. One step is forward + loss + backward (no
optimizer: identical for both). Each round times `--steps` steps of each model, the
order alternating between rounds so drift (other processes, thermal) hits both alike;
the figure is the median over rounds of ours/timm images/s. On CPU the default clock is
this process's CPU time (--clock cpu), which other processes on a shared machine barely
disturb; run it with --threads 1, since idle OpenMP threads spin and are billed too. On CUDA it also reports
model FLOPs utilisation (MFU): forward+backward FLOPs counted by
torch.utils.flop_counter over the peak dense bf16/fp32 rate of the card.
The ratio lines print last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pretrain.model import create_model
from pretrain.model.timm_format import create_timm_model, to_timm

# Peak dense tensor-core rates (FLOP/s) for MFU: bf16 and tf32/fp32 datasheet figures.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
}


# CPU time of this process is what a model costs when other processes share the cores;
# wall time is what a dedicated machine (or a GPU) sees.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def train_step(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, bf16: bool) -> None:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(images), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)


def timed(model, images, targets, steps: int, bf16: bool, clock) -> float:
    """Images/s over `steps` training steps."""
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = clock()
    for _ in range(steps):
        train_step(model, images, targets, bf16)
    sync()
    return steps * images.shape[0] / (clock() - start)


def step_flops(model, images, targets, bf16: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model, images, targets, bf16)
    return counter.get_total_flops()


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks["bf16" if bf16 else "fp32"]
    return None


def compare(name: str, args) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = create_model(name, img_size=args.img_size, num_classes=1000).to(device).train()
    theirs = create_timm_model(ours.cfg).to(device).train()
    theirs.load_state_dict(to_timm(ours.state_dict()))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    clock_name = args.clock or ("wall" if device.type == "cuda" else "cpu")
    clock = CLOCKS[clock_name]
    for model in (ours, theirs):  # warm-up: allocator, kernels, autotuning
        timed(model, images, targets, args.warmup, args.bf16, clock)

    ratios, ours_ips, timm_ips = [], [], []
    for r in range(args.rounds):
        pair = [("ours", ours), ("timm", theirs)]
        rates = dict(
            (label, timed(m, images, targets, args.steps, args.bf16, clock))
            for label, m in (pair if r % 2 == 0 else pair[::-1])
        )
        ours_ips.append(rates["ours"])
        timm_ips.append(rates["timm"])
        ratios.append(rates["ours"] / rates["timm"])
        print(
            f"  {name} round {r + 1}/{args.rounds}: ours {rates['ours']:.2f} img/s, timm {rates['timm']:.2f} img/s, "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    ratio = statistics.median(ratios)
    summary = (
        f"{name}: ours {statistics.median(ours_ips):.2f} img/s, timm {statistics.median(timm_ips):.2f} img/s "
        f"(median of {args.rounds} rounds, batch {args.batch}, {args.img_size}px, {args.device}"
        f"{', bf16' if args.bf16 else ''}, {torch.get_num_threads()} threads, {clock_name} clock)"
    )
    peak = peak_flops(device, args.bf16)
    if peak:
        flops = step_flops(ours, images, targets, args.bf16) / args.batch
        summary += (
            f"; {flops / 1e9:.1f} GFLOP per image fwd+bwd, MFU ours {statistics.median(ours_ips) * flops / peak:.1%}"
        )
        summary += f", timm {statistics.median(timm_ips) * flops / peak:.1%}"
    print(summary, flush=True)
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timed rounds; the median ratio is reported")
    parser.add_argument("--steps", type=int, default=3, help="training steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default=None,
        help="'cpu' = CPU time of this process (default on CPU: robust to other processes "
        "sharing the cores; use with --threads 1), 'wall' (default on CUDA)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ratios = {name: compare(name, args) for name in args.models}
    for name, ratio in ratios.items():
        print(f"ratio ours/timm training images/s {name}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
