"""edgead doctor: every check, its passing and its failing branch, the exit code and the JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgead.cli import app
from edgead.runtime import doctor

BUILD = """
  GUI:                           {gui}
  Video I/O:
    FFMPEG:                      {ffmpeg}
    GStreamer:                   {gst}
"""


def test_python_and_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert doctor.check_python().status == "ok"
    monkeypatch.setattr(doctor, "MIN_PYTHON", (99, 0))
    failed = doctor.check_python()
    assert failed.status == "fail" and "Python 99.0 or newer" in failed.fix
    (tmp_path / "brokenpkg_edgead.py").write_text("raise RuntimeError('stub wheel: download failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(doctor, "REQUIRED", (("numpy", "numpy"), ("no_such_module_edgead", "no-such-dist")))
    monkeypatch.setattr(doctor, "OPTIONAL", (("brokenpkg_edgead", "its vendor"), ("rich", "rich")))
    checks = {c.name: c for c in doctor.check_packages()}
    assert checks["numpy"].status == "ok" and checks["numpy"].detail == np.__version__
    assert (
        checks["no_such_module_edgead"].status == "fail"
        and checks["no_such_module_edgead"].fix == "pip install no-such-dist"
    )
    assert checks["brokenpkg_edgead"].status == "warn" and "stub wheel" in checks["brokenpkg_edgead"].detail
    assert checks["rich"].status == "ok" and checks["rich"].detail[0].isdigit()  # from the distribution's metadata


def test_opencv_build_lines() -> None:
    good = {c.name: c for c in doctor.check_opencv(BUILD.format(gui="GTK3", ffmpeg="YES", gst="YES (1.20.3)"))}
    assert all(c.status == "ok" for c in good.values()), good
    bad = {c.name: c for c in doctor.check_opencv(BUILD.format(gui="NONE", ffmpeg="NO", gst="NO"))}
    assert {c.status for c in bad.values()} == {"warn"}
    assert "--show needs pip" in bad["opencv window"].fix and "GStreamer" in bad["opencv gstreamer"].fix


def test_gpus_against_what_tensorrt_builds_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor.check_gpus("nvidia-smi not found")[0].status == "skip"
    old = {"name": "Tesla K80", "compute_capability": "3.7", "driver": "470.82"}
    new = {"name": "NVIDIA RTX 4000 Ada", "compute_capability": "8.9", "driver": "560.35"}
    has_trt = any(importlib.util.find_spec(m) for m in doctor.MIN_COMPUTE_CAPABILITY)
    checks = doctor.check_gpus([old, new])
    if has_trt:
        assert checks[0].status == "fail" and "does not build for it" in checks[0].detail
        assert checks[1].status == "ok" and "engines build with" in checks[1].detail
    else:
        assert all(c.status == "warn" and "no TensorRT" in c.detail for c in checks)


def test_nvidia_smi_output_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Done:
        stdout = "NVIDIA H200, 9.0, 570.86\nNVIDIA L4, 8.9, 570.86\n"

    monkeypatch.setattr(doctor.shutil, "which", lambda _: "/usr/bin/nvidia-smi")
    gpus = doctor.nvidia_gpus(runner=lambda *a, **k: Done())
    assert gpus == [
        {"name": "NVIDIA H200", "compute_capability": "9.0", "driver": "570.86"},
        {"name": "NVIDIA L4", "compute_capability": "8.9", "driver": "570.86"},
    ]
    monkeypatch.setattr(doctor.shutil, "which", lambda _: None)
    assert "not found" in doctor.nvidia_gpus()


def test_camera_check_opens_and_reads(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.zeros((48, 64, 3), np.uint8))
    assert doctor.check_camera(str(folder)).detail.endswith("64x48")
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (80, 60))
    for _ in range(5):
        writer.write(np.full((60, 80, 3), 90, np.uint8))
    writer.release()
    check = doctor.check_camera(str(video))
    assert check.status == "ok" and "80x60, 15 FPS reported" in check.detail
    missing = doctor.check_camera(str(tmp_path / "nope.mp4"))
    assert missing.status == "fail" and "nope.mp4" in missing.detail


def test_write_checks(tmp_path: Path) -> None:
    assert doctor.check_writable(tmp_path / "runs", "runs").status == "ok"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    failed = doctor.check_writable(blocker / "runs", "runs")
    assert failed.status == "fail" and str(blocker) in failed.detail


def test_export_check_refuses_a_folder_that_is_no_export(tmp_path: Path) -> None:
    check = doctor.check_export(tmp_path)
    assert check.status == "fail" and "edgead.json" in check.detail


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["doctor", "--runs-root", str(tmp_path / "r"), "--exports-root", str(tmp_path / "e"),
                             "--json", str(tmp_path / "doctor.json")])  # fmt: skip
    report = json.loads((tmp_path / "doctor.json").read_text())
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    assert ok.exit_code == (1 if failed else 0), ok.output
    assert report["passed"] is not failed and {c["name"] for c in report["checks"]} >= {"python", "camera", "export"}
    bad = runner.invoke(app, ["doctor", "--camera", str(tmp_path / "missing.mp4"), "--exports-root", str(tmp_path)])
    assert bad.exit_code == 1 and "[fail] camera" in bad.output and "doctor: FAILED" in bad.output


@pytest.mark.slow  # trains and exports a tiny run
def test_export_check_verifies_a_real_export(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from integration_helpers import make_tiny_run

    from edgead.export.exporter import ExportOptions, export_run

    _, run_dir = make_tiny_run(tmp_path)
    export_run(run_dir, tmp_path / "export", ExportOptions(), log=lambda _: None)
    check = doctor.check_export(tmp_path / "export", runs=2)
    assert check.status == "ok" and "verified" in check.detail
