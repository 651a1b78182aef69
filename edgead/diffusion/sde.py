"""Forward SDEs and one-step reverse-time samplers as pure tensor functions.

References:
    Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
    (ICLR), eqs. 6, 13 and 30-34; Shin et al. 2023, "Anomaly Detection using Score-based Perturbation
    Resilience" (ICCV), the forward SDE stated before eq. 4.

Every function accepts python floats or tensors for the time arguments (floats in, floats out for
the scalar coefficient functions) and never holds state, so detectors, training and ONNX export share
one implementation. Coefficients shaped like ``t`` (``(B,)`` or 0-d) are broadcast against images
with :func:`append_dims`. The forward SDE is ``dx = f(x, t) dt + g(t) dw`` for ``t`` in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SDE",
    "append_dims",
    "broadcast_like",
    "perturb",
    "probability_flow_step",
    "reverse_sde_step",
    "spr_diffusion_coeff",
    "spr_drift_diffusion",
    "spr_marginal",
    "spr_sigma",
    "subvp_drift_diffusion",
    "subvp_marginal",
    "ve_drift_diffusion",
    "ve_marginal",
    "ve_sigma",
    "vp_beta",
    "vp_drift_diffusion",
    "vp_marginal",
]

Scalar = Tensor | float
SDE_KINDS = ("ve", "spr", "vp", "subvp")


def _exp(v: Scalar) -> Scalar:
    return torch.exp(v) if isinstance(v, Tensor) else math.exp(v)


def _sqrt(v: Scalar) -> Scalar:
    return torch.sqrt(v) if isinstance(v, Tensor) else math.sqrt(v)


def _ones_like(v: Scalar) -> Scalar:
    return torch.ones_like(v) if isinstance(v, Tensor) else 1.0


def append_dims(v: Scalar, ndim: int) -> Scalar:
    """Append trailing singleton dims so a (B,) coefficient broadcasts against an ``ndim``-d tensor.

    Floats and 0-d tensors are returned unchanged (they broadcast already).
    """
    if not isinstance(v, Tensor) or v.ndim == 0 or v.ndim >= ndim:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def broadcast_like(v: Scalar, x: Tensor) -> Scalar:
    """``v`` (float, 0-d or (B,) tensor) cast to ``x``'s dtype/device and broadcastable against ``x``."""
    if isinstance(v, Tensor):
        v = v.to(dtype=x.dtype, device=x.device)
    return append_dims(v, x.ndim)


# ---------------------------------------------------------------- VE SDE (Song et al. eqs. 30-31)


def ve_sigma(t: Scalar, sigma_min: float = 0.01, sigma_max: float = 50.0) -> Scalar:
    """Geometric noise scale ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` (Song et al. eq. 30)."""
    return sigma_min * (sigma_max / sigma_min) ** t


def ve_marginal(t: Scalar, sigma_min: float = 0.01, sigma_max: float = 50.0) -> tuple[Scalar, Scalar]:
    """Perturbation kernel ``p_0t(x_t | x_0) = N(x_0, std^2 I)`` of the VE SDE (Song et al. eq. 31).

    The exact kernel has ``std = sqrt(sigma(t)^2 - sigma_min^2)``; like the authors' reference
    implementation (``VESDE.marginal_prob``) we use ``std = sigma(t)``, the noise level the score
    network is trained and sampled with. The difference is below ``sigma_min`` everywhere.

    Returns:
        ``(mean_coeff, std)`` with ``mean_coeff = 1`` and ``std = sigma(t)``.
    """
    return _ones_like(t), ve_sigma(t, sigma_min, sigma_max)


def ve_drift_diffusion(x: Tensor, t: Scalar, sigma_min: float = 0.01, sigma_max: float = 50.0) -> tuple[Tensor, Scalar]:
    """``f = 0``, ``g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min))`` (Song et al. eq. 30).

    ``g(t)^2 = d sigma(t)^2 / dt`` for the geometric ``sigma(t)``.
    """
    g = ve_sigma(t, sigma_min, sigma_max) * math.sqrt(2.0 * math.log(sigma_max / sigma_min))
    return torch.zeros_like(x), g


# ------------------------------------------------- SPR form of the VE SDE (Shin et al., before eq. 4)


def spr_sigma(k: Scalar, sigma: float = 25.0) -> Scalar:
    """Marginal std ``sigma_k = sqrt((sigma^(2k) - 1) / (2 log sigma))`` of ``dx = sigma^k dw``.

    Shin et al. 2023, forward SDE before eq. 4 (the perturbation kernel is ``N(x_0, sigma_k^2 I)``,
    exact: ``sigma_k^2 = int_0^k sigma^(2s) ds``).
    """
    return _sqrt((sigma ** (2.0 * k) - 1.0) / (2.0 * math.log(sigma)))


def spr_diffusion_coeff(k: Scalar, sigma: float = 25.0) -> Scalar:
    """Diffusion coefficient ``g(k) = sigma^k`` of the SPR forward SDE (Shin et al., before eq. 4)."""
    return sigma**k


def spr_marginal(k: Scalar, sigma: float = 25.0) -> tuple[Scalar, Scalar]:
    """``(mean_coeff = 1, std = sigma_k)`` of the SPR forward SDE (Shin et al., before eq. 4)."""
    return _ones_like(k), spr_sigma(k, sigma)


def spr_drift_diffusion(x: Tensor, k: Scalar, sigma: float = 25.0) -> tuple[Tensor, Scalar]:
    """``f = 0``, ``g(k) = sigma^k`` (Shin et al., before eq. 4)."""
    return torch.zeros_like(x), spr_diffusion_coeff(k, sigma)


# -------------------------------------------------- VP and sub-VP SDEs (Song et al. eqs. 32-34)


def vp_beta(t: Scalar, beta_min: float = 0.1, beta_max: float = 20.0) -> Scalar:
    """Linear rate ``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. eq. 32)."""
    return beta_min + t * (beta_max - beta_min)


def _vp_log_mean_coeff(t: Scalar, beta_min: float, beta_max: float) -> Scalar:
    return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min


def vp_marginal(t: Scalar, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[Scalar, Scalar]:
    """VP kernel (Song et al. eq. 33): ``mean_coeff = exp(-t^2 (b_max - b_min) / 4 - t b_min / 2)``.

    Returns:
        ``(mean_coeff, std)`` with ``std = sqrt(1 - mean_coeff^2)``.
    """
    mean_coeff = _exp(_vp_log_mean_coeff(t, beta_min, beta_max))
    return mean_coeff, _sqrt(1.0 - mean_coeff**2)


def vp_drift_diffusion(x: Tensor, t: Scalar, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[Tensor, Scalar]:
    """``f = -beta(t) x / 2``, ``g = sqrt(beta(t))`` (Song et al. eq. 32)."""
    beta_t = vp_beta(t, beta_min, beta_max)
    return -0.5 * broadcast_like(beta_t, x) * x, _sqrt(beta_t)


def subvp_marginal(t: Scalar, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[Scalar, Scalar]:
    """sub-VP kernel (Song et al. eq. 34 / appendix B): VP mean, ``std = 1 - exp(-t^2 (b_max - b_min) / 2
    - t b_min)`` (the variance is bounded by the VP variance).
    """
    log_mean_coeff = _vp_log_mean_coeff(t, beta_min, beta_max)
    return _exp(log_mean_coeff), 1.0 - _exp(2.0 * log_mean_coeff)


def subvp_drift_diffusion(x: Tensor, t: Scalar, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[Tensor, Scalar]:
    """``f = -beta(t) x / 2``, ``g = sqrt(beta(t) (1 - exp(-2 b_min t - (b_max - b_min) t^2)))``
    (Song et al. eq. 34).
    """
    beta_t = vp_beta(t, beta_min, beta_max)
    discount = 1.0 - _exp(-2.0 * beta_min * t - (beta_max - beta_min) * t**2)
    return -0.5 * broadcast_like(beta_t, x) * x, _sqrt(beta_t * discount)


# ------------------------------------------------------------------------------ config object


@dataclass(frozen=True)
class SDE:
    """A forward SDE as data: thin dispatch onto the pure functions of this module.

    Attributes:
        kind: ``"ve"``, ``"spr"`` (Shin et al.'s ``dx = sigma^t dw``), ``"vp"`` or ``"subvp"``.
        sigma_min: VE smallest noise scale.
        sigma_max: VE largest noise scale.
        beta_min: VP / sub-VP ``beta(0)``.
        beta_max: VP / sub-VP ``beta(1)``.
        sigma: SPR base ``sigma`` (the paper uses 25).
    """

    kind: str = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    sigma: float = 25.0

    def __post_init__(self) -> None:
        if self.kind not in SDE_KINDS:
            raise ValueError(f"SDE kind must be one of {SDE_KINDS}, got {self.kind!r}")
        if not 0.0 < self.sigma_min < self.sigma_max or self.sigma <= 1.0:
            raise ValueError("need 0 < sigma_min < sigma_max and sigma > 1")
        if not 0.0 <= self.beta_min <= self.beta_max:
            raise ValueError("need 0 <= beta_min <= beta_max")

    def marginal(self, t: Scalar) -> tuple[Scalar, Scalar]:
        """``(mean_coeff, std)`` of ``p_0t(x_t | x_0) = N(mean_coeff x_0, std^2 I)``."""
        if self.kind == "ve":
            return ve_marginal(t, self.sigma_min, self.sigma_max)
        if self.kind == "spr":
            return spr_marginal(t, self.sigma)
        if self.kind == "vp":
            return vp_marginal(t, self.beta_min, self.beta_max)
        return subvp_marginal(t, self.beta_min, self.beta_max)

    def drift_diffusion(self, x: Tensor, t: Scalar) -> tuple[Tensor, Scalar]:
        """``(f(x, t), g(t))``; ``f`` has ``x``'s shape, ``g`` has ``t``'s."""
        if self.kind == "ve":
            return ve_drift_diffusion(x, t, self.sigma_min, self.sigma_max)
        if self.kind == "spr":
            return spr_drift_diffusion(x, t, self.sigma)
        if self.kind == "vp":
            return vp_drift_diffusion(x, t, self.beta_min, self.beta_max)
        return subvp_drift_diffusion(x, t, self.beta_min, self.beta_max)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDE:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


# --------------------------------------------------------------------------- sampling steps


def perturb(x0: Tensor, t: Scalar, noise: Tensor, sde: SDE) -> Tensor:
    """Sample the forward kernel: ``x_t = mean_coeff(t) x_0 + std(t) z`` (Song et al. eq. 7 kernels)."""
    mean_coeff, std = sde.marginal(t)
    return broadcast_like(mean_coeff, x0) * x0 + broadcast_like(std, x0) * noise


def reverse_sde_step(x: Tensor, t: Scalar, dt: Scalar, score: Tensor, sde: SDE, noise: Tensor) -> Tensor:
    """One Euler-Maruyama step of the reverse-time SDE (Song et al. eq. 6).

    ``x_{t+dt} = x_t + (f(x_t, t) - g(t)^2 score) dt + g(t) sqrt(|dt|) z`` with ``dt < 0``.

    Args:
        x: Current state ``x_t``.
        t: Current time, float or (B,)/0-d tensor.
        dt: Time step (negative when integrating backward), float or tensor shaped like ``t``.
        score: ``grad_x log p_t(x_t)``, shaped like ``x``.
        sde: The forward SDE.
        noise: Standard normal ``z`` shaped like ``x`` (an argument so the step is deterministic).
    """
    f, g = sde.drift_diffusion(x, t)
    g, dt = broadcast_like(g, x), broadcast_like(dt, x)
    abs_dt = dt.abs() if isinstance(dt, Tensor) else abs(dt)
    return x + (f - g**2 * score) * dt + g * _sqrt(abs_dt) * noise


def probability_flow_step(x: Tensor, t: Scalar, dt: Scalar, score: Tensor, sde: SDE) -> Tensor:
    """One Euler step of the probability flow ODE (Song et al. eq. 13).

    ``x_{t+dt} = x_t + (f(x_t, t) - g(t)^2 score / 2) dt``; ``dt < 0`` integrates toward the data.
    """
    f, g = sde.drift_diffusion(x, t)
    g, dt = broadcast_like(g, x), broadcast_like(dt, x)
    return x + (f - 0.5 * g**2 * score) * dt
