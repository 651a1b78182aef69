"""``edgead bench``: exported backend latency, the PyTorch eager baseline in the same run, camera-loop FPS.

Works on a runtime-only device (no torch): the baseline is then skipped and the report says so.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.bench.timing import (
    bench_camera_loop,
    bench_detector,
    format_table,
    resident_memory_mb,
    write_bench_video,
)
from edgead.data.files import OutputPathError, check_output_file, write_json_atomic
from edgead.runtime.detector import Detector
from edgead.runtime.machine import cpu_name, gpu_name

#: The generated frame's size when no --video is given: a 720p camera, so preprocessing includes a real downscale.
DEFAULT_FRAME_SIZE = (1280, 720)
#: Frames of a user's --video that the camera-loop measurement reads at most.
VIDEO_LOOP_FRAMES = 300


def _bench_frame(size: tuple[int, int] = DEFAULT_FRAME_SIZE, seed: int = 0) -> np.ndarray:
    """A smooth random BGR frame of ``size`` (width, height)."""
    import cv2

    width, height = size
    if width < 8 or height < 8:
        raise ValueError(f"--frame-size {width}x{height}: expected at least 8x8 pixels")
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)


def _first_frame(video: Path) -> np.ndarray:
    """The first frame of ``video`` (BGR), with an error naming the file when OpenCV cannot read it."""
    import cv2

    if not Path(video).is_file():
        raise FileNotFoundError(f"--video {video}: file not found")
    capture = cv2.VideoCapture(str(video))
    try:
        ok, frame = capture.read()
    finally:
        capture.release()
    if not ok or frame is None or frame.size == 0:
        raise ValueError(f"--video {video}: OpenCV cannot read a frame from it (expected a video file)")
    return frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)


def run_bench(
    export_dir: Path,
    backend: str = "auto",
    precision: str | None = None,
    warmup_s: float = 2.0,
    duration_s: float = 10.0,
    torch_baseline: bool = True,
    camera_loop: bool = True,
    json_path: Path | None = None,
    min_runs: int = 50,
    video: Path | None = None,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure everything and return the report (``report["table"]`` is the printable summary).

    Rows: ``infer`` is the exported graph on an already preprocessed batch (the same work as the PyTorch eager
    rows, hence the ratio); ``predict`` is what an application pays per frame: preprocessing of a camera-sized
    BGR frame (``frame_size``, or ``video``'s first frame), the graph, the map resize and the decision. The
    camera loop is ``edgead run`` on a video file (``video``, or one generated from the frame): decoding runs
    on the capture thread, in parallel with ``predict``, so its FPS is at most ``predict``'s and lower when
    decoding is the slower of the two.

    A PyTorch baseline that cannot be measured (``torch_baseline`` off, torch not installed, the run directory
    recorded in ``edgead.json`` gone) is a row of the table saying so and why, not a missing row.

    Raises:
        edgead.data.files.OutputPathError: ``json_path`` cannot be written (checked before measuring).
    """
    if json_path is not None:
        check_output_file(json_path, "--json")
    frame = _first_frame(video) if video is not None else _bench_frame(frame_size)
    height, width = frame.shape[:2]
    detector = Detector.load(export_dir, backend=backend, precision=precision, device=device)
    meta = detector.metadata
    backend_result = bench_detector(detector, frame, warmup_s, duration_s, min_runs)
    label = f"{detector.backend.name} {precision or detector.precision}"
    infer = backend_result["stages"]["infer"]["median"]
    stages = backend_result["stages"]
    rows = [
        {"name": f"{label} infer", "stats": stages["infer"], "fps": 1e3 * detector.batch_size / infer},
        {"name": f"{label} predict", "stats": stages["total"], "fps": backend_result["throughput_fps"]},
    ]
    report: dict[str, Any] = {
        "export": str(export_dir),
        "method": meta["method"],
        "input_shape": meta["input"]["shape"],
        "frame": {"width": width, "height": height, "source": str(video) if video is not None else "generated"},
        "backend": {"name": detector.backend.name, "precision": detector.precision, **backend_result},
        "memory_after_backend": resident_memory_mb(),
    }
    torch_available = importlib.util.find_spec("torch") is not None
    recorded_run = meta.get("run", {}).get("dir") or ""
    run_dir = Path(recorded_run)
    if torch_baseline and torch_available and recorded_run and (run_dir / "config.json").is_file():
        from edgead.bench.torch_eager import bench_torch_eager

        batch = np.stack([detector.preprocess(frame)] * detector.batch_size)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        baselines = [bench_torch_eager(run_dir, batch, warmup_s, duration_s, min_runs, device=device)]
        if device == "cuda":
            baselines.append(
                bench_torch_eager(run_dir, batch, warmup_s, duration_s, min_runs, device=device, half=True)
            )
        report["torch_eager"] = baselines
        # Same work on both sides: the network graph on a preprocessed batch (the backend's "infer" stage).
        report["speedup_vs_torch_eager_fp32"] = baselines[0]["stats"]["median"] / infer
        rows[0]["speedup"] = report["speedup_vs_torch_eager_fp32"]
        for base in baselines:
            rows.append(
                {
                    "name": f"torch eager {base['device']} {base['precision']} infer",
                    "stats": base["stats"],
                    "fps": base["fps"],
                    "speedup": baselines[0]["stats"]["median"] / base["stats"]["median"],
                }
            )
    else:
        report["torch_eager"] = None
        if not torch_baseline:
            why = "disabled (--no-torch)"
        elif not torch_available:
            why = "torch not installed"
        elif not recorded_run:
            why = "edgead.json records no run directory"
        elif not run_dir.is_dir():
            why = f"run directory {run_dir} (recorded in edgead.json) not found"
        else:
            why = f"run directory {run_dir} has no config.json"
        report["torch_eager_skipped"] = why
        rows.append({"name": "torch eager infer", "skipped": why})
    if camera_loop:
        if video is not None:
            report["camera_loop"] = bench_camera_loop(detector, Path(video), max_frames=VIDEO_LOOP_FRAMES)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                report["camera_loop"] = bench_camera_loop(detector, write_bench_video(Path(tmp) / "bench.avi", frame))
        report["camera_loop"]["predict_fps"] = backend_result["throughput_fps"]
        report["camera_loop"]["ratio_to_predict"] = report["camera_loop"]["fps"] / backend_result["throughput_fps"]
    providers = detector.backend.session.get_providers() if hasattr(detector.backend, "session") else []
    on_gpu = detector.backend.name == "tensorrt" or any(p != "CPUExecutionProvider" for p in providers)
    report["device"] = _device_name_safe(on_gpu)
    if providers:
        report["backend"]["providers"] = list(providers)
    lines = [
        f"{meta['method']} export {export_dir}, input {'x'.join(map(str, meta['input']['shape']))}, "
        f"frame {width}x{height} ({report['frame']['source']}), on {report['device']}",
        _table(rows),
        "infer: the exported graph on a preprocessed batch (the torch eager rows do the same work: 'vs torch' is "
        "their ratio); predict: a whole Detector.predict on the frame (preprocess + infer + map resize + decision)",
    ]
    if "camera_loop" in report:
        loop = report["camera_loop"]
        lines.append(
            f"camera loop (edgead run on {'--video' if video is not None else 'a generated video'}, decoding on the "
            f"capture thread): {loop['fps']:.1f} FPS over {loop['frames']} frames = {loop['ratio_to_predict']:.2f} x "
            f"predict's FPS, median frame-to-decision latency {loop['median_latency_ms']:.1f} ms"
        )
    report["table"] = "\n".join(lines)
    detector.close()
    if json_path is not None:
        try:
            write_json_atomic(json_path, report)  # a temporary file beside it, renamed over it when complete
        except OSError as err:
            raise OutputPathError(
                f"--json {json_path}: cannot write it ({err.strerror or err}); the measurements:\n{report['table']}"
            ) from None
    return report


def _table(rows: list[dict[str, Any]]) -> str:
    """:func:`format_table` of the measured rows, then each row that could not be measured, with the reason."""
    measured = [row for row in rows if "skipped" not in row]
    table = format_table(measured)
    for row in rows:
        if "skipped" in row:
            table += f"\n{row['name']:<32}not measured: {row['skipped']}"
    return table


def _device_name_safe(on_gpu: bool) -> str:
    """The GPU when the backend runs on one (nvidia-smi, else torch), else the CPU."""
    if on_gpu:
        name = gpu_name()
        if name is None and importlib.util.find_spec("torch") is not None:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if name:
            return name
    return cpu_name()
