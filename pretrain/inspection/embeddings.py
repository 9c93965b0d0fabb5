"""What a ViT's embeddings learned (paper Fig. 7, left and centre), as plain arrays.

- `filter_components`: the principal components of the patch-embedding filters; the paper
  finds they resemble plausible basis functions for a low-dimensional patch representation.
- `posemb_similarity`: the cosine similarity of each patch's position embedding with every
  other's; a trained model shows nearby patches as similar, with row/column structure.
"""

from __future__ import annotations

import torch


def filter_components(proj_weight: torch.Tensor, k: int = 28) -> torch.Tensor:
    """(D, C, P, P) patch-embedding weights -> (k', C, P, P) leading principal components.

    Each of the D output filters is one observation of C*P*P pixels; the components are the
    right singular vectors of the centred observations, strongest first (k' = min(k, rank)).
    """
    d = proj_weight.shape[0]
    x = proj_weight.detach().double().reshape(d, -1)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # (min(D, CPP), CPP)
    k = min(k, vh.shape[0])
    return vh[:k].reshape(k, *proj_weight.shape[1:]).float()


def posemb_similarity(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + H*W, D) position embeddings -> (H, W, H, W) cosine similarities.

    Entry [i, j, y, x] compares the patch at row i, column j with the patch at row y, column x.
    """
    gh, gw = grid
    pe = pos_embed.detach().double().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]
    if pe.shape[0] != gh * gw:
        raise ValueError(f"pos_embed has {pe.shape[0]} patch positions, grid {gh}x{gw} needs {gh * gw}")
    pe = torch.nn.functional.normalize(pe, dim=-1)
    return (pe @ pe.T).reshape(gh, gw, gh, gw).float()
