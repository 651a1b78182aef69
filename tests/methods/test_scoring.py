"""Image-score aggregation shared by every method: against numpy, and exported to ONNX with the same result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgead.export.onnx import export_onnx
from edgead.methods.scoring import MapScore, topk_count
from edgead.runtime.backends.onnxruntime import OnnxRuntimeBackend


def _maps(seed: int = 0) -> torch.Tensor:
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))
    maps[0, 0, 0] = 50.0  # a border spike
    maps[1, 10:14, 10:14] = 5.0  # an interior blob of 16 pixels
    return maps


def test_aggregations_match_numpy() -> None:
    maps = _maps()
    flat = maps.flatten(1).numpy()
    np.testing.assert_allclose(MapScore("max", map_size=(32, 32))(maps).numpy(), flat.max(axis=1))
    k = topk_count(32, 32, 16 / 1024)
    assert k == 16
    top = MapScore("topk_mean", map_size=(32, 32), topk_fraction=16 / 1024)(maps).numpy()
    np.testing.assert_allclose(top, np.sort(flat, axis=1)[:, -16:].mean(axis=1), rtol=1e-6)
    assert top[1] == pytest.approx(5.0)  # the blob fills the top 16 exactly
    interior = MapScore("interior_max", map_size=(32, 32), border_fraction=1 / 16)(maps).numpy()
    np.testing.assert_allclose(interior, maps[:, 2:30, 2:30].flatten(1).amax(1).numpy())
    assert interior[0] < 1.0  # the border spike no longer decides


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="image score must be one of"):
        MapScore("median", map_size=(8, 8))


class _Graph(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.map_score = MapScore(how, map_size=(32, 32), topk_fraction=0.02)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = image.square().sum(dim=1)
        return anomaly_map, self.map_score(anomaly_map)


@pytest.mark.parametrize("how", ["max", "topk_mean", "interior_max"])
def test_aggregations_export_to_onnx(how: str, tmp_path: Path) -> None:
    graph = _Graph(how).eval()
    export_onnx(graph, tmp_path / "m.onnx", (2, 3, 32, 32))
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = OnnxRuntimeBackend(tmp_path / "m.onnx", providers=["CPUExecutionProvider"]).infer(image.numpy())
    np.testing.assert_allclose(out["score"], graph(image)[1].detach().numpy(), rtol=1e-5)
