"""gaussian's per-position statistics (PaDiM's, Defard et al. 2021, with the paper's OPCA of Sec. 3.2 and its
shrinkage of Sec. 3.3): one shrinkage Gaussian per feature position, fitted in two streamed passes over the
training features so that its memory does not grow with the number of training images.

1. :class:`PositionMoments`: each position's count, mean and scatter (eq. 2's sums), batch by batch;
2. :class:`PositionFit`: the components each position keeps (from pass 1), then the fourth moments that the
   Ledoit-Wolf shrinkage needs in the kept subspace, batch by batch; :meth:`PositionFit.finish` gives the
   Gaussians.

Both passes hold ``h * w * C * C`` float64 values per stage, whatever the number of images (10,731 tiles of a
1130 x 460 px training set at 224 px: about 90 MB over EfficientNet-Lite0's five stages, against 4 GB for
their feature maps).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgead.methods.gaussian.graph import PositionGaussians
from edgead.methods.gaussian.params import FIT_ORDERS, PROJECTIONS
from edgead.methods.gaussian.statistics import select_components, symmetric_eigh

# Float64 values of one block of images' position vectors in :func:`fit_position_gaussians` (128 MB).
_BLOCK_FLOATS = 1 << 24


def _floored_batch(eigenvalues: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """``statistics._floored`` for a batch: ``eigenvalues (P, K)``, ``largest (P, 1)``."""
    return torch.maximum(eigenvalues, 1e-12 + 1e-9 * largest.clamp_min(0.0))


def _eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`symmetric_eigh` of a batch of tensors."""
    eigenvalues, eigenvectors = symmetric_eigh(matrices.numpy())
    return torch.from_numpy(eigenvalues), torch.from_numpy(eigenvectors)


def ledoit_wolf_moments(empirical: torch.Tensor, fourth: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrinkage [31] from moments: ``empirical (..., K, K)``, the covariance normalised by ``m``
    (as sklearn), and ``fourth (...)``, the mean over the ``m`` samples of ``||x_i||^4`` (centred samples).

    sklearn's estimator (``sklearn.covariance.LedoitWolf``) in closed form, in float64. With ``S`` the
    empirical covariance and ``mu = tr(S) / K``: ``delta = (||S||_F^2 - K mu^2) / K``, ``beta = min(delta,
    (fourth - ||S||_F^2) / (K m))``, shrinkage ``beta / delta`` (0 where ``beta`` is 0, and for ``K = 1``, as
    sklearn) and the covariance ``(1 - shrinkage) S + shrinkage mu I``.
    """
    empirical, fourth = empirical.double(), fourth.double()
    k = empirical.shape[-1]
    mu = torch.diagonal(empirical, dim1=-2, dim2=-1).sum(dim=-1) / k
    frobenius = empirical.square().sum(dim=(-2, -1))
    beta = (fourth - frobenius) / (k * m)
    delta = (frobenius - k * mu.square()) / k
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / delta) if k > 1 else torch.zeros_like(mu)
    covariance = (1.0 - shrinkage)[..., None, None] * empirical
    covariance = covariance + (shrinkage * mu)[..., None, None] * torch.eye(k, dtype=empirical.dtype)
    return covariance, shrinkage


def ledoit_wolf(samples: torch.Tensor, assume_centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrinkage covariances of a batch of sample sets: ``(..., m, K) -> ((..., K, K), (...))``
    (:func:`ledoit_wolf_moments` of the samples' moments)."""
    x = samples.double()
    if not assume_centered:
        x = x - x.mean(dim=-2, keepdim=True)
    m = x.shape[-2]
    fourth = x.square().sum(dim=-1).square().mean(dim=-1)  # sklearn's sum of <X2^T, X2> over m
    return ledoit_wolf_moments(x.transpose(-1, -2) @ x / m, fourth, m)


def position_vectors(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (h * w, B, C)`` float64: each position's vectors, positions in row-major order."""
    if features.ndim != 4:
        raise ValueError(f"expected stage features of shape (B, C, h, w), got {tuple(features.shape)}")
    b, c, h, w = features.shape
    return features.permute(2, 3, 0, 1).reshape(h * w, b, c).double().contiguous()


class PositionMoments:
    """Pass 1: each position's number of vectors, mean and scatter ``sum_i (x_i - mean)(x_i - mean)^T``,
    accumulated batch by batch in float64 around the first batch's mean (so the sums stay well conditioned)."""

    def __init__(self) -> None:
        self.count = 0
        self.size: tuple[int, int] | None = None  # (h, w)
        self._shift = self._sum = self._scatter = torch.zeros(0)

    def add(self, features: torch.Tensor) -> None:
        """Add one batch of stage features ``(B, C, h, w)``."""
        x = position_vectors(torch.as_tensor(features))
        size = (int(features.shape[2]), int(features.shape[3]))
        if self.size is None:
            self.size = size
            self._shift = x.mean(dim=1, keepdim=True)
            self._sum = torch.zeros_like(self._shift[:, 0])
            self._scatter = torch.zeros(*self._sum.shape, x.shape[2], dtype=torch.float64)
        elif size != self.size or x.shape[2] != self._sum.shape[1]:
            raise ValueError(f"stage features changed shape from {self.shape} to {tuple(features.shape[1:])}")
        x = x - self._shift
        self._sum += x.sum(dim=1)
        self._scatter += x.transpose(1, 2) @ x
        self.count += x.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the stage features added."""
        if self.size is None:
            raise ValueError("no features were added")
        return (int(self._sum.shape[1]), *self.size)

    @property
    def mean(self) -> torch.Tensor:
        """``(P, C)``."""
        return self._shift[:, 0] + self._sum / self.count

    def scatter(self) -> torch.Tensor:
        """``(P, C, C)``: the centred scatter (``n - 1`` times eq. 2's covariance)."""
        return self._scatter - self._sum[:, :, None] * self._sum[:, None, :] / self.count


@dataclass
class FittedPositionGaussians:
    """One stage's per-position Gaussians: one Gaussian per feature position, all with the same kept count
    ``K`` (fixed graph shapes)."""

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


class PositionFit:
    """Pass 2 of the per-position fit: one Gaussian per feature position from pass 1's ``moments`` (each
    position's ``N`` vectors as ``statistics.fit_gaussian`` fits its ``m`` vectors, with the same ``order``,
    shrinkage and eigenvalue floor).

    One kept count ``K`` for all positions, since the graph needs fixed shapes: ``projection`` chooses a count
    at every position on that position's covariance (the sample covariance, eq. 2, for ``order="paper"``; the
    shrunk one for ``"full"``), and ``K`` is their median (the upper one for an even number of positions, so a
    count some position chose); each position then keeps its own ``K`` components of least variance (of
    largest for ``"pca"``). Where ``h * w * C * K`` would exceed ``max_floats``, ``K`` becomes
    ``max_floats // (h * w * C)`` (at least 1): the components the projection ranks last go first (for OPCA
    and ``"none"`` the largest-variance ones), and the fit records the cut (``bounded_from``). With fewer
    images than channels the shrinkage estimate in the kept subspace is still positive definite (Ledoit-Wolf
    adds ``shrinkage * mu`` to every eigenvalue).

    Ledoit-Wolf needs each sample's fourth moment in the space it shrinks (all channels for ``"full"``, the kept
    subspace for ``"paper"``), known only once pass 1 has fixed the mean and, for ``"paper"``, the kept
    components: :meth:`add` takes the same features again, :meth:`finish` gives the Gaussians.
    """

    def __init__(
        self, moments: PositionMoments, projection: str, fraction: float, order: str, max_floats: int | None = None
    ) -> None:
        if order not in FIT_ORDERS:
            raise ValueError(f"fit_order must be one of {FIT_ORDERS}, got {order!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if moments.count < 2:
            raise ValueError(f"need the features of at least 2 images, got {moments.count}")
        self.projection, self.fraction, self.order, self.max_floats = projection, fraction, order, max_floats
        self.shape, self.n = moments.shape, moments.count
        self.mean = moments.mean
        self.empirical = moments.scatter() / self.n  # Ledoit-Wolf's, normalised by n as sklearn
        self.basis: torch.Tensor | None = None  # "paper": each position's kept components (P, C, K)
        if order == "paper":
            lam, vec = _eigh(self.empirical * (self.n / (self.n - 1)))  # eq. 2 at every position
            lam = lam.clamp_min(0.0)  # as fit_gaussian: round-off below zero, and all-constant positions
            self.eigenvalues = torch.where(lam[:, -1:] <= 0.0, torch.full_like(lam, 1e-12), lam)
            self.counts, self.kept, self.bounded_from = self._kept_count(self.eigenvalues)
            self.basis = vec[:, :, self._kept_index()].contiguous()
            self.empirical = self.basis.transpose(1, 2) @ self.empirical @ self.basis  # of the projections
        self._fourth = torch.zeros(self.mean.shape[0], dtype=torch.float64)
        self._seen = 0

    def _kept_count(self, eigenvalues: torch.Tensor) -> tuple[np.ndarray, int, int | None]:
        counts = np.array([select_components(v, self.projection, self.fraction).size for v in eigenvalues.numpy()])
        kept, bounded_from = _upper_median(counts), None
        positions, channels = self.mean.shape
        if self.max_floats is not None and positions * channels * kept > self.max_floats:
            bounded_from, kept = kept, max(1, self.max_floats // (positions * channels))
        return counts, kept, bounded_from

    def _kept_index(self) -> slice:
        channels = self.mean.shape[1]
        return slice(channels - self.kept, channels) if self.projection == "pca" else slice(0, self.kept)

    def add(self, features: torch.Tensor) -> None:
        """Pass 2: the same stage features ``(B, C, h, w)`` as pass 1, in any batches."""
        if tuple(features.shape[1:]) != self.shape:
            raise ValueError(f"expected stage features of shape (B, {self.shape}), got {tuple(features.shape)}")
        x = position_vectors(torch.as_tensor(features)) - self.mean[:, None, :]
        z = x if self.basis is None else x @ self.basis
        self._fourth += z.square().sum(dim=-1).square().sum(dim=-1)
        self._seen += x.shape[1]

    def finish(self) -> FittedPositionGaussians:
        """The fitted Gaussians; pass 2 must have seen as many vectors as pass 1."""
        if self._seen != self.n:
            raise ValueError(f"pass 2 saw {self._seen} images' features, pass 1 {self.n}")
        covariance, shrinkage = ledoit_wolf_moments(self.empirical, self._fourth / self.n, self.n)
        if self.order == "full":
            lam, vec = _eigh(covariance)
            lam = _floored_batch(lam, lam[:, -1:])
            self.counts, self.kept, self.bounded_from = self._kept_count(lam)
            index = self._kept_index()
            whitening = vec[:, :, index] / lam[:, None, index].sqrt()
        else:  # Ledoit-Wolf on each position's projections in its kept subspace
            assert self.basis is not None
            sub_lam, rotation = _eigh(covariance)
            whitening = self.basis @ rotation / _floored_batch(sub_lam, self.eigenvalues[:, -1:])[:, None, :].sqrt()
        return FittedPositionGaussians(
            self.mean.numpy(),
            whitening.numpy(),
            self.shape[1:],
            self.counts,
            shrinkage.numpy(),
            self.n,
            self.max_floats,
            self.bounded_from,
        )


def fit_position_gaussians(
    maps: np.ndarray | torch.Tensor,
    projection: str,
    fraction: float,
    order: str,
    max_floats: int | None = None,
) -> FittedPositionGaussians:
    """Fit one Gaussian per feature position to ``maps (N, C, h, w)``, one stage's features of ``N`` training
    images held in memory: both passes (:class:`PositionMoments`, :class:`PositionFit`) over blocks of images."""
    maps = torch.as_tensor(maps)
    if maps.ndim != 4 or maps.shape[0] < 2:
        raise ValueError(f"need the (N, C, h, w) features of at least 2 images, got {tuple(maps.shape)}")
    step = max(1, _BLOCK_FLOATS // int(np.prod(maps.shape[1:])))
    blocks = [[maps[start : start + step]] for start in range(0, len(maps), step)]
    moments = PositionMoments()
    for (block,) in blocks:
        moments.add(block)
    return fit_stage_positions([moments], blocks, projection, fraction, order, max_floats)[0]


def fit_stage_positions(
    moments: list[PositionMoments],
    second_pass: Iterable[list[torch.Tensor]],
    projection: str,
    fraction: float,
    order: str,
    max_floats: int | None = None,
) -> list[FittedPositionGaussians]:
    """Every stage's per-position Gaussians from pass 1's ``moments`` (one per stage) and ``second_pass``: the
    same images' stage features again, a list of ``(B, C, h, w)`` per batch."""
    fits = [PositionFit(stage, projection, fraction, order, max_floats) for stage in moments]
    for stages in second_pass:
        for fit, features in zip(fits, stages, strict=True):
            fit.add(features)
    return [fit.finish() for fit in fits]
