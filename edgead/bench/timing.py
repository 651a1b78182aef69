"""trtexec-style latency report for an exported detector (torch-free).

Latency is measured per call after a warm-up, reported as min/mean/median/p90/p99 and coefficient of
variation, separately for preprocessing, inference and postprocessing; throughput is calls per second
of the whole ``predict``. The camera-loop figure runs the real capture thread on a video file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.runtime.detector import Detector
from edgead.runtime.live import LiveOptions, run_live

STAGES = ("preprocess", "infer", "postprocess", "total")


def latency_stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """Percentiles of a list of latencies in milliseconds."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latency samples")
    mean = float(values.mean())
    return {
        "n": int(values.size),
        "min": float(values.min()),
        "mean": mean,
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
        "cv": float(values.std() / mean) if mean > 0 else 0.0,
    }


def timed_loop(
    fn: Callable[[], dict[str, float] | None], warmup_s: float, duration_s: float, min_runs: int = 50
) -> dict[str, list[float]]:
    """Call ``fn`` for ``warmup_s`` unrecorded, then for at least ``duration_s`` and ``min_runs`` calls.

    ``fn`` may return its own stage timings in ms; the wall time of each call is recorded as ``total``.
    """
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    samples: dict[str, list[float]] = {}
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end or len(samples.get("total", [])) < min_runs:
        start = time.perf_counter()
        stages = fn() or {}
        samples.setdefault("total", []).append((time.perf_counter() - start) * 1e3)
        for name, value in stages.items():
            samples.setdefault(name, []).append(value)
    return samples


def bench_detector(
    detector: Detector, frame_bgr: np.ndarray, warmup_s: float = 2.0, duration_s: float = 10.0, min_runs: int = 50
) -> dict[str, Any]:
    """Latency of ``detector.predict`` on one frame, per stage."""
    samples = timed_loop(lambda: detector.predict(frame_bgr).timings, warmup_s, duration_s, min_runs)
    stats = {stage: latency_stats(samples[stage]) for stage in STAGES if stage in samples}
    return {"stages": stats, "throughput_fps": 1e3 * detector.batch_size / stats["total"]["median"]}


def write_bench_video(path: Path, frame_bgr: np.ndarray, n_frames: int = 120, fps: float = 30.0) -> Path:
    """A short MJPG video of ``frame_bgr`` drifting sideways, for the camera-loop measurement."""
    height, width = frame_bgr.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write an MJPG video here")
    try:
        for i in range(n_frames):
            writer.write(np.roll(frame_bgr, i % width, axis=1))
    finally:
        writer.release()
    return path


def bench_camera_loop(detector: Detector, video: Path, max_frames: int | None = None) -> dict[str, Any]:
    """End-to-end FPS of ``edgead run`` (capture thread, queue, predict) on a video file, headless."""
    summary = run_live(detector, str(video), LiveOptions(show=False, max_frames=max_frames), on_event=lambda _: None)
    return {
        "frames": summary.frames,
        "fps": summary.fps,
        "median_latency_ms": summary.median_latency_ms,
        "dropped": summary.dropped,
    }


def resident_memory_mb() -> dict[str, float | None]:
    """Current and peak resident memory of this process (Linux ``/proc``; None elsewhere)."""
    values: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                values["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                values["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return values


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain table users can paste: one row per measured configuration."""
    header = (
        f"{'measured':<32}{'min ms':>9}{'mean ms':>9}{'median ms':>10}{'p90 ms':>9}{'p99 ms':>9}{'cv':>6}{'FPS':>9}"
        f"{'vs torch':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        s = row["stats"]
        ratio = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        lines.append(
            f"{row['name']:<32}{s['min']:>9.2f}{s['mean']:>9.2f}{s['median']:>10.2f}{s['p90']:>9.2f}{s['p99']:>9.2f}"
            f"{s['cv']:>6.2f}{row['fps']:>9.1f}{ratio:>10}"
        )
    return "\n".join(lines)
