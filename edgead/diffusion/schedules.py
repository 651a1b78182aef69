"""Discrete DDPM noise schedules and DDPM / DDIM update steps as pure tensor functions.

References:
    Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (eq. 4, Algorithm 2);
    Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models" (eq. 17);
    Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (eqs. 12 and 16).

Indexing: every schedule is a ``torch.float64`` tensor of length ``T`` and entry ``i`` (0-based)
belongs to diffusion step ``t = i + 1`` of the papers, so ``betas[i] = beta_{i+1}`` and
``alpha_bar[i] = alpha_bar_{i+1} = prod_{s <= i+1} (1 - beta_s)``. ``alpha_bar_0 = 1`` (clean data) is
not stored. A network at entry ``i`` receives the time ``(i + 1) / T`` (the paper's step ``t = i + 1``,
scaled to (0, 1]), in training (:func:`ddpm_eps_loss`) and in every inference graph alike
(``tests/methods/test_losses.py`` checks the pairing). The step functions take ``alpha_bar`` values that
are floats or (B,)/0-d tensors and cast them to the dtype of the images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from edgead.diffusion.sde import broadcast_like

__all__ = [
    "alpha_bar_from_betas",
    "cosine_alpha_bar",
    "cosine_betas",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_eps_loss",
    "ddpm_q_sample",
    "ddpm_step",
    "linear_betas",
    "make_alpha_bar",
    "predict_x0_from_eps",
]

Scalar = Tensor | float


def _sqrt(v: Scalar) -> Scalar:
    return torch.sqrt(v) if isinstance(v, Tensor) else math.sqrt(v)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM linear schedule ``beta_1 .. beta_T`` from ``beta_start`` to ``beta_end`` (Ho et al. sec. 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_alpha_bar(T: int, s: float = 0.008) -> Tensor:
    """Cosine schedule ``alpha_bar_t = f(t) / f(0)``, ``f(t) = cos((t/T + s) / (1 + s) * pi/2)^2``.

    Nichol & Dhariwal 2021, eq. 17, unclipped, for ``t = 1 .. T``.
    """
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return f[1:] / f[0]


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` of the cosine schedule, clipped at ``max_beta``.

    Nichol & Dhariwal 2021, eq. 17 and the clipping that follows it (avoids the singularity at t = T).
    """
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), cosine_alpha_bar(T, s)])
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s=1}^{t} (1 - beta_s)`` (Ho et al., notation before eq. 4), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def make_alpha_bar(kind: str = "linear", T: int = 1000) -> Tensor:
    """``alpha_bar`` of a named schedule: ``"linear"`` (DDPM) or ``"cosine"`` (clipped betas)."""
    if kind == "linear":
        return alpha_bar_from_betas(linear_betas(T))
    if kind == "cosine":
        return alpha_bar_from_betas(cosine_betas(T))
    raise ValueError(f"unknown schedule {kind!r}; choose 'linear' or 'cosine'")


def ddpm_q_sample(x0: Tensor, alpha_bar_t: Scalar, noise: Tensor) -> Tensor:
    """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al. eq. 4, reparametrised)."""
    alpha_bar_t = broadcast_like(alpha_bar_t, x0)
    return _sqrt(alpha_bar_t) * x0 + _sqrt(1.0 - alpha_bar_t) * noise


def predict_x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar_t: Scalar) -> Tensor:
    """``x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)`` (Ho et al. eq. 4 inverted;
    DDIM eq. 9).
    """
    alpha_bar_t = broadcast_like(alpha_bar_t, x_t)
    return (x_t - _sqrt(1.0 - alpha_bar_t) * eps) / _sqrt(alpha_bar_t)


def ddim_step(
    x_t: Tensor,
    eps: Tensor,
    alpha_bar_t: Scalar,
    alpha_bar_prev: Scalar,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM update ``x_t -> x_prev`` (Song, Meng & Ermon 2021, eq. 12).

    ``x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z`` with
    ``sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)``
    (eq. 16). ``eta = 0`` is the deterministic DDIM sampler, ``eta = 1`` DDPM's ancestral sampler.

    Args:
        x_t: Current state.
        eps: Predicted noise ``eps_theta(x_t, t)``.
        alpha_bar_t: ``alpha_bar`` at the current step.
        alpha_bar_prev: ``alpha_bar`` at the target step (1.0 to jump to clean data).
        eta: Stochasticity; needs ``noise`` when positive.
        noise: Standard normal ``z`` shaped like ``x_t``.
    """
    if eta > 0.0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs a noise tensor")
    alpha_bar_t, alpha_bar_prev = broadcast_like(alpha_bar_t, x_t), broadcast_like(alpha_bar_prev, x_t)
    x0_hat = predict_x0_from_eps(x_t, eps, alpha_bar_t)
    x_prev = _sqrt(alpha_bar_prev) * x0_hat
    if eta > 0.0:
        sigma_t = eta * _sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev))
        direction_var = 1.0 - alpha_bar_prev - sigma_t**2
        direction_var = direction_var.clamp(min=0.0) if isinstance(direction_var, Tensor) else max(direction_var, 0.0)
        return x_prev + _sqrt(direction_var) * eps + sigma_t * noise
    return x_prev + _sqrt(1.0 - alpha_bar_prev) * eps


def ddpm_step(
    x_t: Tensor,
    eps: Tensor,
    t_index: int | Tensor,
    betas: Tensor,
    alpha_bar: Tensor,
    noise: Tensor,
    variance: str = "fixed_small",
) -> Tensor:
    """One ancestral DDPM step (Ho et al. Algorithm 2, line 4).

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z``, with
    ``z = 0`` at the last step (``t_index == 0``, i.e. ``t = 1``).

    Args:
        x_t: Current state.
        eps: Predicted noise ``eps_theta(x_t, t)``.
        t_index: 0-based step index (int, or (B,) long tensor); ``t = t_index + 1``.
        betas: Schedule ``beta_1 .. beta_T`` (length T).
        alpha_bar: ``alpha_bar_1 .. alpha_bar_T`` (length T), from the same betas.
        noise: Standard normal ``z`` shaped like ``x_t``.
        variance: ``"fixed_small"``: ``sigma_t^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
            beta_t`` (Ho et al. eq. 7); ``"fixed_large"``: ``sigma_t^2 = beta_t``. Ho et al. sec. 3.2 report
            similar results for both.
    """
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    index = torch.as_tensor(t_index, dtype=torch.long, device=betas.device)
    beta_t, alpha_bar_t = betas[index], alpha_bar[index]
    not_last = index > 0
    alpha_bar_prev = torch.where(not_last, alpha_bar[(index - 1).clamp(min=0)], torch.ones_like(alpha_bar_t))
    if variance == "fixed_small":
        variance_t = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta_t
    else:
        variance_t = beta_t * not_last
    sigma_t = broadcast_like(torch.sqrt(variance_t), x_t)
    beta_t, alpha_bar_t = broadcast_like(beta_t, x_t), broadcast_like(alpha_bar_t, x_t)
    mean = (x_t - beta_t / torch.sqrt(1.0 - alpha_bar_t) * eps) / torch.sqrt(1.0 - beta_t)
    return mean + sigma_t * noise


def ddim_timesteps(tau: int, steps: int) -> list[tuple[int, int]]:
    """The ``(t, t_prev)`` pairs of ``steps`` deterministic DDIM updates from step ``tau`` to 0 (eq. 7 with
    ``Delta t = tau / steps``, rounded): ``t_s = round(tau * s / steps)`` for ``s = steps .. 1``, each going
    to the next one and the last to 0 (clean data). ``steps`` is clipped to ``tau`` (one update per step)."""
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    steps = max(1, min(int(steps), int(tau)))
    times = [round(tau * s / steps) for s in range(steps, 0, -1)] + [0]
    return list(zip(times[:-1], times[1:], strict=True))


def ddpm_eps_loss(net: torch.nn.Module, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """The DDPM training objective (Ho et al. eq. 14, "L_simple"; LafitE eq. 6, MDPS eq. 5):
    ``||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t)||^2`` with ``t`` uniform in
    ``1..T``, averaged over elements. The network gets the continuous time ``t / T``; noise and ``t`` come
    from torch's RNG."""
    alpha_bar = alpha_bar.to(x0.device, torch.float32)
    index = torch.randint(0, len(alpha_bar), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    x_t = ddpm_q_sample(x0, alpha_bar[index], eps)
    prediction = net(x_t, (index + 1).float() / len(alpha_bar))
    return (prediction.float() - eps).square().mean()
