"""gaussian's statistics: component selection (Sec. 3.2), shrinkage Gaussians (Sec. 3.3), one per stage or one
per feature position (PaDiM-style), each as the buffers its graph module needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from edgead.methods.gaussian.graph import PositionGaussians, StageGaussian
from edgead.methods.gaussian.params import FIT_ORDERS, PROJECTIONS

# Shares within this relative tolerance of the threshold count as reaching it (float round-off).
_SHARE_TOLERANCE = 1e-9
# Float64 values of one block of positions' samples in the per-position fit (128 MB): bounds its peak memory.
_BLOCK_FLOATS = 1 << 24


def symmetric_eigh(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.linalg.eigh`` (ascending; a batch too) on one BLAS thread: the matrices are small (at most a few
    hundred channels), so threads gain little, and on a loaded 2-core machine a threaded batch took 2 to 60 s
    where one thread took 0.5 s (49 matrices of 320 x 320, NumPy and PyTorch alike)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return np.linalg.eigh(matrices)


def select_components(eigenvalues: np.ndarray, projection: str, fraction: float) -> np.ndarray:
    """Indices of the principal components to keep (section 3.2 and the ablation of section 4.5.1).

    Args:
        eigenvalues: Covariance eigenvalues in ascending order (as ``np.linalg.eigh`` returns them).
        projection: ``"opca"``: the fewest least-variance components that together explain at least
            ``fraction`` of the total variance ("OPCA-0.05 retains principal components that account for
            5% of the overall variance"); ``"pca"``: the fewest largest-variance components that explain at
            least ``1 - fraction`` ("PCA-0.95 removes principal components that account for 5%");
            ``"none"``: all components (plain eq. 3).
        fraction: The variance share of OPCA, in (0, 1).

    Returns:
        Ascending indices into ``eigenvalues``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0 or np.any(np.diff(lam) < 0):
        raise ValueError("eigenvalues must be a non-empty 1-D array in ascending order")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"opca_fraction must be in (0, 1), got {fraction}")
    count = lam.size
    if projection == "none":
        return np.arange(count)
    share = lam / lam.sum()
    target = fraction if projection == "opca" else 1.0 - fraction
    # "opca" accumulates from the smallest eigenvalue, "pca" from the largest.
    cumulative = np.cumsum(share if projection == "opca" else share[::-1])
    kept = min(count, int(np.searchsorted(cumulative, target * (1.0 - _SHARE_TOLERANCE), side="left")) + 1)
    return np.arange(kept) if projection == "opca" else np.arange(count - kept, count)


@dataclass
class FittedGaussian:
    """One stage's Gaussian (section 3.3) with its kept subspace (section 3.2)."""

    mean: np.ndarray  # (C,)
    whitening: np.ndarray  # (C, K): maps centred features to whitened coordinates in the kept subspace
    eigenvalues: np.ndarray  # (C,) ascending, of the covariance the components are chosen on
    kept: np.ndarray  # (K,) indices into eigenvalues
    shrinkage: float
    samples: int

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``(..., C) -> (...)`` Mahalanobis distances in the kept subspace (eq. 3; what ``StageGaussian`` computes)."""
        return np.sqrt((((features - self.mean) @ self.whitening) ** 2).sum(axis=-1))

    def module(self) -> StageGaussian:
        # Copies, so two modules built from one fit never share storage (safetensors refuses shared tensors).
        mean, whitening = (torch.tensor(a, dtype=torch.float32) for a in (self.mean, self.whitening))
        return StageGaussian(mean, whitening)

    def map_record(self) -> dict[str, Any]:
        """What the fit summary says of these statistics when they score the map."""
        return {"map_kept": int(self.kept.size), "map_shrinkage": round(self.shrinkage, 4), "map_vectors": self.samples}


def fit_gaussian(features: np.ndarray, projection: str, fraction: float, order: str) -> FittedGaussian:
    """Fit eq. 1's parameters to ``features (m, C)`` in the subspace of the components ``projection`` keeps.

    The mean is the empirical mean and the covariance a Ledoit-Wolf shrinkage estimate [31] (Sec. 3.3;
    sklearn normalises by ``m``, not eq. 2's ``m - 1``, which only rescales all distances by a constant
    factor). ``order`` says where the shrinkage happens:

    - ``"paper"`` (Sec. 3.2, then 3.3; Fig. 1): the principal components are those of the sample covariance
      (eq. 2); the kept ones ``V_k`` project the centred features, and the shrinkage Gaussian is fitted to
      the projections ``z = (x - mu) V_k`` in the kept subspace, ``Sigma_k = U diag(lambda) U^T``.
    - ``"full"``: Ledoit-Wolf on all ``C`` channels first, then the kept components of the shrunk covariance.
      Shrinkage pulls every eigenvalue towards their mean, so it raises exactly the smallest ones, which OPCA
      keeps, and the 5 % share then covers fewer components.

    Either way the Mahalanobis distance in the kept subspace (eq. 3) is ``||(x - mu) W||`` with one matrix
    ``W`` (``V_k diag(lambda_k)^(-1/2)``, or ``V_k U diag(lambda)^(-1/2)``), so the graph needs only ``mu``
    and ``W``.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (m, C) to fit a Gaussian, got {x.shape}")
    if order not in FIT_ORDERS:
        raise ValueError(f"fit_order must be one of {FIT_ORDERS}, got {order!r}")
    if order == "full":
        lw = LedoitWolf(store_precision=False, assume_centered=False).fit(x)
        eigenvalues, eigenvectors = symmetric_eigh(lw.covariance_)
        eigenvalues = _floored(eigenvalues, float(eigenvalues[-1]))
        kept = select_components(eigenvalues, projection, fraction)
        whitening = eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])
        return FittedGaussian(lw.location_, whitening, eigenvalues, kept, float(lw.shrinkage_), x.shape[0])
    mean = x.mean(axis=0)
    eigenvalues, eigenvectors = symmetric_eigh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))  # eq. 2
    eigenvalues = np.maximum(eigenvalues, 0.0)  # round-off below zero; select_components needs a valid share
    if eigenvalues[-1] <= 0.0:
        eigenvalues = np.full_like(eigenvalues, 1e-12)
    kept = select_components(eigenvalues, projection, fraction)
    projected = (x - mean) @ eigenvectors[:, kept]
    lw = LedoitWolf(store_precision=False, assume_centered=True).fit(projected)
    sub_eigenvalues, rotation = symmetric_eigh(lw.covariance_)
    # With m <= C the least-variance components are directions the training features do not span (variance
    # 0): the floor, relative to the largest sample variance, keeps the distance finite there.
    sub_eigenvalues = _floored(sub_eigenvalues, float(eigenvalues[-1]))
    whitening = eigenvectors[:, kept] @ rotation / np.sqrt(sub_eigenvalues)
    return FittedGaussian(mean, whitening, eigenvalues, kept, float(lw.shrinkage_), x.shape[0])


def _floored(eigenvalues: np.ndarray, largest: float) -> np.ndarray:
    """Eigenvalues kept positive: shrinkage already does so; the floor guards all-constant features."""
    return np.maximum(eigenvalues, 1e-12 + 1e-9 * max(largest, 0.0))


def _floored_batch(eigenvalues: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """:func:`_floored` for a batch: ``eigenvalues (P, K)``, ``largest (P, 1)``."""
    return torch.maximum(eigenvalues, 1e-12 + 1e-9 * largest.clamp_min(0.0))


def _eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`symmetric_eigh` of a batch of tensors."""
    eigenvalues, eigenvectors = symmetric_eigh(matrices.numpy())
    return torch.from_numpy(eigenvalues), torch.from_numpy(eigenvectors)


def ledoit_wolf(samples: torch.Tensor, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrinkage covariances [31] of a batch of sample sets: ``(..., m, K) -> ((..., K, K), (...))``.

    sklearn's estimator (``sklearn.covariance.LedoitWolf``) in closed form over the batch, in float64, so
    the Gaussians of all positions of a stage are a few batched products instead of a loop. With the
    empirical covariance ``S = X^T X / m`` (normalised by ``m`` as sklearn) and ``mu = tr(S) / K``:
    ``delta = (||S||_F^2 - K mu^2) / K``, ``beta = min(delta, (mean_i ||x_i||^4 - ||S||_F^2) / (K m))``,
    shrinkage ``beta / delta`` (0 where ``beta`` is 0, and for ``K = 1``, as sklearn) and the covariance
    ``(1 - shrinkage) S + shrinkage mu I``.
    """
    x = samples.double()
    if not assume_centered:
        x = x - x.mean(dim=-2, keepdim=True)
    m, k = x.shape[-2], x.shape[-1]
    empirical = x.transpose(-1, -2) @ x / m
    mu = torch.diagonal(empirical, dim1=-2, dim2=-1).sum(dim=-1) / k
    frobenius = empirical.square().sum(dim=(-2, -1))
    fourth = x.square().sum(dim=-1).square().mean(dim=-1)  # sklearn's sum of <X2^T, X2> over m
    beta = (fourth - frobenius) / (k * m)
    delta = (frobenius - k * mu.square()) / k
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / delta) if k > 1 else torch.zeros_like(mu)
    covariance = (1.0 - shrinkage)[..., None, None] * empirical
    covariance = covariance + (shrinkage * mu)[..., None, None] * torch.eye(k, dtype=x.dtype)
    return covariance, shrinkage


@dataclass
class FittedPositionGaussians:
    """One stage's per-position Gaussians (PaDiM's statistics, Defard et al. 2021, with the paper's OPCA and
    shrinkage): one Gaussian per feature position, all with the same kept count ``K`` (fixed graph shapes)."""

    mean: np.ndarray  # (P, C), P = h * w positions in row-major order
    whitening: np.ndarray  # (P, C, K)
    size: tuple[int, int]  # (h, w)
    counts: np.ndarray  # (P,) the kept count the projection chose at each position on its own
    shrinkage: np.ndarray  # (P,)
    samples: int  # training images, i.e. vectors per position
    max_floats: int | None  # the bound on P * C * K
    bounded_from: int | None  # K before the bound reduced it; None where it did not

    @property
    def kept(self) -> int:
        return int(self.whitening.shape[-1])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``(..., h, w, C) -> (..., h, w)``: eq. 3 of each position to its own Gaussian (``PositionGaussians``)."""
        h, w = self.size
        batch = features.shape[:-3]
        centred = features.reshape(*batch, h * w, features.shape[-1]) - self.mean
        z = np.einsum("...pc,pck->...pk", centred, self.whitening)
        return np.sqrt((z**2).sum(axis=-1)).reshape(*batch, h, w)

    def module(self) -> PositionGaussians:
        mean, whitening = (torch.tensor(a, dtype=torch.float32) for a in (self.mean, self.whitening))
        return PositionGaussians(mean, whitening)

    def map_record(self) -> dict[str, Any]:
        """What the fit summary says of these statistics: ``K``, the per-position counts it stands for, and
        the memory bound where it cut ``K``."""
        record: dict[str, Any] = {
            "map_kept": self.kept,
            "map_shrinkage": round(float(np.median(self.shrinkage)), 4),
            "map_vectors": self.samples,
            "map_positions": int(self.mean.shape[0]),
            "map_kept_by_position": {
                "min": int(self.counts.min()),
                "median": int(_upper_median(self.counts)),
                "max": int(self.counts.max()),
            },
        }
        if self.bounded_from is not None:
            record["map_kept_bound"] = {
                "max_position_floats": self.max_floats,
                "kept_before": self.bounded_from,
                "kept": self.kept,
            }
        return record


def _upper_median(counts: np.ndarray) -> int:
    """The median of integer counts, the upper one of an even number: a count some position chose."""
    return int(np.sort(counts)[len(counts) // 2])


def fit_position_gaussians(
    maps: np.ndarray | torch.Tensor,
    projection: str,
    fraction: float,
    order: str,
    max_floats: int | None = None,
) -> FittedPositionGaussians:
    """Fit one Gaussian per feature position to ``maps (N, C, h, w)``, one stage's features of ``N`` training
    images (PaDiM's per-position statistics; each position's ``N`` vectors as :func:`fit_gaussian` fits its
    ``m`` vectors, with the same ``order``, shrinkage and eigenvalue floor).

    One kept count ``K`` for all positions, since the graph needs fixed shapes: ``projection`` chooses a count
    at every position on that position's covariance (the sample covariance, eq. 2, for ``order="paper"``; the
    shrunk one for ``"full"``), and ``K`` is their median (the upper one for an even number of positions, so a
    count some position chose); each position then keeps its own ``K`` components of least variance (of
    largest for ``"pca"``). Where ``h * w * C * K`` would exceed ``max_floats``, ``K`` becomes
    ``max_floats // (h * w * C)`` (at least 1): the components the projection ranks last go first (for OPCA
    and ``"none"`` the largest-variance ones), and the fit records the cut (``bounded_from``). With fewer
    images than channels the shrinkage estimate in the kept subspace is still positive definite (Ledoit-Wolf
    adds ``shrinkage * mu`` to every eigenvalue); the floor of :func:`fit_gaussian` guards all-constant
    features. Vectorised over positions (batched :func:`_eigh` and :func:`ledoit_wolf`), in blocks of positions
    to bound memory.
    """
    if order not in FIT_ORDERS:
        raise ValueError(f"fit_order must be one of {FIT_ORDERS}, got {order!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    maps = torch.as_tensor(maps)
    if maps.ndim != 4 or maps.shape[0] < 2:
        raise ValueError(f"need the (N, C, h, w) features of at least 2 images, got {tuple(maps.shape)}")
    n, c, h, w = maps.shape
    positions = h * w
    vectors = maps.permute(2, 3, 0, 1).reshape(positions, n, c)  # (P, N, C): each position's samples
    step = max(1, _BLOCK_FLOATS // (n * c))
    blocks = [slice(start, start + step) for start in range(0, positions, step)]

    def centred(block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x = vectors[block].contiguous().double()  # the view's strides would make the products below crawl
        mean = x.mean(dim=1, keepdim=True)
        return mean[:, 0], x - mean

    means, eigenvalues, eigenvectors, shrinkages = [], [], [], []
    for block in blocks:
        mean, x = centred(block)
        means.append(mean)
        if order == "full":
            covariance, shrinkage = ledoit_wolf(x, assume_centered=True)
            shrinkages.append(shrinkage)
        else:
            covariance = x.transpose(1, 2) @ x / (n - 1)  # eq. 2 at every position
        lam, vec = _eigh(covariance)
        eigenvalues.append(lam)
        eigenvectors.append(vec)
    lam, vec = torch.cat(eigenvalues), torch.cat(eigenvectors)
    if order == "full":
        lam = _floored_batch(lam, lam[:, -1:])
    else:  # as fit_gaussian: round-off below zero, and all-constant positions
        lam = lam.clamp_min(0.0)
        lam = torch.where(lam[:, -1:] <= 0.0, torch.full_like(lam, 1e-12), lam)
    counts = np.array([select_components(values, projection, fraction).size for values in lam.numpy()])
    kept, bounded_from = _upper_median(counts), None
    if max_floats is not None and positions * c * kept > max_floats:
        bounded_from, kept = kept, max(1, max_floats // (positions * c))
    index = slice(c - kept, c) if projection == "pca" else slice(0, kept)
    if order == "full":
        whitening = vec[:, :, index] / lam[:, None, index].sqrt()
        shrinkage = torch.cat(shrinkages)
    else:  # Ledoit-Wolf on each position's projections in its kept subspace
        whitenings, shrinkages = [], []
        for block in blocks:
            _, x = centred(block)
            basis = vec[block][:, :, index].contiguous()
            sub_covariance, shrinkage = ledoit_wolf(x @ basis, assume_centered=True)
            sub_lam, rotation = _eigh(sub_covariance)
            whitenings.append(basis @ rotation / _floored_batch(sub_lam, lam[block][:, -1:])[:, None, :].sqrt())
            shrinkages.append(shrinkage)
        whitening, shrinkage = torch.cat(whitenings), torch.cat(shrinkages)
    return FittedPositionGaussians(
        torch.cat(means).numpy(), whitening.numpy(), (h, w), counts, shrinkage.numpy(), n, max_floats, bounded_from
    )
