"""Weight conversion: equal to timm both ways (224 and 384 after resampling), official / big_vision
.npz layouts read by timm's own loader and by ours, and errors that name the offending keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.model import create_model
from pretrain.model.npz_format import load_npz, save_npz
from pretrain.model.state_dict import infer_model_fields, load_weights
from pretrain.model.timm_format import create_timm_model, from_timm, to_timm
from vitscale_common.errors import UserError

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

TOL = 1e-5


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with noise (norm scales around 1); in particular the
    zero-initialised head, which would hide a converter that drops or transposes it."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.05
        p.copy_(noise + 1 if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


def meta_built(build):
    """Build without running the initialisers (randomise() overwrites everything anyway)."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


@torch.no_grad()
def assert_same_outputs(ours, theirs, img_size, batch=1):
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    feats = ours.forward_features(x)
    their_feats = theirs.forward_features(x)
    pre = ours.forward_head(feats, pre_logits=True)
    their_pre = theirs.forward_head(their_feats, pre_logits=True)
    logits, their_logits = ours.forward_head(feats), theirs.forward_head(their_feats)
    assert logits.abs().max() > 0.1  # a live head, not zeros
    assert (pre - their_pre).abs().max().item() <= TOL
    assert (logits - their_logits).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides",
    # The hybrid keeps its full ResNet-50 stem and B width but only 3 of the 12 identical
    # blocks, to keep this CPU test in budget; vit_b16 covers the full-depth encoder.
    [("vit_b16", {}), ("r50_vit_b16", {"depth": 3})],
)
@torch.inference_mode()
def test_equal_to_timm_both_directions_at_224_and_384(name, overrides):
    ours = randomise(meta_built(lambda: create_model(name, num_classes=10, **overrides)), seed=0)
    timm_224 = meta_built(lambda: create_timm_model(ours.cfg)).eval()

    # ours -> timm at 224
    timm_224.load_state_dict(to_timm(ours.state_dict()))
    assert_same_outputs(ours, timm_224, 224)

    # timm -> ours at 224, from an independently randomised timm model
    randomise(timm_224, seed=1)
    load_weights(ours, from_timm(timm_224.state_dict()))
    assert_same_outputs(ours, timm_224, 224)

    # timm -> ours at 384: both resample the 14x14 pos-emb to 24x24 with bicubic + antialias
    ours_384 = meta_built(lambda: create_model(name, num_classes=10, img_size=384, **overrides)).eval()
    load_weights(ours_384, from_timm(timm_224.state_dict()), posemb_method="bicubic")
    timm_384 = meta_built(lambda: create_timm_model(ours_384.cfg)).eval()
    timm_384.load_state_dict(checkpoint_filter_fn(timm_224.state_dict(), timm_384))
    assert_same_outputs(ours_384, timm_384, 384)

    # ours -> timm at 384
    randomise(ours_384, seed=2)
    timm_384.load_state_dict(to_timm(ours_384.state_dict()))
    assert_same_outputs(ours_384, timm_384, 384)


def tiny(name="vit_ti16", **overrides):
    base = dict(img_size=32, depth=2, num_classes=5)
    if name == "r50_vit_b16":
        base.update(img_size=64, depth=1, width=64, heads=4, mlp_dim=64)
    return randomise(meta_built(lambda: create_model(name, **{**base, **overrides})), seed=3)


@pytest.mark.parametrize(
    "name, overrides, layout, scan",
    [
        ("vit_ti16", {}, "vit", False),
        ("vit_ti16", {"representation_size": 48}, "vit", False),
        ("vit_ti16", {"posemb_class_token": False}, "big_vision", False),
        ("vit_ti16", {"posemb_class_token": False}, "big_vision", True),
        ("vit_ti16", {"pool": "gap"}, "big_vision", False),
        ("r50_vit_b16", {}, "vit", False),
    ],
)
def test_npz_layouts_round_trip(tmp_path, name, overrides, layout, scan):
    ours = tiny(name, **overrides)
    path = tmp_path / "w.npz"
    save_npz(ours, path, layout=layout, scan=scan)
    with np.load(path) as npz:  # the keys are the official ones, not ours
        keys = set(npz.files)
    prefix = "params/" if layout == "big_vision" else ""
    assert f"{prefix}embedding/kernel" in keys
    assert (f"{prefix}pos_embedding" in keys) == (layout == "big_vision")

    state_dict = load_npz(path)
    fields = infer_model_fields(state_dict)
    assert fields["posemb_class_token"] == ours.cfg.posemb_class_token
    for key, value in fields.items():
        assert getattr(ours.cfg, key) == value, key
    loaded = create_model(name, **_same_cfg(ours)).eval()
    load_weights(loaded, state_dict)
    x = torch.randn(2, 3, *ours.cfg.img_hw)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
        if ours.pre_logits is None:  # timm's own .npz reader agrees with our writer
            theirs = create_timm_model(ours.cfg).eval()
            theirs.load_pretrained(str(path))
            assert (theirs(x) - ours(x)).abs().max().item() <= TOL


def _same_cfg(model):
    return {k: v for k, v in model.cfg.__dict__.items() if k != "name"}


def test_big_vision_posemb_loads_exactly_into_class_token_row_model(tmp_path):
    bv = tiny(posemb_class_token=False)
    path = tmp_path / "bv.npz"
    save_npz(bv, path)
    std = create_model("vit_ti16", img_size=32, depth=2, num_classes=5).eval()
    load_weights(std, load_npz(path))
    assert torch.all(std.pos_embed[0, 0] == 0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (std(x) - bv(x)).abs().max().item() <= 1e-6


def test_mismatched_shapes_name_the_keys():
    src = tiny(num_classes=5).state_dict()
    dst = create_model("vit_ti16", img_size=32, depth=2, num_classes=7)
    with pytest.raises(UserError) as err:
        load_weights(dst, src)
    assert "head.weight: checkpoint (5, 192) vs model (7, 192)" in str(err.value)
    assert "head.bias" in str(err.value)
    load_weights(dst, src, skip_prefixes=("head.",))  # what fine-tuning does before a head reset
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src["blocks.1.mlp.fc2.weight"])


def test_missing_and_unexpected_keys_are_named():
    src = tiny().state_dict()
    src.pop("blocks.1.norm2.bias")
    src["blocks.1.ls1.gamma"] = torch.zeros(192)
    with pytest.raises(UserError, match=r"missing blocks\.1\.norm2\.bias.*unexpected blocks\.1\.ls1\.gamma"):
        load_weights(create_model("vit_ti16", img_size=32, depth=2, num_classes=5), src)


def test_posemb_grid_mismatch_without_resampling_is_an_error():
    src = tiny().state_dict()
    with pytest.raises(UserError, match=r"pos_embed: checkpoint \(1, 5, 192\) vs model \(1, 17, 192\)"):
        load_weights(create_model("vit_ti16", img_size=64, depth=2, num_classes=5), src, posemb_method=None)


def test_rectangular_source_grid_is_resampled_with_linear_method():
    src = tiny(img_size=32, img_width=64)  # 2x4 grid
    dst = create_model("vit_ti16", img_size=64, depth=2, num_classes=5)  # 4x4 grid
    load_weights(dst, src.state_dict(), posemb_method="linear", source_grid=(2, 4))
    from pretrain.model.posemb import resample_posemb

    expected = resample_posemb(src.pos_embed.detach(), (4, 4), method="linear", old_grid=(2, 4))
    torch.testing.assert_close(dst.pos_embed.detach(), expected)


def test_timm_features_we_do_not_have_are_reported():
    theirs = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=1, global_pool="avg"
    )
    with pytest.raises(UserError, match="fc_norm"):
        from_timm(theirs.state_dict())
    with pytest.raises(UserError, match="pre-logits"):
        to_timm(tiny(representation_size=48).state_dict())


def test_npz_layout_must_match_the_model(tmp_path):
    with pytest.raises(UserError, match="posemb_class_token=false"):
        save_npz(tiny(), tmp_path / "x.npz", layout="big_vision")
    with pytest.raises(UserError, match="unknown"):
        save_npz(tiny(), tmp_path / "x.npz", layout="flax")


def test_bad_npz_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        load_npz(junk)
    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3))
    with pytest.raises(UserError, match="embedding/kernel"):
        load_npz(other)
    model = tiny()
    extra = tmp_path / "map.npz"
    save_npz(model, extra)
    with np.load(extra) as npz:
        arrays = dict(npz)
    arrays["MAPHead_0/probe"] = np.zeros((1, 1, 192), np.float32)
    np.savez(extra, **arrays)
    with pytest.raises(UserError, match="MAPHead_0/probe"):
        load_npz(extra)
    del arrays["MAPHead_0/probe"], arrays["Transformer/encoder_norm/scale"]
    np.savez(extra, **arrays)
    with pytest.raises(UserError, match="missing array 'Transformer/encoder_norm/scale'"):
        load_npz(extra)
