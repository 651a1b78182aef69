"""Forward SDE coefficients and single sampler steps against hand-computed and closed-form values."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from edgead.diffusion import (
    SDE,
    append_dims,
    perturb,
    probability_flow_step,
    reverse_sde_step,
    spr_diffusion_coeff,
    spr_sigma,
    subvp_drift_diffusion,
    subvp_marginal,
    ve_drift_diffusion,
    ve_marginal,
    ve_sigma,
    vp_drift_diffusion,
    vp_marginal,
)

ALL_KINDS = ("ve", "spr", "vp", "subvp")


def test_ve_sigma_endpoints_and_midpoint() -> None:
    assert ve_sigma(0.0, 0.01, 50.0) == pytest.approx(0.01)
    assert ve_sigma(1.0, 0.01, 50.0) == pytest.approx(50.0)
    assert ve_sigma(0.5, 0.01, 50.0) == pytest.approx(math.sqrt(0.01 * 50.0))  # geometric mean
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(ve_sigma(t, 0.01, 50.0), torch.tensor([0.01, math.sqrt(0.5), 50.0]).double())
    mean_coeff, std = ve_marginal(t, 0.01, 50.0)
    torch.testing.assert_close(mean_coeff, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(std, ve_sigma(t, 0.01, 50.0))


def test_ve_drift_diffusion_values() -> None:
    x = torch.randn(2, 3, 4, 4)
    f, g = ve_drift_diffusion(x, 0.5, 0.01, 50.0)
    assert torch.equal(f, torch.zeros_like(x))
    assert g == pytest.approx(math.sqrt(0.5) * math.sqrt(2.0 * math.log(5000.0)))
    assert g == pytest.approx(2.91845, rel=1e-5)  # sqrt(0.5) * sqrt(2 ln 5000), by hand


def test_spr_sigma_hand_computed() -> None:
    # sigma_k = sqrt((25^(2k) - 1) / (2 ln 25)); 25^0.002 = exp(0.002 * 3.2189) = 1.0064586...
    assert spr_sigma(0.001, 25.0) == pytest.approx(0.03167374, rel=1e-6)
    # sigma_k^2 is the integral of g(s)^2 = 25^(2s) over [0, k] (midpoint rule, 10^4 panels).
    k, n = 0.7, 10_000
    integral = sum(25.0 ** (2.0 * (i + 0.5) * k / n) for i in range(n)) * k / n
    assert spr_sigma(k, 25.0) ** 2 == pytest.approx(integral, rel=1e-6)
    assert spr_diffusion_coeff(0.5, 25.0) == pytest.approx(5.0)
    k_t = torch.tensor([0.001, 0.7], dtype=torch.float64)
    torch.testing.assert_close(spr_sigma(k_t, 25.0)[0].item(), 0.03167374, rtol=1e-6, atol=0.0)


def test_vp_marginal_at_t1() -> None:
    mean_coeff, std = vp_marginal(1.0, 0.1, 20.0)
    # log mean = -1/4 * 19.9 - 1/2 * 0.1 = -5.025
    assert mean_coeff == pytest.approx(math.exp(-5.025))
    assert mean_coeff == pytest.approx(0.0065716, rel=1e-4)
    assert std == pytest.approx(math.sqrt(1.0 - math.exp(-10.05)))
    _, std_sub = subvp_marginal(1.0, 0.1, 20.0)
    assert std_sub == pytest.approx(1.0 - math.exp(-10.05))


def test_vp_unit_variance_and_subvp_below_vp() -> None:
    t = torch.linspace(1e-4, 1.0, 257, dtype=torch.float64)
    mean_coeff, std = vp_marginal(t)
    torch.testing.assert_close(mean_coeff**2 + std**2, torch.ones_like(t))
    sub_mean, sub_std = subvp_marginal(t)
    torch.testing.assert_close(sub_mean, mean_coeff)
    assert bool((sub_std <= std + 1e-12).all())
    assert bool((sub_std < std).all())  # strictly for t > 0


def test_vp_drift_diffusion_values() -> None:
    x = torch.ones(2, 1, 2, 2)
    t = torch.tensor([0.0, 1.0])
    f, g = vp_drift_diffusion(x, t, 0.1, 20.0)
    torch.testing.assert_close(g, torch.tensor([math.sqrt(0.1), math.sqrt(20.0)]))
    torch.testing.assert_close(f[0], torch.full((1, 2, 2), -0.05))
    torch.testing.assert_close(f[1], torch.full((1, 2, 2), -10.0))
    _, g_sub = subvp_drift_diffusion(x, 0.5, 0.1, 20.0)
    beta = 0.1 + 0.5 * 19.9
    assert g_sub == pytest.approx(math.sqrt(beta * (1.0 - math.exp(-2 * 0.1 * 0.5 - 19.9 * 0.25))))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_marginal_consistent_with_drift_and_diffusion(kind: str) -> None:
    """The kernel of dx = -beta/2 x dt + g dw obeys d mean/dt = -beta/2 mean and dV/dt = -beta V + g^2."""
    sde = SDE(kind=kind)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    (m_plus, s_plus), (m_minus, s_minus) = sde.marginal(t + h), sde.marginal(t - h)
    mean_coeff, _ = sde.marginal(t)
    dlogm = (torch.log(m_plus) - torch.log(m_minus)) / (2 * h)
    dvar = (s_plus**2 - s_minus**2) / (2 * h)
    unit = torch.ones(len(t), dtype=torch.float64)
    f, g = sde.drift_diffusion(unit, t)
    minus_beta = 2.0 * f  # f = -beta/2 * x, evaluated at x = 1
    torch.testing.assert_close(dlogm, minus_beta / 2.0, rtol=1e-6, atol=1e-6)
    _, std = sde.marginal(t)
    # For VE the reference std = sigma(t) omits -sigma_min^2, whose derivative is 0: still exact.
    torch.testing.assert_close(dvar, minus_beta * std**2 + g**2, rtol=1e-5, atol=1e-6)
    assert mean_coeff.shape == t.shape


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_float_in_float_out_and_dispatch(kind: str) -> None:
    sde = SDE(kind=kind)
    mean_coeff, std = sde.marginal(0.3)
    assert isinstance(mean_coeff, float) and isinstance(std, float)
    mean_t, std_t = sde.marginal(torch.tensor([0.3], dtype=torch.float64))
    assert mean_t.item() == pytest.approx(mean_coeff) and std_t.item() == pytest.approx(std)
    assert SDE.from_dict(json.loads(json.dumps(sde.to_dict()))) == sde


def test_sde_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        SDE(kind="edm")
    with pytest.raises(ValueError):
        SDE(kind="ve", sigma_min=1.0, sigma_max=0.5)


def test_perturb_broadcasts_per_sample_time() -> None:
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)  # float64 times must not promote float32 images
    x_t = perturb(x0, t, noise, SDE(kind="vp"))
    assert x_t.dtype == torch.float32
    for i in range(3):
        mean_coeff, std = vp_marginal(float(t[i]))
        torch.testing.assert_close(x_t[i], mean_coeff * x0[i] + std * noise[i])
    assert append_dims(t, 4).shape == (3, 1, 1, 1)


def _gaussian_var(sde: SDE, t: float, data_var: float) -> float:
    """Variance of p_t when p_0 = N(0, data_var) (exact marginal: VE adds sigma^2 - sigma_min^2)."""
    mean_coeff, std = sde.marginal(t)
    if sde.kind == "ve":
        return data_var + std**2 - sde.sigma_min**2
    return mean_coeff**2 * data_var + std**2


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_probability_flow_on_gaussian(kind: str) -> None:
    """For p_0 = N(0, v0) the flow is linear: x_t / x_s = sqrt(V(t) / V(s)) (closed form)."""
    sde, v0 = SDE(kind=kind, sigma_max=5.0), 0.25
    x = torch.tensor([1.5, -0.3], dtype=torch.float64)

    def score(x_t: torch.Tensor, t: float) -> torch.Tensor:
        return -x_t / _gaussian_var(sde, t, v0)

    t, dt = 0.6, -1e-4
    x_next = probability_flow_step(x, t, dt, score(x, t), sde)
    expected = x * math.sqrt(_gaussian_var(sde, t + dt, v0) / _gaussian_var(sde, t, v0))
    torch.testing.assert_close(x_next, expected, rtol=1e-6, atol=0.0)

    n = 2000
    steps = torch.linspace(1.0, 1e-3, n + 1, dtype=torch.float64).tolist()
    y = x.clone()
    for t_cur, t_next in itertools.pairwise(steps):
        y = probability_flow_step(y, t_cur, t_next - t_cur, score(y, t_cur), sde)
    expected = x * math.sqrt(_gaussian_var(sde, 1e-3, v0) / _gaussian_var(sde, 1.0, v0))
    torch.testing.assert_close(y, expected, rtol=5e-3, atol=0.0)


@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_reverse_sde_recovers_gaussian_variance(kind: str) -> None:
    sde, v0 = SDE(kind=kind, sigma_max=5.0), 0.25
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=gen, dtype=torch.float64) * math.sqrt(_gaussian_var(sde, 1.0, v0))
    steps = torch.linspace(1.0, 1e-3, 501, dtype=torch.float64).tolist()
    for t_cur, t_next in itertools.pairwise(steps):
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        score = -x / _gaussian_var(sde, t_cur, v0)
        x = reverse_sde_step(x, t_cur, t_next - t_cur, score, sde, noise)
    assert x.var().item() == pytest.approx(_gaussian_var(sde, 1e-3, v0), rel=0.05)


def test_reverse_step_formula_with_tensor_time() -> None:
    sde = SDE(kind="vp")
    x, score, noise = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t, dt = torch.tensor([0.5, 0.8]), torch.tensor([-0.01, -0.02])
    out = reverse_sde_step(x, t, dt, score, sde, noise)
    for i in range(2):
        beta = 0.1 + float(t[i]) * 19.9
        step = float(dt[i])
        expected = x[i] + (-0.5 * beta * x[i] - beta * score[i]) * step
        expected = expected + math.sqrt(beta) * math.sqrt(abs(step)) * noise[i]
        torch.testing.assert_close(out[i], expected)
