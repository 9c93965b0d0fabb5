"""The failure watch over 2 real gloo processes: the failing rank stays alive (as under NCCL),
the other waits in a collective; the watch must end it within seconds with EXIT_FATAL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from vitscale_common.exit_codes import EXIT_FATAL, FAILURE_FILE

RANK_PROGRAM = """
import os, sys, time
from pathlib import Path
import torch.distributed as dist
from pretrain.runtime.fatal import FailureWatch
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
try:
    with FailureWatch(rank, 2, Path(sys.argv[1]), step=lambda: 3, poll_s=0.2):
        if FAILING == rank:
            time.sleep(1)
            raise ValueError("boom")
        dist.barrier()  # never completes: the failing rank does not join
finally:
    time.sleep(20)  # alive, sockets open: the peer learns nothing from the transport
"""


def run_pair(tmp_path, failing: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    program = RANK_PROGRAM.replace("FAILING", str(failing))
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", program, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(rank)})
             for rank in range(2)]  # fmt: skip
    other = procs[1 - failing]
    t0 = time.monotonic()
    _, err = other.communicate(timeout=60)
    ended_after = time.monotonic() - t0
    procs[failing].kill()
    procs[failing].communicate()
    return other.returncode, err, ended_after


def test_the_other_rank_ends_with_the_failing_ranks_message(tmp_path):
    for failing in (1, 0):  # rank 0 holds the store
        code, err, ended_after = run_pair(tmp_path / str(failing), failing)
        assert code == EXIT_FATAL, err[-2000:]
        assert f"fatal: rank {failing} (" in err and "failed after step 3: ValueError: boom" in err, err[-2000:]
        assert ended_after < 10, ended_after  # connection set-up, 1 s, then within a poll or two
        failure = json.loads((tmp_path / str(failing) / FAILURE_FILE).read_text())
        assert failure["rank"] == failing and failure["step"] == 3 and failure["error"].startswith("ValueError: boom")
