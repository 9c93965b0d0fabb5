"""Attention weights of a trained ViT, and the two summaries the paper draws from them.

The model's attention runs through `F.scaled_dot_product_attention`, which never
materialises the attention matrix. Rather than adding a slow "return the weights" branch
to the model, a forward pre-hook on each block's `attn` module records its input (the
normalised tokens) and the weights are recomputed here as softmax(q k^T / sqrt(d)) from
that module's own `qkv` projection. Training keeps the fast path untouched.

- `mean_attention_distance`: paper Fig. 7 (right), the attention-weighted image-space
  distance between a query patch and the patches it attends to, per head.
- `attention_rollout`: paper Fig. 6 / Appendix D.8 (Abnar & Zuidema, 2020), the attention
  from the output token back to the input patches through every layer, with the residual
  connection modelled by mixing in the identity.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn


def _num_heads(model: nn.Module, attn: nn.Module) -> int:
    for name in ("num_heads", "heads", "n_head"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    return int(model.cfg.heads)


@torch.no_grad()
def iter_attention_maps(model: nn.Module, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per block, in order, the attention probabilities (B, heads, N, N) for `images`.

    Runs one ordinary forward pass in eval mode, keeping only each block's (B, N, D) input;
    the (B, heads, N, N) maps are computed one block at a time as the caller asks for them
    (at ViT-H/14 and 518 px all of them at once would take tens of GB). Float32, on the CPU.
    """
    captured: list[torch.Tensor] = []
    hooks = [blk.attn.register_forward_pre_hook(lambda mod, args: captured.append(args[0])) for blk in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    for blk, x in zip(model.blocks, captured):
        attn = blk.attn
        heads = _num_heads(model, attn)
        B, N, _ = x.shape  # (B, N, D)
        qkv = attn.qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # (B, h, N, hd)
        # Models with query/key normalisation (timm's qk_norm) apply it before the product.
        q = getattr(attn, "q_norm", nn.Identity())(q)
        k = getattr(attn, "k_norm", nn.Identity())(k)
        logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
        yield logits.softmax(dim=-1).cpu()  # (B, h, N, N)


def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """All blocks' attention probabilities at once: a list of (B, heads, N, N)."""
    return list(iter_attention_maps(model, images))


def patch_distances(grid: tuple[int, int], patch_size: int = 1) -> torch.Tensor:
    """(HW, HW) Euclidean distances between patch centres, in pixels (row-major patches)."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1) * patch_size  # (HW, 2)
    return torch.cdist(pos, pos)


def mean_attention_distance(
    attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1, patch_size: int = 1
) -> torch.Tensor:
    """Mean attention distance per head, in pixels: (B, h, N, N) -> (h,).

    Only patch-to-patch attention has a position in image space, so prefix tokens (class
    token) are dropped from both queries and keys and each query's remaining weights are
    renormalised: the result is the expected distance to the attended patch, averaged over
    query patches and images. A head attending only to itself gives 0; a uniform head gives
    the mean pairwise distance of the grid.
    """
    p = attn[..., num_prefix_tokens:, num_prefix_tokens:]  # (B, h, HW, HW)
    mass = p.sum(dim=-1).double().clamp_min(1e-12)  # (B, h, HW)
    dist = patch_distances(grid, patch_size).to(p.dtype)  # (HW, HW)
    per_query = torch.einsum("bhqk,qk->bhq", p, dist).double() / mass  # (B, h, HW)
    return per_query.mean(dim=(0, 2)).float()


def rollout_step(rollout: torch.Tensor | None, attn: torch.Tensor, residual_weight: float = 0.5) -> torch.Tensor:
    """Compose one more layer (B, h, N, N) onto the rollout so far (B, N, N) (None: first layer).

    Heads are averaged and the residual stream is modelled as A' = w I + (1 - w) A with rows
    renormalised; the new layer multiplies from the left.
    """
    a = attn.double().mean(dim=1)  # (B, N, N)
    eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
    a = residual_weight * eye + (1.0 - residual_weight) * a
    a = a / a.sum(dim=-1, keepdim=True)
    return a if rollout is None else a @ rollout


def attention_rollout(maps: Iterable[torch.Tensor], residual_weight: float = 0.5) -> torch.Tensor:
    """Attention rollout through all layers: (B, h, N, N) per layer, first to last -> (B, N, N).

    Row i of the result says how much each input token contributes to output token i.
    """
    rollout = None
    for a in maps:
        rollout = rollout_step(rollout, a, residual_weight)
    return rollout.float()


def output_token_map(rollout: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(B, N, N) rollout -> (B, H, W) attention from the output token to each patch, max 1.

    The output token is the class token when the model has one; a GAP model's output is the
    mean of the patch tokens, so their rollout rows are averaged.
    """
    if num_prefix_tokens > 0:
        row = rollout[:, 0, num_prefix_tokens:]
    else:
        row = rollout.mean(dim=1)
    row = row / row.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return row.reshape(-1, *grid)
