"""Frame sources: camera index, video file, image folder, stream URL, GStreamer pipeline (torch-free).

``create_source(spec)`` classifies a SOURCE argument and returns an unopened :class:`FrameSource`; the
threaded reader that drains one into a bounded queue is :mod:`edgead.runtime.capture`.
"""

from __future__ import annotations

import abc
import math
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.data.io import IMAGE_EXTENSIONS, ImageReadError, list_images, read_image_bgr

__all__ = [
    "EventCallback",
    "Frame",
    "FolderSource",
    "FrameSource",
    "SourceError",
    "VideoCaptureSource",
    "create_source",
    "describe_source",
]

EventCallback = Callable[[str], None]

STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")
LIVE_KINDS = frozenset({"camera", "stream", "gstreamer"})
_EXPECTED = "a camera index, a video file, a folder of images, a stream URL or a GStreamer pipeline"

#: FFmpeg's level for OpenCV's FFmpeg backend unless the user sets ``OPENCV_FFMPEG_LOGLEVEL``: AV_LOG_QUIET. A
#: stream of undecodable parts otherwise prints one decoder line per part (thousands a minute); the reader's own
#: lines ("gave no decodable frame", "gave up after ...") say what happened instead. Set the variable (e.g. 24 for
#: FFmpeg warnings) to see the decoder's lines when debugging a stream.
FFMPEG_LOGLEVEL_DEFAULT = "-8"


class SourceError(RuntimeError):
    """A frame source cannot be opened or read; the message names the source and what was expected."""


@dataclass
class Frame:
    """One captured frame.

    Attributes:
        image: (H, W, 3) uint8 BGR pixels (OpenCV order, as cameras deliver them).
        index: Frame counter from the source (0-based; position in the folder for folder sources).
        timestamp: ``time.monotonic()`` when the frame was captured.
        name: File name for folder and video frames, otherwise ``"<source>#<index>"`` such as ``"camera0#123"``.
    """

    image: np.ndarray
    index: int
    timestamp: float
    name: str


def describe_source(spec: str) -> tuple[str, Any]:
    """Classifies a SOURCE argument.

    Args:
        spec: What the user typed: ``"0"``, ``"line.mp4"``, ``"images/"``, ``"rtsp://..."`` or a GStreamer
            pipeline such as ``"videotestsrc ! videoconvert ! appsink"``.

    Returns:
        ``(kind, target)``: ``("camera", int)``, ``("folder", Path)``, ``("image", Path)``, ``("video", Path)``,
        ``("stream", url)`` or ``("gstreamer", pipeline)``. An existing path wins over the pipeline rule
        (:func:`looks_like_pipeline`); a V4L2 device node ``/dev/videoN`` is camera N.

    Raises:
        SourceError: The spec is none of these: a path that does not exist (named, also when it contains "!"),
            or one that exists but is a device, FIFO or socket (the message says which).
    """
    text = spec.strip()
    if re.fullmatch(r"\d+", text):
        return "camera", int(text)
    if text.lower().startswith(STREAM_SCHEMES):
        return "stream", text
    path = Path(text).expanduser()
    # Existing paths win over the GStreamer rule so that a folder whose name contains "!" still works.
    if text and path.is_dir():
        return "folder", path
    if text and path.is_file():
        return ("image" if path.suffix.lower() in IMAGE_EXTENSIONS else "video"), path
    if text and path.exists():
        return _special_file(spec, path)
    if looks_like_pipeline(text):
        return "gstreamer", text
    hint = ""
    if text and (path.suffix or "/" in text or "\\" in text or "!" in text):
        hint = " (no file or folder exists at that path"
        if "!" in text:
            hint += "; nor is it a GStreamer pipeline, whose elements are separated by ' ! '"
        hint += ")"
    raise SourceError(f"source {spec!r} is not {_EXPECTED}{hint}")


def looks_like_pipeline(text: str) -> bool:
    """Whether SOURCE text is a GStreamer pipeline rather than a file name that happens to contain "!".

    The rule: elements separated by ``" ! "`` (with spaces, as gst-launch-1.0 and every GStreamer example write
    them), or a ``!`` that leads into ``appsink`` (which an OpenCV pipeline must end in). ``line!3.mp4`` is
    therefore a (missing) file, ``videotestsrc ! videoconvert ! appsink`` a pipeline.
    """
    return bool(re.search(r"\s!\s", text) or re.search(r"!\s*appsink\b", text))


def _special_file(spec: str, path: Path) -> tuple[str, Any]:
    """An existing path that is neither a regular file nor a folder: a V4L2 camera node (``/dev/video0``, or a
    ``/dev/v4l/by-id/...`` link to one) is that camera's index; anything else (``/dev/zero``, a FIFO, a socket)
    is an error that says what it is."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SourceError(f"source {spec!r} cannot be inspected: {exc.strerror or exc}") from exc
    if stat.S_ISCHR(mode):
        camera = re.fullmatch(r"video(\d+)", path.resolve().name)
        if camera:
            return "camera", int(camera.group(1))
        what = "a character device"
    elif stat.S_ISBLK(mode):
        what = "a block device"
    elif stat.S_ISFIFO(mode):
        what = "a named pipe (FIFO)"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "neither a regular file nor a folder"
    raise SourceError(
        f"source {spec!r} is {what}, not a video file or a folder of images: expected {_EXPECTED} "
        "(a camera is given by its index, or as /dev/videoN)"
    )


def _redact_url(url: str) -> str:
    """Hides ``user:password@`` in a stream URL so that credentials never reach logs or error messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", url)


def _as_bgr(image: np.ndarray) -> np.ndarray:
    """Normalises a decoded frame (gray, BGRA or 16-bit from some cameras) to (H, W, 3) uint8 BGR."""
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image  # already BGR in a buffer of its own: passed on untouched (the resize is its first reader)


class FrameSource(abc.ABC):
    """Something that yields frames: ``open()``, then ``read()`` until it returns None, then ``close()``.

    For a finite source ``read() -> None`` means the end; for a live source it means the feed was lost, and
    :class:`FrameReader` closes and re-opens it.
    """

    #: Short human-readable label used in messages ("camera0", "folder images", ...).
    label: str = "source"

    @property
    @abc.abstractmethod
    def live(self) -> bool:
        """True for cameras, streams and pipelines; False for files and folders."""

    @abc.abstractmethod
    def open(self) -> None:
        """Opens (or re-opens) the source.

        Raises:
            SourceError: It cannot be opened.
        """

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """Returns the next frame, or None at the end (finite) or when the feed is lost (live)."""

    @property
    def expected_frames(self) -> int | None:
        """How many frames an opened finite source will give (for progress), None when unknown or live."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, a folder holds no handle
        """Releases the device or file handle; safe to call twice."""


class FolderSource(FrameSource):
    """Images of a folder in sorted name order, or a single image file as a one-frame source."""

    def __init__(self, path: Path, skip_bad: bool = False, on_event: EventCallback | None = None) -> None:
        """Creates the source (nothing is read until :meth:`open`).

        Args:
            path: A folder (its images, see ``edgead.data.io.list_images``) or one image file.
            skip_bad: Skip unreadable files (reported through ``on_event``) instead of raising SourceError.
            on_event: Receives a line for every skipped file.
        """
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.on_event = on_event
        self.label = f"{'folder' if self.path.is_dir() else 'image'} {self.path}"
        self.skipped = 0
        self._files: list[Path] = []
        self._position = 0

    @property
    def live(self) -> bool:
        """Always False: a folder is finite and must not drop frames."""
        return False

    @property
    def expected_frames(self) -> int | None:
        return len(self._files) or None

    def open(self) -> None:
        """Lists the images; raises SourceError if there are none."""
        if self.path.is_file():
            self._files = [self.path]
        elif self.path.is_dir():
            self._files = list_images(self.path)
        else:
            raise SourceError(f"{self.label}: no such file or folder")
        if not self._files:
            extensions = ", ".join(IMAGE_EXTENSIONS)
            raise SourceError(f"{self.label} contains no images (expected files ending in {extensions})")
        self._position = 0

    def read(self) -> Frame | None:
        """Reads the next image as BGR.

        Raises:
            SourceError: A file is not a readable image and ``skip_bad`` is False; the message names the file.
        """
        while self._position < len(self._files):
            index = self._position
            file = self._files[index]
            self._position += 1
            try:
                # Decoded as BGR, the runtime's order (every camera's): no conversion of the full frame.
                bgr = read_image_bgr(file)
            except (ImageReadError, OSError) as exc:  # OSError: deleted or unreadable since listing
                if not self.skip_bad:
                    raise SourceError(f"{self.label}: cannot read {file.name} as an image: {exc}") from exc
                self.skipped += 1
                if self.on_event is not None:
                    self.on_event(f"skipping {file}: {exc}")
                continue
            return Frame(image=bgr, index=index, timestamp=time.monotonic(), name=file.name)
        return None


class VideoCaptureSource(FrameSource):
    """A ``cv2.VideoCapture``: camera index, video file, stream URL or GStreamer pipeline."""

    def __init__(self, kind: str, target: int | str | Path, stall_timeout_s: float | None = None) -> None:
        """Creates the source (the device is not touched until :meth:`open`).

        Args:
            kind: "camera", "video", "stream" or "gstreamer" (see :func:`describe_source`).
            target: Camera index, file path, URL or pipeline string.
            stall_timeout_s: Streams and videos: seconds OpenCV's FFmpeg backend waits for the source to open
                or for the next packet before a read fails (and a live stream reconnects). None keeps
                OpenCV's default of 30 s. Cameras and GStreamer pipelines have their own timeouts.
        """
        if kind not in ("camera", "video", "stream", "gstreamer"):
            raise ValueError(f"VideoCaptureSource: unknown kind {kind!r}")
        if stall_timeout_s is not None and not (math.isfinite(stall_timeout_s) and stall_timeout_s > 0):
            raise ValueError(f"stall timeout must be a positive number of seconds, got {stall_timeout_s}")
        self.kind = kind
        self.target = target
        self.stall_timeout_s = stall_timeout_s
        # Videos: the frame count the container declares, to tell a truncated file from a normal end.
        self.declared_frames = 0
        # Frame names must be short and URL-free (they end up in file names and logs).
        self._frame_prefix = f"camera{target}" if kind == "camera" else kind
        if kind == "camera":
            self.label = f"camera{target}"
        elif kind == "video":
            self.label = f"video {target}"
        elif kind == "stream":
            self.label = f"stream {_redact_url(str(target))}"
        else:
            self.label = f"GStreamer pipeline '{target}'"
        self._capture: Any = None
        self._next_index = 0

    @property
    def live(self) -> bool:
        """True for cameras, streams and GStreamer pipelines."""
        return self.kind in LIVE_KINDS

    def _create_capture(self) -> Any:
        """Constructs the OpenCV capture; tests override this to inject failures without hardware."""
        if self.kind == "camera":
            return cv2.VideoCapture(int(self.target))
        if self.kind == "gstreamer":
            return cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
        # Read once, when OpenCV first loads FFmpeg: effective for the first video or stream of the process.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", FFMPEG_LOGLEVEL_DEFAULT)
        if self.stall_timeout_s is not None:
            ms = max(1, round(self.stall_timeout_s * 1000))
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            return cv2.VideoCapture(str(self.target), cv2.CAP_ANY, params)
        return cv2.VideoCapture(str(self.target))

    def open(self) -> None:
        """Opens the capture.

        Raises:
            SourceError: OpenCV could not open it; the message says what to check.
        """
        self.close()
        capture = self._create_capture()
        if capture is None or not capture.isOpened():
            if capture is not None:
                capture.release()
            raise SourceError(f"cannot open {self.label}: {self._open_hint()}")
        self._capture = capture
        if self.kind == "video" and self._next_index == 0:
            count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
            self.declared_frames = int(count) if math.isfinite(count) and count > 0 else 0

    def _open_hint(self) -> str:
        """Says what most likely went wrong for this kind of source."""
        if self.kind == "camera":
            return "no camera with that index is available (is it connected, and not used by another program?)"
        if self.kind == "video":
            return f"OpenCV cannot decode it as a video (FFMPEG backend: {_video_backend_status('FFMPEG')})"
        if self.kind == "stream":
            return "the stream did not answer or is not a video stream (check the URL, network and credentials)"
        if _video_backend_status("GStreamer") != "YES":
            return "this OpenCV build has no GStreamer support (cv2.getBuildInformation() says 'GStreamer: NO')"
        return "OpenCV has GStreamer but the pipeline did not start (test it with gst-launch-1.0; end it in appsink)"

    def read(self) -> Frame | None:
        """Grabs the next frame; None at the end of a file or when a live feed fails."""
        if self._capture is None:
            return None
        ok, image = self._capture.read()
        if not ok or image is None or image.size == 0:
            self._check_complete()
            return None
        index = self._next_index
        self._next_index += 1  # keeps counting across reconnects so indices stay unique and increasing
        name = Path(str(self.target)).name if self.kind == "video" else f"{self._frame_prefix}#{index}"
        return Frame(image=_as_bgr(image), index=index, timestamp=time.monotonic(), name=name)

    @property
    def expected_frames(self) -> int | None:
        return self.declared_frames if self.kind == "video" and self.declared_frames > 0 else None

    def _check_complete(self) -> None:
        """A video file that ends well before the frame count its container declares is truncated or damaged:
        say so instead of ending as if the file were complete.

        Containers that estimate their count (duration x rate) may be off by a frame or two, so a shortfall
        up to 2 % (at least 2 frames) counts as complete. MP4 files cut before their index do not open at all
        (:meth:`open` reports them).

        Raises:
            SourceError: names the file, the frames read and the frames declared.
        """
        if self.kind != "video" or self.declared_frames <= 0:
            return
        tolerance = max(2, int(0.02 * self.declared_frames))
        if self._next_index < self.declared_frames - tolerance:
            raise SourceError(
                f"{self.label} ended after {self._next_index} of the {self.declared_frames} frames its container "
                "declares: the file is truncated or damaged (the frames read were processed)"
            )

    def close(self) -> None:
        """Releases the capture."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def _video_backend_status(backend: str) -> str:
    """Reads "YES"/"NO" for a backend from the "Video I/O" section of ``cv2.getBuildInformation()``."""
    match = re.search(rf"^\s*{re.escape(backend)}:\s*(\S+)", cv2.getBuildInformation(), flags=re.MULTILINE)
    return match.group(1) if match else "unknown"


def create_source(
    spec: str, skip_bad: bool = False, on_event: EventCallback | None = None, stall_timeout_s: float | None = None
) -> FrameSource:
    """Builds the (unopened) source for a SOURCE argument.

    Args:
        spec: See :func:`describe_source`.
        skip_bad: For folders: skip unreadable images instead of failing.
        on_event: For folders: receives a line per skipped image.
        stall_timeout_s: For streams and videos: see :class:`VideoCaptureSource`.

    Raises:
        SourceError: The spec cannot be classified.
    """
    kind, target = describe_source(spec)
    if kind in ("folder", "image"):
        return FolderSource(target, skip_bad=skip_bad, on_event=on_event)
    return VideoCaptureSource(kind, target, stall_timeout_s=stall_timeout_s)
