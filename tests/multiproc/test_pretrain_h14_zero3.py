"""Scale: ViT-H/14 (632M parameters) with ZeRO-3 over 2 CPU processes in 22 GB.

3 steps, a checkpoint, then new processes resume it and take 2 more. Small images (28 px,
4 patches): parameter, gradient and optimizer memory are what is measured. The peak is the
largest sum of proportional set sizes (PSS: resident memory with each shared page split
among the processes sharing it, so DeepSpeed's shared-memory buffers and the libraries
count once) over the launcher and both ranks, sampled every 100 ms.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pretrain.checkpoint.checkpointer import Checkpointer, scan
from pretrain.train.run_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LIMIT_BYTES = 22 * 2**30

H14 = [
    # Every architecture field, since the demo recipe this starts from sets its own.
    "model.name=vit_h14",
    "model.patch_size=14",
    "model.width=1280",
    "model.depth=32",
    "model.heads=16",
    "model.mlp_dim=5120",
    "model.img_size=28",
    "model.num_classes=10",
    "model.representation_size=null",
    "model.dropout=0.0",
    "zero.stage=3",
    "zero.precision=bf16",
    "zero.reduce_bucket_size=20000000",
    "zero.allgather_bucket_size=20000000",
    "zero.prefetch_bucket_size=20000000",
    "zero.max_live_parameters=50000000",
    "zero.sub_group_size=50000000",
    "train.batch_size=4",
    "train.log_every=1",
    "train.optim.warmup_steps=2",
    "train.loss=sigmoid",
    "checkpoint.every=3",
    "checkpoint.keep=1",
    "data.workers=0",
    "data.shuffle_buffer=16",
    "eval.max_batches=1",
    "eval.batch_size=4",
    "eval.fewshot_shots=[]",
]


class PeakMemory:
    """Largest summed PSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except psutil.NoSuchProcess:
                pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, shards: Path, steps: int) -> tuple[int, float]:
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "pretrain.train",
        str(REPO / "configs/pretrain/demo.yaml"),
        f"data.path={shards}",
        f"run.dir={run_dir}",
        *H14,
        f"train.steps={steps}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with open(run_dir.parent / f"launch-{steps}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid) as mem:
            rc = proc.wait(timeout=480)
    assert rc == 0, (run_dir.parent / f"launch-{steps}.log").read_text()[-4000:]
    return mem.peak, time.monotonic() - t0


@pytest.fixture(scope="module")
def shards(digits_shards) -> Path:
    return digits_shards


@pytest.mark.slow
def test_vit_h14_zero3_two_cpu_ranks_fit_in_22gb(shards, tmp_path):
    run = tmp_path / "run"
    peak1, secs1 = launch(run, shards, steps=3)
    folder = scan(run / "checkpoints").newest
    assert folder is not None and Checkpointer.read_state(folder)["step"] == 3
    checkpoint_bytes = json.loads((folder / "manifest.json").read_text())["bytes"]
    peak2, secs2 = launch(run, shards, steps=5)
    assert Checkpointer.read_state(scan(run / "checkpoints").newest)["step"] == 5
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["last_loss"] == r["last_loss"] and abs(r["last_loss"]) < 1e4 for r in rows)  # finite
    gib = 2**30
    report = {
        "peak_gib_first": round(peak1 / gib, 2),
        "peak_gib_resume": round(peak2 / gib, 2),
        "seconds_first": round(secs1),
        "seconds_resume": round(secs2),
        "checkpoint_gib": round(checkpoint_bytes / gib, 2),
    }
    print("ViT-H/14 ZeRO-3 2 ranks:", report)
    assert report["checkpoint_gib"] > 6  # the whole H/14 training state was saved (bf16 + fp32 Adam)
    assert max(peak1, peak2) <= LIMIT_BYTES, report
