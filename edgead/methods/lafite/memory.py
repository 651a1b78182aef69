"""LafitE's memory bank (eq. 9), its greedy coreset, and feature editing (eq. 10) as a graph module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

EDIT_WEIGHTINGS = ("paper", "normalised")


def greedy_coreset(vectors: Tensor, count: int, projection_dim: int | None = 128, seed: int = 0) -> Tensor:
    """Indices of ``count`` rows of ``vectors (N, C)`` chosen by greedy k-center selection.

    The PatchCore algorithm (Roth et al. 2022, Algorithm 1; LafitE eq. 9 and its reference [1]): start from
    one point (row 0 of a seeded permutation), then repeatedly add the point farthest from the chosen set,
    which 2-approximates the minimal covering radius. Distances are measured after a seeded Gaussian random
    projection to ``projection_dim`` dimensions when ``C`` is larger (Johnson-Lindenstrauss, as PatchCore's
    approximate sampler does); ``None`` measures in the full space.
    """
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"the memory bank must be a non-empty (N, C) matrix, got {tuple(vectors.shape)}")
    n = len(vectors)
    count = int(min(max(count, 1), n))
    generator = torch.Generator().manual_seed(seed)
    x = vectors.float()
    if projection_dim is not None and x.shape[1] > projection_dim:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = x @ projection
    first = int(torch.randperm(n, generator=generator)[0])
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = first
    nearest = (x - x[first]).square().sum(dim=1)  # squared distance of each point to the chosen set
    for i in range(1, count):
        index = int(torch.argmax(nearest))
        chosen[i] = index
        nearest = torch.minimum(nearest, (x - x[index]).square().sum(dim=1))
    return chosen


def edit_weights(distances: Tensor, weighting: str = "paper") -> Tensor:
    """Eq. 10's weights of the ``K`` nearest neighbours, from their distances ``(..., K)``.

    ``"paper"``: exactly eq. 10, ``w_k = 1 - exp(d_k) / sum_j exp(d_j)`` (the softmax of the *distances*).
    The weights sum to ``K - 1``: with ``K = 1`` the single weight is 0 and the edited feature is the zero
    vector; with ``K = 2`` they sum to 1 and the nearer neighbour gets the larger weight; with ``K > 2`` the
    edited feature is about ``K - 1`` times a neighbour average (see the README).
    ``"normalised"``: the same weights divided by ``K - 1`` so they sum to 1 (``K = 1``: the nearest
    neighbour itself), our variant for ``K != 2``.
    """
    if weighting not in EDIT_WEIGHTINGS:
        raise ValueError(f"edit weighting must be one of {EDIT_WEIGHTINGS}, got {weighting!r}")
    k = distances.shape[-1]
    weights = 1.0 - torch.softmax(distances, dim=-1)
    if weighting == "normalised":
        weights = weights / (k - 1) if k > 1 else torch.ones_like(weights)
    return weights


class FeatureEditor(nn.Module):
    """Eq. 10 over a feature tensor: every slice ``x_(i,j)`` becomes the weighted sum of its ``K`` nearest
    coreset vectors. Distances are one matmul (``|q|^2 - 2 q n^T + |n|^2``) and the neighbours a ``TopK``
    and a ``Gather``, all plain ONNX ops with fixed shapes; the module stays FP32 in FP16 exports (squared
    norms of ~200-dimensional features lose too much in FP16)."""

    keep_fp32 = True

    def __init__(self, coreset: Tensor, k: int, weighting: str = "paper") -> None:
        super().__init__()
        if coreset.ndim != 2 or len(coreset) == 0:
            raise ValueError(f"coreset must be a non-empty (M, C) matrix, got {tuple(coreset.shape)}")
        if not 1 <= k <= len(coreset):
            raise ValueError(f"K = {k} neighbours needs 1 <= K <= the coreset size {len(coreset)}")
        if weighting not in EDIT_WEIGHTINGS:
            raise ValueError(f"edit weighting must be one of {EDIT_WEIGHTINGS}, got {weighting!r}")
        self.k = int(k)
        self.weighting = weighting
        self.register_buffer("coreset", coreset.float().contiguous())

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        query = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        bank = self.coreset
        squared = query.square().sum(dim=1, keepdim=True) - 2.0 * query @ bank.t() + bank.square().sum(dim=1)[None]
        neg_nearest, index = (-squared).topk(self.k, dim=1)  # (Q, K), nearest first
        distances = (-neg_nearest).clamp(min=0.0).sqrt()
        weights = edit_weights(distances, self.weighting)
        neighbours = bank[index]  # (Q, K, C)
        edited = (weights.unsqueeze(-1) * neighbours).sum(dim=1)
        return edited.reshape(b, h, w, c).permute(0, 3, 1, 2)
