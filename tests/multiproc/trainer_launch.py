"""Launching vit-pretrain over 2 CPU ranks for the trainer tests: one real
`python -m pretrain.train ...` process per rank with the variables a launcher exports
(RANK, WORLD_SIZE, MASTER_ADDR/PORT), so each rank's exit code is seen directly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from pretrain.train.run_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
STEPS = 12

# A small model and short run; everything else is the demo recipe.
SMALL = [
    "model.depth=2",
    "model.width=64",
    "model.heads=2",
    "model.mlp_dim=128",
    "model.dropout=0.1",
    f"train.steps={STEPS}",
    "train.batch_size=32",
    "train.log_every=1",
    "train.optim.warmup_steps=3",
    "train.optim.lr=3e-3",
    "checkpoint.every=2",
    "checkpoint.keep=20",
    "data.workers=0",
    "eval.max_batches=1",
    "eval.fewshot_shots=[]",
    "eval.batch_size=64",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: Path, shards: Path, *extra: str, ranks: int = 2) -> list[subprocess.Popen]:
    """One process per rank with the variables a launcher (torchrun, srun via the template) exports."""
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        str(DEMO),
        f"data.path={shards}",
        f"run.dir={run_dir}",
        *SMALL,
        *extra,
    ]
    port = _free_port()
    procs = []
    with open(log, "w") as out:
        for rank in range(ranks):
            env = {
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def launch(run_dir: Path, shards: Path, *extra: str, ranks: int = 2, expect: int = 0) -> str:
    procs = start(run_dir, shards, *extra, ranks=ranks)
    codes = [p.wait(timeout=300) for p in procs]
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert codes == [expect] * ranks, log[-4000:]
    return log


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["last_loss"] for r in read_metrics(run_dir)}
