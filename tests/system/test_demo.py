"""The embedded demo end to end: interrupted with Ctrl-C, then rerun to completion.

The full demo (60 + 15 epochs) is the `make demo` command's job; here every stage runs
for real with fewer epochs, and the interrupted first attempt must leave nothing that the
rerun trips over.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

QUICK = ["--pretrain", "train.epochs=8", "checkpoint.every=20", "--finetune", "train.epochs=3"]


def demo(out, *extra, **kw):
    cmd = [sys.executable, "-m", "pretrain.demo", "--out", str(out), *QUICK, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw
    )


def interrupt_during_pretraining(out, proc, rng):
    """Ctrl-C (SIGINT to the whole process group, as a terminal does) once training has begun."""
    checkpoints = out / "pretrain" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "pretraining never wrote a checkpoint"
        time.sleep(0.5)
    time.sleep(rng.uniform(0.0, 3.0))
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    return proc.returncode


@pytest.mark.slow
def test_demo_survives_ctrl_c_and_finishes(tmp_path):
    out = tmp_path / "demo_out"
    first = demo(out)
    rc = interrupt_during_pretraining(out, first, random.Random(os.getpid()))
    assert rc != 0, "an interrupted demo must not report success"

    second = demo(out)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log[-4000:]

    # The rerun resumed pretraining instead of starting over.
    assert "resum" in log.lower(), log[-4000:]
    # Every reported result covers its whole split (digits: 179 val, 180 test images) and
    # lies in its range. 8 + 3 epochs is far from the full demo's (README), but a broken
    # pipeline stays near chance (0.1); interpolating the pos-emb without training costs
    # accuracy, it does not destroy it.
    finetuned = json.loads((out / "finetune" / "results.json").read_text())["results"]
    assert {split: r["samples"] for split, r in finetuned.items()} == {"val": 179, "test": 180}
    pretrained = {res: json.loads(next((out / "eval").glob(f"*-test-{res}px.json")).read_text())["results"]
                  for res in (16, 32)}  # fmt: skip
    assert [pretrained[res]["samples"] for res in (16, 32)] == [180, 180]
    ranges = {"pretrained": (pretrained[16]["top1"], 0.6), "interpolated": (pretrained[32]["top1"], 0.3),
              "fine-tuned": (finetuned["test"]["top1"], 0.6), "fine-tuned val": (finetuned["val"]["top1"], 0.6)}  # fmt: skip
    for name, (top1, low) in ranges.items():
        assert low <= top1 <= 1.0, f"{name} top-1 {top1} outside [{low}, 1]\n{log[-3000:]}"
    for top1 in (pretrained[16]["top1"], pretrained[32]["top1"], finetuned["test"]["top1"]):
        assert re.search(rf"\|\s+180\s+\|\s+{top1:.4f}\s+\|", log), log[-3000:]  # the summary table's row
    assert (out / "report" / "index.html").is_file()
    assert (out / "pretrain" / "config.yaml").is_file()
    assert not list(out.rglob(".*.tmp-*")), "temporary files left behind"
