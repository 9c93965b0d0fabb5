"""The numbers behind the inspection figures, checked against constructed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pretrain.inspection.attention import (
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    output_token_map,
    patch_distances,
)
from pretrain.inspection.embeddings import filter_components, posemb_similarity


def smooth_posemb(grid: int, dim: int = 64) -> torch.Tensor:
    """2D sinusoidal embeddings of low frequency: nearby positions get similar vectors."""
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    freqs = torch.linspace(0.05, 0.4, dim // 4, dtype=torch.float64)
    feats = [f(c[..., None] * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    pe = torch.cat(feats, dim=-1).reshape(1, grid * grid, dim)
    cls = torch.randn(1, 1, dim, dtype=torch.float64)
    return torch.cat([cls, pe], dim=1).float()


def test_posemb_similarity_is_higher_for_nearer_patches():
    grid = 6
    sim = posemb_similarity(smooth_posemb(grid), (grid, grid), num_prefix_tokens=1)
    assert sim.shape == (grid, grid, grid, grid)
    assert torch.allclose(sim[2, 3, 2, 3], torch.tensor(1.0), atol=1e-5)
    dist = patch_distances((grid, grid)).reshape(grid, grid, grid, grid).float()
    # For every query patch, similarity falls monotonically (on average) with distance:
    # the mean similarity at distance 1 beats distance 2, which beats distance >= 3.
    for i in range(grid):
        for j in range(grid):
            s, d = sim[i, j], dist[i, j]
            near, mid, far = s[(d > 0) & (d <= 1)].mean(), s[(d > 1) & (d <= 2)].mean(), s[d > 3].mean()
            assert near > mid > far, (i, j, near, mid, far)
    # and rank correlation over all pairs is strongly negative
    flat_s, flat_d = sim.flatten(), dist.flatten()
    rank = lambda t: t.argsort().argsort().double()
    corr = torch.corrcoef(torch.stack([rank(flat_s), rank(flat_d)]))[0, 1]
    assert corr < -0.8


def test_posemb_similarity_rejects_wrong_grid():
    with pytest.raises(ValueError, match="grid 3x3"):
        posemb_similarity(torch.randn(1, 17, 8), (3, 3))


def attention_with_prefix(patch_attn: torch.Tensor) -> torch.Tensor:
    """Embed a (HW, HW) patch attention into (1, 1, 1+HW, 1+HW) with some class-token mass."""
    n = patch_attn.shape[0]
    a = torch.zeros(1, 1, n + 1, n + 1, dtype=torch.float64)
    a[0, 0, 0, :] = 1.0 / (n + 1)
    a[0, 0, 1:, 0] = 0.3  # dropped and renormalised away
    a[0, 0, 1:, 1:] = 0.7 * patch_attn
    return a


def test_self_only_head_has_zero_distance():
    grid = (4, 5)
    n = grid[0] * grid[1]
    d = mean_attention_distance(attention_with_prefix(torch.eye(n, dtype=torch.float64)), grid, 1, patch_size=16)
    assert d.shape == (1,)
    assert d.item() == pytest.approx(0.0, abs=1e-9)


def test_uniform_head_gives_the_grid_mean_distance():
    # 2x2 grid, patch 16 px: each patch sees itself (0), two neighbours (16) and a diagonal
    # (16 * sqrt 2), so the mean is 16 * (2 + sqrt 2) / 4.
    n = 4
    d = mean_attention_distance(attention_with_prefix(torch.full((n, n), 1.0 / n)), (2, 2), 1, patch_size=16)
    assert d.item() == pytest.approx(16 * (2 + math.sqrt(2)) / 4, rel=1e-6)
    # 3x3 grid, brute-force mean over all ordered pairs of patch centres.
    pts = [(y, x) for y in range(3) for x in range(3)]
    expected = sum(math.dist(a, b) for a in pts for b in pts) / 81
    d3 = mean_attention_distance(attention_with_prefix(torch.full((9, 9), 1 / 9)), (3, 3), 1, patch_size=1)
    assert d3.item() == pytest.approx(expected, rel=1e-6)


def test_attention_rollout_matches_hand_computation():
    # Two layers, two tokens, one head each; residual weight 0.5.
    a1 = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])  # swap
    a2 = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    # layer 1: 0.5 I + 0.5 A1 = [[.5,.5],[.5,.5]]; layer 2: 0.5 I + 0.5 A2 = [[.75,.25],[0,1]]
    # rollout = L2 @ L1 = [[.5,.5],[.5,.5]]
    r = attention_rollout([a1, a2])
    assert torch.allclose(r[0], torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    # reverse order: L1 @ L2 = [[.375, .625], [.375, .625]]
    r = attention_rollout([a2, a1])
    assert torch.allclose(r[0], torch.tensor([[0.375, 0.625], [0.375, 0.625]]))
    # heads are averaged before mixing in the identity
    two_heads = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    r = attention_rollout([two_heads])
    assert torch.allclose(r[0], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_output_token_map_reads_the_class_token_row():
    r = torch.tensor([[[0.2, 0.1, 0.4, 0.2, 0.1]] * 5])  # (1, 5, 5): class token + 2x2 patches
    m = output_token_map(r, (2, 2), num_prefix_tokens=1)
    assert torch.allclose(m[0], torch.tensor([[0.25, 1.0], [0.5, 0.25]]))


def test_filter_components_are_orthonormal_and_ordered():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(48, 3))[0].T  # 3 orthonormal directions
    coeffs = torch.randn(64, 3) * torch.tensor([10.0, 3.0, 1.0])  # decreasing variance
    w = (coeffs @ basis).reshape(64, 3, 4, 4) + 0.001 * torch.randn(64, 3, 4, 4)
    pcs = filter_components(w, k=5)
    assert pcs.shape == (5, 3, 4, 4)
    flat = pcs.reshape(5, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(5), atol=1e-5)
    # the leading component is the highest-variance direction (up to sign)
    assert abs(float(flat[0] @ basis[0])) > 0.99


class TinyAttention(nn.Module):
    """A reference attention that computes its weights explicitly (the slow path)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.last = None

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        self.last = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj((self.last @ v).transpose(1, 2).reshape(B, N, D))


class TinyBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TinyAttention(dim, heads)

    def forward(self, x):
        return x + self.attn(self.norm1(x))


class TinyViT(nn.Module):
    def __init__(self, dim=16, heads=2, depth=3):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))

    def forward(self, x):  # x: (B, N, 12) tokens
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return x.mean(1)


def test_attention_maps_recomputed_from_hooks_equal_explicit_weights():
    torch.manual_seed(0)
    model = TinyViT()
    maps = attention_maps(model, torch.randn(2, 5, 12))
    assert len(maps) == 3
    for blk, a in zip(model.blocks, maps):
        assert a.shape == (2, 2, 5, 5)
        assert torch.allclose(a, blk.attn.last, atol=1e-6)
        assert torch.allclose(a.sum(-1), torch.ones(2, 2, 5), atol=1e-6)
