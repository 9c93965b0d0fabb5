"""The tables of docs/SCALE.md: vit-plan's predictions for the pretraining recipes at 8, 64, 256
and 1,024 GPUs, and the paper's JFT ViT-H/14 run in GPU-days.

    python benchmarks/scale_table.py [--gpu h100] [--calibration results.jsonl] [assume.KEY=VALUE ...]

Each row is `pretrain.plan.make_plan` for the recipe as it is (its ZeRO stage, micro-batch =
4096 / GPUs, no activation checkpointing unless the recipe sets it) on GPUs in nodes of 8;
the last column is the plan's recommendation where it differs. Epochs become steps over the
datasets' sizes below.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.model.flops import training_flops
from pretrain.plan import Cluster, make_plan
from pretrain.plan.hardware import GIB

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["vit_b16_in21k", "vit_l16_in21k", "vit_h14_in21k", "vit_b16_jft", "vit_l16_jft", "vit_h14_jft"]
TRAIN_SAMPLES = {"in21k": 14_197_122, "jft": 303_000_000}  # ImageNet-21k fall11; JFT-300M as the paper counts it
GPUS = (8, 64, 256, 1024)
# The paper (Table 2): ViT-H/14 on JFT-300M took 2.5k TPUv3-core-days; a TPUv3 core's bf16 peak.
PAPER_CORE_DAYS, TPUV3_CORE_TFLOPS = 2500, 61.5


def recipe_rows(gpu: str, calibration: Path | None, assume: list[str]) -> list[str]:
    out = [
        "| recipe | GPUs | ZeRO, micro-batch x accum. | GiB per GPU | fits | ms/step | img/s | MFU | exposed comm. "
        "| days | GPU-days | loader cores/GPU | recommendation (where it differs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        samples = TRAIN_SAMPLES[name.rsplit("_", 1)[1]]
        for n in GPUS:
            plan = make_plan([REPO / "configs" / "pretrain" / f"{name}.yaml"], assume,
                             cluster=Cluster(max(n // 8, 1), min(n, 8), gpu), calibration=calibration,
                             train_samples=samples)  # fmt: skip
            o, r, t = plan.configured, plan.recommended, plan.configured.time
            same = r is not None and (r.stage, r.micro_batch, r.checkpointing) == (
                o.stage,
                o.micro_batch,
                o.checkpointing,
            )
            rec = "-" if same else ("nothing fits" if r is None else
                  f"{r.describe()}: {plan.cfg.train.batch_size / r.time.step_s:,.0f} img/s, {r.total / GIB:.1f} GiB")  # fmt: skip
            out.append(f"| {name} | {n} | {o.stage}, {o.micro_batch} x {o.grad_accum} | {o.total / GIB:.1f} | "
                       f"{'yes' if plan.fits() else '**no**'} | {1e3 * t.step_s:.0f} | {plan.images_per_s:,.0f} | "
                       f"{100 * plan.mfu:.0f}% | {100 * t.exposed_comm_s / t.step_s:.0f}% | {plan.days:.1f} | "
                       f"{plan.days * n:,.0f} | {plan.loader_cores_per_gpu:.2f} | {rec} |")  # fmt: skip
    return out


def paper_rows(gpu: str, calibration: Path | None, assume: list[str]) -> list[str]:
    plans = {n: make_plan([REPO / "configs" / "pretrain" / "vit_h14_jft.yaml"], assume,
                          cluster=Cluster(n // 8, 8, gpu), calibration=calibration,
                          train_samples=TRAIN_SAMPLES["jft"]) for n in (64, 256)}  # fmt: skip
    plan = plans[64]
    images = plan.total_steps * plan.cfg.train.batch_size
    flops = images * training_flops(plan.cfg.model)
    tpu_capacity = PAPER_CORE_DAYS * 86400 * TPUV3_CORE_TFLOPS * 1e12
    peak = plan.gpu.peak_bf16_tflops * 1e12
    return [
        f"- The run: {plan.total_steps:,} steps of 4,096 = {images / 1e9:.2f}G images x "
        f"{training_flops(plan.cfg.model) / 1e12:.3f} TFLOP (forward + backward, exact) = {flops:.3g} FLOP.",
        f"- The paper's 2.5k TPUv3-core-days at {TPUV3_CORE_TFLOPS} TFLOP/s per core offered {tpu_capacity:.3g} FLOP: "
        f"it ran at {100 * flops / tpu_capacity:.0f}% MFU.",
        f"- At that MFU a {gpu.upper()} ({plan.gpu.peak_bf16_tflops:g} TFLOP/s) would need "
        f"{PAPER_CORE_DAYS * TPUV3_CORE_TFLOPS / plan.gpu.peak_bf16_tflops:,.0f} GPU-days; "
        f"at 100% MFU {flops / peak / 86400:,.0f}.",
        *(
            f"- vit-plan for the recipe on {n} {gpu.upper()}s: {p.days * n:,.0f} GPU-days ({p.days:.1f} days, "
            f"MFU {100 * p.mfu:.0f}%)."
            for n, p in plans.items()
        ),  # fmt: skip
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("assume", nargs="*", metavar="assume.KEY=VALUE", help="override the planner's assumptions")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--calibration", type=Path, help="GPU-suite results.jsonl to take the MFU from")
    args = p.parse_args()
    print("\n".join(recipe_rows(args.gpu, args.calibration, args.assume)))
    print()
    print("\n".join(paper_rows(args.gpu, args.calibration, args.assume)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
