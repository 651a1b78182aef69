"""``edgead predict``: an exported detector over an image, a folder of images or a video file, in batch.

The batch counterpart of ``edgead run`` (which is live and may drop frames): every image or frame is scored,
and the results go to ``predictions.csv`` (one row per image: file, frame, score, decision, threshold) and
``predictions.json`` (the same rows, the export used and a summary), with heatmap overlays of all images,
only the anomalous ones, or none. Output files are written atomically into a new folder; an existing
non-empty output folder is refused, so earlier predictions are never overwritten.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgead.data.io import write_bytes_atomic, write_image_atomic, write_json_atomic
from edgead.progress import Progress
from edgead.runtime.overlay import draw_hud
from edgead.runtime.sources import SourceError, create_source

SAVE_CHOICES = ("all", "anomalies", "none")
CSV_FIELDS = ("file", "frame", "score", "is_anomaly", "threshold")


@dataclass
class PredictSummary:
    images: int = 0
    anomalies: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def _overlay_name(row: dict[str, Any], used: set[str]) -> str:
    stem = Path(str(row["file"])).stem or "frame"
    name = f"{row['frame']:06d}_{stem}_{'anomaly' if row['is_anomaly'] else 'normal'}.png"
    while name in used:  # two files of one name in a video / folder: never overwrite
        name = name.replace(".png", "+.png")
    used.add(name)
    return name


def predict_source(
    detector: Any,
    source: str,
    out_dir: Path,
    *,
    save: str = "anomalies",
    skip_bad: bool = False,
    on_event: Callable[[str], None] = print,
    progress: bool = False,
) -> PredictSummary:
    """Score every image of ``source`` with ``detector`` (a :class:`edgead.runtime.Detector`) into ``out_dir``.

    Raises:
        ValueError: ``save`` is not one of :data:`SAVE_CHOICES`, or ``out_dir`` holds files already.
        SourceError: The source cannot be opened, or an image cannot be read (unless ``skip_bad``).
    """
    if save not in SAVE_CHOICES:
        raise ValueError(f"--save must be one of {', '.join(SAVE_CHOICES)}, got {save!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: the output folder exists and is not empty; predictions never overwrite")
    frames = create_source(source, skip_bad=skip_bad, on_event=on_event)
    if frames.live:
        raise SourceError(f"{source}: predict takes an image, a folder of images or a video file; use `edgead run`")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary()
    used: set[str] = set()
    start = time.perf_counter()
    frames.open()
    with Progress("predict", frames.expected_frames or 0, unit="images", enabled=progress) as bar:
        try:
            while (frame := frames.read()) is not None:
                result = detector.predict(frame.image)
                row = {
                    "file": frame.name,
                    "frame": frame.index,
                    "score": float(result.score),
                    "is_anomaly": bool(result.is_anomaly),
                    "threshold": float(result.threshold),
                }
                summary.rows.append(row)
                summary.images += 1
                summary.anomalies += int(result.is_anomaly)
                if save == "all" or (save == "anomalies" and result.is_anomaly):
                    hud = draw_hud(frame.image, result, None, None, 0.0, 2.0 * float(result.threshold))
                    name = _overlay_name(row, used)
                    write_image_atomic(out_dir / "overlays" / name, hud, bgr=True)
                    row["overlay"] = f"overlays/{name}"
                bar.advance()
        finally:
            frames.close()
    summary.seconds = time.perf_counter() - start
    summary.skipped = int(getattr(frames, "skipped", 0))
    if summary.images == 0:
        raise SourceError(f"{source}: no image could be scored")
    _write_results(out_dir, detector, source, summary)
    return summary


def _write_results(out_dir: Path, detector: Any, source: str, summary: PredictSummary) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary.rows:
        writer.writerow({**row, "score": f"{row['score']:.6g}", "threshold": f"{row['threshold']:.6g}"})
    write_bytes_atomic(out_dir / "predictions.csv", text.getvalue().encode("utf-8"))
    scores = np.array([row["score"] for row in summary.rows])
    record = {
        "source": source,
        "export": detector.describe(),
        "summary": {
            "images": summary.images,
            "anomalies": summary.anomalies,
            "skipped": summary.skipped,
            "threshold": summary.rows[0]["threshold"],
            "score_min": float(scores.min()),
            "score_median": float(np.median(scores)),
            "score_max": float(scores.max()),
            "seconds": round(summary.seconds, 3),
        },
        "predictions": summary.rows,
    }
    write_json_atomic(out_dir / "predictions.json", record, durable=False)
