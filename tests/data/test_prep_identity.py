"""Determinism of conversion: array tasks + merge, any worker count, and kill -9 + rerun
all give the bytes of one uninterrupted single-node run (provenance.json aside)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.cli import main as prep_main

ARGS = ["--source", "digits", "--samples-per-shard", "16", "--seed", "3"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("identity") / "clean"
    assert prep_main(["convert", *ARGS, "--output", str(out), "--workers", "1"]) == 0
    return tree_bytes(out)


def test_clean_run_has_the_expected_files(clean):
    assert "dataset.json" in clean and "index/shards.parquet" in clean and "_info.json" in clean
    assert sum(name.startswith("shards/train-") for name in clean) == 90
    assert not any(name.startswith("_work") or ".tmp-" in name for name in clean)


@pytest.mark.slow
@pytest.mark.parametrize("num_tasks,workers", [(2, 2)])  # 3 tasks x 1 worker: the concurrent test
def test_array_tasks_then_merge_equal_one_node(clean, tmp_path, num_tasks, workers):
    out = tmp_path / "tasks"
    # Tasks run in a scrambled order, as a SLURM array would.
    for index in reversed(range(num_tasks)):
        assert (
            prep_main(
                [
                    "convert",
                    *ARGS,
                    "--output",
                    str(out),
                    "--workers",
                    str(workers),
                    "--num-tasks",
                    str(num_tasks),
                    "--task-index",
                    str(index),
                ]
            )
            == 0
        )
        assert not (out / "dataset.json").exists()
    assert prep_main(["merge", str(out)]) == 0
    assert tree_bytes(out) == clean


@pytest.mark.slow
def test_array_tasks_running_at_the_same_time_share_the_folder_safely(clean, tmp_path):
    out = tmp_path / "concurrent"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_ARRAY_TASK_COUNT": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "data_prep.cli", "convert", *ARGS, "--output", str(out)],
            env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert prep_main(["merge", str(out)]) == 0
    assert tree_bytes(out) == clean


def test_plan_only_writes_the_shared_listing_and_plan(tmp_path):
    out = tmp_path / "planned"
    assert prep_main(["convert", *ARGS, "--output", str(out), "--plan-only"]) == 0
    assert sorted(p.name for p in (out / "_work").iterdir()) == ["listing.arrow", "listing.json", "plan.json"]
    assert list((out / "shards").iterdir()) == []


def test_merge_before_all_tasks_finish_is_refused(tmp_path, capsys):
    out = tmp_path / "partial"
    assert prep_main(["convert", *ARGS, "--output", str(out), "--num-tasks", "4", "--task-index", "1"]) == 0
    assert prep_main(["merge", str(out)]) == 2
    assert "85 of 114 shards are not converted yet" in capsys.readouterr().err


def test_slurm_array_environment_picks_the_task(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    out = tmp_path / "env"
    assert prep_main(["convert", *ARGS, "--output", str(out)]) == 0
    done = sorted(p.name for p in (out / "_work").glob("*.done.json"))
    # Task index 2 of 5 takes every fifth shard of the plan (train, val, test) from the third.
    assert done[:3] == ["test-000000.done.json", "test-000005.done.json", "test-000010.done.json"]
    assert len(done) == 23 and "train-000002.done.json" in done


def _done(out: Path) -> int:
    return len(list((out / "_work").glob("*.done.json")))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_is_byte_identical(clean, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep.cli", "convert", *ARGS, "--output", str(out), "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    total = sum(1 for name in clean if name.startswith("shards/") and name.endswith(".tar"))
    kills = 0
    for _ in range(4):
        # Kill after a random amount of progress (counted in finished shards) plus a random
        # delay, so the kill lands anywhere: listing, mid-shard, between files. Progress, not
        # time, decides the kill point, and it stops 25 shards short of the end (the delay adds
        # at most a few on a fast machine), so a run never finishes before it is killed.
        target = min(_done(out) + rng.randint(3, 25), total - 25)
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and _done(out) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the converter and its workers, mid-write
            kills += 1
        proc.wait()
    assert kills == 4, "a run ended before it could be killed"
    done_before = _done(out)
    final = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert done_before > 0 and f"({done_before} already done)" in final.stderr  # reruns redo only the rest
    assert tree_bytes(out) == clean


def test_a_dying_worker_fails_the_run_clearly_and_a_rerun_finishes(tmp_path, capsys):
    from data_prep.sources import register_source
    from data_prep.sources.digits import DigitsSource

    marker = tmp_path / "died-once"

    @register_source("test_dies_once")
    class DiesOnce(DigitsSource):
        def read(self, item):
            if item["row"] == 100 and not marker.exists():
                marker.touch()
                os._exit(3)  # as a decoder segfault or the OOM killer would end it
            return super().read(item)

    out = tmp_path / "out"
    args = [
        "convert",
        "--source",
        "test_dies_once",
        "--output",
        str(out),
        "--samples-per-shard",
        "200",
        "--workers",
        "2",
    ]
    assert prep_main(args) == 2
    assert "a convert worker died" in capsys.readouterr().err
    assert prep_main(args) == 0
    assert (out / "dataset.json").exists() and marker.exists()
