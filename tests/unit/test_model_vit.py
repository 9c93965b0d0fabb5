"""ViT model: registry, parameter counts (exactly timm's), shapes, options, initialisation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pretrain.model import ViTConfig, create_model, list_models, model_config, register_model
from vitscale_common.config_loader import load_config
from vitscale_common.errors import UserError

REPO = Path(__file__).resolve().parents[2]

# timm's counts with a 1000-class head (REFERENCES.md); the paper's Table 1 rounds these.
TIMM_PARAMS = {
    "vit_ti16": 5_717_416,
    "vit_s16": 22_050_664,
    "vit_b16": 86_567_656,
    "vit_b32": 88_224_232,
    "vit_l16": 304_326_632,
    "vit_l32": 306_535_400,
    "vit_h14": 632_045_800,
    "vit_g14": 1_012_611_432,
    "r50_vit_b16": 98_659_112,
}
TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "r50_vit_b16": "vit_base_r50_s16_224",
}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names_all_variants():
    assert list_models() == list(TIMM_PARAMS)


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_count_matches_timm(name):
    with torch.device("meta"):
        model = create_model(name)
    assert num_params(model) == TIMM_PARAMS[name]


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_parameter_names_and_shapes_equal_timm(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@dataclass
class _ModelSection:
    model: ViTConfig = field(default_factory=ViTConfig)


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_config_file_equals_registry(name):
    cfg = load_config(_ModelSection, [REPO / "configs" / "model" / f"{name}.yaml"])
    assert cfg.model == model_config(name)


def test_overrides_from_command_line_reach_the_model():
    cfg = load_config(
        _ModelSection, [REPO / "configs/model/vit_ti16.yaml"], ["model.img_size=64", "model.num_classes=7"]
    )
    model = create_model("vit_ti16", img_size=cfg.model.img_size, num_classes=cfg.model.num_classes)
    assert model.grid_size == (4, 4) and model.pos_embed.shape == (1, 17, 192)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_model("vit_b16", width=768)
    with pytest.raises(UserError, match="unknown model 'vit_x99'"):
        create_model("vit_x99")
    with pytest.raises(UserError, match="unknown model field"):
        model_config("vit_b16", hidden=3)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"img_size": 100}, "model.img_size"),
        ({"heads": 5}, "model.heads"),
        ({"pool": "max"}, "model.pool"),
        ({"posemb": "rope"}, "model.posemb"),
        ({"dropout": 1.5}, "model.dropout"),
    ],
)
def test_invalid_config_names_the_field(overrides, key):
    with pytest.raises(UserError, match=key):
        create_model("vit_ti16", **overrides)


def tiny(**overrides):
    base = dict(img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)
    return create_model("vit_ti16", **{**base, **overrides})


def test_forward_shapes_token_pool_and_pre_logits():
    torch.manual_seed(0)
    model = tiny(representation_size=48)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 64)
    rep = model.forward_head(tokens, pre_logits=True)
    assert rep.shape == (3, 48) and rep.abs().max() <= 1.0  # tanh
    assert model(x).shape == (3, 10)


def test_gap_has_no_class_token_and_averages_patches():
    model = tiny(pool="gap")
    assert model.cls_token is None and model.num_prefix_tokens == 0
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_rectangular_input_and_mismatched_size_error():
    model = tiny(img_size=32, img_width=48)
    assert model.grid_size == (4, 6)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 48, 32))


def test_no_head_returns_representation():
    model = tiny(num_classes=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_big_vision_posemb_layout_adds_posemb_before_class_token():
    model = tiny(posemb_class_token=False)
    assert model.pos_embed.shape == (1, 16, 64)
    with torch.no_grad():
        model.cls_token.normal_()
    # Without blocks and final norm, the tokens are the embedding itself: the class token
    # enters unchanged, the patches carry the position embedding.
    model.blocks = torch.nn.ModuleList()
    model.norm = torch.nn.Identity()
    x = torch.randn(1, 3, 32, 32)
    out = model.forward_features(x)
    torch.testing.assert_close(out[:, 0], model.cls_token[:, 0])
    torch.testing.assert_close(out[:, 1:], model.patch_embed(x) + model.pos_embed)


def test_sincos_posemb_is_fixed_and_not_saved():
    model = tiny(posemb="sincos2d")
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" not in model.state_dict()
    pe = model.pos_embed[0, 1:]  # patch rows; the class-token row is zero
    assert torch.all(model.pos_embed[0, 0] == 0)
    assert torch.allclose(pe[0, :16], torch.zeros(16)) and torch.allclose(
        pe[0, 16:32], torch.ones(16)
    )  # sin(0), cos(0)


def test_jax_style_initialisation():
    torch.manual_seed(0)
    model = create_model("vit_b16", num_classes=100, head_bias_init=-10.0, representation_size=768)
    D = 768
    assert torch.all(model.head.weight == 0) and torch.all(model.head.bias == -10.0)
    assert torch.all(model.cls_token == 0)
    assert abs(model.pos_embed.std().item() - 0.02) < 1e-3
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (D + D))  # per q/k/v matrix, not fused (that would be sqrt(6 / 4D))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    assert abs(qkv.std().item() - bound / math.sqrt(3)) < 1e-3
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    fc1_bias = model.blocks[0].mlp.fc1.bias
    assert 0 < fc1_bias.std().item() < 1e-5
    # lecun normal: variance 1 / fan_in
    w = model.patch_embed.proj.weight
    assert abs(w.std().item() - math.sqrt(1 / w[0].numel())) < 2e-3
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(model.blocks[0].norm1.bias == 0)


def test_reset_head_zero_weights_and_optional_pre_logits_drop():
    model = tiny(representation_size=32)
    with torch.no_grad():
        model.head.weight.normal_()
    model.reset_head(5, bias=0.5)
    assert (
        model.head.weight.shape == (5, 32) and torch.all(model.head.weight == 0) and torch.all(model.head.bias == 0.5)
    )
    assert model.cfg.num_classes == 5 and model.cfg.representation_size == 32
    model.reset_head(3, drop_pre_logits=True)
    assert model.pre_logits is None and model.head.weight.shape == (3, 64)
    assert model.cfg.representation_size is None
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny(num_classes=10, head_bias_init=0.0)
    ckpt = tiny(activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for m in (plain, ckpt):
            m.head.weight.copy_(torch.linspace(-1, 1, m.head.weight.numel()).view_as(m.head.weight))
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        m.train()
        m(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bf16_autocast_forward_backward():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.head.bias.grad is not None and torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()


def test_hybrid_forward_shapes():
    # One block per stage keeps the stride-16 feature map; the full R50 runs in test_model_weights.
    model = create_model(
        "r50_vit_b16", img_size=64, resnet_layers=[1, 1, 1], width=64, depth=1, heads=4, mlp_dim=64, num_classes=3
    )
    assert model.grid_size == (4, 4) and model.patch_embed.proj.kernel_size == (1, 1)
    assert model.patch_embed.backbone(torch.randn(1, 3, 64, 64)).shape == (1, 1024, 4, 4)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 17, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
