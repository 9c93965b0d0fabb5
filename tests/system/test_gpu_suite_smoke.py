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
    fed = ["trainer blocks", "trainer blocks, shards (gpu decode)"]  # the feed section: one engine, two feeds
    b16, h14 = "vit_b16_in21k (smoke)", "vit_h14_in21k (smoke)"
    assert [(r["recipe"], r["loop"]) for r in rows] == (
        [(b16, loop) for loop in loops + fed] + [(h14, loop) for loop in loops]
    )
    for r in rows:
        assert r["images_per_s"] > 0 and r["steps"] == 2, r
        if r["loop"].startswith("trainer"):
            assert r["host_syncs"] == {} and "deepspeed 0.19.8: vitscale's" in r["deepspeed"], r
    fed_row = rows[5]
    assert fed_row["vs_synthetic_same_run"] > 0 and fed_row["loader_cores"] >= 0 and fed_row["data_counters"] == {}
    loader = json.loads((tmp_path / "loader.json").read_text())
    assert set(loader["paths"]) >= {"ours cpu, 2 workers", "webdataset, 2 workers", "ours gpu, readers' side"}
    assert all(v["images_per_cpu_s"] > 0 for v in loader["paths"].values())
    summary = (tmp_path / "summary.md").read_text()
    assert len(summary.splitlines()) == len(rows) + 2 and "| vit_h14_in21k (smoke) | bare compiled |" in summary
    assert "done: 10 results, 0 failed" in p.stdout
