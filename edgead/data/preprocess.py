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


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw RGB frames become model input.

    Attributes:
        image_size: Side length S of the square model input (the aspect ratio is not preserved).
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

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise TypeError(f"image_size must be an integer, got {self.image_size!r}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
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
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict that ``from_dict`` turns back into an equal config."""
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Builds a config from ``to_dict`` output.

        Unknown keys are rejected rather than ignored: silently dropping a preprocessing option
        written by a newer version would change the model input without any error.

        Raises:
            ValueError: Unknown or missing keys, or invalid values.
        """
        known = {"image_size", "channels", "mean", "std", "interpolation"}
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


def resize_image(rgb: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """Resizes an image to ``size`` x ``size`` (aspect ratio not preserved).

    Every channel is resized alike, so the channel order (RGB or BGR) does not matter.

    Args:
        rgb: uint8 (H, W, 3) or (H, W) image.
        size: Output side length.
        interpolation: One of ``INTERPOLATIONS``.

    Returns:
        uint8 array of shape (size, size, 3) (or (size, size) for 2-D input).
    """
    pixels = _check_uint8_image(rgb, "image")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if pixels.shape[:2] == (size, size):
        return pixels.copy()
    return _resize(pixels, size, interpolation)


def _resize(pixels: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """``resize_image`` without its checks; an image already ``size`` x ``size`` is returned as is (no copy).

    OpenCV reads strided rows directly, so a cropped view is not copied first.
    """
    height, width = pixels.shape[:2]
    if (height, width) == (size, size):
        return pixels
    if interpolation != "area" or (size <= height and size <= width):
        return cv2.resize(pixels, (size, size), interpolation=INTERPOLATIONS[interpolation])
    if size >= height and size >= width:
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)
    # One axis shrinks (area), the other grows (bilinear): one axis at a time.
    if width > size:
        return cv2.resize(cv2.resize(pixels, (size, height), interpolation=cv2.INTER_AREA), (size, size),
                          interpolation=cv2.INTER_LINEAR)  # fmt: skip
    return cv2.resize(cv2.resize(pixels, (width, size), interpolation=cv2.INTER_AREA), (size, size),
                      interpolation=cv2.INTER_LINEAR)  # fmt: skip


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resizes a defect mask to ``size`` x ``size`` with nearest neighbour (labels are not blended).

    Args:
        mask: (H, W) array; nonzero means defect.
        size: Output side length.

    Returns:
        bool array of shape (size, size).
    """
    labels = np.asarray(mask)
    if labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"mask must be a non-empty (H, W) array, got shape {labels.shape}")
    binary = (labels != 0).astype(np.uint8)
    if binary.shape == (size, size):
        return binary.astype(bool)
    return cv2.resize(binary, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)


def preprocess(rgb: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Turns one uint8 RGB image into normalised model input.

    Steps: resize to S x S, optional RGB->gray, divide by 255, ``(x - mean) / std``.

    Args:
        rgb: uint8 (H, W, 3) RGB image ((H, W) grayscale is accepted and replicated).
        cfg: Preprocessing configuration.

    Returns:
        C-contiguous float32 array of shape (C, S, S).

    Raises:
        ValueError: Wrong dtype or shape.
    """
    pixels = _check_uint8_image(rgb, "preprocess input")
    return _model_input(_resize(pixels, cfg.image_size, cfg.interpolation), cfg, bgr=False)


def preprocess_bgr(frame: np.ndarray, cfg: PreprocessConfig, out: np.ndarray | None = None) -> np.ndarray:
    """Turns one uint8 OpenCV frame (BGR) into normalised model input, bit-identical to
    ``preprocess(bgr_to_rgb(frame), cfg)``.

    The frame is resized as it comes (BGR, BGRA or gray); the channels are reordered, or converted to gray,
    on the S x S image, so no full-size copy of the frame is made.

    Args:
        frame: uint8 (H, W, 3) BGR, (H, W, 4) BGRA (alpha ignored), or (H, W) / (H, W, 1) grayscale.
        cfg: Preprocessing configuration.
        out: Optional float32 (C, S, S) array to write into (e.g. a row of a batch).

    Returns:
        ``out``, or a new C-contiguous float32 array of shape (C, S, S).

    Raises:
        ValueError: Wrong dtype or shape.
    """
    pixels = _check_uint8_image(frame, "preprocess input", channels=(1, 3, 4))
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return _model_input(_resize(pixels, cfg.image_size, cfg.interpolation), cfg, bgr=True, out=out)


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
    """The model input of an S x S uint8 image: RGB order (or gray), divided by 255, ``(x - mean) / std``.

    Args:
        small: uint8 (S, S) gray, (S, S, 3) RGB or BGR, or (S, S, 4) BGRA image.
        cfg: Preprocessing configuration.
        bgr: The colour channels of ``small`` are in OpenCV's BGR order.
        out: Optional float32 (C, S, S) array to write into.

    Returns:
        float32 (C, S, S) array, C-contiguous unless ``out`` is not.
    """
    size = cfg.image_size
    if out is None:
        out = np.empty((cfg.channels, size, size), dtype=np.float32)
    elif out.shape != (cfg.channels, size, size) or out.dtype != np.float32:
        raise ValueError(
            f"out must be a float32 array of shape {(cfg.channels, size, size)}, got {out.dtype} {out.shape}"
        )
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
        images: uint8 RGB images (sizes may differ; all are resized to S x S).
        cfg: Preprocessing configuration.

    Returns:
        float32 array of shape (N, C, S, S); (0, C, S, S) for an empty sequence.
    """
    batch = np.empty((len(images), cfg.channels, cfg.image_size, cfg.image_size), dtype=np.float32)
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
