"""The camera loop behind ``edgead run``: capture -> predict -> log / save / show, until told to stop.

Torch-free. The loop depends only on the tiny :class:`Predictor` protocol (``predict(frame_bgr) -> Result``), so
any detector or a test double plugs in.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import cv2
import numpy as np

from edgead.data.io import atomic_output, write_image_atomic
from edgead.runtime.capture import EventCallback, Frame, FrameReader, create_source
from edgead.runtime.overlay import draw_hud, has_display
from edgead.runtime.result import Result

__all__ = ["LiveOptions", "LiveSummary", "Predictor", "run_live"]

_FPS_SMOOTHING = 0.1  # weight of the newest frame interval in the FPS moving average
_LATENCY_WINDOW = 10_000  # the median is taken over the most recent frames so memory stays bounded on 24/7 runs
_GET_TIMEOUT_S = 0.1  # wake up this often without frames to keep the window responsive
_QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc


class Predictor(Protocol):
    """Anything that scores one BGR frame (``edgead.runtime.detector.Detector`` is one)."""

    def predict(self, frame_bgr: np.ndarray) -> Result:
        """Scores one (H, W, 3) uint8 BGR frame."""
        ...


@dataclass
class LiveOptions:
    """How :func:`run_live` behaves.

    Attributes:
        show: Show a window; None = only if :func:`~edgead.runtime.overlay.has_display` says a GUI can open.
        save_anomalies: Folder for anomalous frames (frame PNG, HUD PNG and raw ``.npy`` map); None = save nothing.
        log_path: JSON-lines log (appended to); None = no log.
        log_every_frame: Log every frame; False = only anomalous frames.
        max_frames: Stop after this many processed frames; None = until the source ends or Ctrl-C.
        queue_size: Frames buffered between capture and inference (small keeps live latency low).
        window_name: Title of the display window.
        map_range: Fixed (vmin, vmax) for heatmap colours; None = (0, 2 x threshold).
        skip_bad: Folder sources: skip unreadable images instead of stopping with an error.
        max_reconnect_attempts: Live sources: give up after this many failed re-opens; None = retry for ever.
        stall_timeout_s: Streams and videos: seconds without a packet before a read fails and a stream
            reconnects; None = OpenCV's default (30 s).
    """

    show: bool | None = None
    save_anomalies: Path | None = None
    log_path: Path | None = None
    log_every_frame: bool = True
    max_frames: int | None = None
    queue_size: int = 2
    window_name: str = "edgead"
    map_range: tuple[float, float] | None = None
    skip_bad: bool = False
    max_reconnect_attempts: int | None = None
    stall_timeout_s: float | None = None


@dataclass
class LiveSummary:
    """What a :func:`run_live` session did.

    Attributes:
        frames: Frames processed by the predictor.
        anomalies: Frames judged anomalous.
        dropped: Frames the reader discarded to stay live (always 0 for files and folders).
        reconnects: Successful reconnects of a live source.
        seconds: Wall time from the first frame request to the end.
        fps: ``frames / seconds``.
        mean_latency_ms: Mean capture-to-result latency.
        median_latency_ms: Median capture-to-result latency over the most recent 10,000 frames.
        interrupted: Stopped by Ctrl-C (KeyboardInterrupt).
        stop_reason: "end of source", "max frames", "quit key", "window closed" or "interrupted".
    """

    frames: int = 0
    anomalies: int = 0
    dropped: int = 0
    reconnects: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    mean_latency_ms: float = 0.0
    median_latency_ms: float = 0.0
    interrupted: bool = False
    stop_reason: str = ""


class _JsonLinesLog:
    """Append-only JSON-lines log where every record is one unbuffered write, so a crash never splits a line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered binary append: each line goes to the OS in one write() call, nothing waits in a buffer.
        self._handle: BinaryIO | None = open(path, "ab", buffering=0)  # closed in close()
        if self._handle.tell() > 0 and not _ends_with_newline(path):
            # An earlier run died mid-line (e.g. power loss); start on a fresh line so ours stay parseable.
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        assert self._handle is not None
        view = memoryview(data)
        while view:  # raw writes may be partial in principle; finish the line
            written = self._handle.write(view)
            view = view[written or 0 :]

    def write(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Infinity; write null instead so every line stays valid JSON."""
    return value if math.isfinite(value) else None


def _log_record(frame: Frame, result: Result, latency_ms: float, dropped: int) -> dict[str, Any]:
    timings = result.timings
    return {
        "frame": frame.index,
        "name": frame.name,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "score": _finite_or_none(float(result.score)),
        "threshold": _finite_or_none(float(result.threshold)),
        "is_anomaly": bool(result.is_anomaly),
        "latency_ms": round(latency_ms, 3),
        "preprocess_ms": _finite_or_none(round(float(timings.get("preprocess", math.nan)), 3)),
        "infer_ms": _finite_or_none(round(float(timings.get("infer", math.nan)), 3)),
        "postprocess_ms": _finite_or_none(round(float(timings.get("postprocess", math.nan)), 3)),
        "dropped": dropped,
        # a remote predictor (edgead run --triton) also splits its time into client, network and server
        **{f"{key}_ms": round(float(timings[key]), 3) for key in ("client", "network", "server") if key in timings},
    }


def _safe_stem(name: str) -> str:
    """File-name-safe stem of a frame name (stream and pipeline names may contain any character)."""
    stem = Path(name).stem if "." in name else name
    return re.sub(r"[^A-Za-z0-9._#-]+", "_", stem)[:80] or "frame"


def evidence_base(folder: Path, frame: Frame) -> Path:
    """A name no other alarm has, sortable by time: ``<UTC time, microseconds>_<pid>_<source>_<frame>``.

    The time and process id keep two runs on one stream, two sources with one file name and two processes
    sharing the folder apart; a counter suffix covers anything that still collides. Nothing is overwritten.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    stem = f"{stamp}_{os.getpid()}_{_safe_stem(frame.name)}_{frame.index:06d}"
    base, counter = folder / stem, 0
    while any(base.with_name(base.name + suffix).exists() for suffix in EVIDENCE_SUFFIXES):
        counter += 1
        base = folder / f"{stem}-{counter}"
    return base


#: The files of one saved alarm: the frame, the HUD overlay and the raw map.
EVIDENCE_SUFFIXES = (".png", "_map.png", "_map.npy")


def _save_anomaly(folder: Path, frame: Frame, hud_bgr: np.ndarray, anomaly_map: np.ndarray) -> list[str]:
    """Writes ``<base>.png`` (the frame), ``<base>_map.png`` (the HUD) and ``<base>_map.npy`` (raw map), with
    ``<base>`` from :func:`evidence_base`; returns the three file names (the alarm's log line lists them)."""
    base = evidence_base(folder, frame)
    # Frames and the HUD are BGR, the encoder's own order: written as they are.
    write_image_atomic(base.with_name(base.name + ".png"), frame.image, bgr=True)
    write_image_atomic(base.with_name(base.name + "_map.png"), hud_bgr, bgr=True)
    with atomic_output(base.with_name(base.name + "_map.npy")) as tmp, open(tmp, "wb") as handle:
        # Saving through a handle: np.save(path) would append ".npy" to the temporary name.
        np.save(handle, np.asarray(anomaly_map, dtype=np.float32))
    return [base.name + suffix for suffix in EVIDENCE_SUFFIXES]


def _resolve_show(show: bool | None) -> bool:
    if show is None:
        return has_display()
    if show and not has_display():
        raise RuntimeError(
            "cannot show a window: no display (DISPLAY/WAYLAND_DISPLAY unset) or OpenCV has no GUI backend "
            "(opencv-python-headless); run without --show or install opencv-python"
        )
    return show


def run_live(
    predictor: Predictor,
    source_spec: str,
    options: LiveOptions | None = None,
    on_event: EventCallback = print,
) -> LiveSummary:
    """Runs the detector on a camera, stream, pipeline, video file or image folder.

    Args:
        predictor: Scores frames (``predict(frame_bgr) -> Result``).
        source_spec: SOURCE as typed on the command line (see ``edgead.runtime.capture.describe_source``).
        options: Display, logging, saving and stopping behaviour.
        on_event: Receives human-readable status lines (reconnects, why the loop stopped).

    Returns:
        Counts and timings of the session. Ctrl-C ends the loop cleanly and sets ``interrupted``.

    Raises:
        SourceError: The source cannot be classified or opened, a folder image is unreadable, or a live source
            could not be reconnected within ``max_reconnect_attempts``.
        RuntimeError: ``show=True`` but no window can be opened.
    """
    options = options or LiveOptions()
    show = _resolve_show(options.show)
    source = create_source(
        source_spec, skip_bad=options.skip_bad, on_event=on_event, stall_timeout_s=options.stall_timeout_s
    )
    reader = FrameReader(
        source, queue_size=options.queue_size, on_event=on_event, max_reconnect_attempts=options.max_reconnect_attempts
    )
    reader.start()  # SourceError for an unopenable source propagates before anything else is created

    summary = LiveSummary()
    log = _JsonLinesLog(options.log_path) if options.log_path is not None else None
    # Every log line says what produced it (export, method, backend, precision) when the predictor tells.
    running: dict[str, Any] = predictor.describe() if hasattr(predictor, "describe") else {}
    latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
    latency_total = 0.0
    mean_interval: float | None = None
    previous_time: float | None = None
    started = time.monotonic()
    window_open = False
    try:
        while options.max_frames is None or summary.frames < options.max_frames:
            try:
                frame = reader.get(timeout=_GET_TIMEOUT_S)
            except TimeoutError:
                if window_open and (reason := _poll_window(options.window_name)):
                    summary.stop_reason = reason
                    break
                continue
            if frame is None:
                summary.stop_reason = "end of source"
                break

            # The predictor decides (its threshold is the one override point: ``Detector.threshold``).
            result = predictor.predict(frame.image)
            now = time.monotonic()
            latency_ms = (now - frame.timestamp) * 1000.0
            latencies.append(latency_ms)
            latency_total += latency_ms
            if previous_time is not None:
                interval = now - previous_time
                # Exponential moving average of the frame-to-frame time: steady on screen, still follows changes.
                mean_interval = (
                    interval if mean_interval is None else mean_interval + _FPS_SMOOTHING * (interval - mean_interval)
                )
            previous_time = now
            fps = 1.0 / mean_interval if mean_interval else None
            summary.frames += 1
            summary.anomalies += int(result.is_anomaly)

            hud: np.ndarray | None = None
            if show or (result.is_anomaly and options.save_anomalies is not None):
                # Only render the HUD when someone looks at it: headless devices save the cost.
                vmin, vmax = options.map_range or (0.0, 2.0 * float(result.threshold))
                hud = draw_hud(frame.image, result, fps, latency_ms, vmin, vmax)
            saved: list[str] = []
            if result.is_anomaly and options.save_anomalies is not None and hud is not None:
                saved = _save_anomaly(options.save_anomalies, frame, hud, result.anomaly_map)
            if log is not None and (options.log_every_frame or result.is_anomaly):
                record = {**_log_record(frame, result, latency_ms, reader.dropped), **running}
                if saved:
                    record["saved"] = saved
                log.write(record)
            if show and hud is not None:
                if not window_open:
                    cv2.namedWindow(options.window_name, cv2.WINDOW_NORMAL)
                    window_open = True
                cv2.imshow(options.window_name, hud)
                if reason := _poll_window(options.window_name):
                    summary.stop_reason = reason
                    break
        else:
            summary.stop_reason = "max frames"
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.stop_reason = "interrupted"
    finally:
        reader.stop()
        if log is not None:
            log.close()
        if window_open:
            cv2.destroyWindow(options.window_name)
            cv2.waitKey(1)  # lets the GUI thread actually process the destroy

    summary.seconds = time.monotonic() - started
    summary.dropped = reader.dropped
    summary.reconnects = reader.reconnects
    summary.fps = summary.frames / summary.seconds if summary.seconds > 0 else 0.0
    if summary.frames:
        summary.mean_latency_ms = latency_total / summary.frames
        summary.median_latency_ms = statistics.median(latencies)
    on_event(f"stopped ({summary.stop_reason}): {summary.frames} frames, {summary.anomalies} anomalies")
    return summary


def _poll_window(window_name: str) -> str | None:
    """Pumps the GUI event loop; returns why to stop ("quit key", "window closed") or None to go on."""
    key = cv2.waitKey(1)
    if key != -1 and (key & 0xFF) in _QUIT_KEYS:
        return "quit key"
    try:
        if cv2.getWindowProperty(window_name, cv2.WND_PROP_VISIBLE) < 1:
            return "window closed"
    except cv2.error:  # some backends cannot report visibility; rely on the quit keys there
        pass
    return None
