"""The BiT ResNet stem of the hybrid ViT (paper section 3.1, "Hybrid Architecture").

A ResNet v1.5 bottleneck network with weight-standardised convolutions and GroupNorm
(Kolesnikov et al., "Big Transfer"), as in the official vision_transformer
`models_resnet.py`. For R50+ViT-B/16 the paper removes stage 4 and puts the 3 layers it
had into stage 3 (layers 3, 4, 9), so the feature map has stride 16 and 1024 channels.

Convolutions use TensorFlow "SAME" padding and module names follow timm's `ResNetV2`
(`stem.conv`, `stages.{i}.blocks.{j}.conv1`, ...) so timm hybrid checkpoints map
one-to-one. Epsilons follow timm (weight standardisation 1e-8, GroupNorm 1e-5) so the
two implementations agree to float precision.

Parameters are initialised inside each module's constructor (lecun-normal kernels as
flax's `nn.Conv` default, GroupNorm scale 1 / bias 0), which keeps the initialisation
correct when the model is built partitioned under `deepspeed.zero.Init`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Standard deviation of a unit normal truncated to [-2, 2]: dividing by it makes a
# truncated normal have the intended variance (flax/JAX `variance_scaling`).
TRUNC_NORMAL_STD = 0.87962566103423978


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Truncated normal with variance 1 / fan_in, as JAX's `lecun_normal`."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / TRUNC_NORMAL_STD
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter) and SAME padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def reset_parameters(self) -> None:
        lecun_normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=self.eps)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w.reshape_as(self.weight), None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups) optionally followed by ReLU; named like timm's so keys match."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class Downsample(nn.Module):
    """Projection shortcut: 1x1 strided conv + norm (no activation)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride=stride)
        self.norm = GroupNormAct(out_ch, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), non-pre-activation as in the ViT hybrid."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        mid = out_ch // 4
        needs_projection = stride != 1 or in_ch != out_ch
        self.downsample = Downsample(in_ch, out_ch, stride) if needs_projection else None
        self.conv1 = StdConv2d(in_ch, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2d(mid, out_ch, 1)
        self.norm3 = GroupNormAct(out_ch, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *[Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MaxPoolSame(nn.Module):
    """3x3 stride-2 max pool with SAME padding (padded with -inf, so padding never wins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetBackbone(nn.Module):
    """BiT ResNet trunk: 7x7/2 stem conv + norm + 3x3/2 max pool, then bottleneck stages.

    Stage i has `layers[i]` blocks and 256 * 2**i * width/64 output channels; every stage
    after the first halves the resolution, so the output stride is 4 * 2**(len(layers)-1).
    """

    def __init__(self, layers: Sequence[int], width: int = 64, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(conv=StdConv2d(in_chans, width, 7, stride=2), norm=GroupNormAct(width), pool=MaxPoolSame())
        )
        stages, in_ch = [], width
        for i, depth in enumerate(layers):
            out_ch = width * 4 * 2**i
            stages.append(ResNetStage(in_ch, out_ch, depth, stride=1 if i == 0 else 2))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.stride = 4 * 2 ** (len(layers) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/stride, W/stride)
        return self.stages(self.stem(x))
