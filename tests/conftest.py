"""Fixtures shared by every tier."""
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
    p = subprocess.run([str(BIN / "vit-prep"), "convert", "--source", "digits", "--output", str(out)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture
def torchrun_script():
    """Runs a script under the real torchrun on local ranks; returns the finished process."""
    def run(script: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={port}", str(script)]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=timeout)
    return run
