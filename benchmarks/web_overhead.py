"""What the live page costs the camera loop: `edgead run` on a video with and without `--web`, one page open.

The loop runs the export on the generated 1280x720 video (`edgead bench`'s frame, 600 frames; a video file is
read as fast as the loop goes, so FPS is the loop's throughput), alternately without and with the page
(``--rounds`` of each, in one process, the same detector), with headless Chromium showing the page (its MJPEG
view at the page's default 5 frames/s, its status and score polls once a second). Latency p50 / p99 from the
run's JSON-lines log (capture to result, every frame). A last run adds the worst viewers: every MJPEG stream
the server allows held open by clients that never read, and the process's resident memory before and after.

Example:
    python benchmarks/web_overhead.py --export exports/gaussian
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgead.bench.machine import save_record
from edgead.bench.report import DEFAULT_FRAME_SIZE, _bench_frame
from edgead.bench.timing import resident_memory_mb, write_bench_video
from edgead.runtime.detector import Detector
from edgead.runtime.live import LiveOptions, run_live
from edgead.runtime.web import MAX_STREAMS, LiveWeb

RESULTS = Path(__file__).resolve().parent / "results"


def one_run(detector: Detector, video: Path, work: Path, web: LiveWeb | None) -> dict[str, Any]:
    log = work / "run.jsonl"
    log.unlink(missing_ok=True)
    summary = run_live(detector, str(video), LiveOptions(show=False, log_path=log, web=web), on_event=lambda _: None)
    latencies = [json.loads(line)["latency_ms"] for line in log.read_text().splitlines()]
    return {
        "frames": summary.frames,
        "fps": summary.fps,
        "latency_p50_ms": float(np.percentile(latencies, 50)),
        "latency_p99_ms": float(np.percentile(latencies, 99)),
    }


def open_page(url: str) -> tuple[Any, Any, Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium here: apt-get install chromium (the page is measured in a real browser)")
    manager = sync_playwright().start()
    browser = manager.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url, wait_until="domcontentloaded")
    return manager, browser, page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgead-web-"))
    try:
        video = write_bench_video(work / "line.avi", _bench_frame(DEFAULT_FRAME_SIZE), n_frames=args.frames)
        detector = Detector.load(args.export, backend="onnxruntime")
        web = LiveWeb("127.0.0.1", 0)
        url = web.start()
        web.set_info(source="benchmark video")
        manager, browser, page = open_page(url)
        runs: dict[str, list[dict[str, Any]]] = {"without": [], "with_page": []}
        one_run(detector, video, work, None)  # warm-up: caches, the page's first load
        for _ in range(args.rounds):
            runs["without"].append(one_run(detector, video, work, None))
            runs["with_page"].append(one_run(detector, video, work, web))
            print(runs["without"][-1], runs["with_page"][-1], flush=True)
        frames_shown = page.evaluate("Number(document.getElementById('frames').textContent)")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        stuck = []
        memory_before = resident_memory_mb()
        for _ in range(MAX_STREAMS - 1):  # the page holds one stream; the rest of the cap never read
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /stream.mjpg?fps=30 HTTP/1.1\r\nHost: bench\r\n\r\n")
            stuck.append(conn)
        crowded = one_run(detector, video, work, web)
        memory_after = resident_memory_mb()
        refused = socket.create_connection(("127.0.0.1", port))
        refused.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: bench\r\n\r\n")
        refused_status = refused.recv(32).split(b"\r\n")[0].decode()
        for conn in (*stuck, refused):
            conn.close()
        browser.close()
        manager.stop()
        web.stop("benchmark over")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    summary = {
        name: {key: round(median(name, key), 2) for key in ("fps", "latency_p50_ms", "latency_p99_ms")} for name in runs
    }
    summary["fps_change_percent"] = round(100 * (summary["with_page"]["fps"] / summary["without"]["fps"] - 1), 2)
    summary["p99_change_ms"] = round(summary["with_page"]["latency_p99_ms"] - summary["without"]["latency_p99_ms"], 2)
    record = {
        "benchmark": "web_overhead",
        "export": {"method": detector.metadata.method, "input": detector.metadata.input["shape"]},
        "video": {"frames": args.frames, "size": f"{DEFAULT_FRAME_SIZE[0]}x{DEFAULT_FRAME_SIZE[1]}"},
        "page": "headless Chromium, the page's default view (MJPEG at 5 frames/s, status and scores polled at 1 Hz)",
        "rounds": runs,
        "summary": summary,
        "frames_counted_by_the_page": frames_shown,
        "crowded": {
            "streams_held": MAX_STREAMS,
            "readers_that_never_read": MAX_STREAMS - 1,
            "run": crowded,
            "resident_memory_mb_before": memory_before,
            "resident_memory_mb_after": memory_after,
            "one_more_stream": refused_status,
        },
        "targets": {"p99_change_ms_at_most": 1.0, "fps_change_percent_within": 3.0},
    }
    print(json.dumps(summary))
    save_record(record, RESULTS, f"web_overhead_{detector.metadata.method}{'_' + args.tag if args.tag else ''}.json",
                args.out)  # fmt: skip


if __name__ == "__main__":
    main()
