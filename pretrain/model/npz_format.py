"""The official JAX checkpoints (`.npz`): the flattened flax parameter trees, both layouts.

vision_transformer's (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...`,
pos-emb with a class-token row) and big_vision's (`MultiHeadDotProductAttention_0`, pos-emb
`pos_embedding` without a class-token row, optionally stacked "scan" blocks). The layout
is detected from the keys. Arrays are read with `allow_pickle=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pretrain.model.state_dict import StateDict, count_indices, strip_wrappers
from vitscale_common.atomic import atomic_open
from vitscale_common.errors import UserError


@dataclass(frozen=True)
class Param:
    """One of our tensors and the flax arrays it is made of, with the conversions both ways."""

    ours: str
    flax: tuple[str, ...]
    to_ours: Callable[[list[np.ndarray]], np.ndarray]
    to_flax: Callable[[np.ndarray], list[np.ndarray]]


def _vec(ours, flax):  # scales, biases; some checkpoints store GroupNorm scales as (1, 1, 1, C)
    return Param(ours, (flax,), lambda a: a[0].reshape(-1), lambda w: [w])


def _raw(ours, flax):
    return Param(ours, (flax,), lambda a: a[0], lambda w: [w])


def _dense(ours, flax):  # flax (in, out) <-> torch (out, in)
    return Param(ours, (flax,), lambda a: a[0].T, lambda w: [w.T])


def _conv(ours, flax):  # flax HWIO <-> torch OIHW
    return Param(ours, (flax,), lambda a: a[0].transpose(3, 2, 0, 1), lambda w: [w.transpose(2, 3, 1, 0)])


def _qkv(ours, flax3, heads, kind):
    """flax query/key/value DenseGeneral (D, heads, hd) kernels / (heads, hd) biases <-> fused qkv."""
    if kind == "kernel":
        to_ours = lambda a: np.concatenate([k.reshape(k.shape[0], -1).T for k in a])
        to_flax = lambda w: [p.T.reshape(p.shape[1], heads, -1) for p in np.split(w, 3)]
    else:
        to_ours = lambda a: np.concatenate([b.reshape(-1) for b in a])
        to_flax = lambda w: [p.reshape(heads, -1) for p in np.split(w, 3)]
    return Param(ours, tuple(flax3), to_ours, to_flax)


def _attn_out(ours, flax, heads):  # flax (heads, hd, D) <-> torch (D, heads*hd)
    return Param(
        ours, (flax,), lambda a: a[0].reshape(-1, a[0].shape[-1]).T, lambda w: [w.T.reshape(heads, -1, w.shape[0])]
    )


@dataclass(frozen=True)
class Layout:
    """What a checkpoint contains, enough to list its parameters."""

    big_vision: bool
    depth: int
    heads: int  # only needed to write; reading takes it from the arrays
    class_token: bool
    pre_logits: bool
    head: bool
    resnet: tuple[tuple[bool, ...], ...] = ()  # per stage, per unit: has a projection shortcut


def npz_params(layout: Layout) -> list[Param]:
    """The parameter table of a layout; both `load_npz` and `save_npz` read it."""
    p = [_conv("patch_embed.proj.weight", "embedding/kernel"), _vec("patch_embed.proj.bias", "embedding/bias")]
    for s, units in enumerate(layout.resnet):
        if s == 0:
            bb = "patch_embed.backbone."
            p += [
                _conv(bb + "stem.conv.weight", "conv_root/kernel"),
                _vec(bb + "stem.norm.weight", "gn_root/scale"),
                _vec(bb + "stem.norm.bias", "gn_root/bias"),
            ]
        for u, has_proj in enumerate(units):
            ours, flax = f"patch_embed.backbone.stages.{s}.blocks.{u}.", f"block{s + 1}/unit{u + 1}/"
            for r in (1, 2, 3):
                p += [
                    _conv(f"{ours}conv{r}.weight", f"{flax}conv{r}/kernel"),
                    _vec(f"{ours}norm{r}.weight", f"{flax}gn{r}/scale"),
                    _vec(f"{ours}norm{r}.bias", f"{flax}gn{r}/bias"),
                ]
            if has_proj:
                p += [
                    _conv(f"{ours}downsample.conv.weight", f"{flax}conv_proj/kernel"),
                    _vec(f"{ours}downsample.norm.weight", f"{flax}gn_proj/scale"),
                    _vec(f"{ours}downsample.norm.bias", f"{flax}gn_proj/bias"),
                ]
    if layout.class_token:
        p.append(_raw("cls_token", "cls"))
    p.append(_raw("pos_embed", "pos_embedding" if layout.big_vision else "Transformer/posembed_input/pos_embedding"))
    mha, ln2, mlp = (
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
        if layout.big_vision
        else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    )
    for i in range(layout.depth):
        ours, flax = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        p += [
            _vec(ours + "norm1.weight", flax + "LayerNorm_0/scale"),
            _vec(ours + "norm1.bias", flax + "LayerNorm_0/bias"),
            _qkv(
                ours + "attn.qkv.weight",
                [f"{flax}{mha}/{n}/kernel" for n in ("query", "key", "value")],
                layout.heads,
                "kernel",
            ),
            _qkv(
                ours + "attn.qkv.bias",
                [f"{flax}{mha}/{n}/bias" for n in ("query", "key", "value")],
                layout.heads,
                "bias",
            ),
            _attn_out(ours + "attn.proj.weight", f"{flax}{mha}/out/kernel", layout.heads),
            _vec(ours + "attn.proj.bias", f"{flax}{mha}/out/bias"),
            _vec(ours + "norm2.weight", f"{flax}{ln2}/scale"),
            _vec(ours + "norm2.bias", f"{flax}{ln2}/bias"),
            _dense(ours + "mlp.fc1.weight", f"{flax}{mlp}/Dense_0/kernel"),
            _vec(ours + "mlp.fc1.bias", f"{flax}{mlp}/Dense_0/bias"),
            _dense(ours + "mlp.fc2.weight", f"{flax}{mlp}/Dense_1/kernel"),
            _vec(ours + "mlp.fc2.bias", f"{flax}{mlp}/Dense_1/bias"),
        ]
    p += [_vec("norm.weight", "Transformer/encoder_norm/scale"), _vec("norm.bias", "Transformer/encoder_norm/bias")]
    if layout.pre_logits:
        p += [_dense("pre_logits.weight", "pre_logits/kernel"), _vec("pre_logits.bias", "pre_logits/bias")]
    if layout.head:
        p += [_dense("head.weight", "head/kernel"), _vec("head.bias", "head/bias")]
    return p


_PREFIXES = ("", "opt/target/", "params/")
_SCAN_BLOCK = "Transformer/encoderblock/"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz archive ({str(e).splitlines()[0]})") from None
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    raise UserError(f"{path}: no 'embedding/kernel' array: not a vision_transformer / big_vision ViT checkpoint")


def _unscan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned encoder stores every block's array stacked on a leading depth axis."""
    out = {}
    for k, v in arrays.items():
        if k.startswith(_SCAN_BLOCK):
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{k[len(_SCAN_BLOCK) :]}"] = v[i]
        else:
            out[k] = v
    return out


def _layout_of_npz(arrays: dict[str, np.ndarray]) -> Layout:
    keys = arrays.keys()
    resnet = tuple(
        tuple(
            f"block{s}/unit{u}/conv_proj/kernel" in arrays
            for u in range(1, 1 + count_indices(keys, rf"block{s}/unit(\d+)/", first=1))
        )
        for s in range(1, 1 + count_indices(keys, r"block(\d+)/unit", first=1))
    )
    return Layout(
        big_vision="pos_embedding" in arrays,
        depth=count_indices(keys, r"Transformer/encoderblock_(\d+)/"),
        heads=0,
        class_token="cls" in arrays,
        pre_logits="pre_logits/kernel" in arrays,
        head="head/kernel" in arrays,
        resnet=resnet,
    )


def load_npz(path: str | Path) -> StateDict:
    """Read an official vision_transformer or big_vision ViT `.npz` into our state dict.

    A big_vision checkpoint with a class token gives a `pos_embed` without the class-token
    row: build the model with `posemb_class_token=False` (`infer_model_fields` says so)."""
    path = Path(path)
    arrays = _unscan(_read_npz(path))
    layout = _layout_of_npz(arrays)
    state_dict, used = {}, set()
    for param in npz_params(layout):
        missing = [k for k in param.flax if k not in arrays]
        if missing:
            raise UserError(f"{path}: missing array {missing[0]!r} (needed for {param.ours})")
        state_dict[param.ours] = torch.from_numpy(
            np.ascontiguousarray(param.to_ours([arrays[k] for k in param.flax]), dtype=np.float32)
        )
        used.update(param.flax)
    unknown = sorted(set(arrays) - used)
    if unknown:
        raise UserError(f"{path}: arrays this ViT has no place for (e.g. a MAP head): {', '.join(unknown[:8])}")
    return state_dict


def _layout_of_state_dict(keys, heads: int, big_vision: bool) -> Layout:
    stages = count_indices(keys, r"patch_embed\.backbone\.stages\.(\d+)\.")
    resnet = tuple(
        tuple(
            f"patch_embed.backbone.stages.{s}.blocks.{u}.downsample.conv.weight" in keys
            for u in range(count_indices(keys, rf"patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\."))
        )
        for s in range(stages)
    )
    return Layout(
        big_vision,
        count_indices(keys, r"blocks\.(\d+)\."),
        heads,
        "cls_token" in keys,
        "pre_logits.weight" in keys,
        "head.weight" in keys,
        resnet,
    )


def save_npz(model: torch.nn.Module, path: str | Path, layout: Optional[str] = None, scan: bool = False) -> None:
    """Write the model's weights as a flax `.npz`: layout 'vit' (official vision_transformer)
    or 'big_vision' (`scan` stacks the blocks as its scanned encoder does). The default
    follows the model's pos-emb layout (`posemb_class_token`)."""
    cfg = model.cfg
    layout = layout or ("vit" if cfg.posemb_class_token else "big_vision")
    if layout not in ("vit", "big_vision"):
        raise UserError(f"npz layout {layout!r} unknown; expected 'vit' or 'big_vision'")
    if model.num_prefix_tokens and cfg.posemb_class_token != (layout == "vit"):
        raise UserError(f"npz layout {layout!r} needs model.posemb_class_token={str(layout == 'vit').lower()}")
    sd = {k: v.detach().float().cpu().numpy() for k, v in strip_wrappers(model.state_dict()).items()}
    lay = _layout_of_state_dict(sd.keys(), cfg.heads, big_vision=layout == "big_vision")
    arrays = {}
    for param in npz_params(lay):
        arrays.update(zip(param.flax, param.to_flax(sd[param.ours])))
    if scan:
        blocks = [k for k in arrays if k.startswith("Transformer/encoderblock_0/")]
        for k in blocks:
            sub = k[len("Transformer/encoderblock_0/") :]
            arrays[_SCAN_BLOCK + sub] = np.stack(
                [arrays.pop(f"Transformer/encoderblock_{i}/{sub}") for i in range(lay.depth)]
            )
    prefix = "params/" if lay.big_vision else ""
    with atomic_open(path, "wb") as f:
        np.savez(f, **{prefix + k: v for k, v in arrays.items()})
