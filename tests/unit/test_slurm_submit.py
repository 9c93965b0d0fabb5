"""vit-submit rendering: the sbatch layout for large runs, arrays, chains, containers, errors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from slurm.render import parse_sbatch_options
from slurm.submit import build_stage, main

REPO = Path(__file__).resolve().parents[2]


def write(path, text):
    path.write_text(text)
    return str(path)


def scripts(out: str) -> list[str]:
    """Split --dry-run output into the scripts it printed."""
    return [s for s in re.split(r"^# ---- .*\n", out, flags=re.M) if s.strip()]


@pytest.fixture
def h14(tmp_path):
    return write(
        tmp_path / "h14.yaml",
        f"""
run: {{dir: {tmp_path}/runs/h14}}
model: {{name: vit_h14}}
slurm: {{partition: gpu, time: "48:00:00", env: {{NCCL_DEBUG: WARN}}}}
""",
    )


def test_vit_h14_16_nodes_8_gpus_has_one_rank_per_gpu(capsys, tmp_path):
    run = tmp_path / "runs" / "h14"
    assert (
        main(
            [
                "pretrain",
                str(REPO / "configs/pretrain/vit_h14_in21k.yaml"),
                "data.path=/shards/in21k",
                f"run.dir={run}",
                "slurm.partition=gpu",
                "slurm.env={NCCL_DEBUG: WARN}",
                "--nodes",
                "16",
                "--gpus-per-node",
                "8",
                "--time",
                "48:00:00",
                "--dry-run",
            ]
        )
        == 0
    )
    [script] = scripts(capsys.readouterr().out)
    opts = parse_sbatch_options(script)
    assert opts["nodes"] == "16" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
    assert int(opts["nodes"]) * int(opts["ntasks-per-node"]) == 128  # one rank per GPU
    assert opts["partition"] == "gpu" and opts["time"] == "48:00:00"
    assert opts["signal"].startswith("B:USR1@") and "requeue" in opts
    assert opts["output"] == f"{run}/slurm/%x-%j.out"
    # srun inherits the 128-task layout (no -n/-N of its own) and runs the frozen config.
    [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
    assert not re.search(r"\s(-n|-N|--ntasks|--nodes)\b", srun)
    assert f"pretrain.train {run}/slurm/pretrain-config.yaml" in script
    assert "export NCCL_DEBUG=WARN" in script
    assert not run.exists()  # a dry run writes nothing
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_stage_configs_are_merged_and_frozen_into_one_file(tmp_path):
    """The job runs one file: the stage's configs and overrides merged (a requeue reruns it)."""
    run = tmp_path / "h14-518"
    stage, frozen = build_stage(
        "finetune",
        [REPO / "configs/finetune/imagenet1k_384.yaml", REPO / "configs/finetune/vit_h14_518.yaml"],
        ["data.path=/shards/in1k", "init.weights=/runs/h14", f"run.dir={run}", "slurm.nodes=8"],
    )
    [job] = stage.jobs
    assert job.name == "vit-finetune-h14-518" and job.command[-1] == str(run / "slurm" / "finetune-config.yaml")
    cfg = yaml.safe_load(frozen)
    assert cfg["model"]["img_size"] == 518 and cfg["init"]["weights"] == "/runs/h14"
    assert cfg["train"]["batch_size"] == 512 and cfg["slurm"]["nodes"] == 8 and "_base_" not in cfg


def test_cpu_job_runs_one_rank_per_node(h14, capsys):
    main(["pretrain", h14, "slurm.nodes=2", "--dry-run"])
    opts = parse_sbatch_options(capsys.readouterr().out)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "1" and "gpus-per-node" not in opts


def test_prep_is_an_array_followed_by_a_merge(tmp_path, capsys):
    cfg = write(
        tmp_path / "prep.yaml",
        f"""
output: {tmp_path}/in21k
slurm: {{array_tasks: 64, array_parallel: 16, cpus_per_task: 32}}
""",
    )
    main(["prep", cfg, "--dry-run"])
    convert, merge = scripts(capsys.readouterr().out)
    assert parse_sbatch_options(convert)["array"] == "0-63%16"
    assert "-m data_prep.cli convert --config " in convert
    assert "%x-%A_%a.out" in convert
    assert "array" not in parse_sbatch_options(merge) and f" merge {tmp_path}/in21k)" in merge


def test_pipeline_renders_every_stage_in_order(tmp_path, capsys):
    write(tmp_path / "pre.yaml", "run: {dir: unset}\n")
    write(tmp_path / "ft.yaml", "run: {dir: unset}\n")
    pipe = write(
        tmp_path / "pipe.yaml",
        """
vars: {work: /scratch/demo}
stages:
  - {stage: prep, overrides: ["source.kind=digits", "output=${vars.work}/data"]}  # no file: overrides only
  - {stage: pretrain, configs: [pre.yaml], overrides: ["run.dir=${vars.work}/pretrain", "data.path=${vars.work}/data"]}
  - {stage: finetune, configs: [ft.yaml], overrides: ["run.dir=${vars.work}/finetune"]}
""",
    )
    main(["pipeline", pipe, "vars.work=/scratch/x", "--nodes", "4", "--dry-run"])
    out = capsys.readouterr().out
    names = re.findall(r"^# ---- ([^\s:]+)", out, flags=re.M)
    assert names == ["vit-prep-data-convert", "vit-prep-data-merge", "vit-pretrain-pretrain", "vit-finetune-finetune"]
    prep, merge, pre, ft = scripts(out)
    assert "--output=/scratch/x/data.slurm/%x-%A_%a.out" in prep
    assert parse_sbatch_options(prep)["nodes"] == "1"  # --nodes is for the training stages
    assert parse_sbatch_options(pre)["nodes"] == "4" and parse_sbatch_options(ft)["nodes"] == "4"


def test_containers(h14, capsys):
    main(
        [
            "pretrain",
            h14,
            "slurm.container_runtime=pyxis",
            "slurm.container_image=nvcr.io/x/vit:1",
            "slurm.container_mounts=[/data:/data]",
            "slurm.python=python",
            "--dry-run",
        ]
    )
    [srun] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("srun ")]
    assert "--container-image=nvcr.io/x/vit:1" in srun and "--container-mounts=/data:/data" in srun
    main(
        [
            "pretrain",
            h14,
            "slurm.container_runtime=apptainer",
            "slurm.container_image=/img/vit.sif",
            "slurm.python=python",
            "--dry-run",
        ]
    )
    assert "STAGE_CMD=(apptainer exec --nv /img/vit.sif python -m pretrain.train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "override, message",
    [
        (["slurm.container_runtime=docker"], "slurm.container_runtime: must be one of none, pyxis, apptainer"),
        (["slurm.gpus=8"], "slurm.gpus"),
        (["slurm.nodes=two"], "slurm.nodes"),
        (["run.dir="], "`run.dir` must be set"),
        (["slurm.extra_sbatch=[exclusive]"], "slurm.extra_sbatch"),
        (["slurm.time=48:00:00"], "slurm.time: '172800' is not a limit like"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(h14, capsys, override, message):
    assert main(["pretrain", h14, *override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_demo_pipeline_config_renders(capsys):
    assert main(["pipeline", str(REPO / "configs/pipeline/demo.yaml"), "vars.work=/scratch/demo", "--dry-run"]) == 0
    convert, merge, pre, ft = scripts(capsys.readouterr().out)
    assert parse_sbatch_options(convert)["array"] == "0-1"
    assert "merge /scratch/demo/shards)" in merge
    assert parse_sbatch_options(pre)["nodes"] == "2" and parse_sbatch_options(pre)["ntasks-per-node"] == "1"
    assert "pretrain.finetune /scratch/demo/finetune/slurm/finetune-config.yaml" in ft


def test_status_of_a_folder_never_submitted_is_one_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "no jobs.jsonl (was this run submitted with vit-submit?)" in capsys.readouterr().err
