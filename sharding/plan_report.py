"""What a run's data stream will ask of the file system, before the run: `python -m sharding.plan_report`.

    python -m sharding.plan_report SHARDS --global-batch 4096 --world-size 1024 --readers 8 --width 1024

Reads only the dataset's per-shard table (sample and byte counts), plans one epoch exactly as
the loader will, and prints steps, remainder, partition size, readers per shard and the
sequential share of bytes for a few sampled ranks.
"""

from __future__ import annotations

import argparse
import sys
import time

from sharding.plan import EpochPlan, StreamLayout, audit_reads, default_width
from vitscale_common.errors import UserError, cli_entry


def report(dataset_path: str, split: str, global_batch: int, world_size: int, readers: int, width: int, cycle: int,
           seed: int = 0, epoch: int = 0) -> dict:  # fmt: skip
    from sharding import open_dataset

    shards = open_dataset(dataset_path).shards(split)
    if not shards:
        raise UserError(f"{dataset_path}: split {split!r} has no shards")
    layout = StreamLayout(global_batch, width or default_width(global_batch, len(shards), cycle), cycle)
    layout.check_readers(world_size, readers)
    t0 = time.perf_counter()
    plan = EpochPlan([s.num_samples for s in shards], layout, seed, epoch)
    plan_s = time.perf_counter() - t0
    ranks = sorted({0, world_size // 2, world_size - 1})
    audit = audit_reads(plan, [s.num_bytes for s in shards], ranks, world_size)
    return {
        "samples": plan.num_samples, "shards": len(shards), "partitions": layout.partitions,
        "partition_samples": plan.partition_length(0), "steps_per_epoch": plan.steps, "remainder": plan.remainder,
        "per_rank_batch": global_batch // world_size, "partitions_per_reader": layout.partitions // (world_size * max(readers, 1)),
        "max_readers_per_shard": audit.max_readers_per_shard, "sequential_fraction": audit.sequential_fraction,
        "audited_ranks": ranks, "plan_ms": plan_s * 1e3,
    }  # fmt: skip


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="shard dataset folder")
    p.add_argument("--split", default="train")
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--readers", type=int, default=1, help="partition readers per rank (data.readers)")
    p.add_argument("--width", type=int, default=0, help="data.stream_width (0: the loader's default)")
    p.add_argument("--cycle", type=int, default=8, help="data.stream_cycle")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = report(args.dataset, args.split, args.global_batch, args.world_size, args.readers, args.width, args.cycle,
               args.seed)  # fmt: skip
    print(f"{r['samples']:,} samples in {r['shards']:,} shards -> {r['partitions']:,} partitions of "
          f"~{r['partition_samples']:,} samples ({r['partitions_per_reader']} per reader)")  # fmt: skip
    print(f"{r['steps_per_epoch']:,} steps/epoch of {args.global_batch} ({r['per_rank_batch']} per rank); "
          f"{r['remainder']:,} samples left out per epoch (< one global batch)")  # fmt: skip
    print(f"readers per shard: at most {r['max_readers_per_shard']}; sequential bytes "
          f"{r['sequential_fraction']:.2%} (ranks {r['audited_ranks']}); planned in {r['plan_ms']:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
