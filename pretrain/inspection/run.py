"""`vit-inspect`: the paper's Section 4.5 figures for any checkpoint, plus an HTML page.

    vit-inspect RUN_DIR_OR_WEIGHTS [--images DIR_OR_SHARDS] [--model NAME] --out DIR

Writes into DIR: `filters.png` (patch-embedding principal components), `posemb_similarity.png`,
`attention_distance.png`, `attention_rollout.png`, `inspection.json` (the numbers behind the
figures) and `index.html` showing them with the run's config and results table.
`write_report(model, images, out_dir)` is the same thing as a function (the demo calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from pretrain.inspection import figures
from pretrain.inspection.attention import iter_attention_maps, mean_attention_distance, output_token_map, rollout_step
from pretrain.inspection.embeddings import filter_components, posemb_similarity
from vitscale_common.atomic import atomic_write_text
from vitscale_common.errors import UserError, cli_entry

# How many images go into the attention statistics and how many get a rollout overlay.
ATTENTION_SAMPLE = 32
ROLLOUT_SHOWN = 8
CHUNK = 4  # images per forward pass while collecting attention


def _grid(model: nn.Module) -> tuple[int, int]:
    grid = getattr(model, "grid_size", None) or model.patch_embed.grid_size
    return (grid, grid) if isinstance(grid, int) else tuple(grid)


def _patch_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "cfg", None), "patch_size", None) or model.patch_embed.patch_size
    return size if isinstance(size, int) else size[0]


def inspect_model(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The arrays behind every figure, for `images` already normalised for the model.

    Images go through in chunks and each block's attention is reduced as soon as it is
    computed, so memory stays bounded by one block's (chunk, heads, N, N) maps.
    """
    grid, prefix = _grid(model), model.num_prefix_tokens
    out: dict[str, torch.Tensor] = {}
    proj = model.patch_embed.proj.weight
    if proj.shape[1] == 3:  # a hybrid's 1x1 projection of ResNet features has no RGB filters
        out["filters"] = filter_components(proj)
    if getattr(model, "pos_embed", None) is not None:
        # big_vision's layout has no class-token row even when the model has a class token.
        posemb_prefix = model.pos_embed.shape[1] - grid[0] * grid[1]
        out["posemb_similarity"] = posemb_similarity(model.pos_embed, grid, posemb_prefix)
    sample = images[:ATTENTION_SAMPLE]
    distance_sum, rollouts = None, []
    for start in range(0, len(sample), CHUNK):
        chunk = sample[start : start + CHUNK]
        rollout = None
        per_layer = []
        for attn in iter_attention_maps(model, chunk):
            per_layer.append(mean_attention_distance(attn, grid, prefix, _patch_size(model)) * len(chunk))
            if start < ROLLOUT_SHOWN:
                rollout = rollout_step(rollout, attn)
        distance_sum = torch.stack(per_layer) if distance_sum is None else distance_sum + torch.stack(per_layer)
        if rollout is not None:
            rollouts.append(output_token_map(rollout.float(), grid, prefix))
    out["attention_distance"] = distance_sum / len(sample)  # (depth, heads)
    out["rollout"] = torch.cat(rollouts)[:ROLLOUT_SHOWN]  # (b, gh, gw)
    return out


def _results_table(results: dict[str, Any] | list | None) -> str:
    if not results:
        return "<p>No results recorded.</p>"
    rows = results if isinstance(results, list) else [{"metric": k, "value": v} for k, v in results.items()]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c, '')))}</td>" for c in cols) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return (
        f"{value:.4f}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, (dict, list))
        else str(value)
    )


def write_report(
    model: nn.Module,
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    title: str = "ViT inspection",
    config_text: str | None = None,
    results: dict[str, Any] | list | None = None,
    captions: list[str] | None = None,
) -> Path:
    """Write the figures, their numbers and `index.html` into `out_dir`; returns the page.

    `images` (B, 3, H, W) are normalised for the model with `mean`/`std` (undone for display);
    `config_text` and `results` (a metric -> value mapping or a list of row dicts) are shown
    on the page when given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = inspect_model(model, images)
    img_size = images.shape[-1]

    sections: list[tuple[str, str, str]] = []  # (title, file, caption)
    if "filters" in data:
        figures.plot_filters(data["filters"], out / "filters.png")
        sections.append(
            (
                "Embedding filters",
                "filters.png",
                "Principal components of the linear patch-embedding filters (paper Fig. 7, left).",
            )
        )
    if "posemb_similarity" in data:
        figures.plot_posemb_similarity(data["posemb_similarity"], out / "posemb_similarity.png")
        sections.append(
            (
                "Position embeddings",
                "posemb_similarity.png",
                "Cosine similarity of each patch's position embedding with all others (Fig. 7, centre).",
            )
        )
    figures.plot_attention_distance(data["attention_distance"], out / "attention_distance.png", img_size)
    sections.append(
        (
            "Mean attention distance",
            "attention_distance.png",
            f"Per head and layer, averaged over {min(len(images), ATTENTION_SAMPLE)} images (Fig. 7, right).",
        )
    )
    shown = images[:ROLLOUT_SHOWN]
    display = shown * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    figures.plot_rollout(
        display, data["rollout"], out / "attention_rollout.png", captions[:ROLLOUT_SHOWN] if captions else None
    )
    sections.append(
        ("Attention rollout", "attention_rollout.png", "Attention from the output token to the input space (Fig. 6).")
    )

    numbers = {k: v.tolist() for k, v in data.items() if k not in ("filters", "rollout")}
    numbers["grid"] = list(_grid(model))
    numbers["patch_size"] = _patch_size(model)
    atomic_write_text(out / "inspection.json", json.dumps(numbers))

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Results</h2>",
        _results_table(results),
    ]
    for head, file, caption in sections:
        parts.append(f"<h2>{head}</h2><img src='{file}' alt='{head}'><p>{html.escape(caption)}</p>")
    if config_text:
        parts.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")
    parts.append("</body></html>")
    page = out / "index.html"
    atomic_write_text(page, "\n".join(parts))
    return page


# --------------------------------------------------------------------------- command line
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_model(path: str | Path, model_name: str | None, img_size: int | None) -> tuple[nn.Module, Any]:
    """The model a run directory, export or weights file holds (all layers kept), in eval mode."""
    from pretrain.checkpoint.starting_weights import fit_to_model, read_source
    from pretrain.model import build_model, model_config
    from pretrain.model.state_dict import infer_model_fields

    source = read_source(path)
    if source.model is not None:
        cfg = source.model
    elif model_name:
        # The weights fix every shape but the number of heads, which comes from the variant.
        cfg = model_config(model_name, **infer_model_fields(source.state))
    else:
        raise UserError(f"{path}: a {source.kind} file does not record its architecture; pass --model NAME")
    if img_size is None and source.model is None and "pos_embed" in source.state:
        rows = source.state["pos_embed"].shape[1] - cfg.num_prefix_tokens * cfg.posemb_class_token
        img_size = math.isqrt(rows) * cfg.patch_size
    if img_size:
        cfg = dataclasses.replace(cfg, img_size=img_size, img_width=None)
    model = build_model(cfg)
    fit_to_model(source, model, reset_head=False)
    return model.eval(), source


def _image_files(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files[:limit]


def images_from_folder(folder: Path, img_size: int, mean, std, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Image files -> centre-cropped, resized, normalised (B, 3, S, S)."""
    import numpy as np
    from PIL import Image

    from pretrain.data.device_input import DeviceInput

    batch, names = [], []
    for f in _image_files(folder, limit):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((img_size, img_size), Image.BICUBIC)
                batch.append(np.asarray(im, dtype=np.uint8))
        except OSError as e:
            raise UserError(f"{f}: cannot read image: {e}") from None
        names.append(f.name)
    return DeviceInput(mean, std).images(torch.from_numpy(np.stack(batch)), "cpu"), names


def images_from_shards(path: Path, split: str, img_size: int, data_section: dict, limit: int) -> torch.Tensor:
    """The first `limit` images of a shard dataset's split, through the evaluation transform."""
    from pretrain.data.loaders import DataConfig, build_eval_loader

    fields = {k: v for k, v in data_section.items() if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(**{**fields, "path": str(path), "workers": 0})
    loader = build_eval_loader(cfg, split, img_size=img_size, batch_size=limit, rank=0, world_size=1)
    images, _, valid = next(iter(loader))
    return loader.device_input.images(images[valid.bool()], "cpu")


def _run_context(run_dir: Path | None) -> tuple[str | None, dict, Any]:
    """(config text, data section, results) recorded in a run directory, where there is one."""
    if run_dir is None:
        return None, {}, None
    from omegaconf import OmegaConf

    config_path = run_dir / "config.yaml"
    text = config_path.read_text() if config_path.is_file() else None
    data = OmegaConf.to_container(OmegaConf.load(config_path)).get("data", {}) if text else {}
    results = None
    if (run_dir / "results.json").is_file():
        results = [{"split": s, **r} for s, r in json.loads((run_dir / "results.json").read_text())["results"].items()]
    else:
        from pretrain.train.run_log import read_metrics

        evals = read_metrics(run_dir, "eval")
        results = {k: v for k, v in evals[-1].items() if k != "kind"} if evals else None
    return text, data, results


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="vit-inspect",
        description=__doc__.split("\n\n")[0],
        epilog="Example: vit-inspect runs/demo_ft --out runs/demo_ft/report/inspect",
    )
    p.add_argument("source", help="run directory, export directory, timm .safetensors/.pth or official .npz")
    p.add_argument("--images", help="folder of image files, or a shard dataset (default: the run's data.path)")
    p.add_argument("--split", default="", help="split of a shard dataset to sample (default: the run's eval split)")
    p.add_argument("--num-images", type=int, default=ATTENTION_SAMPLE, help="images for the attention statistics")
    p.add_argument("--model", help="registered variant, for weights files that do not record it (e.g. vit_b16)")
    p.add_argument("--img-size", type=int, help="resolution to inspect at (default: the weights' own)")
    p.add_argument("--out", required=True, help="output folder for the PNGs and index.html")
    return p.parse_args(argv)


@cli_entry
@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    model, source = load_model(args.source, args.model, args.img_size)
    config_text, data, results = _run_context(source.run_dir)
    mean, std = data.get("mean", (0.5, 0.5, 0.5)), data.get("std", (0.5, 0.5, 0.5))
    img_size = model.cfg.img_size
    images_at = Path(args.images) if args.images else (Path(data["path"]) if data.get("path") else None)
    if images_at is None or not images_at.exists():
        raise UserError(
            f"--images: {images_at or 'not given'} does not exist; pass a folder of images or a shard dataset"
        )
    captions = None
    if (images_at / "dataset.json").is_file():
        split = args.split or data.get("eval_split", "val")
        images = images_from_shards(images_at, split, img_size, data, args.num_images)
    else:
        images, captions = images_from_folder(images_at, img_size, mean, std, args.num_images)
    page = write_report(
        model,
        images,
        args.out,
        mean=mean,
        std=std,
        title=f"Inspection of {args.source}",
        config_text=config_text,
        results=results,
        captions=captions,
    )
    print(f"wrote {page} ({len(images)} images, model {model.cfg.name} at {img_size} px)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
