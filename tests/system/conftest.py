"""The local two-node SLURM cluster (slurm/cluster/), started once per test session.

A missing SLURM or munge binary makes start.sh fail, and with it every test that uses the
cluster: the system tier never skips for want of its tools.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "cluster"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _free_port_triple() -> int:
    """A base port with it and the next two free (slurmctld + two slurmd), below the
    range the trainer derives rendezvous ports from."""
    for base in range(16900, 19900, 7):
        try:
            for p in range(base, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports in 16900-19900")


class LocalCluster:
    def __init__(self, state: Path):
        self.state = state
        self.conf = state / "slurm.conf"

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(self.conf)})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def sbatch(self, *args: str) -> str:
        return self.run("sbatch", "--parsable", *map(str, args)).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states` (fails on another terminal state)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if info["JobState"] in TERMINAL:
                raise AssertionError(f"job {job_id} ended {info['JobState']} (wanted {states}): {info}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s: {info}")
            time.sleep(0.5)

    def wait_for_file(self, path: Path, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file() and re.search(pattern, path.read_text(errors="replace")):
                return path.read_text()
            time.sleep(0.3)
        raise AssertionError(f"{path}: no {pattern!r} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> LocalCluster:
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "VITSCALE_SLURM_PORT": str(_free_port_triple()), "VITSCALE_SLURM_GRACE": "30"}
    proc = subprocess.run(["bash", str(CLUSTER / "start.sh"), str(state)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"local SLURM cluster did not start:\n{proc.stdout}\n{proc.stderr}"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")  # for vit-submit and the jobs it launches
    try:
        yield LocalCluster(state)
    finally:
        subprocess.run(["bash", str(CLUSTER / "stop.sh"), str(state)], capture_output=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


# --------------------------------------------------------------------------- trainer runs
BIN = Path(sys.executable).parent
PRETRAIN_DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
TINY_STEPS = 120
# The demo recipe with a tiny model: a step is fast, and there are enough of them that a
# signal sent a few steps in lands mid-run.
TINY_PRETRAIN = [
    "model.depth=2",
    "model.width=32",
    "model.heads=2",
    "model.mlp_dim=64",
    f"train.steps={TINY_STEPS}",
    "train.batch_size=16",
    "train.log_every=1",
    "train.optim.warmup_steps=3",
    "checkpoint.every=40",
    "checkpoint.keep=2",
    "data.workers=0",
    "eval.every=0",
    "eval.fewshot_shots=[]",
]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The demo dataset converted by hand (one process)."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    subprocess.run(
        [
            str(BIN / "vit-prep"),
            "convert",
            "--config",
            str(REPO / "configs" / "prep" / "digits.yaml"),
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def torchrun(module: str, *args: str) -> None:
    """A stage run by hand: 2 ranks on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "-m", module, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="session")
def pretrain_by_hand(digits_shards, tmp_path_factory) -> Path:
    """The tiny pretraining run by hand, never interrupted: what every SLURM run must reproduce."""
    run = tmp_path_factory.mktemp("pretrain_by_hand") / "run"
    torchrun("pretrain.train", str(PRETRAIN_DEMO), f"data.path={digits_shards}", f"run.dir={run}", *TINY_PRETRAIN)
    return run


def final_weights(run_dir: Path, step: int) -> dict:
    from pretrain.checkpoint.checkpointer import scan
    from pretrain.checkpoint.export import consolidated_state_dict

    newest = scan(run_dir / "checkpoints").newest
    assert newest is not None and newest.name == f"step-{step:08d}", newest
    return consolidated_state_dict(newest)


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="session")
def runs():
    """The helpers above, for test modules (which cannot import this conftest by name)."""
    return types.SimpleNamespace(
        bin=BIN,
        pretrain_demo=PRETRAIN_DEMO,
        steps=TINY_STEPS,
        tiny_pretrain=TINY_PRETRAIN,
        torchrun=torchrun,
        final_weights=final_weights,
        assert_same_weights=assert_same_weights,
    )
