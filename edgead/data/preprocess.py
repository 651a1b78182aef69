"""The single image preprocessing path shared by training, evaluation and the runtime.

It is torch-free and deterministic: the same uint8 input and config give a bit-identical
float32 tensor on every call, so a score threshold calibrated during training stays valid on
the device. Keep any change here in lockstep with exported models (the config travels with them).

Training reads RGB files (:func:`preprocess`); cameras deliver OpenCV's BGR (:func:`preprocess_bgr`). Both
resize first, in the order the pixels come in, and put the channels in the model's RGB order only on the
small image: resizing treats every channel alike, so resizing then swapping equals swapping then resizing,
bit for bit, and the full-size frame is touched once, by the resize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

__all__ = [
    "INTERPOLATIONS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "PreprocessConfig",
    "bgr_to_rgb",
    "check_image_size",
    "height_width",
    "preprocess",
    "preprocess_batch",
    "preprocess_bgr",
    "resize_image",
    "resize_mask",
]

# "area" averages source pixels when downscaling (best anti-aliasing, the default). OpenCV's INTER_AREA
# samples like nearest neighbour when it enlarges, so "area" enlarges an axis bilinearly instead (one axis at
# a time when one shrinks and the other grows): an image smaller than the model input is interpolated
# smoothly, as video tools and cameras scale, not in blocks. "lanczos" is what the score-resilience paper
# used for resizing. "bilinear" aliases on large downscales; it exists for parity with
# pipelines trained that way (e.g. LafitE's bilinear 224 px resize).
INTERPOLATIONS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "bilinear": cv2.INTER_LINEAR,
}


#: Input sizes (``image_size``, ``tile``) a run may have, in pixels. Engineering choice: the backbones and U-Nets
#: downsample by up to 32, so a smaller input leaves their deepest features less than one pixel wide; above
#: 4096 px a batch of frames no longer fits a device's memory (and OpenCV refuses to allocate it).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096


def check_image_size(value: Any, what: str = "image_size") -> None:
    """Raise ``ValueError`` unless ``value`` is whole pixels in ``MIN_IMAGE_SIZE..MAX_IMAGE_SIZE``."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{what} must be whole pixels in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (the networks downsample by 32), "
            f"got {value!r}"
        )


def height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a size given as one side (a square) or as ``(height, width)``."""
    if isinstance(size, (tuple, list)):
        height, width = size
        return int(height), int(width)
    return int(size), int(size)


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw RGB frames become model input.

    Attributes:
        image_size: Height S of the model input, and its width unless ``image_width`` is set (the frame's aspect
            ratio is not preserved).
        image_width: Width of a model input that is not square (a tiled run's frame, kept at the camera's
            aspect ratio: ``edgead.methods.tiling``); None: ``image_size``, a square.
        channels: 3 for RGB, 1 for grayscale (OpenCV RGB2GRAY weights).
        mean: Per-channel mean subtracted after scaling to [0, 1]; length must equal ``channels``.
        std: Per-channel std divided after the mean; length must equal ``channels``, all > 0.
        interpolation: One of ``INTERPOLATIONS`` ("area", "lanczos", "bilinear").

    The identity normalisation (all-zero mean, all-one std) of the wrong length is adapted to
    ``channels`` because it is unambiguous, so ``PreprocessConfig(64, channels=1)`` works;
    any other length mismatch raises ``ValueError``.
    """

    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    interpolation: str = "area"
    image_width: int | None = None

    def __post_init__(self) -> None:
        for key in ("image_size", "image_width"):
            value = getattr(self, key)
            if value is None and key == "image_width":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{key} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
            object.__setattr__(self, key, int(value))
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        mean = tuple(float(value) for value in self.mean)
        std = tuple(float(value) for value in self.std)
        if len(mean) != self.channels and all(value == 0.0 for value in mean):
            mean = (0.0,) * self.channels
        if len(std) != self.channels and all(value == 1.0 for value in std):
            std = (1.0,) * self.channels
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(
                f"mean and std need one value per channel (channels={self.channels}), got mean={mean} and std={std}"
            )
        if not all(np.isfinite(value) for value in mean + std) or min(std) <= 0.0:
            raise ValueError(f"mean must be finite and std finite and > 0, got mean={mean}, std={std}")
        # Frozen dataclass: normalise lists (e.g. from JSON) to float tuples so configs compare equal.
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the model input."""
        return self.image_size, self.image_size if self.image_width is None else self.image_width

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict that ``from_dict`` turns back into an equal config (``image_width``
        only where set, so a square run's record is what it always was)."""
        record: dict[str, Any] = {
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }
        if self.image_width is not None:
            record["image_width"] = self.image_width
        return record

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Builds a config from ``to_dict`` output.

        Unknown keys are rejected rather than ignored: silently dropping a preprocessing option
        written by a newer version would change the model input without any error.

        Raises:
            ValueError: Unknown or missing keys, or invalid values.
        """
        known = {"image_size", "image_width", "channels", "mean", "std", "interpolation"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        if "image_size" not in data:
            raise ValueError("preprocessing config is missing 'image_size'")
        kwargs = dict(data)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _check_uint8_image(image: np.ndarray, what: str, channels: tuple[int, ...] = (3,)) -> np.ndarray:
    """Validates a uint8 (H, W) or (H, W, C) array with C in ``channels`` and returns it as an ndarray."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got dtype {pixels.dtype}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in channels)):
        shapes = " or ".join(f"(H, W, {count})" for count in channels)
        raise ValueError(f"{what} must have shape {shapes} or (H, W), got {pixels.shape}")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ValueError(f"{what} is empty, shape {pixels.shape}")
    return pixels


def resize_image(rgb: np.ndarray, size: int | tuple[int, int], interpolation: str) -> np.ndarray:
    """Resizes an image to ``size`` x ``size``, or to ``(height, width)`` (aspect ratio not preserved).

    Every channel is resized alike, so the channel order (RGB or BGR) does not matter.

    Args:
        rgb: uint8 (H, W, 3) or (H, W) image.
        size: Output side length, or ``(height, width)``.
        interpolation: One of ``INTERPOLATIONS``.

    Returns:
        uint8 array of shape (height, width, 3) (or (height, width) for 2-D input).
    """
    pixels = _check_uint8_image(rgb, "image")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    target = height_width(size)
    if min(target) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pixels.shape[:2] == target:
        return pixels.copy()
    return _resize(pixels, target, interpolation)


def _resize(pixels: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """``resize_image`` to ``size = (height, width)`` without its checks; an image already that size is returned
    as is (no copy).

    OpenCV reads strided rows directly, so a cropped view is not copied first.
    """
    height, width = pixels.shape[:2]
    out_h, out_w = size
    if (height, width) == size:
        return pixels
    if interpolation != "area" or (out_h <= height and out_w <= width):
        return cv2.resize(pixels, (out_w, out_h), interpolation=INTERPOLATIONS[interpolation])
    if out_h >= height and out_w >= width:
        return cv2.resize(pixels, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    # One axis shrinks (area), the other grows (bilinear): one axis at a time.
    if width > out_w:
        return cv2.resize(cv2.resize(pixels, (out_w, height), interpolation=cv2.INTER_AREA), (out_w, out_h),
                          interpolation=cv2.INTER_LINEAR)  # fmt: skip
    return cv2.resize(cv2.resize(pixels, (width, out_h), interpolation=cv2.INTER_AREA), (out_w, out_h),
                      interpolation=cv2.INTER_LINEAR)  # fmt: skip


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes a defect mask to ``size`` x ``size``, or to ``(height, width)``, with nearest neighbour (labels
    are not blended).

    Args:
        mask: (H, W) array; nonzero means defect.
        size: Output side length, or ``(height, width)``.

    Returns:
        bool array of shape (height, width).
    """
    labels = np.asarray(mask)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {labels.shape}")
    binary = (labels != 0).astype(np.uint8)
    height, width = height_width(size)
    if binary.shape == (height, width):
        return binary.astype(bool)
    return cv2.resize(binary, (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Turns one uint8 RGB image into normalised model input.

    Steps: resize to H x W (``cfg.size``), optional RGB->gray, divide by 255, ``(x - mean) / std``.

    Args:
        rgb: uint8 (H, W, 3) RGB image ((H, W) grayscale is accepted and replicated).
        cfg: Preprocessing configuration.

    Returns:
        C-contiguous float32 array of shape (C, H, W).

    Raises:
        ValueError: Wrong dtype or shape.
    """
    pixels = _check_uint8_image(rgb, "preprocess input")
    return _model_input(_resize(pixels, cfg.size, cfg.interpolation), cfg, bgr=False)


def preprocess_bgr(frame: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """Turns one uint8 OpenCV frame (BGR) into normalised model input, bit-identical to
    ``preprocess(bgr_to_rgb(frame), cfg)``.

    The frame is resized as it comes (BGR, BGRA or gray); the channels are reordered, or converted to gray,
    on the H x W image, so no full-size copy of the frame is made.

    Args:
        frame: uint8 (H, W, 3) BGR, (H, W, 4) BGRA (alpha ignored), or (H, W) / (H, W, 1) grayscale.
        cfg: Preprocessing configuration.
        out: Optional float32 (C, H, W) array to write into (e.g. a row of a batch).

    Returns:
        ``out``, or a new C-contiguous float32 array of shape (C, H, W).

    Raises:
        ValueError: Wrong dtype or shape.
    """
    pixels = _check_uint8_image(frame, "preprocess input", channels=(1, 3, 4))
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return _model_input(_resize(pixels, cfg.size, cfg.interpolation), cfg, bgr=True, out=out)


@lru_cache(maxsize=16)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(v / 255 - mean[c]) / std[c]`` in float32 for every uint8 value v: a (C, 256) table.

    Computed with the same float32 operations as on an image, one element at a time, so looking a pixel up
    gives exactly the value the arithmetic on the whole image would.
    """
    values = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32) / np.float32(255.0)
    table = (values - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    table = np.ascontiguousarray(table.T, dtype=np.float32)
    table.flags.writeable = False
    return table


# cvtColor codes that turn a resized image of (channel order, channels) into the gray plane.
_GRAY_CODES = {
    (False, 3): cv2.COLOR_RGB2GRAY,
    (True, 3): cv2.COLOR_BGR2GRAY,
    (True, 4): cv2.COLOR_BGRA2GRAY,
}


def _model_input(small: np.ndarray, cfg: PreprocessConfig, bgr: bool, out: np.ndarray | None = None) -> np.ndarray:
    """The model input of an H x W uint8 image: RGB order (or gray), divided by 255, ``(x - mean) / std``.

    Args:
        small: uint8 (H, W) gray, (H, W, 3) RGB or BGR, or (H, W, 4) BGRA image.
        cfg: Preprocessing configuration.
        bgr: The colour channels of ``small`` are in OpenCV's BGR order.
        out: Optional float32 (C, H, W) array to write into.

    Returns:
        float32 (C, H, W) array, C-contiguous unless ``out`` is not.
    """
    shape = (cfg.channels, *cfg.size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.dtype} {out.shape}")
    if cfg.channels == 1:
        # A gray image replicated to three channels converts back to itself (the weights sum to one exactly).
        planes = [small if small.ndim == 2 else cv2.cvtColor(small, _GRAY_CODES[(bgr, small.shape[2])])]
    elif small.ndim == 2:
        planes = [small] * 3
    else:
        planes = list(cv2.split(small)[:3])
        if bgr:
            planes.reverse()
    table = _normalisation_table(cfg.mean, cfg.std)
    for channel, plane in enumerate(planes):
        out[channel] = cv2.LUT(plane, table[channel])
    return out


def preprocess_batch(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """Preprocesses several images into one batch.

    Args:
        images: uint8 RGB images (sizes may differ; all are resized to H x W).
        cfg: Preprocessing configuration.

    Returns:
        float32 array of shape (N, C, H, W); (0, C, H, W) for an empty sequence.
    """
    batch = np.empty((len(images), cfg.channels, *cfg.size), dtype=np.float32)
    for index, image in enumerate(images):
        batch[index] = preprocess(image, cfg)
    return batch


def bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    """Converts an OpenCV camera frame (BGR or BGRA uint8) to RGB.

    Args:
        frame: uint8 (H, W, 3) BGR or (H, W, 4) BGRA array.

    Returns:
        uint8 (H, W, 3) RGB array.
    """
    pixels = np.asarray(frame)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 (H, W, 3|4) BGR frame, got {pixels.dtype} {pixels.shape}")
    code = cv2.COLOR_BGRA2RGB if pixels.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(pixels, code)
