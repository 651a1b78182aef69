"""The held-out normal images a run keeps for itself, so export can calibrate and check parity after the
dataset moved or was deleted (a run directory is self-contained).

``edgead train`` holds out a fraction of the normal images, resizes them to the run's input size (the
first step of :func:`edgead.data.preprocess.preprocess`, so preprocessing them again gives exactly what
preprocessing the originals gives) and stores them as uint8 RGB in ``holdout.npz`` (NumPy's compressed
archive, read with ``allow_pickle=False``), with their source file names.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.files import file_sha256, write_bytes_atomic
from edgead.data.io import read_image
from edgead.data.preprocess import PreprocessConfig, resize_image

HOLDOUT_NAME = "holdout.npz"
#: Where :func:`held_out_normals` found a run's held-out images.
STORED, DATASET = "stored", "dataset"


class HoldoutError(ValueError):
    """A run's held-out image archive is missing or damaged."""


def save_holdout(run_dir: Path, paths: Sequence[Path], pre: PreprocessConfig) -> dict[str, object]:
    """Read, resize and store the held-out images; return the record that goes into ``config.data``."""
    images = (
        np.stack([resize_image(read_image(p), pre.size, pre.interpolation) for p in paths])
        if paths
        else np.zeros((0, *pre.size, 3), np.uint8)
    )
    names = np.array([Path(p).name for p in paths], dtype=np.str_)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, names=names)
    path = write_bytes_atomic(Path(run_dir) / HOLDOUT_NAME, buffer.getvalue(), durable=True)
    record: dict[str, object] = {"file": HOLDOUT_NAME, "n": len(paths), "image_size": pre.image_size}
    if pre.image_width is not None:
        record["image_width"] = pre.image_width
    return {**record, "sha256": file_sha256(path)}


def load_holdout(run_dir: Path, record: dict[str, object] | None) -> tuple[list[np.ndarray], list[str]]:
    """The stored held-out images (uint8 RGB, the run's input size) and their file names.

    Raises:
        HoldoutError: the archive named by ``record`` is missing, changed, or not an image archive.
    """
    if not record:
        return [], []
    path = Path(run_dir) / str(record["file"])
    if not path.is_file():
        raise HoldoutError(
            f"{path}: the run's held-out images are missing; pass --data DIR to calibrate on other normal images"
        )
    if record.get("sha256") and file_sha256(path) != record["sha256"]:
        raise HoldoutError(f"{path}: SHA-256 differs from config.json; the held-out images were changed")
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, names = archive["images"], archive["names"]
    except (OSError, ValueError, KeyError) as err:
        raise HoldoutError(f"{path}: not a held-out image archive ({err})") from err
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(names) != len(images):
        raise HoldoutError(f"{path}: expected uint8 images (N, H, W, 3) with N names, got {images.shape}")
    return list(images), [str(n) for n in names]


def held_out_normals(run_dir: Path, data: Mapping[str, Any]) -> tuple[list[np.ndarray], str]:
    """The normal images a run held out from training (uint8 RGB) and where they came from: ``STORED``, the
    run's ``holdout.npz`` (at the size it was stored at), else ``DATASET``, for runs made before it existed,
    the files of ``data["validation_paths"]`` that still exist (absolute paths only: a relative one would be
    resolved against whatever folder the caller runs in, and could name other images); ``([], "")`` for
    neither. The one place that finds them (pseudo-validation, export's calibration).

    Args:
        run_dir: The run directory.
        data: The run's ``config.data``.

    Raises:
        HoldoutError: the stored archive is missing, changed, or not an image archive.
    """
    rgb, _ = load_holdout(run_dir, data.get("holdout"))
    if rgb:
        return rgb, STORED
    paths = [Path(p) for p in data.get("validation_paths", []) if Path(p).is_absolute() and Path(p).is_file()]
    if paths:
        return [read_image(p) for p in paths], DATASET
    return [], ""
