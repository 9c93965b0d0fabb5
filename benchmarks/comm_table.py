"""The communication table of docs/PRETRAIN.md: bytes per optimizer step for the B/16, L/16
and H/14 pretraining recipes at ZeRO stages 1-3, against the compute that could hide them.

    python benchmarks/comm_table.py [--bandwidth-gbs 50] [--mfu 0.4] [--peak-tflops 989]

The bytes are `pretrain/zero/comm_bytes.step_bytes` over each model's real parameter groups
(built on the meta device), at the recipe's precision and world size (its slurm nodes x
GPUs per node); tests/multiproc/test_comm_bytes.py checks that arithmetic against the
collectives counted in real 2-rank steps. Time on the wire assumes ring collectives limited
by `--bandwidth-gbs` per GPU (inter-node: 8 x 400 Gb/s InfiniBand per 8-GPU node is 50 GB/s
per GPU); the compute is 3 x forward FLOPs x the per-GPU batch at `--mfu` of the peak.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.model import build_model
from pretrain.train.config import load_pretrain_config
from pretrain.train.run_log import vit_forward_flops
from pretrain.zero.comm_bytes import step_bytes, wire_bytes
from pretrain.zero.optimizer import param_groups

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("vit_b16_in21k", "vit_l16_in21k", "vit_h14_in21k")


def rows(bandwidth: float, mfu: float, peak: float) -> list[str]:
    out = [
        "| model (recipe world) | ZeRO stage | collectives per step (payload) | sent per GPU | on the wire | "
        "compute per step | wire / compute |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        cfg = load_pretrain_config([REPO / "configs" / "pretrain" / f"{name}.yaml"], ["data.path=none", "run.dir=none"])
        world = cfg.slurm.nodes * cfg.slurm.gpus_per_node
        with torch.device("meta"):
            model = build_model(cfg.model)
        groups = [sum(p.numel() for p in g["params"]) for g in param_groups(model.named_parameters(), 0.1)]
        params = [p.numel() for p in model.parameters()]
        per_gpu_batch = cfg.train.batch_size // world
        compute_s = 3 * vit_forward_flops(cfg.model) * per_gpu_batch / (mfu * peak)
        for stage in (1, 2, 3):
            got = step_bytes(groups, params, stage=stage, precision=cfg.zero.precision,
                             grad_dtype=cfg.zero.grad_dtype, world=world)  # fmt: skip
            sent = wire_bytes(got, world)
            wire_s = sent / bandwidth
            mark = " (recipe)" if stage == cfg.zero.stage else ""
            parts = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in got.items() if v >= 1e6)
            out.append(f"| {cfg.model.name} ({world} GPUs) | {stage}{mark} | {parts} | {sent / 1e9:.2f} GB | "
                       f"{1e3 * wire_s:.0f} ms | {1e3 * compute_s:.0f} ms | {wire_s / compute_s:.2f} |")  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidth-gbs", type=float, default=50.0, help="GB/s per GPU the collectives get")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization of the compute")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200: 989)")
    args = p.parse_args()
    print("\n".join(rows(args.bandwidth_gbs * 1e9, args.mfu, args.peak_tflops * 1e12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
