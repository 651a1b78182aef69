"""``edgead bench``: exported backend latency, the PyTorch eager baseline in the same run, camera-loop FPS.

Works on a runtime-only device (no torch): the baseline is then skipped and the report says so.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.bench.machine import cpu_name
from edgead.bench.timing import (
    bench_camera_loop,
    bench_detector,
    format_table,
    resident_memory_mb,
    write_bench_video,
)
from edgead.data.io import write_bytes_atomic
from edgead.runtime.detector import Detector


def _bench_frame(seed: int = 0) -> np.ndarray:
    """A 720p BGR frame (camera-sized, so preprocessing includes the real downscale)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(45, 80, 3), dtype=np.uint8)
    import cv2

    return cv2.resize(base, (1280, 720), interpolation=cv2.INTER_CUBIC)


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
) -> dict[str, Any]:
    """Measure everything and return the report (``report["table"]`` is the printable summary)."""
    detector = Detector.load(export_dir, backend=backend, precision=precision)
    meta = detector.metadata
    frame = _bench_frame()
    backend_result = bench_detector(detector, frame, warmup_s, duration_s, min_runs)
    name = f"{detector.backend.name} ({precision or 'default'})"
    rows = [{"name": name, "stats": backend_result["stages"]["total"], "fps": backend_result["throughput_fps"]}]
    report: dict[str, Any] = {
        "export": str(export_dir),
        "method": meta["method"],
        "input_shape": meta["input"]["shape"],
        "backend": {"name": detector.backend.name, **backend_result},
        "memory_after_backend": resident_memory_mb(),
    }
    torch_available = importlib.util.find_spec("torch") is not None
    run_dir = Path(meta.get("run", {}).get("dir", ""))
    if torch_baseline and torch_available and (run_dir / "config.json").is_file():
        from edgead.bench.torch_eager import bench_torch_eager

        batch = np.stack([detector.preprocess(frame)] * detector.batch_size)
        infer = backend_result["stages"]["infer"]["median"]
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
        rows.insert(
            0,
            {
                "name": f"{detector.backend.name} infer only",
                "stats": backend_result["stages"]["infer"],
                "fps": 1e3 * detector.batch_size / infer,
                "speedup": report["speedup_vs_torch_eager_fp32"],
            },
        )
        for base in baselines:
            rows.append(
                {
                    "name": f"torch eager {base['device']} {base['precision']}",
                    "stats": base["stats"],
                    "fps": base["fps"],
                    "speedup": baselines[0]["stats"]["median"] / base["stats"]["median"],
                }
            )
    else:
        report["torch_eager"] = None
        report["torch_eager_skipped"] = (
            ("torch not installed" if not torch_available else f"run directory {run_dir} not found")
            if torch_baseline
            else "disabled"
        )
    if camera_loop:
        with tempfile.TemporaryDirectory() as tmp:
            video = write_bench_video(Path(tmp) / "bench.avi", frame)
            report["camera_loop"] = bench_camera_loop(detector, video)
        report["camera_loop"]["bare_inference_fps"] = backend_result["throughput_fps"]
        report["camera_loop"]["ratio_to_bare"] = report["camera_loop"]["fps"] / backend_result["throughput_fps"]
    report["device"] = _device_name_safe()
    report["table"] = format_table(rows)
    if "camera_loop" in report:
        loop = report["camera_loop"]
        report["table"] += (
            f"\ncamera loop on a video file: {loop['fps']:.1f} FPS "
            f"({loop['ratio_to_bare']:.2f} x bare predict), median latency "
            f"{loop['median_latency_ms']:.1f} ms"
        )
    detector.close()
    if json_path is not None:
        write_bytes_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _device_name_safe() -> str:
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return cpu_name()
