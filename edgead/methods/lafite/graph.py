"""The LafitE inference graph (Yin et al. 2023, Sec. 3.1-3.3, eq. 1, 8, 10-12) as one ``nn.Module``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.diffusion.schedules import ddim_step, ddim_timesteps, ddpm_q_sample
from edgead.methods.base import InferenceGraph
from edgead.methods.lafite.memory import FeatureEditor
from edgead.nn.backbones import InputAdapter
from edgead.nn.filters import GaussianBlur


class FeatureStandardiser(nn.Module):
    """Per-channel ``(x - mean) / std`` with the training features' statistics (our choice, see the README):
    the DDPM's unit-variance noise then has the scale of the data in every channel."""

    keep_fp32 = True

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().reshape(1, -1, 1, 1))
        self.register_buffer("std", std.float().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def aggregate(features: Sequence[Tensor], grid: int) -> Tensor:
    """Eq. 1, the multi-scale aggregation: every stage bilinearly resized to ``grid x grid`` and concatenated
    along channels."""
    return torch.cat(
        [F.interpolate(f.float(), size=(grid, grid), mode="bilinear", align_corners=False) for f in features], dim=1
    )


class LafitEGraph(InferenceGraph):
    """Anomaly map and image score of a batch: Sec. 3.1-3.3 of LafitE, every step unrolled.

    ``forward(image (B, C, S, S)) -> (anomaly_map (B, S, S), score (B,))``:

    1. features (Sec. 3.1, eq. 1): ``adapter`` (the shared preprocessing -> the backbone's input scaling),
       ``backbone`` stages, each resized to ``grid x grid`` and concatenated, then ``standardiser``: ``x_0``;
    2. feature editing (eq. 10, ``editor``; skipped in the "w/o F.E." ablation): ``e``;
    3. noising to step ``tau`` (eq. 11; eq. 8 without editing) with a fixed seeded noise buffer, so PyTorch,
       ONNX Runtime and TensorRT compute the same function;
    4. ``len(timesteps)`` deterministic DDIM updates (eq. 7, ``eta = 0``) with the epsilon U-Net: ``x_0^rec``;
    5. eq. 12: ``||x_0^rec - x_0||^2`` per position, bilinear upsampling to ``S x S``, Gaussian smoothing;
       the image score is the maximum of the average-pooled map (Sec. 3.3; other aggregations: scoring.py).

    Only the backbone and the U-Net run in FP16 in the FP16 export; everything else stays FP32.
    """

    fp16_modules = ("backbone", "unet")

    def __init__(
        self,
        *,
        adapter: InputAdapter,
        backbone: nn.Module,
        standardiser: FeatureStandardiser,
        unet: nn.Module,
        editor: FeatureEditor | None,
        grid: int,
        alpha_bar: Tensor,
        tau: int,
        ddim_steps: int,
        image_size: int,
        smoothing_sigma: float,
        pool_size: int,
        noise_seed: int = 0,
        map_score: nn.Module,
    ) -> None:
        super().__init__()
        T = len(alpha_bar)
        if not 1 <= tau <= T:
            raise ValueError(f"tau must be in 1..{T} (the diffusion steps), got {tau}")
        self.adapter, self.backbone, self.standardiser = adapter, backbone, standardiser
        self.unet, self.editor = unet, editor
        self.grid, self.tau, self.T = int(grid), int(tau), T
        self.image_size = int(image_size)
        self.noise_seed = int(noise_seed)
        # alpha_bar_t for t = 1..T as Python floats: constants in the exported graph.
        self.alpha_bar = [float(a) for a in alpha_bar]
        self.timesteps = ddim_timesteps(self.tau, ddim_steps)
        channels = standardiser.mean.shape[1]
        generator = torch.Generator().manual_seed(self.noise_seed)
        self.register_buffer("noise", torch.randn(1, channels, self.grid, self.grid, generator=generator))
        self.blur = GaussianBlur(smoothing_sigma)
        self.pool_size = int(pool_size)
        self.map_score = map_score

    def ab(self, t: int) -> float:
        """``alpha_bar_t`` (``alpha_bar_0 = 1``)."""
        return 1.0 if t == 0 else self.alpha_bar[t - 1]

    def features(self, image: Tensor) -> Tensor:
        """``x_0``: the standardised aggregated feature tensor ``(B, C, grid, grid)`` (Sec. 3.1, eq. 1)."""
        return self.standardiser(aggregate(self.backbone(self.adapter(image)), self.grid))

    def reconstruct(self, x0: Tensor) -> Tensor:
        """``x_0^rec``: edit (eq. 10), noise to ``tau`` (eq. 11 / 8), then the DDIM updates (eq. 7)."""
        start = self.editor(x0) if self.editor is not None else x0
        x = ddpm_q_sample(start, self.ab(self.tau), self.noise.expand_as(start))
        for t, t_prev in self.timesteps:
            t_in = torch.full((x.shape[0],), t / self.T, dtype=x.dtype, device=x.device)  # step index t - 1
            eps = self.unet(x, t_in)
            x = ddim_step(x, eps.float(), self.ab(t), self.ab(t_prev))
        return x

    def score_features(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 12 and the image score, from ``x_0`` (what the hyperparameter selection reuses)."""
        error = (self.reconstruct(x0) - x0).square().sum(dim=1, keepdim=True)
        size = (self.image_size, self.image_size)
        anomaly_map = self.blur(F.interpolate(error, size=size, mode="bilinear", align_corners=False))
        pooled = F.avg_pool2d(anomaly_map, self.pool_size, stride=1) if self.pool_size > 1 else anomaly_map
        return anomaly_map[:, 0], self.map_score(pooled[:, 0])

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.score_features(self.features(image))

    def export_notes(self) -> dict[str, Any]:
        return {
            "noise": {"mode": "fixed seeded buffer in the graph (eq. 11's epsilon)", "seed": self.noise_seed},
            "fp32_parts": "input scaling, feature aggregation and standardisation, feature editing (distances, "
            "TopK, weights), noising, DDIM updates, error, upsampling, smoothing, pooling, max",
            "tau": self.tau,
            "ddim_timesteps": [t for t, _ in self.timesteps],
            "feature_editing": self.editor is not None,
        }


def scaled_size(value: float, image_size: int, reference: int = 224) -> float:
    """A pixel size given at the paper's 224 x 224 input, scaled to ``image_size``."""
    return value * image_size / reference


def pool_for(image_size: int, pool_size: int) -> int:
    """The average-pooling window at ``image_size`` for ``pool_size`` at 224 (at least 1)."""
    return max(1, int(math.floor(scaled_size(pool_size, image_size) + 0.5)))
