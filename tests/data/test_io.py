"""Tests for edgead.data.io and edgead.data.preprocess."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.data.io import ImageReadError, list_images, read_image, read_image_bgr, read_mask, write_image_atomic
from edgead.data.preprocess import (
    PreprocessConfig,
    bgr_to_rgb,
    preprocess,
    preprocess_batch,
    resize_image,
    resize_mask,
)


def _rgb(height: int = 20, width: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_cv2(path: Path, pixels: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), pixels)
    return path


def test_read_gray_replicates_channels(tmp_path: Path) -> None:
    gray = _rgb()[:, :, 0]
    image = read_image(_write_cv2(tmp_path / "g.png", gray))
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_read_rgb_png_converts_bgr(tmp_path: Path) -> None:
    rgb = _rgb()
    path = _write_cv2(tmp_path / "c.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(path), rgb)


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    rgb = _rgb()
    bgra = np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(read_image(_write_cv2(tmp_path / "a.png", bgra)), rgb)


@pytest.mark.parametrize("kind", ["gray", "gray16", "bgr", "bgra", "bgr16"])
def test_read_image_bgr_is_read_image_with_its_channels_reversed(tmp_path: Path, kind: str) -> None:
    bgr = cv2.cvtColor(_rgb(), cv2.COLOR_RGB2BGR)
    pixels = {
        "gray": bgr[:, :, 0],
        "gray16": bgr[:, :, 0].astype(np.uint16) * 251,
        "bgr": bgr,
        "bgra": np.dstack([bgr, np.full(bgr.shape[:2], 7, np.uint8)]),
        "bgr16": bgr.astype(np.uint16) * 257 + 3,
    }[kind]
    path = _write_cv2(tmp_path / f"{kind}.png", pixels)
    image = read_image_bgr(path)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, read_image(path)[:, :, ::-1])


def test_read_16bit_scales_to_8bit(tmp_path: Path) -> None:
    wide = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    image = read_image(_write_cv2(tmp_path / "w.png", wide))
    np.testing.assert_array_equal(image[0, :, 0], [0, 1, 255, 128])


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff"])
def test_read_lossless_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    rgb = _rgb()
    path = _write_cv2(tmp_path / f"x{suffix}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_image(path), rgb)


def test_read_jpeg_close_to_original(tmp_path: Path) -> None:
    smooth = np.zeros((32, 32, 3), np.uint8)
    smooth[:, :] = (200, 40, 90)
    path = tmp_path / "j.JPG"  # upper-case extension
    assert cv2.imwrite(str(path), cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert np.abs(read_image(path).astype(int) - smooth).max() <= 4


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_raises_with_name(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut_here{suffix}"
    _write_cv2(path, _rgb(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="cut_here"):
        read_image(path)
    with pytest.raises(ImageReadError, match="cut_here"):
        read_mask(path)


def test_jpeg_with_zero_padding_is_accepted(tmp_path: Path) -> None:
    path = _write_cv2(tmp_path / "padded.jpg", _rgb())
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert read_image(path).shape == (20, 30, 3)


@pytest.mark.parametrize("content", [b"this is not an image", b""])
def test_non_image_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="fake.png"):
        read_image(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_read_mask_defect_above_half_its_largest_value(tmp_path: Path) -> None:
    mask = np.zeros((5, 6), np.uint8)
    mask[1, 2] = 1  # JPEG-like noise in a 0/255 mask: not a defect
    mask[3, 4] = 255
    result = read_mask(_write_cv2(tmp_path / "m.png", mask))
    assert result.dtype == bool
    np.testing.assert_array_equal(result, mask > 127)


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.txt", ".hidden.png", "d.tiff"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [path.name for path in list_images(tmp_path)] == ["a.jpg", "b.PNG", "d.tiff"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_write_image_atomic_round_trip_leaves_no_temp(tmp_path: Path) -> None:
    rgb = _rgb()
    write_image_atomic(tmp_path / "out" / "x.png", rgb)
    write_image_atomic(tmp_path / "out" / "m.png", rgb[:, :, 0] > 128)
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "x.png"), rgb)
    np.testing.assert_array_equal(read_mask(tmp_path / "out" / "m.png"), rgb[:, :, 0] > 128)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["m.png", "x.png"]
    with pytest.raises(ValueError, match="extension"):
        write_image_atomic(tmp_path / "x.gif", rgb)


def test_preprocess_shape_dtype_and_normalisation() -> None:
    rgb = _rgb(40, 50)
    cfg = PreprocessConfig(image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 2.0, 1.0))
    out = preprocess(rgb, cfg)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32 and out.flags.c_contiguous
    resized = resize_image(rgb, 16, "area").astype(np.float32) / 255.0
    np.testing.assert_allclose(out[0], (resized[:, :, 0] - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(out[1], (resized[:, :, 1] - 0.25) / 2.0, atol=1e-6)
    np.testing.assert_allclose(out[2], resized[:, :, 2], atol=1e-6)


@pytest.mark.parametrize("interpolation", ["area", "lanczos", "bilinear"])
def test_preprocess_is_bit_identical(interpolation: str) -> None:
    cfg = PreprocessConfig(image_size=24, interpolation=interpolation)
    first, second = preprocess(_rgb(37, 41), cfg), preprocess(_rgb(37, 41), cfg)
    assert first.tobytes() == second.tobytes()
    batch = preprocess_batch([_rgb(37, 41), _rgb(10, 12)], cfg)
    assert batch.shape == (2, 3, 24, 24)
    assert batch[0].tobytes() == first.tobytes()


def test_area_enlarges_smoothly_and_shrinks_by_averaging() -> None:
    """'area' shrinks an axis by averaging and enlarges it bilinearly, never in nearest-neighbour blocks: a
    64 px image trained at 192 px looks like the smoothly scaled frames a camera or video tool delivers."""
    small = _rgb(64, 64)
    np.testing.assert_array_equal(
        resize_image(small, 192, "area"), cv2.resize(small, (192, 192), interpolation=cv2.INTER_LINEAR)
    )
    large = _rgb(400, 300)
    np.testing.assert_array_equal(
        resize_image(large, 96, "area"), cv2.resize(large, (96, 96), interpolation=cv2.INTER_AREA)
    )
    wide = _rgb(40, 500)  # width shrinks (averaged), height grows (bilinear)
    expected = cv2.resize(
        cv2.resize(wide, (128, 40), interpolation=cv2.INTER_AREA), (128, 128), interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(resize_image(wide, 128, "area"), expected)
    tall = _rgb(500, 40)
    expected = cv2.resize(
        cv2.resize(tall, (40, 128), interpolation=cv2.INTER_AREA), (128, 128), interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(resize_image(tall, 128, "area"), expected)


def test_preprocess_grayscale() -> None:
    rgb = _rgb(16, 16)
    out = preprocess(rgb, PreprocessConfig(image_size=16, channels=1, mean=(0.5,), std=(0.25,)))
    expected = (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0 - 0.5) / 0.25
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert PreprocessConfig(image_size=8, channels=1).mean == (0.0,)


def test_preprocess_rejects_bad_input() -> None:
    cfg = PreprocessConfig(image_size=8)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32), cfg)
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((8, 8, 4), np.uint8), cfg)


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        PreprocessConfig(image_size=8, channels=1, mean=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(image_size=8, interpolation="cubic")
    with pytest.raises(ValueError, match="std"):
        PreprocessConfig(image_size=8, std=(1.0, 0.0, 1.0))
    cfg = PreprocessConfig(
        image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="lanczos"
    )
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "crop": 4})


def test_resize_mask_nearest_and_bgr() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 255
    resized = resize_mask(mask, 8)
    assert resized.dtype == bool and resized[:4, :4].all() and not resized[4:, :].any()
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[..., 0] = 9  # blue in BGR
    assert bgr_to_rgb(frame)[0, 0].tolist() == [0, 0, 9]
