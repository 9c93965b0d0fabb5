"""Position-embedding resampling equals timm (bicubic + antialias) and scipy zoom (official JAX)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from pretrain.model.posemb import resample_posemb
from vitscale_common.errors import UserError


def posemb(grid=(14, 14), prefix=1, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g)


@pytest.mark.parametrize(
    "old, new", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (12, 16)), ((6, 9), (10, 5))]
)
def test_bicubic_equals_timm_resample_abs_pos_embed(old, new):
    from timm.layers import resample_abs_pos_embed

    pe = posemb(old)
    ours = resample_posemb(pe, new, old_grid=old)
    theirs = resample_abs_pos_embed(
        pe, list(new), old_size=list(old), num_prefix_tokens=1, interpolation="bicubic", antialias=True
    )
    assert ours.shape == (1, 1 + new[0] * new[1], 32)
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    "old, new", [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (12, 16)), ((6, 9), (10, 5))]
)
def test_linear_equals_scipy_zoom_order_1(old, new):
    pe = posemb(old)
    ours = resample_posemb(pe, new, method="linear", old_grid=old)
    grid = pe[0, 1:].numpy().reshape(*old, -1)
    # The official vision_transformer code, verbatim in spirit: zoom the (H, W, D) grid.
    zoomed = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    expected = np.concatenate([pe[0, :1].numpy(), zoomed.reshape(-1, grid.shape[-1])])[None]
    assert np.abs(ours.numpy() - expected).max() <= 1e-6
    assert torch.equal(ours[:, :1], pe[:, :1])  # the class token is kept


@pytest.mark.parametrize("method", ["bicubic", "bicubic_no_antialias", "linear"])
def test_same_grid_is_identity(method):
    pe = posemb((5, 5), prefix=1)
    assert torch.equal(resample_posemb(pe, (5, 5), method=method), pe)


def test_no_prefix_tokens_big_vision_layout():
    pe = posemb((4, 4), prefix=0)
    out = resample_posemb(pe, (8, 8), num_prefix_tokens=0, method="linear")
    assert out.shape == (1, 64, 32)
    torch.testing.assert_close(out[0, 0], pe[0, 0])  # corners stay in place with zoom(order=1)
    torch.testing.assert_close(out[0, -1], pe[0, -1])


def test_dtype_is_preserved():
    out = resample_posemb(posemb((4, 4)).to(torch.bfloat16), (6, 6))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(posemb=torch.zeros(1, 1 + 15, 8), new_grid=(4, 4)), "not a square grid"),
        (dict(posemb=torch.zeros(1, 1 + 16, 8), new_grid=(4, 4), old_grid=(3, 5)), "does not hold"),
        (dict(posemb=torch.zeros(16, 8), new_grid=(4, 4)), "shape"),
        (dict(posemb=torch.zeros(1, 17, 8), new_grid=(0, 4)), "positive"),
        (dict(posemb=torch.zeros(1, 17, 8), new_grid=(4, 4), method="nearest"), "unknown"),
    ],
)
def test_errors_are_clear(kwargs, match):
    with pytest.raises(UserError, match=match):
        resample_posemb(**kwargs)
