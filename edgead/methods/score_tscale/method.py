"""score-tscale: a score U-Net on a VE / VP / sub-VP SDE; detect by whole- vs self-score feature differences."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgead.diffusion.sde import SDE, broadcast_like, perturb
from edgead.methods.base import FitContext
from edgead.methods.params import FIXED_SEED, at_least, param, positive
from edgead.methods.score_tscale.graph import COMBINES, SAMPLERS, ScoreTScaleGraph
from edgead.methods.score_unet import ScoreUNetMethod
from edgead.methods.scoring import MapScoreParams
from edgead.methods.validation import PseudoValidationSet, calibrated_set, pseudo_figures, ranked
from edgead.nn.unet import UNetConfig

SDE_KINDS = ("ve", "vp", "subvp")


def _feature_maps(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        return None
    return '"auto" or a non-empty list of tap names, e.g. ["dec0", "dec1"]'


@dataclass(frozen=True)
class ScoreTScaleParams(MapScoreParams):
    sde: str = param(
        "ve", "forward SDE", "Table 1 (i): VE with the flow ODE is the paper's best", choices=SDE_KINDS, origin="paper"
    )
    sigma_min: float = param(0.01, "VE sigma_min", "App. B (MVTec)", check=positive, origin="paper")
    sigma_max: float = param(348.0, "VE sigma_max", "App. B (MVTec)", check=positive, origin="paper")
    beta_min: float = param(0.1, "VP / sub-VP beta_min", "App. B", check=positive, origin="paper")
    beta_max: float = param(20.0, "VP / sub-VP beta_max", "App. B", check=positive, origin="paper")
    sampler: str = param(
        "ode",
        "ode: Algorithm 1 (flow ODE); sde: Algorithm 2 (reverse SDE)",
        "Alg. 1-2",
        choices=SAMPLERS,
        origin="paper",
    )
    n_timesteps: int = param(
        2000, "diffusion time steps, dt = 1 / n_timesteps", "Sec. 5.2", check=at_least(1), origin="paper"
    )
    timesteps: list[float] = param(
        [250, 200, 150, 100, 50], "the T scales {t} in units of 1 / n_timesteps", "Sec. 5.5", origin="paper"
    )
    r: int = param(1, "whole-score steps per T scale", "Sec. 5.5", check=at_least(1), origin="paper")
    dt_timesteps: float = param(
        20,
        "step t_i - t_(i+1) in units of 1 / n_timesteps (README: FP32 conditioning)",
        "ours (Fig. 3 step)",
        check=positive,
        origin="engineering",
        why="the paper gives no solver step; 20 of 2000 time steps, read off its Fig. 3",
    )
    feature_maps: Any = param(
        "auto",
        '"auto" (chosen on pseudo-anomalies) or a list of U-Net taps',
        "ours",
        check=_feature_maps,
        origin="pseudo-validation",
        why="auto: the decoder taps that best separate held-out normals from pseudo-anomalies",
    )
    auto_candidates: list[str] | None = param(
        None,
        "taps the automatic selection considers (null: every tap)",
        "ours",
        origin="engineering",
        why="every decoder tap of the U-Net is a candidate (null)",
    )
    auto_keep: int = param(
        3,
        "largest number of taps the automatic selection keeps",
        "ours",
        check=at_least(1),
        origin="engineering",
        why=(
            "the paper multiplies a few chosen maps (Fig. 5); three keep the "
            "product from vanishing; not tuned on test data"
        ),
    )
    auto_pseudo: int = param(
        32,
        "held-out normal images (and as many pseudo-anomalies) for the selection",
        "ours, LafitE Sec. 3.4",
        check=at_least(2),
        origin="engineering",
        why="enough pseudo-anomalies to rank the taps while bounding the CPU cost of the choice",
    )
    combine: str = param(
        "product",
        "how the T-scale maps combine",
        "Sec. 4.2 (product); sum is the option",
        choices=COMBINES,
        origin="paper",
    )
    smoothing_sigma: float = param(
        0.0,
        "Gaussian smoothing of the map (the paper smooths nothing)",
        "ours",
        check=at_least(0.0),
        origin="paper",
    )
    noise_seed: int = param(
        0, "seed of the fixed noise buffer in the graph (Alg. 2)", "ours", origin="engineering", why=FIXED_SEED
    )
    train_t_min: float = param(
        1e-5, "lower end of t ~ U(t_min, t_max) in training", "eq. 3", check=positive, origin="paper"
    )
    train_t_max: float = param(1.0, "upper end of t in training", "eq. 3", check=positive, origin="paper")

    def check(self) -> str | None:
        low = self.r * self.dt_timesteps
        bad = [k for k in self.timesteps if not low < k <= self.n_timesteps]
        if bad:
            return f"timesteps {bad} outside (r * dt_timesteps, n_timesteps] = ({low:g}, {self.n_timesteps}]"
        return None


def sde_dsm_loss(net: nn.Module, x: torch.Tensor, sde: SDE, t_min: float, t_max: float) -> torch.Tensor:
    """Denoising score matching, eq. 3 with ``lambda(t) = sigma(t)^2`` (Song et al. 2021, eq. 7).

    ``t ~ U(t_min, t_max)``, ``x(t) = mu(t) x(0) + sigma(t) z`` (eq. 4) and the target
    ``grad log p_0t = -z / sigma(t)``; weighted by ``sigma(t)^2`` the loss is
    ``||sigma(t) s_theta(x(t), t) + z||^2``, summed over pixels and averaged over the batch.
    """
    t = torch.rand(x.shape[0], device=x.device) * (t_max - t_min) + t_min
    _, std = sde.marginal(t)
    z = torch.randn_like(x)
    s = net(perturb(x, t, z, sde), t, sigma=std)
    return (broadcast_like(std, x) * s.float() + z).square().sum(dim=(1, 2, 3)).mean()


def rank_feature_maps(
    maps: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray, combine: str, keep: int
) -> tuple[list[str], dict[str, Any]]:
    """Choose feature taps on a pseudo-anomaly validation set (our addition; the paper picks by hand).

    Each candidate's upsampled distance map, with its maximum as the image score, is scored by the shared
    pseudo-validation figures (``edgead.methods.validation``, rule ``"mean"``: ``(image AUROC + pixel
    AUROC) / 2``) on held-out normal images (label 0) and pseudo-anomalies (label 1, with masks); the
    candidates are ranked, then the best-ranked prefix of length 1..``keep`` whose combined map
    (``combine``) scores highest is kept (earlier candidates and shorter prefixes win exact ties).

    Args:
        maps: Candidate name -> (N, S, S) map at image size.
        labels: (N,) 0/1.
        masks: (N, S, S) bool, all False for normal images.
        combine: ``"product"`` or ``"sum"``.
        keep: Largest number of taps to keep.

    Returns:
        ``(selected names, record)``; the record holds every candidate's and prefix's validation AUROCs.
    """

    def quality(m: np.ndarray) -> dict[str, Any]:
        return pseudo_figures(labels, masks, m, m.reshape(len(m), -1).max(axis=1), rule="mean")

    candidates = {name: quality(m) for name, m in maps.items()}
    order = ranked(candidates, "mean")
    prefixes = {}
    for k in range(1, min(keep, len(order)) + 1):
        combined = None
        for name in order[:k]:
            m = maps[name].astype(np.float64)
            combined = m if combined is None else (combined * m if combine == "product" else combined + m)
        prefixes[",".join(order[:k])] = quality(combined)
    best = ranked(prefixes, "mean")[0]
    return best.split(","), {"candidates": candidates, "prefixes": prefixes, "selected": best.split(",")}


class ScoreTScale(ScoreUNetMethod):
    """Teng et al., "Unsupervised Visual Defect Detection with Score-Based Generative Model" (Score-DD)."""

    name = "score-tscale"
    paper = "Teng et al. (Score-DD)"
    summary = "few-step T-scales, whole- vs self-score feature differences; maps chosen on pseudo-anomalies"
    Params = ScoreTScaleParams
    params: ScoreTScaleParams
    #: Sec. 4.1: "All of the images [...] are resized to 256 x 256 pixels" (not score-resilience's 192)
    default_image_size = 256
    inference_params = ScoreUNetMethod.inference_params | {
        "combine",
        "smoothing_sigma",
        "noise_seed",
        "sampler",
        "feature_maps",
    }
    tune_grid = {"image_score": ["max", "topk_mean", "interior_max"]}

    @classmethod
    def unet_config(cls, preset: str, channels: int, params: ScoreTScaleParams) -> UNetConfig:
        """Appendix B: Fourier time embedding (scale 16) for VE, positional for VP / sub-VP; the network
        output is divided by ``sigma(t)`` (NCSN++ ``scale_by_sigma``), so it predicts ``-z``."""
        unet = UNetConfig.preset(preset, in_channels=channels)
        unet.time_embedding = "fourier" if params.sde == "ve" else "sinusoidal"
        unet.output_scaling = "sigma"
        return unet

    def sde(self) -> SDE:
        p = self.params
        return SDE(p.sde, sigma_min=p.sigma_min, sigma_max=p.sigma_max, beta_min=p.beta_min, beta_max=p.beta_max)

    def selected_feature_maps(self) -> list[str]:
        maps = self.params.feature_maps
        if maps != "auto":
            return list(maps)
        selection = self.config.state.get("feature_selection")
        if not selection:
            raise ValueError('feature_maps="auto" but the run holds no selection; train it again')
        return list(selection["selected"])

    def loss(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return sde_dsm_loss(net, batch, self.sde(), self.params.train_t_min, self.params.train_t_max)

    def after_training(self, ctx: FitContext) -> dict[str, Any]:
        summary: dict[str, Any] = {"network_calls_per_image": self.network_calls()}
        if self.params.feature_maps == "auto" and ctx.dist.is_main:
            start = time.perf_counter()
            selection = self.select_feature_maps(ctx, device=ctx.dist.device)
            selection["seconds"] = round(time.perf_counter() - start, 1)
            # feature_maps stays "auto" in method_params; build_graph reads the selection from the state.
            self.record_choice("feature_selection", selection)
            summary["feature_maps"] = selection["selected"]
            summary["feature_selection_auroc"] = selection["prefixes"][",".join(selection["selected"])]
        return summary

    def network_calls(self) -> dict[str, Any]:
        """How often the network runs per image: ``r`` calls on T samples and one on 2T (section 5.5)."""
        n, r = len(self.params.timesteps), self.params.r
        return {
            "batched_calls": r + 1,
            "sample_evaluations": n * (r + 2),
            "calls": f"{r} x batch {n} (whole-score steps) + 1 x batch {2 * n} (features of x' and x'')",
        }

    @torch.no_grad()
    def select_feature_maps(self, ctx: FitContext, device: str | torch.device = "cpu") -> dict[str, Any]:
        """``feature_maps="auto"``: rank every candidate tap on pseudo-anomalies (see :func:`rank_feature_maps`);
        one pass of the graph over the set gives every tap's map. The set is calibrated to discriminate
        (:func:`edgead.methods.validation.calibrated_set`) on the best single tap: the paper picks its taps
        by hand, so there is no default candidate, and a set on which the best tap saturates cannot rank."""
        p = self.params
        candidates = p.auto_candidates or list(self.unet.feature_names())
        graph = self._graph(candidates).to(device).eval()
        seen: dict[str, dict[str, np.ndarray]] = {}

        def tap_maps(candidate_set: PseudoValidationSet) -> float:  # keeps the maps of the set it ends on
            images = candidate_set.images
            size = images.shape[-1]
            maps: dict[str, list[np.ndarray]] = {name: [] for name in candidates}
            for start in range(0, len(images), 8):
                batch = torch.from_numpy(images[start : start + 8]).to(device)
                for name, d in graph.distances(batch, candidates).items():
                    maps[name].append(graph.smooth(graph.combine_maps([d], size))[:, 0].float().cpu().numpy())
            seen["maps"] = {name: np.concatenate(parts) for name, parts in maps.items()}
            scores = {name: m.reshape(len(m), -1).max(axis=1) for name, m in seen["maps"].items()}
            return max(candidate_set.figures(seen["maps"][name], s)["image_auroc"] for name, s in scores.items())

        rgb, source = self.held_out_normals(ctx, p.auto_pseudo)
        validation = calibrated_set(rgb, self.preprocess_config, source, tap_maps)
        graph.cpu()
        _, record = rank_feature_maps(seen["maps"], validation.labels, validation.masks, p.combine, p.auto_keep)
        record.update(validation.describe())
        return record

    def _graph(self, feature_maps: Sequence[str]) -> ScoreTScaleGraph:
        p, pre = self.params, self.preprocess_config
        n = p.n_timesteps
        return ScoreTScaleGraph(
            self.unet,
            sde=self.sde(),
            times=[k / n for k in p.timesteps],
            dt=float(p.dt_timesteps) / n,
            r=p.r,
            feature_maps=feature_maps,
            image_size=pre.image_size,
            channels=pre.channels,
            sampler=p.sampler,
            combine=p.combine,
            smoothing_sigma=p.smoothing_sigma,
            noise_seed=p.noise_seed,
            map_score=p.map_score((pre.image_size, pre.image_size)),
        ).eval()

    def build_graph(self) -> ScoreTScaleGraph:
        return self._graph(self.selected_feature_maps())
