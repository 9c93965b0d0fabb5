"""vit-export: a run's weights as one safetensors file plus the model config.

    vit-export RUN_DIR [--out FILE] [--step N] [--ema]

Reads the newest complete checkpoint (or step N) and consolidates DeepSpeed's ZeRO
partitions into full fp32 tensors (from the fp32 master copy, so a bf16 run exports its
full-precision weights). Writes FILE (default RUN_DIR/export/model.safetensors) with the
model config in its metadata and next to it as FILE.json. Keys are ours (timm's layout;
`pretrain.model.timm_format.to_timm` converts what differs), loadable by the fine-tune stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.checkpointer import Checkpointer, scan, tag_for
from vitscale_common.atomic import atomic_open, atomic_write_text
from vitscale_common.errors import UserError, cli_entry

CONFIG_KEY = "model_config"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's: module, and at stage 0 the optimizer


def find_checkpoint(run_dir: Path, step: int | None) -> Path:
    root = Path(run_dir) / "checkpoints"
    found = scan(root)
    if step is not None:
        folder = root / tag_for(step)
        if folder not in found.complete:
            raise UserError(f"{folder}: not a complete checkpoint (complete: {[p.name for p in found.complete]})")
        return folder
    if found.newest is None:
        raise UserError(f"{run_dir}: no complete checkpoint under {root}")
    return found.newest


def consolidated_state_dict(folder: Path, *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint folder (any ZeRO stage, any world size)."""
    state = Checkpointer.read_state(folder)
    if ema:
        if "ema" not in state:
            raise UserError(f"{folder}: this run kept no EMA weights (train.ema_decay was 0)")
        return {k: v.float().contiguous() for k, v in state["ema"].items()}
    optimizer_files = _optimizer_files(folder)
    if not optimizer_files:  # stage 0 (fp32 only): the module's own weights are the master copy
        return {k: v.float().contiguous() for k, v in _load(folder / MODEL_STATES)["module"].items()}
    if _is_bf16_optimizer(optimizer_files[0]):
        return _bf16_optimizer_weights(folder, optimizer_files)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed's reader unpickles; these are files our own trainer wrote, never foreign input.
    sd = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _optimizer_files(folder: Path) -> list[Path]:
    """The ranks' ZeRO optimizer files, in rank order (`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`)."""

    def rank_of(path: Path) -> int:
        return int(path.name.split("zero_pp_rank_")[1].split("_")[0])

    files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=rank_of)
    if [rank_of(f) for f in files] != list(range(len(files))):
        raise UserError(
            f"{folder}: optimizer files of ranks {[rank_of(f) for f in files]}, expected 0..{len(files) - 1}"
        )
    return files


def _load(path: Path) -> dict:
    # Our own files (see above); mmap leaves a large model's Adam moments on disk.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _is_bf16_optimizer(optimizer_file: Path) -> bool:
    """ZeRO-1 under bf16 with fp32 gradients runs DeepSpeed's BF16_Optimizer, whose files
    DeepSpeed's zero_to_fp32 refuses ("not a zero checkpoint"): unlike ZeRO's, they carry no
    stage. (Every bf16 run's files are named bf16_*, so the name does not tell.)"""
    return "zero_stage" not in _load(optimizer_file)["optimizer_state_dict"]


def _bf16_optimizer_weights(folder: Path, optimizer_files: list[Path]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a BF16_Optimizer checkpoint, and any frozen weights. Its
    layout is ZeRO-1's: each parameter group flattened in order, padded at the end, and cut
    into equal rank slices."""
    states = [_load(f)["optimizer_state_dict"] for f in optimizer_files]
    model_states = _load(folder / MODEL_STATES)
    weights = {k: v.float().clone() for k, v in (model_states.get("frozen_param_fragments") or {}).items()}
    for group, group_shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([state["single_partition_of_fp32_groups"][group] for state in states])
        offset = 0
        for name, shape in group_shapes.items():
            weights[name] = flat[offset : offset + shape.numel()].view(shape).float().clone()
            offset += shape.numel()
        if flat.numel() - offset != states[-1]["group_paddings"][group]:
            raise UserError(f"{folder}: parameter group {group} holds {flat.numel()} values, its parameters {offset}")
    return weights


def export(run_dir: Path, out: Path | None = None, *, step: int | None = None, ema: bool = False) -> Path:
    from safetensors.torch import save

    folder = find_checkpoint(run_dir, step)
    model_cfg = Checkpointer.read_state(folder)["config"]["model"]
    weights = consolidated_state_dict(folder, ema=ema)
    out = Path(out) if out else Path(run_dir) / "export" / "model.safetensors"
    meta = {CONFIG_KEY: json.dumps(model_cfg), "source": folder.name, "ema": str(ema).lower()}
    with atomic_open(out) as f:
        f.write(save(weights, metadata=meta))
    atomic_write_text(out.with_suffix(".json"), json.dumps(model_cfg, indent=1) + "\n")
    return out


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, model config dict) of an exported file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such export")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_KEY not in meta:
        raise UserError(f"{path}: no {CONFIG_KEY} in the safetensors metadata (not written by vit-export)")
    return weights, json.loads(meta[CONFIG_KEY])


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vit-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="run directory written by vit-pretrain or vit-finetune")
    p.add_argument("--out", type=Path, help="output .safetensors (default RUN_DIR/export/model.safetensors)")
    p.add_argument("--step", type=int, help="export this step's checkpoint instead of the newest")
    p.add_argument("--ema", action="store_true", help="export the EMA (Polyak-averaged) weights")
    args = p.parse_args(argv)
    out = export(args.run_dir, args.out, step=args.step, ema=args.ema)
    weights, cfg = load_export(out)
    n = sum(t.numel() for t in weights.values())
    print(
        f"exported {len(weights)} tensors ({n:,} parameters, model {cfg.get('name')}) to {out} (+ {out.with_suffix('.json').name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
