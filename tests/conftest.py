"""Fixtures shared by every tier."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The embedded digits set converted by the real `vit-prep`, once per test session."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    p = subprocess.run(
        [str(BIN / "vit-prep"), "convert", "--source", "digits", "--output", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def torchrun_ranks():
    """Runs a rank script (with its arguments) under the real torchrun on local ranks; checks
    that it succeeded and returns what each rank reported (tests/multiproc/rank_report.py), in
    rank order."""

    def run(script: Path, *args: str, nproc: int = 2, timeout: int = 300) -> list[dict]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}", str(script), *args]
        # DeepSpeed's deprecated torch.distributed calls warn on every rank and engine; quiet,
        # they would fill the output a failure shows.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"exit {p.returncode}\n" + (p.stdout + p.stderr)[-4000:]
        reports = {}
        for line in p.stdout.splitlines():
            if line.startswith("RANK"):
                rank, result = line[len("RANK") :].split(" ", 1)
                reports[int(rank)] = json.loads(result)
        assert sorted(reports) == list(range(nproc)), p.stdout[-4000:]
        return [reports[r] for r in range(nproc)]

    return run
