"""Resume start-up of a 2-rank ViT-H/14 ZeRO-3 CPU run: one commit against a baseline commit.

The scale test's set-up (tests/multiproc/test_pretrain_h14_zero3.py): the baseline trains 3
steps and saves. Then, alternating between the baseline and the candidate (each checked out
in a temporary git worktree), a copy of that run directory is resumed for one more step; the
figure is the time from launching torchrun to step 4 appearing in metrics.jsonl (start-up:
processes, the partitioned model, agreeing on and loading the checkpoint, then one step).
The processes are stopped there, before their final save.

    python benchmarks/resume_startup.py --data SHARDS --baseline REV [--candidate REV] [--rounds 2]

Needs about 18 GB of memory and 15 GB of disk; about 2 minutes per resume on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "multiproc"))
from test_pretrain_h14_zero3 import H14  # noqa: E402  (one definition of the measured set-up)
from zero3_memory import newest_step  # noqa: E402  (next to this script)


def launch(tree: Path, run: Path, data: str, steps: int, until_step: int | None, log: Path, *extra: str) -> float:
    """Seconds from launch to `until_step` logged (then stopped), or to a clean exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}",
           "-m", "pretrain.train", str(REPO / "configs/pretrain/demo.yaml"), f"data.path={data}",
           f"run.dir={run}", *H14, f"train.steps={steps}", *extra]  # fmt: skip
    # `-m` from the tree's root: its packages shadow the installed ones.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if until_step is not None and newest_step(run) >= until_step:
                seconds = time.monotonic() - t0
                # torchrun starts each worker in a session of its own: kill them one by one.
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait()
                return seconds
            time.sleep(0.2)
    if proc.returncode != 0 or until_step is not None:
        sys.exit(f"{tree}: exit {proc.returncode} before step {until_step}:\n{log.read_text()[-3000:]}")
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a shard dataset with 10 classes (vit-prep convert --source digits)")
    p.add_argument("--baseline", required=True, help="the git revision to compare with")
    p.add_argument("--candidate", default="HEAD", help="the git revision measured against it")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        tmp = Path(tmp)
        trees = {"baseline": tmp / "baseline", "candidate": tmp / "candidate"}
        for name, rev in (("baseline", args.baseline), ("candidate", args.candidate)):
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[name]), rev],
                           check=True, capture_output=True)  # fmt: skip
        try:
            saved = tmp / "saved"
            print(f"baseline: training 3 steps to save a checkpoint ({tmp / 'first.log'})", flush=True)
            launch(trees["baseline"], saved, args.data, 3, None, tmp / "first.log")
            times: dict[str, list[float]] = {"baseline": [], "candidate": []}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    run = tmp / "run"
                    shutil.rmtree(run, ignore_errors=True)
                    shutil.copytree(saved, run)
                    # --force: the candidate's config may have keys the baseline's run did not record.
                    seconds = launch(tree, run, args.data, 5, 4, tmp / f"resume-{r}-{name}.log", "--force")
                    times[name].append(seconds)
                    print(f"round {r + 1}: {name}: {seconds:.1f} s to the first resumed step", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    base, ours = statistics.median(times["baseline"]), statistics.median(times["candidate"])
    print(f"resume start-up, median of {args.rounds}: baseline {args.baseline} {base:.1f} s, "
          f"candidate {args.candidate} {ours:.1f} s, ratio {ours / base:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
