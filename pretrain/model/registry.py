"""Named model variants: the paper's Table 1 and its neighbours, built by name.

`create_model("vit_b16", img_size=384, num_classes=10)` builds a registered variant with
field overrides; every `configs/model/NAME.yaml` equals its entry here (tested).
"""

from __future__ import annotations

import dataclasses

from pretrain.model.vit import VisionTransformer, ViTConfig, validate_config
from vitscale_common.errors import UserError

_REGISTRY: dict[str, ViTConfig] = {}


def register_model(name: str, **fields) -> None:
    """Register a named variant; a name can be registered once."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    cfg = ViTConfig(name=name, **fields)
    validate_config(cfg)
    _REGISTRY[name] = cfg


# Paper Table 1 (+ Ti/16 from DeiT/"How to train your ViT", g/14 from "Scaling ViTs").
register_model("vit_ti16", patch_size=16, width=192, depth=12, heads=3, mlp_dim=768)
register_model("vit_s16", patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536)
register_model("vit_b16", patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072)
register_model("vit_b32", patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072)
register_model("vit_l16", patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096)
register_model("vit_l32", patch_size=32, width=1024, depth=24, heads=16, mlp_dim=4096)
register_model("vit_h14", patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120)
register_model("vit_g14", patch_size=14, width=1408, depth=40, heads=16, mlp_dim=6144)
register_model("r50_vit_b16", patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072, resnet_layers=[3, 4, 9])


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_config(name: str, **overrides) -> ViTConfig:
    """The registered config of `name` with field overrides (e.g. img_size=384, num_classes=10)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; known: {', '.join(_REGISTRY)}")
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"unknown model field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    base = _REGISTRY[name]
    overrides.setdefault("resnet_layers", list(base.resnet_layers))  # never share the registry's list
    return dataclasses.replace(base, **overrides)


def build_model(cfg: ViTConfig) -> VisionTransformer:
    """Build the model a (validated) `model:` config section describes."""
    return VisionTransformer(cfg)


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a registered variant: `create_model("vit_b16", img_size=384, num_classes=10)`."""
    return build_model(model_config(name, **overrides))
