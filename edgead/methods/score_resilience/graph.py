"""The score-resilience inference graph: Algorithm 1 of Shin et al. (ICCV 2023) as one ``nn.Module``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgead.diffusion.sde import spr_sigma
from edgead.methods.base import InferenceGraph
from edgead.methods.scoring import MapScore


def default_filter_size(map_size: int) -> int:
    """The paper's 31x31 mean filter at 256x256 maps, scaled to ``map_size`` and kept odd (>= 3)."""
    size = max(3, round(31 * map_size / 256))
    return size if size % 2 == 1 else size + 1


class ScoreResilienceGraph(InferenceGraph):
    """Restoration error map and image score of a batch (Algorithm 1, eq. 5-6).

    For each of the ``N`` fixed noise draws ``eps_n`` (a seeded buffer, so PyTorch, ONNX Runtime and
    TensorRT compute the same function): ``x_tilde = x + sigma_k * eps_n`` (line 6), the error
    ``||eps_n + s(x_tilde, k)||^2`` summed over channels (line 7, see the README on the sign), the mean over
    the ``N`` draws, bilinear resize to ``map_size``, a ``filter_size`` mean filter (line 9) and the image
    score ``max`` of the map (section 4.4). The ``N`` draws run as one batch of ``B * N``.

    Example:
        >>> graph = ScoreResilienceGraph(unet, sigma=25.0, k=1e-3, n_draws=3, image_size=64, channels=3)
        >>> anomaly_map, score = graph(images)  # (B, 64, 64), (B,)
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        sigma: float,
        k: float,
        n_draws: int,
        image_size: int,
        channels: int,
        map_size: int | None = None,
        filter_size: int | None = None,
        noise_seed: int = 0,
        map_score: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if n_draws < 1:
            raise ValueError(f"n_draws must be >= 1, got {n_draws}")
        self.unet = unet
        self.k = float(k)
        self.sigma_k = float(spr_sigma(k, sigma))  # Algorithm 1, line 2
        self.image_size = image_size
        self.map_size = map_size or image_size
        self.filter_size = filter_size or default_filter_size(self.map_size)
        if self.filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd so the map keeps its size, got {self.filter_size}")
        self.noise_seed = noise_seed
        self.map_score = map_score if map_score is not None else MapScore("max", map_size=(self.map_size,) * 2)
        generator = torch.Generator().manual_seed(noise_seed)
        self.register_buffer("noise", torch.randn(n_draws, channels, image_size, image_size, generator=generator))

    def export_notes(self) -> dict[str, Any]:
        return {
            "noise": {
                "mode": "fixed seeded buffer in the graph",
                "seed": self.noise_seed,
                "draws": int(self.noise.shape[0]),
            },
            "fp32_parts": "normalisation, time embedding, noise injection, error reduction, resize, mean filter, max",
        }

    def restoration_error(self, image: torch.Tensor) -> torch.Tensor:
        """Per-pixel restoration error averaged over the draws, ``(B, 1, S, S)`` before smoothing (eq. 6)."""
        b, c, h, w = image.shape
        n = self.noise.shape[0]
        eps = self.noise.unsqueeze(0).expand(b, n, c, h, w)
        x_tilde = (image.unsqueeze(1) + self.sigma_k * eps).reshape(b * n, c, h, w)  # line 6
        k = torch.full((b * n,), self.k, dtype=image.dtype, device=image.device)
        score = self.unet(x_tilde, k)
        error = (eps.reshape(b * n, c, h, w) + score).square().sum(dim=1)  # line 7
        return error.reshape(b, n, h, w).mean(dim=1, keepdim=True)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = self.restoration_error(image)
        if self.map_size != image.shape[-1]:
            error = F.interpolate(error, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        smoothed = F.avg_pool2d(error, self.filter_size, stride=1, padding=self.filter_size // 2)  # line 9
        anomaly_map = smoothed[:, 0]
        return anomaly_map, self.map_score(anomaly_map)  # section 4.4: the max (other aggregations: scoring.py)
