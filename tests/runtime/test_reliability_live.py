"""Reliability of ``edgead run`` (issue 25): bad output paths, full and read-only file systems, signals, hostile
streams, out-of-range options and odd sources end in a clear error or a clean stop, never a traceback or a hang,
and the log and the saved evidence always agree."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.data.io import write_image_atomic
from edgead.runtime import live, outputs
from edgead.runtime.capture import FrameReader, SourceError, VideoCaptureSource, describe_source
from edgead.runtime.live import LiveOptions, OutputError, run_live
from edgead.runtime.result import Result

runner = CliRunner()
POSIX_SIGNALS = pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals to a process")


# ------------------------------------------------------------------------------------------ helpers
class AlwaysAlarm:
    """Scores every frame as an anomaly (so that every frame saves evidence) and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, frame_bgr: np.ndarray) -> Result:
        self.calls += 1
        grey = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return Result(float(grey.mean()) + 1.0, grey[::4, ::4].copy(), True, 0.5, {"infer": 1.0})


def _folder(path: Path, count: int = 6) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        write_image_atomic(path / f"f_{index:02d}.png", np.full((16, 24, 3), 20 * index, np.uint8))
    return path


def _log_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    assert text == "" or text.endswith("\n"), "the log ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def _assert_log_and_evidence_agree(log: Path, folder: Path) -> list[dict]:
    """Every file in the evidence folder is named by a log line, every named file exists, no temporary is left."""
    lines = _log_lines(log)
    named = sorted(name for line in lines for name in line.get("saved", []))
    present = sorted(path.name for path in folder.iterdir()) if folder.exists() else []
    assert not [name for name in present if name.startswith(".")], f"temporary files left: {present}"
    assert named == present
    assert all(len(line["saved"]) == 3 for line in lines if line["is_anomaly"])
    return lines


def _capture_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("edgead-capture")]


# ------------------------------------------------------------------------------------------ case 1: the log
def test_a_log_path_that_is_a_folder_is_refused_before_the_source_opens(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    predictor = AlwaysAlarm()
    with pytest.raises(OutputError, match=r"the log .*logs: it is a folder"):
        run_live(predictor, str(_folder(tmp_path / "imgs")), LiveOptions(show=False, log_path=tmp_path / "logs"))
    assert predictor.calls == 0 and not _capture_threads()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OutputError, match=r"plain is a file, not a folder"):
        run_live(predictor, str(tmp_path / "imgs"), LiveOptions(show=False, log_path=tmp_path / "plain" / "r.jsonl"))

    # Through the command line: a one-line error before the detector is even loaded (no export needed).
    result = runner.invoke(
        app, ["run", "--camera", str(tmp_path / "imgs"), "--export", str(tmp_path / "none"), "--log", str(tmp_path)]
    )
    assert result.exit_code == 2 and "it is a folder" in result.output and str(tmp_path) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("what", ["log", "anomalies"])
def test_read_only_and_full_file_systems_are_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """Root ignores permissions and no test can remount, so the file system's answer is simulated at the one
    place it is asked."""
    source = str(_folder(tmp_path / "imgs"))
    target = tmp_path / "out" / ("run.jsonl" if what == "log" else "alarms")
    options = LiveOptions(show=False, **({"log_path": target} if what == "log" else {"save_anomalies": target}))
    predictor = AlwaysAlarm()
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "_write_error", lambda path: OSError(errno.EROFS, os.strerror(errno.EROFS)))
        with pytest.raises(OutputError, match=rf"{target.name}: .* is on a read-only file system"):
            run_live(predictor, source, options)
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "_free_bytes", lambda folder: 512)
        with pytest.raises(OutputError, match=rf"{target.name}: no space left .*512 bytes free"):
            run_live(predictor, source, options)
    assert predictor.calls == 0 and not (tmp_path / "out").exists() and not _capture_threads()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_a_folder_without_write_permission_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            run_live(AlwaysAlarm(), str(_folder(tmp_path / "imgs")), LiveOptions(show=False, log_path=locked / "r"))
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_a_log_write_failing_mid_run_stops_cleanly_with_whole_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The 4th line gets half-written, then the device fails: the half line is cut off, the run stops with the
    reason, the capture thread is joined, and every saved alarm still has its line."""
    real_write = outputs.JsonLinesLog._write_chunk
    calls = 0

    def failing(self: Any, view: memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 4:
            return real_write(self, view[: len(view) // 2])
        if calls > 4:
            raise OSError(code, os.strerror(code))
        return real_write(self, view)

    monkeypatch.setattr(outputs.JsonLinesLog, "_write_chunk", failing)
    log, alarms = tmp_path / "run.jsonl", tmp_path / "alarms"
    options = LiveOptions(show=False, log_path=log, save_anomalies=alarms)
    with pytest.raises(OutputError) as info:
        run_live(AlwaysAlarm(), str(_folder(tmp_path / "imgs")), options, on_event=lambda _: None)
    message = str(info.value)
    assert str(log) in message and errno.errorcode[code] in message and "stopped after 3 frames" in message
    assert len(_assert_log_and_evidence_agree(log, alarms)) == 3
    assert not _capture_threads()


def test_an_evidence_write_failing_mid_run_leaves_no_orphan_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = outputs.write_file
    writes = 0

    def disk_full_on_the_8th_file(path: Path, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes == 8:  # the second file of the third alarm
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(outputs, "write_file", disk_full_on_the_8th_file)
    log, alarms = tmp_path / "run.jsonl", tmp_path / "alarms"
    with pytest.raises(OutputError, match=r"the anomaly folder .*alarms: No space left on device \(ENOSPC\)"):
        run_live(
            AlwaysAlarm(),
            str(_folder(tmp_path / "imgs")),
            LiveOptions(show=False, log_path=log, save_anomalies=alarms),
            on_event=lambda _: None,
        )
    assert len(_assert_log_and_evidence_agree(log, alarms)) == 2


# ------------------------------------------------------------------------------------------ case 2: evidence folder
def test_an_anomaly_folder_that_is_a_file_is_refused_before_the_run(tmp_path: Path) -> None:
    taken = tmp_path / "alarms"
    taken.write_text("a file")
    with pytest.raises(OutputError, match=r"alarms: it is a file, not a folder"):
        run_live(AlwaysAlarm(), str(_folder(tmp_path / "imgs")), LiveOptions(show=False, save_anomalies=taken))
    result = runner.invoke(
        app, ["run", "--camera", str(tmp_path / "imgs"), "--export", str(tmp_path), "--save-anomalies", str(taken)]
    )
    assert result.exit_code == 2 and "it is a file, not a folder" in result.output and "alarms" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ case 3: signals
@POSIX_SIGNALS
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_alarms_commit_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """The signal lands while the third alarm's files are being written: that alarm is finished (files, line,
    count), then the loop stops at once."""
    real_write = outputs.write_file
    writes = 0

    def signal_mid_commit(path: Path, data: bytes) -> None:
        nonlocal writes
        writes += 1
        real_write(path, data)
        if writes == 8:
            os.kill(os.getpid(), signum)

    def not_handled(*_: object) -> None:  # instead of SIGTERM's default, which would end pytest itself
        raise AssertionError("run_live left the signal to the previous handler")

    monkeypatch.setattr(outputs, "write_file", signal_mid_commit)
    log, alarms = tmp_path / "run.jsonl", tmp_path / "alarms"
    previous = signal.signal(signum, not_handled)
    try:
        summary = run_live(
            AlwaysAlarm(),
            str(_folder(tmp_path / "imgs")),
            LiveOptions(show=False, log_path=log, save_anomalies=alarms),
            on_event=lambda _: None,
        )
        assert signal.getsignal(signum) is not_handled  # the previous handler is back
    finally:
        signal.signal(signum, previous)
    assert summary.interrupted
    assert summary.stop_reason == ("terminated" if signum == signal.SIGTERM else "interrupted")
    assert summary.frames == summary.anomalies == 3
    assert len(_assert_log_and_evidence_agree(log, alarms)) == 3


# ------------------------------------------------------------------------------------------ case 4: numbers
@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-frames", "-5"),
        ("--max-frames", "0"),
        ("--stall-timeout", "nan"),
        ("--stall-timeout", "-1"),
        ("--give-up-after", "0"),
        ("--give-up-after", "nan"),
        ("--threshold", "inf"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_value(tmp_path: Path, option: str, value: str) -> None:
    args = ["run", "--camera", str(_folder(tmp_path / "imgs")), "--export", str(tmp_path), option, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{option} {value}" in result.output and "Traceback" not in result.output


def test_live_options_refuse_out_of_range_numbers() -> None:
    for field, value in (("max_frames", 0), ("queue_size", 0), ("stall_timeout_s", 0.0), ("give_up_after_s", -1)):
        with pytest.raises(ValueError, match=field):
            LiveOptions(**{field: value})
    assert LiveOptions(give_up_after_s=float("inf")).give_up_after_s == float("inf")  # inf: never give up


# ------------------------------------------------------------------------------------------ case 5: hostile streams
class _FakeCapture:
    """A capture that opens; ``frames`` successful reads, then failures (an undecodable part)."""

    def __init__(self, frames: int) -> None:
        self.remaining = frames

    def isOpened(self) -> bool:  # noqa: N802 - the OpenCV API
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.remaining <= 0:
            return False, None
        self.remaining -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        pass


class _GarbageStream(VideoCaptureSource):
    """A stream that always connects; connection k yields ``frames_on(k)`` frames before a read fails."""

    def __init__(self, frames_on: Any) -> None:
        super().__init__("stream", "http://hostile.invalid/feed.mjpg")
        self.frames_on = frames_on
        self.connections = 0

    def _create_capture(self) -> Any:
        self.connections += 1
        return _FakeCapture(self.frames_on(self.connections))


def test_a_stream_that_connects_but_never_decodes_is_given_up_within_the_bound() -> None:
    stream = _GarbageStream(lambda _: 0)
    events: list[str] = []
    reader = FrameReader(stream, on_event=events.append, reconnect_delay=0.01, give_up_after_s=0.3).start()
    started = time.monotonic()
    try:
        with pytest.raises(SourceError, match=r"connected \d+ time\(s\) but gave no decodable frame"):
            reader.get(timeout=5)
    finally:
        reader.stop()
    assert time.monotonic() - started < 3.0
    assert stream.connections > 1 and all("gave no decodable frame" in e or "reconnected" in e for e in events)
    # The backoff keeps growing over frameless connections instead of restarting at the first delay.
    delays = [float(event.split(" in ")[1].split(" s")[0]) for event in events if " in " in event]
    assert delays == sorted(delays) and delays[-1] > delays[0]


def test_a_stream_that_gives_frames_now_and_then_is_not_given_up() -> None:
    stream = _GarbageStream(lambda k: 2 if k % 3 == 0 else 0)  # two of three connections are empty
    reader = FrameReader(stream, queue_size=20, reconnect_delay=0.001, give_up_after_s=0.5).start()
    try:
        frames = [reader.get(timeout=5) for _ in range(8)]
    finally:
        reader.stop()
    assert all(frame is not None for frame in frames) and stream.connections >= 12


def test_run_live_gives_up_a_frameless_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _GarbageStream(lambda _: 0)
    monkeypatch.setattr(live, "create_source", lambda *args, **kwargs: stream)
    log = tmp_path / "run.jsonl"
    started = time.monotonic()
    with pytest.raises(SourceError, match="gave no decodable frame"):
        run_live(
            AlwaysAlarm(),
            "http://hostile.invalid/feed.mjpg",
            LiveOptions(show=False, log_path=log, max_frames=5, give_up_after_s=0.2),
            on_event=lambda _: None,
        )
    assert time.monotonic() - started < 5.0 and not _capture_threads() and _log_lines(log) == []


# ------------------------------------------------------------------------------------------ case 6: sources
def test_a_missing_file_with_a_bang_is_a_missing_file_not_a_pipeline(tmp_path: Path) -> None:
    missing = tmp_path / "line!3.mp4"
    with pytest.raises(SourceError, match="no file or folder exists") as info:
        describe_source(str(missing))
    assert "line!3.mp4" in str(info.value) and "cannot open GStreamer" not in str(info.value)
    for pipeline in ("videotestsrc ! videoconvert ! appsink", "v4l2src device=/dev/video0 ! appsink", "a!appsink"):
        assert describe_source(pipeline) == ("gstreamer", pipeline)
    folder = tmp_path / "shots!1"
    folder.mkdir()
    assert describe_source(str(folder)) == ("folder", folder)  # an existing path still wins


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_that_is_not_a_camera_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"'/dev/zero' is a character device, not a video file"):
        describe_source("/dev/zero")
    result = runner.invoke(app, ["run", "--camera", "/dev/zero", "--export", str(tmp_path)])
    assert result.exit_code == 2 and "character device" in result.output and "Traceback" not in result.output
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "feed"
        os.mkfifo(fifo)
        with pytest.raises(SourceError, match="is a named pipe"):
            describe_source(str(fifo))


# ------------------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny export for every subprocess test of this module."""
    from edgead.export.exporter import ExportOptions, export_run

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integration_helpers import make_tiny_run

    root = tmp_path_factory.mktemp("reliability")
    data, run_dir = make_tiny_run(root)
    export_run(run_dir, root / "export", ExportOptions(data=data), log=lambda _: None)
    return root / "export"


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    video = tmp_path_factory.mktemp("video") / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (48, 32))
    rng = np.random.default_rng(0)
    for _ in range(3000):
        writer.write(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    writer.release()
    return video


def _edgead(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgead.cli", *args]


def _no_crash(text: str) -> None:
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@POSIX_SIGNALS
@pytest.mark.parametrize(
    "signum, delay_s",
    [(signal.SIGINT, 0.0), (signal.SIGINT, 0.15), (signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05), (signal.SIGTERM, 0.3)],
)
def test_signals_stop_run_quickly_and_evidence_matches_the_log(
    export_dir: Path, long_video: Path, tmp_path: Path, signum: int, delay_s: float
) -> None:
    log, alarms = tmp_path / "run.jsonl", tmp_path / "alarms"
    args = ["run", "--export", str(export_dir), "--camera", str(long_video), "--headless", "--threshold", "-1e9"]
    process = subprocess.Popen(
        _edgead(*args, "--log", str(log), "--save-anomalies", str(alarms)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell starts background jobs (a CI script run with `&`) with SIGINT ignored,
        # and run keeps an ignored signal ignored, as a background job should
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.stat().st_size > 0):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.005)
        time.sleep(delay_s)
        process.send_signal(signum)
        signalled = time.monotonic()
        out, err = process.communicate(timeout=30)
        stopped_in = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
    _no_crash(out + err)
    assert process.returncode == 0, err[-2000:]
    assert stopped_in < 5.0
    lines = _assert_log_and_evidence_agree(log, alarms)
    reason = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert f"{len(lines)} frames, {len(lines)} anomalous" in out and f"({reason})" in out


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_mid_run_ends_with_a_clear_error_and_whole_lines(
    export_dir: Path, long_video: Path, tmp_path: Path
) -> None:
    """A file-size limit makes the log's write fail part-way (EFBIG, as a full disk gives ENOSPC): the run stops
    with exit code 2 and one error line, the capture thread of the video is joined (no 'terminate called'), the
    log ends with a complete line, and every alarm in the folder has its line."""
    log, alarms = tmp_path / "run.jsonl", tmp_path / "alarms"
    args = ["run", "--export", str(export_dir), "--camera", str(long_video), "--headless", "--threshold", "-1e9"]
    args += ["--log", str(log), "--save-anomalies", str(alarms)]
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from edgead.cli import app\n"
        f"app({args!r}, prog_name='edgead')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _no_crash(done.stdout + done.stderr)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot write the log" in done.stderr and "EFBIG" in done.stderr
    lines = _assert_log_and_evidence_agree(log, alarms)
    assert f"stopped after {len(lines)} frames" in " ".join(done.stderr.split())
    assert 0 < len(lines) < 3000 and log.stat().st_size <= 20000


@pytest.mark.slow
def test_a_hostile_mjpeg_stream_is_given_up_with_a_few_lines(export_dir: Path, tmp_path: Path) -> None:
    """A real HTTP server sending multipart/x-mixed-replace parts of random bytes: ``run`` gives up within the
    bound with its own summary line instead of reconnecting for ever under thousands of FFmpeg lines."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stop = threading.Event()

    class RandomParts(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                while not stop.is_set():
                    part = os.urandom(2000)
                    head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(part)
                    self.wfile.write(head + part + b"\r\n")
                    time.sleep(0.01)
            except OSError:  # the client hung up
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RandomParts)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/feed.mjpg"
    env = {key: value for key, value in os.environ.items() if key != "OPENCV_FFMPEG_LOGLEVEL"}
    started = time.monotonic()
    try:
        args = ["run", "--export", str(export_dir), "--camera", url, "--headless", "--max-frames", "5"]
        done = subprocess.run(
            _edgead(*args, "--give-up-after", "3", "--stall-timeout", "5", "--log", str(tmp_path / "run.jsonl")),
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        stop.set()
        server.shutdown()
    took = time.monotonic() - started
    _no_crash(done.stdout + done.stderr)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gave no decodable frame" in done.stderr and "gave up after 3 s" in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) < 25 and not [line for line in lines if line.startswith("[mjpeg")], done.stderr[-2000:]
    assert took < 60, took  # 3 s bound + process start, model load and at most one backoff and stream probe
    assert _log_lines(tmp_path / "run.jsonl") == []
