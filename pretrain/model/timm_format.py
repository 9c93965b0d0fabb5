"""timm's state dicts: our parameter names follow timm's `VisionTransformer` (and its R50 hybrid).

So `from_timm` / `to_timm` are a check that every key means the same thing; the timm
features we do not implement (layer scale, register tokens, norm after pooling, ...) and our
pre-logits layer (timm has none) are reported, never dropped silently.
"""

from __future__ import annotations

import re

from pretrain.model.state_dict import StateDict, strip_wrappers
from vitscale_common.errors import UserError

# timm keys that stand for features our ViT does not have; loading them would change the math.
_TIMM_UNSUPPORTED = re.compile(
    r"(^|\.)(reg_token|ls1|ls2|q_norm|k_norm|norm_pre|fc_norm|attn_pool|dist_token|head_dist)\.|^(reg_token|dist_token)$"
)


def from_timm(state_dict: StateDict) -> StateDict:
    """timm `VisionTransformer` (incl. `vit_base_r50_s16_*`) state dict -> ours."""
    state_dict = strip_wrappers(state_dict)
    unsupported = sorted(k for k in state_dict if _TIMM_UNSUPPORTED.search(k))
    if unsupported:
        raise UserError(
            "timm checkpoint uses features this ViT does not implement (build the timm model with "
            f"fc_norm=False, no layer scale/registers): {', '.join(unsupported[:8])}"
        )
    return dict(state_dict)


def to_timm(state_dict: StateDict) -> StateDict:
    """Our state dict -> timm `VisionTransformer` layout (timm has no pre-logits layer)."""
    state_dict = strip_wrappers(state_dict)
    pre_logits = sorted(k for k in state_dict if k.startswith("pre_logits."))
    if pre_logits:
        raise UserError(
            f"timm's ViT has no pre-logits (representation) layer, cannot export {', '.join(pre_logits)}; "
            "drop it first (model.reset_head(..., drop_pre_logits=True))"
        )
    return dict(state_dict)


def timm_model_kwargs(cfg) -> tuple[str, dict]:
    """The timm model name and kwargs that build the same network as our `ViTConfig`."""
    if cfg.representation_size:
        raise UserError("model.representation_size: timm's ViT has no pre-logits layer")
    if cfg.posemb != "learn":
        raise UserError(f"model.posemb={cfg.posemb!r}: only learned position embeddings map to timm")
    mlp_ratio = cfg.mlp_dim / cfg.width
    if int(mlp_ratio * cfg.width) != cfg.mlp_dim:
        raise UserError(f"model.mlp_dim={cfg.mlp_dim} is not reachable with timm's mlp_ratio")
    kwargs = dict(
        img_size=cfg.img_hw,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=mlp_ratio,
        class_token=cfg.pool == "token",
        global_pool="token" if cfg.pool == "token" else "avg",
        fc_norm=False,
        no_embed_class=not cfg.posemb_class_token,
        drop_rate=0.0,
        pos_drop_rate=cfg.dropout,
        proj_drop_rate=cfg.dropout,
        attn_drop_rate=cfg.attn_dropout,
    )
    if cfg.resnet_layers:
        if list(cfg.resnet_layers) != [3, 4, 9] or cfg.resnet_width != 64 or cfg.patch_size != 16:
            raise UserError("only the R50 (3, 4, 9) stride-16 hybrid has a timm counterpart")
        return "vit_base_r50_s16_224", kwargs
    return "vit_base_patch16_224", dict(kwargs, patch_size=cfg.patch_size)


def create_timm_model(cfg):
    """timm's model of the same configuration (timm is a development dependency)."""
    import timm

    name, kwargs = timm_model_kwargs(cfg)
    return timm.create_model(name, pretrained=False, **kwargs)
