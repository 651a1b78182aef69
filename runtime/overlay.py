"""Drawing for the live runtime: heatmap overlay, the head-up display, and whether a window can open at all.

Torch-free: numpy and OpenCV only. ``edgead.report`` re-uses :func:`heatmap_overlay` for its report images,
so both draw anomaly maps identically.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys

import cv2
import numpy as np
from numpy.typing import NDArray

from edgead.runtime.result import Result

__all__ = ["draw_hud", "gui_backend", "has_display", "heatmap_overlay"]

_RED_BGR = (0, 0, 255)
_GREEN_BGR = (0, 200, 0)
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Sub-entries of the "GUI:" section that name a real window backend (not e.g. "VTK support" or fonts).
_GUI_BACKEND_KEYS = ("GTK", "QT", "WIN32", "COCOA", "WAYLAND", "FRAMEBUFFER")


def heatmap_overlay(
    image: NDArray[np.uint8], anomaly_map: NDArray, vmin: float, vmax: float, alpha: float = 0.5, *, bgr: bool = False
) -> NDArray[np.uint8]:
    """Blends a JET-coloured anomaly map onto an RGB image (or a BGR one, with ``bgr``).

    Args:
        image: (H, W, 3) uint8 RGB image; BGR when ``bgr``.
        anomaly_map: (h, w) map of any size; it is resized bilinearly to (H, W).
        vmin: Map value drawn as the coldest colour (pass one global value per test set so that overlays
            are comparable between images).
        vmax: Map value drawn as the hottest colour.
        alpha: Weight of the heatmap in the blend, in [0, 1].
        bgr: The image is in OpenCV's BGR order (a camera frame): blended with OpenCV's BGR colour map as
            is, no conversion. The blend is per channel, so either order gives the same picture.

    Returns:
        (H, W, 3) uint8 image in the order of the input.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        order = "BGR" if bgr else "RGB"
        raise ValueError(f"heatmap_overlay: expected (H, W, 3) uint8 {order}, got {image.shape} {image.dtype}")
    if anomaly_map.ndim != 2:
        raise ValueError(f"heatmap_overlay: expected a 2-D anomaly map, got shape {anomaly_map.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"heatmap_overlay: alpha must be in [0, 1], got {alpha}")
    # A constant map (vmax == vmin) would divide by zero; draw it as all-cold instead.
    scale = 255.0 / (vmax - vmin) if vmax > vmin else 0.0
    # Normalising before resizing is cheaper because the map is usually smaller than the frame.
    normalised = np.clip((anomaly_map.astype(np.float32) - np.float32(vmin)) * np.float32(scale), 0.0, 255.0)
    height, width = image.shape[:2]
    if normalised.shape != (height, width):
        normalised = cv2.resize(normalised, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(normalised.astype(np.uint8), cv2.COLORMAP_JET)  # BGR
    if not bgr:
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, heat, alpha, 0.0)


def _format_value(value: float) -> str:
    """One decimal for ordinary scores, significant digits for small ones (0.0123 must not print as 0.0)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0.0 or abs(value) >= 1.0:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _thickness(scale: float) -> int:
    return max(1, round(scale * 2))


def _put_boxed_text(
    image: NDArray[np.uint8], text: str, top_left: tuple[int, int], scale: float, colour: tuple[int, int, int]
) -> int:
    """Draws text on a solid black box so it stays readable on any heatmap colour; returns the box bottom.

    A box instead of a thick black outline: OpenCV 5's built-in font gets wider with thickness, so an outline
    drawn with a larger thickness no longer lines up with the text.
    """
    thickness = _thickness(scale)
    (text_width, text_height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(2, round(text_height * 0.25))
    left, top = top_left
    bottom = top + text_height + baseline + 2 * pad
    cv2.rectangle(image, (left, top), (left + text_width + 2 * pad, bottom), _BLACK, thickness=cv2.FILLED)
    cv2.putText(image, text, (left + pad, top + pad + text_height), _FONT, scale, colour, thickness, cv2.LINE_AA)
    return bottom


def _fit_scale(text: str, preferred: float, max_width: int) -> float:
    """Shrinks the font scale until ``text`` fits into ``max_width`` pixels (small frames, long lines)."""
    (text_width, _), _ = cv2.getTextSize(text, _FONT, preferred, _thickness(preferred))
    if text_width <= max_width or text_width == 0:
        return preferred
    return max(0.2, preferred * max_width / text_width)


def draw_hud(
    frame_bgr: NDArray[np.uint8],
    result: Result,
    fps: float | None,
    latency_ms: float | None,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> NDArray[np.uint8]:
    """Draws the anomaly heatmap, the score line and the verdict onto a copy of a frame.

    Args:
        frame_bgr: (H, W, 3) uint8 BGR camera frame.
        result: The detector's answer for this frame.
        fps: Smoothed frames per second, or None to leave it out.
        latency_ms: Latency to show, or None to leave it out.
        vmin: Map value drawn coldest; keep it fixed across frames so colours stay comparable.
        vmax: Map value drawn hottest (e.g. twice the threshold).
        alpha: Heatmap weight in the blend.

    Returns:
        (H, W, 3) uint8 BGR image: heatmap overlay, a text line such as
        ``"score 12.3 / thr 10.0  FPS 24.1  31.2 ms"``, and a red border with "ANOMALY" or a green "OK".
    """
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise ValueError(f"draw_hud: expected (H, W, 3) uint8 BGR, got {frame_bgr.shape} {frame_bgr.dtype}")
    canvas = heatmap_overlay(frame_bgr, np.asarray(result.anomaly_map), vmin, vmax, alpha, bgr=True)
    height, width = canvas.shape[:2]
    border = max(3, min(height, width) // 60)
    margin = 2 * border  # text starts inside the (possible) red border

    parts = [f"score {_format_value(float(result.score))} / thr {_format_value(float(result.threshold))}"]
    if fps is not None:
        parts.append(f"FPS {fps:.1f}")
    if latency_ms is not None:
        parts.append(f"{latency_ms:.1f} ms")
    line = "  ".join(parts)
    usable_width = max(1, width - 3 * margin)
    scale = _fit_scale(line, max(0.4, width / 1100), usable_width)
    line_bottom = _put_boxed_text(canvas, line, (margin, margin), scale, _WHITE)

    verdict, colour = ("ANOMALY", _RED_BGR) if result.is_anomaly else ("OK", _GREEN_BGR)
    verdict_scale = _fit_scale(verdict, scale * 1.6, usable_width)
    _put_boxed_text(canvas, verdict, (margin, line_bottom + border), verdict_scale, colour)

    if result.is_anomaly:
        cv2.rectangle(canvas, (0, 0), (width - 1, height - 1), _RED_BGR, thickness=border * 2)
    return canvas


def gui_backend(build_information: str | None = None) -> str | None:
    """Names OpenCV's window backend, or None for headless builds.

    Args:
        build_information: Text of ``cv2.getBuildInformation()`` (read from OpenCV when None).

    Returns:
        E.g. "GTK3", "QT5", "WIN32UI", "COCOA"; None when the "GUI:" section says NONE or lists no backend.
    """
    info = cv2.getBuildInformation() if build_information is None else build_information
    lines = info.splitlines()
    for position, line in enumerate(lines):
        match = re.match(r"^(\s*)GUI:\s*(.*)$", line)
        if match is None:
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        if value:  # OpenCV >= 4.5.4 puts the chosen backend on the "GUI:" line itself
            return None if value.upper() == "NONE" else value
        # Older builds only list sub-entries such as "GTK+: YES (ver 3.24)".
        for sub_line in lines[position + 1 :]:
            if sub_line.strip() and len(sub_line) - len(sub_line.lstrip()) <= indent:
                break  # left the GUI section
            key, _, status = sub_line.strip().partition(":")
            if key.upper().startswith(_GUI_BACKEND_KEYS) and status.strip().upper().startswith("YES"):
                return key.strip()
        return None
    return None


@functools.lru_cache(maxsize=1)
def _opencv_gui_backend() -> str | None:
    """The running OpenCV's backend, parsed once (the build information never changes in a process)."""
    return gui_backend()


def gui_install_command() -> str:
    """The exact command that replaces a headless OpenCV by the GUI build of the same version (the two packages
    both provide ``cv2`` and conflict when both are installed)."""
    from importlib import metadata

    for package in ("opencv-python-headless", "opencv-contrib-python-headless"):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
        gui = package.replace("-headless", "")
        return f'pip uninstall -y {package} && pip install "{gui}=={version}"'
    return 'pip install "opencv-python"  (OpenCV with its window backend)'


def why_no_window() -> str | None:
    """Why ``cv2.imshow`` cannot open a window here, with what to do; None when it can (:func:`has_display`)."""
    if _opencv_gui_backend() is None:
        return (
            f"this OpenCV ({cv2.__version__}) is a headless build, without a window backend; to show the "
            f"overlay, switch to the GUI build: {gui_install_command()}"
        )
    if has_display():
        return None
    return (
        "no display: DISPLAY and WAYLAND_DISPLAY are unset (an SSH session, a service or a container); run it "
        "from the desktop session (or ssh -X), or leave out --show"
    )


def has_display() -> bool:
    """Whether ``cv2.imshow`` can open a window here.

    Returns:
        False for headless OpenCV builds (opencv-python-headless); on Linux and other Unix systems also False
        unless ``DISPLAY`` or ``WAYLAND_DISPLAY`` is set (SSH sessions, services, containers); on Windows and
        macOS True whenever OpenCV has a GUI backend.
    """
    if _opencv_gui_backend() is None:
        return False
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
