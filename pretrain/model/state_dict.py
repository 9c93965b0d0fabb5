"""Our state dicts: what a state dict says about the model it fits, and checked loading.

`load_weights(model, state_dict)` loads strictly and names every missing, unexpected and
mismatched key, resampling the position embedding when only the grid differs.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from pretrain.model.posemb import infer_grid_or_none, resample_posemb
from vitscale_common.errors import UserError

StateDict = dict[str, torch.Tensor]


def strip_wrappers(state_dict: StateDict) -> StateDict:
    """Drop the `module.` prefix that DataParallel/DeepSpeed wrappers add."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def count_indices(keys, pattern: str, first: int = 0) -> int:
    """How many consecutive ids `pattern` captures in `keys`, ids starting at `first`."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 - first if found else 0


def infer_model_fields(state_dict: StateDict) -> dict:
    """ViTConfig fields a state dict fixes (width, depth, patch, head, pooling, pos-emb layout);
    the number of heads is not recorded in a fused qkv and must come from the variant."""
    keys = state_dict.keys()
    proj = state_dict["patch_embed.proj.weight"]
    class_token = "cls_token" in state_dict
    fields = dict(
        width=proj.shape[0],
        depth=count_indices(keys, r"blocks\.(\d+)\."),
        mlp_dim=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        pool="token" if class_token else "gap",
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
        representation_size=state_dict["pre_logits.weight"].shape[0] if "pre_logits.weight" in state_dict else None,
        # big_vision: a class token but a square pos-emb (no class-token row)
        posemb_class_token=not (class_token and infer_grid_or_none(state_dict["pos_embed"].shape[1]) is not None),
    )
    stem = state_dict.get("patch_embed.backbone.stem.conv.weight")
    if stem is None:
        fields["patch_size"] = proj.shape[-1]
    else:  # hybrid: blocks per ResNet stage, stem width; tokens are the stride-2**(stages+1) feature map
        stages = count_indices(keys, r"patch_embed\.backbone\.stages\.(\d+)\.")
        fields["resnet_layers"] = [
            count_indices(keys, rf"patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\.") for s in range(stages)
        ]
        fields["resnet_width"] = stem.shape[0]
        fields["patch_size"] = 2 ** (stages + 1) * proj.shape[-1]
    return fields


def load_weights(
    model: torch.nn.Module,
    state_dict: StateDict,
    *,
    posemb_method: Optional[str] = "bicubic",
    skip_prefixes: Sequence[str] = (),
    source: str = "checkpoint",
    source_grid: Optional[Sequence[int]] = None,
) -> None:
    """Load `state_dict` into `model` strictly; raise one UserError naming every missing,
    unexpected or mismatched key. Keys under `skip_prefixes` (e.g. 'head.' before a head
    reset) are ignored on both sides. A `pos_embed` on another grid is resampled with
    `posemb_method` (None: treat it as a mismatch) from `source_grid` (default: square); a checkpoint pos-emb in the big_vision
    layout (no class-token row) loads into a model with one by adding a zero row, which is exact."""
    state_dict = strip_wrappers(state_dict)
    skip = lambda k: any(k.startswith(p) for p in skip_prefixes)
    own = {k: v for k, v in model.state_dict().items() if not skip(k)}
    incoming = {k: v for k, v in state_dict.items() if not skip(k)}
    if "pos_embed" in incoming and "pos_embed" in own:
        incoming["pos_embed"] = _fit_posemb(incoming["pos_embed"], model, posemb_method, source_grid)
    problems = [f"missing {k}" for k in own if k not in incoming]
    problems += [f"unexpected {k}" for k in incoming if k not in own]
    problems += [
        f"{k}: {source} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(incoming, strict=not skip_prefixes)


def _fit_posemb(
    posemb: torch.Tensor, model, method: Optional[str], source_grid: Optional[Sequence[int]]
) -> torch.Tensor:
    target = model.pos_embed
    # A grid of the same cell count (2x8 into 4x4) is a different grid all the same.
    same_grid = source_grid is None or tuple(source_grid) == tuple(model.grid_size)
    if (posemb.shape == target.shape and same_grid) or posemb.ndim != 3 or posemb.shape[-1] != target.shape[-1]:
        return posemb
    prefix = model.num_prefix_tokens if model.cfg.posemb_class_token else 0
    rows = posemb.shape[1]
    # Which layout: with a known source grid, count rows; else a square count means no class-token row.
    no_prefix_row = rows == source_grid[0] * source_grid[1] if source_grid else infer_grid_or_none(rows) is not None
    if model.num_prefix_tokens and not prefix and not no_prefix_row:
        raise UserError(
            "checkpoint pos_embed has a class-token row; build the model with model.posemb_class_token=true"
        )
    if prefix and no_prefix_row:  # big_vision layout into a model with a class-token row
        posemb = torch.cat([posemb.new_zeros(1, prefix, posemb.shape[-1]), posemb], dim=1)
    if method is None or (posemb.shape == target.shape and same_grid):
        return posemb
    return resample_posemb(posemb, model.grid_size, num_prefix_tokens=prefix, method=method, old_grid=source_grid)
