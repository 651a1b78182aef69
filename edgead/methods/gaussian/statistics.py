"""gaussian's statistics: component selection (Sec. 3.2) and one shrinkage Gaussian per stage (Sec. 3.3), as the
buffers its graph module needs (one per feature position, PaDiM-style: ``positions.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

from edgead.methods.gaussian.graph import StageGaussian
from edgead.methods.gaussian.params import FIT_ORDERS, PROJECTIONS

# Shares within this relative tolerance of the threshold count as reaching it (float round-off).
_SHARE_TOLERANCE = 1e-9


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
