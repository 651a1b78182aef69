"""MVTec-AD style dataset listing, validation and loading (torch-free).

Layout::

    <root>/train/good/*                      normal training images
    <root>/test/good/*                       normal test images
    <root>/test/<defect_type>/*              defective test images
    <root>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png) defect masks

Good images have no mask file (an all-zero mask is implied). A mask pixel is a defect where its value is
above half of the mask's largest value (``edgead.data.io.binarise_mask``): 0/1 and 0/255 masks both work and
JPEG noise near 0 is ignored. :func:`load_masks` warns once per call (:class:`MaskValueWarning`, naming a file
and the rule) when masks are not strictly two-valued (JPEG-compressed, anti-aliased, a gradient), since their
pixel metrics then depend on that rule.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from edgead.data.io import list_images, read_image, read_mask, read_mask_checked
from edgead.data.preprocess import PreprocessConfig, height_width, preprocess, resize_mask

__all__ = [
    "DatasetLayoutError",
    "MaskValueWarning",
    "Sample",
    "held_out_count",
    "list_test",
    "list_train",
    "load_images",
    "load_masks",
    "split_validation",
    "validate_dataset",
]

GOOD = "good"

_T = TypeVar("_T")
_R = TypeVar("_R")


class DatasetLayoutError(ValueError):
    """Raised when a dataset folder does not follow the MVTec-AD layout."""


class MaskValueWarning(UserWarning):
    """Ground-truth masks are not strictly two-valued; they were binarised at half of their largest value."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split.

    Attributes:
        path: Image file.
        label: 0 for good, 1 for defective.
        defect_type: "good" for normal images, else the defect folder name.
        mask_path: Ground-truth mask file, or None (good images: all-zero mask).
    """

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def _parallel_map(function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """Maps in input order on a few threads (OpenCV releases the GIL while decoding)."""
    if len(items) < 8:
        return [function(item) for item in items]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # map() yields in input order and re-raises the first failing item's exception.
        return list(pool.map(function, items))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what} not found: expected a directory at {path}")


def list_train(root: str | os.PathLike[str]) -> list[Sample]:
    """Lists the normal training images ``<root>/train/good/*`` in sorted order.

    Raises:
        DatasetLayoutError: The folder is missing or contains no images.
    """
    train_dir = Path(root) / "train" / GOOD
    _require_dir(train_dir, "training folder")
    paths = list_images(train_dir)
    if not paths:
        raise DatasetLayoutError(f"empty train folder: no image files in {train_dir}")
    return [Sample(path=path, label=0, defect_type=GOOD, mask_path=None) for path in paths]


def _mask_candidates(root: Path, defect_type: str, image_path: Path) -> tuple[Path, Path]:
    mask_dir = root / "ground_truth" / defect_type
    # MVTec names masks <stem>_mask.png; some datasets reuse the image stem.
    return mask_dir / f"{image_path.stem}_mask.png", mask_dir / f"{image_path.stem}.png"


def list_test(root: str | os.PathLike[str]) -> list[Sample]:
    """Lists the test images: ``good`` first, then defect types alphabetically, files sorted by name.

    Raises:
        DatasetLayoutError: ``test`` or ``test/good`` is missing, ``test/good`` is empty, or a
            defective image has no mask (the message lists the mask paths tried).
    """
    root_path = Path(root)
    test_dir = root_path / "test"
    _require_dir(test_dir, "test folder")
    good_dir = test_dir / GOOD
    if not good_dir.is_dir():
        raise DatasetLayoutError(f"test folder {test_dir} has no '{GOOD}' subfolder (expected {good_dir})")
    good_paths = list_images(good_dir)
    if not good_paths:
        raise DatasetLayoutError(f"no image files in {good_dir}: normal test images are required")
    samples = [Sample(path=path, label=0, defect_type=GOOD, mask_path=None) for path in good_paths]
    defect_dirs = sorted(
        entry
        for entry in test_dir.iterdir()
        if entry.is_dir() and entry.name != GOOD and not entry.name.startswith(".")
    )
    for defect_dir in defect_dirs:
        for image_path in list_images(defect_dir):
            candidates = _mask_candidates(root_path, defect_dir.name, image_path)
            mask_path = next((candidate for candidate in candidates if candidate.is_file()), None)
            if mask_path is None:
                tried = " or ".join(str(candidate) for candidate in candidates)
                raise DatasetLayoutError(f"defective test image {image_path} has no mask: tried {tried}")
            samples.append(Sample(path=image_path, label=1, defect_type=defect_dir.name, mask_path=mask_path))
    return samples


def _check_sample(sample: Sample, check_masks: bool) -> None:
    """Decodes one sample fully; compares mask and image sizes when asked."""
    image = read_image(sample.path)
    if check_masks and sample.mask_path is not None:
        _check_mask_size(sample, read_mask(sample.mask_path), image.shape[:2])


def _check_mask_size(sample: Sample, mask: np.ndarray, image_shape: tuple[int, ...] | None = None) -> None:
    """A mask must cover its image pixel for pixel: a resized or misplaced mask would score the wrong pixels."""
    height, width = image_shape if image_shape is not None else read_image(sample.path).shape[:2]
    if mask.shape != (height, width):
        raise DatasetLayoutError(
            f"mask size {mask.shape[1]}x{mask.shape[0]} of {sample.mask_path} does not match "
            f"image size {width}x{height} of {sample.path} (width x height)"
        )


def validate_dataset(root: str | os.PathLike[str], check_masks: bool = True) -> None:
    """Checks the whole dataset before training so that bad files fail fast, not hours later.

    Lists both splits, decodes every image (catching unreadable or truncated files) and, when
    ``check_masks`` is set, verifies that each defect mask has its image's size.

    Raises:
        DatasetLayoutError: Layout problems or a mask/image size mismatch (names both files).
        ImageReadError: An image or mask cannot be decoded (names the file).
    """
    root_path = Path(root)
    _require_dir(root_path, "dataset root")
    samples = list_train(root_path) + list_test(root_path)
    _parallel_map(lambda sample: _check_sample(sample, check_masks), samples)


def _as_path(item: Sample | str | os.PathLike[str]) -> Path:
    return item.path if isinstance(item, Sample) else Path(item)


def load_images(samples_or_paths: Iterable[Sample | str | os.PathLike[str]], cfg: PreprocessConfig) -> np.ndarray:
    """Reads and preprocesses images into one batch.

    Args:
        samples_or_paths: ``Sample`` objects or image paths.
        cfg: Preprocessing configuration (the same one the runtime uses).

    Returns:
        float32 array of shape (N, C, H, W), H x W = ``cfg.size``.
    """
    paths = [_as_path(item) for item in samples_or_paths]
    batch = np.empty((len(paths), cfg.channels, *cfg.size), dtype=np.float32)

    def load_into(index: int) -> None:
        batch[index] = preprocess(read_image(paths[index]), cfg)

    _parallel_map(load_into, range(len(paths)))
    return batch


def load_masks(samples: Iterable[Sample], size: int | tuple[int, int]) -> np.ndarray:
    """Reads ground-truth masks resized (nearest neighbour) to the model resolution.

    A pixel is a defect where its value is above half of its mask's largest value (``edgead.data.io.binarise_mask``).
    When some masks are not strictly two-valued (JPEG-compressed, anti-aliased, a gradient), one
    :class:`MaskValueWarning` per call says how many, names one file and states that rule.

    Each mask must have its image's size (checked here too, not only before training, so ``edgead eval``
    never scores a mask drawn for another image size).

    Args:
        samples: Samples; those without ``mask_path`` get an all-zero mask.
        size: Output side length, or ``(height, width)``.

    Returns:
        uint8 array of shape (N, height, width) with values in {0, 1}.
    """
    sample_list = list(samples)
    masks = np.zeros((len(sample_list), *height_width(size)), dtype=np.uint8)
    notes: list[str | None] = [None] * len(sample_list)

    def load_into(index: int) -> None:
        mask_path = sample_list[index].mask_path
        if mask_path is not None:
            mask, notes[index] = read_mask_checked(mask_path)
            _check_mask_size(sample_list[index], mask)
            masks[index] = resize_mask(mask, size)

    _parallel_map(load_into, range(len(sample_list)))
    unusual = [index for index, note in enumerate(notes) if note is not None]
    if unusual:
        first = unusual[0]
        n_masks = sum(sample.mask_path is not None for sample in sample_list)
        warnings.warn(
            f"{len(unusual)} of {n_masks} masks are not strictly two-valued (e.g. {sample_list[first].mask_path}: "
            f"{notes[first]}); a pixel counts as a defect where its value is above half of its mask's largest "
            "value. Save masks as 0/255 PNG (not JPEG) for exact pixel metrics",
            MaskValueWarning,
            stacklevel=2,
        )
    return masks


def held_out_count(count: int, fraction: float) -> int:
    """How many of ``count`` normal images :func:`split_validation` holds out: ``fraction`` of them rounded, but at
    least one when ``fraction > 0``."""
    n_val = round(count * fraction)
    return max(n_val, 1) if fraction > 0.0 and count > 0 else n_val


def split_validation(samples: Sequence[_T], fraction: float, seed: int) -> tuple[list[_T], list[_T]]:
    """Holds out a deterministic random subset of normal training samples (for threshold calibration).

    Both returned lists keep the input order.

    Args:
        samples: Normal training samples (``Sample`` items must have label 0).
        fraction: Share held out, in [0, 1); rounded, but at least one sample when > 0.
        seed: Seed of the random selection.

    Returns:
        (remaining training samples, held-out validation samples).

    Raises:
        ValueError: Bad fraction, defective samples, or nothing left to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    defective = [item for item in samples if isinstance(item, Sample) and item.label != 0]
    if defective:
        raise ValueError(f"validation hold-out takes normal images only; got defective {defective[0].path}")
    count = len(samples)
    n_val = held_out_count(count, fraction)
    if n_val >= count > 0:
        raise ValueError(f"holding out {n_val} of {count} samples leaves none for training")
    chosen = set(np.random.default_rng(seed).permutation(count)[:n_val].tolist())
    train = [item for index, item in enumerate(samples) if index not in chosen]
    val = [item for index, item in enumerate(samples) if index in chosen]
    return train, val
