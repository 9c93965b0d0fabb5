"""Bytes the autograd graph keeps for backward, per micro-batch, counted from the architecture.

Per block these are the tensors `torch.autograd.graph.saved_tensors_hooks` sees (weights
left out: they are the parameters' memory): the block's input, the two LayerNorm outputs and
statistics, q/k/v and the attention output with its log-sum-exp (fused attention keeps no
N x N matrix), the MLP's two hidden activations and the residual sum between the halves, plus
dropout's masks when dropout is on. With activation checkpointing a block keeps only its
input and rebuilds the rest, one block at a time, in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.flops import tokens
from pretrain.model.vit import ViTConfig


@dataclass(frozen=True)
class Activations:
    per_block: int  # what one block keeps for backward
    blocks: int  # all blocks together (with checkpointing: their inputs, and one block rebuilt)
    outside_blocks: int  # the image, the embedding's dropout mask, the final norm, the logits and targets


def block_bytes(cfg: ViTConfig, micro_batch: int, elem: int, stats_elem: int, checkpointed: bool) -> int:
    """Bytes one block saves for backward at `micro_batch` images of `elem`-byte activations.

    `stats_elem`: bytes of a LayerNorm mean or inverse deviation (CUDA keeps them in fp32,
    the CPU in the activations' dtype)."""
    t = micro_batch * tokens(cfg)  # tokens in the micro-batch
    d, m = cfg.width, cfg.mlp_dim
    if checkpointed:
        return elem * t * d
    kept = elem * t * (8 * d + 2 * m)  # x, LN1 out, q k v, attention out, x + attention, LN2 out, MLP hidden x 2
    kept += 4 * micro_batch * cfg.heads * tokens(cfg)  # attention's log-sum-exp, fp32
    kept += 2 * 2 * stats_elem * t  # two LayerNorms' mean and inverse deviation
    if cfg.dropout > 0:
        kept += elem * t * (m + 2 * d)  # masks after the MLP activation, the projection and the MLP
    return kept


def activations(cfg: ViTConfig, micro_batch: int, elem: int, stats_elem: int = 4) -> Activations:
    checkpointed = cfg.activation_checkpointing
    full = block_bytes(cfg, micro_batch, elem, stats_elem, checkpointed=False)
    per_block = block_bytes(cfg, micro_batch, elem, stats_elem, checkpointed)
    blocks = cfg.depth * per_block + (full if checkpointed else 0)
    t = micro_batch * tokens(cfg)
    h, w = cfg.img_hw
    outside = elem * micro_batch * cfg.in_chans * h * w  # the patch convolution's input
    outside += elem * t * cfg.width * (2 if cfg.dropout > 0 else 1) + 2 * stats_elem * t  # final norm (+ dropout)
    outside += 2 * 4 * micro_batch * cfg.num_classes  # fp32 logits for the loss, and the targets
    return Activations(per_block=per_block, blocks=blocks, outside_blocks=outside)
