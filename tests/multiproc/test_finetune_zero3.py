"""Starting weights load into a ZeRO-3 partitioned model, on 2 real ranks (gloo)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_starting_weights_load_into_a_zero3_partitioned_model():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}",
           str(HERE / "finetune_zero3_rank.py")]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "rank 0: ok" in p.stdout and "rank 1: ok" in p.stdout
