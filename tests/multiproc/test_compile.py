"""`train.compile: blocks` over 2 CPU ranks: trains as eager does, resumes either way.

Most runs use the `aot_eager` backend (dynamo's tracing and autograd graphs, without
inductor's code generation, which costs a minute on this machine); one smoke run compiles
with inductor. Dropout is off, so compiled and eager runs compute the same steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from trainer_launch import launch, losses  # tests/multiproc/, on pytest's pythonpath

pytestmark = pytest.mark.slow

STEPS = 30
# end_lr = lr: a flat schedule after warm-up, so runs of different lengths take the same steps.
SAME = ["model.dropout=0.0", "checkpoint.every=10", "eval.every=0", "train.optim.end_lr=3e-3"]
AOT = ["train.compile=blocks", "train.compile_backend=aot_eager"]


@pytest.fixture(scope="module")
def shards(digits_shards) -> Path:
    return digits_shards


@pytest.fixture(scope="module")
def eager(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eager") / "run"
    launch(run, shards, *SAME, f"train.steps={STEPS}")
    return run


def assert_close_curves(run: Path, reference: Path, steps: range) -> None:
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert math.isfinite(got[step]) and got[step] == pytest.approx(want[step], rel=1e-3), step


def test_compiled_blocks_train_as_eager(eager, shards, tmp_path):
    run = tmp_path / "run"
    # With activation checkpointing too: it recomputes the compiled block in backward.
    log = launch(run, shards, *SAME, *AOT, "model.activation_checkpointing=true", f"train.steps={STEPS}")
    assert "compiling 2 transformer blocks in place (aot_eager)" in log
    assert "compiling the blocks included" in log  # the first step's time, logged once
    assert_close_curves(run, eager, range(1, STEPS + 1))


def test_resume_from_eager_into_compiled_and_back(eager, shards, tmp_path):
    run = tmp_path / "run"
    launch(run, shards, *SAME, "train.steps=10")
    log = launch(run, shards, *SAME, *AOT, "train.steps=20")
    assert "resuming from" in log and "compiling 2 transformer blocks" in log
    log = launch(run, shards, *SAME, f"train.steps={STEPS}")
    assert "resuming from" in log and "compiling" not in log
    assert_close_curves(run, eager, range(1, STEPS + 1))


def test_inductor_smoke(eager, shards, tmp_path):
    run = tmp_path / "run"
    log = launch(run, shards, *SAME, "train.compile=blocks", "train.steps=3")
    assert "compiling 2 transformer blocks in place (inductor)" in log
    assert_close_curves(run, eager, range(1, 4))


def test_zero3_refuses_compiled_blocks(shards, tmp_path):
    log = launch(tmp_path / "run", shards, "zero.stage=3", *AOT, ranks=1, expect=2)
    assert "train.compile: blocks needs zero.stage <= 2" in log
