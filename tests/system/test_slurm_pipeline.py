"""`vit-submit pipeline` on the local two-node cluster: convert as a job array, merge,
2-node pretraining, fine-tuning, each after the previous (afterok); the results equal the
same stages run by hand (one convert process, torchrun with 2 ranks)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FINETUNE_DEMO = REPO / "configs" / "finetune" / "demo.yaml"
FT_STEPS = 20
TINY_MODEL = ["model.depth=2", "model.width=32", "model.heads=2", "model.mlp_dim=64"]
TINY_FINETUNE = [
    *TINY_MODEL,
    f"train.steps={FT_STEPS}",
    "train.batch_size=16",
    "train.log_every=1",
    "train.optim.warmup_steps=3",
    "checkpoint.every=10",
    "checkpoint.keep=1",
    "data.workers=0",
    "eval.every=0",
    "eval.fewshot_shots=[]",
]
SLURM = ["slurm.nodes=2", "slurm.cpus_per_task=1", 'slurm.time="10:00"']


def dataset_files(root: Path) -> dict[str, bytes]:
    # provenance.json records how the work was split and when: the one file that may differ.
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }


@pytest.fixture(scope="module")
def finetune_by_hand(runs, digits_shards, pretrain_by_hand, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finetune_by_hand") / "run"
    runs.torchrun(
        "pretrain.finetune",
        str(FINETUNE_DEMO),
        f"data.path={digits_shards}",
        f"run.dir={run}",
        f"init.weights={pretrain_by_hand}",
        *TINY_FINETUNE,
    )
    return run


def test_pipeline_runs_every_stage_like_by_hand(
    slurm_cluster, runs, digits_shards, pretrain_by_hand, finetune_by_hand, tmp_path
):
    work = tmp_path / "work"
    pipeline = {
        "vars": {"work": str(work)},
        "stages": [
            # Both array tasks at once, writing into one output folder: a starting task removes
            # only the temp files of dead writers, never those of a sibling still running.
            {
                "stage": "prep",
                "configs": [str(REPO / "configs" / "prep" / "digits.yaml")],
                "overrides": ["output=${vars.work}/shards"],
            },
            {
                "stage": "pretrain",
                "configs": [str(runs.pretrain_demo)],
                "overrides": [
                    "data.path=${vars.work}/shards",
                    "run.dir=${vars.work}/pretrain",
                    *runs.tiny_pretrain,
                    *SLURM,
                ],
            },
            {
                "stage": "finetune",
                "configs": [str(FINETUNE_DEMO)],
                "overrides": [
                    "data.path=${vars.work}/shards",
                    "run.dir=${vars.work}/finetune",
                    "init.weights=${vars.work}/pretrain",
                    *TINY_FINETUNE,
                    *SLURM,
                ],
            },
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    p = subprocess.run(
        [str(runs.bin / "vit-submit"), "pipeline", str(tmp_path / "pipeline.yaml")], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    jobs = dict(re.findall(r"submitted (\S+): job (\d+)", p.stdout))
    assert list(jobs) == [
        "vit-prep-shards-convert",
        "vit-prep-shards-merge",
        "vit-pretrain-pretrain",
        "vit-finetune-finetune",
    ]
    ids = list(jobs.values())
    for earlier, later in zip(ids, ids[1:]):
        dependency = slurm_cluster.job(later)["Dependency"]  # "(null)" once satisfied
        assert dependency.startswith(f"afterok:{earlier}") or dependency == "(null)", dependency
    slurm_cluster.wait_state(ids[-1], {"COMPLETED"}, timeout=300)
    convert = slurm_cluster.run("scontrol", "-o", "show", "job", ids[0])
    assert convert.count("JobState=COMPLETED") == 2  # both array tasks

    assert dataset_files(work / "shards") == dataset_files(digits_shards)
    runs.assert_same_weights(
        runs.final_weights(work / "pretrain", runs.steps), runs.final_weights(pretrain_by_hand, runs.steps)
    )
    runs.assert_same_weights(
        runs.final_weights(work / "finetune", FT_STEPS), runs.final_weights(finetune_by_hand, FT_STEPS)
    )
    results = json.loads((work / "finetune" / "results.json").read_text())["results"]
    assert results == json.loads((finetune_by_hand / "results.json").read_text())["results"]

    status = subprocess.run(
        [str(runs.bin / "vit-submit"), "status", str(work / "pretrain")], capture_output=True, text=True, check=True
    ).stdout
    assert f"{ids[2]}  vit-pretrain-pretrain" in status and "COMPLETED" in status
    assert f"last_checkpoint=step-{runs.steps:08d}" in status and f"last_step={runs.steps}" in status
    prep_status = subprocess.run(
        [str(runs.bin / "vit-submit"), "status", str(work / "shards")], capture_output=True, text=True, check=True
    ).stdout
    assert prep_status.count("COMPLETED") == 3  # two array tasks and the merge
