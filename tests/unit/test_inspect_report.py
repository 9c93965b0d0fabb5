"""The inspection report: figures render, the page links only files that exist, and the
attention recomputed from hooks equals what the model's own SDPA computes."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
import torch

from pretrain.inspection.attention import attention_maps
from pretrain.inspection.run import write_report
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
    page = write_report(
        model,
        images,
        tmp_path,
        title="tiny",
        config_text="model: {name: tiny}",
        results={"test_top1": 0.5},
        captions=[f"img{i}" for i in range(6)],
    )
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
    assert (flat >= 0).all() and (flat <= 32 * 2**0.5).all()


def test_report_without_class_token_row_in_posemb(tmp_path):
    model = tiny_vit(posemb_class_token=False)
    write_report(model, torch.zeros(2, 3, 32, 32), tmp_path)
    sim = torch.tensor(json.loads((tmp_path / "inspection.json").read_text())["posemb_similarity"])
    assert sim.shape == (8, 8, 8, 8)
    assert torch.allclose(sim[3, 4, 3, 4], torch.tensor(1.0), atol=1e-5)


def test_cli_on_a_timm_file_and_an_image_folder(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from pretrain.inspection.run import main

    model = tiny_vit(width=48, heads=3, pool="token")  # vit_ti16 has 3 heads
    weights = tmp_path / "timm_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 10 * i, 30), (80 * i, 120, 200)).save(images / f"im{i}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main([str(weights), "--model", "vit_ti16", "--images", str(images), "--out", str(out)]) == 0
    numbers = json.loads((out / "inspection.json").read_text())
    assert numbers["grid"] == [8, 8] and numbers["patch_size"] == 4  # inferred from the weights
    assert len(numbers["attention_distance"][0]) == 3
    # at another resolution the position embedding is resampled
    assert (
        main(
            [
                str(weights),
                "--model",
                "vit_ti16",
                "--img-size",
                "48",
                "--images",
                str(images),
                "--out",
                str(tmp_path / "out48"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out48" / "inspection.json").read_text())["grid"] == [12, 12]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from pretrain.inspection.run import main

    assert main([str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    weights = tmp_path / "w.pth"
    torch.save(tiny_vit(width=48, heads=3).state_dict(), weights)
    assert main([str(weights), "--out", str(tmp_path / "o")]) == 2
    assert "pass --model NAME" in capsys.readouterr().err
    assert main([str(weights), "--model", "vit_ti16", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_figure_data_of_a_model_with_smooth_position_embeddings():
    """The similarity figure's own data (through `inspect_model`), for a model whose position
    embeddings are 2D-smooth by construction: nearer patches are more similar."""
    from pretrain.inspection.attention import patch_distances
    from pretrain.inspection.run import inspect_model

    model = tiny_vit()
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    freqs = torch.linspace(0.05, 0.35, 8)
    smooth = torch.cat([f(c.flatten()[:, None] * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)], dim=1)
    with torch.no_grad():
        model.pos_embed[0, 1:] = smooth  # (64, 32)
    sim = inspect_model(model, torch.zeros(1, 3, 32, 32))["posemb_similarity"].flatten()
    dist = patch_distances((8, 8)).flatten().float()
    by_distance = [sim[(dist > lo) & (dist <= lo + 1)].mean().item() for lo in range(0, 8)]
    assert all(a > b for a, b in zip(by_distance, by_distance[1:])), by_distance


def test_chunked_inspection_equals_whole_batch_computation():
    from pretrain.inspection.attention import attention_rollout, mean_attention_distance, output_token_map
    from pretrain.inspection.run import CHUNK, ROLLOUT_SHOWN, inspect_model

    model = tiny_vit()
    torch.manual_seed(1)
    images = torch.randn(2 * CHUNK + 3, 3, 32, 32)  # chunks of unequal size
    data = inspect_model(model, images)
    maps = attention_maps(model, images)
    expected = torch.stack([mean_attention_distance(a, (8, 8), 1, 4) for a in maps])
    assert torch.allclose(data["attention_distance"], expected, rtol=1e-5)
    rollout = output_token_map(attention_rollout([a[:ROLLOUT_SHOWN] for a in maps]), (8, 8), 1)
    assert data["rollout"].shape == (ROLLOUT_SHOWN, 8, 8)
    assert torch.allclose(data["rollout"], rollout, atol=1e-6)
