"""The BGR entry point of the shared preprocessing gives exactly the model input of the RGB path it replaces
(``preprocess(bgr_to_rgb(frame), cfg)``, computed here with the formula it had before the channel swap moved
after the resize), for every frame shape, channel count, resize mode and colour setting."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from edgead.data.preprocess import INTERPOLATIONS, PreprocessConfig, bgr_to_rgb, preprocess, preprocess_bgr

#: (height, width): smaller and larger than the input, non-square, one axis in and one out, integer factors.
FRAME_SIZES = [(1, 1), (7, 5), (32, 32), (24, 24), (64, 64), (96, 32), (20, 50), (100, 40), (33, 129), (45, 80)]
CONFIGS = [
    PreprocessConfig(size, channels, mean, std, interpolation)
    for size, (channels, mean, std), interpolation in itertools.product(
        (24, 32),
        (
            (3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            (3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
            (1, (0.45,), (0.226,)),
        ),
        sorted(INTERPOLATIONS),
    )
]


def _old_resize(rgb: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """``resize_image`` as it was: 'area' enlarges bilinearly, one axis at a time when one shrinks."""
    if rgb.shape[:2] == (size, size):
        return rgb.copy()
    height, width = rgb.shape[:2]
    if interpolation != "area" or (size <= height and size <= width):
        return cv2.resize(rgb, (size, size), interpolation=INTERPOLATIONS[interpolation])
    if size >= height and size >= width:
        return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
    if width > size:
        first = cv2.resize(rgb, (size, height), interpolation=cv2.INTER_AREA)
    else:
        first = cv2.resize(rgb, (width, size), interpolation=cv2.INTER_AREA)
    return cv2.resize(first, (size, size), interpolation=cv2.INTER_LINEAR)


def _old_preprocess(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """``preprocess`` as it was: gray replicated to RGB, resize, RGB -> gray, float arithmetic on the image."""
    if rgb.ndim == 2:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
    resized = _old_resize(np.ascontiguousarray(rgb), cfg.image_size, cfg.interpolation)
    if cfg.channels == 1:
        resized = cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)[:, :, None]
    scaled = resized.astype(np.float32) / np.float32(255.0)
    normalised = (scaled - np.asarray(cfg.mean, dtype=np.float32)) / np.asarray(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32)


def _frame(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """Noise (every rounding case) on top of a smooth gradient (the typical camera picture)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 0 else (height, width, channels)
    gradient = np.linspace(0, 180, height * width).reshape(height, width)
    noise = rng.integers(0, 76, size=shape)
    return (noise + (gradient[..., None] if channels else gradient)).astype(np.uint8)


def _expected(frame: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """What the runtime computed before: BGR(A) -> RGB on the full frame, then the old preprocessing."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    rgb = (
        frame
        if frame.ndim == 2
        else cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    )
    return _old_preprocess(rgb, cfg)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.image_size}-c{c.channels}-{c.mean[0]}-{c.interpolation}")
@pytest.mark.parametrize("channels", [0, 1, 3, 4], ids=["HxW", "HxWx1", "BGR", "BGRA"])
def test_bgr_path_equals_the_old_rgb_path_bit_for_bit(cfg: PreprocessConfig, channels: int) -> None:
    for index, (height, width) in enumerate(FRAME_SIZES):
        frame = _frame(height, width, channels, seed=index)
        got = preprocess_bgr(frame, cfg)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        assert np.array_equal(got, _expected(frame, cfg)), (height, width)
        if channels == 3:
            assert np.array_equal(got, preprocess(bgr_to_rgb(frame), cfg)), (height, width)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.image_size}-c{c.channels}-{c.mean[0]}-{c.interpolation}")
def test_training_preprocess_is_unchanged_bit_for_bit(cfg: PreprocessConfig) -> None:
    for index, (height, width) in enumerate(FRAME_SIZES):
        for channels in (0, 3):
            rgb = _frame(height, width, channels, seed=100 + index)
            assert np.array_equal(preprocess(rgb, cfg), _old_preprocess(rgb, cfg)), (height, width, channels)


def test_a_720p_frame_and_a_view_of_one() -> None:
    frame = _frame(720, 1280, 3, seed=7)
    for cfg in (PreprocessConfig(224), PreprocessConfig(256, interpolation="lanczos"), PreprocessConfig(224, 1)):
        assert np.array_equal(preprocess_bgr(frame, cfg), _expected(frame, cfg))
        crop = frame[100:600, 200:900]  # strided rows: read in place, never copied first
        assert np.array_equal(preprocess_bgr(crop, cfg), _expected(np.ascontiguousarray(crop), cfg))


def test_every_pixel_value_normalises_as_the_image_arithmetic_did() -> None:
    """The lookup table is exact for all 256 values of every channel, hence for every image."""
    values = np.arange(256, dtype=np.uint8)
    ramp = np.stack([values, values[::-1], np.roll(values, 77)], axis=-1).reshape(16, 16, 3)
    for mean, std in (((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))):
        cfg = PreprocessConfig(16, 3, mean, std)
        assert np.array_equal(preprocess_bgr(ramp, cfg), _expected(ramp, cfg))
        assert np.array_equal(preprocess(ramp, cfg), _old_preprocess(ramp, cfg))


def test_out_receives_the_input_and_is_checked() -> None:
    cfg = PreprocessConfig(24)
    frame = _frame(40, 60, 3, seed=1)
    batch = np.zeros((2, 3, 24, 24), dtype=np.float32)
    returned = preprocess_bgr(frame, cfg, out=batch[1])
    assert returned.shape == batch[1].shape and np.shares_memory(returned, batch[1])  # out itself is returned
    assert np.array_equal(batch[1], _expected(frame, cfg)) and not batch[0].any()
    with pytest.raises(ValueError, match="out must be a float32 array"):
        preprocess_bgr(frame, cfg, out=np.zeros((1, 24, 24), np.float32))


@pytest.mark.parametrize(
    "frame", [np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8, 3), np.uint16), np.zeros((0, 8, 3), np.uint8)]
)
def test_bad_frames_are_refused(frame: np.ndarray) -> None:
    with pytest.raises(ValueError, match="preprocess input"):
        preprocess_bgr(frame, PreprocessConfig(8))


def test_an_oblong_model_input_resizes_each_axis_as_the_square_one_does() -> None:
    """``image_width`` (a tiled run's oblong frame): each axis takes the square path's rule, area shrinking
    one axis and bilinear enlarging the other, and the record round-trips (a square one keeps its old keys)."""
    cfg = PreprocessConfig(24, image_width=56)
    assert cfg.size == (24, 56) and PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert "image_width" not in PreprocessConfig(24).to_dict()
    for height, width in [(100, 40), (12, 200), (48, 112), (10, 30)]:
        frame = _frame(height, width, 3, seed=height)
        got = preprocess_bgr(frame, cfg)
        assert got.shape == (3, 24, 56) and np.array_equal(got, preprocess(bgr_to_rgb(frame), cfg))
        rgb = bgr_to_rgb(frame)
        if 24 <= height and 56 <= width:  # both shrink: area
            resized = cv2.resize(rgb, (56, 24), interpolation=cv2.INTER_AREA)
        elif 24 >= height and 56 >= width:  # both grow: bilinear
            resized = cv2.resize(rgb, (56, 24), interpolation=cv2.INTER_LINEAR)
        elif width > 56:  # width shrinks (area), then height grows (bilinear)
            resized = cv2.resize(cv2.resize(rgb, (56, height), interpolation=cv2.INTER_AREA), (56, 24),
                                 interpolation=cv2.INTER_LINEAR)  # fmt: skip
        else:  # height shrinks (area), then width grows (bilinear)
            resized = cv2.resize(cv2.resize(rgb, (width, 24), interpolation=cv2.INTER_AREA), (56, 24),
                                 interpolation=cv2.INTER_LINEAR)  # fmt: skip
        expected = (resized.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)
        assert np.array_equal(got, expected), (height, width)
    with pytest.raises(ValueError, match="image_width must be >= 1"):
        PreprocessConfig(24, image_width=0)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({"image_size": 24, "image_height": 56})
