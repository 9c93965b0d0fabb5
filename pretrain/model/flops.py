"""Floating-point operations of one image through the ViT, counted from the architecture.

A multiply-add is 2 FLOPs, and only matrix products count (convolution, linear layers,
attention's two batched products), as `torch.utils.flop_counter` counts them: norms,
activations and softmax are left out. Backward does twice the forward's products (the
gradient of the input and of the weight), except the patch embedding, whose input (the
image) needs no gradient, and fused attention, whose backward computes Q K^T again: five
products to the forward's two.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.vit import ViTConfig


@dataclass(frozen=True)
class Flops:
    """FLOPs per image, by kind of product."""

    patch: float  # the patch-embedding convolution (the hybrid stem's ResNet is not counted)
    linear: float  # every linear layer: qkv, projection, MLP, pre-logits, head
    attention: float  # Q K^T and A V in every block

    @property
    def total(self) -> float:
        return self.patch + self.linear + self.attention


def tokens(cfg: ViTConfig) -> int:
    """Sequence length the blocks see: patches plus the class token."""
    return cfg.grid_size[0] * cfg.grid_size[1] + cfg.num_prefix_tokens


def forward_flops(cfg: ViTConfig) -> Flops:
    n_patches = cfg.grid_size[0] * cfg.grid_size[1]
    n, d, m = tokens(cfg), cfg.width, cfg.mlp_dim
    patch = 2 * n_patches * cfg.patch_size**2 * cfg.in_chans * d
    head_in = cfg.representation_size or d
    head = (cfg.representation_size or 0) * d + cfg.num_classes * head_in
    block_linear = 4 * n * d * d + 2 * n * d * m  # qkv (3 n d^2) + projection (n d^2), MLP
    return Flops(
        patch=float(patch),
        linear=2.0 * (cfg.depth * block_linear + head),
        attention=2.0 * cfg.depth * 2 * n * n * d,
    )


def backward_flops(cfg: ViTConfig) -> Flops:
    fwd = forward_flops(cfg)
    return Flops(patch=fwd.patch, linear=2 * fwd.linear, attention=2.5 * fwd.attention)


def block_forward_flops(cfg: ViTConfig) -> float:
    """One block's forward: what activation checkpointing computes again in backward."""
    n, d, m = tokens(cfg), cfg.width, cfg.mlp_dim
    return 2.0 * (4 * n * d * d + 2 * n * d * m + 2 * n * n * d)


def training_flops(cfg: ViTConfig) -> float:
    """Forward and backward of one image, without recomputation."""
    return forward_flops(cfg).total + backward_flops(cfg).total
