"""One colour order on the frame path: BGR from the source to the model input, the overlay and the saved
files, each giving exactly what the former RGB round trips gave (computed here with the former formulas)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.data.io import read_image, write_image_atomic
from edgead.data.preprocess import PreprocessConfig, bgr_to_rgb, preprocess
from edgead.runtime import overlay
from edgead.runtime.backends.base import Backend
from edgead.runtime.batching import padded_batches
from edgead.runtime.detector import Detector
from edgead.runtime.metadata import ExportMetadata
from edgead.runtime.outputs import save_anomaly
from edgead.runtime.overlay import draw_hud, heatmap_overlay
from edgead.runtime.predict import predict_source
from edgead.runtime.result import Result
from edgead.runtime.sources import FolderSource, Frame


def _frame(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 180, height * width).reshape(height, width, 1)
    return (rng.integers(0, 76, size=(height, width, 3)) + gradient).astype(np.uint8)


def _result(score: float, threshold: float, shape: tuple[int, int] = (8, 8), seed: int = 0) -> Result:
    anomaly_map = np.random.default_rng(seed).uniform(0.0, 2.0 * threshold, size=shape).astype(np.float32)
    return Result(score=score, anomaly_map=anomaly_map, is_anomaly=score >= threshold, threshold=threshold)


def _old_heatmap_overlay(
    rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float
) -> np.ndarray:
    """The overlay as it was: the JET map converted to RGB and blended onto the RGB image."""
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    normalised = np.clip((anomaly_map.astype(np.float32) - np.float32(vmin)) * np.float32(scale), 0.0, 255.0)
    height, width = rgb.shape[:2]
    if normalised.shape != (height, width):
        normalised = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_LINEAR)
    heat_rgb = cv2.cvtColor(cv2.applyColorMap(normalised.astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(rgb, 1.0 - alpha, heat_rgb, alpha, 0.0)


def _old_draw_hud(frame_bgr: np.ndarray, result: Result, fps: float | None, latency_ms: float | None, vmin: float,
                  vmax: float, alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """``draw_hud`` as it was: BGR -> RGB, overlay, RGB -> BGR, then the same text and border."""
    rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
    canvas = cv2.cvtColor(_old_heatmap_overlay(rgb, result.anomaly_map, vmin, vmax, alpha), cv2.COLOR_RGB2BGR)
    height, width = canvas.shape[:2]
    border = max(3, min(height, width) // 60)
    margin = 2 * border
    parts = [f"score {overlay._format_value(result.score)} / thr {overlay._format_value(result.threshold)}"]
    if fps is not None:
        parts.append(f"FPS {fps:.1f}")
    if latency_ms is not None:
        parts.append(f"{latency_ms:.1f} ms")
    line = "  ".join(parts)
    usable_width = max(1, width - 3 * margin)
    scale = overlay._fit_scale(line, max(0.4, width / 1100), usable_width)
    line_bottom = overlay._put_boxed_text(canvas, line, (margin, margin), scale, (255, 255, 255))
    verdict, colour = ("ANOMALY", (0, 0, 255)) if result.is_anomaly else ("OK", (0, 200, 0))
    verdict_scale = overlay._fit_scale(verdict, scale * 1.6, usable_width)
    overlay._put_boxed_text(canvas, verdict, (margin, line_bottom + border), verdict_scale, colour)
    if result.is_anomaly:
        cv2.rectangle(canvas, (0, 0), (width - 1, height - 1), (0, 0, 255), thickness=border * 2)
    return canvas


@pytest.mark.parametrize("size", [(8, 8), (48, 64), (37, 101), (720, 1280)])
@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.5, 1.0])
def test_bgr_overlay_is_the_old_rgb_round_trip(size: tuple[int, int], alpha: float) -> None:
    frame = _frame(*size, seed=size[0])
    anomaly_map = _result(1.0, 1.0, (16, 16), seed=size[1]).anomaly_map
    old = cv2.cvtColor(_old_heatmap_overlay(bgr_to_rgb(frame), anomaly_map, 0.0, 2.0, alpha), cv2.COLOR_RGB2BGR)
    assert np.array_equal(heatmap_overlay(frame, anomaly_map, 0.0, 2.0, alpha, bgr=True), old)
    rgb = bgr_to_rgb(frame)  # the report's RGB overlay is unchanged
    assert np.array_equal(
        heatmap_overlay(rgb, anomaly_map, 0.0, 2.0, alpha), _old_heatmap_overlay(rgb, anomaly_map, 0.0, 2.0, alpha)
    )


@pytest.mark.parametrize("size", [(40, 30), (120, 160), (720, 1280)])
@pytest.mark.parametrize("score", [0.2, 3.0])
def test_hud_is_the_old_hud(size: tuple[int, int], score: float) -> None:
    frame = _frame(*size, seed=3)
    result = _result(score, 1.0, (12, 12), seed=4)
    for fps, latency in ((None, None), (24.1, 31.2)):
        expected = _old_draw_hud(frame, result, fps, latency, 0.0, 2.0)
        assert np.array_equal(draw_hud(frame, result, fps, latency, 0.0, 2.0), expected)


def test_saved_alarm_pngs_are_the_files_written_before(tmp_path: Path) -> None:
    frame = Frame(image=_frame(72, 96, seed=5), index=3, timestamp=0.0, name="camera0#3")
    result = _result(3.0, 1.0, seed=6)
    hud = draw_hud(frame.image, result, 10.0, 5.0, 0.0, 2.0)
    names = save_anomaly(tmp_path / "alarms", frame, hud, result.anomaly_map)
    # Before: BGR -> RGB here, RGB -> BGR again inside write_image_atomic.
    write_image_atomic(tmp_path / "frame.png", cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB))
    write_image_atomic(tmp_path / "map.png", cv2.cvtColor(_old_draw_hud(frame.image, result, 10.0, 5.0, 0.0, 2.0),
                                                          cv2.COLOR_BGR2RGB))  # fmt: skip
    saved = tmp_path / "alarms"
    assert (saved / names[0]).read_bytes() == (tmp_path / "frame.png").read_bytes()
    assert (saved / names[1]).read_bytes() == (tmp_path / "map.png").read_bytes()
    assert np.array_equal(cv2.imread(str(saved / names[0])), frame.image)


def test_write_image_atomic_bgr_writes_the_same_file(tmp_path: Path) -> None:
    bgr = _frame(20, 30, seed=8)
    for suffix in (".png", ".bmp", ".jpg"):
        write_image_atomic(tmp_path / f"a{suffix}", bgr, bgr=True)
        write_image_atomic(tmp_path / f"b{suffix}", bgr_to_rgb(bgr))
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    gray = bgr[:, :, 0]
    write_image_atomic(tmp_path / "g1.png", gray, bgr=True)
    write_image_atomic(tmp_path / "g2.png", gray)
    assert (tmp_path / "g1.png").read_bytes() == (tmp_path / "g2.png").read_bytes()


def _write_folder(folder: Path) -> list[Path]:
    """Files of the kinds a folder holds: gray, 16-bit gray, colour, colour + alpha, 16-bit colour, JPEG."""
    folder.mkdir()
    colour = _frame(24, 40, seed=9)
    pictures = {
        "a_gray.png": colour[:, :, 1],
        "b_gray16.png": colour[:, :, 2].astype(np.uint16) * 250,
        "c_colour.png": colour,
        "d_colour_alpha.png": np.dstack([colour, colour[:, :, :1]]),
        "e_colour16.png": colour.astype(np.uint16) * 257 + 100,
        "f_colour.jpg": colour,
    }
    for name, pixels in pictures.items():
        assert cv2.imwrite(str(folder / name), pixels)
    return sorted(folder.iterdir())


def test_folder_frames_are_decoded_bgr_as_the_rgb_round_trip_gave(tmp_path: Path) -> None:
    files = _write_folder(tmp_path / "frames")
    source = FolderSource(tmp_path / "frames")
    source.open()
    for file in files:
        frame = source.read()
        assert frame is not None and frame.name == file.name
        assert frame.image.dtype == np.uint8 and frame.image.shape[2] == 3
        assert np.array_equal(frame.image, cv2.cvtColor(read_image(file), cv2.COLOR_RGB2BGR)), file.name
    assert source.read() is None


class _RecordingBackend(Backend):
    """Scores a batch by its mean per image and keeps every batch it was given."""

    name = "recording"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape, self.batches = shape, []

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        assert batch.shape == self.shape and batch.dtype == np.float32 and batch.flags.c_contiguous
        self.batches.append(batch.copy())
        return {"anomaly_map": batch.mean(axis=1), "score": batch.mean(axis=(1, 2, 3))}


def _detector(cfg: PreprocessConfig, batch: int) -> tuple[Detector, _RecordingBackend]:
    backend = _RecordingBackend((batch, cfg.channels, cfg.image_size, cfg.image_size))
    meta = ExportMetadata(method="fake", input={}, outputs=[], preprocess=cfg.to_dict(), threshold={"value": 0.1},
                          artifacts={})  # fmt: skip
    return Detector(backend, meta), backend


@pytest.mark.parametrize(
    "cfg", [PreprocessConfig(32), PreprocessConfig(24, 1, (0.45,), (0.226,), "lanczos"), PreprocessConfig(48)]
)
def test_detector_feeds_the_backend_what_the_rgb_path_did(cfg: PreprocessConfig) -> None:
    frames = [_frame(*size, seed=i) for i, size in enumerate([(72, 128), (20, 20), (48, 48), (31, 90), (90, 31)])]
    detector, backend = _detector(cfg, batch=2)
    results = detector.predict_batch(frames)
    expected = [preprocess(bgr_to_rgb(frame), cfg) for frame in frames]
    expected.append(expected[-1])  # the last batch padded with its last frame
    assert len(backend.batches) == 3 and len(results) == len(frames)
    assert np.array_equal(np.concatenate(backend.batches), np.stack(expected))
    assert [r.score for r in results] == [float(np.float32(x.mean())) for x in expected[:-1]]
    assert set(results[0].timings) == {"preprocess", "infer", "postprocess"}
    single = detector.predict(frames[0])
    assert np.array_equal(backend.batches[-1], np.stack([expected[0], expected[0]]))
    assert single.score == results[0].score
    assert np.array_equal(detector.preprocess(frames[3]), expected[3])


def test_predict_overlays_are_the_files_written_before(tmp_path: Path) -> None:
    files = _write_folder(tmp_path / "frames")
    cfg = PreprocessConfig(16)
    detector, _ = _detector(cfg, batch=1)
    detector.threshold = 0.0  # every image is an anomaly: every overlay is written
    summary = predict_source(detector, str(tmp_path / "frames"), tmp_path / "out", save="all", on_event=lambda _: None)
    assert summary.images == len(files)
    for row, file in zip(summary.rows, files, strict=True):
        frame_bgr = cv2.cvtColor(read_image(file), cv2.COLOR_RGB2BGR)
        result = detector.predict(frame_bgr)
        hud = _old_draw_hud(frame_bgr, result, None, None, 0.0, 2.0 * float(result.threshold))
        write_image_atomic(tmp_path / "expected.png", cv2.cvtColor(hud, cv2.COLOR_BGR2RGB))
        assert (tmp_path / "out" / row["overlay"]).read_bytes() == (tmp_path / "expected.png").read_bytes()


def test_padded_batches_fill_pad_and_count() -> None:
    images = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    batches = list(padded_batches(images, 2, images.shape[1:], images.dtype))
    assert [count for _, count in batches] == [2, 2, 1]
    assert all(batch.shape == (2, 2, 3) and batch.flags.c_contiguous for batch, _ in batches)
    assert np.array_equal(np.concatenate([b for b, _ in batches]), np.concatenate([images, images[-1:]]))
    written = list(padded_batches(["a", "b", "c"], 4, (1,), np.int64, write=lambda item, row: row.fill(ord(item))))
    assert len(written) == 1 and written[0][1] == 3 and written[0][0].ravel().tolist() == [97, 98, 99, 99]
    assert list(padded_batches([], 3, (1,))) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(padded_batches(images, 0, images.shape[1:]))
