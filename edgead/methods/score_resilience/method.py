"""score-resilience: fit a score U-Net by denoising score matching, detect by restoration error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.diffusion.sde import spr_sigma
from edgead.methods.base import Method
from edgead.methods.score_resilience.graph import ScoreResilienceGraph
from edgead.nn.unet import ScoreUNet, UNetConfig
from edgead.train.checkpoint import load_weights
from edgead.train.distributed import DistInfo


def dsm_loss(net: nn.Module, x: torch.Tensor, sigma: float, k_min: float, k_max: float) -> torch.Tensor:
    """Denoising score matching, eq. 4: ``E ||s(x + sigma_k z, k) - (x - x_tilde) / sigma_k||^2``.

    ``k ~ U(k_min, k_max]`` (the paper: U(0, 1], the released code keeps ``k >= 1e-5``). Since
    ``(x - x_tilde) / sigma_k = -z`` the target is ``-z``; the squared error is summed over pixels and
    averaged over the batch, as in the released code.
    """
    k = torch.rand(x.shape[0], device=x.device) * (k_max - k_min) + k_min
    sigma_k = spr_sigma(k, sigma).view(-1, 1, 1, 1)
    z = torch.randn_like(x)
    s = net(x + sigma_k * z, k)
    return (s.float() + z).square().sum(dim=(1, 2, 3)).mean()


class ScoreResilience(Method):
    """Shin et al., "Anomaly Detection using Score-based Perturbation Resilience", ICCV 2023."""

    name = "score-resilience"

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "sigma": 25.0,  # section 5.3
            "k": 1e-3,  # section 5.3: inference perturbation scale
            "n_draws": 3,  # section 5.3 / Table 5
            "map_size": None,  # None: the model's input size; the paper evaluates at 256
            "filter_size": None,  # None: 31 at 256, scaled to map_size
            "noise_seed": 0,
            "train_k_min": 1e-5,
            "train_k_max": 1.0,
        }

    def unet_config(self) -> UNetConfig:
        return UNetConfig.from_dict(self.config.model["unet"])

    def build_unet(self) -> ScoreUNet:
        return ScoreUNet(self.unet_config())

    def fit(
        self,
        train_images: torch.Tensor,
        train_cfg: TrainConfig,
        dist_info: DistInfo,
        resume: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        params = self.config.method_params
        torch.manual_seed(train_cfg.seed)
        self.unet = self.build_unet()

        def loss(net: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            return dsm_loss(net, batch, params["sigma"], params["train_k_min"], params["train_k_max"])

        return self.train_unet(self.unet, loss, train_images, train_cfg, dist_info, resume, progress,
                               "score-resilience DSM")

    def build_graph(self) -> ScoreResilienceGraph:
        params = self.config.method_params
        pre = self.preprocess_config
        return ScoreResilienceGraph(
            self.unet,
            sigma=params["sigma"],
            k=params["k"],
            n_draws=params["n_draws"],
            image_size=pre.image_size,
            channels=pre.channels,
            map_size=params.get("map_size"),
            filter_size=params.get("filter_size"),
            noise_seed=params.get("noise_seed", 0),
        ).eval()

    @classmethod
    def load(cls, run_dir: Path, config: RunConfig) -> ScoreResilience:
        method = cls(config, run_dir)
        method.unet = method.build_unet()
        method.unet.load_state_dict(load_weights(run_dir))
        method.unet.eval()
        return method
