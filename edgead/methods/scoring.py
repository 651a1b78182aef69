"""The image score as a function of the anomaly map, shared by every method's graph.

The papers score an image by the maximum of its map (score-resilience Sec. 4.4, Score-DD Sec. 5.2) or by the
mean of its ``S`` largest pixels (MDPS: ``S = 500`` at 256 x 256). On real data the maximum can be ruled by a
few noisy pixels, often at the image border where convolutions see padding, while the map still localises
well; so the aggregation is a parameter of every method:

- ``max``: the map's maximum (the papers' default);
- ``topk_mean``: the mean of the ``k`` largest pixels, ``k = round(topk_fraction * H * W)`` (the fraction
  keeps ``k`` proportional to the area, so one setting serves every input size; MDPS's 500 of 256 x 256 is
  ``topk_fraction = 0.0076``);
- ``interior_max``: the maximum over the map without a border band ``round(border_fraction * side)`` wide.

All three are fixed-shape tensor ops (``amax``, ``topk``, slicing), so they export to ONNX and TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgead.methods.params import MethodParams, open_unit, param

AGGREGATIONS = ("max", "topk_mean", "interior_max")
#: MDPS (Wu et al. 2024): the top 500 pixels of a 256 x 256 map.
MDPS_TOPK_FRACTION = 500 / (256 * 256)
DEFAULT_BORDER_FRACTION = 1 / 16


def topk_count(height: int, width: int, fraction: float) -> int:
    """``round(fraction * H * W)``, at least 1 and at most ``H * W``."""
    return int(min(height * width, max(1, round(fraction * height * width))))


def border_width(side: int, fraction: float) -> int:
    """Pixels cut from each edge: ``round(fraction * side)``, leaving at least one pixel."""
    return int(min(max(0, round(fraction * side)), (side - 1) // 2))


class MapScore(nn.Module):
    """``(B, H, W) -> (B,)``: the image score of anomaly maps of a fixed size (see the module docstring)."""

    def __init__(
        self,
        how: str = "max",
        *,
        map_size: tuple[int, int],
        topk_fraction: float = MDPS_TOPK_FRACTION,
        border_fraction: float = DEFAULT_BORDER_FRACTION,
    ) -> None:
        super().__init__()
        if how not in AGGREGATIONS:
            raise ValueError(f"image score must be one of {', '.join(AGGREGATIONS)}, got {how!r}")
        self.how = how
        height, width = int(map_size[0]), int(map_size[1])
        self.k = topk_count(height, width, topk_fraction)
        self.border = (border_width(height, border_fraction), border_width(width, border_fraction))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        if self.how == "topk_mean":
            return anomaly_map.flatten(1).topk(self.k, dim=1).values.mean(dim=1)
        if self.how == "interior_max":
            bh, bw = self.border
            anomaly_map = anomaly_map[:, bh : anomaly_map.shape[1] - bh, bw : anomaly_map.shape[2] - bw]
        return anomaly_map.amax(dim=(1, 2))


def _border(value: float) -> str | None:
    return None if 0.0 <= value < 0.5 else "a value in [0, 0.5)"


@dataclass(frozen=True)
class MapScoreParams(MethodParams):
    """The image-score parameters every method shares (inherit from this in a method's ``Params``)."""

    image_score: str = param(
        "max",
        "how the map becomes the image score: max, topk_mean or interior_max",
        "Sec. 4.4 / ours",
        choices=AGGREGATIONS,
        origin="paper",
    )
    topk_fraction: float = param(
        MDPS_TOPK_FRACTION,
        "topk_mean: share of the map's pixels averaged",
        "MDPS: top 500 of 256 x 256",
        check=open_unit,
        origin="paper",
    )
    border_fraction: float = param(
        DEFAULT_BORDER_FRACTION,
        "interior_max: share of each side left out at the border",
        "ours",
        check=_border,
        origin="engineering",
        why=(
            "reasoned, not tuned: interior_max ignores a border of 1/16 of the "
            "side, where padding artefacts of the networks live"
        ),
    )

    map_calibration: str = param(
        "auto",
        "none: the method's own map; normal: the map standardised per position by held-out normal maps "
        "(calibration.py), the image score then aggregating it; auto: chosen on pseudo-validation",
        "ours",
        choices=("auto", "none", "normal"),
        origin="pseudo-validation",
        why="not in the papers; the method's own map stays unless calibration beats it by more than one "
        "standard error on a discriminating pseudo-validation set (calibration.py)",
    )

    def map_score(self, map_size: tuple[int, int]) -> MapScore:
        return MapScore(
            self.image_score, map_size=map_size, topk_fraction=self.topk_fraction, border_fraction=self.border_fraction
        )
