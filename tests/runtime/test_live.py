"""Tests for edgead.runtime.live: the headless camera loop over folders and videos with a deterministic predictor."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.data.io import read_image, write_image_atomic
from edgead.runtime import live
from edgead.runtime.capture import SourceError
from edgead.runtime.live import LiveOptions, run_live
from edgead.runtime.result import Result

LOG_FIELDS = {
    "frame",
    "name",
    "time",
    "score",
    "threshold",
    "is_anomaly",
    "latency_ms",
    "preprocess_ms",
    "infer_ms",
    "postprocess_ms",
    "dropped",
}


class BrightnessPredictor:
    """Score = mean brightness; the map is the grey image at a quarter of the size."""

    def __init__(self, threshold: float = 100.0, interrupt_on_call: int | None = None) -> None:
        self.threshold = threshold
        self.interrupt_on_call = interrupt_on_call
        self.calls = 0
        self.channel_means: list[np.ndarray] = []

    def predict(self, frame_bgr: np.ndarray) -> Result:
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        self.channel_means.append(frame_bgr.reshape(-1, 3).mean(axis=0))
        grey = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        anomaly_map = cv2.resize(grey, (grey.shape[1] // 4, grey.shape[0] // 4), interpolation=cv2.INTER_AREA)
        score = float(grey.mean())
        timings = {"preprocess": 0.5, "infer": 1.5, "postprocess": 0.25}
        return Result(score, anomaly_map, score >= self.threshold, self.threshold, timings)


def _brightness_folder(folder: Path, levels: list[int]) -> Path:
    """One grey PNG per level (blue tint so that a BGR/RGB swap is detectable)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, level in enumerate(levels):
        rgb = np.full((32, 48, 3), level, dtype=np.uint8)
        rgb[..., 2] = min(255, level + 40)  # RGB blue channel brighter than red
        write_image_atomic(folder / f"part_{index:02d}.png", rgb)
    return folder


def _log_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


LEVELS = [20, 40, 150, 60, 200, 80, 30, 220]  # anomalous (>= 100): indices 2, 4, 7


def test_folder_run_logs_every_frame_and_saves_anomalies(tmp_path: Path) -> None:
    source = _brightness_folder(tmp_path / "imgs", LEVELS)
    options = LiveOptions(show=False, save_anomalies=tmp_path / "anom", log_path=tmp_path / "log" / "run.jsonl")
    predictor = BrightnessPredictor(threshold=100.0)
    events: list[str] = []
    summary = run_live(predictor, str(source), options, on_event=events.append)

    assert summary.frames == len(LEVELS) and summary.anomalies == 3
    assert summary.stop_reason == "end of source" and not summary.interrupted
    assert summary.dropped == 0 and summary.fps > 0 and summary.median_latency_ms > 0
    # Frames reach the predictor in BGR: blue (channel 0) is the brighter one.
    assert all(means[0] > means[2] for means in predictor.channel_means)

    records = _log_lines(tmp_path / "log" / "run.jsonl")
    assert len(records) == len(LEVELS)
    assert all(set(record) == LOG_FIELDS | ({"saved"} if record["is_anomaly"] else set()) for record in records)
    assert [record["frame"] for record in records] == list(range(len(LEVELS)))
    assert [record["is_anomaly"] for record in records] == [level >= 100 for level in LEVELS]
    assert records[0]["name"] == "part_00.png" and records[0]["infer_ms"] == 1.5
    assert records[0]["time"].endswith("+00:00")

    # Each alarm's log line names its three files: <UTC time>_<pid>_<source>_<frame>{.png,_map.png,_map.npy}.
    saved = sorted(path.name for path in (tmp_path / "anom").iterdir())
    assert saved == sorted(name for record in records if record["is_anomaly"] for name in record["saved"])
    alarm = next(record for record in records if record["frame"] == 4)
    frame_file, hud_file, map_file = alarm["saved"]
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}\.\d{{6}}Z_{os.getpid()}_part_04_000004\.png", frame_file), frame_file
    # The saved frame is the original pixels (RGB on disk equals the source file).
    np.testing.assert_array_equal(read_image(tmp_path / "anom" / frame_file), read_image(source / "part_04.png"))
    assert read_image(tmp_path / "anom" / hud_file).shape == (32, 48, 3)
    raw_map = np.load(tmp_path / "anom" / map_file)
    assert raw_map.dtype == np.float32 and raw_map.shape == (8, 12)
    assert not [path for path in (tmp_path / "anom").iterdir() if path.name.startswith(".")]  # no temp leftovers
    assert "end of source" in events[-1]


def test_saved_alarms_are_never_overwritten(tmp_path: Path) -> None:
    """Two runs on one source into one folder (frame indices restart at 0): every alarm of both survives."""
    source = _brightness_folder(tmp_path / "imgs", LEVELS)
    options = LiveOptions(show=False, save_anomalies=tmp_path / "anom", log_path=tmp_path / "run.jsonl")
    for _ in range(2):
        run_live(BrightnessPredictor(threshold=100.0), str(source), options, on_event=lambda _: None)
    records = _log_lines(tmp_path / "run.jsonl")
    named = [name for record in records if record["is_anomaly"] for name in record["saved"]]
    assert len(named) == len(set(named)) == 2 * 3 * 3
    assert sorted(named) == sorted(path.name for path in (tmp_path / "anom").iterdir())


def test_max_frames_threshold_and_anomaly_only_log(tmp_path: Path) -> None:
    source = _brightness_folder(tmp_path / "imgs", LEVELS)
    log_path = tmp_path / "run.jsonl"
    options = LiveOptions(show=False, log_path=log_path, max_frames=5)
    summary = run_live(BrightnessPredictor(threshold=50.0), str(source), options, on_event=lambda _: None)
    assert summary.frames == 5 and summary.stop_reason == "max frames"
    assert summary.anomalies == 3  # levels 150, 60, 200 reach the predictor's threshold 50
    assert [record["threshold"] for record in _log_lines(log_path)] == [50.0] * 5

    # The log is appended to, and log_every_frame=False keeps only anomalies.
    options = LiveOptions(show=False, log_path=log_path, log_every_frame=False)
    run_live(BrightnessPredictor(threshold=50.0), str(source), options, on_event=lambda _: None)
    records = _log_lines(log_path)
    assert len(records) == 5 + 5 and all(record["is_anomaly"] for record in records[5:])


def test_video_run_stops_at_max_frames(tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for index in range(10):
        writer.write(np.full((48, 64, 3), 25 * index, dtype=np.uint8))
    writer.release()
    log_path = tmp_path / "run.jsonl"
    summary = run_live(
        BrightnessPredictor(threshold=90.0),  # well below grey 100: MJPG may shift levels slightly
        str(video),
        LiveOptions(show=False, log_path=log_path, max_frames=7, save_anomalies=tmp_path / "anom"),
        on_event=lambda _: None,
    )
    records = _log_lines(log_path)
    assert summary.frames == 7 and len(records) == 7
    assert [record["frame"] for record in records] == list(range(7))
    assert summary.anomalies == sum(record["is_anomaly"] for record in records) == 3  # levels 100, 125, 150
    assert len(list((tmp_path / "anom").glob(f"*_{os.getpid()}_line_000004.png"))) == 1


def test_keyboard_interrupt_ends_cleanly(tmp_path: Path) -> None:
    source = _brightness_folder(tmp_path / "imgs", LEVELS)
    log_path = tmp_path / "run.jsonl"
    summary = run_live(
        BrightnessPredictor(interrupt_on_call=3),
        str(source),
        LiveOptions(show=False, log_path=log_path),
        on_event=lambda _: None,
    )
    assert summary.interrupted and summary.stop_reason == "interrupted"
    assert summary.frames == 2
    assert len(_log_lines(log_path)) == 2  # whole lines only, file closed and flushed


def test_log_after_a_torn_line_starts_on_a_new_line(tmp_path: Path) -> None:
    source = _brightness_folder(tmp_path / "imgs", LEVELS[:2])
    log_path = tmp_path / "run.jsonl"
    log_path.write_text('{"frame": 0, "na', encoding="utf-8")  # a previous run died mid-write
    run_live(BrightnessPredictor(), str(source), LiveOptions(show=False, log_path=log_path), on_event=lambda _: None)
    lines = log_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and [json.loads(line)["frame"] for line in lines[1:]] == [0, 1]


def test_unopenable_source_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        run_live(BrightnessPredictor(), "97", LiveOptions(show=False, log_path=tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()  # nothing is created for a source that never opened
    with pytest.raises(SourceError, match="not a camera index"):
        run_live(BrightnessPredictor(), str(tmp_path / "nope.mp4"), LiveOptions(show=False))


def test_bad_image_in_folder_stops_with_source_error_after_good_frames(tmp_path: Path) -> None:
    source = _brightness_folder(tmp_path / "imgs", LEVELS[:3])
    (source / "part_01b.png").write_bytes(b"not an image")
    log_path = tmp_path / "run.jsonl"
    with pytest.raises(SourceError, match="part_01b.png"):
        run_live(BrightnessPredictor(), str(source), LiveOptions(show=False, log_path=log_path))
    assert len(_log_lines(log_path)) == 2


def test_show_without_a_window_says_why_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead.runtime import overlay

    if overlay.gui_backend() is None:  # this machine's OpenCV (the base install's headless build)
        with pytest.raises(RuntimeError, match=r"headless build.*pip uninstall -y opencv-python-headless && pip "):
            run_live(BrightnessPredictor(), str(tmp_path), LiveOptions(show=True))
    monkeypatch.setattr(overlay, "_opencv_gui_backend", lambda: "GTK3")  # a GUI build, but no display
    monkeypatch.setattr(overlay.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(RuntimeError, match=r"cannot show a window \(--show\): no display"):
        live.check_outputs(LiveOptions(show=True))


def test_run_show_fails_before_the_detector_loads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgead.cli import app
    from edgead.runtime import overlay

    if overlay.why_no_window() is None:
        pytest.skip("this machine can open a window")
    result = CliRunner().invoke(
        app, ["run", "--camera", str(tmp_path), "--export", str(tmp_path / "no-export"), "--show"]
    )
    assert result.exit_code == 2 and "cannot show a window" in result.output
    assert "no-export" not in result.output  # the missing export was never reached


def test_auto_show_stays_headless_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "has_display", lambda: False)

    def fail_imshow(*_: object) -> None:
        raise AssertionError("imshow must not be called without a display")

    monkeypatch.setattr(live.cv2, "imshow", fail_imshow)
    source = _brightness_folder(tmp_path / "imgs", LEVELS[:3])
    assert run_live(BrightnessPredictor(), str(source), LiveOptions(), on_event=lambda _: None).frames == 3
