"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020).

Reads top to bottom: initialisers, attention, MLP, block, the config dataclass, patch
embedding, the ViT, and the registry of named variants (paper Table 1 plus Ti/16, g/14
and the R50+ViT-B/16 hybrid).

Module and parameter names follow timm's `VisionTransformer` (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`, ..., `norm`, `head`), so timm state
dicts load as they are (`pretrain/model/timm_format.py` handles the rest).

Initialisation is the official JAX code's (vision_transformer `models_vit.py`):
  * Dense kernels xavier-uniform; q, k and v are initialised as three separate D x D
    matrices, as flax's attention does, not as one fused 3D x D matrix.
  * MLP biases normal(std 1e-6); other biases zero; LayerNorm scale 1, bias 0.
  * Patch-embedding conv and the pre-logits layer: lecun-normal (flax defaults).
  * Position embedding normal(std 0.02); class token zeros.
  * Head kernel zeros and head bias `head_bias_init` (-10 for sigmoid pretraining, so the
    initial loss is not dominated by the K - 1 negative classes).
Every parameter is initialised inside the constructor of the module that owns it, so the
initialisation also holds when the model is built partitioned under
`deepspeed.zero.Init` (which shards each module's parameters as its `__init__` returns).

GELU is the exact (erf) form, as in timm and PyTorch's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.model.hybrid_stem import ResNetBackbone, lecun_normal_
from vitscale_common.errors import UserError

LN_EPS = 1e-6  # flax LayerNorm default, also timm's for ViT


# ----------------------------------------------------------------------------- layers
class Linear(nn.Linear):
    """nn.Linear whose constructor applies one of the official initialisers.

    weight_init: 'xavier' | 'xavier_qkv' (three stacked D x D blocks) | 'lecun' | 'zeros'.
    """

    def __init__(
        self, in_f: int, out_f: int, weight_init: str = "xavier", bias_std: float = 0.0, bias_value: float = 0.0
    ):
        # Set before nn.Linear.__init__, which calls reset_parameters().
        self.weight_init, self.bias_std, self.bias_value = weight_init, bias_std, bias_value
        super().__init__(in_f, out_f)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = self.weight
        if self.weight_init == "xavier":
            nn.init.xavier_uniform_(w)
        elif self.weight_init == "xavier_qkv":
            for part in w.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
        elif self.weight_init == "lecun":
            lecun_normal_(w)
        elif self.weight_init == "zeros":
            nn.init.zeros_(w)
        else:
            raise ValueError(f"unknown weight_init {self.weight_init!r}")
        if self.bias_std > 0:
            nn.init.normal_(self.bias, std=self.bias_std)
        else:
            nn.init.constant_(self.bias, self.bias_value)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = Linear(dim, 3 * dim, weight_init="xavier_qkv")
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias_std=1e-6)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = Linear(hidden, dim, bias_std=1e-6)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm Transformer encoder block (paper eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- config
@dataclass
class ViTConfig:
    """One ViT variant: everything `build_model` needs (the `model:` config section)."""

    name: str = "vit_b16"  # label of the variant this config was derived from
    img_size: int = 224  # input height in pixels (and width unless img_width is set)
    img_width: Optional[int] = None  # input width for rectangular inputs; None = square
    in_chans: int = 3  # input channels
    patch_size: int = 16  # pixels per token side (for hybrids: the backbone stride x the projection kernel)
    width: int = 768  # hidden size D
    depth: int = 12  # number of encoder blocks
    heads: int = 12  # attention heads (width must divide by it)
    mlp_dim: int = 3072  # MLP hidden size
    num_classes: int = 1000  # head outputs; 0 = no head (forward returns the pooled representation)
    pool: str = "token"  # 'token': class token (paper default) | 'gap': mean of patch tokens, no class token
    # pre-logits Linear + tanh of this width (paper's pretraining); None = none
    representation_size: Optional[int] = None
    dropout: float = 0.0  # dropout after pos-emb, attention projection and MLP layers (paper: 0.1 for ImageNet-21k)
    attn_dropout: float = 0.0  # dropout on attention weights
    posemb: str = "learn"  # 'learn': learned 1D position embedding (paper) | 'sincos2d': fixed 2D sin-cos
    # pos-emb has a class-token row (vision_transformer, timm); False = big_vision layout
    posemb_class_token: bool = True
    head_bias_init: float = 0.0  # initial head bias (-10 for sigmoid cross-entropy pretraining)
    activation_checkpointing: bool = False  # recompute each block in backward to save activation memory
    resnet_layers: List[int] = field(
        default_factory=list
    )  # hybrid: BiT ResNet blocks per stage ([3, 4, 9] = R50 stem); [] = pure ViT
    resnet_width: int = 64  # hybrid: ResNet stem width (64 = width factor 1)

    @property
    def img_hw(self) -> tuple[int, int]:
        return self.img_size, self.img_width or self.img_size

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pool == "token" else 0


def validate_config(cfg: ViTConfig) -> None:
    """Raise UserError naming the first `model.<field>` that cannot be built."""

    def bad(key: str, why: str) -> None:
        raise UserError(f"model.{key}={getattr(cfg, key)!r}: {why}")

    for key in ("img_size", "in_chans", "patch_size", "width", "depth", "heads", "mlp_dim", "resnet_width"):
        if getattr(cfg, key) <= 0:
            bad(key, "must be positive")
    if cfg.img_width is not None and cfg.img_width <= 0:
        bad("img_width", "must be positive")
    if cfg.num_classes < 0:
        bad("num_classes", "must be >= 0")
    if cfg.width % cfg.heads:
        bad("heads", f"must divide model.width={cfg.width}")
    if cfg.pool not in ("token", "gap"):
        bad("pool", "expected 'token' or 'gap'")
    if cfg.posemb not in ("learn", "sincos2d"):
        bad("posemb", "expected 'learn' or 'sincos2d'")
    if cfg.posemb == "sincos2d" and cfg.width % 4:
        bad("width", "must be divisible by 4 for posemb='sincos2d'")
    if cfg.representation_size is not None and cfg.representation_size <= 0:
        bad("representation_size", "must be positive or null")
    for key in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            bad(key, "must be in [0, 1)")
    if cfg.resnet_layers:
        if any(n <= 0 for n in cfg.resnet_layers):
            bad("resnet_layers", "every stage needs at least one block")
        stride = 4 * 2 ** (len(cfg.resnet_layers) - 1)
        if cfg.patch_size % stride:
            bad("patch_size", f"must be a multiple of the ResNet stride {stride}")
    h, w = cfg.img_hw
    if h % cfg.patch_size or w % cfg.patch_size:
        bad("img_size", f"image {h}x{w} is not divisible by model.patch_size={cfg.patch_size}")


# ----------------------------------------------------------------------------- model
def posemb_sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (big_vision `posemb_sincos_2d`): (1, H*W, dim)."""
    y, x = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32), indexing="ij"
    )
    omega = torch.arange(dim // 4, dtype=torch.float32) / max(dim // 4 - 1, 1)
    omega = 1.0 / temperature**omega
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]


class PatchConv(nn.Conv2d):
    """Stride = kernel conv with flax's default init (lecun-normal kernel, zero bias), applied
    in its own constructor so that it holds under `deepspeed.zero.Init`."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int):
        super().__init__(in_ch, out_ch, kernel, stride=kernel)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        lecun_normal_(self.weight)
        nn.init.zeros_(self.bias)


class PatchEmbed(nn.Module):
    """Image -> token sequence: a P x P stride-P conv (= linear projection of flattened
    patches), or for hybrids a ResNet feature map followed by a 1x1 (or larger) projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        in_ch, kernel = cfg.in_chans, cfg.patch_size
        self.backbone = None
        if cfg.resnet_layers:
            self.backbone = ResNetBackbone(cfg.resnet_layers, cfg.resnet_width, cfg.in_chans)
            in_ch, kernel = self.backbone.num_features, cfg.patch_size // self.backbone.stride
        self.proj = PatchConv(in_ch, cfg.width, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H/P * W/P, D)
        if self.backbone is not None:
            x = self.backbone(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT (paper eq. 1-4): patch tokens [+ class token] + position embedding -> L blocks
    -> LayerNorm -> pool (class token or mean) -> [pre-logits Linear + tanh] -> head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        self.grid_size = cfg.grid_size
        self.num_prefix_tokens = cfg.num_prefix_tokens
        D, num_patches = cfg.width, self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if self.num_prefix_tokens else None
        posemb_len = num_patches + (self.num_prefix_tokens if cfg.posemb_class_token else 0)
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.empty(1, posemb_len, D))
            with torch.no_grad():
                nn.init.normal_(self.pos_embed, std=0.02)
        else:  # fixed: a buffer, so it is neither trained nor saved
            table = posemb_sincos_2d(self.grid_size, D)
            if posemb_len > num_patches:  # the class token gets a zero row
                table = torch.cat([torch.zeros(1, posemb_len - num_patches, D), table], dim=1)
            self.register_buffer("pos_embed", table, persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.heads, cfg.mlp_dim, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.pre_logits = None
        self.num_features = D
        if cfg.representation_size:
            self.pre_logits = Linear(D, cfg.representation_size, weight_init="lecun")
            self.num_features = cfg.representation_size
        self.head = self._make_head(cfg.num_classes, cfg.head_bias_init)

    def _make_head(self, num_classes: int, bias: float) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return Linear(self.num_features, num_classes, weight_init="zeros", bias_value=bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + H/P * W/P, D)."""
        if not x.is_floating_point():
            raise TypeError(
                f"the model takes normalised floating-point images, got {x.dtype}: pass loader batches through "
                "pretrain.data.device_input.DeviceInput (it casts, normalises and mixes them on the device)"
            )
        if tuple(x.shape[-2:]) != self.cfg.img_hw:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} does not match the model's {self.cfg.img_hw[0]}x{self.cfg.img_hw[1]};"
                " build it with that img_size and resample the position embedding (pretrain.model.posemb)"
            )
        x = self.patch_embed(x)  # (B, HW, D)
        pos = self.pos_embed.to(x.dtype)
        if self.cls_token is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
            if self.cfg.posemb_class_token:
                x = torch.cat([cls, x], dim=1) + pos  # (B, 1 + HW, D)
            else:  # big_vision: add the pos-emb to the patches, then prepend the class token
                x = torch.cat([cls, x + pos], dim=1)
        else:
            x = x + pos
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes); with pre_logits=True the pooled
        representation (B, num_features) that few-shot and linear probes use."""
        x = tokens[:, 0] if self.cfg.pool == "token" else tokens[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))  # (B, representation_size)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))

    def reset_head(self, num_classes: int, bias: float = 0.0, drop_pre_logits: bool = False) -> None:
        """New zero-weight head (fine-tuning, paper section 3.2); optionally drop the
        pre-logits layer, as the official fine-tuning does when the target has none."""
        if drop_pre_logits and self.pre_logits is not None:
            self.pre_logits = None
            self.num_features = self.cfg.width
        ref = next(self.parameters())
        self.head = self._make_head(num_classes, bias).to(device=ref.device, dtype=ref.dtype)
        self.cfg = dataclasses.replace(
            self.cfg,
            num_classes=num_classes,
            head_bias_init=bias,
            representation_size=self.cfg.representation_size if self.pre_logits is not None else None,
        )
