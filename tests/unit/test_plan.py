"""vit-plan's arithmetic against what torch and DeepSpeed count, and its verdicts
(pretrain/plan/, docs/SCALE.md). The model states against a real engine:
tests/multiproc/test_plan_memory.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pretrain.model import create_model, model_config
from pretrain.model.flops import backward_flops, forward_flops, tokens
from pretrain.model.vit import Block
from pretrain.plan import Cluster, make_plan
from pretrain.plan.activations import block_bytes
from pretrain.plan.model_states import model_shape, model_states
from pretrain.zero.comm_bytes import step_bytes, wire_bytes
from pretrain.zero.engine import ZeroConfig

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "configs" / "pretrain"
BIN = Path(sys.executable).parent


def test_flops_equal_torch_flop_counter():
    """ViT-S/16 at 224 px with a pre-logits layer: the linear and patch products equal what
    flop_counter counts on the CPU (where it does not see the fused attention), and the
    attention equals flop_counter's own formula for scaled_dot_product_attention."""
    cfg = model_config("vit_s16", representation_size=384, num_classes=11)
    model = create_model("vit_s16", representation_size=384, num_classes=11)
    x = torch.randn(1, 3, 224, 224)
    with FlopCounterMode(display=False) as fwd_count:
        loss = model(x).sum()
    with FlopCounterMode(display=False) as bwd_count:
        loss.backward()
    fwd, bwd = forward_flops(cfg), backward_flops(cfg)
    assert fwd.patch + fwd.linear == fwd_count.get_total_flops()
    assert bwd.patch + bwd.linear == bwd_count.get_total_flops()
    q = (1, cfg.heads, tokens(cfg), cfg.width // cfg.heads)
    assert fwd.attention == cfg.depth * sdpa_flop_count(q, q, q)
    assert bwd.attention == cfg.depth * sdpa_backward_flop_count(q, q, q, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_activation_bytes_per_block_equal_the_saved_tensors(dtype, dropout, checkpointed):
    """Every tensor one block saves for backward (weights left out), as
    torch.autograd.graph.saved_tensors_hooks sees it, with and without checkpointing."""
    cfg = model_config("vit_s16", img_size=64, dropout=dropout)
    block = Block(cfg.width, cfg.heads, cfg.mlp_dim, dropout=dropout).to(dtype).train()
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(3, tokens(cfg), cfg.width, dtype=dtype, requires_grad=True)
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
    elem = torch.empty((), dtype=dtype).element_size()
    # The CPU keeps LayerNorm statistics in the activations' dtype (CUDA: fp32).
    assert sum(saved.values()) == block_bytes(cfg, 3, elem, elem, checkpointed)


def _shape(name: str):
    return model_shape(model_config(name), weight_decay=0.1)


def test_model_states_equal_deepspeed_estimator_where_it_counts_the_same():
    """DeepSpeed's estimators (no offload) count, per parameter: bf16 weights whole (ZeRO-2) or
    partitioned (ZeRO-3), and per partition element 18 bytes: at ZeRO-2 bf16 and fp32
    gradients, fp32 master and Adam's moments; at ZeRO-3 the bf16 weights, fp32 gradients,
    master and moments. Ours hold no bf16 gradient at ZeRO-2 (fp32 gradients only) and, at
    ZeRO-3, persistent parameters whole and gathered ones in place of its 4 x largest layer;
    those left out, the figures are equal, over DeepSpeed's padded element counts."""
    shape = _shape("vit_b16")
    for world in (8, 64):
        zero2 = model_states(shape, ZeroConfig(stage=2, precision="bf16", grad_dtype="fp32"), world)
        padded = zero2.parameters // 2
        _, ds_gpu = estimate_zero2_model_states_mem_needs(padded, num_gpus_per_node=world, cpu_offload=False)
        bf16_grad_partition = 2 * padded // world
        assert zero2.parameters + zero2.gradients + zero2.master + zero2.optimizer == ds_gpu - bf16_grad_partition

        zero = ZeroConfig(stage=3, precision="bf16", grad_dtype="fp32")
        zero3 = model_states(shape, zero, world)
        part = sum(math.ceil(n / world) for n in shape.params)
        persistent = sum(math.ceil(n / world) * world for n in shape.params if n < zero.param_persistence_threshold)
        largest = max(shape.params)
        _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            part * world, largest, num_gpus_per_node=world, cpu_offload=False
        )
        ours = zero3.parameters - 2 * persistent + zero3.gradients + zero3.master + zero3.optimizer
        assert ours == ds_gpu - 4 * largest


def test_communication_is_the_ring_over_the_slowest_link():
    """Across nodes every ring crosses the network: the time on the wire is comm_bytes' payload
    x 2(W-1)/W (all-reduce) or (W-1)/W over each GPU's network share."""
    plan = make_plan([RECIPES / "vit_b16_in21k.yaml"], cluster=Cluster(4, 8, "h100"))
    cfg, world = plan.cfg, 32
    payload = step_bytes([sum(g) for g in _shape_of(plan).groups], _shape_of(plan).params, stage=1,
                         precision="bf16", grad_dtype="fp32", world=world)  # fmt: skip
    reduce = 2 * (world - 1) / world * payload["all_reduce float32"]
    bandwidth = plan.gpu.network_gbs * plan.assume.comm_efficiency * 1e9
    assert plan.configured.time.reduce_s == pytest.approx(reduce / bandwidth, rel=1e-9)
    assert plan.configured.time.sent_bytes == wire_bytes(payload, world)
    assert cfg.zero.stage == 1 and plan.configured.time.exposed_comm_s == pytest.approx(
        plan.configured.time.reduce_s + plan.configured.time.gather_s  # the bf16 optimizer reduces after backward
    )


def _shape_of(plan):
    return model_shape(plan.cfg.model, plan.cfg.train.optim.weight_decay)


def test_a_plan_that_fits_and_one_that_does_not():
    fits = make_plan([RECIPES / "vit_h14_jft.yaml"], cluster=Cluster(32, 8, "h100"), train_samples=303_000_000)
    assert fits.fits() and fits.refusal() is None
    assert fits.total_steps == 14 * (303_000_000 // 4096)
    assert fits.days == pytest.approx(
        fits.total_steps * fits.configured.time.step_s / (1 - fits.checkpoint.fraction) / 86400
    )
    assert "vit_h14 on 256 x h100" in fits.summary()
    one_gpu = make_plan([RECIPES / "vit_h14_jft.yaml"], cluster=Cluster(1, 8, "h100"))
    assert not one_gpu.fits()
    refusal = one_gpu.refusal()
    assert "activations, 32 blocks alone" in refusal and "\n" not in refusal
    assert one_gpu.recommended is not None and one_gpu.fits(one_gpu.recommended)
    assert one_gpu.recommended.micro_batch * one_gpu.recommended.grad_accum == 4096 // 8


def test_a_world_size_the_stream_cannot_take_is_warned():
    plan = make_plan([RECIPES / "vit_b16_in21k.yaml"], ["train.batch_size=8192"], cluster=Cluster(256, 8, "h100"))
    assert any("cannot take this world size" in w and "2048" in w for w in plan.warnings), plan.warnings


def test_mfu_is_calibrated_from_gpu_suite_results(tmp_path):
    row = {"recipe": "vit_b16_in21k", "loop": "trainer blocks", "device": "NVIDIA H100 80GB HBM3", "batch": 128,
           "mfu": 0.30, "images_per_s": 1.0}  # fmt: skip
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(row) + "\n")
    plan = make_plan([RECIPES / "vit_h14_jft.yaml"], cluster=Cluster(32, 8, "h100"), calibration=results)
    b16 = model_config("vit_b16", representation_size=768, num_classes=21843)
    exact = (forward_flops(b16).total + backward_flops(b16).total) / (3 * forward_flops(b16).total)
    assert plan.calibration.mfu == pytest.approx(0.30 * exact)


def _submit(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "vit-submit"), "pretrain", str(RECIPES / "vit_h14_jft.yaml"), f"run.dir={tmp_path / 'run'}",
           "data.path=/data/none", *args, "--dry-run"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_vit_submit_refuses_a_gpu_config_that_cannot_fit(tmp_path):
    refused = _submit("slurm.gpu=h100", "--nodes", "1", tmp_path=tmp_path)
    assert refused.returncode == 2, refused.stderr
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: vit_h14 does not fit a h100"), refused.stderr
    assert "activations, 32 blocks alone" in error[0] and "#SBATCH" not in refused.stdout
    forced = _submit("slurm.gpu=h100", "--nodes", "1", "--force", tmp_path=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "plan: vit_h14 on 8 x h100" in forced.stdout and "DOES NOT FIT" in forced.stdout
    cpu = _submit("slurm.gpu=h100", "slurm.gpus_per_node=0", "--nodes", "1", tmp_path=tmp_path)
    assert cpu.returncode == 0 and "plan:" not in cpu.stdout, cpu.stderr
