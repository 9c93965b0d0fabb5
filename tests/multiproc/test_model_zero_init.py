"""The JAX-style initialisation survives building the model partitioned under deepspeed.zero.Init.

ZeRO-3 shards each module's parameters as soon as its `__init__` returns, so an init
applied afterwards by a parent (timm's `named_apply` style) would write into empty
shards and leave PyTorch's default init in place. Two real gloo ranks build the model
partitioned, gather it and check the values.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, math, os, sys
import deepspeed, torch
from pretrain.runtime import distributed
from pretrain.model import create_model

deepspeed.init_distributed(dist_backend="gloo")
ds_config = {"train_batch_size": 2, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.float32):
    model = create_model("vit_s16", img_size=32, depth=2, num_classes=10, head_bias_init=-10.0, representation_size=64)
params = dict(model.named_parameters())
partitioned = all(p.numel() == 0 for p in params.values())  # data lives in shards, not in .data
with deepspeed.zero.GatheredParameters(list(params.values())):
    D = model.cfg.width
    qkv = params["blocks.0.attn.qkv.weight"]
    stats = {
        "partitioned": partitioned,
        "head_weight_absmax": params["head.weight"].abs().max().item(),
        "head_bias": sorted(set(params["head.bias"].tolist())),
        "cls_absmax": params["cls_token"].abs().max().item(),
        "pos_std": params["pos_embed"].std().item(),
        "qkv_absmax_over_bound": qkv.abs().max().item() / math.sqrt(6 / (2 * D)),
        "fc1_bias_std": params["blocks.1.mlp.fc1.bias"].std().item(),
        "proj_bias_absmax": params["blocks.1.attn.proj.bias"].abs().max().item(),
        "patch_std_times_sqrt_fan_in": params["patch_embed.proj.weight"].std().item() * math.sqrt(3 * 16 * 16),
    }
if torch.distributed.get_rank() == 0:
    print("STATS " + json.dumps(stats), flush=True)
distributed.shutdown()  # leave the group before exit, as the training stages do
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_jax_init_holds_under_zero3_partitioned_construction(tmp_path):
    script = tmp_path / "build_zero3.py"
    script.write_text(SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", f"--master_port={_free_port()}", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("STATS "))
    stats = json.loads(line[len("STATS ") :])
    assert stats["partitioned"]
    assert stats["head_weight_absmax"] == 0.0 and stats["head_bias"] == [-10.0]
    assert stats["cls_absmax"] == 0.0
    assert abs(stats["pos_std"] - 0.02) < 0.003
    assert 0.98 < stats["qkv_absmax_over_bound"] <= 1.0  # xavier per q/k/v block, not torch's kaiming default
    assert 0 < stats["fc1_bias_std"] < 1e-5
    assert stats["proj_bias_absmax"] == 0.0
    assert abs(stats["patch_std_times_sqrt_fan_in"] - 1.0) < 0.05  # lecun normal
