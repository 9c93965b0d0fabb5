"""Checkpoint saves over 2 real DeepSpeed ZeRO-1 ranks (gloo): what the manifest vouches for
is on disk, and a background save writes the state of its step, not a later one.

Each rank records the files it fsync'd by wrapping `os.fsync` (the flush itself still
happens). In the `late` run, rank 1 sleeps before writing its RNG state, so rank 0 reaches
the flush while rank 1 is still writing. In the `background` run, `checkpoint.async_save`
is on, the writer thread starts a second late, and both ranks take another optimizer step
(which updates weights and Adam state in place) before the save is finished. In the
`disk-full` run, rank 1's background writes fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RANK_PROGRAM = """
import json, os, sys, time
import deepspeed, torch, torch.distributed as dist
from pretrain.checkpoint import checkpointer as checkpoint
from pretrain.checkpoint import writes as checkpoint_writes
from pretrain.runtime import distributed

root, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
flushed, real_fsync = [], os.fsync
def recording_fsync(fd):
    flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)
os.fsync = recording_fsync
def late(function):
    def wrapper(*args, **kwargs):
        time.sleep(1.0)
        return function(*args, **kwargs)
    return wrapper
if mode == "late" and rank == 1:
    checkpoint.rng_state = late(checkpoint.rng_state)
if mode == "background":
    checkpoint_writes.write_file = late(checkpoint_writes.write_file)  # the writer thread's
if mode == "disk-full" and rank == 1:
    def full_disk(path, obj, save=None):
        raise OSError(28, "No space left on device", str(path))
    checkpoint_writes.write_file = full_disk

torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
          "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
def train_step():
    engine.backward(engine(torch.randn(1, 8)).square().mean())
    engine.step()
train_step()
saver = checkpoint.Checkpointer(root, checkpoint.CheckpointConfig(async_save=mode != "late"), rank, 2)
if mode == "disk-full":  # both ranks learn of rank 1's failure at the next save, and say which folder
    saver.save(engine, 1, {"step": 1}, final=False)
    try:
        saver.save(engine, 2, {"step": 2}, final=False)
    except checkpoint.UserError as e:
        print(json.dumps(str(e)))
    distributed.shutdown()
    sys.exit(0)
weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
master = [t.clone() for t in engine.optimizer.single_partition_of_fp32_groups]
folder = saver.save(engine, 1, {"step": 1}, final=mode != "background")
if mode == "background":
    assert saver.pending is not None and not (folder / "manifest.json").exists()
    train_step()
    assert not torch.equal(engine.module.weight, weights["weight"]), "the step changed nothing"
    assert saver.finish() == folder
    saved = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(saved[k], v) for k, v in weights.items()), "weights of a later step were saved"
    optim = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
    saved_master = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert all(torch.equal(a, b) for a, b in zip(saved_master, master)), "master weights of a later step were saved"
distributed.shutdown()
print(json.dumps(flushed))
"""

TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-.+$")  # vitscale_common.atomic.temp_name


def _final_name(path: str) -> str:
    """The file a flushed path ends up as (a temporary name is renamed to its final one)."""
    name = Path(path).name
    found = TEMP.match(name)
    return found["name"] if found else name


def run_ranks(root: Path, mode: str) -> list[object]:
    """Both ranks' last stdout line, parsed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, str(root), mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.parametrize("mode", ["late", "background"])
def test_every_manifest_file_is_flushed_and_holds_its_step(tmp_path, mode):
    root = tmp_path / "checkpoints"
    flushed_per_rank = run_ranks(root, mode)
    folder = root / "step-00000001"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    # DeepSpeed's model and optimizer shards, each rank's RNG state, the trainer state.
    assert len(manifest) == 6, manifest
    flushed = {_final_name(p) for paths in flushed_per_rank for p in paths}
    assert set(manifest) <= flushed, f"listed in the manifest but never fsync'd: {sorted(set(manifest) - flushed)}"
    assert not [p.name for p in folder.iterdir() if TEMP.match(p.name)]
    assert (root / "latest").read_text().strip() == folder.name


def test_a_failed_background_write_stops_every_rank_naming_the_folder(tmp_path):
    root = tmp_path / "checkpoints"
    errors = run_ranks(root, "disk-full")
    folder = root / "step-00000001"
    assert errors[0] == f"{folder}: writing the checkpoint failed on another rank"
    assert errors[1].startswith(f"{folder}: writing the checkpoint failed on rank 1: OSError: ")
    assert "No space left on device" in errors[1]
    assert not (folder / "manifest.json").exists() and not (root / "latest").exists()
