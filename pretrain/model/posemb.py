"""Resampling learned position embeddings to a new patch grid (paper section 3.2).

Fine-tuning at a higher resolution keeps the patch size, so the sequence gets longer and
the pre-trained position embeddings lose their meaning; the paper interpolates them in 2D
according to their location in the original image. The class (prefix) token rows are
kept as they are.

Methods, since codebases disagree (REFERENCES.md, timm PR 750):
  * 'bicubic': bicubic with antialiasing, as timm's `resample_abs_pos_embed` and OpenCLIP.
  * 'bicubic_no_antialias': bicubic without antialiasing, as MAE and DeiT.
  * 'linear': the official JAX code (vision_transformer, big_vision):
    `scipy.ndimage.zoom(grid, (h'/h, w'/w, 1), order=1)`, i.e. bilinear on a grid whose
    corner samples stay at the corners (align_corners=True).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vitscale_common.errors import UserError

METHODS = ("bicubic", "bicubic_no_antialias", "linear")


def infer_grid_or_none(num_patches: int) -> Optional[tuple[int, int]]:
    """The square grid with `num_patches` cells, or None."""
    if num_patches <= 0:
        return None
    side = math.isqrt(num_patches)
    return (side, side) if side * side == num_patches else None


def infer_grid(num_patches: int) -> tuple[int, int]:
    """The square grid with `num_patches` cells; UserError when there is none."""
    grid = infer_grid_or_none(num_patches)
    if grid is None:
        raise UserError(f"position embedding has {num_patches} patch rows, not a square grid; pass old_grid=(H, W)")
    return grid


def resample_posemb(
    posemb: torch.Tensor,
    new_grid: Sequence[int],
    num_prefix_tokens: int = 1,
    method: str = "bicubic",
    old_grid: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """(1, prefix + H*W, D) -> (1, prefix + H'*W', D); identity when the grid is unchanged.

    `old_grid` defaults to the square grid implied by the length. Interpolation runs in
    float32 (float64 for 'linear', to match scipy) and the result has the input's dtype.
    """
    if method not in METHODS:
        raise UserError(f"pos-emb resampling method {method!r} unknown; expected one of {', '.join(METHODS)}")
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise UserError(f"position embedding must have shape (1, tokens, dim), got {tuple(posemb.shape)}")
    new_grid = tuple(int(n) for n in new_grid)
    if len(new_grid) != 2 or min(new_grid) <= 0:
        raise UserError(f"new pos-emb grid must be two positive sizes, got {new_grid}")
    num_patches = posemb.shape[1] - num_prefix_tokens
    if num_patches <= 0:
        raise UserError(
            f"position embedding has {posemb.shape[1]} rows, not more than {num_prefix_tokens} prefix tokens"
        )
    if old_grid is None:
        old_grid = infer_grid(num_patches)
    old_grid = tuple(int(n) for n in old_grid)
    if len(old_grid) != 2 or old_grid[0] * old_grid[1] != num_patches:
        raise UserError(
            f"old pos-emb grid {old_grid} does not hold the {num_patches} patch rows of a {tuple(posemb.shape)} embedding"
            f" with {num_prefix_tokens} prefix token(s)"
        )
    if old_grid == new_grid:
        return posemb

    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    compute_dtype = torch.float64 if method == "linear" else torch.float32
    grid = grid.to(compute_dtype).reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    if method == "linear":
        grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    else:
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=method == "bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(posemb.dtype)  # (1, H'W', D)
    return torch.cat([prefix, grid], dim=1)
