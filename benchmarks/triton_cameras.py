"""Cameras against one Triton server vs the same number of local detectors, on this machine.

For 1, 2, 4 and 8 concurrent cameras (threads, each sending its next frame when the previous answer came):
frames per second over all cameras and per-frame latency p50 / p99, (a) against one ``tritonserver`` (the
nvidia-pytriton binary, Python-backend model of ``edgead export --format triton``, dynamic batching) through
``edgead.runtime.triton_client.TritonPredictor`` (gRPC), and (b) with one local ``Detector`` per camera in the
same process; both in the same run, medians over the measured window after a warm-up.

    edgead export --method gaussian --format triton --out exports/gaussian-triton
    python benchmarks/triton_cameras.py --export exports/gaussian-triton
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgead.bench.machine import machine_record, save_record
from edgead.runtime.detector import Detector
from edgead.runtime.metadata import load_metadata

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cameras(make: Any, count: int, frames: list[np.ndarray], warmup_s: float, duration_s: float) -> dict[str, Any]:
    """``count`` threads, each with its own predictor from ``make()``, looping over ``frames``."""
    predictors = [make() for _ in range(count)]
    latencies: list[list[float]] = [[] for _ in range(count)]
    start_barrier = threading.Barrier(count + 1)
    measure_from: list[float] = [0.0]
    stop_at: list[float] = [0.0]

    def camera(k: int) -> None:
        predictor, i = predictors[k], k
        start_barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                return
            predictor.predict(frames[i % len(frames)])
            t1 = time.perf_counter()
            if t0 >= measure_from[0]:
                latencies[k].append((t1 - t0) * 1e3)
            i += 1

    threads = [threading.Thread(target=camera, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    measure_from[0], stop_at[0] = now + warmup_s, now + warmup_s + duration_s
    start_barrier.wait()
    for t in threads:
        t.join()
    for p in predictors:
        p.close()
    every = np.concatenate([np.array(v) for v in latencies])
    return {
        "cameras": count,
        "frames": int(len(every)),
        "fps_total": round(len(every) / duration_s, 2),
        "latency_p50_ms": round(float(np.percentile(every, 50)), 2),
        "latency_p99_ms": round(float(np.percentile(every, 99)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path, help="an export made with --format triton")
    parser.add_argument("--cameras", default="1,2,4,8")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from edgead.runtime.triton_client import TritonPredictor
    from edgead.runtime.triton_server import backend_directory, server_command, wait_ready

    export = args.export.resolve()
    meta = load_metadata(export)
    name = meta.method.replace("-", "_")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]  # VGA camera frames
    counts = [int(c) for c in args.cameras.split(",")]
    rows: dict[str, Any] = {"triton": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        ports = [_free_port() for _ in range(3)]
        command = server_command(export / "triton", backend_directory(Path(tmp)), *ports, models=[name])
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(ports[0], server, timeout_s=120)
            for n in counts:
                make = lambda: TritonPredictor(f"grpc://127.0.0.1:{ports[1]}", name)  # noqa: E731
                rows["triton"].append(_cameras(make, n, frames, args.warmup, args.duration))
                print("triton", rows["triton"][-1], flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    for n in counts:
        make = lambda: Detector.load(export, backend="onnxruntime")  # noqa: E731
        rows["local"].append(_cameras(make, n, frames, args.warmup, args.duration))
        print("local", rows["local"][-1], flush=True)
    result = {
        "benchmark": "triton_cameras",
        "export": {"method": meta.method, "input": meta.preprocess, "batch": 1},
        "frames": "640 x 480 random BGR, 8 distinct",
        "server": "tritonserver 2.51 (nvidia-pytriton), Python-backend model, dynamic batching (max 8), 1 instance",
        "client": "gRPC, one TritonPredictor per camera thread",
        "local": "one Detector (ONNX Runtime, CPU) per camera thread, same process",
        "timing": f"{args.warmup:g} s warm-up, {args.duration:g} s measured per row",
        "rows": rows,
        "machine": machine_record(),
    }
    save_record(result, RESULTS, f"triton_cameras_{{device}}_{meta.method}.json", args.out)


if __name__ == "__main__":
    main()
