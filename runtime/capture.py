"""A threaded, bounded reader over a frame source (torch-free; the sources are :mod:`edgead.runtime.sources`).

Live sources (cameras, streams, pipelines) drop the oldest queued frame when the consumer is slower than the
camera, so the detector always sees a recent frame, and they reconnect with exponential backoff when the feed
is lost. Finite sources (files, folders) never drop: the reader waits for the consumer, so every frame is
processed exactly once. A live source that keeps connecting but never yields a decodable frame (a hostile or
misconfigured stream) is given up after ``give_up_after_s`` instead of being re-opened for ever.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Any

from edgead.runtime.sources import (
    EventCallback,
    FolderSource,
    Frame,
    FrameSource,
    SourceError,
    VideoCaptureSource,
    create_source,
    describe_source,
)

__all__ = [
    "EventCallback",
    "Frame",
    "FolderSource",
    "FrameReader",
    "FrameSource",
    "SourceError",
    "VideoCaptureSource",
    "create_source",
    "describe_source",
]

_PUT_POLL_S = 0.05  # how often a blocked put re-checks the stop event


class _Failure:
    """Carries an exception from the capture thread to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()  # queued once when the source is exhausted


class FrameReader:
    """Reads a source on a background thread into a small queue.

    Usage::

        with FrameReader(create_source("0")) as reader:
            while (frame := reader.get(timeout=1.0)) is not None:
                ...
    """

    def __init__(
        self,
        source: FrameSource,
        queue_size: int = 2,
        on_event: EventCallback | None = None,
        max_reconnect_attempts: int | None = None,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 8.0,
        drop_oldest: bool | None = None,
        give_up_after_s: float | None = None,
    ) -> None:
        """Configures the reader; nothing is opened until :meth:`open` or :meth:`start`.

        Args:
            source: The frame source (not yet opened).
            queue_size: Frames buffered between capture and consumer; small keeps live latency low.
            on_event: Receives reconnect messages ("camera0 lost; reconnecting in 0.5 s (attempt 1)").
            max_reconnect_attempts: Give up a lost live source after this many failed re-opens (None: never).
            reconnect_delay: First wait before re-opening, in seconds; it doubles per failed attempt.
            max_reconnect_delay: Cap on the wait, in seconds.
            drop_oldest: Drop the oldest queued frame when full; None means True for live sources only.
            give_up_after_s: Live sources: raise SourceError once the source has been connected (open) for this
                many seconds, over any number of re-opens, without one decodable frame. None: never give up.
                Re-opens after a frameless connection keep backing off instead of restarting at
                ``reconnect_delay``.
        """
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if give_up_after_s is not None and not give_up_after_s > 0:  # also refuses NaN
            raise ValueError(f"give_up_after_s must be a positive number of seconds, got {give_up_after_s}")
        self.source = source
        self.on_event = on_event
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.drop_oldest = source.live if drop_oldest is None else drop_oldest
        self.give_up_after_s = None if give_up_after_s is None or math.isinf(give_up_after_s) else give_up_after_s
        self.frames_read = 0
        self.dropped = 0
        self.reconnects = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self._error: BaseException | None = None
        self._opened = False
        # Since when the source has been connected without giving a frame (None once a frame arrived), and over
        # how many connections: what give_up_after_s is measured on.
        self._frameless_since: float | None = None
        self._frameless_connections = 0
        self._backoff = reconnect_delay  # the next re-open's first wait

    @property
    def live(self) -> bool:
        """Whether the underlying source is live."""
        return self.source.live

    def open(self) -> FrameReader:
        """Opens the source in the caller's thread without starting the capture thread (:meth:`start` does
        both), so that a caller can prepare its outputs between the two; :meth:`stop` closes it again.

        Raises:
            SourceError: The source cannot be opened.
        """
        if not self._opened:
            self.source.open()
            self._opened = True
            self._connected()
        return self

    def start(self) -> FrameReader:
        """Opens the source in the caller's thread (unless :meth:`open` did), then starts capturing.

        Raises:
            SourceError: The source cannot be opened.
        """
        if self._thread is not None:
            raise RuntimeError("FrameReader.start() called twice")
        self.open()
        self._thread = threading.Thread(target=self._run, name=f"edgead-capture-{self.source.label}", daemon=True)
        self._thread.start()
        return self

    def get(self, timeout: float | None = None) -> Frame | None:
        """Returns the next frame, or None at the end of the stream.

        Args:
            timeout: Seconds to wait (None: wait for ever).

        Raises:
            TimeoutError: No frame arrived within ``timeout``.
            SourceError: Or any other exception raised while capturing (e.g. an unreadable image in a folder,
                a live source that could not be reconnected).
        """
        if self._finished:
            if self._error is not None:
                raise self._error
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame from {self.source.label} within {timeout} s") from None
        if item is _END:
            self._finished = True
            return None
        if isinstance(item, _Failure):
            self._finished = True
            self._error = item.error
            raise item.error
        return item

    def stop(self, timeout: float = 5.0) -> None:
        """Stops capturing and joins the thread (the source is closed by the thread on its way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            if self._thread.is_alive() and self.on_event is not None:
                # A driver stuck inside VideoCapture.read() cannot be interrupted; the daemon thread dies with us.
                self.on_event(f"{self.source.label}: capture thread did not stop within {timeout:g} s")
        else:
            self.source.close()

    def __enter__(self) -> FrameReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ capture thread
    def _emit(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def _connected(self) -> None:
        if self._frameless_since is None:
            self._frameless_since = time.monotonic()
        self._frameless_connections += 1

    def _check_give_up(self) -> None:
        """Raises SourceError when the source has been connected for ``give_up_after_s`` without a frame."""
        if self.give_up_after_s is None or self._frameless_since is None:
            return
        waited = time.monotonic() - self._frameless_since
        if waited >= self.give_up_after_s:
            raise SourceError(
                f"{self.source.label} connected {self._frameless_connections} time(s) but gave no decodable frame "
                f"in {waited:.0f} s; gave up after {self.give_up_after_s:g} s (is it a video stream in a format "
                "OpenCV decodes? check the URL and the camera's stream settings)"
            )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.read()
                if frame is None:
                    if not self.source.live:
                        self._put_blocking(_END)
                        return
                    self._check_give_up()
                    if not self._reconnect():
                        return  # stopped while waiting
                    continue
                self._frameless_since = None
                self._frameless_connections = 0
                self._backoff = self.reconnect_delay
                self.frames_read += 1
                if self.drop_oldest:
                    self._put_dropping_oldest(frame)
                else:
                    self._put_blocking(frame)
        except BaseException as exc:  # every failure must reach the consumer instead of dying with the thread
            self._put_blocking(_Failure(exc))
        finally:
            self.source.close()

    def _reconnect(self) -> bool:
        """Re-opens a lost live source with exponential backoff.

        Returns:
            True once reconnected, False if the reader was stopped meanwhile.

        Raises:
            SourceError: ``max_reconnect_attempts`` re-opens failed.
        """
        self.source.close()
        delay = self._backoff
        attempt = 0
        last_error: SourceError | None = None
        what = "lost" if self._frameless_since is None else "gave no decodable frame"
        while self.max_reconnect_attempts is None or attempt < self.max_reconnect_attempts:
            attempt += 1
            self._emit(f"{self.source.label} {what}; reconnecting in {delay:g} s (attempt {attempt})")
            if self._stop.wait(delay):
                return False
            try:
                self.source.open()
            except SourceError as exc:
                last_error = exc
                delay = min(delay * 2.0, self.max_reconnect_delay)
                continue
            self.reconnects += 1
            # Should this connection give no frame either, the next wait is longer (reset by the first frame).
            self._backoff = min(delay * 2.0, self.max_reconnect_delay)
            self._connected()
            self._emit(f"{self.source.label} reconnected")
            return True
        detail = f": {last_error}" if last_error is not None else ""
        raise SourceError(f"{self.source.label} lost and not reconnected after {attempt} attempt(s){detail}")

    def _put_blocking(self, item: Any) -> None:
        """Waits for room (backpressure) but gives up as soon as the reader is stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                continue

    def _put_dropping_oldest(self, frame: Frame) -> None:
        """Queues a frame, discarding the oldest queued one if full, so the consumer always gets fresh frames."""
        while True:
            try:
                self._queue.put_nowait(frame)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:  # the consumer took one in between; just retry the put
                    pass
