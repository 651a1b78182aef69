"""Image, mask and JSON file I/O with strict validation (torch-free: numpy + OpenCV only).

Every reader returns the same canonical representation regardless of the file format
(uint8 RGB for images, bool for masks), so training, evaluation and the runtime never
see format-dependent differences. JSON files edgead reads from users and exports (a run's
``config.json``, ``--config`` specs, an export's ``edgead.json``) go through :func:`read_json_strict`:
a duplicated key or excessive nesting is an error naming the file, never a silent last-one-wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = [
    "LockBusyError",
    "exclusive_lock",
    "IMAGE_EXTENSIONS",
    "JSON_MAX_DEPTH",
    "ImageReadError",
    "JSONReadError",
    "binarise_mask",
    "list_images",
    "read_image",
    "read_image_bgr",
    "read_json_strict",
    "read_mask",
    "read_mask_checked",
    "OutputPathError",
    "atomic_output",
    "check_output_file",
    "check_output_folder",
    "file_sha256",
    "write_bytes_atomic",
    "write_image_atomic",
    "write_json_atomic",
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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success renames it over ``path``, on error removes it.

    Readers therefore see either the old file or the complete new one, never a partial file. The file
    gets the usual permissions (0666 less the umask), not ``mkstemp``'s private 0600.

    Args:
        path: Destination file; missing parent directories are created.
        durable: Also fsync before the rename (survives power loss; slower, so off by default).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so that os.replace is a rename on one filesystem, hence atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class LockBusyError(RuntimeError):
    """Another process holds the lock; ``holder`` says which (its pid, as it wrote it)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path}: held by {holder}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) without waiting.

    The kernel drops the lock when the process dies, so a killed holder never leaves a stale lock.

    Raises:
        LockBusyError: another process holds it.
    """
    import fcntl  # POSIX-only: imported here so that the runtime (which imports this module) runs on Windows

    lock_path = Path(path)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockBusyError(lock_path, handle.read().strip() or "another process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so engines of any size fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> Path:
    """Writes bytes through :func:`atomic_output`; returns the destination path."""
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


#: Deepest nesting :func:`read_json_strict` accepts by default: edgead's own files are under 10 levels deep; a
#: hostile file 100,000 levels deep would otherwise exhaust Python's recursion limit.
JSON_MAX_DEPTH = 64


class JSONReadError(ValueError):
    """A JSON file is not valid JSON, repeats a key, or is nested too deeply (the message names the file)."""


def read_json_strict(path: str | os.PathLike[str], max_depth: int = JSON_MAX_DEPTH, hint: str = "") -> Any:
    """The one way edgead reads a JSON file a user or an export gave it: UTF-8 JSON in which every object
    has each key once and nothing is nested deeper than ``max_depth`` levels.

    Args:
        path: JSON file.
        max_depth: Deepest nesting of objects and lists accepted.
        hint: Added to the message of invalid JSON (e.g. what the file should be).

    Raises:
        FileNotFoundError, OSError: The file cannot be opened.
        JSONReadError: Not UTF-8, not valid JSON, a key given twice (named) or nested too deeply; each names
            the file.
    """
    file_path = Path(path)
    try:
        text = file_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JSONReadError(f"{file_path}: not UTF-8 text ({err}); expected a JSON file") from None
    too_deep = f"{file_path}: nested deeper than {max_depth} levels; expected a JSON file edgead wrote or a spec"
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, file_path))
    except json.JSONDecodeError as err:
        raise JSONReadError(f"{file_path}: not valid JSON ({err})" + (f"; {hint}" if hint else "")) from None
    except RecursionError:
        raise JSONReadError(too_deep) from None
    if json_depth(data, max_depth) > max_depth:
        raise JSONReadError(too_deep)
    return data


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise JSONReadError(f"{path}: key {key!r} appears twice; each key may be given once")
        result[key] = value
    return result


def json_depth(value: Any, limit: int, level: int = 0) -> int:
    """Nesting depth of parsed JSON (objects and lists), counted no further than ``limit + 1``."""
    if level > limit:
        return level
    if isinstance(value, dict):
        return max([json_depth(v, limit, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([json_depth(v, limit, level + 1) for v in value], default=level + 1)
    return level


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, durable: bool = True, allow_nan: bool = True, **dumps: Any
) -> Path:
    """The one way edgead writes a JSON file: ``json.dumps(data, indent=2)`` plus a newline, through
    :func:`atomic_output` (fsynced unless ``durable=False``); a reader sees the old file or the new one.

    ``allow_nan=False`` refuses NaN / infinity (strict JSON for reports other tools read); ``dumps`` passes
    further ``json.dumps`` options (e.g. ``sort_keys``, ``ensure_ascii``).
    """
    text = json.dumps(data, indent=dumps.pop("indent", 2), allow_nan=allow_nan, **dumps)
    return write_bytes_atomic(path, (text + "\n").encode("utf-8"), durable=durable)


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


# ------------------------------------------------------------------------------------------ output paths
class OutputPathError(ValueError):
    """An output cannot go where it was asked to (a folder where a file goes, a missing or read-only folder, a
    full disk). Checked before the work starts where possible, so a long run never ends in a traceback."""


def _probe_writable(folder: Path, path: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the one check that answers for read-only mounts,
    permissions and ACLs alike (``os.access`` says yes to root on a folder it then cannot write)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".edgead-write-check.", dir=folder)
    except OSError as err:
        reason = err.strerror or str(err)
        where = "it" if Path(folder) == Path(path) else str(folder)
        raise OutputPathError(f"{what} {path}: cannot write into {where} ({reason})") from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | os.PathLike[str], what: str = "--json") -> Path:
    """Fail before any work when a file cannot be written at ``path``: a folder is there, its folder does not
    exist (or is a file), or this process cannot write into it. ``what`` names the option in the message.

    Raises:
        OutputPathError: naming ``path`` and what was expected.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(
            f"{what} {target}: is a folder; expected the name of a file to write, e.g. {target / 'report.json'}"
        )
    parent = target.parent
    if not parent.exists():
        raise OutputPathError(f"{what} {target}: the folder {parent} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"{what} {target}: {parent} is not a folder")
    _probe_writable(parent, target, what)
    return target


def check_output_folder(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Fail before any work when a folder cannot be made or written at ``path``: something other than a folder is
    there, or the nearest existing folder above it cannot be written. What the folder holds is each command's
    own check (``predict`` wants it empty, ``eval`` its own earlier report, ``export`` its own versions).

    Raises:
        OutputPathError: naming ``path`` and what was expected.
    """
    target = Path(path)
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise OutputPathError(f"{what} {target}: exists and is not a folder; expected a folder to write into")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{what} {target}: {existing} is not a folder")
    _probe_writable(existing, target, what)
    return target
