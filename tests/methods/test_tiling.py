"""Tiled inference (edgead.methods.tiling): where the tiles go, that stitching gives back a local map exactly,
that the tiled graph exports, and that a tiled run trains on tiles and evaluates and exports whole frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgead.config import RunConfig, TrainConfig
from edgead.data.mvtec import load_images
from edgead.data.preprocess import PreprocessConfig
from edgead.data.synthetic import generate_dataset
from edgead.export.exporter import ExportOptions, export_run
from edgead.methods import load_method, tiling
from edgead.methods.scoring import MapScore
from edgead.methods.tiling import TiledGraph, cut_tiles, tile_grid, tile_origins
from edgead.pipeline import evaluate_run, train_run
from edgead.runtime.metadata import load_metadata
from edgead.spec import RunSpec


def test_tiles_cover_the_frame_with_the_last_one_flush() -> None:
    assert tile_origins(448, 224, 0.25) == [0, 168, 224]
    assert tile_origins(100, 40, 0.0) == [0, 40, 60]
    assert tile_origins(64, 32, 0.5) == [0, 16, 32]
    assert tile_origins(224, 224, 0.25) == [0]  # a side as long as the tile (an oblong frame's short side)
    with pytest.raises(ValueError, match="must not be larger than the frame's side"):
        tile_origins(200, 224, 0.25)
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(448, 224, 1.0)


def test_cut_tiles_is_image_major_in_both_layouts() -> None:
    images = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    tiles = cut_tiles(images, 4, 0.0)
    assert tiles.shape == (8, 3, 4, 4)
    assert np.array_equal(tiles[0], images[0, :, :4, :4]) and np.array_equal(tiles[5], images[1, :, :4, 4:])
    last = cut_tiles(images.transpose(0, 2, 3, 1), 4, 0.0, channels_last=True)
    assert np.array_equal(last, tiles.transpose(0, 2, 3, 1))


def test_a_tiling_record_names_its_width_only_when_the_frame_is_oblong() -> None:
    oblong = tiling.with_frame({"tile": 224, "overlap": 0.25}, 460, 1130)
    assert oblong == {"frame_size": 460, "tile": 224, "overlap": 0.25, "frame_width": 1130}
    assert tiling.frame_size(oblong) == (460, 1130)
    square = tiling.with_frame(oblong, 448, 448)  # a square frame's record is what it always was
    assert square == {"frame_size": 448, "tile": 224, "overlap": 0.25} and tiling.frame_size(square) == (448, 448)


def test_training_tiles_are_read_a_few_frames_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_tiles gives what cutting all loaded frames gives, chunk by chunk (a last chunk shorter)."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(5):
        paths.append(tmp_path / f"{index}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, size=(70, 130, 3), dtype=np.uint8))
    frame = PreprocessConfig(image_size=64, image_width=112)
    monkeypatch.setattr(tiling, "_FRAMES_PER_CHUNK", 2)
    tiles = tiling.load_tiles(paths, frame, 48, 0.25)
    assert tiles.shape == (5 * 2 * 3, 3, 48, 48) and tiles.dtype == np.float32  # 2 x 3 tiles per frame
    np.testing.assert_array_equal(tiles, cut_tiles(load_images(paths, frame), 48, 0.25))


def test_an_oblong_frame_is_tiled_along_each_side() -> None:
    assert tile_grid((32, 72), 32, 0.25) == [(0, 0), (0, 24), (0, 40)]
    assert tile_grid((40, 72), 32, 0.25) == [(0, 0), (0, 24), (0, 40), (8, 0), (8, 24), (8, 40)]
    images = np.arange(2 * 3 * 8 * 12, dtype=np.float32).reshape(2, 3, 8, 12)
    tiles = cut_tiles(images, 8, 0.5)  # one row of three tiles: x = 0, 4
    assert tiles.shape == (4, 3, 8, 8) and np.array_equal(tiles[3], images[1, :, :, 4:])


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


def test_an_oblong_frame_stitches_back_to_its_whole_map() -> None:
    torch.manual_seed(0)
    local = _Local().eval()
    frames = torch.rand(2, 3, 24, 56)
    with torch.no_grad():
        whole, _ = local(frames)
        stitched, score = TiledGraph(local, (24, 56), 16, 0.25, MapScore("max", map_size=(24, 56)))(frames)
    assert stitched.shape == (2, 24, 56) and torch.allclose(stitched, whole, atol=1e-6)
    assert torch.allclose(score, whole.amax(dim=(1, 2)))


@pytest.mark.parametrize("frame", [40, (24, 56)], ids=["square", "oblong"])
def test_the_tiled_graph_exports_to_onnx_with_parity(tmp_path: Path, frame: int | tuple[int, int]) -> None:
    torch.manual_seed(0)
    height, width = (frame, frame) if isinstance(frame, int) else frame
    graph = TiledGraph(_Local().eval(), frame, 16, 0.25, MapScore("topk_mean", map_size=(height, width))).eval()
    frames = torch.rand(2, 3, height, width)
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
    with pytest.raises(ValueError, match="smaller than one of its sides"):
        RunSpec(method="gaussian", tile=64, image_size=64).validate()
    with pytest.raises(ValueError, match="must fit the frame it is cut from"):
        RunSpec(method="gaussian", tile=64, image_size=48, frame_width=128).validate()
    with pytest.raises(ValueError, match="frame_width 128 needs tile"):
        RunSpec(method="gaussian", image_size=64, frame_width=128).validate()
    RunSpec(method="gaussian", tile=64, image_size=64, frame_width=128).validate()  # one row of tiles


def _tiled_run(tmp_path: Path, **sizes: int) -> tuple[Path, dict, dict, Path, Path]:
    """A gaussian run on tiles of synthetic 48 px images (``sizes``: the spec's image_size, tile, frame_width),
    evaluated and exported at FP32: ``(run_dir, summary, metrics, data, export_dir)``."""
    data = generate_dataset(tmp_path / "data", size=48, n_train=16, n_test_good=3, n_test_defect=3, seed=1)
    spec = RunSpec(method="gaussian", data=[data], runs_root=tmp_path / "runs", device="cpu", val_fraction=0.25,
                   train=TrainConfig(batch_size=8), params={"weights": "random"}, **sizes)  # fmt: skip
    run_dir, summary = train_run(spec, progress=False)
    metrics, _ = evaluate_run(run_dir, data, tmp_path / "eval")
    out = tmp_path / "export"
    export_run(run_dir, out, ExportOptions(precision="fp32", data=data), log=lambda _: None)
    return run_dir, summary, metrics, data, out


@pytest.mark.slow  # a gaussian fit on tiles, an evaluation and an export: about half a minute on 2 cores
def test_a_tiled_run_fits_on_tiles_and_evaluates_and_exports_whole_frames(tmp_path: Path) -> None:
    run_dir, summary, metrics, data, out = _tiled_run(tmp_path, image_size=48, tile=32)
    config = RunConfig.load(run_dir)
    assert config.tiling == {"frame_size": 48, "tile": 32, "overlap": 0.25}
    assert config.preprocess["image_size"] == 32 and summary["n_images"] == 12 * 4  # 12 frames, 2 x 2 tiles
    method = load_method(run_dir)
    tiles, source = method.held_out_normals()
    assert tiles[0].shape == (32, 32, 3) and source == "16 tiles of 4 held-out normal images"
    assert isinstance(method.inference_graph(), TiledGraph)
    assert not isinstance(method.inference_graph(tiled=False), TiledGraph)
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    meta = load_metadata(out)
    assert meta["input"]["shape"] == [1, 3, 48, 48] and meta["preprocess"]["image_size"] == 48
    assert meta["notes"]["tiling"]["tiles"] == 4
    with pytest.raises(ValueError, match="leave out --image-size"):
        export_run(run_dir, tmp_path / "other", ExportOptions(precision="fp32", image_size=64), log=lambda _: None)


@pytest.mark.slow  # as above
def test_an_oblong_frame_keeps_its_aspect_from_training_to_the_runtime(tmp_path: Path) -> None:
    from edgead.runtime.detector import Detector

    run_dir, summary, metrics, _, out = _tiled_run(tmp_path, image_size=32, frame_width=72, tile=32)
    config = RunConfig.load(run_dir)
    assert config.tiling == {"frame_size": 32, "frame_width": 72, "tile": 32, "overlap": 0.25}
    assert summary["n_images"] == 12 * 3  # 12 frames, one row of 3 tiles
    assert config.data["holdout"]["image_width"] == 72
    method = load_method(run_dir)
    assert method.frame_preprocess_config.size == (32, 72)
    tiles, source = method.held_out_normals()
    assert tiles[0].shape == (32, 32, 3) and source == "12 tiles of 4 held-out normal images"
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    meta = load_metadata(out)
    assert meta["input"]["shape"] == [1, 3, 32, 72] and meta["preprocess"]["image_width"] == 72
    assert meta["notes"]["tiling"]["frame"] == [32, 72] and meta["notes"]["tiling"]["tiles"] == 3
    detector = Detector.load(out, backend="onnxruntime")
    frame = np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8)
    result = detector.predict(frame)
    assert result.anomaly_map.shape == (32, 72) and np.isfinite(result.score)
    assert result.map_at(90, 200).shape == (90, 200)
