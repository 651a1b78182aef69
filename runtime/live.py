"""The camera loop behind ``edgead run``: capture -> predict -> log / save / show, until told to stop.

Torch-free. The loop depends only on the tiny :class:`Predictor` protocol (``predict(frame_bgr) -> Result``), so
any detector or a test double plugs in.

What the loop guarantees, so that the log and the saved evidence can be trusted after any ending:

- Outputs (written by :mod:`edgead.runtime.outputs`) are checked before the source opens (:func:`check_outputs`:
  a folder given as the log, a file given as the evidence folder, a read-only or full file system) and opened
  before the capture thread starts; a failure is an :class:`OutputError` naming the path, never a traceback
  with a capture thread still running.
- A log line is one ``write()`` of the whole line; a write that fails part-way (disk full, read-only remount,
  I/O error) is cut back, so the log ends with a complete line, and the run stops with an :class:`OutputError`.
- An alarm's files are written under temporary names, then its log line, then renamed into place, with SIGINT
  and SIGTERM held off for those few milliseconds: every saved file has its log line and every file a line
  names exists. A frame (and an alarm) is counted only once that is done.
- SIGINT (Ctrl-C) and SIGTERM end the loop at once otherwise, with ``stop_reason`` "interrupted" or
  "terminated"; the capture thread is stopped and joined on every way out.
"""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from edgead.runtime.capture import EventCallback, FrameReader, create_source
from edgead.runtime.drift import DEFAULT_WINDOW as DEFAULT_DRIFT_WINDOW
from edgead.runtime.drift import DriftWatch
from edgead.runtime.follow import export_version
from edgead.runtime.outputs import OutputError, Outputs, check_output, encode_evidence, log_record, utc_now
from edgead.runtime.overlay import draw_hud, has_display, why_no_window
from edgead.runtime.result import Result

__all__ = ["LiveOptions", "LiveSummary", "OutputError", "Predictor", "check_outputs", "run_live"]

_FPS_SMOOTHING = 0.1  # weight of the newest frame interval in the FPS moving average
_LATENCY_WINDOW = 10_000  # the median is taken over the most recent frames so memory stays bounded on 24/7 runs
_GET_TIMEOUT_S = 0.1  # wake up this often without frames to keep the window responsive
_QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc
#: Live sources: seconds connected without a decodable frame before the run gives up (engineering choice: far
#: above a camera's first keyframe, a few seconds; far below "for ever").
DEFAULT_GIVE_UP_AFTER_S = 60.0


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
        max_frames: Stop after this many processed frames (>= 1); None = until the source ends or Ctrl-C.
        queue_size: Frames buffered between capture and inference (small keeps live latency low).
        window_name: Title of the display window.
        map_range: Fixed (vmin, vmax) for heatmap colours; None = (0, 2 x threshold).
        skip_bad: Folder sources: skip unreadable images instead of stopping with an error.
        max_reconnect_attempts: Live sources: give up after this many failed re-opens; None = retry for ever.
        stall_timeout_s: Streams and videos: seconds without a packet before a read fails and a stream
            reconnects; None = OpenCV's default (30 s).
        give_up_after_s: Live sources: stop with a SourceError once the source has been connected this many
            seconds, over any number of reconnects, without one decodable frame (a stream of garbage, a camera
            that opens but sends nothing); None or infinity = never.
        web: The live page (``edgead.runtime.web.LiveWeb``, started by the caller) handed every result; None =
            no page.
        follow: An ``edgead.runtime.follow.ExportFollower`` (``run --follow``): a newer verified export version
            is taken between two frames; None = the export loaded at the start, for the whole run.
        drift_window: Frames in the drift watch's window (``edgead.runtime.drift``); None = no watch.

    Raises:
        ValueError: A number is out of range (the message names the field and the value).
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
    give_up_after_s: float | None = DEFAULT_GIVE_UP_AFTER_S
    web: Any = None
    follow: Any = None
    drift_window: int | None = DEFAULT_DRIFT_WINDOW

    def __post_init__(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.max_reconnect_attempts is not None and self.max_reconnect_attempts < 0:
            raise ValueError(f"max_reconnect_attempts must be >= 0, got {self.max_reconnect_attempts}")
        if self.stall_timeout_s is not None and not (math.isfinite(self.stall_timeout_s) and self.stall_timeout_s > 0):
            raise ValueError(f"stall_timeout_s must be a positive number of seconds, got {self.stall_timeout_s}")
        if self.drift_window is not None and self.drift_window < 10:
            raise ValueError(f"drift_window must be at least 10 frames, got {self.drift_window}")
        if self.give_up_after_s is not None and not self.give_up_after_s > 0:  # "not >" also refuses NaN
            raise ValueError(f"give_up_after_s must be a positive number of seconds, got {self.give_up_after_s}")


@dataclass
class LiveSummary:
    """What a :func:`run_live` session did.

    Attributes:
        frames: Frames processed by the predictor (and logged, when there is a log).
        anomalies: Frames judged anomalous (with their log line and evidence written).
        dropped: Frames the reader discarded to stay live (always 0 for files and folders).
        reconnects: Successful reconnects of a live source.
        seconds: Wall time from the first frame request to the end.
        fps: ``frames / seconds``.
        mean_latency_ms: Mean capture-to-result latency.
        median_latency_ms: Median capture-to-result latency over the most recent 10,000 frames.
        interrupted: Stopped by Ctrl-C (KeyboardInterrupt, SIGINT) or SIGTERM.
        stop_reason: "end of source", "max frames", "quit key", "window closed", "interrupted" or "terminated".
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


def check_outputs(options: LiveOptions) -> None:
    """Checks, leaving nothing behind, that the log and the evidence folder can be written: the log is not a
    folder, the evidence folder is not a file, the nearest existing folder above each takes a file (not a
    read-only file system, not without permission) and has at least 1 MiB free.

    With ``show=True`` it also checks that a window can open (a GUI OpenCV build and a display), so that
    ``run --show`` fails at once with the command that fixes it.

    Raises:
        OutputError: Names the path and what is wrong with it.
        RuntimeError: ``show=True`` where no window can open (says why and what to do).
    """
    if options.log_path is not None:
        check_output(Path(options.log_path), f"the log {options.log_path}", folder=False)
    if options.save_anomalies is not None:
        check_output(Path(options.save_anomalies), f"the anomaly folder {options.save_anomalies}", folder=True)
    _resolve_show(options.show)  # --show without a window backend or a display fails before the detector loads


# ------------------------------------------------------------------------------------------ signals
class _Stop(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread (a KeyboardInterrupt, so Ctrl-C handling covers both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """Turns SIGINT, SIGTERM (and Windows' SIGBREAK) into :class:`_Stop` while the loop runs, except inside
    :meth:`held` (the commit of one frame's log line and files), where the first signal takes effect right after.

    Handlers can only be installed from the main thread; elsewhere nothing changes. A signal the process
    ignores (a background job's SIGINT) stays ignored, and the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self._held = 0
        self._pending: int | None = None
        self.stopping = False  # set once the loop is ending: later signals must not cut the cleanup short
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
                signum = getattr(signal, name, None)
                if signum is None or signal.getsignal(signum) is signal.SIG_IGN:
                    continue
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        if self.stopping:
            return
        if self._held and self._pending is None:
            self._pending = signum
            return
        # Not held, or a second signal while a commit hangs (a stalled network drive): stop now; the commit
        # rolls its files and line back, so the log and the folder still agree.
        self.stopping = True
        raise _Stop(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Defers SIGINT/SIGTERM until the block is done (not on its failure: that ends the run anyway)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending is not None and not self.stopping:
            signum, self._pending = self._pending, None
            self.stopping = True
            raise _Stop(signum)


def _resolve_show(show: bool | None) -> bool:
    if show is None:
        return has_display()
    reason = why_no_window() if show else None
    if reason is not None:
        raise RuntimeError(f"cannot show a window (--show): {reason}")
    return show


# ------------------------------------------------------------------------------------------ the loop
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
        Counts and timings of the session. Ctrl-C (SIGINT) and SIGTERM end the loop cleanly and set
        ``interrupted``.

    Raises:
        OutputError: The log or the evidence folder cannot be written (checked before the source opens), or a
            write failed during the run (the run stops; the log ends with its last complete line).
        SourceError: The source cannot be classified or opened, a folder image is unreadable, a live source
            could not be reconnected within ``max_reconnect_attempts``, or it gave no decodable frame within
            ``give_up_after_s``.
        RuntimeError: ``show=True`` but no window can be opened.
    """
    options = options or LiveOptions()
    show = _resolve_show(options.show)
    check_outputs(options)  # before the source opens: a bad path costs nothing and leaves nothing behind
    source = create_source(
        source_spec, skip_bad=options.skip_bad, on_event=on_event, stall_timeout_s=options.stall_timeout_s
    )
    reader = FrameReader(
        source,
        queue_size=options.queue_size,
        on_event=on_event,
        max_reconnect_attempts=options.max_reconnect_attempts,
        give_up_after_s=options.give_up_after_s,
    )

    summary = LiveSummary()
    outputs: Outputs | None = None
    # Every log line says what produced it (export, method, backend, precision) when the predictor tells.
    running: dict[str, Any] = _running(predictor)
    watch = _drift_watch(predictor, options.drift_window, on_event)
    events: deque[dict[str, Any]] = deque()  # from the follower's thread; written by the loop, between frames
    if options.follow is not None:
        options.follow.on_event = events.append
    latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
    latency_total = 0.0
    mean_interval: float | None = None
    previous_time: float | None = None
    started = time.monotonic()
    window_open = False
    with _StopSignals() as signals:
        try:
            reader.open()  # SourceError for an unopenable source propagates before any output is created
            if options.web is not None:
                options.web.set_info(source=source.label, **running)
            # OutputError here still precedes the capture thread
            outputs = Outputs(options.save_anomalies, options.log_path, options.log_every_frame)
            reader.start()
            started = time.monotonic()  # the first frame request: opening a stream is not frame time
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

                if options.follow is not None and (swap := options.follow.take()) is not None:
                    previous, retired, (version, predictor) = running.get("version"), predictor, swap
                    running = _running(predictor)
                    watch = _drift_watch(predictor, options.drift_window, on_event)
                    events.append({"event": "export switched", "from": previous, "to": version})
                    if hasattr(retired, "close"):
                        retired.close()
                # The predictor decides (its threshold is the one override point: ``Detector.threshold``).
                result = predictor.predict(frame.image)
                if watch is not None and (drift := watch.update(float(result.score))) is not None:
                    events.append(drift)
                    if options.web is not None:
                        options.web.set_info(drift=drift["event"])
                now = time.monotonic()
                latency_ms = (now - frame.timestamp) * 1000.0
                latencies.append(latency_ms)
                latency_total += latency_ms
                if previous_time is not None:
                    interval = now - previous_time
                    # Exponential moving average of the frame-to-frame time: steady on screen, still follows changes.
                    mean_interval = (
                        interval
                        if mean_interval is None
                        else mean_interval + _FPS_SMOOTHING * (interval - mean_interval)
                    )
                previous_time = now
                fps = 1.0 / mean_interval if mean_interval else None

                hud: np.ndarray | None = None
                if show or outputs.wants_evidence(result):
                    # Only render the HUD when someone looks at it: headless devices save the cost.
                    vmin, vmax = options.map_range or (0.0, 2.0 * float(result.threshold))
                    hud = draw_hud(frame.image, result, fps, latency_ms, vmin, vmax)
                evidence = None
                if hud is not None and outputs.wants_evidence(result):
                    evidence = encode_evidence(frame.image, hud, result.anomaly_map)  # slow part: not held
                record = None
                if outputs.wants_line(result):
                    record = {**log_record(frame, result, latency_ms, reader.dropped), **running}
                with signals.held():  # the frame's line and files are written, and counted, or not at all
                    saved = outputs.commit(frame, record, evidence)
                    summary.frames += 1
                    summary.anomalies += int(bool(result.is_anomaly))
                while events:  # drift, a switched or refused export: after the frame's own line
                    event = {"time": utc_now(), "frame": frame.index, **events.popleft()}
                    with signals.held():
                        outputs.event({**event, **running})
                    on_event(" ".join(f"{k}={v}" for k, v in event.items() if k != "time"))
                if options.web is not None:  # hands over references; the page's server does the rest
                    alarm = None
                    if saved:
                        line = record or {**log_record(frame, result, latency_ms, reader.dropped), **running}
                        alarm = {**line, "saved": saved}
                    counters = {"frames": summary.frames, "anomalies": summary.anomalies, "fps": fps}
                    counters.update(dropped=reader.dropped, reconnects=reader.reconnects)
                    options.web.publish(frame.image, result, counters, latency_ms, alarm)
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
        except KeyboardInterrupt as stop:
            summary.interrupted = True
            terminated = isinstance(stop, _Stop) and stop.signum == signal.SIGTERM
            summary.stop_reason = "terminated" if terminated else "interrupted"
        except OutputError as err:
            if summary.frames:
                raise OutputError(f"{err}; the run stopped after {summary.frames} frames") from err.__cause__
            raise
        finally:
            signals.stopping = True
            reader.stop()  # joins the capture thread (and closes the source) on every way out
            if outputs is not None:
                outputs.close()
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


def _running(predictor: Any) -> dict[str, Any]:
    """What every log line says produced it: export, its version, method, backend, precision."""
    running: dict[str, Any] = predictor.describe() if hasattr(predictor, "describe") else {}
    if running.get("export") and not running.get("version"):  # a predictor that does not say its version
        running["version"] = export_version(running["export"])
    return running


def _drift_watch(predictor: Any, window: int | None, on_event: EventCallback) -> DriftWatch | None:
    """The drift watch on the predictor's calibration (the INT8 graph's own for INT8), or None with a line why."""
    if window is None:
        return None
    meta = getattr(predictor, "metadata", None)
    if meta is None:
        return None  # a remote predictor (Triton): its calibration is not here
    quantiles = meta.calibration(getattr(predictor, "precision", "fp32")).get("normal_quantiles")
    if not isinstance(quantiles, dict):
        on_event("drift watch off: this export stores no normal score quantiles (re-export with this edgead)")
        return None
    return DriftWatch(quantiles, window)


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
