"""The gaussian (OPCA) inference graph: Wang et al. (2022), eq. 3-4 and section 3.4, as one ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgead.methods.base import InferenceGraph
from edgead.nn.backbones import InputAdapter


class StageGaussian(nn.Module):
    """Mahalanobis distance (eq. 3) to one fitted Gaussian, in its kept principal subspace.

    ``whitening`` is ``V_k / sqrt(lambda_k)`` for the kept eigenpairs of the shrunk covariance, so
    ``M(x) = || (x - mu) V_k diag(lambda_k)^(-1/2) ||`` equals ``sqrt((x - mu)^T Sigma^-1 (x - mu))``
    restricted to the kept components (all components: the full eq. 3).
    """

    def __init__(self, mean: torch.Tensor, whitening: torch.Tensor) -> None:
        super().__init__()
        if mean.ndim != 1 or whitening.ndim != 2 or whitening.shape[0] != mean.shape[0]:
            raise ValueError(
                f"mean (C,) and whitening (C, K) do not fit: {tuple(mean.shape)}, {tuple(whitening.shape)}"
            )
        self.register_buffer("mean", mean.float())
        self.register_buffer("whitening", whitening.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., C) -> (...)`` distances."""
        z = (features - self.mean) @ self.whitening
        return z.square().sum(dim=-1).sqrt()


class PositionGaussians(nn.Module):
    """Mahalanobis distance (eq. 3) of every feature position to its own Gaussian (PaDiM-style statistics,
    Defard et al. 2021), each in its kept principal subspace as in :class:`StageGaussian`.

    ``mean`` is ``(P, C)`` and ``whitening`` ``(P, C, K)`` for the ``P = h * w`` positions of a stage, with one
    kept count ``K`` for all of them, so the distances are one batched matrix product with fixed shapes
    (``MatMul`` in ONNX, no gather or loop).
    """

    def __init__(self, mean: torch.Tensor, whitening: torch.Tensor) -> None:
        super().__init__()
        if mean.ndim != 2 or whitening.ndim != 3 or whitening.shape[:2] != mean.shape:
            raise ValueError(
                f"mean (P, C) and whitening (P, C, K) do not fit: {tuple(mean.shape)}, {tuple(whitening.shape)}"
            )
        self.register_buffer("mean", mean.float())
        self.register_buffer("whitening", whitening.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, C) -> (B, h, w)`` distances, position ``(i, j)`` to Gaussian ``i * w + j``."""
        batch, height, width, channels = features.shape
        if height * width != self.mean.shape[0]:
            raise ValueError(f"{height} x {width} feature positions, but statistics for {self.mean.shape[0]}")
        centred = features.reshape(batch, height * width, channels) - self.mean  # (B, P, C)
        z = torch.matmul(centred.transpose(0, 1), self.whitening)  # (P, B, K): one product per position
        return z.square().sum(dim=-1).sqrt().transpose(0, 1).reshape(batch, height, width)


class GaussianGraph(InferenceGraph):
    """Image score (eq. 4) and anomaly map (section 3.4) of a batch.

    ``forward(image (B, C, S, S)) -> (anomaly_map (B, S, S), score (B,))``:

    1. ``InputAdapter``: shared preprocessing -> RGB scaled as the backbone's weights expect;
    2. ``backbone``: the feature maps ``phi_l`` of the chosen stages (section 3.1);
    3. score: per stage, global average pooling, Mahalanobis distance ``M_l`` to the stage's image-level
       Gaussian (eq. 3), summed over stages (eq. 4);
    4. map: per stage, ``M`` of every spatial feature vector to the stage's map statistics (a
       :class:`StageGaussian` shared by all positions, or a :class:`PositionGaussians` with one Gaussian per
       position), bilinearly upsampled to ``S x S``, then the unweighted mean over stages.

    All statistics are buffers, so they travel into ONNX as constants. Only the backbone runs in FP16 in
    the mixed-precision export (``fp16_modules``); the distances stay FP32.

    Example:
        >>> graph = GaussianGraph(InputAdapter((0, 0, 0), (1, 1, 1)), extractor, image_stats, map_stats)
        >>> anomaly_map, score = graph(images)  # (B, S, S), (B,)
    """

    fp16_modules = ("backbone",)

    def __init__(
        self,
        adapter: InputAdapter,
        backbone: nn.Module,
        image_gaussians: Sequence[StageGaussian],
        map_gaussians: Sequence[StageGaussian | PositionGaussians],
        map_score: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if len(image_gaussians) != len(map_gaussians) or not image_gaussians:
            raise ValueError("need one image-level Gaussian and one set of map statistics per stage")
        self.adapter = adapter
        self.backbone = backbone
        self.image_gaussians = nn.ModuleList(image_gaussians)
        self.map_gaussians = nn.ModuleList(map_gaussians)
        self.map_score = map_score  # None: eq. 4's pooled score

    def stage_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's stage outputs ``(B, C_l, h_l, w_l)`` for a preprocessed batch."""
        features = self.backbone(self.adapter(image))
        if len(features) != len(self.image_gaussians):
            raise ValueError(f"the backbone gives {len(features)} stages, the graph has {len(self.image_gaussians)}")
        return features

    def export_notes(self) -> dict[str, Any]:
        return {
            "noise": None,
            "fp32_parts": "input normalisation, normalisation layers, pooling, Mahalanobis distances, resize, max",
        }

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_features(self.stage_features(image), (image.shape[-2], image.shape[-1]))

    def from_features(
        self, features: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 3-4 on given stage features (what ``forward`` does after the backbone), so automatic
        choices can score several sets of statistics on features computed once."""
        score = features[0].new_zeros(features[0].shape[0], dtype=torch.float32)
        anomaly_map = features[0].new_zeros(features[0].shape[0], 1, size[0], size[1], dtype=torch.float32)
        for feature, image_gaussian, map_gaussian in zip(
            features, self.image_gaussians, self.map_gaussians, strict=True
        ):
            feature = feature.float()
            score = score + image_gaussian(feature.mean(dim=(2, 3)))  # eq. 4: sum of the stages' eq. 3
            distances = map_gaussian(feature.permute(0, 2, 3, 1)).unsqueeze(1)  # (B, 1, h_l, w_l)
            anomaly_map = anomaly_map + F.interpolate(distances, size=size, mode="bilinear", align_corners=False)
        anomaly_map = anomaly_map[:, 0] / len(self.map_gaussians)
        return anomaly_map, score if self.map_score is None else self.map_score(anomaly_map)
