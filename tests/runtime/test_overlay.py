"""Tests for edgead.runtime.overlay: the HUD, the shared heatmap overlay and display detection."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgead import report
from edgead.runtime import overlay
from edgead.runtime.overlay import draw_hud, gui_backend, has_display, heatmap_overlay
from edgead.runtime.result import Result

RED_BGR = np.array([0, 0, 255], dtype=np.uint8)


def _result(score: float, threshold: float, anomaly_map: np.ndarray | None = None) -> Result:
    if anomaly_map is None:
        anomaly_map = np.zeros((8, 8), dtype=np.float32)
    return Result(score=score, anomaly_map=anomaly_map, is_anomaly=score >= threshold, threshold=threshold)


def test_report_reexports_the_runtime_overlay() -> None:
    assert report.heatmap_overlay is heatmap_overlay


def test_draw_hud_marks_anomalies_with_a_red_border() -> None:
    frame = np.full((120, 160, 3), 90, dtype=np.uint8)
    hud = draw_hud(frame, _result(12.3, 10.0), fps=24.1, latency_ms=31.2, vmin=0.0, vmax=20.0)
    assert hud.shape == frame.shape and hud.dtype == np.uint8
    for corner in (hud[0, 0], hud[-1, -1], hud[60, 0], hud[-1, 80]):
        np.testing.assert_array_equal(corner, RED_BGR)
    assert not np.shares_memory(hud, frame)
    np.testing.assert_array_equal(frame, 90)  # the input frame is not drawn on


def test_draw_hud_ok_frame_has_no_red_border_and_keeps_size() -> None:
    frame = np.full((48, 64, 3), 90, dtype=np.uint8)
    hud = draw_hud(frame, _result(0.0123, 10.0), fps=None, latency_ms=None, vmin=0.0, vmax=20.0)
    assert hud.shape == frame.shape
    assert not np.array_equal(hud[-1, -1], RED_BGR)
    assert not np.array_equal(hud[-1, 0], RED_BGR)


def test_draw_hud_heatmap_colours_are_in_bgr_order() -> None:
    # Left half cold, right half hot: in BGR the hot side must be red (channel 2), the cold side blue (channel 0).
    frame = np.zeros((100, 200, 3), dtype=np.uint8)
    anomaly_map = np.zeros((10, 20), dtype=np.float32)
    anomaly_map[:, 10:] = 20.0
    hud = draw_hud(frame, _result(1.0, 10.0, anomaly_map), fps=10.0, latency_ms=5.0, vmin=0.0, vmax=20.0, alpha=1.0)
    cold, hot = hud[90, 10].astype(int), hud[90, 190].astype(int)
    assert cold[0] > cold[2]
    assert hot[2] > hot[0]


def test_draw_hud_rejects_rgba() -> None:
    with pytest.raises(ValueError, match="BGR"):
        draw_hud(np.zeros((4, 4, 4), np.uint8), _result(1.0, 2.0), None, None, 0.0, 1.0)


def test_draw_hud_hot_overlay_changes_pixels_only_under_hot_map() -> None:
    frame = np.full((64, 64, 3), 128, dtype=np.uint8)
    cold = draw_hud(frame, _result(1.0, 10.0), None, None, 0.0, 20.0)
    hot = draw_hud(frame, _result(1.0, 10.0, np.full((8, 8), 20.0, np.float32)), None, None, 0.0, 20.0)
    assert np.abs(hot[40:, :].astype(int) - cold[40:, :].astype(int)).mean() > 30


GTK_BUILD = """
  GUI:                           GTK3
    GTK+:                        YES (ver 3.24.20)
    VTK support:                 NO
"""
HEADLESS_BUILD = """
  GUI:                           NONE
    VTK support:                 NO
    Built-in Unicode font:       YES
"""
OLD_QT_BUILD = """
  GUI:
    QT:                          YES (ver 5.15.0 )
      QT OpenGL support:         NO
    GTK+:                        NO

  Media I/O:
"""
OLD_HEADLESS_BUILD = """
  GUI:
    GTK+:                        NO
    VTK support:                 NO

  Media I/O:
    PNG:                         YES
"""


@pytest.mark.parametrize(
    ("build_information", "expected"),
    [(GTK_BUILD, "GTK3"), (HEADLESS_BUILD, None), (OLD_QT_BUILD, "QT"), (OLD_HEADLESS_BUILD, None), ("", None)],
)
def test_gui_backend_parses_build_information(build_information: str, expected: str | None) -> None:
    assert gui_backend(build_information) == expected


def test_has_display_needs_display_variable_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay, "_opencv_gui_backend", lambda: "GTK3")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert has_display() is False
    monkeypatch.setenv("DISPLAY", ":0")
    assert has_display() is True
    monkeypatch.delenv("DISPLAY")
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert has_display() is True


def test_has_display_false_for_headless_opencv_even_with_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay, "_opencv_gui_backend", lambda: None)
    monkeypatch.setenv("DISPLAY", ":0")
    assert has_display() is False
    monkeypatch.setattr(sys, "platform", "win32")
    assert has_display() is False


def test_has_display_on_windows_only_needs_a_gui_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay, "_opencv_gui_backend", lambda: "WIN32UI")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delenv("DISPLAY", raising=False)
    assert has_display() is True
