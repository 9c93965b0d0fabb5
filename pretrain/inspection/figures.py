"""PNG figures in the style of the paper's Figures 6 and 7, drawn from plain arrays.

Matplotlib runs on the Agg backend (files only, no display). Large panels (the position
embedding grid has H*W small maps) are assembled into one array and drawn with a single
`imshow`, so a 24x24 grid at 384 px costs one image, not 576 axes.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_filters(components: torch.Tensor, path: Path) -> Path:
    """(k, C, P, P) principal components -> a grid of RGB tiles, each stretched to [0, 1]."""
    k = components.shape[0]
    cols = min(7, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        tile = components[i].numpy()
        tile = (tile - tile.min()) / max(float(tile.max() - tile.min()), 1e-12)
        ax.imshow(tile.transpose(1, 2, 0) if tile.shape[0] == 3 else tile.mean(0), cmap="gray")
    fig.suptitle(f"RGB embedding filters (first {k} principal components)", fontsize=9)
    return _save(fig, path)


def plot_posemb_similarity(sim: torch.Tensor, path: Path) -> Path:
    """(H, W, H, W) cosine similarities -> the paper's grid of per-patch similarity maps."""
    gh, gw = sim.shape[:2]
    pad = 1
    canvas = np.full((gh * (gh + pad) - pad, gw * (gw + pad) - pad), np.nan)
    for i in range(gh):
        for j in range(gw):
            y, x = i * (gh + pad), j * (gw + pad)
            canvas[y : y + gh, x : x + gw] = sim[i, j].numpy()
    size = min(10.0, 2.0 + 0.3 * max(gh, gw))
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(canvas, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([(gw + pad) * j + gw / 2 - 0.5 for j in range(gw)], range(1, gw + 1), fontsize=6)
    ax.set_yticks([(gh + pad) * i + gh / 2 - 0.5 for i in range(gh)], range(1, gh + 1), fontsize=6)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title("Position embedding similarity")
    fig.colorbar(im, ax=ax, fraction=0.046, label="Cosine similarity")
    return _save(fig, path)


def plot_attention_distance(distances: torch.Tensor, path: Path, img_size: int | None = None) -> Path:
    """(depth, heads) mean attention distances in pixels -> scatter of heads against depth."""
    depth, heads = distances.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for h in range(heads):
        ax.scatter(np.arange(depth), distances[:, h].numpy(), s=12, label=f"Head {h + 1}")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_title("Mean attention distance by head")
    if img_size is not None:
        ax.set_ylim(0, img_size)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    return _save(fig, path)


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, path: Path, captions: list[str] | None = None) -> Path:
    """(B, 3, H, W) images in [0, 1] and (B, gh, gw) rollout maps -> input / overlay pairs."""
    b = images.shape[0]
    size = images.shape[-2:]
    up = torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ].clamp(0, 1)
    fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.8), squeeze=False)
    for i in range(b):
        img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[0, i].imshow(img)
        axes[1, i].imshow(img * up[i, :, :, None].numpy())
        for ax in axes[:, i]:
            ax.axis("off")
        if captions:
            axes[0, i].set_title(captions[i], fontsize=7)
    axes[0, 0].text(-0.1, 0.5, "Input", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "Attention", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    return _save(fig, path)
