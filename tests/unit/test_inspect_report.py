"""The inspection report: figures render, the page links only files that exist, and the
attention recomputed from hooks equals what the model's own SDPA computes."""
from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
import torch

from pretrain.inspect_attention import attention_maps
from pretrain.inspection import write_report
from pretrain.model import create_model


def tiny_vit(**overrides):
    torch.manual_seed(0)
    fields = dict(img_size=32, patch_size=4, width=32, depth=3, heads=4, mlp_dim=64, num_classes=10)
    return create_model("vit_ti16", **{**fields, **overrides})


def test_hook_attention_matches_the_models_attention_output():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(model, x)
    assert len(maps) == 3 and maps[0].shape == (2, 4, 65, 65)
    # Rebuild block 0's attention output from the recomputed weights and compare with SDPA's.
    captured = {}
    blk = model.blocks[0]
    h1 = blk.attn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    h2 = blk.attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(x)
    h1.remove(), h2.remove()
    B, N, D = captured["x"].shape
    v = blk.attn.qkv(captured["x"]).reshape(B, N, 3, 4, D // 4).permute(2, 0, 3, 1, 4)[2]
    rebuilt = blk.attn.proj((maps[0] @ v).transpose(1, 2).reshape(B, N, D))
    assert torch.allclose(rebuilt, captured["out"], atol=1e-5)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_report_pngs_render_and_html_links_exist(tmp_path, pool):
    model = tiny_vit(pool=pool)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    page = write_report(model, images, tmp_path, title="tiny", config_text="model: {name: tiny}",
                        results={"test_top1": 0.5}, captions=[f"img{i}" for i in range(6)])
    text = page.read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", text)
    assert {"filters.png", "posemb_similarity.png", "attention_distance.png", "attention_rollout.png"} <= set(links)
    for link in links:
        assert (tmp_path / link).is_file(), link
    for png in tmp_path.glob("*.png"):
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
        assert pixels[..., :3].std() > 0.01, f"{png.name} is blank"
    assert "test_top1" in text and "0.5000" in text and "model: {name: tiny}" in text
    numbers = json.loads((tmp_path / "inspection.json").read_text())
    assert len(numbers["attention_distance"]) == 3 and len(numbers["attention_distance"][0]) == 4
    assert numbers["grid"] == [8, 8]
    # distances live between 0 and the image diagonal
    flat = torch.tensor(numbers["attention_distance"])
    assert (flat >= 0).all() and (flat <= 32 * 2 ** 0.5).all()


def test_report_without_class_token_row_in_posemb(tmp_path):
    model = tiny_vit(posemb_class_token=False)
    write_report(model, torch.zeros(2, 3, 32, 32), tmp_path)
    sim = torch.tensor(json.loads((tmp_path / "inspection.json").read_text())["posemb_similarity"])
    assert sim.shape == (8, 8, 8, 8)
    assert torch.allclose(sim[3, 4, 3, 4], torch.tensor(1.0), atol=1e-5)
