"""Tests for edgead.runtime.capture: source classification, folder/video sources, reconnects and queue policy."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgead.data.io import write_image_atomic
from edgead.runtime.capture import (
    FolderSource,
    Frame,
    FrameReader,
    FrameSource,
    SourceError,
    VideoCaptureSource,
    create_source,
    describe_source,
)


def _write_images(folder: Path, count: int, size: tuple[int, int] = (24, 32)) -> list[np.ndarray]:
    """Writes ``count`` distinct RGB PNGs named so that name order is frame order; returns their pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        rgb = np.zeros((*size, 3), dtype=np.uint8)
        rgb[..., 0] = 10 * index  # red channel encodes the index: catches RGB/BGR mix-ups
        rgb[..., 2] = 200
        write_image_atomic(folder / f"img_{index:03d}.png", rgb)
        images.append(rgb)
    return images


def _write_video(path: Path, count: int, size: tuple[int, int] = (48, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size[1], size[0]))
    assert writer.isOpened()
    for index in range(count):
        writer.write(np.full((*size, 3), (20 * index) % 250, dtype=np.uint8))
    writer.release()


def _drain(reader: FrameReader, timeout: float = 5.0) -> list[Frame]:
    frames = []
    while (frame := reader.get(timeout=timeout)) is not None:
        frames.append(frame)
    return frames


# ------------------------------------------------------------------------------------------ describe_source
def test_describe_source_classifies_every_kind(tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    video.write_bytes(b"not checked here")
    image = tmp_path / "part.png"
    image.write_bytes(b"x")
    assert describe_source("0") == ("camera", 0)
    assert describe_source(" 12 ") == ("camera", 12)
    assert describe_source(str(tmp_path)) == ("folder", tmp_path)
    assert describe_source(str(video)) == ("video", video)
    assert describe_source(str(image)) == ("image", image)
    for url in ("rtsp://cam.local/stream1", "rtmp://x/live", "http://x/mjpg", "HTTPS://x/v.m3u8"):
        assert describe_source(url) == ("stream", url)
    pipeline = "videotestsrc ! videoconvert ! appsink"
    assert describe_source(pipeline) == ("gstreamer", pipeline)


def test_describe_source_rejects_junk_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a camera index, a video file, a folder of images"):
        describe_source("banana")
    with pytest.raises(SourceError, match="no file or folder exists") as info:
        describe_source(str(tmp_path / "missing.mp4"))
    assert "missing.mp4" in str(info.value)


def test_stream_credentials_never_appear_in_labels() -> None:
    source = create_source("rtsp://admin:secret@10.0.0.5/stream")
    assert "secret" not in source.label and "10.0.0.5" in source.label


# ------------------------------------------------------------------------------------------ folder source
def test_folder_source_reads_sorted_images_as_bgr(tmp_path: Path) -> None:
    images = _write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "readme.txt").write_text("ignored: not an image extension")
    with FrameReader(create_source(str(tmp_path / "imgs"))) as reader:
        assert not reader.live
        frames = _drain(reader)
    assert [frame.name for frame in frames] == [f"img_{i:03d}.png" for i in range(4)]
    assert [frame.index for frame in frames] == [0, 1, 2, 3]
    for frame, rgb in zip(frames, images, strict=True):
        np.testing.assert_array_equal(frame.image, rgb[..., ::-1])  # BGR out
    assert reader.frames_read == 4 and reader.dropped == 0


def test_single_image_is_a_one_frame_source(tmp_path: Path) -> None:
    _write_images(tmp_path, 1)
    with FrameReader(create_source(str(tmp_path / "img_000.png"))) as reader:
        assert len(_drain(reader)) == 1


@pytest.mark.parametrize("bad_bytes", [b"these are notes, not pixels", "truncated"])
def test_bad_file_in_folder_raises_through_get(tmp_path: Path, bad_bytes: Any) -> None:
    _write_images(tmp_path, 3)
    bad = tmp_path / "img_001b.png"
    if bad_bytes == "truncated":
        bad_bytes = (tmp_path / "img_000.png").read_bytes()[:-20]
    bad.write_bytes(bad_bytes)
    reader = FrameReader(create_source(str(tmp_path))).start()
    try:
        assert reader.get(timeout=5).name == "img_000.png"
        assert reader.get(timeout=5).name == "img_001.png"
        with pytest.raises(SourceError, match="img_001b.png"):
            reader.get(timeout=5)
        with pytest.raises(SourceError):  # the failure is sticky, not turned into a silent end of stream
            reader.get(timeout=5)
    finally:
        reader.stop()


def test_skip_bad_skips_and_reports(tmp_path: Path) -> None:
    _write_images(tmp_path, 2)
    (tmp_path / "img_000b.png").write_bytes(b"junk")
    events: list[str] = []
    with FrameReader(FolderSource(tmp_path, skip_bad=True, on_event=events.append)) as reader:
        frames = _drain(reader)
    assert [frame.name for frame in frames] == ["img_000.png", "img_001.png"]
    assert len(events) == 1 and "img_000b.png" in events[0]


def test_empty_folder_is_an_error_from_start(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="contains no images"):
        FrameReader(create_source(str(tmp_path))).start()


# ------------------------------------------------------------------------------------------ video sources
def test_video_file_delivers_every_frame(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    _write_video(video, 12)
    source = create_source(str(video))
    assert isinstance(source, VideoCaptureSource) and not source.live
    with FrameReader(source, queue_size=1) as reader:
        frames = []
        while (frame := reader.get(timeout=5)) is not None:
            time.sleep(0.005)  # slower than the decoder: a finite source must wait, not drop
            frames.append(frame)
    assert len(frames) == 12 and reader.dropped == 0
    assert [frame.index for frame in frames] == list(range(12))
    assert all(frame.name == "clip.avi" and frame.image.shape == (48, 64, 3) for frame in frames)
    assert abs(float(frames[5].image.mean()) - 100.0) < 8  # JPEG-compressed grey level 20 * 5


@pytest.mark.parametrize("suffix", [".avi", ".mkv"])
def test_a_truncated_video_is_reported_after_its_frames(tmp_path: Path, suffix: str) -> None:
    """A file cut in half delivers the frames it still has, then says it is truncated instead of ending."""
    video = tmp_path / f"clip{suffix}"
    _write_video(video, 40)
    whole = video.read_bytes()
    video.write_bytes(whole[: len(whole) // 2])
    reader = FrameReader(create_source(str(video))).start()
    try:
        frames = []
        with pytest.raises(SourceError, match=rf"clip{suffix} ended after (\d+) of the 40 frames.*truncated"):
            while (frame := reader.get(timeout=5)) is not None:
                frames.append(frame)
        assert 0 < len(frames) < 38
    finally:
        reader.stop()
    video.write_bytes(whole)
    with FrameReader(create_source(str(video))) as complete:
        assert len(_drain(complete)) == 40  # the whole file still ends normally


def test_stall_timeout_ends_a_stalled_stream_read(tmp_path: Path) -> None:
    """A real HTTP MJPEG stream that sends 5 frames and then goes silent: with a 1 s stall timeout the read
    fails after about a second (so a live source reconnects) instead of OpenCV's 30 s."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    release = threading.Event()

    class Stalling(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
            for _ in range(5):
                self.wfile.write(part + jpeg.tobytes() + b"\r\n")
                self.wfile.flush()
            release.wait(60)  # the stall: connection open, no data

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = create_source(f"http://127.0.0.1:{server.server_address[1]}/feed.mjpg", stall_timeout_s=1.0)
        assert isinstance(source, VideoCaptureSource) and source.live
        source.open()
        frames = [source.read() for _ in range(5)]
        assert all(frame is not None for frame in frames)
        start = time.monotonic()
        assert source.read() is None  # the stalled read gives up
        assert time.monotonic() - start < 10
        source.close()
    finally:
        release.set()
        server.shutdown()
    with pytest.raises(ValueError, match="stall timeout"):
        create_source("rtsp://cam/x", stall_timeout_s=0)


def test_unopenable_camera_raises_from_start() -> None:
    reader = FrameReader(create_source("97"))
    with pytest.raises(SourceError, match="camera97"):
        reader.start()


def test_undecodable_video_file_raises_from_start(tmp_path: Path) -> None:
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00" * 64)
    with pytest.raises(SourceError, match="broken.mp4"):
        FrameReader(create_source(str(video))).start()


def test_gstreamer_error_mentions_missing_build_support() -> None:
    if re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()):
        pytest.skip("this OpenCV has GStreamer; the message under test is for builds without it")
    with pytest.raises(SourceError, match="no GStreamer support"):
        FrameReader(create_source("videotestsrc num-buffers=1 ! videoconvert ! appsink")).start()


# ------------------------------------------------------------------------------------------ fakes
class _FakeCapture:
    """Stands in for cv2.VideoCapture: yields ``frames_before_failure`` frames, then read() fails."""

    def __init__(self, opened: bool, frames_before_failure: int | None, delay: float = 0.0) -> None:
        self.opened = opened
        self.remaining = frames_before_failure
        self.delay = delay

    def isOpened(self) -> bool:  # noqa: N802 - mirrors the OpenCV API
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.delay:
            time.sleep(self.delay)
        if self.remaining is not None:
            if self.remaining <= 0:
                return False, None
            self.remaining -= 1
        return True, np.zeros((8, 8, 3), dtype=np.uint8)

    def release(self) -> None:
        self.opened = False


class _FlakyCamera(VideoCaptureSource):
    """A live camera whose open attempts follow ``open_plan`` (True = opens) and which fails after N frames."""

    def __init__(self, open_plan: list[bool], frames_per_connection: int | None, delay: float = 0.0) -> None:
        super().__init__("camera", 0)
        self.open_plan = list(open_plan)
        self.frames_per_connection = frames_per_connection
        self.delay = delay
        self.open_calls = 0

    def _create_capture(self) -> Any:
        self.open_calls += 1
        opened = self.open_plan.pop(0) if self.open_plan else False
        return _FakeCapture(opened, self.frames_per_connection, self.delay)


def test_live_source_reconnects_and_continues() -> None:
    # Opens, loses the feed after 3 frames, fails one re-open, succeeds on the second, loses it again for good.
    camera = _FlakyCamera([True, False, True], frames_per_connection=3)
    events: list[str] = []
    reader = FrameReader(
        camera, queue_size=10, on_event=events.append, max_reconnect_attempts=2, reconnect_delay=0.01
    ).start()
    frames: list[Frame] = []
    try:
        with pytest.raises(SourceError, match="camera0 lost and not reconnected after 2 attempt"):
            while True:
                frame = reader.get(timeout=5)
                assert frame is not None
                frames.append(frame)
    finally:
        reader.stop()
    assert [frame.index for frame in frames] == list(range(6))  # indices keep counting across the reconnect
    assert [frame.name for frame in frames][3] == "camera0#3"
    assert reader.reconnects == 1
    assert events[:3] == [
        "camera0 lost; reconnecting in 0.01 s (attempt 1)",
        "camera0 lost; reconnecting in 0.02 s (attempt 2)",
        "camera0 reconnected",
    ]


def test_backoff_doubles_up_to_the_cap() -> None:
    camera = _FlakyCamera([True], frames_per_connection=0)
    events: list[str] = []
    reader = FrameReader(
        camera, on_event=events.append, max_reconnect_attempts=4, reconnect_delay=0.001, max_reconnect_delay=0.004
    ).start()
    with pytest.raises(SourceError, match="lost"):
        reader.get(timeout=5)
    reader.stop()
    delays = [event.split(" in ")[1].split(" s")[0] for event in events]
    assert delays == ["0.001", "0.002", "0.004", "0.004"]


def test_single_failed_reconnect_ends_with_lost_error() -> None:
    camera = _FlakyCamera([True], frames_per_connection=2)
    reader = FrameReader(camera, max_reconnect_attempts=1, reconnect_delay=0.001).start()
    assert reader.get(timeout=5) is not None and reader.get(timeout=5) is not None
    with pytest.raises(SourceError, match="lost"):
        reader.get(timeout=5)
    reader.stop()
    assert camera.open_calls == 2


def test_live_source_drops_oldest_with_slow_consumer() -> None:
    camera = _FlakyCamera([True], frames_per_connection=None, delay=0.0005)
    reader = FrameReader(camera, queue_size=2).start()
    indices = []
    try:
        for _ in range(15):
            frame = reader.get(timeout=5)
            assert frame is not None
            indices.append(frame.index)
            time.sleep(0.01)  # the consumer is ~20x slower than the camera
    finally:
        started = time.monotonic()
        reader.stop()
        assert time.monotonic() - started < 1.0  # stop() never hangs on a full queue
    assert reader.dropped > 0
    assert all(later > earlier for earlier, later in zip(indices, indices[1:], strict=False))
    assert indices[-1] - indices[0] > len(indices)  # frames were skipped to stay current


class _CountingSource(FrameSource):
    """A fast finite source of ``count`` tiny frames."""

    label = "counter"

    def __init__(self, count: int) -> None:
        self.count = count
        self.position = 0

    @property
    def live(self) -> bool:
        return False

    def open(self) -> None:
        self.position = 0

    def read(self) -> Frame | None:
        if self.position >= self.count:
            return None
        self.position += 1
        return Frame(np.zeros((4, 4, 3), np.uint8), self.position - 1, time.monotonic(), f"f{self.position - 1}")


def test_finite_source_never_drops_with_slow_consumer() -> None:
    with FrameReader(_CountingSource(30), queue_size=2) as reader:
        indices = []
        while (frame := reader.get(timeout=5)) is not None:
            indices.append(frame.index)
            time.sleep(0.002)
    assert indices == list(range(30)) and reader.dropped == 0
    assert reader.get(timeout=0.1) is None  # stays at end of stream


def test_stop_with_full_queue_returns_quickly() -> None:
    reader = FrameReader(_CountingSource(1000), queue_size=1).start()
    time.sleep(0.05)  # the producer is now blocked on the full queue
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 1.0
    assert reader._thread is not None and not reader._thread.is_alive()


def test_get_times_out_with_timeout_error() -> None:
    camera = _FlakyCamera([True], frames_per_connection=None, delay=0.5)
    reader = FrameReader(camera).start()
    try:
        with pytest.raises(TimeoutError):
            reader.get(timeout=0.01)
    finally:
        reader.stop()
