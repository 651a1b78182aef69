"""Keeping a deployed detector right: drift watch, hot swap of export versions, operator feedback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.export.exporter import ExportOptions, export_run
from edgead.runtime.detector import Detector
from edgead.runtime.drift import DriftWatch, normal_quantiles
from edgead.runtime.feedback import FeedbackError, latest_marks, record_feedback
from edgead.runtime.follow import ExportFollower
from edgead.runtime.live import LiveOptions, run_live

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from integration_helpers import make_gaussian_run  # noqa: E402


# ----------------------------------------------------------------------------------------------- drift, unit
def test_drift_rule_on_score_streams() -> None:
    rng = np.random.default_rng(0)
    normal = rng.gamma(4.0, 1.0, 5000)
    quantiles = normal_quantiles(normal)
    watch = DriftWatch(quantiles, window=200)
    assert [r for r in (watch.update(s) for s in rng.gamma(4.0, 1.0, 20_000)) if r] == []  # no false warning
    shifted = rng.gamma(4.0, 1.0, 400) + 2 * quantiles["0.9"]
    events = [(i, r) for i, r in enumerate(watch.update(s) for s in shifted) if r]
    assert events[0][1]["event"] == "drift" and events[0][0] <= 200 // 2 + 1
    back = [r for r in (watch.update(s) for s in rng.gamma(4.0, 1.0, 400)) if r]
    assert [r["event"] for r in back] == ["drift cleared"]
    with pytest.raises(ValueError, match="at least 10"):
        DriftWatch(quantiles, window=5)


# ----------------------------------------------------------------------------- a fitted run and its export
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("keep")
    data, run_dir = make_gaussian_run(root)
    export_dir = root / "export"
    export_run(run_dir, export_dir, ExportOptions(), log=lambda _: None)
    return data, run_dir, export_dir


def normal_video(
    data: Path, path: Path, frames: int, change: str | None = None, train_images: int = 20, size: int | None = None
) -> Path:
    """A lossless video (FFV1) of the data set's normal test images (and ``train_images`` training images:
    generated data has few test images), each held 3 frames; from the middle on, ``change``. ``size``: every
    image squashed to it as the model's preprocessing does (so the frames are the model's own input), else all
    at the first image's size. Lossless because JPEG-compressed frames (MJPEG) alone lift gaussian's scores on
    magnetic_tile far above the held-out normals': that is a drift of its own, not the one under test."""
    paths = sorted(p for p in (data / "test" / "good").iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    paths += sorted((data / "train" / "good").glob("*.png"))[:train_images]
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    height, width = (size, size) if size else images[0].shape[:2]
    images = [cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) for image in images]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30.0, (width, height))
    for i in range(frames):
        frame = images[(i // 3) % len(images)]
        if change is not None and i >= frames // 2:
            if change == "brightness":
                frame = cv2.convertScaleAbs(frame, alpha=1.0, beta=70)
            else:
                frame = cv2.GaussianBlur(frame, (0, 0), 3.0)
        writer.write(frame)
    writer.release()
    return path


@pytest.mark.slow  # fits and exports a gaussian run, runs it on three videos
@pytest.mark.parametrize("change", [None, "brightness", "focus"])
def test_drift_on_video_of_normal_images(exported: tuple[Path, Path, Path], tmp_path: Path, change: str | None) -> None:
    data, _, export_dir = exported
    frames, window = 600, 100
    video = normal_video(data, tmp_path / "line.avi", frames, change)
    log = tmp_path / "run.jsonl"
    with Detector.load(export_dir, backend="onnxruntime") as detector:
        assert "normal_quantiles" in detector.metadata.threshold
        summary = run_live(detector, str(video), LiveOptions(show=False, log_path=log, drift_window=window),
                           on_event=lambda _: None)  # fmt: skip
    assert summary.frames == frames
    records = [json.loads(line) for line in log.read_text().splitlines()]
    drift = [r for r in records if r.get("event") == "drift"]
    if change is None:
        assert drift == [], "a warning on the unshifted video"
    else:
        assert drift, f"no warning after the {change} shift"
        delay = drift[0]["frame"] - frames // 2
        assert 0 <= delay <= window // 2 + 2, f"warned {delay} frames after the shift"  # +1 for the line's frame
    assert all(r.get("version") for r in records if "score" in r)  # every line names the export version


# ------------------------------------------------------------------------------------------------ hot swap
@pytest.fixture
def first_export(exported: tuple[Path, Path, Path], tmp_path: Path) -> tuple[Path, Path, Path, str]:
    """``(data, run_dir, export_dir, first version)``: the run exported once, the version a follower starts on."""
    data, run_dir, _ = exported
    export_dir = tmp_path / "export"
    export_run(run_dir, export_dir, ExportOptions(), log=lambda _: None)
    return data, run_dir, export_dir, export_dir.resolve().name


@pytest.mark.slow
def test_follow_takes_a_verified_version_and_refuses_a_broken_one(first_export: tuple[Path, Path, Path, str]) -> None:
    from edgead.runtime.verify import verify_export

    _, run_dir, export_dir, first = first_export
    events: list[dict] = []
    follower = ExportFollower(
        export_dir,
        load=lambda path: Detector.load(path, backend="onnxruntime"),
        check=lambda path: verify_export(path, backend="onnxruntime", runs=2)["failures"],
        on_event=events.append,
    )
    follower.poll_once()
    assert follower.take() is None  # nothing new
    export_run(run_dir, export_dir, ExportOptions(false_alarm_rate=0.05), log=lambda _: None)
    follower.poll_once()
    version, detector = follower.take()
    assert version == export_dir.resolve().name != first and detector.metadata.threshold["false_alarm_rate"] == 0.05
    detector.close()
    export_run(run_dir, export_dir, ExportOptions(), log=lambda _: None)
    model = export_dir.resolve() / "model.onnx"
    os.chmod(model, 0o644)
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # corrupted after publishing
    follower.poll_once()
    assert follower.take() is None
    assert events and events[-1]["event"] == "export refused" and "SHA-256" in events[-1]["reason"]


@pytest.mark.slow
def test_run_follow_switches_between_frames_and_logs_the_version(
    first_export: tuple[Path, Path, Path, str], tmp_path: Path
) -> None:
    data, run_dir, export_dir, first = first_export
    video = normal_video(data, tmp_path / "line.avi", 300)
    detector = Detector.load(export_dir, backend="onnxruntime")
    follower = ExportFollower(export_dir, load=lambda p: Detector.load(p, backend="onnxruntime"),
                              check=lambda p: [], on_event=lambda e: None)  # fmt: skip
    export_run(run_dir, export_dir, ExportOptions(false_alarm_rate=0.05), log=lambda _: None)
    follower.poll_once()  # the new version is ready before the run starts: taken before the first frame
    log = tmp_path / "run.jsonl"
    summary = run_live(detector, str(video), LiveOptions(show=False, log_path=log, follow=follower),
                       on_event=lambda _: None)  # fmt: skip
    records = [json.loads(line) for line in log.read_text().splitlines()]
    frames = [r for r in records if "score" in r]
    assert summary.frames == len(frames) == 300  # no frame dropped, every one logged
    switched = [r for r in records if r.get("event") == "export switched"]
    assert switched and switched[0]["from"] == first and switched[0]["to"] == export_dir.resolve().name
    assert {r["version"] for r in frames} == {export_dir.resolve().name}


# ------------------------------------------------------------------------------------------------ feedback
def _alarm(folder: Path, base: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{base}.png"), np.full((20, 30, 3), 50, np.uint8))
    cv2.imwrite(str(folder / f"{base}_map.png"), np.full((20, 30, 3), 200, np.uint8))
    np.save(folder / f"{base}_map.npy", np.zeros((4, 4), np.float32))


def test_feedback_is_append_only_and_leaves_the_evidence_alone(tmp_path: Path) -> None:
    alarms, out = tmp_path / "alarms", tmp_path / "feedback"
    _alarm(alarms, "20261204T101010_1_camera0_000042")
    _alarm(alarms, "20261204T101011_1_camera0_000043")
    before = {p.name: p.read_bytes() for p in alarms.iterdir()}
    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"frame": 42, "saved": ["20261204T101010_1_camera0_000042.png"]}) + "\n")
    record_feedback(["20261204T101010_1_camera0_000042"], "false-alarm", alarms, out, log=log, note="glare")
    record_feedback(["20261204T101011_1_camera0_000043_map.png"], "defect", alarms, out)
    record_feedback(["20261204T101010_1_camera0_000042.png"], "defect", alarms, out)  # changed its mind
    lines = (out / "feedback.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 3 and first["log_line"]["frame"] == 42 and first["note"] == "glare"
    assert latest_marks(out)["20261204T101010_1_camera0_000042"]["mark"] == "defect"
    assert sorted(p.name for p in (out / "false-alarm").glob("*.png")) == ["20261204T101010_1_camera0_000042.png"]
    assert (out / "false-alarm" / "maps" / "20261204T101010_1_camera0_000042_map.npy").is_file()
    assert {p.name: p.read_bytes() for p in alarms.iterdir()} == before
    with pytest.raises(FeedbackError, match="no saved files"):
        record_feedback(["nope"], "defect", alarms, out)
    with pytest.raises(FeedbackError, match="expected one of false-alarm, defect"):
        record_feedback(["20261204T101010_1_camera0_000042"], "maybe", alarms, out)
    assert len((out / "feedback.jsonl").read_text().splitlines()) == 3  # refused marks wrote nothing
    result = CliRunner().invoke(app, ["feedback", "20261204T101011_1_camera0_000043", "--mark", "false-alarm",
                                      "--alarms", str(alarms), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0 and "1 alarm(s) marked false-alarm" in result.output
    bad = CliRunner().invoke(app, ["feedback", "x", "--mark", "defect", "--alarms", str(tmp_path / "none")])
    assert bad.exit_code != 0 and "not a folder" in bad.output


REAL_DATA_ROOT = os.environ.get("EDGEAD_DATA_ROOT")


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA_ROOT, reason="EDGEAD_DATA_ROOT is not set")
def test_drift_on_real_normal_images(tmp_path: Path) -> None:
    """magnetic_tile: a gaussian run at 128 px, a video of its normal test images (held 3 frames each), 800
    frames; brightness (+70) or focus (Gaussian blur, sigma 3) from the middle on. No warning on the unshifted
    video; on the shifted ones the warning comes at most window // 2 + 1 frames after the shift."""
    from edgead.pipeline import train_run
    from edgead.spec import RunSpec

    data = Path(REAL_DATA_ROOT) / "magnetic_tile"
    run_dir, _ = train_run(
        RunSpec(method="gaussian", data=[data], image_size=128, runs_root=tmp_path / "runs", device="cpu"),
        progress=False,
    )
    export_dir = tmp_path / "export"
    export_run(run_dir, export_dir, ExportOptions(), log=lambda _: None)
    frames, window = 800, 200
    with Detector.load(export_dir, backend="onnxruntime") as detector:
        for change in (None, "brightness", "focus"):
            video = normal_video(data, tmp_path / f"{change}.avi", frames, change, train_images=0, size=128)
            log = tmp_path / f"{change}.jsonl"
            run_live(detector, str(video), LiveOptions(show=False, log_path=log, drift_window=window),
                     on_event=lambda _: None)  # fmt: skip
            drift = [json.loads(x) for x in log.read_text().splitlines() if '"event": "drift"' in x]
            if change is None:
                assert drift == [], f"a false warning on normal video: {drift[:1]}"
            else:
                assert drift and 0 <= drift[0]["frame"] - frames // 2 <= window // 2 + 1, (change, drift[:1])
