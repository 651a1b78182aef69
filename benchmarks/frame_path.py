"""What ``predict`` costs beyond the graph (preprocessing, postprocessing) on a camera-sized frame, for this
code and for an earlier commit, measured in one run.

Each export is timed by ``edgead.bench.timing.bench_detector`` (ONNX Runtime, a generated 1280x720 BGR frame)
in a fresh process per code tree; the trees alternate for ``--rounds`` rounds and each figure is the median
over the rounds of the per-round medians. The earlier commit is extracted with ``git archive`` and imported
through PYTHONPATH (laid out as setup.py installs it: ``export/`` as ``edgead.export``, ``runtime/`` as
``edgead.runtime``), so the same exports and the same machine serve both.

Example (issue: "one colour order on the frame path"):
    python benchmarks/frame_path.py --baseline-ref 51a9935 --export exports/gaussian --export exports/score-resilience
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgead.bench.machine import machine_record, save_record

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
import edgead
from edgead.bench.report import _bench_frame
from edgead.bench.timing import bench_detector
from edgead.runtime.detector import Detector
export, (width, height), (warmup, duration) = sys.argv[1], map(int, sys.argv[2:4]), map(float, sys.argv[4:6])
detector = Detector.load(export, backend="onnxruntime")
frame = _bench_frame((width, height))
stages = bench_detector(detector, frame, warmup, duration)["stages"]
print(json.dumps({"edgead": edgead.__file__, "method": detector.metadata["method"],
                  **{name: stats["median"] for name, stats in stages.items()},
                  "p99_total": stages["total"]["p99"]}))
"""


def baseline_tree(ref: str, work: Path) -> Path:
    """``ref``'s sources laid out as the installed package, under ``work``; returns the PYTHONPATH entry."""
    archive = work / "src.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(REPO), "archive", ref], stdout=handle, check=True)
    src = work / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    tree = work / "tree"
    shutil.copytree(src / "edgead", tree / "edgead")
    shutil.copytree(src / "export", tree / "edgead" / "export")
    shutil.copytree(src / "runtime", tree / "edgead" / "runtime")
    return tree


def measure(export: Path, pythonpath: Path | None, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    width, height = args.frame_size
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(export.resolve()), str(width), str(height), str(args.warmup),
         str(args.duration)],
        capture_output=True, text=True, env=env, check=True, cwd=tempfile.gettempdir(),  # not the checkout's edgead/
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = "tree" if pythonpath is not None else str(REPO)
    if expected not in result.pop("edgead"):
        raise RuntimeError(f"the {'baseline' if pythonpath else 'current'} process imported the wrong edgead")
    return result


def resize_alone_ms(frame_size: tuple[int, int], image_size: int, runs: int = 300) -> dict[str, float]:
    """Median ms of OpenCV's resize of the generated frame to the model input, per interpolation: the part of
    the overhead that a bit-identical preprocessing cannot remove."""
    import time

    import cv2

    from edgead.bench.report import _bench_frame

    frame = _bench_frame(frame_size)
    out = {}
    for name, flag in (("area", cv2.INTER_AREA), ("bilinear", cv2.INTER_LINEAR)):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            cv2.resize(frame, (image_size, image_size), interpolation=flag)
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, action="append", required=True, help="export folder (repeatable)")
    parser.add_argument("--baseline-ref", required=True, help="git commit of the code to compare with")
    parser.add_argument("--frame-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(1280, 720))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--tag", default="colour_order")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = baseline_tree(args.baseline_ref, Path(tmp))
        for export in args.export:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for _ in range(args.rounds):
                runs["baseline"].append(measure(export, tree, args))
                runs["current"].append(measure(export, None, args))
            meta = json.loads((export / "edgead.json").read_text())
            size = meta["preprocess"]["image_size"]
            row: dict = {
                "export": export.name,
                "method": runs["current"][0]["method"],
                "image_size": size,
                "interpolation": meta["preprocess"]["interpolation"],
                "resize_alone_ms": resize_alone_ms(args.frame_size, size),
            }
            for name, results in runs.items():
                median = {k: statistics.median(r[k] for r in results) for k in ("preprocess", "infer", "total")}
                median["overhead"] = median["total"] - median["infer"]
                row[name] = {**median, "rounds": results}
            row["overhead_ratio_current_to_baseline"] = row["current"]["overhead"] / row["baseline"]["overhead"]
            rows.append(row)
            print(
                f"{row['method']}: predict - infer {row['baseline']['overhead']:.2f} ms -> "
                f"{row['current']['overhead']:.2f} ms ({row['overhead_ratio_current_to_baseline']:.0%} of before); "
                f"predict {row['baseline']['total']:.2f} -> {row['current']['total']:.2f} ms; the "
                f"{row['interpolation']} resize alone {row['resize_alone_ms'][row['interpolation']]:.2f} ms"
            )
    record = {
        "benchmark": "frame_path",
        "what": "Detector.predict minus the graph's inference, median ms, ONNX Runtime CPU, generated BGR frame",
        "frame_size": list(args.frame_size),
        "baseline_ref": args.baseline_ref,
        "rows": rows,
        "machine": machine_record(),
    }
    save_record(record, RESULTS, f"frame_path_{{device}}_{args.tag}.json", args.out)


if __name__ == "__main__":
    main()
