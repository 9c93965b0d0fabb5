"""Where a process sits in the job, from the launcher's environment; and the trainer's small pure parts."""

from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint.checkpointer import fingerprint_diff
from pretrain.runtime import distributed
from pretrain.runtime.signals import StopRequest
from pretrain.train.config import RESUMABLE_CHANGES, derive, load_pretrain_config
from pretrain.train.loop import TrainConfig, loss_fn
from pretrain.zero.engine import ZeroConfig, deepspeed_config
from pretrain.zero.optimizer import OptimConfig, WarmupDecay
from vitscale_common.config_loader import ConfigError
from vitscale_common.errors import UserError


@pytest.fixture
def slurm_conf(tmp_path, monkeypatch):
    """A minimal slurm.conf: enough for `scontrol show hostnames`, which only expands names."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


def test_torchrun_variables_come_first():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29501",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_NTASKS": "2",
    }
    d = distributed.detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port, d.launcher) == (
        3,
        1,
        8,
        "n1",
        29501,
        "torchrun",
    )


def test_srun_uses_step_tasks_not_job_tasks_and_first_node(slurm_conf):
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "6",
        "SLURM_NTASKS": "64",
        "SLURM_STEP_NODELIST": "localhost,node[2-3]",
        "SLURM_JOB_NODELIST": "other[1-9]",
        "SLURM_JOB_ID": "123456",
    }
    d = distributed.detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 6, "srun")
    assert d.master_addr == "localhost"  # the first host of the step's list, resolvable as it is
    assert d.master_port == distributed.slurm_port("123456") == 20000 + 123456 % 20000


def test_batch_shell_is_not_mistaken_for_a_step():
    # sbatch's shell sees SLURM_NTASKS and SLURM_PROCID but no step task count: one plain process.
    d = distributed.detect({"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


def test_bad_rank_value_is_one_line_error():
    with pytest.raises(Exception, match="RANK='x'"):
        distributed.detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_schedule_warmup_then_linear_and_cosine_decay():
    lin = WarmupDecay(OptimConfig(lr=1e-3, warmup_steps=10, end_lr=1e-5, schedule="linear"), 110)
    assert lin(0) == pytest.approx(0.1) and lin(9) == pytest.approx(1.0)
    assert lin(60) == pytest.approx(1 + (0.01 - 1) * 0.5) and lin(110) == pytest.approx(0.01)
    cos = WarmupDecay(OptimConfig(lr=1e-3, warmup_steps=10, end_lr=0.0, schedule="cosine"), 110)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)


def test_sigmoid_loss_sums_classes_and_head_bias_minus_10_starts_small():
    logits = torch.full((4, 1000), -10.0)
    loss = loss_fn("sigmoid", 1000)(logits, torch.tensor([0, 1, 2, 3]))
    # one positive at p=sigmoid(-10) (~10 nats) + 999 negatives at ~4.5e-5 nats each
    assert loss.item() == pytest.approx(10.0 + 999 * 4.54e-5, rel=1e-3)
    soft = loss_fn("softmax", 3)(torch.zeros(2, 3), torch.tensor([0, 2]))
    assert soft.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_derived_batch_and_steps():
    d = derive(TrainConfig(epochs=2.5, batch_size=64, grad_accum=2), world_size=2, steps_per_epoch=22)
    assert (d.per_rank_batch, d.micro_batch, d.total_steps) == (32, 16, 55)
    with pytest.raises(ConfigError, match="train.batch_size"):
        derive(TrainConfig(steps=1, batch_size=30), world_size=4, steps_per_epoch=1)


def test_model_section_starts_from_the_registry_variant(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: vit_l16\n  num_classes: 10\n")
    cfg = load_pretrain_config([f], ["model.depth=2", "train.steps=1"])
    assert (cfg.model.width, cfg.model.depth, cfg.model.num_classes, cfg.model.patch_size) == (1024, 2, 10, 16)


def test_resume_fingerprint_allows_resources_but_not_recipe():
    saved = {"train": {"steps": 10, "optim": {"lr": 1e-3}}, "data": {"workers": 2, "path": "a"}, "zero": {"stage": 1}}
    now = {"train": {"steps": 20, "optim": {"lr": 2e-3}}, "data": {"workers": 8, "path": "a"}, "zero": {"stage": 2}}
    assert fingerprint_diff(saved, now, RESUMABLE_CHANGES) == ["train.optim.lr", "zero.stage"]


def test_bf16_gradients_accumulate_and_reduce_in_fp32_unless_asked():
    def ds(**zero):
        return deepspeed_config(ZeroConfig(**zero), global_batch=8, micro_batch=4, grad_accum=2, clip_grad=1.0)

    fp32_grads = ds(precision="bf16")
    assert fp32_grads["data_types"] == {"grad_accum_dtype": "fp32"} and fp32_grads["communication_data_type"] == "fp32"
    for plain in (ds(precision="bf16", grad_dtype="bf16"), ds(precision="fp32")):
        assert "data_types" not in plain and "communication_data_type" not in plain  # DeepSpeed's: the model's dtype
    with pytest.raises(ConfigError, match="zero.grad_dtype"):
        ds(precision="fp32", grad_dtype="bf16")
    with pytest.raises(ConfigError, match="zero.grad_dtype"):
        ds(precision="bf16", grad_dtype="fp16")
    for grad_dtype in ("fp32", "bf16"):  # DeepSpeed refuses the first; the second would start one Adam step ahead
        with pytest.raises(ConfigError, match="zero.precision: bf16 needs ZeRO stage 1-3"):
            ds(stage=0, precision="bf16", grad_dtype=grad_dtype)


def test_watchdog_ends_a_stalled_process_with_the_hang_code():
    import subprocess
    import sys

    from vitscale_common.exit_codes import EXIT_HUNG

    code = (
        "import time\nfrom pretrain.runtime.watchdog import Watchdog\n"
        "w = Watchdog(1.0, rank=3).start()\nw.beat(7)\ntime.sleep(30)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_HUNG  # requeued once by the job script, not like a saved checkpoint's 85
    assert "rank 3 made no progress" in p.stderr and "after step 7" in p.stderr


def test_stop_request_records_the_signal_until_asked():
    import os
    import signal

    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
    finally:
        stop.uninstall()


@pytest.mark.parametrize(
    "launch, env, visible, device",
    [
        ("torchrun", {"RANK": "11", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}, 8, 3),
        ("deepspeed launcher", {"RANK": "5", "LOCAL_RANK": "5", "WORLD_SIZE": "8"}, 8, 5),
        ("srun, node-wide GPUs", {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "16"}, 8, 5),
        ("srun, --gpus-per-task=1", {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_STEP_NUM_TASKS": "16"}, 1, 0),
        ("one process", {}, 1, 0),
        ("one process on the CPU", {}, 0, None),
    ],
)
def test_each_rank_takes_a_gpu_it_can_see(launch, env, visible, device):
    env = {**env, "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_STEP_NODELIST": "n[1-2]"}
    d = distributed.detect(env)
    assert distributed.device_index(d.local_rank, visible) == device, launch
    exported = distributed.exported_env(d, visible)
    # DeepSpeed sets its device from LOCAL_RANK: it must name a visible device.
    assert exported["LOCAL_RANK"] == str(d.local_rank if device is None else device), launch
    assert exported["RANK"] == str(d.rank) and exported["WORLD_SIZE"] == str(d.world_size)


def test_more_ranks_than_visible_gpus_is_refused():
    with pytest.raises(UserError, match="local rank 5 but only 4 GPUs are visible"):
        distributed.device_index(5, 4)
