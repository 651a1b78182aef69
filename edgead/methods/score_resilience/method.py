"""score-resilience: fit a score U-Net by denoising score matching, detect by restoration error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgead.diffusion.sde import spr_sigma
from edgead.methods.params import FIXED_SEED, at_least, param, positive
from edgead.methods.score_resilience.graph import ScoreResilienceGraph
from edgead.methods.score_unet import ScoreUNetMethod
from edgead.methods.scoring import MapScoreParams


def _odd(value: int) -> str | None:
    return None if value % 2 == 1 else "odd (the map keeps its size)"


@dataclass(frozen=True)
class ScoreResilienceParams(MapScoreParams):
    sigma: float = param(25.0, "sigma of the perturbation scale sigma_k", "Sec. 5.3", check=positive, origin="paper")
    k: float = param(
        1e-3, "inference perturbation scale k in (0, 1]", "Sec. 5.3, Alg. 1 line 2", check=positive, origin="paper"
    )
    n_draws: int = param(3, "noise draws N averaged per image", "Sec. 5.3, Table 5", check=at_least(1), origin="paper")
    map_size: int | None = param(
        None,
        "anomaly map size (null: the input size; the paper evaluates at 256)",
        "Sec. 5.3",
        check=at_least(1),
        origin="paper",
    )
    filter_size: int | None = param(
        None, "mean filter size (null: 31 at 256, scaled to map_size)", "Alg. 1 line 9", check=_odd, origin="paper"
    )
    noise_seed: int = param(
        0,
        "seed of the fixed noise buffer in the graph",
        "ours",
        origin="engineering",
        why=FIXED_SEED,
    )
    train_k_min: float = param(
        1e-5, "lower end of k ~ U[k_min, k_max) in training", "eq. 4, released code", check=positive, origin="paper"
    )
    train_k_max: float = param(1.0, "upper end of k in training", "eq. 4", check=positive, origin="paper")

    def check(self) -> str | None:
        if self.train_k_min >= self.train_k_max:
            return f"train_k_min ({self.train_k_min}) must be < train_k_max ({self.train_k_max})"
        return None


def dsm_loss(net: nn.Module, x: torch.Tensor, sigma: float, k_min: float, k_max: float) -> torch.Tensor:
    """Denoising score matching, eq. 4: ``E ||s(x + sigma_k z, k) - (x - x_tilde) / sigma_k||^2``.

    ``k ~ U[k_min, k_max)`` (the paper: U(0, 1], the released code keeps ``k >= 1e-5``). Since
    ``(x - x_tilde) / sigma_k = -z`` the target is ``-z``; the squared error is summed over pixels and
    averaged over the batch, as in the released code.
    """
    k = torch.rand(x.shape[0], device=x.device) * (k_max - k_min) + k_min
    sigma_k = spr_sigma(k, sigma).view(-1, 1, 1, 1)
    z = torch.randn_like(x)
    s = net(x + sigma_k * z, k)
    return (s.float() + z).square().sum(dim=(1, 2, 3)).mean()


class ScoreResilience(ScoreUNetMethod):
    """Shin et al., "Anomaly Detection using Score-based Perturbation Resilience", ICCV 2023."""

    name = "score-resilience"
    paper = "Shin et al., ICCV 2023"
    summary = "single-step restoration error of a score U-Net"
    Params = ScoreResilienceParams
    params: ScoreResilienceParams
    inference_params = ScoreUNetMethod.inference_params | {"k", "n_draws", "map_size", "filter_size", "noise_seed"}
    tune_grid = {"image_score": ["max", "topk_mean", "interior_max"]}

    def loss(self, net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        p = self.params
        return dsm_loss(net, batch, p.sigma, p.train_k_min, p.train_k_max)

    def build_graph(self) -> ScoreResilienceGraph:
        p, pre = self.params, self.preprocess_config
        return ScoreResilienceGraph(
            self.unet,
            sigma=p.sigma,
            k=p.k,
            n_draws=p.n_draws,
            image_size=pre.image_size,
            channels=pre.channels,
            map_size=p.map_size,
            filter_size=p.filter_size,
            noise_seed=p.noise_seed,
            map_score=p.map_score((p.map_size or pre.image_size,) * 2),
        ).eval()
