"""A threaded, bounded reader over a frame source (torch-free; the sources are :mod:`edgead.runtime.sources`).

Live sources (cameras, streams, pipelines) drop the oldest queued frame when the consumer is slower than the
camera, so the detector always sees a recent frame, and they reconnect with exponential backoff when the feed
is lost. Finite sources (files, folders) never drop: the reader waits for the consumer, so every frame is
processed exactly once.
"""

from __future__ import annotations

import queue
import threading
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
    ) -> None:
        """Configures the reader; nothing is opened until :meth:`start`.

        Args:
            source: The frame source (not yet opened).
            queue_size: Frames buffered between capture and consumer; small keeps live latency low.
            on_event: Receives reconnect messages ("camera0 lost; reconnecting in 0.5 s (attempt 1)").
            max_reconnect_attempts: Give up a lost live source after this many failed re-opens (None: never).
            reconnect_delay: First wait before re-opening, in seconds; it doubles per failed attempt.
            max_reconnect_delay: Cap on the wait, in seconds.
            drop_oldest: Drop the oldest queued frame when full; None means True for live sources only.
        """
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.source = source
        self.on_event = on_event
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.drop_oldest = source.live if drop_oldest is None else drop_oldest
        self.frames_read = 0
        self.dropped = 0
        self.reconnects = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False
        self._error: BaseException | None = None

    @property
    def live(self) -> bool:
        """Whether the underlying source is live."""
        return self.source.live

    def start(self) -> FrameReader:
        """Opens the source in the caller's thread, then starts capturing.

        Raises:
            SourceError: The source cannot be opened.
        """
        if self._thread is not None:
            raise RuntimeError("FrameReader.start() called twice")
        self.source.open()
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

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.read()
                if frame is None:
                    if not self.source.live:
                        self._put_blocking(_END)
                        return
                    if not self._reconnect():
                        return  # stopped while waiting
                    continue
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
        delay = self.reconnect_delay
        attempt = 0
        last_error: SourceError | None = None
        while self.max_reconnect_attempts is None or attempt < self.max_reconnect_attempts:
            attempt += 1
            self._emit(f"{self.source.label} lost; reconnecting in {delay:g} s (attempt {attempt})")
            if self._stop.wait(delay):
                return False
            try:
                self.source.open()
            except SourceError as exc:
                last_error = exc
                delay = min(delay * 2.0, self.max_reconnect_delay)
                continue
            self.reconnects += 1
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
