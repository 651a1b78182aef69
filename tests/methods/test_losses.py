"""The training loss of every method that trains a network, against hand computations.

For each loss: (1) the library's value for a stand-in network with a known formula equals the paper's equation
computed here in float64 numpy from the same random draws (replayed from the seed, in the loss's documented
order); (2) the target's sign: a network that returns the paper's target exactly gives zero loss, its negative
gives four times the loss of a zero network; (3) the time value the loss feeds the network belongs to the same
noise level as the time value the method's inference graph feeds it at that step. For (3) the pairing
(time input -> noise level) is read off the graph by recording its network calls, and the "exact" network of
(2) uses that pairing: a loss whose time index is off by one against the graph cannot reach zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgead.config import RunConfig
from edgead.data.preprocess import PreprocessConfig
from edgead.methods.lafite import graph as lafite_graph
from edgead.methods.lafite.graph import FeatureStandardiser, LafitEGraph
from edgead.methods.lafite.method import LafitE
from edgead.methods.mdps import graph as mdps_graph
from edgead.methods.mdps.graph import MDPSGraph
from edgead.methods.mdps.method import MDPS
from edgead.methods.score_resilience.graph import ScoreResilienceGraph
from edgead.methods.score_resilience.method import ScoreResilience
from edgead.methods.score_tscale.graph import ScoreTScaleGraph
from edgead.methods.score_tscale.method import ScoreTScale
from edgead.methods.scoring import MapScore

SIZE, CHANNELS, BATCH = 4, 3, 64
#: Diffusion steps of the DDPM tests: small, so one graph with tau = T visits every step the loss can draw.
STEPS = 10
MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 2.0)  # a non-trivial preprocessing, so MDPS's pixel scaling shows


def _method(cls: type, **params: Any) -> Any:
    config = RunConfig(
        method=cls.name,
        preprocess=PreprocessConfig(image_size=SIZE, channels=CHANNELS, mean=MEAN, std=STD).to_dict(),
        method_params={**cls.default_params(), **params},
    )
    return cls(config)


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _col(v: np.ndarray) -> np.ndarray:
    return v.reshape(-1, 1, 1, 1)


class LinearNet(nn.Module):
    """``out = w x + b t + c sigma``: a stand-in network whose output the hand computation repeats."""

    w, b, c = 0.7, -1.3, 0.25

    def forward(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        out = self.w * x + self.b * t.view(-1, 1, 1, 1)
        return out if sigma is None else out + self.c * sigma.view(-1, 1, 1, 1)

    @classmethod
    def numpy(cls, x: np.ndarray, t: np.ndarray, sigma: np.ndarray | None = None) -> np.ndarray:
        out = cls.w * x + cls.b * _col(t)
        return out if sigma is None else out + cls.c * _col(sigma)


class FunctionNet(nn.Module):
    """A network given as ``fn(x, t, sigma)``; records every call's inputs (``return_features``: the output
    is also the only feature tap, ``"out"``)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.calls: list[dict[str, torch.Tensor | None]] = []

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None = None, return_features: bool = False
    ) -> Any:
        self.calls.append({"x": x.detach().clone(), "t": t.detach().clone(), "sigma": sigma})
        out = self.fn(x, t, sigma)
        return (out, {"out": out}) if return_features else out


def _zero(x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(x)


def _seeded(loss: Callable[[nn.Module], torch.Tensor], net: nn.Module, seed: int = 0) -> float:
    torch.manual_seed(seed)
    return float(loss(net))


# --------------------------------------------------------------------------------------- score-resilience


def _spr_sigma(k: np.ndarray, sigma: float) -> np.ndarray:
    """Shin et al., before eq. 4: ``sigma_k = sqrt((sigma^(2k) - 1) / (2 log sigma))``."""
    return np.sqrt((sigma ** (2.0 * k) - 1.0) / (2.0 * np.log(sigma)))


def test_score_resilience_loss_is_eq4_by_hand() -> None:
    """Eq. 4: ``E ||s(x_tilde, k) - (x - x_tilde) / sigma_k||^2`` with ``x_tilde = x + sigma_k z``, ``k`` uniform
    on ``[k_min, k_max)``; summed over pixels, averaged over the batch (the released code)."""
    method = _method(ScoreResilience, train_k_min=0.05, train_k_max=0.9)
    x = _batch()
    value = _seeded(lambda net: method.loss(net, x), LinearNet())
    torch.manual_seed(0)  # the loss's draws, in its order: k, then z
    k = _np(torch.rand(BATCH)) * (0.9 - 0.05) + 0.05
    z = _np(torch.randn_like(x))
    x0 = _np(x)
    sigma_k = _col(_spr_sigma(k, 25.0))
    x_tilde = x0 + sigma_k * z
    target = (x0 - x_tilde) / sigma_k
    expected = ((LinearNet.numpy(x_tilde, k) - target) ** 2).sum(axis=(1, 2, 3)).mean()
    assert value == pytest.approx(expected, rel=1e-5)


def _resilience_time_to_sigma(sigma: float) -> Callable[[torch.Tensor], np.ndarray]:
    """The inference graph's pairing of the network's time input with the noise it added, read off the graph
    at several ``k`` and checked against the hand ``sigma_k``."""
    image = _batch(2)[:2]
    for k in (1e-3, 0.3, 1.0):
        net = FunctionNet(_zero)
        graph = ScoreResilienceGraph(net, sigma=sigma, k=k, n_draws=2, image_size=SIZE, channels=CHANNELS)
        graph.restoration_error(image)
        (call,) = net.calls
        assert torch.equal(call["t"], torch.full((4,), k))  # the network's time input is k itself
        added = _np(call["x"]).reshape(2, 2, CHANNELS, SIZE, SIZE) - _np(image)[:, None]
        expected = np.broadcast_to(_spr_sigma(np.float64(k), sigma) * _np(graph.noise), added.shape)
        np.testing.assert_allclose(added, expected, rtol=1e-4, atol=1e-6)
    return lambda t: _spr_sigma(_np(t), sigma)


def test_score_resilience_target_sign_and_time_input_match_the_graph() -> None:
    """The eq. 4 target ``(x - x_tilde) / sigma_k`` (``= -z``) at the noise level the graph pairs with the
    network's time input gives zero loss; its negative gives 4 times the zero network's ``E sum z^2``."""
    method = _method(ScoreResilience, train_k_min=1e-5, train_k_max=1.0)
    x = _batch()
    sigma_of = _resilience_time_to_sigma(method.params.sigma)

    def target(sign: float) -> Callable[..., torch.Tensor]:
        def fn(x_in: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
            return sign * (x - x_in) / torch.from_numpy(_col(sigma_of(t))).float()

        return fn

    zero = _seeded(lambda net: method.loss(net, x), FunctionNet(_zero))
    exact = _seeded(lambda net: method.loss(net, x), FunctionNet(target(1.0)))
    negated = _seeded(lambda net: method.loss(net, x), FunctionNet(target(-1.0)))
    assert zero == pytest.approx(CHANNELS * SIZE * SIZE, rel=0.1)  # E sum z^2 = C H W
    assert exact < 1e-6 * zero
    assert negated == pytest.approx(4 * zero, rel=1e-5)


# ------------------------------------------------------------------------------------------- score-tscale


def _marginal(kind: str, t: np.ndarray, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(mu(t), sigma(t))`` of Teng et al. eq. 11 (VE: ``sigma_min (sigma_max / sigma_min)^t`` as in Song et al.
    eq. 30 and the released code; VP: ``sqrt(1 - e^{-int beta})``; sub-VP: ``1 - e^{-int beta}``)."""
    if kind == "ve":
        return np.ones_like(t), p.sigma_min * (p.sigma_max / p.sigma_min) ** t
    integral = 0.5 * t**2 * (p.beta_max - p.beta_min) + t * p.beta_min  # int_0^t beta(s) ds
    mu = np.exp(-0.5 * integral)
    return mu, (np.sqrt(1.0 - np.exp(-integral)) if kind == "vp" else 1.0 - np.exp(-integral))


@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_score_tscale_loss_is_eq3_by_hand(kind: str) -> None:
    """Eq. 3 with ``lambda(t) = sigma(t)^2``: ``sigma^2 ||s(x(t), t) - grad log p_0t(x(t) | x(0))||^2``, the
    gradient ``-(x(t) - mu(t) x(0)) / sigma(t)^2`` (appendix A.1), ``x(t)`` of eq. 4, ``t`` uniform on
    ``[t_min, t_max)``; summed over pixels, averaged over the batch."""
    method = _method(ScoreTScale, sde=kind, train_t_min=0.01, train_t_max=0.8)
    p, x = method.params, _batch()
    value = _seeded(lambda net: method.loss(net, x), LinearNet())
    torch.manual_seed(0)  # the loss's draws, in its order: t, then z
    t = _np(torch.rand(BATCH)) * (0.8 - 0.01) + 0.01
    z = _np(torch.randn_like(x))
    x0 = _np(x)
    mu, std = _marginal(kind, t, p)
    x_t = _col(mu) * x0 + _col(std) * z
    grad_log_p = -(x_t - _col(mu) * x0) / _col(std) ** 2
    weighted = _col(std) ** 2 * (LinearNet.numpy(x_t, t, std) - grad_log_p) ** 2
    assert value == pytest.approx(weighted.sum(axis=(1, 2, 3)).mean(), rel=1e-5)


@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_score_tscale_target_sign_and_time_input_match_the_graph(kind: str) -> None:
    """The graph feeds the network ``(x at noise level sigma(t), t, sigma=sigma(t))`` at the start time and at
    ``t_r``; the loss's exact target ``-z / sigma(t)`` for that pairing gives zero loss, its negative four times
    the zero network's."""
    method = _method(ScoreTScale, sde=kind)
    p, x = method.params, _batch()
    times, dt, r = [0.5, 0.2], 0.05, 2
    net = FunctionNet(_zero)
    graph = ScoreTScaleGraph(
        net, sde=method.sde(), times=times, dt=dt, r=r, feature_maps=["out"], image_size=SIZE, channels=CHANNELS
    )
    image = x[:1]
    graph(image)
    first, last = net.calls[0], net.calls[-1]
    t0 = np.array(times)
    assert torch.equal(first["t"], graph.times)
    mu, std = _marginal(kind, t0, p)
    np.testing.assert_allclose(_np(first["sigma"]), std, rtol=1e-5)
    np.testing.assert_allclose(_np(first["x"]), _col(mu) * _np(image) + _col(std) * _np(graph.z), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(last["t"]), np.tile(t0 - r * dt, 2), rtol=1e-5)
    np.testing.assert_allclose(_np(last["sigma"]), np.tile(_marginal(kind, t0 - r * dt, p)[1], 2), rtol=1e-5)

    def target(sign: float) -> Callable[..., torch.Tensor]:
        def fn(x_in: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
            mu_t, std_t = (torch.from_numpy(_col(v)).float() for v in _marginal(kind, _np(t), p))
            torch.testing.assert_close(
                sigma.view(-1, 1, 1, 1), std_t, rtol=1e-5, atol=0
            )  # the graph's pairing, checked above
            return -sign * (x_in - mu_t * x) / std_t**2

        return fn

    zero = _seeded(lambda n: method.loss(n, x), FunctionNet(_zero))
    exact = _seeded(lambda n: method.loss(n, x), FunctionNet(target(1.0)))
    negated = _seeded(lambda n: method.loss(n, x), FunctionNet(target(-1.0)))
    assert zero == pytest.approx(CHANNELS * SIZE * SIZE, rel=0.1)
    assert exact < 1e-6 * zero
    assert negated == pytest.approx(4 * zero, rel=1e-5)


# ------------------------------------------------------------------------------------ DDPM (lafite, mdps)


def _alpha_bar(kind: str, T: int) -> np.ndarray:
    """``alpha_bar_1 .. alpha_bar_T``: Ho et al.'s linear betas (1e-4 to 0.02) or Nichol & Dhariwal's eq. 17
    with betas clipped at 0.999, ``prod (1 - beta)``."""
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1.0 - betas)


def _mdps_pixels(batch: np.ndarray) -> np.ndarray:
    """The preprocessed batch back to [0, 1] pixels, then to the prior's [-1, 1] scale."""
    return 2.0 * (batch * np.array(STD).reshape(1, -1, 1, 1) + np.array(MEAN).reshape(1, -1, 1, 1)) - 1.0


DDPM_CASES = {
    "lafite": (LafitE, {"diffusion_steps": STEPS, "tau_candidates": [STEPS]}, "cosine", lambda b: b),
    "mdps": (MDPS, {"diffusion_steps": STEPS, "noise_level": STEPS}, "linear", _mdps_pixels),
}


@pytest.mark.parametrize("name", DDPM_CASES)
def test_ddpm_loss_is_eq5_by_hand(name: str) -> None:
    """LafitE eq. 6 / MDPS eq. 5 / Ho et al. eq. 14: ``||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 -
    alpha_bar_t) eps, t)||^2`` with ``t`` uniform on ``1..T`` and the network given ``t / T``, averaged over
    elements; MDPS's ``x_0`` is the image on the [-1, 1] scale."""
    cls, params, schedule, to_x0 = DDPM_CASES[name]
    method = _method(cls, **params)
    assert method.params.schedule == schedule  # the paper's schedule, which the hand alpha_bar follows
    batch = _batch()
    value = _seeded(lambda net: method.loss(net, batch), LinearNet())
    torch.manual_seed(0)  # the loss's draws, in its order: the step index, then eps
    t = _np(torch.randint(0, STEPS, (BATCH,))) + 1
    eps = _np(torch.randn_like(batch))
    alpha_bar = _col(_alpha_bar(schedule, STEPS)[t.astype(int) - 1])
    x_t = np.sqrt(alpha_bar) * to_x0(_np(batch)) + np.sqrt(1.0 - alpha_bar) * eps
    expected = ((eps - LinearNet.numpy(x_t, t / STEPS)) ** 2).mean()
    assert value == pytest.approx(expected, rel=1e-5)


def _max_score() -> MapScore:
    return MapScore("max", map_size=(SIZE, SIZE))


class _Recorder:
    """Records the ``alpha_bar_t`` each DDIM update of a graph gets (the noise level of its step)."""

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.step, self.alpha_bars = step, []

    def __call__(self, x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, *args: Any, **kw: Any) -> Any:
        self.alpha_bars.append(float(alpha_bar_t))
        return self.step(x_t, eps, alpha_bar_t, *args, **kw)


def _lafite_pairs(method: LafitE, monkeypatch: pytest.MonkeyPatch) -> tuple[list, torch.Tensor, torch.Tensor]:
    net, recorder = FunctionNet(_zero), _Recorder(lafite_graph.ddim_step)
    monkeypatch.setattr(lafite_graph, "ddim_step", recorder)
    graph = LafitEGraph(
        adapter=nn.Identity(), backbone=nn.Identity(), standardiser=FeatureStandardiser(torch.zeros(3), torch.ones(3)),
        unet=net, editor=None, grid=SIZE, alpha_bar=torch.from_numpy(_alpha_bar("cosine", STEPS)), tau=STEPS,
        ddim_steps=STEPS, image_size=SIZE, smoothing_sigma=1.0, pool_size=1, map_score=_max_score(),
    )  # fmt: skip
    x0 = _batch(3)[:2]
    graph.reconstruct(x0)
    return list(zip(net.calls, recorder.alpha_bars, strict=True)), x0, graph.noise


def _mdps_pairs(method: MDPS, monkeypatch: pytest.MonkeyPatch) -> tuple[list, torch.Tensor, torch.Tensor]:
    net, recorder = FunctionNet(_zero), _Recorder(mdps_graph.ddim_step)
    monkeypatch.setattr(mdps_graph, "ddim_step", recorder)
    graph = MDPSGraph(
        unet=net, backbone=nn.Identity(), scaler=method.scaler(), adapter=nn.Identity(),
        alpha_bar=torch.from_numpy(_alpha_bar("linear", STEPS)), noise_level=STEPS, steps=STEPS, rho=0.0,
        n_samples=1, lam=0.3, eta=1.0, guidance="exact", guidance_norm="l2", mask_pass=False, ddim_eta=0.0,
        image_size=SIZE, channels=CHANNELS, smoothing_sigma=0.0, noise_seed=0, map_score=_max_score(),
    )  # fmt: skip
    images = _batch(3)[:2]
    y = graph.scaler(images)
    np.testing.assert_allclose(_np(y), _mdps_pixels(_np(images)), rtol=1e-5, atol=1e-6)
    graph.posterior_samples(y, None)
    return list(zip(net.calls, recorder.alpha_bars, strict=True)), y, graph.noise


@pytest.mark.parametrize("name", DDPM_CASES)
def test_ddpm_target_sign_and_time_input_match_the_graph(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At every step the graph feeds the network one time value and updates with one ``alpha_bar_t``; its first
    call's input is the image noised to that ``alpha_bar_t``. The network that returns the loss's exact target
    ``eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar)`` with ``alpha_bar`` looked up in the graph's
    pairing gives zero loss (so training pairs time input and noise level as inference does); its negative
    gives four times the zero network's ``E eps^2 = 1``."""
    cls, params, schedule, to_x0 = DDPM_CASES[name]
    method = _method(cls, **params)
    pairs, start, noise = (_lafite_pairs if name == "lafite" else _mdps_pairs)(method, monkeypatch)
    monkeypatch.undo()
    pairing: dict[float, float] = {}
    for call, alpha_bar in pairs:
        (time_input,) = set(call["t"].tolist())  # one time value per call
        pairing[time_input] = alpha_bar
    assert sorted(pairing.values()) == pytest.approx(sorted(_alpha_bar(schedule, STEPS)), rel=1e-12)  # every step
    first_call, first_alpha_bar = pairs[0]
    noised = np.sqrt(first_alpha_bar) * _np(start) + np.sqrt(1 - first_alpha_bar) * _np(noise)
    np.testing.assert_allclose(_np(first_call["x"]), noised, rtol=1e-5, atol=1e-6)

    keys = np.array(sorted(pairing))
    batch = _batch()
    x0 = torch.from_numpy(to_x0(_np(batch))).float()

    def target(sign: float) -> Callable[..., torch.Tensor]:
        def fn(x_t: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
            nearest = keys[np.abs(keys[None] - _np(t)[:, None]).argmin(axis=1)]
            assert np.abs(nearest - _np(t)).max() < 1e-6, "the loss feeds a time value the graph never does"
            alpha_bar = torch.tensor([pairing[k] for k in nearest]).view(-1, 1, 1, 1)
            return (sign * (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()).float()

        return fn

    zero = _seeded(lambda n: method.loss(n, batch), FunctionNet(_zero))
    exact = _seeded(lambda n: method.loss(n, batch), FunctionNet(target(1.0)))
    negated = _seeded(lambda n: method.loss(n, batch), FunctionNet(target(-1.0)))
    assert zero == pytest.approx(1.0, rel=0.1)
    assert exact < 1e-6 * zero
    assert negated == pytest.approx(4 * zero, rel=1e-5)
