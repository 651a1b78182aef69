"""Image and mask file I/O with strict validation (torch-free: numpy + OpenCV only).

Every reader returns the same canonical representation regardless of the file format
(uint8 RGB for images, bool for masks), so training, evaluation and the runtime never
see format-dependent differences. Atomic writes, locks and the strict JSON reader are in
:mod:`edgead.data.files`.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edgead.data.files import write_bytes_atomic

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "binarise_mask",
    "list_images",
    "read_image",
    "read_image_bgr",
    "read_mask",
    "read_mask_checked",
    "write_image_atomic",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_BMP_SIGNATURE = b"BM"


class ImageReadError(ValueError):
    """Raised when a file exists but is not a complete, decodable image or mask."""


def _read_file_bytes(path: Path) -> np.ndarray:
    """Reads a whole file as a uint8 buffer, mapping OS errors to clear exceptions."""
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise ImageReadError(f"expected an image file but found a directory: {path}")
    # np.fromfile + imdecode (instead of cv2.imread) handles non-ASCII paths on every platform.
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"image file is empty (0 bytes): {path}")
    return data


def _check_complete(data: np.ndarray, path: Path) -> None:
    """Detects truncated PNG/JPEG/BMP files, which OpenCV may decode partially without failing.

    Args:
        data: Raw file bytes.
        path: File path, used in error messages.

    Raises:
        ImageReadError: The container's end marker or declared size is missing.
    """
    raw = data.tobytes()
    if raw.startswith(_PNG_SIGNATURE):
        # A complete PNG ends with the IEND chunk (type + 4-byte CRC); tolerate trailing padding.
        tail = raw.rstrip(b"\x00")[-12:]
        if b"IEND" not in tail:
            raise ImageReadError(f"truncated PNG (no IEND chunk at the end): {path}")
    elif raw.startswith(_JPEG_SOI):
        # Some writers pad JPEGs with zeros after the end-of-image marker.
        if not raw.rstrip(b"\x00").endswith(_JPEG_EOI):
            raise ImageReadError(f"truncated JPEG (no end-of-image marker 0xFFD9): {path}")
    elif raw.startswith(_BMP_SIGNATURE) and len(raw) >= 6:
        declared_size = int.from_bytes(raw[2:6], "little")
        if 0 < declared_size and len(raw) < declared_size:
            raise ImageReadError(f"truncated BMP ({len(raw)} bytes, header declares {declared_size}): {path}")


def _decode(path: str | os.PathLike[str]) -> np.ndarray:
    """Decodes a file with all channels and its native bit depth, validating completeness."""
    file_path = Path(path)
    data = _read_file_bytes(file_path)
    _check_complete(data, file_path)
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # some codecs raise instead of returning None
        raise ImageReadError(f"cannot decode image file {file_path}: {exc}") from exc
    if decoded is None or decoded.size == 0:
        raise ImageReadError(f"cannot decode image file {file_path}: expected one of {', '.join(IMAGE_EXTENSIONS)}")
    return decoded


def _to_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Converts 8- or 16-bit pixel data to uint8 (16-bit is rescaled, not clipped)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        # Rounded integer rescale of 0..65535 onto 0..255: exact and platform independent.
        return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    raise ImageReadError(f"unsupported pixel type {pixels.dtype} in {path}: expected 8- or 16-bit integers")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an image file as 8-bit RGB.

    Grayscale is replicated to three channels, 16-bit data is rescaled to 8 bit and an alpha
    channel is dropped. EXIF orientation is ignored on purpose so that pixels are used exactly
    as stored (cameras on a line do not rotate).

    Args:
        path: Image file (PNG, JPEG, BMP or TIFF; the format is detected from the content).

    Returns:
        uint8 array of shape (H, W, 3) in RGB order.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file is empty, truncated, not an image, or has an unsupported type.
    """
    return _read_colour(path, bgr=False)


def read_image_bgr(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an image file as 8-bit BGR, OpenCV's order (what a camera delivers), like :func:`read_image`
    otherwise: ``read_image_bgr(p)`` equals ``read_image(p)`` with its channels reversed.

    A colour file is decoded as stored (no conversion); gray is replicated, alpha dropped, 16 bit rescaled.

    Returns:
        uint8 array of shape (H, W, 3) in BGR order.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file is empty, truncated, not an image, or has an unsupported type.
    """
    return _read_colour(path, bgr=True)


def _read_colour(path: str | os.PathLike[str], bgr: bool) -> np.ndarray:
    """Decodes a file into 8-bit (H, W, 3) RGB, or BGR when ``bgr``; see :func:`read_image`."""
    file_path = Path(path)
    pixels = _to_uint8(_decode(file_path), file_path)
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # gray, gray + alpha
        pixels = np.ascontiguousarray(pixels[:, :, 0])
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR if bgr else cv2.COLOR_GRAY2RGB)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels if bgr else cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2BGR if bgr else cv2.COLOR_BGRA2RGB)
    raise ImageReadError(f"unsupported image shape {pixels.shape} in {file_path}: expected 1-4 channels")


def binarise_mask(pixels: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The defect pixels of a decoded mask: those above half of the mask's largest value.

    The rule (half of the value range ``0..max``) reads 0/1 masks, 0/255 masks and 16-bit masks alike, ignores
    JPEG noise near 0 and halo values near the edges, and treats an all-zero mask as defect-free. In a colour
    mask a pixel's value is its largest channel (alpha is ignored: it is not a defect label).

    Args:
        pixels: Decoded mask, (H, W) or (H, W, C), any integer type.

    Returns:
        ``(mask, note)``: bool array (H, W), and None when the mask is strictly two-valued (0 and one other value,
        or a single value), else a description of its values (e.g. ``"37 distinct values in 0..255"``) for a
        warning.
    """
    if pixels.ndim == 3:
        colour = pixels[:, :, :3] if pixels.shape[2] == 4 else pixels
        pixels = colour.max(axis=2)
    peak = float(pixels.max(initial=0))
    mask = pixels.astype(np.float64) > peak / 2.0 if peak > 0 else np.zeros(pixels.shape, dtype=bool)
    levels = np.unique(pixels)
    two_valued = len(levels) == 1 or (len(levels) == 2 and levels[0] == 0)
    note = None if two_valued else f"{len(levels)} distinct values in {float(levels[0]):g}..{peak:g}"
    return mask, note


def read_mask_checked(path: str | os.PathLike[str]) -> tuple[np.ndarray, str | None]:
    """Reads a defect mask as :func:`read_mask` does and says whether it was strictly two-valued.

    Returns:
        ``(mask, note)`` of :func:`binarise_mask`: the bool (H, W) mask, and None or what the values were.
    """
    return binarise_mask(_decode(path))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a defect mask: a pixel is a defect where its value is above half of the mask's largest value
    (:func:`binarise_mask`), so 0/1 and 0/255 masks both work and JPEG noise near 0 is no defect.

    Args:
        path: Mask image file.

    Returns:
        bool array of shape (H, W).

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file is empty, truncated or not an image.
    """
    return read_mask_checked(path)[0]


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Lists image files directly inside a folder (not recursive), sorted by name.

    Args:
        folder: Directory to scan.

    Returns:
        Paths whose extension (case-insensitive) is in ``IMAGE_EXTENSIONS``; hidden files are skipped.

    Raises:
        FileNotFoundError: The folder does not exist or is not a directory.
    """
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder_path}")
    return sorted(
        entry
        for entry in folder_path.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def write_image_atomic(
    path: str | os.PathLike[str], image: np.ndarray, durable: bool = False, *, bgr: bool = False
) -> None:
    """Encodes an image by the file extension and writes it atomically.

    Args:
        path: Destination; its extension (one of ``IMAGE_EXTENSIONS``) selects the codec.
        image: uint8 (H, W) grayscale or (H, W, 3) RGB; bool masks are written as 0/255.
        durable: Also fsync before the rename.
        bgr: ``image`` is in OpenCV's BGR order (a camera frame, a drawn overlay): encoded as is, where RGB
            is converted for the encoder first. The file is the same either way.

    Raises:
        ValueError: Unsupported extension, dtype or shape, or the encoder failed.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(f"cannot write {target}: extension must be one of {', '.join(IMAGE_EXTENSIONS)}")
    pixels = np.asarray(image)
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype != np.uint8:
        raise ValueError(f"cannot write {target}: expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        if not bgr:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)  # OpenCV encoders expect BGR
    elif pixels.ndim != 2:
        raise ValueError(f"cannot write {target}: expected (H, W) or (H, W, 3) array, got {pixels.shape}")
    ok, encoded = cv2.imencode(suffix, np.ascontiguousarray(pixels))
    if not ok:
        raise ValueError(f"OpenCV failed to encode {target} as {suffix}")
    write_bytes_atomic(target, encoded.tobytes(), durable=durable)
