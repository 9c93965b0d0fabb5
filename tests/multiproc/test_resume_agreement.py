"""Where a run resumes is decided once, by rank 0, over 2 real gloo processes.

Rank 1's view of the checkpoint folder is made to lag (as a network file system's can: it
sees only the older checkpoint); both ranks must still resume from the newest, and only
rank 0 reads the trainer state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

RANK_PROGRAM = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
from pretrain.checkpoint import checkpointer
from pretrain.runtime import distributed

root = Path(sys.argv[1])
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
if rank == 1:  # a lagging view: the newest checkpoint is not there yet
    real_scan = checkpointer.scan
    checkpointer.scan = lambda r: checkpointer.Scan(real_scan(r).complete[:1], {})
reads = []
real_read = checkpointer.Checkpointer.read_state
checkpointer.Checkpointer.read_state = staticmethod(lambda folder: reads.append(Path(folder).name) or real_read(folder))
saver = checkpointer.Checkpointer(root, checkpointer.CheckpointConfig(), rank, 2)
folder, state = saver.agree_on_resume()
print(json.dumps({"folder": folder.name, "step": state["step"], "ema": "ema" in state, "reads": reads}))
distributed.shutdown()
"""


def _checkpoint(root, step):
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    torch.save({"step": step, "config": {}, "ema": {"w": torch.zeros(3)}}, folder / "trainer_state.pt")
    files = {"trainer_state.pt": (folder / "trainer_state.pt").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": files, "bytes": sum(files.values())}))


def test_rank0_decides_the_resume_point_and_reads_the_state_once(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 4)
    _checkpoint(root, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(rank)})
             for rank in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [(g["folder"], g["step"]) for g in got] == [("step-00000008", 8)] * 2
    assert not any(g["ema"] for g in got)  # whole-model weights are not broadcast
    assert [g["reads"] for g in got] == [["step-00000008"], []]
