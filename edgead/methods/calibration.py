"""Normal-calibrated anomaly maps, for every method (our addition; not in any of the five papers).

A method's anomaly map is large where its model of normality fits worst; some positions (the border, a
fixture, a textured band) are harder than others even on normal images, and a map's maximum then ranks
images by where they are hard rather than by whether they are defective. Calibration standardises the map
per position by the statistics of normal images' maps:

    map'(p) = (map(p) - mean(p)) / spread(p)

where ``mean`` and ``spread`` (the standard deviation, floored at :data:`SPREAD_FLOOR` of its median so that
a position that never varies cannot divide by zero) are taken over held-out normal images' maps,
area-averaged to a :data:`GRID` x :data:`GRID` grid and smoothed (:data:`SMOOTH_CELLS`), then bilinearly
resized back to the map's size. The image score is then the method's map aggregation (``image_score``: max,
top-k mean, interior max) of ``map'``; a score that does not come from the map (gaussian's pooled eq. 4)
stays as it is. Both are buffers and fixed-shape tensor ops, so they export inside the graph.

``map_calibration``: ``none`` (the method's own map), ``normal`` (calibrated), ``auto`` (chosen on
pseudo-validation: the statistics from one half of the held-out normals, the choice on a discriminating
pseudo-validation set made from the other half, the method's own map kept unless the calibrated one beats
it by more than one standard error; the shipped statistics then come from all of them).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.methods.wrapping import has_gradients, wrapped_networks

#: Side of the grid the statistics are kept on: fine enough for a map's structure, small enough to be
#: estimated from a few dozen images and stored in ``config.json`` (engineering choice).
GRID = 32
#: Gaussian smoothing of the statistics, in grid cells (engineering choice: one cell).
SMOOTH_CELLS = 1.0
#: The spread's floor, as a share of its median over the grid (engineering choice).
SPREAD_FLOOR = 0.1
#: Held-out normals the automatic choice uses at most (half for the statistics, half for validation): bounds
#: the cost for the slow graphs (engineering choice).
CALIBRATION_LIMIT = 64
#: The values of ``map_calibration``.
MAP_CALIBRATIONS = ("none", "normal")


def fit_map_statistics(maps: np.ndarray, grid: int = GRID) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, spread)`` on a ``grid`` x ``grid`` grid from normal images' maps ``(N, H, W)``, N >= 2
    (see the module docstring)."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or len(maps) < 2:
        raise ValueError(f"need the maps (N, H, W) of at least two normal images, got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("the normal images' maps hold NaN or infinite values; the method's graph is broken")
    small = np.stack([cv2.resize(m, (grid, grid), interpolation=cv2.INTER_AREA) for m in maps]).astype(np.float64)
    mean = small.mean(axis=0)
    std = small.std(axis=0, ddof=1)
    mean = cv2.GaussianBlur(mean, (0, 0), SMOOTH_CELLS, borderType=cv2.BORDER_REFLECT)
    std = cv2.GaussianBlur(std, (0, 0), SMOOTH_CELLS, borderType=cv2.BORDER_REFLECT)
    floor = max(SPREAD_FLOOR * float(np.median(std)), 1e-12)
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


def _resized(grid_values: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(grid_values, dtype=np.float32))
    return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


class MapCalibration(nn.Module):
    """``(B, H, W) -> (B, H, W)``: ``(map - mean) / spread`` with the grid statistics resized to ``map_size``
    (outside the networks, so FP32 in the mixed-precision export)."""

    def __init__(self, mean: np.ndarray, spread: np.ndarray, map_size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("mean", _resized(mean, map_size))
        self.register_buffer("inverse_spread", 1.0 / _resized(spread, map_size))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        return (anomaly_map.float() - self.mean) * self.inverse_spread


class CalibratedGraph(nn.Module):
    """A method's inference graph with its map calibrated: ``forward(image) -> (map', score')``.

    ``score`` (the method's map aggregation) scores ``map'``; None keeps the graph's own score. Export sees
    the inner graph's networks under ``method_graph.`` (``fp16_modules``) and its gradients flag."""

    def __init__(self, graph: nn.Module, calibration: MapCalibration, score: nn.Module | None) -> None:
        super().__init__()
        self.method_graph = graph
        self.calibration = calibration
        self.score = score
        self.has_gradients = has_gradients(graph)
        self.fp16_modules = wrapped_networks({"method_graph": graph})

    def export_notes(self) -> dict[str, Any]:
        notes = dict(self.method_graph.export_notes()) if hasattr(self.method_graph, "export_notes") else {}
        notes["map_calibration"] = "per-position standardisation by held-out normal maps (FP32)"
        return notes

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map, score = self.method_graph(image)
        calibrated = self.calibration(anomaly_map)
        return calibrated, score if self.score is None else self.score(calibrated)


def record(mean: np.ndarray, spread: np.ndarray, map_size: tuple[int, int], source: str) -> dict[str, Any]:
    """What ``config.state["map_calibration"]`` holds: the grid statistics (6 significant digits) and where
    they came from."""
    return {
        "grid": int(mean.shape[0]),
        "map_size": [int(map_size[0]), int(map_size[1])],
        "source": source,
        "mean": [[float(f"{v:.6g}") for v in row] for row in mean.tolist()],
        "spread": [[float(f"{v:.6g}") for v in row] for row in spread.tolist()],
    }


def from_record(stored: dict[str, Any]) -> MapCalibration:
    """The calibration module of a run's ``config.state["map_calibration"]``."""
    try:
        mean, spread = np.asarray(stored["mean"], np.float32), np.asarray(stored["spread"], np.float32)
        size = (int(stored["map_size"][0]), int(stored["map_size"][1]))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"the run's map calibration record is damaged ({error}); train the run again") from error
    grid = int(stored.get("grid", 0))
    if mean.shape != (grid, grid) or spread.shape != (grid, grid) or not (spread > 0).all():
        raise ValueError(
            f"the run's map calibration record is damaged (mean {mean.shape}, spread {spread.shape}, grid {grid}); "
            "train the run again"
        )
    return MapCalibration(mean, spread, size)


def calibrated_outputs(
    maps: np.ndarray, mean: np.ndarray, spread: np.ndarray, score: nn.Module | None, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What the calibrated graph gives for a batch whose raw outputs are ``(maps, scores)`` (no second pass)."""
    module = MapCalibration(mean, spread, (maps.shape[-2], maps.shape[-1]))
    with torch.no_grad():
        calibrated = module(torch.as_tensor(maps))
        new_scores = scores if score is None else score(calibrated).numpy()
    return calibrated.numpy(), np.asarray(new_scores)


__all__ = [
    "CALIBRATION_LIMIT",
    "GRID",
    "MAP_CALIBRATIONS",
    "CalibratedGraph",
    "MapCalibration",
    "calibrated_outputs",
    "fit_map_statistics",
    "from_record",
    "record",
]
