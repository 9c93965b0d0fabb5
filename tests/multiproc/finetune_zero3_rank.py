"""One rank of the ZeRO-3 starting-weights check (run by test_finetune_zero3.py under torchrun).

The target model is built partitioned under `deepspeed.zero.Init`, as vit-finetune does at
zero.stage=3; after `fit_to_model` every rank must hold the source weights (pos-emb resampled)
and a zero head. Rank 1 is given a corrupted copy of the source, so only rank 0's load may win.
"""

import sys

import deepspeed
import torch
import torch.distributed as dist
from rank_report import report  # next to this script

from pretrain.checkpoint.starting_weights import Source, fit_to_model
from pretrain.model import build_model, create_model, model_config
from pretrain.model.posemb import resample_posemb
from pretrain.runtime import distributed


def main() -> int:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    arch = dict(patch_size=4, width=64, depth=2, heads=4, mlp_dim=128)
    torch.manual_seed(0)
    pre = create_model("vit_ti16", img_size=16, num_classes=10, **arch)
    state = {k: v.clone() for k, v in pre.state_dict().items()}
    expected = dict(state)
    if rank == 1:
        state = {k: torch.randn_like(v) for k, v in state.items()}
    cfg = model_config("vit_ti16", img_size=32, num_classes=7, **arch)
    # dtype from the config (fp32): DeepSpeed 0.19's explicit-dtype path picks bf16 on CPU.
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
        model = build_model(cfg)
    assert hasattr(model.blocks[0].attn.qkv.weight, "ds_id"), "model is not partitioned"
    fit = fit_to_model(Source("<source>", "export", state, pre.cfg), model)
    assert fit.grid == ((4, 4), (8, 8)), fit
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        got = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in expected.items():
        if k.startswith("head."):
            continue
        want = resample_posemb(v, (8, 8)) if k == "pos_embed" else v
        assert torch.equal(got[k], want), f"rank {rank}: {k} differs"
    assert got["head.weight"].shape == (7, 64) and not got["head.weight"].any()
    report(rank, {"loaded": True})
    distributed.shutdown()  # leave the group before exit, as the training stages do
    return 0


if __name__ == "__main__":
    sys.exit(main())
