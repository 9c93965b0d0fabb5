"""benchmarks/gpu_suite.sh --cpu-smoke: every section of the GPU suite, tiny and on the CPU, so a
GPU window is never lost to a bug in the script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_every_section_runs_and_the_summary_is_written(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    loops = ["trainer none", "trainer blocks", "bare compiled", "timm compiled"]
    assert [(r["recipe"], r["loop"]) for r in rows] == [
        (f"{recipe} (smoke)", loop) for recipe in ("vit_b16_in21k", "vit_h14_in21k") for loop in loops
    ]
    for r in rows:
        assert r["images_per_s"] > 0 and r["steps"] == 2, r
        if r["loop"].startswith("trainer"):
            assert r["host_syncs"] == {} and "deepspeed 0.19.8: vitscale's" in r["deepspeed"], r
    summary = (tmp_path / "summary.md").read_text()
    assert len(summary.splitlines()) == len(rows) + 2 and "| vit_h14_in21k (smoke) | bare compiled |" in summary
    assert "done: 8 results, 0 failed" in p.stdout
