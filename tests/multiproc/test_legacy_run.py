"""A run directory written by an earlier layout of the code resumes, and ends where it did.

`tests/fixtures/legacy_run` was cut from a 4-step run made by the code before `pretrain/`
became sub-packages (tests/fixtures/README.md): a checkpoint at step 2 and the weights the
uninterrupted run ended with at step 4. Resuming it with today's code must reach the same
weights, so neither a moved module nor a changed step has broken a run a user already holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
BIN = Path(sys.executable).parent
TINY = [
    "model.depth=1",
    "model.width=16",
    "model.heads=2",
    "model.mlp_dim=32",
    "train.steps=4",
    "train.batch_size=16",
    "train.log_every=1",
    "train.optim.warmup_steps=1",
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "data.workers=0",
    "eval.every=0",
    "eval.fewshot_shots=[]",
]


def test_legacy_run_resumes_to_the_weights_it_ended_with(tmp_path, digits_shards):
    shutil.copytree(FIXTURES / "legacy_run", tmp_path / "legacy_run")
    (tmp_path / "shards").symlink_to(digits_shards)  # the run's config names `shards`, relative
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pretrain.train",
        str(REPO / "configs" / "pretrain" / "demo.yaml"),
        "data.path=shards",
        "run.dir=legacy_run",
        *TINY,
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "resuming from legacy_run/checkpoints/step-00000002 (step 2" in p.stdout + p.stderr

    p = subprocess.run(
        [str(BIN / "vit-export"), "legacy_run", "--out", "step4.safetensors"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    got = load_file(tmp_path / "step4.safetensors")
    want = load_file(FIXTURES / "legacy_run_step4.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:  # float32 CPU arithmetic: low bits may differ on another processor
        g, w = got[name], want[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias's gradient is zero (softmax ignores a constant added to a row's logits),
            # so its entries are rounding noise that Adam scales to steps of up to the learning
            # rate: processors differ there by far more than float tolerance. They are held to
            # Adam's bound (the 4 steps' learning rates sum to 3.0e-3); the query and value
            # biases to float tolerance.
            q, k, v = g.chunk(3)
            wq, wk, wv = w.chunk(3)
            assert k.abs().max() < 3e-3 and wk.abs().max() < 3e-3, name
            g, w = torch.cat([q, v]), torch.cat([wq, wv])
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=name)
