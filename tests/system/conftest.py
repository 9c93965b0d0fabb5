"""The local two-node SLURM cluster (slurm/cluster/), started once per test session.

A missing SLURM or munge binary makes start.sh fail, and with it every test that uses the
cluster: the system tier never skips for want of its tools.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
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
