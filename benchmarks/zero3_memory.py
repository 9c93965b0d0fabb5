"""Memory of each rank, step by step, in a 2-rank ViT-H/14 ZeRO-3 CPU run.

The same model and settings as the scale test (tests/multiproc/test_pretrain_h14_zero3.py),
run for more steps without checkpoints: resident (RSS) and proportional (PSS) memory of each
training process whenever a new step appears in metrics.jsonl. A leak shows as growth from
step to step; allocator warm-up as growth over the first steps only.

    python benchmarks/zero3_memory.py --steps 10 --data SHARDS [key=value ...]

Needs about 16 GB of memory and 10-20 s per step on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "multiproc"))
from test_pretrain_h14_zero3 import H14  # noqa: E402  (one definition of the measured set-up)


def newest_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max((r["step"] for r in rows if r.get("kind") == "train"), default=0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", required=True, help="a shard dataset with 10 classes (vit-prep convert --source digits)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for vit-pretrain")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "pretrain.train",
            str(REPO / "configs/pretrain/demo.yaml"),
            f"data.path={args.data}",
            f"run.dir={run}",
            *H14,
            f"train.steps={args.steps}",
            "checkpoint.every=0",
            *args.overrides,
        ]
        with open(Path(tmp) / "run.log", "w") as log:
            proc = subprocess.Popen(
                cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT
            )
            root, seen, rows = psutil.Process(proc.pid), 0, []
            while proc.poll() is None:
                time.sleep(0.5)
                try:
                    ranks = [c for c in root.children(recursive=True) if "pretrain.train" in " ".join(c.cmdline())]
                    mem = [c.memory_full_info() for c in ranks]
                except psutil.Error:
                    continue
                step = newest_step(run)
                if step != seen:
                    seen = step
                    rows.append((step, [m.rss / 2**30 for m in mem], [m.pss / 2**30 for m in mem]))
                    print(
                        f"step {step:3d}: "
                        + "  ".join(
                            f"rank {i} RSS {r:.2f} GiB PSS {q:.2f} GiB"
                            for i, (r, q) in enumerate(zip(rows[-1][1], rows[-1][2]))
                        )
                    )
        if proc.returncode != 0:
            print((Path(tmp) / "run.log").read_text()[-3000:], file=sys.stderr)
            return proc.returncode
    if len(rows) >= 3:
        later = rows[len(rows) // 2 :]  # past the allocator's warm-up over the first steps
        growth = (sum(later[-1][1]) - sum(later[0][1])) / (later[-1][0] - later[0][0])
        print(f"RSS growth of both ranks from step {later[0][0]} to {later[-1][0]}: {growth * 1024:+.0f} MiB per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
