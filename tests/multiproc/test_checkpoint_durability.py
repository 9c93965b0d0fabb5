"""A checkpoint save over 2 real DeepSpeed ZeRO-1 ranks (gloo) flushes every file it vouches for.

The manifest may only list files that reached the disk. Rank 1 is made late with its own
files (it sleeps before writing its RNG state), so rank 0 reaches the flush while rank 1 is
still writing: whatever the timing, every file of the manifest must have been fsync'd by a
rank, and no temporary file may be left behind. Each rank records the files it fsync'd by
wrapping `os.fsync` (the flush itself still happens).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

RANK_PROGRAM = """
import json, os, sys, time
import deepspeed, torch, torch.distributed as dist
from pretrain import checkpoint, distributed

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
flushed, real_fsync = [], os.fsync
def recording_fsync(fd):
    flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)
os.fsync = recording_fsync
if rank == 1:
    real_rng_state = checkpoint.rng_state
    def late_rng_state():
        time.sleep(1.0)
        return real_rng_state()
    checkpoint.rng_state = late_rng_state

torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
          "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
engine.backward(engine(torch.randn(1, 8)).square().mean())
engine.step()
saver = checkpoint.Checkpointer(sys.argv[1], checkpoint.CheckpointConfig(), rank, 2)
saver.save(engine, 1, {"step": 1})
distributed.shutdown()
print(json.dumps(flushed))
"""

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-.+$")  # sharding.atomic.temp_name


def _final_name(path: str) -> str:
    """The file a flushed path ends up as (a temporary name is renamed to its final one)."""
    name = Path(path).name
    found = TEMP.match(name)
    return found["name"] if found else name


def test_every_manifest_file_is_flushed_and_no_temp_is_left(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "checkpoints"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]

    folder = root / "step-00000001"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    # DeepSpeed's model and optimizer shards, each rank's RNG state, the trainer state.
    assert len(manifest) == 6, manifest
    flushed = {_final_name(p) for out, _ in outputs for p in json.loads(out.strip().splitlines()[-1])}
    assert set(manifest) <= flushed, f"listed in the manifest but never fsync'd: {sorted(set(manifest) - flushed)}"
    assert not [p.name for p in folder.iterdir() if TEMP.match(p.name)]
