"""score-tscale: the Fig. 3 toy experiment, Algorithms 1-2 against a literal loop, selection, and training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgead.config import TrainConfig
from edgead.data.mvtec import list_test, load_images, load_masks
from edgead.data.synthetic import generate_dataset
from edgead.diffusion.sde import SDE
from edgead.methods import load_method
from edgead.methods.base import run_graph
from edgead.methods.score_tscale.graph import ScoreTScaleGraph, tscale_pair
from edgead.methods.score_tscale.method import ScoreTScale, rank_feature_maps
from edgead.metrics import compute_metrics
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.pipeline import evaluate_run, train_run
from edgead.spec import RunSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import train_on_demo_data  # noqa: E402

# Fig. 3 / appendix B: 1/5 N((-5,-5), I) + 4/5 N((5,5), I), VE SDE with sigma_min 0.1, sigma_max 20, 100 steps.
MIX_WEIGHTS = torch.tensor([0.2, 0.8], dtype=torch.float64)
MIX_MEANS = torch.tensor([[-5.0, -5.0], [5.0, 5.0]], dtype=torch.float64)
ANOMALY = (-6.0, 5.0)
NORMALS = ((5.17, 5.2), (-4.2, -4.3))


def mixture_score(x: torch.Tensor, t: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Closed-form ``grad log p_t`` of the mixture under the VE SDE: ``p_t = sum_k w_k N(mu_k, (1 + std^2) I)``."""
    var = 1.0 + std.reshape(-1, 1) ** 2
    diff = MIX_MEANS[None] - x[:, None]  # (N, K, 2)
    log_resp = torch.log(MIX_WEIGHTS)[None] - diff.square().sum(-1) / (2 * var)
    resp = torch.softmax(log_resp, dim=1)
    return (resp[..., None] * diff).sum(dim=1) / var


def whole_score_difference(point: tuple[float, float], sampler: str, t0: float, r: int, n: int = 1000) -> float:
    """Mean ``||s_w(x'(t_r), t_r) - s_w(x''(t_r), t_r)||`` over ``n`` noise draws."""
    sde = SDE("ve", sigma_min=0.1, sigma_max=20.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.tensor(point, dtype=torch.float64).expand(n, 2).clone()
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    noise = [torch.randn(n, 2, generator=generator, dtype=torch.float64) for _ in range(r)]
    t = torch.full((n,), t0, dtype=torch.float64)
    whole, own, t_r = tscale_pair(x0, t, 1 / 100, r, z, sde, mixture_score, sampler, noise)
    _, std_r = sde.marginal(t_r)
    return float((mixture_score(whole, t_r, std_r) - mixture_score(own, t_r, std_r)).norm(dim=1).mean())


@pytest.mark.parametrize("sampler", ["ode", "sde"])
@pytest.mark.parametrize(("t0", "r"), [(0.6, 59), (0.6, 1)])
def test_fig3_anomalous_point_has_the_larger_whole_score_difference(sampler: str, t0: float, r: int) -> None:
    """Fig. 3 (a: flow ODE, c: reverse SDE, t = 0.6): iterated to t = 0.01 (r = 59), and one T-scale step."""
    anomalous = whole_score_difference(ANOMALY, sampler, t0, r)
    for point in NORMALS:
        normal = whole_score_difference(point, sampler, t0, r)
        assert anomalous > 3 * normal, (point, anomalous, normal)


def test_self_score_path_returns_to_the_original_point() -> None:
    """Eq. 9 iterated with the z update of line 6 is the true trajectory: x''(t -> 0) ~ x(0) (appendix A.1)."""
    sde = SDE("ve", sigma_min=0.1, sigma_max=20.0)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.tensor(ANOMALY, dtype=torch.float64).expand(200, 2).clone()
    z = torch.randn(200, 2, generator=generator, dtype=torch.float64)
    t = torch.full((200,), 0.6, dtype=torch.float64)
    start = x0 + 0.1 * (200.0**0.6) * z
    _, own, _ = tscale_pair(x0, t, 1 / 100, 59, z, sde, mixture_score, "ode")
    assert (own - x0).norm(dim=1).mean() < 0.1 * (start - x0).norm(dim=1).mean()


class LinearScore(torch.nn.Module):
    """A score network with known output and features, to check the graph's arithmetic.

    ``s(x, t) = -a(t) x / sigma``; features ``f1 = x`` and ``f2 = 2 x`` average-pooled 2x2.
    """

    def feature_names(self) -> dict[str, tuple[int, int]]:
        return {"f1": (3, 1), "f2": (3, 2)}

    def forward(self, x, t, sigma=None, return_features=False):  # noqa: ANN001, ANN201
        out = -(1.0 + t).reshape(-1, 1, 1, 1) * x / sigma.reshape(-1, 1, 1, 1)
        if not return_features:
            return out
        return out, {"f1": x * (1.0 + t).reshape(-1, 1, 1, 1), "f2": torch.nn.functional.avg_pool2d(2 * x, 2)}


def literal_algorithm(net, image, sde, times, dt, r, z, step_noise, sampler, names):  # noqa: ANN001, ANN201
    """Algorithms 1 / 2 for one image, one start time at a time, written out line by line."""
    total = {name: 0.0 for name in names}
    for k, t in enumerate(times):
        mu, sigma = sde.marginal(torch.tensor([t], dtype=torch.float64))
        x0 = image.double()
        x_t = mu * x0  # line 2
        z_k = z[k : k + 1].double()  # line 3
        whole = own = x_t + sigma * z_k  # line 4
        t_i = t
        for i in range(r):  # line 5
            ti = torch.tensor([t_i], dtype=torch.float64)
            f_w, g = sde.drift_diffusion(whole, ti)
            f_o, _ = sde.drift_diffusion(own, ti)
            _, s_i = sde.marginal(ti)
            s_w = net(whole, ti, sigma=s_i)
            s_e = -z_k / s_i
            whole = whole + f_w * (-dt)
            own = own + f_o * (-dt)
            if sampler == "ode":
                whole = whole + 0.5 * g**2 * s_w * dt
                own = own + 0.5 * g**2 * s_e * dt
            else:
                n = step_noise[i, k : k + 1].double()
                whole = whole + g**2 * s_w * dt + g * dt**0.5 * n
                own = own + g**2 * s_e * dt + g * dt**0.5 * n
            t_i = t_i - dt
            mu_n, s_n = sde.marginal(torch.tensor([t_i], dtype=torch.float64))
            z_k = (own - mu_n * x0) / s_n
        t_r = torch.tensor([t_i, t_i], dtype=torch.float64)
        _, s_r = sde.marginal(t_r)
        _, feats = net(torch.cat([whole, own]), t_r, sigma=s_r, return_features=True)  # line 8
        for name in names:
            a, b = feats[name][:1], feats[name][1:]
            total[name] = total[name] + (a - b).square().sum(dim=1, keepdim=True).sqrt()
    return total


@pytest.mark.parametrize("sampler", ["ode", "sde"])
@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_batched_graph_matches_the_algorithm_written_out(sampler: str, kind: str) -> None:
    sde = SDE(kind, sigma_min=0.01, sigma_max=348.0)
    times, dt = [0.375, 0.25, 0.125], 1 / 64  # exact in float32, the graph's buffer type
    graph = ScoreTScaleGraph(
        LinearScore(),
        sde=sde,
        times=times,
        dt=dt,
        r=2,
        feature_maps=["f1", "f2"],
        image_size=8,
        channels=3,
        sampler=sampler,
        noise_seed=5,
    ).double()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = graph.distances(images)
    for b in range(2):
        want = literal_algorithm(
            LinearScore(), images[b : b + 1], sde, times, dt, 2, graph.z, graph.step_noise, sampler, ["f1", "f2"]
        )
        for name in ("f1", "f2"):
            torch.testing.assert_close(got[name][b : b + 1], want[name], rtol=1e-9, atol=1e-12)
    anomaly_map, score = graph(images)
    f1 = got["f1"]
    f2 = torch.nn.functional.interpolate(got["f2"], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_map, (f1 * f2)[:, 0])
    torch.testing.assert_close(score, (f1 * f2).amax(dim=(1, 2, 3)))
    graph.combine = "sum"
    torch.testing.assert_close(graph(images)[0], (f1 + f2)[:, 0])


def test_graph_rejects_bad_settings() -> None:
    unet = ScoreUNet(UNetConfig.preset("tiny", in_channels=1))
    common = {"sde": SDE("ve"), "dt": 0.01, "image_size": 16, "channels": 1}
    with pytest.raises(ValueError, match="unknown feature maps"):
        ScoreTScaleGraph(unet, times=[0.1], r=1, feature_maps=["dec9"], **common)
    with pytest.raises(ValueError, match="start time"):
        ScoreTScaleGraph(unet, times=[0.01], r=1, feature_maps=["dec0"], **common)
    with pytest.raises(ValueError, match="sampler"):
        ScoreTScaleGraph(unet, times=[0.1], r=1, feature_maps=["dec0"], sampler="euler", **common)


def test_graph_is_deterministic_and_batch_independent() -> None:
    torch.manual_seed(0)
    unet = ScoreUNet(
        UNetConfig(
            base_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(),
            embed_dim=16,
            in_channels=3,
            groups=4,
            output_scaling="sigma",
            mid_blocks=0,
        )
    )
    graph = ScoreTScaleGraph(
        unet,
        sde=SDE("vp"),
        times=[0.125, 0.075, 0.025],
        dt=1 / 2000,
        r=1,
        feature_maps=["dec0", "mid"],
        image_size=16,
        channels=3,
        smoothing_sigma=1.0,
    ).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps, scores = graph(images)
        again, _ = graph(images)
        single, single_score = graph(images[1:2])
    assert maps.shape == (3, 16, 16) and scores.shape == (3,)
    assert torch.equal(maps, again)
    torch.testing.assert_close(single[0], maps[1], rtol=1e-4, atol=1e-7)
    # The map is a product of distances, never negative; what can fail is the score (its maximum) and a map
    # that is zero everywhere (the whole-score and self-score paths not told apart).
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))
    assert torch.all(scores > 0)


def test_rank_feature_maps_keeps_the_informative_taps() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10, dtype=int), np.ones(10, dtype=int)]
    masks = np.zeros((20, 8, 8), dtype=bool)
    masks[10:, 2:4, 2:4] = True
    informative = rng.random((20, 8, 8)) + 3.0 * masks
    noise = rng.random((20, 8, 8))
    selected, record = rank_feature_maps(
        {"noise": noise, "good": informative, "also": informative + 0.1 * noise}, labels, masks, "product", keep=2
    )
    assert "noise" not in selected and selected[0] in ("good", "also")
    assert record["candidates"]["good"]["image_auroc"] == 1.0
    assert record["candidates"]["noise"]["criterion"] < 0.8
    assert set(record["prefixes"]) == {selected[0], ",".join(selected)} or len(selected) == 1


def test_model_config_follows_appendix_b() -> None:
    ve = ScoreTScale.model_config("tiny", 3, ScoreTScale.parse_params({"sde": "ve"}))["unet"]
    vp = ScoreTScale.model_config("tiny", 1, ScoreTScale.parse_params({"sde": "vp"}))["unet"]
    assert ve["time_embedding"] == "fourier" and vp["time_embedding"] == "sinusoidal"
    assert ve["output_scaling"] == vp["output_scaling"] == "sigma"
    assert vp["in_channels"] == 1


def test_bad_parameters_are_named(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=32, n_train=6, n_test_good=1, n_test_defect=1)
    cfg = TrainConfig(steps=1, batch_size=2)
    for params, match in (
        ({"sde": "spr"}, "sde='spr' must be one of"),
        ({"timesteps": [1]}, "outside"),
        ({"feature_maps": []}, "feature_maps"),
    ):
        with pytest.raises(ValueError, match=match):
            spec = RunSpec(method="score-tscale", data=[data], preset="tiny", image_size=32, train=cfg,
                           params=params, runs_root=tmp_path / "runs", device="cpu")  # fmt: skip
            train_run(spec, progress=False)


@pytest.mark.slow
def test_tiny_model_trains_and_detects_generated_defects(tmp_path: Path) -> None:
    """The issue's acceptance test: tiny preset on generated defects, CPU, image AUROC >= 0.9, with the
    feature taps chosen automatically on pseudo-anomalies and the choice written into the run."""
    data, run_dir, summary = train_on_demo_data("score-tscale", tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    selection = config["state"]["feature_selection"]
    assert selection["selected"] == summary["feature_maps"] and selection["n_pseudo"] > 0
    # the set was calibrated on the best single tap: it stopped at the first strength at or below the target
    tried = selection["calibration"]["reference_auroc_by_strength"]
    assert str(selection["strength"]) == list(tried)[-1]
    assert all(v > selection["calibration"]["target_reference_auroc"] for v in list(tried.values())[:-1])
    assert set(selection["candidates"]) == set(load_method(run_dir).unet.feature_names())
    assert summary["network_calls_per_image"]["sample_evaluations"] == 5 * 3

    metrics, _ = evaluate_run(run_dir, data, tmp_path / "report")
    assert metrics["image_auroc"] >= 0.9, metrics

    method = load_method(run_dir)
    torch.manual_seed(0)
    method.unet.load_state_dict(type(method.unet)(method.unet.config).state_dict())
    samples = list_test(data)
    maps, scores = run_graph(method.build_graph(), load_images(samples, method.preprocess_config))
    untrained = compute_metrics(np.array([s.label for s in samples]), scores, load_masks(samples, maps.shape[-1]), maps)
    assert untrained["image_auroc"] < metrics["image_auroc"] - 0.05, untrained
