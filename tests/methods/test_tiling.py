"""Tiled inference (edgead.methods.tiling): where the tiles go, that stitching gives back a local map exactly,
that the tiled graph exports, and that a tiled run trains on tiles and evaluates and exports whole frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods import load_method
from edgead.methods.scoring import MapScore
from edgead.methods.tiling import TiledGraph, cut_tiles, tile_origins
from edgead.pipeline import evaluate_run, train_run
from edgead.runtime.metadata import load_metadata
from edgead.spec import RunSpec


def test_tiles_cover_the_frame_with_the_last_one_flush() -> None:
    assert tile_origins(448, 224, 0.25) == [0, 168, 224]
    assert tile_origins(100, 40, 0.0) == [0, 40, 60]
    assert tile_origins(64, 32, 0.5) == [0, 16, 32]
    with pytest.raises(ValueError, match="smaller than the frame"):
        tile_origins(224, 224, 0.25)
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(448, 224, 1.0)


def test_cut_tiles_is_image_major_in_both_layouts() -> None:
    images = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    tiles = cut_tiles(images, 4, 0.0)
    assert tiles.shape == (8, 3, 4, 4)
    assert np.array_equal(tiles[0], images[0, :, :4, :4]) and np.array_equal(tiles[5], images[1, :, :4, 4:])
    last = cut_tiles(images.transpose(0, 2, 3, 1), 4, 0.0, channels_last=True)
    assert np.array_equal(last, tiles.transpose(0, 2, 3, 1))


class _Local(nn.Module):
    """A per-pixel map (so tiles stitched back must equal the whole frame's map) and its max as the score."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Conv2d(3, 1, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = self.net(image)[:, 0].square()
        return anomaly_map, anomaly_map.mean(dim=(1, 2))


def test_stitched_maps_are_the_whole_frame_map_and_scores_follow_the_rule() -> None:
    torch.manual_seed(0)
    local = _Local().eval()
    frames = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        whole, _ = local(frames)
        stitched, score = TiledGraph(local, 40, 16, 0.25, MapScore("max", map_size=(40, 40)))(frames)
        assert torch.allclose(stitched, whole, atol=1e-6) and torch.allclose(score, whole.amax(dim=(1, 2)))
        _, tile_max = TiledGraph(local, 40, 16, 0.25, None)(frames)  # a score not from the map: max over tiles
        tiles = torch.from_numpy(cut_tiles(frames.numpy(), 16, 0.25))
        expected = local(tiles)[1].reshape(2, -1).amax(dim=1)
    assert torch.allclose(tile_max, expected)


def test_the_tiled_graph_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    graph = TiledGraph(_Local().eval(), 40, 16, 0.25, MapScore("topk_mean", map_size=(40, 40))).eval()
    frames = torch.rand(2, 3, 40, 40)
    path = tmp_path / "tiled.onnx"
    torch.onnx.export(graph, (frames,), str(path), input_names=["image"], output_names=["map", "score"],
                      opset_version=18, dynamo=True)  # fmt: skip
    onnx_map, onnx_score = ort.InferenceSession(str(path)).run(None, {"image": frames.numpy()})
    with torch.no_grad():
        torch_map, torch_score = graph(frames)
    np.testing.assert_allclose(onnx_map, torch_map.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(onnx_score, torch_score.numpy(), rtol=1e-5, atol=1e-6)


def test_a_tile_must_fit_the_frame() -> None:
    with pytest.raises(ValueError, match="needs image_size"):
        RunSpec(method="gaussian", tile=16).validate()
    with pytest.raises(ValueError, match="smaller than image_size"):
        RunSpec(method="gaussian", tile=64, image_size=64).validate()


@pytest.mark.slow  # a gaussian fit on tiles, an evaluation and an export: about a minute on 2 cores
def test_a_tiled_run_fits_on_tiles_and_evaluates_and_exports_whole_frames(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", size=48, n_train=16, n_test_good=3, n_test_defect=3, seed=1)
    spec = RunSpec(method="gaussian", data=[data], image_size=48, tile=32, runs_root=tmp_path / "runs",
                   device="cpu", val_fraction=0.25, train=TrainConfig(batch_size=8),
                   params={"weights": "random"})  # fmt: skip
    run_dir, summary = train_run(spec, progress=False)
    config = RunConfig.load(run_dir)
    assert config.tiling == {"frame_size": 48, "tile": 32, "overlap": 0.25}
    assert config.preprocess["image_size"] == 32 and summary["n_images"] == 12 * 4  # 12 frames, 2 x 2 tiles
    method = load_method(run_dir)
    tiles, source = method.held_out_normals()
    assert tiles[0].shape == (32, 32, 3) and source == "16 tiles of 4 held-out normal images"
    assert isinstance(method.inference_graph(), TiledGraph)
    assert not isinstance(method.inference_graph(tiled=False), TiledGraph)
    metrics, _ = evaluate_run(run_dir, data, tmp_path / "eval")
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    out = tmp_path / "export"
    export_run(run_dir, out, ExportOptions(precision="fp32", data=data), log=lambda _: None)
    meta = load_metadata(out)
    assert meta["input"]["shape"] == [1, 3, 48, 48] and meta["preprocess"]["image_size"] == 48
    assert meta["notes"]["tiling"]["tiles"] == 4
    with pytest.raises(ValueError, match="leave out --image-size"):
        export_run(run_dir, tmp_path / "other", ExportOptions(precision="fp32", image_size=64), log=lambda _: None)
