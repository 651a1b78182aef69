"""DDPM / cosine schedules and the DDPM and DDIM update steps."""

from __future__ import annotations

import math

import pytest
import torch

from edgead.diffusion import (
    alpha_bar_from_betas,
    cosine_alpha_bar,
    cosine_betas,
    ddim_step,
    ddpm_q_sample,
    ddpm_step,
    linear_betas,
    make_alpha_bar,
    predict_x0_from_eps,
)


def test_linear_schedule_endpoints() -> None:
    betas = linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    alpha_bar = make_alpha_bar("linear", 1000)
    assert alpha_bar.shape == (1000,)
    assert alpha_bar[0].item() == pytest.approx(1.0 - 1e-4)  # index 0 is step t = 1
    assert alpha_bar[1].item() == pytest.approx((1.0 - 1e-4) * (1.0 - betas[1].item()))
    # prod (1 - beta_t) = exp(sum log(1 - beta_t)) ~ exp(-(T/2)(b0 + bT) - ...) = 4.036e-5 for DDPM.
    assert alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_alpha_bar() -> None:
    T = 1000
    alpha_bar = cosine_alpha_bar(T)
    assert alpha_bar.shape == (T,) and alpha_bar.dtype == torch.float64
    assert alpha_bar[0].item() == pytest.approx(1.0, abs=1e-4)
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    assert alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-12)
    s = 0.008
    half = math.cos((0.5 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert alpha_bar[T // 2 - 1].item() == pytest.approx(half)  # step t = T/2, eq. 17
    betas = cosine_betas(T)
    assert betas.max().item() == pytest.approx(0.999) and bool((betas > 0).all())
    clipped = make_alpha_bar("cosine", T)
    torch.testing.assert_close(clipped[:-1], alpha_bar[:-1])  # only the last beta is clipped
    assert bool((clipped[1:] < clipped[:-1]).all())


def test_alpha_bar_from_betas_and_errors() -> None:
    betas = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float32)
    torch.testing.assert_close(alpha_bar_from_betas(betas), torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64))
    with pytest.raises(ValueError, match="schedule"):
        make_alpha_bar("sigmoid", 10)


def test_q_sample_and_x0_prediction_invert() -> None:
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    alpha_bar = make_alpha_bar("linear", 1000)
    alpha_bar_t = alpha_bar[torch.tensor([0, 499, 999])]
    x_t = ddpm_q_sample(x0, alpha_bar_t, eps)
    assert x_t.dtype == torch.float32
    expected = math.sqrt(alpha_bar_t[1].item()) * x0[1] + math.sqrt(1 - alpha_bar_t[1].item()) * eps[1]
    torch.testing.assert_close(x_t[1], expected)
    torch.testing.assert_close(predict_x0_from_eps(x_t, eps, alpha_bar_t)[:2], x0[:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddpm_q_sample(x0, 1.0, eps), x0)


def test_ddim_deterministic_step() -> None:
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    x_t = ddpm_q_sample(x0, 0.3, eps)
    torch.testing.assert_close(ddim_step(x_t, eps, 0.3, 1.0), x0, rtol=1e-5, atol=1e-5)
    # eta = 0 with the exact eps lands exactly on the forward sample of the target step.
    torch.testing.assert_close(ddim_step(x_t, eps, 0.3, 0.8), ddpm_q_sample(x0, 0.8, eps), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x_t, eps, 0.3, 0.8, eta=1.0)


def test_ddim_eta1_equals_ddpm_posterior_step() -> None:
    """DDIM eq. 16 with eta = 1 gives sigma_t^2 = beta_tilde_t, i.e. the ancestral DDPM step."""
    betas = linear_betas(100, 1e-3, 0.05)
    alpha_bar = alpha_bar_from_betas(betas)
    x_t, eps, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    i = 40
    ddpm = ddpm_step(x_t, eps, i, betas, alpha_bar, noise)
    ddim = ddim_step(x_t, eps, alpha_bar[i], alpha_bar[i - 1], eta=1.0, noise=noise)
    torch.testing.assert_close(ddpm, ddim, rtol=1e-5, atol=1e-5)


def test_ddpm_step_mean_is_q_posterior_mean() -> None:
    """With the true eps, Algorithm 2's mean equals mu_tilde(x_t, x_0) of Ho et al. eq. 7."""
    betas = linear_betas(50, 1e-3, 0.1)
    alpha_bar = alpha_bar_from_betas(betas)
    x0, eps = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    i = 20
    ab_t, ab_prev, beta = alpha_bar[i].item(), alpha_bar[i - 1].item(), betas[i].item()
    x_t = ddpm_q_sample(x0, ab_t, eps)
    mean = ddpm_step(x_t, eps, i, betas, alpha_bar, torch.zeros_like(x_t))
    mu_tilde = math.sqrt(ab_prev) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * x_t
    torch.testing.assert_close(mean, mu_tilde)
    noise = torch.ones_like(x_t)
    var_small = (1 - ab_prev) / (1 - ab_t) * beta
    torch.testing.assert_close(ddpm_step(x_t, eps, i, betas, alpha_bar, noise) - mean, noise * math.sqrt(var_small))
    large = ddpm_step(x_t, eps, i, betas, alpha_bar, noise, variance="fixed_large") - mean
    torch.testing.assert_close(large, noise * math.sqrt(beta))


def test_ddpm_last_step_ignores_noise_and_batched_indices() -> None:
    betas = linear_betas(10, 1e-2, 0.2)
    alpha_bar = alpha_bar_from_betas(betas)
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for variance in ("fixed_small", "fixed_large"):
        a = ddpm_step(x_t, eps, 0, betas, alpha_bar, torch.randn_like(x_t), variance=variance)
        b = ddpm_step(x_t, eps, 0, betas, alpha_bar, torch.randn_like(x_t), variance=variance)
        torch.testing.assert_close(a, b)
    noise = torch.randn_like(x_t)
    batched = ddpm_step(x_t, eps, torch.tensor([0, 5]), betas, alpha_bar, noise)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched[:1], ddpm_step(x_t[:1], eps[:1], 0, betas, alpha_bar, noise[:1]))
    torch.testing.assert_close(batched[1:], ddpm_step(x_t[1:], eps[1:], 5, betas, alpha_bar, noise[1:]))
