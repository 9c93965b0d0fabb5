"""vit-plan: will a pretraining config fit, how fast will it run, and on how many GPUs.

    vit-plan CONFIG [CONFIG ...] [key=value ...] [--nodes N] [--gpus-per-node G] [--gpu KIND]
             [--hardware FILE ...] [--calibration results.jsonl] [--train-samples N] [--summary | --json]

Nodes, GPUs per node and the GPU kind default to the config's slurm section. `assume.KEY=VALUE`
overrides an assumption of configs/plan/defaults.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pretrain.plan.hardware import Cluster, load_gpus
from pretrain.plan.planner import make_plan
from pretrain.plan.report import render
from pretrain.train.config import load_pretrain_config
from vitscale_common.errors import cli_entry


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vit-plan", description=__doc__.split("\n")[0])
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value", help="pretraining configs, then overrides")
    p.add_argument("--nodes", type=int, help="default: slurm.nodes")
    p.add_argument("--gpus-per-node", type=int, help="default: slurm.gpus_per_node")
    p.add_argument("--gpu", help="GPU kind (default: slurm.gpu)")
    p.add_argument(
        "--hardware", nargs="*", default=[], metavar="FILE", help="more GPU kinds (configs/plan/gpus.yaml's shape)"
    )
    p.add_argument("--calibration", type=Path, help="GPU-suite results.jsonl to take the MFU from")
    p.add_argument("--train-samples", type=int, help="training images per epoch (default: read from data.path)")
    p.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--summary", action="store_true", help="only the one-line summary")
    out.add_argument("--json", action="store_true", help="summary, fit and refusal as one JSON object (vit-submit)")
    return p.parse_args(argv)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_gpus:
        for kind, g in load_gpus(args.hardware).items():
            print(f"{kind}: {g.memory_gib} GiB, {g.peak_bf16_tflops} TFLOP/s bf16, NVLink {g.nvlink_gbs} GB/s, "
                  f"network {g.network_gbs} GB/s per GPU")  # fmt: skip
        return 0
    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    cluster = None
    if args.nodes or args.gpus_per_node or args.gpu:
        slurm = load_pretrain_config(files, [o for o in overrides if not o.startswith("assume.")]).slurm
        cluster = Cluster(args.nodes or slurm.nodes, args.gpus_per_node or max(slurm.gpus_per_node, 1),
                          args.gpu or slurm.gpu)  # fmt: skip
    plan = make_plan(files, overrides, cluster=cluster, hardware=args.hardware, calibration=args.calibration,
                     train_samples=args.train_samples)  # fmt: skip
    if args.json:
        print(json.dumps({"summary": plan.summary(), "fits": plan.fits(), "refusal": plan.refusal()}))
    elif args.summary:
        print(plan.summary())
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
