"""Starting a fine-tune: identity at the same resolution, interpolation at twice the
resolution (paper 3.2) against re-initialised position embeddings, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint.starting_weights import Source, fit_to_model
from pretrain.model import create_model
from vitscale_common.errors import UserError

TINY = dict(patch_size=4, width=64, depth=4, heads=4, mlp_dim=128)


def tiny(img_size=16, **overrides):
    return create_model("vit_ti16", **{**TINY, "img_size": img_size, "num_classes": 10, **overrides})


def source_of(model, kind="export") -> Source:
    return Source(
        path=f"<{kind}>", kind=kind, state={k: v.clone() for k, v in model.state_dict().items()}, model=model.cfg
    )


def test_same_resolution_reproduces_features_and_logits_exactly():
    torch.manual_seed(0)
    pre = tiny(representation_size=32)
    with torch.no_grad():  # a non-zero head, so "logits equal" is a real check
        pre.head.weight.normal_()
        pre.head.bias.normal_()
    x = torch.randn(4, 3, 16, 16)
    pre.eval()
    # head kept: identical logits
    kept = tiny(representation_size=32).eval()
    report = fit_to_model(source_of(pre), kept, reset_head=False)
    assert torch.equal(kept(x), pre(x))
    assert report.posemb == "kept" and report.reinitialised == [] and report.dropped == []
    # new head (and pre-logits dropped): the features before the head are identical
    new = tiny(num_classes=7).eval()
    report = fit_to_model(source_of(pre), new)
    assert torch.equal(new.forward_features(x), pre.forward_features(x))
    assert report.dropped == ["head.*", "pre_logits.*"] and report.reinitialised == ["head.*"]
    assert torch.count_nonzero(new.head.weight) == 0 and new(x).abs().max() == 0
    # pre-logits kept: the representation the head sees is identical too
    rep = tiny(num_classes=7, representation_size=32).eval()
    fit_to_model(source_of(pre), rep)
    assert torch.equal(
        rep.forward_head(rep.forward_features(x), pre_logits=True),
        pre.forward_head(pre.forward_features(x), pre_logits=True),
    )


def test_resolution_change_resamples_and_is_reported():
    torch.manual_seed(0)
    pre = tiny()
    big = tiny(img_size=32)
    report = fit_to_model(source_of(pre), big, posemb_method="linear")
    assert big.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.equal(big.pos_embed[:, :1], pre.pos_embed[:, :1])  # class token row kept
    assert report.grid == ((4, 4), (8, 8)) and report.resolution == ((16, 16), (32, 32))
    assert report.posemb == "resampled (linear)"
    # linear resampling keeps the corner embeddings (align_corners semantics of scipy zoom)
    old = pre.pos_embed[0, 1:].reshape(4, 4, -1)
    new = big.pos_embed[0, 1:].reshape(8, 8, -1)
    assert torch.allclose(new[0, 0], old[0, 0], atol=1e-6) and torch.allclose(new[-1, -1], old[-1, -1], atol=1e-6)
    text = "\n".join(report.lines())
    assert "16x16 -> 32x32" in text and "4x4 -> 8x8" in text and "re-initialised head.*" in text
    # a timm-style source (no recorded architecture): the grid is inferred from the length
    report = fit_to_model(Source("<timm>", "timm", dict(pre.state_dict())), tiny(img_size=32))
    assert report.grid == ((4, 4), (8, 8)) and report.resolution == ((16, 16), (32, 32))


def test_mismatched_architecture_names_the_keys():
    src = source_of(tiny())
    with pytest.raises(UserError, match=r"blocks\.0\.mlp\.fc1\.weight: <export> \(128, 64\) vs model \(96, 64\)"):
        fit_to_model(src, tiny(mlp_dim=96))
    with pytest.raises(UserError, match=r"unexpected blocks\.3"):
        fit_to_model(src, create_model("vit_ti16", **{**TINY, "depth": 3, "img_size": 16, "num_classes": 10}))
    with pytest.raises(UserError, match=r"head\.weight: <export> \(10, 64\) vs model \(5, 64\)"):
        fit_to_model(src, tiny(num_classes=5), reset_head=False)


# ----------------------------------------------------------------- interpolation works
def digits(size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(d.target)


def top1(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(-1) == y).float().mean().item()


def random_zoom(x: torch.Tensor, min_area: float) -> torch.Tensor:
    """Per-image random square crop of [min_area, 1] of the area, resized back (Inception-style
    crop as in pretraining): the model sees digits at several scales, as real data has them."""
    b = x.shape[0]
    side = torch.empty(b).uniform_(min_area, 1.0).sqrt()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = (torch.rand(b, 2) * 2 - 1) * (1 - side)[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.fixture(scope="module")
def one_thread():
    """One float reduction order: the trained model, and the figures below, are the same
    however many threads pytest was started with (`make test` sets one; 2 threads moved
    the re-initialised top-1 from 0.27 to 0.44)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained_16px(one_thread):
    """A tiny ViT trained on digits at 16 px with its pretraining head (~15 s)."""
    torch.manual_seed(0)
    x, y = digits(16)
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for _epoch in range(20):
        for idx in train[torch.randperm(len(train))].split(64):
            loss = F.cross_entropy(model(random_zoom(x[idx], 0.35)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test


@pytest.mark.slow
def test_interpolated_posemb_keeps_accuracy_at_twice_the_resolution(pretrained_16px):
    model, test = pretrained_16px
    x16, y = digits(16)
    x32, _ = digits(32)
    acc_r = top1(model, x16[test], y[test])
    assert acc_r >= 0.85, acc_r
    results = {}
    for method in ("bicubic", "linear"):
        big = tiny(img_size=32)
        fit_to_model(source_of(model), big, reset_head=False, posemb_method=method)
        results[method] = top1(big, x32[test], y[test])
    # Re-initialised: random embeddings at the trained ones' scale, so the tokens keep their
    # statistics and only the position information is gone. (At the fresh-init scale, std 0.02,
    # the model falls less far: it then reads the digits as an unordered bag of patches.)
    reinit = tiny(img_size=32)
    fit_to_model(source_of(model), reinit, reset_head=False)
    with torch.no_grad():
        torch.manual_seed(1)
        reinit.pos_embed.normal_(std=model.pos_embed.std().item())
    results["reinit"] = top1(reinit, x32[test], y[test])
    # For the record (docs/FINETUNE.md), not asserted: position information removed outright
    # (every patch gets the mean interpolated embedding) and scrambled (a random permutation).
    for name, scramble in (
        ("mean", lambda e: e.mean(1, keepdim=True).expand_as(e)),
        ("permuted", lambda e: e[:, torch.randperm(e.shape[1], generator=torch.Generator().manual_seed(0))]),
    ):
        probe = tiny(img_size=32)
        fit_to_model(source_of(model), probe, reset_head=False)
        with torch.no_grad():
            probe.pos_embed[:, 1:] = scramble(probe.pos_embed[:, 1:].clone())
        results[name] = top1(probe, x32[test], y[test])
    print(f"top-1 at 16 px {acc_r:.3f}; at 32 px: {results}")
    assert results["bicubic"] >= 0.7 * acc_r and results["linear"] >= 0.7 * acc_r, results
    # "About chance" needs a model that cannot read digits from unordered patches; this tiny one
    # partly can, so the bound is loose: far below the interpolated model, and below 0.4.
    assert results["reinit"] <= 0.4 and results["reinit"] <= 0.5 * results["bicubic"], results


@pytest.mark.parametrize("src_hw", [(8, 32), (8, 12)])  # 2x8 and 2x3 patch grids
@pytest.mark.parametrize("dst_hw", [(16, 16), (16, 64)])  # 4x4 and 4x16
def test_non_square_source_grids_resample_as_timm(src_hw, dst_hw):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pre = tiny(img_size=src_hw[0], img_width=src_hw[1])
    src_grid = pre.cfg.grid_size
    want = resample_abs_pos_embed(
        pre.pos_embed.detach(), new_size=[dst_hw[0] // 4, dst_hw[1] // 4], old_size=list(src_grid), num_prefix_tokens=1
    )
    # a run or export records its grid; a timm file does not and takes it from init.source_grid
    for source, grid in [(source_of(pre), None), (Source("<timm>", "timm", dict(pre.state_dict())), src_grid)]:
        target = tiny(img_size=dst_hw[0], img_width=dst_hw[1])
        report = fit_to_model(source, target, source_grid=grid)
        assert report.grid == (src_grid, target.cfg.grid_size)
        torch.testing.assert_close(target.pos_embed.detach(), want, rtol=0, atol=1e-6)


def test_a_non_square_grid_nothing_records_is_asked_for():
    pre = tiny(img_size=8, img_width=12)  # 2x3: 6 rows are no square
    with pytest.raises(UserError, match=r"init.source_grid=\[H,W\]"):
        fit_to_model(Source("<timm>", "timm", dict(pre.state_dict())), tiny())
    with pytest.raises(UserError, match="does not hold the 7 rows"):
        fit_to_model(Source("<timm>", "timm", dict(pre.state_dict())), tiny(), source_grid=(2, 4))
    with pytest.raises(UserError, match="records a 2x3 patch grid"):
        fit_to_model(source_of(pre), tiny(), source_grid=(3, 2))
